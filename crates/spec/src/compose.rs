//! The merged Compose model (YAML nodes) → [`types::Stack`] services: type
//! checks, short/long syntax normalisation, defaults, and warnings for the
//! Compose keys berth ignores.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::diagnostics::{Diagnostic, Diags};
use crate::envfile;
use crate::loader::{Loader, Vars, resolve};
use crate::schema;
use crate::types::*;
use crate::units::{normalize_signal, parse_duration_ms, parse_size};
use crate::yaml::{Node, Pos, Value};

/// Where a converted service's parts were written, for later validation.
#[derive(Debug, Clone)]
pub struct ServiceMeta {
    /// The service's key.
    pub pos: Pos,
    /// Each `depends_on` entry's position.
    pub depends: BTreeMap<String, Pos>,
    /// Each `links` entry's position.
    pub links: BTreeMap<String, Pos>,
    /// Named volumes used, with positions.
    pub named_volumes: Vec<(String, Pos)>,
    /// Networks joined, with positions.
    pub networks: Vec<(String, Pos)>,
    /// Position of a Compose `healthcheck`, if any.
    pub compose_healthcheck: Option<Pos>,
    /// Position of an `x-berth.healthcheck`, if any.
    pub berth_healthcheck: Option<Pos>,
    /// Services named by `x-berth.placement.affinity`/`anti_affinity`, with
    /// the field and position of each entry.
    pub placement_refs: Vec<(String, &'static str, Pos)>,
}

/// Converts nodes, reporting problems with the service and field.
pub struct Conv<'l, 'a> {
    pub loader: &'l mut Loader<'a>,
    pub service: String,
    pub vars: &'l Vars,
}

impl Conv<'_, '_> {
    fn diags(&mut self) -> &mut Diags {
        &mut self.loader.diags
    }

    fn path(&self, field: &str) -> String {
        if field.is_empty() {
            format!("services.{}", self.service)
        } else {
            format!("services.{}.{field}", self.service)
        }
    }

    fn err(&mut self, node: &Node, field: &str, msg: impl Into<String>) -> Diagnostic {
        Diagnostic::at(&node.pos, msg)
            .service(self.service.clone())
            .field(self.path(field))
    }

    fn error(&mut self, node: &Node, field: &str, msg: impl Into<String>) {
        let d = self.err(node, field, msg);
        self.diags().error(d);
    }

    fn error_hint(
        &mut self,
        node: &Node,
        field: &str,
        msg: impl Into<String>,
        hint: impl Into<String>,
    ) {
        let d = self.err(node, field, msg).hint(hint);
        self.diags().error(d);
    }

    fn warn(&mut self, node: &Node, field: &str, msg: impl Into<String>) {
        let d = self.err(node, field, msg);
        self.diags().warn(d);
    }

    fn keys(&mut self, node: &Node, field: &str, known: &[&str], supported: &[&str]) {
        let path = self.path(field);
        let svc = self.service.clone();
        schema::check_keys(node, &path, Some(&svc), known, supported, self.diags());
    }

    fn expect(&mut self, node: &Node, field: &str, expected: &str) {
        let found = node.kind();
        self.error(node, field, format!("expected {expected}, found {found}"));
    }

    fn map<'n>(&mut self, node: &'n Node, field: &str) -> Option<&'n [(Node, Node)]> {
        match &node.value {
            Value::Map(m) => Some(m),
            _ => {
                self.expect(node, field, "a mapping");
                None
            }
        }
    }

    fn string(&mut self, node: &Node, field: &str) -> Option<String> {
        match node.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                self.expect(node, field, "a string");
                None
            }
        }
    }

    fn boolean(&mut self, node: &Node, field: &str) -> Option<bool> {
        match node.as_str() {
            Some("true" | "True" | "TRUE") => Some(true),
            Some("false" | "False" | "FALSE") => Some(false),
            _ => {
                self.expect(node, field, "a boolean (true or false)");
                None
            }
        }
    }

    fn number<T: std::str::FromStr>(&mut self, node: &Node, field: &str, what: &str) -> Option<T> {
        let Some(text) = node.as_str().map(str::trim) else {
            self.expect(node, field, what);
            return None;
        };
        if let Ok(v) = text.parse::<T>() {
            return Some(v);
        }
        // Name the value: "found a number" for `-1` or `1e30` says nothing.
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        let why = if digits(text) {
            " (too large)"
        } else if text.strip_prefix('-').is_some_and(digits) {
            " (it cannot be negative)"
        } else {
            ""
        };
        self.error(node, field, format!("expected {what}, found `{text}`{why}"));
        None
    }

    fn duration(&mut self, node: &Node, field: &str) -> Option<u64> {
        let Some(s) = node.as_str() else {
            self.expect(node, field, "a duration such as 10s");
            return None;
        };
        match parse_duration_ms(s) {
            Some(ms) => Some(ms),
            None => {
                self.error_hint(
                    node,
                    field,
                    format!("invalid duration {s:?}"),
                    "use a Compose duration like 5s, 1m30s, 250ms",
                );
                None
            }
        }
    }

    fn strings(&mut self, node: &Node, field: &str) -> Vec<String> {
        match &node.value {
            Value::Seq(items) => items.iter().filter_map(|i| self.string(i, field)).collect(),
            Value::Null => Vec::new(),
            _ => {
                self.expect(node, field, "a list of strings");
                Vec::new()
            }
        }
    }

    fn string_or_list(&mut self, node: &Node, field: &str) -> Vec<String> {
        match &node.value {
            Value::Scalar { text, .. } => vec![text.clone()],
            _ => self.strings(node, field),
        }
    }

    /// `list_or_dict`: `[K=V, …]` or `{K: V}`; values may be absent.
    fn list_or_dict(&mut self, node: &Node, field: &str) -> Vec<(String, Option<String>, Node)> {
        let mut out = Vec::new();
        match &node.value {
            Value::Map(entries) => {
                for (k, v) in entries {
                    let key = k.as_str().unwrap_or_default().to_string();
                    if key.trim().is_empty() {
                        self.error_hint(
                            k,
                            field,
                            "a key is empty",
                            "give every entry a name (KEY: value)",
                        );
                        continue;
                    }
                    let val = match &v.value {
                        Value::Null => None,
                        Value::Scalar { text, .. } => Some(text.clone()),
                        _ => {
                            self.expect(
                                v,
                                &format!("{field}.{key}"),
                                "a string, number or boolean",
                            );
                            continue;
                        }
                    };
                    out.push((key, val, k.clone()));
                }
            }
            Value::Seq(items) => {
                for it in items {
                    let Some(s) = self.string(it, field) else {
                        continue;
                    };
                    let (k, v) = match s.split_once('=') {
                        Some((k, v)) => (k.to_string(), Some(v.to_string())),
                        None => (s, None),
                    };
                    if k.trim().is_empty() {
                        self.error_hint(
                            it,
                            field,
                            format!(
                                "entry {:?} has no name before `=`",
                                it.as_str().unwrap_or("")
                            ),
                            "write KEY=VALUE, or KEY alone to take its value from the environment",
                        );
                        continue;
                    }
                    out.push((k, v, it.clone()));
                }
            }
            Value::Null => {}
            _ => self.expect(node, field, "a mapping or a list of KEY=VALUE strings"),
        }
        out
    }

    fn command(&mut self, node: &Node, field: &str) -> Option<Command> {
        match &node.value {
            Value::Null => None,
            Value::Scalar { text, .. } => Some(Command::Shell(text.clone())),
            Value::Seq(_) => Some(Command::Exec(self.strings(node, field))),
            Value::Map(_) => {
                self.expect(node, field, "a string or a list of strings");
                None
            }
        }
    }
}

