//! The HTTP routes of a service, for the edge tables (`edge.rs`), the
//! services API and the dashboard's network page.
//!
//! Routes of a service (documented in docs/routing.md):
//! - always `<service>.<stack>.<namespace>.localhost`, and for the
//!   `default` namespace also `<service>.<stack>.localhost`;
//! - every `x-berth.routes` entry, `host[/path-prefix]`;
//! - Traefik-style labels `traefik.http.routers.<r>.rule` with `` Host(`h`) ``
//!   and optionally `` && PathPrefix(`/p`) `` (the forms Compose files in the
//!   wild use most); other rule syntax is ignored with a warning in the log.
//!
//! Only services whose instances have a port (`$PORT`) can be routed.

use berth_model::StackRecord;
use berth_spec::types::Service;

/// `(host, path_prefix)` pairs a service is reachable under.
pub(crate) fn service_routes(
    record: &StackRecord,
    name: &str,
    service: &Service,
) -> Vec<(String, String)> {
    let mut out = vec![(
        format!("{name}.{}.{}.localhost", record.name, record.namespace).to_lowercase(),
        "/".to_owned(),
    )];
    if record.namespace == berth_model::DEFAULT_NAMESPACE {
        out.push((
            format!("{name}.{}.localhost", record.name).to_lowercase(),
            "/".to_owned(),
        ));
    }
    for r in &service.berth.routes {
        let (host, path) = match r.find('/') {
            Some(i) => (&r[..i], &r[i..]),
            None => (r.as_str(), "/"),
        };
        out.push((host.to_lowercase(), path.to_owned()));
    }
    for (key, rule) in &service.labels {
        if key.starts_with("traefik.http.routers.") && key.ends_with(".rule") {
            match traefik_rule(rule) {
                Some(r) => out.push(r),
                None => tracing::warn!(service = name, %rule, "unsupported Traefik rule ignored"),
            }
        }
    }
    out
}

/// `` Host(`a.example`) `` optionally `` && PathPrefix(`/x`) ``.
fn traefik_rule(rule: &str) -> Option<(String, String)> {
    let arg = |s: &str, f: &str| -> Option<String> {
        let start = s.find(&format!("{f}(`"))? + f.len() + 2;
        let end = s[start..].find("`)")? + start;
        Some(s[start..end].to_owned())
    };
    let host = arg(rule, "Host")?;
    let path = arg(rule, "PathPrefix").unwrap_or_else(|| "/".to_owned());
    // Only a conjunction of one Host and at most one PathPrefix is understood;
    // anything else (`||`, `!`, Path, Headers…) would be routed wrongly.
    let known = !rule.contains("||")
        && !rule.contains('!')
        && rule.split("&&").all(|p| {
            let p = p.trim();
            p.starts_with("Host(`") || p.starts_with("PathPrefix(`")
        })
        && rule.matches("Host(").count() == 1
        && rule.matches("PathPrefix(").count() <= 1;
    known.then_some((host.to_lowercase(), path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traefik_rules() {
        assert_eq!(
            traefik_rule("Host(`Api.Example.com`) && PathPrefix(`/v1`)"),
            Some(("api.example.com".into(), "/v1".into()))
        );
        assert_eq!(
            traefik_rule("Host(`a.b`)"),
            Some(("a.b".into(), "/".into()))
        );
        assert_eq!(traefik_rule("Host(`a.b`) || Host(`c.d`)"), None);
        assert_eq!(traefik_rule("PathPrefix(`/x`)"), None);
    }
}
