//! The catalog: which instances are healthy, derived from actual state and
//! never edited by hand, and the published-port table built from it for the
//! TCP proxy ([`berth_net::tcp::PortProxy`]).
//!
//! An instance is routable when it is `running` and its health is `healthy`
//! (or it has no check). Port mapping for process instances: the first
//! declared port of a service is the instance's own `PORT`; further ports are
//! forwarded to the same target port on the instance's address (a process can
//! only be told one port).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use berth_model::{Health, InstanceState, InstanceStatus};
use berth_net::Backends;
use berth_store::Revision;
use tokio::sync::watch;

use crate::mirror::{Follower, Mirror};

/// Whether the router and proxies may send traffic to this instance.
pub fn routable(s: &InstanceStatus) -> bool {
    s.state == InstanceState::Running && matches!(s.health, Health::Healthy | Health::None)
}

/// The published-port table for the current mirror.
pub fn published_ports(mirror: &Mirror) -> Backends {
    let mut table = Backends::new();
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
                    })
                    .filter_map(|s| {
                        let addr: IpAddr = s.address.as_deref()?.parse().ok()?;
                        let p = if i == 0 { s.port? } else { port.target };
                        Some(SocketAddr::new(addr, p))
                    })
                    .collect();
                table.insert(SocketAddr::new(ip, published), backends);
            }
        }
    }
    table
}

/// Keeps the published-port table current.
pub struct PortTable {
    /// Where the table is published.
    pub tx: watch::Sender<Backends>,
}

impl Follower for PortTable {
    async fn changed(&mut self, mirror: &Mirror, _: Revision) -> anyhow::Result<()> {
        let table = published_ports(mirror);
        self.tx.send_if_modified(|current| {
            let changed = *current != table;
            *current = table;
            changed
        });
        Ok(())
    }
}