/// Converts one service node.
pub fn service(
    conv: &mut Conv<'_, '_>,
    key: &Node,
    node: &Node,
    project_dir: &Path,
) -> (Service, ServiceMeta) {
    let name = conv.service.clone();
    let mut svc = Service::new(name.clone());
    let mut meta = ServiceMeta {
        pos: key.pos.clone(),
        depends: BTreeMap::new(),
        links: BTreeMap::new(),
        named_volumes: Vec::new(),
        networks: Vec::new(),
        compose_healthcheck: None,
        berth_healthcheck: None,
        placement_refs: Vec::new(),
    };
    let entries: Vec<(Node, Node)> = match &node.value {
        Value::Map(m) => m.clone(),
        Value::Null => Vec::new(),
        _ => {
            let found = node.kind();
            conv.error_hint(
                node,
                "",
                format!("a service must be a mapping, found {found}"),
                "write the service's fields indented under its name",
            );
            return (svc, meta);
        }
    };
    let full = Node::new(node.pos.clone(), Value::Map(entries.clone()));
    conv.keys(&full, "", schema::SERVICE, schema::SERVICE_SUPPORTED);
    // env_file first: `environment` wins over it whatever the key order.
    if let Some(ef) = full.get("env_file") {
        env_files(conv, ef, &mut svc.environment);
    }
    let mut scale: Option<(u32, Node)> = None;
    let mut restart_given = false;
    let mut exposed: Vec<Port> = Vec::new();
    for (k, v) in &entries {
        let key = k.as_str().unwrap_or_default();
        match key {
            "image" => svc.image = conv.string(v, key),
            "build" => svc.build = build(conv, v),
            "pull_policy" => svc.pull_policy = conv.string(v, key),
            "command" => svc.command = conv.command(v, key),
            "entrypoint" => svc.entrypoint = conv.command(v, key),
            "working_dir" => {
                svc.working_dir = conv.string(v, key).map(|s| resolve(&v.pos.base, &s));
            }
            "user" => svc.user = conv.string(v, key),
            "environment" => {
                for (k2, val, _) in conv.list_or_dict(v, key) {
                    let val = val.or_else(|| conv.vars.get(&k2).cloned());
                    svc.environment.insert(k2, val);
                }
            }
            "ports" => match &v.value {
                Value::Seq(items) => {
                    for it in items {
                        ports(conv, it, &mut svc.ports);
                    }
                }
                _ => conv.expect(v, key, "a list of ports"),
            },
            // Declared like an unpublished `ports` entry (which is what
            // `expose` means to berth: the service listens there, nothing is
            // published), added after `ports` so the first port stays first.
            "expose" => expose(conv, v, &mut exposed),
            "depends_on" => depends_on(conv, v, &mut svc, &mut meta),
            "links" => links(conv, v, &mut svc, &mut meta),
            "healthcheck" => {
                meta.compose_healthcheck = Some(k.pos.clone());
                svc.healthcheck = healthcheck(conv, v);
            }
            "restart" => {
                restart_given = true;
                if let Some(p) = restart(conv, v) {
                    svc.restart = p;
                }
            }
            "deploy" => deploy(conv, v, &mut svc),
            "scale" => {
                if let Some(n) = conv.number::<u32>(v, key, "a whole number of replicas") {
                    scale = Some((n, v.clone()));
                }
            }
            "stop_signal" => {
                if let Some(sig) = stop_signal(conv, v) {
                    svc.stop_signal = sig;
                }
            }
            "stop_grace_period" => {
                if let Some(ms) = conv.duration(v, key) {
                    svc.stop_grace_period_ms = ms;
                }
            }
            "labels" => {
                for (k2, val, _) in conv.list_or_dict(v, key) {
                    svc.labels.insert(k2, val.unwrap_or_default());
                }
            }
            "profiles" => svc.profiles = conv.strings(v, key),
            "volumes" => volumes(conv, v, &mut svc, &mut meta, project_dir),
            "tmpfs" => svc.tmpfs = conv.string_or_list(v, key),
            "networks" => networks(conv, v, &mut svc, &mut meta),
            "extra_hosts" => svc.extra_hosts = extra_hosts(conv, v),
            "init" => svc.init = conv.boolean(v, key),
            "read_only" => svc.read_only = conv.boolean(v, key).unwrap_or(false),
            "cap_add" => svc.cap_add = conv.strings(v, key),
            "cap_drop" => svc.cap_drop = conv.strings(v, key),
            "x-berth" => berth_ext(conv, v, &mut svc, &mut meta),
            k2 if k2.starts_with("x-") => {
                svc.extensions.insert(k2.to_string(), v.to_json());
            }
            _ => {}
        }
    }
    for p in exposed {
        if !svc
            .ports
            .iter()
            .any(|q| q.target == p.target && q.protocol == p.protocol)
        {
            svc.ports.push(p);
        }
    }
    if let Some((n, at)) = scale {
        if full.get("deploy").and_then(|d| d.get("replicas")).is_some() {
            if svc.deploy.replicas != n {
                conv.error_hint(
                    &at,
                    "scale",
                    format!(
                        "`scale: {n}` contradicts `deploy.replicas: {}`",
                        svc.deploy.replicas
                    ),
                    "keep only one of them",
                );
            }
        } else {
            svc.deploy.replicas = n;
        }
    }
    // deploy.restart_policy wins over `restart`, as in Compose v2.
    if let Some(rp) = full.get("deploy").and_then(|d| d.get("restart_policy")) {
        if let Some(p) = restart_from_deploy(conv, rp) {
            svc.restart = p;
        }
    } else if !restart_given {
        svc.restart = RestartPolicy::No;
    }
    if svc.driver() == Driver::Process {
        process_defaults(conv, key, &entries, &mut svc, project_dir);
    }
    (svc, meta)
}

