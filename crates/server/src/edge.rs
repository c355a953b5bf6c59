//! The edge tables ([`EdgeTables`]): everything a node's router, DNS server
//! and TCP proxy serve, computed from the catalog, and the feed that hands
//! them to this server's own edge and to every joined agent.
//!
//! - [`tables`] is a pure function of the [`Mirror`]: routes and backends
//!   of every service (routes as in `traffic.rs`), the published ports and
//!   `VIP:port` proxies (`catalog.rs`, `vip.rs`), the DNS records of healthy
//!   instances, the container-facing addresses nodes put on `lo` and the
//!   names berth's DNS for containers answers with them.
//! - [`Tables`] follows the state watch and publishes new tables only when
//!   they differ, so a health change reaches every edge in one watch
//!   round-trip (no polling): to this server's node through a channel
//!   ([`berth_agent::edge`] runs the components), to agents through
//!   `GET /v1/agent/nodes/{node}/edge/watch` ([`EdgeFrame`], serialised once
//!   per change however many agents follow).
//!
//! Every node gets the same tables: instance addresses are those the agents
//! reported (the agent's advertised address for processes), so each node's
//! router forwards to healthy instances on any node.

use std::net::IpAddr;
use std::sync::Arc;

use berth_model::edge::{
    DnsRecord, EdgeLine, EdgeTables, HttpBackend, HttpRoute, HttpService, ServiceRef, TcpProxy,
};
use berth_store::Revision;
use bytes::Bytes;
use tokio::sync::watch;

use crate::catalog;
use crate::mirror::{Follower, Mirror};
use crate::{traffic, vip};

/// How many other instances the router tries when connecting fails.
pub const ROUTER_RETRIES: u32 = 2;

