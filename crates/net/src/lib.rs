//! Traffic into services.
//!
//! - [`http::Router`]: the HTTP reverse proxy (HTTP/1.1, HTTP/2, WebSocket
//!   upgrades, TLS termination) routing by host and path to a service's
//!   instances, with load balancing, retries, a circuit breaker and a
//!   bulkhead. It follows an [`http::RouteTable`] the server builds.
//! - [`dns::DnsServer`]: the authoritative DNS server for `berth.`
//!   (A/AAAA/SRV of healthy instances, UDP and TCP), following a
//!   [`dns::Zone`] the server builds from its catalog.
//! - [`tcp::PortProxy`], which makes a published Compose port
//!   (`ports: ["8000:5000"]`) mean what it means in Compose — something
//!   listens on the host port — even though berth's process instances each
//!   listen on their own allocated port: the proxy accepts on the published
//!   port and forwards each connection to a healthy instance, round-robin.
//!   The same proxy serves every service's stable address (`VIP:port`, like
//!   a Kubernetes ClusterIP), so clients are given addresses that never
//!   change while instances move.
//!
//! This crate sees only tables ([`Backends`], [`http::RouteTable`]) handed
//! to it through a `tokio::sync::watch` channel; it never reads the store,
//! so the server decides what "healthy" means and the proxy only moves
//! bytes.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod dns;
pub mod http;
pub mod tcp;

use std::collections::BTreeMap;
use std::net::SocketAddr;

/// Listener address (a published port, or a service's stable address and
/// declared port) → the healthy instance addresses behind it.
pub type Backends = BTreeMap<SocketAddr, Vec<SocketAddr>>;