/// `expose:` entries: unpublished ports, kept apart until `ports` is read.
fn expose(conv: &mut Conv<'_, '_>, v: &Node, exposed: &mut Vec<Port>) {
    let key = "expose";
    let Value::Seq(items) = &v.value else {
        conv.expect(v, key, "a list of ports");
        return;
    };
    for it in items {
        let Some(s) = conv.string(it, key) else {
            continue;
        };
        match parse_port_spec(&s) {
            Ok(ps) if ps.iter().all(|p| p.published.is_none()) => exposed.extend(ps),
            Ok(_) => conv.error_hint(
                it,
                key,
                format!("`expose` takes container ports only, got {s:?}"),
                "publish a port under `ports:` instead",
            ),
            Err(e) => conv.error(it, key, format!("invalid port {s:?}: {e}")),
        }
    }
}

/// `links:` (`service` or `service:alias`): the services named, in order.
fn links(conv: &mut Conv<'_, '_>, v: &Node, svc: &mut Service, meta: &mut ServiceMeta) {
    let key = "links";
    let Some(items) = v.as_seq() else {
        conv.expect(v, key, "a list of service names");
        return;
    };
    for it in items {
        if let Some(s) = conv.string(it, key) {
            let target = s.split(':').next().unwrap_or_default().to_string();
            meta.links.insert(target.clone(), it.pos.clone());
            if !svc.links.contains(&target) {
                svc.links.push(target);
            }
        }
    }
}

/// `restart:` (`no`, `always`, `on-failure[:N]`, `unless-stopped`).
fn restart(conv: &mut Conv<'_, '_>, v: &Node) -> Option<RestartPolicy> {
    let s = conv.string(v, "restart")?;
    let policy = restart_policy(&s);
    if policy.is_none() {
        conv.error_hint(
            v,
            "restart",
            format!("invalid restart policy {s:?}"),
            "use one of: no, always, on-failure, on-failure:N, unless-stopped",
        );
    }
    policy
}

/// `stop_signal:` as a signal name (`SIGTERM`).
fn stop_signal(conv: &mut Conv<'_, '_>, v: &Node) -> Option<String> {
    let s = conv.string(v, "stop_signal")?;
    let sig = normalize_signal(&s);
    if sig.is_none() {
        conv.error_hint(
            v,
            "stop_signal",
            format!("unknown signal {s:?}"),
            "use a signal name such as SIGTERM, SIGINT or SIGQUIT",
        );
    }
    sig
}

/// `extra_hosts:` as `host:ip` strings, from a mapping or a list
/// (`host=ip` or `host:ip`).
fn extra_hosts(conv: &mut Conv<'_, '_>, v: &Node) -> Vec<String> {
    match &v.value {
        Value::Map(_) => conv
            .list_or_dict(v, "extra_hosts")
            .into_iter()
            .map(|(h, ip, _)| format!("{h}:{}", ip.unwrap_or_default()))
            .collect(),
        _ => conv
            .strings(v, "extra_hosts")
            .into_iter()
            .map(|s| s.replacen('=', ":", 1))
            .collect(),
    }
}

/// What a service run as a process gets by default (the project folder as
/// its working dir), and warnings for what it lacks (a program) or has no
/// use for (container-only fields).
fn process_defaults(
    conv: &mut Conv<'_, '_>,
    key: &Node,
    entries: &[(Node, Node)],
    svc: &mut Service,
    project_dir: &Path,
) {
    if svc.working_dir.is_none() {
        svc.working_dir = Some(project_dir.to_path_buf());
    }
    if svc.command.is_none() && svc.entrypoint.is_none() {
        // Compose would refuse a service without image or build; berth
        // runs it as a process, which needs a program. A warning, not an
        // error: `berth config` and later `-f` files may still fill it.
        let d = conv
            .err(key, "", "this service has no `command`, `entrypoint`, `image` or `build`: its instances will fail to start")
            .hint("give it a `command:` to run as a process");
        conv.diags().warn(d);
    }
    // Accepted for containers, but a plain process has no use for them:
    // say so rather than drop them silently.
    for (k, _) in entries {
        let key = k.as_str().unwrap_or_default();
        if schema::DOCKER_ONLY.contains(&key) {
            let d = conv
                .err(
                    k,
                    key,
                    format!(
                        "`{key}` only applies to containers; this service runs as a process (no `image` or `build`), so it is ignored"
                    ),
                )
                .hint("remove it, or give the service an `image:` to run it on the Docker driver");
            conv.diags().warn(d);
        }
    }
}

fn restart_policy(s: &str) -> Option<RestartPolicy> {
    Some(match s {
        "no" | "\"no\"" => RestartPolicy::No,
        "always" => RestartPolicy::Always,
        "unless-stopped" => RestartPolicy::UnlessStopped,
        "on-failure" => RestartPolicy::OnFailure { max_attempts: None },
        other => {
            let n = other.strip_prefix("on-failure:")?.parse().ok()?;
            RestartPolicy::OnFailure {
                max_attempts: Some(n),
            }
        }
    })
}

fn restart_from_deploy(conv: &mut Conv<'_, '_>, rp: &Node) -> Option<RestartPolicy> {
    let f = "deploy.restart_policy";
    conv.map(rp, f)?;
    conv.keys(
        rp,
        f,
        schema::RESTART_POLICY,
        schema::RESTART_POLICY_SUPPORTED,
    );
    let max: Option<u32> = rp
        .get("max_attempts")
        .and_then(|n| conv.number(n, &format!("{f}.max_attempts"), "a whole number"));
    let cond = match rp.get("condition") {
        Some(c) => conv.string(c, &format!("{f}.condition"))?,
        None => "any".to_string(),
    };
    match cond.as_str() {
        "none" => Some(RestartPolicy::No),
        "on-failure" => Some(RestartPolicy::OnFailure { max_attempts: max }),
        "any" => Some(match max {
            // `any` with a cap is the closest berth has: restarts are counted.
            Some(n) => RestartPolicy::OnFailure {
                max_attempts: Some(n),
            },
            None => RestartPolicy::Always,
        }),
        other => {
            if let Some(c) = rp.get("condition") {
                conv.error_hint(
                    c,
                    &format!("{f}.condition"),
                    format!("invalid restart condition {other:?}"),
                    "use one of: none, on-failure, any",
                );
            }
            None
        }
    }
}

