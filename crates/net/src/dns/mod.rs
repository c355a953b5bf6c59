//! The DNS server: authoritative for `berth.`, answering A, AAAA and SRV
//! with a service's healthy instances, over UDP and TCP (default
//! 127.0.0.1:8600, Consul's port).
//!
//! Layout:
//! - [`zone`]: [`Zone`], what the server hands in, compiled into a hash map
//!   from name to records; the table of names it answers for is there.
//! - `answer`: one query → one reply, pure; the table of rcodes is there.
//! - `wire`: the hand-rolled codec (decoder fuzzed with proptest).
//! - `server`: [`DnsServer`], the sockets.
//! - [`metrics`]: counters and [`DnsMetricsSnapshot`].
//!
//! The zone arrives through a `watch` channel as an `Arc<Zone>`; each query
//! reads the current one, so an instance removed from the catalog is absent
//! from the very next answer.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use std::sync::Arc;
//! use berth_net::dns::{DnsServer, Instance, Zone, DEFAULT_ADDR};
//! let zone = Zone::builder()
//!     .instance("default", "shop", "web", Instance {
//!         instance: "web.1".into(),
//!         addr: "127.0.0.1".parse().unwrap(),
//!         port: Some(5000),
//!         node: "laptop".into(),
//!     })
//!     .build();
//! let (_zone_tx, zone_rx) = tokio::sync::watch::channel(Arc::new(zone));
//! let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
//! DnsServer::bind(DEFAULT_ADDR).await?.run(zone_rx, stop_rx).await;
//! # Ok(()) }
//! ```
//!
//! # Resolving `*.berth` from the host
//!
//! The server answers only for `berth.` (anything else is REFUSED: it is
//! not a recursor), so the host's resolver must send just that domain here
//! (split DNS):
//!
//! - systemd-resolved (≥ 246): `/etc/systemd/resolved.conf.d/berth.conf`
//!   with `[Resolve]`, `DNS=127.0.0.1:8600`, `Domains=~berth`, then
//!   `systemctl restart systemd-resolved`.
//! - dnsmasq: `server=/berth/127.0.0.1#8600`.
//! - Without either, per query: `dig @127.0.0.1 -p 8600 web.shop.berth SRV`.
//!
//! On one machine every process instance is at 127.0.0.1 on its own port,
//! so the A record alone says little: SRV carries the ports.

mod answer;
pub mod metrics;
mod server;
mod wire;
pub mod zone;

pub use answer::MAX_UDP_PAYLOAD;
pub use metrics::{DnsMetrics, DnsMetricsSnapshot};
pub use server::{DEFAULT_ADDR, DnsConfigError, DnsServer, MAX_TTL};
pub use zone::{Instance, ServiceName, Zone, ZoneBuilder};
