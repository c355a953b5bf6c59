//! Whole-stack checks once every service is converted: names, profiles,
//! `depends_on`/`links` targets, dependency cycles, volume and network
//! references, and health check conflicts.

use std::collections::{BTreeMap, BTreeSet};

use crate::compose::ServiceMeta;
use crate::diagnostics::{Diagnostic, Diags};
use crate::types::Service;
use crate::yaml::Pos;

/// Longest service or stack name: names become DNS labels (at most 63
/// bytes), and the server refuses longer ones.
pub const MAX_NAME_LEN: usize = 63;

/// True for a valid service name: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`, Compose's
/// rule, at most [`MAX_NAME_LEN`] long. Unlike stack names, service names
/// keep their case: Compose does not normalise them, and the names berth
/// derives from them (such as `<NAME>_HOST` variables) are built from the
/// name as written.
pub fn valid_service_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= MAX_NAME_LEN
        && matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// True for a valid stack name: `[a-z0-9][a-z0-9_-]*` (Compose's rule), at
/// most [`MAX_NAME_LEN`] long.
pub fn valid_stack_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= MAX_NAME_LEN
        && matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'))
}

/// A folder name normalised as Compose does for project names: lower-cased,
/// only `[a-z0-9_-]` kept, leading `_`/`-` dropped; then cut to
/// [`MAX_NAME_LEN`].
pub fn normalize_stack_name(folder: &str) -> String {
    let s: String = folder
        .to_lowercase()
        .chars()
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'))
        .collect();
    let mut s = s.trim_start_matches(['_', '-']).to_string();
    s.truncate(MAX_NAME_LEN);
    s
}

/// Reports invalid service names.
pub fn check_names(services: &BTreeMap<String, (Service, ServiceMeta)>, diags: &mut Diags) {
    for (name, (_, meta)) in services {
        if !valid_service_name(name) {
            let hint = if name.contains('/') {
                "service names cannot contain `/`".to_string()
            } else if name.len() > MAX_NAME_LEN {
                format!("service names are at most {MAX_NAME_LEN} characters long")
            } else {
                format!(
                    "use letters, digits, `_`, `.` and `-`, starting with a letter or digit (e.g. `{}`)",
                    suggest_name(name)
                )
            };
            diags.error(
                Diagnostic::at(&meta.pos, format!("invalid service name `{name}`"))
                    .service(name.clone())
                    .hint(hint),
            );
        }
    }
}

fn suggest_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_start_matches(['_', '.', '-']).to_string();
    if s.is_empty() { "web".into() } else { s }
}

/// Whether a service with `profiles` is enabled by `enabled`.
pub fn profile_enabled(profiles: &[String], enabled: &[String]) -> bool {
    profiles.is_empty() || enabled.iter().any(|e| e == "*" || profiles.contains(e))
}