fn env_files(conv: &mut Conv<'_, '_>, node: &Node, env: &mut BTreeMap<String, Option<String>>) {
    let items: Vec<Node> = match &node.value {
        Value::Seq(items) => items.clone(),
        Value::Null => Vec::new(),
        _ => vec![node.clone()],
    };
    for it in items {
        let (path_node, required) = match &it.value {
            Value::Scalar { .. } => (it.clone(), true),
            Value::Map(_) => {
                conv.keys(
                    &it,
                    "env_file",
                    schema::ENV_FILE,
                    schema::ENV_FILE_SUPPORTED,
                );
                let Some(p) = it.get("path") else {
                    conv.error(&it, "env_file", "an `env_file` entry needs a `path`");
                    continue;
                };
                let required = match it.get("required") {
                    Some(r) => conv.boolean(r, "env_file.required").unwrap_or(true),
                    None => true,
                };
                (p.clone(), required)
            }
            _ => {
                conv.expect(&it, "env_file", "a path or a mapping with `path`");
                continue;
            }
        };
        let Some(rel) = conv.string(&path_node, "env_file") else {
            continue;
        };
        let path = resolve(&path_node.pos.base, &rel);
        if !conv.loader.in_memory.contains_key(&path) && !path.is_file() {
            if required {
                conv.error_hint(
                    &path_node,
                    "env_file",
                    format!("env file `{}` not found", path.display()),
                    "create it, fix the path (relative to the stack file), or use `{ path: …, required: false }`",
                );
            }
            continue;
        }
        let Some(text) = conv.loader.read(&path, Some(&path_node), "env file") else {
            continue;
        };
        match envfile::parse(&path, &text) {
            Ok(entries) => {
                let vars = conv.vars;
                let lookup = |name: &str| vars.get(name).cloned();
                let service = conv.service.clone();
                let resolved =
                    envfile::resolve(&path, entries, &lookup, Some(&service), conv.diags());
                for (k, v) in resolved {
                    if v.is_some() || !env.contains_key(&k) {
                        env.insert(k, v);
                    }
                }
            }
            Err(d) => {
                let d = d.service(conv.service.clone());
                conv.diags().error(d);
            }
        }
    }
}

fn build(conv: &mut Conv<'_, '_>, node: &Node) -> Option<Build> {
    let base = node.pos.base.clone();
    let ctx = |s: &str| {
        if crate::loader::is_remote(s) {
            PathBuf::from(s)
        } else {
            resolve(&base, s)
        }
    };
    match &node.value {
        Value::Scalar { text, .. } => Some(Build {
            context: ctx(text),
            dockerfile: "Dockerfile".into(),
            args: BTreeMap::new(),
            target: None,
        }),
        Value::Map(_) => {
            conv.keys(node, "build", schema::BUILD, schema::BUILD_SUPPORTED);
            let context = match node.get("context") {
                Some(c) => conv
                    .string(c, "build.context")
                    .unwrap_or_else(|| ".".into()),
                None => ".".into(),
            };
            let dockerfile = match node.get("dockerfile") {
                Some(d) => conv.string(d, "build.dockerfile").unwrap_or_default(),
                None => "Dockerfile".into(),
            };
            let mut args = BTreeMap::new();
            if let Some(a) = node.get("args") {
                for (k, v, _) in conv.list_or_dict(a, "build.args") {
                    if let Some(v) = v.or_else(|| conv.vars.get(&k).cloned()) {
                        args.insert(k, v);
                    }
                }
            }
            let target = node
                .get("target")
                .and_then(|t| conv.string(t, "build.target"));
            Some(Build {
                context: ctx(&context),
                dockerfile,
                args,
                target,
            })
        }
        _ => {
            conv.expect(node, "build", "a path or a mapping");
            None
        }
    }
}

/// Parses one short-syntax port spec into ports (ranges expand).
pub fn parse_port_spec(spec: &str) -> Result<Vec<Port>, String> {
    let (addr, protocol) = match spec.rsplit_once('/') {
        Some((a, p)) => (a, p.to_string()),
        None => (spec, "tcp".to_string()),
    };
    if !matches!(protocol.as_str(), "tcp" | "udp" | "sctp") {
        return Err(format!("unknown protocol {protocol:?} (use tcp or udp)"));
    }
    let (host_ip, rest) = if let Some(r) = addr.strip_prefix('[') {
        let (ip, after) = r.split_once(']').ok_or("unclosed `[` in an IPv6 address")?;
        let after = after
            .strip_prefix(':')
            .ok_or("expected `:` after the IPv6 address")?;
        (Some(ip.to_string()), after)
    } else {
        (None, addr)
    };
    let parts: Vec<&str> = rest.split(':').collect();
    let (host_ip, published, target) = match (host_ip, parts.as_slice()) {
        (None, [t]) => (None, None, *t),
        (None, [p, t]) => (None, Some(*p), *t),
        (None, [ip, p, t]) => (Some(ip.to_string()), Some(*p), *t),
        (Some(ip), [p, t]) => (Some(ip), Some(*p), *t),
        (Some(ip), [t]) => (Some(ip), None, *t),
        _ => return Err("expected [[HOST_IP:]PUBLISHED:]TARGET[/PROTOCOL]".into()),
    };
    let host_ip = host_ip.filter(|s| !s.is_empty());
    let published = published.filter(|s| !s.is_empty());
    let range = |s: &str| -> Result<(u16, u16), String> {
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let a: u16 = a
            .trim()
            .parse()
            .map_err(|_| format!("invalid port number {a:?}"))?;
        let b: u16 = b
            .trim()
            .parse()
            .map_err(|_| format!("invalid port number {b:?}"))?;
        if b < a {
            return Err(format!("port range {s:?} ends before it starts"));
        }
        Ok((a, b))
    };
    let (t0, t1) = range(target)?;
    if t0 == 0 {
        return Err("the target port cannot be 0".into());
    }
    let published = published.map(range).transpose()?;
    if let Some((p0, p1)) = published
        && p1 - p0 != t1 - t0
        && p1 != p0
    {
        return Err(format!(
            "published range {p0}-{p1} and target range {t0}-{t1} differ in length"
        ));
    }
    if let Some((p0, p1)) = published
        && p1 != p0
        && t1 == t0
    {
        return Err(format!(
            "a published range ({p0}-{p1}) for a single target port is not supported; pick one port"
        ));
    }
    // A single published port for a target range stands for the range that
    // starts there, which must end within the port numbers.
    if let Some((p0, _)) = published
        && u32::from(p0) + u32::from(t1 - t0) > u32::from(u16::MAX)
    {
        return Err(format!(
            "published ports {p0}-{} for target range {t0}-{t1} run past 65535",
            u32::from(p0) + u32::from(t1 - t0)
        ));
    }
    Ok((t0..=t1)
        .map(|t| Port {
            target: t,
            published: published.map(|(p0, _)| p0 + (t - t0)),
            host_ip: host_ip.clone(),
            protocol: protocol.clone(),
            app_protocol: None,
            name: None,
            mode: None,
        })
        .collect())
}

