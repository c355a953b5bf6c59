//! What one node's edge serves: the HTTP router's routes and backends, the
//! TCP proxies (published ports and the services' stable addresses) and the
//! DNS records of healthy instances.
//!
//! The servers compute [`EdgeTables`] from the catalog (`server/src/edge.rs`)
//! and every node runs its edge from them: the server's own node directly,
//! agents on other machines from `GET /v1/agent/nodes/{node}/edge/watch`
//! (NDJSON [`EdgeLine`]s). Backends are instance addresses as their agents
//! reported them (the agent's advertised address for processes), so any
//! node's router reaches instances on every node.
//!
//! Plain data, sorted, so two servers computing the tables from the same
//! state produce the same bytes and the same [`EdgeTables::etag`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

/// A service's identity across namespaces and stacks.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceRef {
    /// Namespace.
    pub namespace: String,
    /// Stack.
    pub stack: String,
    /// Service.
    pub service: String,
}

/// One host/path rule of the HTTP router.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRoute {
    /// Host (exact, `*.suffix`, or `*` for any).
    pub host: String,
    /// Path prefix, matched on segment boundaries.
    pub path_prefix: String,
    /// Where matching requests go.
    pub service: ServiceRef,
    /// Remove the prefix before forwarding.
    #[serde(default)]
    pub strip_prefix: bool,
}

/// One healthy instance behind a routed service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpBackend {
    /// Where the instance listens.
    pub addr: SocketAddr,
    /// `service.slot`, for metrics and the access log.
    pub instance: String,
}

/// A routed service and its healthy instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpService {
    /// The service.
    pub service: ServiceRef,
    /// Its healthy instances, on any node.
    pub backends: Vec<HttpBackend>,
    /// How many other instances the router tries when connecting fails.
    pub retries: u32,
}

/// A TCP listener of the proxy: a published port or `VIP:port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpProxy {
    /// Where the node listens.
    pub listen: SocketAddr,
    /// Healthy instances each connection is forwarded to, round-robin.
    pub backends: Vec<SocketAddr>,
}

/// One healthy instance published in DNS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsRecord {
    /// The service.
    pub service: ServiceRef,
    /// `service.slot`.
    pub instance: String,
    /// Its address (A or AAAA).
    pub addr: IpAddr,
    /// Its port (SRV), when it has one.
    pub port: Option<u16>,
    /// The node it runs on.
    pub node: String,
}

/// A service's container-facing address, as berth's DNS for containers
/// publishes it (`<service>.<stack>.<namespace>.berth` → the address).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerName {
    /// The service.
    pub service: ServiceRef,
    /// Its container-facing address (`198.19.x.y`).
    pub addr: Ipv4Addr,
}

/// Everything a node's edge serves.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeTables {
    /// HTTP routes, in table order.
    pub routes: Vec<HttpRoute>,
    /// The routed services' backends, sorted by service.
    pub services: Vec<HttpService>,
    /// TCP proxy listeners, sorted by address.
    pub proxies: Vec<TcpProxy>,
    /// DNS records, sorted by service and instance.
    pub dns: Vec<DnsRecord>,
    /// Container-facing service addresses (`198.19.x.y`) each node puts on
    /// `lo`, so its containers reach services through the proxy.
    pub lo_addresses: Vec<Ipv4Addr>,
    /// The names berth's DNS for containers answers (on
    /// [`crate::vip::CONTAINER_DNS`]), sorted by service: services with a
    /// container-facing address and a declared TCP port. Absent from the
    /// tables of servers before it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub container_names: Vec<ContainerName>,
}

impl EdgeTables {
    /// A content hash (FNV-1a 64 of the JSON form, hex): equal tables have
    /// equal tags on every server, so an agent reconnecting with the tag it
    /// has is not sent the same tables again.
    pub fn etag(&self) -> String {
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}")
    }
}

/// One line of the NDJSON stream of
/// `GET /v1/agent/nodes/{node}/edge/watch?have=ETAG`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EdgeLine {
    /// The whole tables (sent at connect unless the client has them, and
    /// after every change).
    Tables {
        /// [`EdgeTables::etag`] of `tables`.
        etag: String,
        /// The tables.
        tables: Box<EdgeTables>,
    },
    /// Nothing changed; sent periodically so a dead connection is noticed.
    Progress,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_follows_content_and_lines_round_trip() {
        let mut t = EdgeTables::default();
        let empty = t.etag();
        assert_eq!(empty, EdgeTables::default().etag());
        t.proxies.push(TcpProxy {
            listen: "127.77.0.1:80".parse().unwrap(),
            backends: vec!["10.0.0.2:41000".parse().unwrap()],
        });
        assert_ne!(t.etag(), empty);
        let line = EdgeLine::Tables {
            etag: t.etag(),
            tables: Box::new(t),
        };
        let text = serde_json::to_string(&line).unwrap();
        assert!(text.starts_with("{\"type\":\"tables\""), "{text}");
        assert_eq!(serde_json::from_str::<EdgeLine>(&text).unwrap(), line);
        let p = serde_json::to_string(&EdgeLine::Progress).unwrap();
        assert_eq!(p, "{\"type\":\"progress\"}");
    }
}
