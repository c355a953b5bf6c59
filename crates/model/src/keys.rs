//! The store's key layout. Every key berth writes is built here, so the
//! layout can be read in one place and prefixes used by watches stay in step
//! with the keys written.
//!
//! Segments are joined with `/`; names are validated elsewhere to contain no
//! `/` (Compose names are `[a-z0-9][a-z0-9_.-]*`).

use crate::InstanceKey;

/// Root of everything berth stores.
pub const ROOT: &str = "/berth/";

/// Prefix of all stack records.
pub const STACKS: &str = "/berth/stacks/";
/// Prefix of all releases.
pub const RELEASES: &str = "/berth/releases/";
/// Prefix of all assignments.
pub const ASSIGNMENTS: &str = "/berth/assign/";
/// Prefix of all instance statuses.
pub const STATUS: &str = "/berth/status/";
/// Prefix of all nodes.
pub const NODES: &str = "/berth/nodes/";
/// Prefix of the user KV space.
pub const KV: &str = "/berth/kv/";
/// Prefix of KV sessions (TTL'd lock owners).
pub const SESSIONS: &str = "/berth/sessions/";
/// Prefix of services registered from outside (Consul's agent API).
pub const EXTERNAL: &str = "/berth/external/";
/// Prefix of the event ring (bounded; oldest events are deleted).
pub const EVENTS: &str = "/berth/events/";
/// The cluster's join token (`berth agent --join URL --token T`).
pub const JOIN_TOKEN: &str = "/berth/cluster/join-token";
/// The secret servers present to each other (the logs fan-out): only
/// readers of the store know it.
pub const PEER_TOKEN: &str = "/berth/cluster/peer-token";
/// Prefix of joined nodes' credentials (hashed secrets; no lease: they
/// outlive the node's registration until `berth node rm`).
pub const NODE_CREDS: &str = "/berth/node-creds/";
/// Prefix of drain marks (`berth node drain`; no lease, so a drained node
/// stays drained across agent restarts).
pub const NODE_DRAIN: &str = "/berth/drain/";

/// Prefix of the scheduler's unplaced instances per stack
/// ([`crate::Unplaced`]).
pub const UNPLACED: &str = "/berth/unplaced/";

/// `/berth/unplaced/<ns>/<stack>`
pub fn unplaced(ns: &str, stack: &str) -> String {
    format!("{UNPLACED}{ns}/{stack}")
}

/// Prefix of the leader's down marks: since when a node with assignments
/// has been without a registration ([`crate::NodeDown`]). Kept in the store
/// so a new leader continues the grace period instead of restarting it.
pub const NODE_DOWN: &str = "/berth/down/";

/// `/berth/down/<id>`
pub fn node_down(id: &str) -> String {
    format!("{NODE_DOWN}{id}")
}

/// Prefix of the live servers' records (on their own leases).
pub const SERVERS: &str = "/berth/servers/";

/// `/berth/servers/<node id>`
pub fn server(id: &str) -> String {
    format!("{SERVERS}{id}")
}

/// `/berth/node-creds/<id>`
pub fn node_cred(id: &str) -> String {
    format!("{NODE_CREDS}{id}")
}

/// `/berth/drain/<id>`
pub fn node_drain(id: &str) -> String {
    format!("{NODE_DRAIN}{id}")
}

/// Prefix of the joined nodes' latest resource reports
/// ([`crate::api::NodeStats`], on each node's lease). Outside [`ROOT`] on
/// purpose: a report every few seconds per node must not wake every state
/// follower (controller, catalog, router tables) that watches `ROOT`.
pub const NODE_STATS: &str = "/berth-stats/nodes/";

/// `/berth-stats/nodes/<id>`
pub fn node_stats(id: &str) -> String {
    format!("{NODE_STATS}{id}")
}

/// Prefix of how far each node's log stream was stored
/// ([`crate::api::LogPosition`]): written once per log batch, so outside
/// [`ROOT`] like [`NODE_STATS`].
pub const LOG_POSITIONS: &str = "/berth-logs/nodes/";

/// `/berth-logs/nodes/<id>`
pub fn log_position(id: &str) -> String {
    format!("{LOG_POSITIONS}{id}")
}