/// An IPv4 or IPv6 address (the proxy binds it; a host name cannot be).
fn valid_host_ip(ip: &str) -> bool {
    ip.parse::<std::net::IpAddr>().is_ok()
}

fn bad_host_ip(conv: &mut Conv<'_, '_>, node: &Node, ip: &str) {
    conv.error_hint(
        node,
        "ports",
        format!("invalid host IP {ip:?}: expected an IPv4 or IPv6 address"),
        "write 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)",
    );
}

fn ports(conv: &mut Conv<'_, '_>, node: &Node, out: &mut Vec<Port>) {
    match &node.value {
        Value::Scalar { text, .. } => match parse_port_spec(text) {
            Ok(ps) => {
                if let Some(ip) = ps.first().and_then(|p| p.host_ip.as_deref())
                    && !valid_host_ip(ip)
                {
                    bad_host_ip(conv, node, ip);
                    return;
                }
                for p in ps {
                    if !out.contains(&p) {
                        out.push(p);
                    }
                }
            }
            Err(e) => conv.error_hint(
                node,
                "ports",
                format!("invalid port {text:?}: {e}"),
                "write \"8000\", \"8000:5000\", \"127.0.0.1:8000:5000\" or \"5000/udp\"",
            ),
        },
        Value::Map(_) => {
            conv.keys(node, "ports", schema::PORT, schema::PORT);
            let Some(t) = node.get("target") else {
                conv.error(node, "ports", "a long-syntax port needs `target`");
                return;
            };
            let Some(target) = conv.number::<u16>(t, "ports.target", "a port number (1-65535)")
            else {
                return;
            };
            let published = match node.get("published") {
                None => None,
                Some(p) if p.is_null() => None,
                Some(p) => match p.as_str().and_then(|s| s.parse::<u16>().ok()) {
                    Some(v) => Some(v),
                    None => {
                        conv.expect(p, "ports.published", "a port number (1-65535)");
                        return;
                    }
                },
            };
            let protocol = node
                .get("protocol")
                .and_then(|p| conv.string(p, "ports.protocol"))
                .unwrap_or_else(|| "tcp".into());
            if !matches!(protocol.as_str(), "tcp" | "udp" | "sctp")
                && let Some(p) = node.get("protocol")
            {
                conv.error_hint(
                    p,
                    "ports.protocol",
                    format!("unknown protocol {protocol:?}"),
                    "use tcp or udp",
                );
            }
            let mode = match node.get("mode") {
                Some(m) => match conv.string(m, "ports.mode") {
                    Some(s) if s == "host" || s == "ingress" => Some(s),
                    Some(s) => {
                        conv.error_hint(
                            m,
                            "ports.mode",
                            format!("invalid port mode {s:?}"),
                            "use host or ingress",
                        );
                        None
                    }
                    None => None,
                },
                None => None,
            };
            let host_ip = match node.get("host_ip") {
                Some(h) => match conv.string(h, "ports.host_ip") {
                    Some(ip) if valid_host_ip(&ip) => Some(ip),
                    Some(ip) => {
                        bad_host_ip(conv, h, &ip);
                        return;
                    }
                    None => return,
                },
                None => None,
            };
            let port = Port {
                target,
                published,
                host_ip,
                protocol,
                app_protocol: node
                    .get("app_protocol")
                    .and_then(|a| conv.string(a, "ports.app_protocol")),
                name: node.get("name").and_then(|n| conv.string(n, "ports.name")),
                mode,
            };
            if !out.contains(&port) {
                out.push(port);
            }
        }
        _ => conv.expect(node, "ports", "a port string or a mapping"),
    }
}

fn depends_on(conv: &mut Conv<'_, '_>, node: &Node, svc: &mut Service, meta: &mut ServiceMeta) {
    match &node.value {
        Value::Seq(items) => {
            for it in items {
                if let Some(s) = conv.string(it, "depends_on") {
                    meta.depends.insert(s.clone(), it.pos.clone());
                    svc.depends_on.insert(
                        s,
                        Dependency {
                            condition: DependencyCondition::ServiceStarted,
                            restart: false,
                            required: true,
                        },
                    );
                }
            }
        }
        Value::Map(entries) => {
            for (k, v) in entries {
                let dep = k.as_str().unwrap_or_default().to_string();
                let f = format!("depends_on.{dep}");
                meta.depends.insert(dep.clone(), k.pos.clone());
                let mut d = Dependency {
                    condition: DependencyCondition::ServiceStarted,
                    restart: false,
                    required: true,
                };
                if !v.is_null() && conv.map(v, &f).is_some() {
                    conv.keys(v, &f, schema::DEPENDS_ON, schema::DEPENDS_ON);
                    if let Some(c) = v.get("condition")
                        && let Some(s) = conv.string(c, &format!("{f}.condition"))
                    {
                        d.condition = match s.as_str() {
                            "service_started" => DependencyCondition::ServiceStarted,
                            "service_healthy" => DependencyCondition::ServiceHealthy,
                            "service_completed_successfully" => {
                                DependencyCondition::ServiceCompletedSuccessfully
                            }
                            other => {
                                conv.error_hint(
                                    c,
                                    &format!("{f}.condition"),
                                    format!("invalid condition {other:?}"),
                                    "use service_started, service_healthy or service_completed_successfully",
                                );
                                d.condition
                            }
                        };
                    }
                    if let Some(r) = v.get("restart") {
                        d.restart = conv.boolean(r, &format!("{f}.restart")).unwrap_or(false);
                    }
                    if let Some(r) = v.get("required") {
                        d.required = conv.boolean(r, &format!("{f}.required")).unwrap_or(true);
                    }
                }
                svc.depends_on.insert(dep, d);
            }
        }
        _ => conv.expect(node, "depends_on", "a list of service names or a mapping"),
    }
}