/// The edge tables for the current mirror.
pub fn tables(mirror: &Mirror) -> EdgeTables {
    let entries = catalog::entries(mirror);
    let mut out = EdgeTables::default();
    for (record, _) in mirror.stacks.values() {
        for (name, service) in &record.spec.services {
            let id = ServiceRef {
                namespace: record.namespace.clone(),
                stack: record.name.clone(),
                service: name.clone(),
            };
            for (host, path) in traffic::service_routes(record, name, service) {
                out.routes.push(HttpRoute {
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
                    Some(HttpBackend {
                        addr: std::net::SocketAddr::new(ip, e.port?),
                        instance: e.instance.clone(),
                    })
                })
                .collect();
            out.services.push(HttpService {
                service: id,
                backends,
                // A connection refused by an instance that just stopped
                // (its removal from the table is in flight) is retried on
                // another one: bodiless idempotent requests only.
                retries: ROUTER_RETRIES,
            });
        }
    }
    out.services.sort_by(|a, b| a.service.cmp(&b.service));

    let mut proxies = catalog::published_ports(mirror);
    proxies.extend(vip::proxy_table(mirror));
    out.proxies = proxies
        .into_iter()
        .map(|(listen, backends)| TcpProxy { listen, backends })
        .collect();

    // Healthy instances only; entries come sorted by instance key.
    for e in entries.into_iter().filter(|e| e.healthy) {
        let Ok(addr) = e.address.parse() else {
            continue;
        };
        out.dns.push(DnsRecord {
            service: ServiceRef {
                namespace: e.namespace,
                stack: e.stack,
                service: e.service,
            },
            instance: e.instance,
            addr,
            port: e.port,
            node: e.node,
        });
    }
    out.lo_addresses = vip::container_addresses(mirror).into_iter().collect();
    out.container_names = vip::container_names(mirror);
    out
}

/// One published version of the tables, with its NDJSON line ready for
/// every agent's watch.
#[derive(Debug)]
pub struct EdgeFrame {
    /// The tables.
    pub tables: Arc<EdgeTables>,
    /// Their [`EdgeTables::etag`].
    pub etag: String,
    /// `{"type":"tables",…}\n`.
    pub line: Bytes,
}

impl EdgeFrame {
    fn new(tables: Arc<EdgeTables>) -> Self {
        let etag = tables.etag();
        let line = EdgeLine::Tables {
            etag: etag.clone(),
            tables: Box::new((*tables).clone()),
        };
        let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
        bytes.push(b'\n');
        Self {
            tables,
            etag,
            line: Bytes::from(bytes),
        }
    }
}

/// The agents' side of the feed (an axum extension of the API routers).
#[derive(Debug, Clone)]
pub struct EdgeFeed(pub watch::Receiver<Arc<EdgeFrame>>);

/// Keeps the edge tables current for this node and for the agents (the
/// `Tables` follower of the watch-lag and pass metrics).
pub struct Tables {
    /// This server's own edge.
    pub local: watch::Sender<Arc<EdgeTables>>,
    /// Agents' edge watches.
    pub frames: watch::Sender<Arc<EdgeFrame>>,
}

impl Tables {
    /// Empty tables until the first pass; the receivers for this node's
    /// edge and for the API.
    pub fn new() -> (Self, watch::Receiver<Arc<EdgeTables>>, EdgeFeed) {
        let empty = Arc::new(EdgeTables::default());
        let (local, local_rx) = watch::channel(empty.clone());
        let (frames, frames_rx) = watch::channel(Arc::new(EdgeFrame::new(empty)));
        (Self { local, frames }, local_rx, EdgeFeed(frames_rx))
    }
}

impl Follower for Tables {
    async fn changed(&mut self, mirror: &Mirror, _: Revision) -> anyhow::Result<()> {
        let t = tables(mirror);
        if *self.local.borrow().as_ref() == t {
            return Ok(());
        }
        let t = Arc::new(t);
        self.local.send_replace(t.clone());
        // For bench/propagation.sh HOPS=1 (wall clock: other processes).
        let at_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        tracing::debug!(target: "berth_hops", hop = "tables", at_us);
        self.frames.send_replace(Arc::new(EdgeFrame::new(t)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_model::{Health, InstanceKey, InstanceState, InstanceStatus};

    fn mirror() -> Mirror {
        let yaml = "services:\n  web:\n    command: ./web\n    ports: ['8000:80']\n";
        let mut m = crate::vip::tests::mirror(yaml);
        for (slot, node, addr, health) in [
            (1, "n1", "10.213.1.2", Health::Healthy),
            (2, "n2", "10.213.2.2", Health::Healthy),
            (3, "n3", "10.213.3.2", Health::Unhealthy),
        ] {
            let key = InstanceKey::new("default", "shop", "web", slot);
            m.statuses.insert(
                key.clone(),
                InstanceStatus {
                    state: InstanceState::Running,
                    health,
                    address: Some(addr.into()),
                    port: Some(41000 + slot as u16),
                    ..InstanceStatus::new(key, format!("u{slot}"), node, 1, 0)
                },
            );
        }
        m
    }

    #[test]
    fn tables_hold_healthy_instances_of_every_node() {
        let t = tables(&mirror());
        assert!(
            t.routes
                .iter()
                .any(|r| r.host == "web.shop.localhost" && r.service.service == "web")
        );
        let web = &t.services[0];
        let addrs: Vec<String> = web.backends.iter().map(|b| b.addr.to_string()).collect();
        assert_eq!(addrs, ["10.213.1.2:41001", "10.213.2.2:41002"]);
        assert_eq!(web.retries, ROUTER_RETRIES);
        let published = t
            .proxies
            .iter()
            .find(|p| p.listen == "127.0.0.1:8000".parse().unwrap())
            .unwrap();
        assert_eq!(published.backends.len(), 2);
        let nodes: Vec<&str> = t.dns.iter().map(|r| r.node.as_str()).collect();
        assert_eq!(nodes, ["n1", "n2"]);
        // Deterministic: the same state gives the same tag.
        assert_eq!(t.etag(), tables(&mirror()).etag());
    }

    #[tokio::test]
    async fn the_feed_publishes_only_changes() {
        let (mut feed, local, api) = Tables::new();
        let m = mirror();
        feed.changed(&m, 1).await.unwrap();
        let first = api.0.borrow().etag.clone();
        assert_eq!(local.borrow().services.len(), 1);
        let mut rx = api.0.clone();
        rx.borrow_and_update();
        feed.changed(&m, 2).await.unwrap();
        assert!(!rx.has_changed().unwrap(), "same tables published again");
        let mut m = m;
        m.statuses.clear();
        feed.changed(&m, 3).await.unwrap();
        assert!(rx.has_changed().unwrap());
        assert_ne!(rx.borrow().etag, first);
    }
}
