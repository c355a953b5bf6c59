//! From the catalog to the traffic components in `berth-net`: the HTTP
//! router's [`RouteTable`] and the DNS server's [`Zone`].
//!
//! Both tables are pure functions of the [`Mirror`]; [`Tables`] follows the
//! state watch and publishes a new table only when it differs, so a health
//! change reaches the router and DNS in one watch round-trip (no polling).
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

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use berth_model::StackRecord;
use berth_net::dns::{Instance as DnsInstance, Zone};
use berth_net::http::{Backend, Route, RouteTable, ServiceBackends, ServiceId};
use berth_spec::types::Service;
use berth_store::Revision;
use tokio::sync::watch;

use crate::catalog;
use crate::mirror::{Follower, Mirror};

/// How many other instances the router tries when connecting fails.
pub const ROUTER_RETRIES: u32 = 2;

/// The router table for the current mirror.
pub fn route_table(mirror: &Mirror) -> RouteTable {
    let mut routes = Vec::new();
    let mut services = HashMap::new();
    let entries = catalog::entries(mirror);
    for (record, _) in mirror.stacks.values() {
        for (name, service) in &record.spec.services {
            let id = ServiceId::new(&record.namespace, &record.name, name);
            for (host, path) in service_routes(record, name, service) {
                routes.push(Route {
                    host,
                    path_prefix: path,
                    service: id.clone(),
                    strip_prefix: false,
                });
            }
            let backends = entries
                .iter()
                .filter(|e| {
                    e.healthy
                        && e.namespace == record.namespace
                        && e.stack == record.name
                        && e.service == *name
                })
                .filter_map(|e| {
                    let ip: IpAddr = e.address.parse().ok()?;
                    Some(Backend {
                        addr: SocketAddr::new(ip, e.port?),
                        id: e.instance.clone(),
                    })
                })
                .collect();
            services.insert(
                id,
                ServiceBackends {
                    backends,
                    // A connection refused by an instance that just stopped
                    // (its removal from the table is in flight) is retried on
                    // another one: bodiless idempotent requests only.
                    retries: ROUTER_RETRIES,
                    ..ServiceBackends::default()
                },
            );
        }
    }
    RouteTable::new(routes, services)
}

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

/// The DNS zone: healthy instances only.
pub fn zone(mirror: &Mirror) -> Zone {
    let mut b = Zone::builder();
    for e in catalog::entries(mirror).into_iter().filter(|e| e.healthy) {
        let Ok(addr) = e.address.parse() else {
            continue;
        };
        b = b.instance(
            &e.namespace,
            &e.stack,
            &e.service,
            DnsInstance {
                instance: e.instance,
                addr,
                port: e.port,
                node: e.node,
            },
        );
    }
    b.build()
}

/// Keeps the router table and the DNS zone current.
pub struct Tables {
    /// Router table.
    pub routes: watch::Sender<RouteTable>,
    /// DNS zone.
    pub zone: watch::Sender<Arc<Zone>>,
}

impl Follower for Tables {
    async fn changed(&mut self, mirror: &Mirror, _: Revision) -> anyhow::Result<()> {
        let table = route_table(mirror);
        self.routes.send_if_modified(|current| {
            let changed = *current != table;
            *current = table;
            changed
        });
        let zone = zone(mirror);
        for r in zone.rejected() {
            tracing::warn!(name = %r, "not published in DNS");
        }
        self.zone.send_if_modified(|current| {
            let changed = current.services() != zone.services();
            if changed {
                *current = Arc::new(zone);
            }
            changed
        });
        Ok(())
    }
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