fn healthcheck(conv: &mut Conv<'_, '_>, node: &Node) -> Option<Healthcheck> {
    conv.map(node, "healthcheck")?;
    conv.keys(
        node,
        "healthcheck",
        schema::HEALTHCHECK,
        schema::HEALTHCHECK,
    );
    let disabled = node
        .get("disable")
        .and_then(|d| conv.boolean(d, "healthcheck.disable"))
        .unwrap_or(false);
    let mut hc = Healthcheck {
        test: HealthTest::Shell {
            command: String::new(),
        },
        interval_ms: 30_000,
        timeout_ms: 30_000,
        retries: 3,
        start_period_ms: 0,
        start_interval_ms: 5_000,
    };
    timings(conv, node, "healthcheck", &mut hc);
    if disabled {
        return None;
    }
    let Some(test) = node.get("test") else {
        conv.warn(
            node,
            "healthcheck",
            "a health check without `test` is ignored (berth does not read image health checks)",
        );
        return None;
    };
    hc.test = match &test.value {
        Value::Scalar { text, .. } => HealthTest::Shell {
            command: text.clone(),
        },
        Value::Seq(_) => {
            let argv = conv.strings(test, "healthcheck.test");
            match argv.first().map(String::as_str) {
                Some("NONE") => return None,
                Some("CMD") if argv.len() > 1 => HealthTest::Exec {
                    argv: argv[1..].to_vec(),
                },
                Some("CMD-SHELL") if argv.len() > 1 => HealthTest::Shell {
                    command: argv[1..].join(" "),
                },
                _ => {
                    conv.error_hint(
                        test,
                        "healthcheck.test",
                        "a health check test list must start with \"CMD\", \"CMD-SHELL\" or \"NONE\" followed by the command",
                        "write [\"CMD\", \"curl\", \"-f\", \"http://localhost\"] or [\"CMD-SHELL\", \"curl -f http://localhost\"]",
                    );
                    return None;
                }
            }
        }
        _ => {
            conv.expect(test, "healthcheck.test", "a string or a list");
            return None;
        }
    };
    Some(hc)
}

fn timings(conv: &mut Conv<'_, '_>, node: &Node, f: &str, hc: &mut Healthcheck) {
    for (key, slot) in [
        ("interval", &mut hc.interval_ms),
        ("timeout", &mut hc.timeout_ms),
        ("start_period", &mut hc.start_period_ms),
        ("start_interval", &mut hc.start_interval_ms),
    ] {
        if let Some(v) = node.get(key)
            && let Some(ms) = conv.duration(v, &format!("{f}.{key}"))
        {
            *slot = ms;
        }
    }
    if let Some(r) = node.get("retries")
        && let Some(n) = conv.number::<u32>(r, &format!("{f}.retries"), "a whole number")
    {
        hc.retries = n;
    }
}

fn berth_ext(conv: &mut Conv<'_, '_>, node: &Node, svc: &mut Service, meta: &mut ServiceMeta) {
    if conv.map(node, "x-berth").is_none() {
        return;
    }
    conv.keys(node, "x-berth", schema::BERTH, schema::BERTH);
    // check_keys skips `x-*` keys; inside x-berth they are unknown too.
    for (k, _) in node.as_map().unwrap_or_default() {
        let key = k.as_str().unwrap_or_default();
        if key.starts_with("x-") {
            conv.error_hint(
                k,
                &format!("x-berth.{key}"),
                format!("unknown key `{key}`"),
                "x-berth accepts routes, port_env, healthcheck, placement",
            );
        }
    }
    if let Some(r) = node.get("routes") {
        svc.berth.routes = conv.strings(r, "x-berth.routes");
    }
    if let Some(p) = node.get("port_env") {
        svc.berth.port_env = conv.string(p, "x-berth.port_env");
    }
    if let Some(p) = node.get("placement") {
        berth_placement(conv, p, svc, meta);
    }
    let Some(h) = node.get("healthcheck") else {
        return;
    };
    let f = "x-berth.healthcheck";
    if conv.map(h, f).is_none() {
        return;
    }
    conv.keys(h, f, schema::BERTH_HEALTHCHECK, schema::BERTH_HEALTHCHECK);
    meta.berth_healthcheck = Some(h.pos.clone());
    let port = h
        .get("port")
        .and_then(|p| conv.number::<u16>(p, &format!("{f}.port"), "a port number"));
    let test = match (h.get("http"), h.get("tcp")) {
        (Some(p), None) => {
            let path = conv
                .string(p, &format!("{f}.http"))
                .unwrap_or_else(|| "/".into());
            let path = if path.starts_with('/') {
                path
            } else {
                format!("/{path}")
            };
            HealthTest::Http { port, path }
        }
        (None, Some(t)) => {
            if conv.boolean(t, &format!("{f}.tcp")) != Some(true) {
                conv.error(t, &format!("{f}.tcp"), "`tcp` must be `true`");
            }
            HealthTest::Tcp { port }
        }
        _ => {
            conv.error_hint(
                h,
                f,
                "an x-berth health check needs exactly one of `http` or `tcp`",
                "write `{ http: /healthz }` or `{ tcp: true }`",
            );
            return;
        }
    };
    let mut hc = Healthcheck {
        test,
        interval_ms: 2_000,
        timeout_ms: 2_000,
        retries: 3,
        start_period_ms: 0,
        start_interval_ms: 500,
    };
    timings(conv, h, f, &mut hc);
    svc.healthcheck = Some(hc);
}

fn berth_placement(conv: &mut Conv<'_, '_>, p: &Node, svc: &mut Service, meta: &mut ServiceMeta) {
    let f = "x-berth.placement";
    if conv.map(p, f).is_none() {
        return;
    }
    conv.keys(p, f, schema::BERTH_PLACEMENT, schema::BERTH_PLACEMENT);
    if let Some(s) = p.get("strategy")
        && let Some(text) = conv.string(s, "x-berth.placement.strategy")
    {
        match text.as_str() {
            "spread" => svc.berth.placement.strategy = Strategy::Spread,
            "binpack" => svc.berth.placement.strategy = Strategy::Binpack,
            other => conv.error_hint(
                s,
                "x-berth.placement.strategy",
                format!("unknown placement strategy {other:?}"),
                "use `spread` (the default) or `binpack`",
            ),
        }
    }
    for (key, field) in [
        ("affinity", "x-berth.placement.affinity"),
        ("anti_affinity", "x-berth.placement.anti_affinity"),
    ] {
        let Some(list) = p.get(key) else { continue };
        let Some(items) = list.as_seq() else {
            conv.expect(list, field, "a list of service names");
            continue;
        };
        for it in items {
            if let Some(name) = conv.string(it, field) {
                meta.placement_refs
                    .push((name.clone(), field, it.pos.clone()));
                if key == "affinity" {
                    svc.berth.placement.affinity.push(name);
                } else {
                    svc.berth.placement.anti_affinity.push(name);
                }
            }
        }
    }
}

