//! The catalog: which instances are healthy, derived from actual state and
//! never edited by hand, and the published-port table built from it for the
//! TCP proxy ([`berth_net::tcp::PortProxy`]; `vip.rs` adds the services'
//! stable addresses to that table and keeps it current).
//!
//! An instance is routable when it is `running` and its health is `healthy`
//! (or it has no check). Port mapping for process instances: the first
//! declared port of a service is the instance's own `PORT`; further ports are
//! forwarded to the same target port on the instance's address (a process can
//! only be told one port).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use berth_model::{CatalogEntry, Health, InstanceState, InstanceStatus};
use berth_net::Backends;
use berth_store::Revision;

use crate::mirror::Mirror;

/// Whether the router and proxies may send traffic to this instance.
pub fn routable(s: &InstanceStatus) -> bool {
    s.state == InstanceState::Running && matches!(s.health, Health::Healthy | Health::None)
}

/// Instances the controller is retiring (replaced by a rolling update, or
/// scaled away): they still run, to finish what they were sent, but get no
/// new traffic. The controller keeps the retiring assignment until the
/// instance has stopped, so its agent's status, which may say "running,
/// healthy" for a moment longer, never makes it routable again.
pub fn retiring(mirror: &Mirror) -> std::collections::BTreeSet<&berth_model::InstanceKey> {
    mirror
        .assignments
        .values()
        .filter(|(a, _)| a.retire_at.is_some())
        .map(|(a, _)| &a.key)
        .collect()
}

/// Every instance of every stack as discovery sees it, healthy or not,
/// sorted by (namespace, stack, service, slot).
///
/// Instances without an address (not started yet) are left out: there is
/// nothing to connect to.
pub fn entries(mirror: &Mirror) -> Vec<CatalogEntry> {
    let retiring = retiring(mirror);
    mirror
        .statuses
        .values()
        .filter_map(|s| {
            let address = s.address.clone()?;
            let mut meta = std::collections::BTreeMap::new();
            meta.insert("release".to_owned(), s.release.to_string());
            meta.insert("uid".to_owned(), s.uid.clone());
            let tags = mirror
                .stacks
                .values()
                .find(|(r, _)| r.namespace == s.key.namespace && r.name == s.key.stack)
                .and_then(|(r, _)| r.spec.services.get(&s.key.service))
                .map(|svc| svc.labels.iter().map(|(k, v)| format!("{k}={v}")).collect())
                .unwrap_or_default();
            Some(CatalogEntry {
                namespace: s.key.namespace.clone(),
                stack: s.key.stack.clone(),
                service: s.key.service.clone(),
                instance: s.key.short(),
                node: s.node.clone(),
                address,
                port: s.port,
                tags,
                meta,
                healthy: routable(s) && !retiring.contains(&s.key),
            })
        })
        .collect()
}

/// Read the whole state into a mirror once (for request handlers that need
/// a consistent snapshot and the revision it is at, e.g. blocking queries).
pub async fn snapshot(store: &dyn berth_store::Store) -> anyhow::Result<(Mirror, Revision)> {
    let (kvs, rev) = store.range(berth_model::keys::ROOT).await?;
    let mut mirror = Mirror::default();
    for kv in kvs {
        mirror.apply(&berth_store::WatchEvent::Put(kv));
    }
    Ok((mirror, rev))
}

/// The published-port table for the current mirror.
pub fn published_ports(mirror: &Mirror) -> Backends {
    let mut table = Backends::new();
    let retiring = retiring(mirror);
    for (record, _) in mirror.stacks.values() {
        for (name, service) in &record.spec.services {
            for (i, port) in service.ports.iter().enumerate() {
                let Some(published) = port.published else {
                    continue;
                };
                if port.protocol != "tcp" {
                    continue;
                }
                let ip = port
                    .host_ip
                    .as_deref()
                    .and_then(|ip| ip.parse::<IpAddr>().ok())
                    .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
                let backends = mirror
                    .statuses
                    .values()
                    .filter(|s| {
                        s.key.namespace == record.namespace
                            && s.key.stack == record.name
                            && s.key.service == *name
                            && routable(s)
                            && !retiring.contains(&s.key)
                    })
                    .filter_map(|s| {
                        let addr: IpAddr = s.address.as_deref()?.parse().ok()?;
                        let p = if i == 0 {
                            s.port?
                        } else {
                            s.port_of(port.target)
                        };
                        Some(SocketAddr::new(addr, p))
                    })
                    .collect();
                table.insert(SocketAddr::new(ip, published), backends);
            }
        }
    }
    table
}