/// Prefix of the stable per-service addresses ([`crate::vip::ServiceVip`]).
pub const VIPS: &str = "/berth/vips/";
/// Prefix of the reverse index address → service, whose create-only writes
/// make two services never get one address.
pub const VIP_ADDRS: &str = "/berth/vip-addrs/";

/// `/berth/vips/<ns>/<stack>/<service>`
pub fn vip(ns: &str, stack: &str, service: &str) -> String {
    format!("{VIPS}{ns}/{stack}/{service}")
}

/// `/berth/vip-addrs/<address>`
pub fn vip_addr(address: std::net::Ipv4Addr) -> String {
    format!("{VIP_ADDRS}{address}")
}

/// `/berth/kv/<ns>/<key>`: a user key (any text after the namespace,
/// `/`-separated levels included).
pub fn kv(ns: &str, key: &str) -> String {
    format!("{KV}{ns}/{key}")
}

/// `/berth/kv/<ns>/`
pub fn kv_in(ns: &str) -> String {
    format!("{KV}{ns}/")
}

/// `/berth/sessions/<id>`
pub fn session(id: &str) -> String {
    format!("{SESSIONS}{id}")
}

/// `/berth/external/<ns>/<service id>`
pub fn external(ns: &str, id: &str) -> String {
    format!("{EXTERNAL}{ns}/{id}")
}

/// `/berth/external/<ns>/`
pub fn external_in(ns: &str) -> String {
    format!("{EXTERNAL}{ns}/")
}

/// `/berth/events/<id, zero-padded>` (so they sort by id).
pub fn event(id: u64) -> String {
    format!("{EVENTS}{id:020}")
}

/// `/berth/stacks/<ns>/<stack>`
pub fn stack(ns: &str, stack: &str) -> String {
    format!("{STACKS}{ns}/{stack}")
}

/// `/berth/stacks/<ns>/`
pub fn stacks_in(ns: &str) -> String {
    format!("{STACKS}{ns}/")
}

/// `/berth/releases/<ns>/<stack>/<version, zero-padded>` (so they sort).
pub fn release(ns: &str, stack: &str, version: u64) -> String {
    format!("{RELEASES}{ns}/{stack}/{version:012}")
}

/// `/berth/releases/<ns>/<stack>/`
pub fn releases_of(ns: &str, stack: &str) -> String {
    format!("{RELEASES}{ns}/{stack}/")
}

/// `/berth/assign/<node>/<ns>/<stack>/<service>/<slot>`
pub fn assignment(node: &str, key: &InstanceKey) -> String {
    format!(
        "{ASSIGNMENTS}{node}/{}/{}/{}/{:06}",
        key.namespace, key.stack, key.service, key.slot
    )
}

/// `/berth/assign/<node>/`: what one agent watches.
pub fn assignments_of(node: &str) -> String {
    format!("{ASSIGNMENTS}{node}/")
}

/// `/berth/status/<ns>/<stack>/<service>/<slot>`
///
/// Status is keyed by instance, not node, so `ps` of a stack is one range.
pub fn status(key: &InstanceKey) -> String {
    format!(
        "{STATUS}{}/{}/{}/{:06}",
        key.namespace, key.stack, key.service, key.slot
    )
}

/// `/berth/status/<ns>/<stack>/`
pub fn status_of_stack(ns: &str, stack: &str) -> String {
    format!("{STATUS}{ns}/{stack}/")
}

/// `/berth/nodes/<id>`
pub fn node(id: &str) -> String {
    format!("{NODES}{id}")
}

/// Parse the instance key back out of an assignment or status key.
pub fn parse_instance(key: &str) -> Option<InstanceKey> {
    let rest = key.strip_prefix(STATUS).or_else(|| {
        key.strip_prefix(ASSIGNMENTS)
            .and_then(|r| r.split_once('/').map(|(_, r)| r))
    })?;
    let mut parts = rest.split('/');
    let namespace = parts.next()?.to_owned();
    let stack = parts.next()?.to_owned();
    let service = parts.next()?.to_owned();
    let slot = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some(InstanceKey {
        namespace,
        stack,
        service,
        slot,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_keys_round_trip() {
        let k = InstanceKey::new("default", "shop", "web", 12);
        assert_eq!(parse_instance(&status(&k)), Some(k.clone()));
        assert_eq!(parse_instance(&assignment("n1", &k)), Some(k));
        assert_eq!(parse_instance("/berth/status/a/b"), None);
    }
}