/// Checks references between the active services; drops optional
/// (`required: false`) dependencies on services that are not active.
pub fn check_references(
    active: &mut BTreeMap<String, (Service, ServiceMeta)>,
    all: &BTreeSet<String>,
    volumes: &BTreeSet<String>,
    networks: &BTreeSet<String>,
    diags: &mut Diags,
) {
    let names: BTreeSet<String> = active.keys().cloned().collect();
    for (name, (svc, meta)) in active.iter_mut() {
        let deps: Vec<String> = svc.depends_on.keys().cloned().collect();
        for dep in deps {
            let pos = meta
                .depends
                .get(&dep)
                .cloned()
                .unwrap_or_else(|| meta.pos.clone());
            let field = format!("services.{name}.depends_on");
            let required = svc.depends_on.get(&dep).is_some_and(|d| d.required);
            if dep == *name {
                diags.error(
                    Diagnostic::at(&pos, format!("service `{name}` depends on itself"))
                        .service(name.clone())
                        .field(field)
                        .hint("remove it from its own depends_on"),
                );
            } else if names.contains(&dep) {
                continue;
            } else if all.contains(&dep) {
                if required {
                    diags.error(
                        Diagnostic::at(&pos, format!("depends on `{dep}`, whose profiles are not enabled"))
                            .service(name.clone())
                            .field(field)
                            .hint("enable its profile (--profile), or mark the dependency `required: false`"),
                    );
                } else {
                    diags.warn(
                        Diagnostic::at(
                            &pos,
                            format!("optional dependency `{dep}` is not enabled and is skipped"),
                        )
                        .service(name.clone())
                        .field(field),
                    );
                    svc.depends_on.remove(&dep);
                }
            } else if required {
                let known: Vec<&str> = names.iter().map(String::as_str).collect();
                let mut d = Diagnostic::at(&pos, format!("depends on undefined service `{dep}`"))
                    .service(name.clone())
                    .field(field);
                d.hint = Some(match crate::schema::did_you_mean(&dep, &known) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("defined services: {}", known.join(", ")),
                });
                diags.error(d);
            } else {
                diags.warn(
                    Diagnostic::at(
                        &pos,
                        format!("optional dependency `{dep}` is not defined and is skipped"),
                    )
                    .service(name.clone())
                    .field(field),
                );
                svc.depends_on.remove(&dep);
            }
        }
        for (link, pos) in &meta.links {
            if !names.contains(link) {
                diags.error(
                    Diagnostic::at(
                        pos,
                        format!("links to undefined or disabled service `{link}`"),
                    )
                    .service(name.clone())
                    .field(format!("services.{name}.links")),
                );
            }
        }
        for (vol, pos) in &meta.named_volumes {
            if !volumes.contains(vol) {
                diags.error(
                    Diagnostic::at(pos, format!("uses undefined volume `{vol}`"))
                        .service(name.clone())
                        .field(format!("services.{name}.volumes"))
                        .hint(format!("declare it under the top-level `volumes:` (`volumes: {{ {vol}: {{}} }}`), or use a path like ./{vol} for a bind mount")),
                );
            }
        }
        for (net, pos) in &meta.networks {
            if net != "default" && !networks.contains(net) {
                diags.error(
                    Diagnostic::at(pos, format!("joins undefined network `{net}`"))
                        .service(name.clone())
                        .field(format!("services.{name}.networks"))
                        .hint("declare it under the top-level `networks:`"),
                );
            }
        }
        for (other, field, pos) in &meta.placement_refs {
            if !names.contains(other) {
                let known: Vec<&str> = names.iter().map(String::as_str).collect();
                let mut d = Diagnostic::at(
                    pos,
                    format!("{field} names undefined or disabled service `{other}`"),
                )
                .service(name.clone())
                .field(format!("services.{name}.{field}"));
                d.hint = Some(match crate::schema::did_you_mean(other, &known) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("defined services: {}", known.join(", ")),
                });
                diags.error(d);
            }
        }
        if let (Some(_), Some(b)) = (&meta.compose_healthcheck, &meta.berth_healthcheck) {
            diags.error(
                Diagnostic::at(b, "both `healthcheck` and `x-berth.healthcheck` are set")
                    .service(name.clone())
                    .field(format!("services.{name}.x-berth.healthcheck"))
                    .hint("pick one: a Compose exec check or a berth HTTP/TCP check"),
            );
        }
    }
}

/// Reports each `depends_on` cycle once, at the first service's entry.
pub fn check_cycles(active: &BTreeMap<String, (Service, ServiceMeta)>, diags: &mut Diags) {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut marks: BTreeMap<&str, Mark> = active.keys().map(|k| (k.as_str(), Mark::New)).collect();
    let mut seen_cycles: BTreeSet<Vec<String>> = BTreeSet::new();
    fn visit<'a>(
        n: &'a str,
        active: &'a BTreeMap<String, (Service, ServiceMeta)>,
        marks: &mut BTreeMap<&'a str, Mark>,
        path: &mut Vec<&'a str>,
        seen: &mut BTreeSet<Vec<String>>,
        diags: &mut Diags,
    ) {
        marks.insert(n, Mark::Open);
        path.push(n);
        if let Some((svc, _)) = active.get(n) {
            for dep in svc.depends_on.keys() {
                if dep == n {
                    continue;
                }
                let Some((k, _)) = active.get_key_value(dep.as_str()) else {
                    continue;
                };
                match marks.get(k.as_str()).copied() {
                    Some(Mark::Open) => {
                        let start = path.iter().position(|p| *p == k.as_str()).unwrap_or(0);
                        let cycle: Vec<String> =
                            path[start..].iter().map(|s| s.to_string()).collect();
                        let mut key = cycle.clone();
                        key.sort();
                        if seen.insert(key) {
                            let first = &cycle[0];
                            let mut shown = cycle.clone();
                            shown.push(first.clone());
                            let (pos, field): (Pos, String) = match active.get(first) {
                                Some((_, meta)) => (
                                    meta.depends
                                        .get(&cycle[(1) % cycle.len()])
                                        .cloned()
                                        .unwrap_or_else(|| meta.pos.clone()),
                                    format!("services.{first}.depends_on"),
                                ),
                                None => continue,
                            };
                            diags.error(
                                Diagnostic::at(
                                    &pos,
                                    format!("dependency cycle: {}", shown.join(" → ")),
                                )
                                .service(first.clone())
                                .field(field)
                                .hint("remove one of these depends_on entries"),
                            );
                        }
                    }
                    Some(Mark::New) => visit(k.as_str(), active, marks, path, seen, diags),
                    _ => {}
                }
            }
        }
        path.pop();
        marks.insert(n, Mark::Done);
    }
    let names: Vec<&str> = active.keys().map(String::as_str).collect();
    for n in names {
        if marks.get(n) == Some(&Mark::New) {
            visit(
                n,
                active,
                &mut marks,
                &mut Vec::new(),
                &mut seen_cycles,
                diags,
            );
        }
    }
}