fn deploy(conv: &mut Conv<'_, '_>, node: &Node, svc: &mut Service) {
    if conv.map(node, "deploy").is_none() {
        return;
    }
    conv.keys(node, "deploy", schema::DEPLOY, schema::DEPLOY_SUPPORTED);
    let d = &mut svc.deploy;
    if let Some(m) = node.get("mode")
        && let Some(s) = conv.string(m, "deploy.mode")
    {
        match s.as_str() {
            "replicated" => d.mode = DeployMode::Replicated,
            "global" => d.mode = DeployMode::Global,
            other => conv.error_hint(
                m,
                "deploy.mode",
                format!("invalid mode {other:?}"),
                "use replicated or global",
            ),
        }
    }
    if let Some(r) = node.get("replicas")
        && let Some(n) = conv.number::<u32>(r, "deploy.replicas", "a whole number")
    {
        d.replicas = n;
    }
    if let Some(l) = node.get("labels") {
        for (k, v, _) in conv.list_or_dict(l, "deploy.labels") {
            d.labels.insert(k, v.unwrap_or_default());
        }
    }
    if let Some(r) = node.get("resources")
        && conv.map(r, "deploy.resources").is_some()
    {
        deploy_resources(conv, r, &mut d.resources);
    }
    for key in ["update_config", "rollback_config"] {
        let Some(u) = node.get(key) else { continue };
        let f = format!("deploy.{key}");
        if conv.map(u, &f).is_none() {
            continue;
        }
        let uc = update_config(conv, u, key, &f);
        if key == "update_config" {
            svc.deploy.update_config = Some(uc);
        } else {
            svc.deploy.rollback_config = Some(uc);
        }
    }
    if let Some(p) = node.get("placement")
        && conv.map(p, "deploy.placement").is_some()
    {
        deploy_placement(conv, p, &mut svc.deploy.placement);
    }
}

/// `deploy.resources` (`r`, known to be a mapping): limits and reservations
/// share one shape, so both go through the same checks.
fn deploy_resources(conv: &mut Conv<'_, '_>, r: &Node, resources: &mut Resources) {
    conv.keys(r, "deploy.resources", schema::RESOURCES, schema::RESOURCES);
    for (key, slot) in [
        ("limits", &mut resources.limits),
        ("reservations", &mut resources.reservations),
    ] {
        let f = format!("deploy.resources.{key}");
        let Some(n) = r.get(key) else { continue };
        if conv.map(n, &f).is_none() {
            continue;
        }
        conv.keys(
            n,
            &f,
            schema::RESOURCE_SPEC,
            schema::RESOURCE_SPEC_SUPPORTED,
        );
        if let Some(c) = n.get("cpus") {
            slot.cpus = conv
                .number::<f64>(c, &format!("{f}.cpus"), "a number of CPUs such as 0.5")
                .filter(|v| v.is_finite() && *v >= 0.0);
        }
        if let Some(m) = n.get("memory") {
            match m.as_str().and_then(parse_size) {
                Some(b) => slot.memory_bytes = Some(b),
                None => conv.error_hint(
                    m,
                    &format!("{f}.memory"),
                    format!("invalid memory size {:?}", m.as_str().unwrap_or_default()),
                    "use a size like 512M, 1g, 100k or a number of bytes",
                ),
            }
        }
        if let Some(p) = n.get("pids") {
            slot.pids = conv.number::<u64>(p, &format!("{f}.pids"), "a whole number");
        }
    }
}

/// `deploy.update_config` or `deploy.rollback_config` (`u`, known to be a
/// mapping, reported as `f`). Compose's defaults differ only in the failure
/// action: a failed update rolls back, a failed rollback pauses.
fn update_config(conv: &mut Conv<'_, '_>, u: &Node, key: &str, f: &str) -> UpdateConfig {
    conv.keys(u, f, schema::UPDATE_CONFIG, schema::UPDATE_CONFIG);
    let mut uc = UpdateConfig {
        parallelism: 1,
        delay_ms: 0,
        failure_action: if key == "update_config" {
            "rollback".into()
        } else {
            "pause".into()
        },
        monitor_ms: 0,
        max_failure_ratio: 0.0,
        order: None,
    };
    if let Some(p) = u.get("parallelism")
        && let Some(n) = conv.number::<u32>(p, &format!("{f}.parallelism"), "a whole number")
    {
        uc.parallelism = n;
    }
    if let Some(v) = u.get("delay")
        && let Some(ms) = conv.duration(v, &format!("{f}.delay"))
    {
        uc.delay_ms = ms;
    }
    if let Some(v) = u.get("monitor")
        && let Some(ms) = conv.duration(v, &format!("{f}.monitor"))
    {
        uc.monitor_ms = ms;
    }
    if let Some(v) = u.get("failure_action")
        && let Some(s) = conv.string(v, &format!("{f}.failure_action"))
    {
        if matches!(s.as_str(), "pause" | "continue" | "rollback") {
            uc.failure_action = s;
        } else {
            conv.error_hint(
                v,
                &format!("{f}.failure_action"),
                format!("invalid failure_action {s:?}"),
                "use pause, continue or rollback",
            );
        }
    }
    if let Some(v) = u.get("max_failure_ratio")
        && let Some(r) = conv.number::<f64>(
            v,
            &format!("{f}.max_failure_ratio"),
            "a number between 0 and 1",
        )
    {
        uc.max_failure_ratio = r;
    }
    if let Some(v) = u.get("order")
        && let Some(s) = conv.string(v, &format!("{f}.order"))
    {
        if matches!(s.as_str(), "stop-first" | "start-first") {
            uc.order = Some(s);
        } else {
            conv.error_hint(
                v,
                &format!("{f}.order"),
                format!("invalid order {s:?}"),
                "use stop-first or start-first",
            );
        }
    }
    uc
}

/// `deploy.placement` (`p`, known to be a mapping). Constraints and spread
/// preferences are parsed here only to report bad ones with their position;
/// the scheduler parses them again from the kept strings.
fn deploy_placement(conv: &mut Conv<'_, '_>, p: &Node, placement: &mut Placement) {
    conv.keys(p, "deploy.placement", schema::PLACEMENT, schema::PLACEMENT);
    if let Some(c) = p.get("constraints") {
        placement.constraints = conv.strings(c, "deploy.placement.constraints");
        for it in c.as_seq().unwrap_or_default() {
            let Some(expr) = it.as_str() else { continue };
            match crate::constraint::Constraint::parse(expr) {
                Err(e) => conv.error_hint(
                    it,
                    "deploy.placement.constraints",
                    format!("invalid constraint {expr:?}: {e}"),
                    "write e.g. `node.labels.zone == east`, `node.facts.load_15m < 0.25` or `node.facts.kernel ~= ^6\\.`",
                ),
                // A misspelt or invented fact (`load_10m`: Linux has 1, 5
                // and 15 minutes) would leave the service pending with only
                // the constraint as its reason.
                Ok(c) => {
                    if let crate::constraint::Attribute::Fact(name) = &c.attribute
                        && !crate::constraint::KNOWN_FACTS.contains(&name.as_str())
                    {
                        conv.warn(
                            it,
                            "deploy.placement.constraints",
                            format!(
                                "berth agents report no fact `{name}`, so no node has it and only `!=` or `!~` can hold (facts: {})",
                                crate::constraint::KNOWN_FACTS.join(", ")
                            ),
                        );
                    }
                }
            }
        }
    }
    if let Some(prefs) = p.get("preferences") {
        match prefs.as_seq() {
            Some(items) => {
                for it in items {
                    match it.get("spread").and_then(Node::as_str) {
                        Some(s) if crate::constraint::parse_spread(s).is_err() => {
                            conv.error_hint(
                                it,
                                "deploy.placement.preferences",
                                format!("cannot spread over {s:?}"),
                                "spread over a node attribute, e.g. `- spread: node.labels.zone`",
                            );
                        }
                        Some(s) => placement.preferences.push(s.trim().to_string()),
                        None => conv.error_hint(
                            it,
                            "deploy.placement.preferences",
                            "a placement preference must be `spread: <label expression>`",
                            "write `- spread: node.labels.zone`",
                        ),
                    }
                }
            }
            None => conv.expect(prefs, "deploy.placement.preferences", "a list"),
        }
    }
    if let Some(m) = p.get("max_replicas_per_node") {
        placement.max_replicas_per_node = conv.number(
            m,
            "deploy.placement.max_replicas_per_node",
            "a whole number",
        );
    }
}

fn volumes(
    conv: &mut Conv<'_, '_>,
    node: &Node,
    svc: &mut Service,
    meta: &mut ServiceMeta,
    _project_dir: &Path,
) {
    let Some(items) = node.as_seq() else {
        conv.expect(node, "volumes", "a list");
        return;
    };
    let home = conv.vars.get("HOME").cloned();
    let host_path = |s: &str, base: &Path| -> String {
        if let (Some(rest), Some(h)) = (s.strip_prefix('~'), &home) {
            return format!("{h}{rest}");
        }
        resolve(base, s).display().to_string()
    };
    for it in items {
        match &it.value {
            Value::Scalar { text, .. } => {
                let parts: Vec<&str> = text.split(':').collect();
                let (src, target, mode) = match parts.as_slice() {
                    [t] => (None, *t, ""),
                    [s, t] => (Some(*s), *t, ""),
                    [s, t, m] => (Some(*s), *t, *m),
                    _ => {
                        conv.error_hint(
                            it,
                            "volumes",
                            format!("invalid volume {text:?}"),
                            "write SOURCE:TARGET[:ro] or just TARGET",
                        );
                        continue;
                    }
                };
                let (kind, source) = match src {
                    None => ("volume", None),
                    Some(s) if s.starts_with(['.', '/', '~']) => {
                        ("bind", Some(host_path(s, &it.pos.base)))
                    }
                    Some(s) => {
                        meta.named_volumes.push((s.to_string(), it.pos.clone()));
                        ("volume", Some(s.to_string()))
                    }
                };
                svc.volumes.push(VolumeMount {
                    kind: kind.into(),
                    source,
                    target: target.to_string(),
                    read_only: mode.split(',').any(|m| m == "ro"),
                });
            }
            Value::Map(_) => {
                conv.keys(
                    it,
                    "volumes",
                    schema::SERVICE_VOLUME,
                    schema::SERVICE_VOLUME_SUPPORTED,
                );
                let kind = it
                    .get("type")
                    .and_then(|t| conv.string(t, "volumes.type"))
                    .unwrap_or_else(|| "volume".into());
                let Some(target) = it
                    .get("target")
                    .and_then(|t| conv.string(t, "volumes.target"))
                else {
                    conv.error(it, "volumes", "a long-syntax volume needs `target`");
                    continue;
                };
                let source = it
                    .get("source")
                    .and_then(|s| conv.string(s, "volumes.source"));
                let source = match (kind.as_str(), source) {
                    ("bind", Some(s)) => Some(host_path(&s, &it.pos.base)),
                    ("volume", Some(s)) => {
                        meta.named_volumes.push((s.clone(), it.pos.clone()));
                        Some(s)
                    }
                    (_, s) => s,
                };
                let read_only = it
                    .get("read_only")
                    .and_then(|r| conv.boolean(r, "volumes.read_only"))
                    .unwrap_or(false);
                svc.volumes.push(VolumeMount {
                    kind,
                    source,
                    target,
                    read_only,
                });
            }
            _ => conv.expect(it, "volumes", "a string or a mapping"),
        }
    }
}

fn networks(conv: &mut Conv<'_, '_>, node: &Node, svc: &mut Service, meta: &mut ServiceMeta) {
    match &node.value {
        Value::Seq(items) => {
            for it in items {
                if let Some(n) = conv.string(it, "networks") {
                    meta.networks.push((n.clone(), it.pos.clone()));
                    svc.networks.insert(n, ServiceNetwork::default());
                }
            }
        }
        Value::Map(entries) => {
            for (k, v) in entries {
                let n = k.as_str().unwrap_or_default().to_string();
                meta.networks.push((n.clone(), k.pos.clone()));
                let mut sn = ServiceNetwork::default();
                if !v.is_null() && conv.map(v, &format!("networks.{n}")).is_some() {
                    conv.keys(
                        v,
                        &format!("networks.{n}"),
                        schema::SERVICE_NETWORK,
                        schema::SERVICE_NETWORK_SUPPORTED,
                    );
                    if let Some(a) = v.get("aliases") {
                        sn.aliases = conv.strings(a, &format!("networks.{n}.aliases"));
                    }
                }
                svc.networks.insert(n, sn);
            }
        }
        _ => conv.expect(node, "networks", "a list or a mapping"),
    }
}
