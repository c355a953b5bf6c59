//! Stable per-service addresses ("VIPs", like a Kubernetes ClusterIP).
//!
//! Every service of every stack gets one address from
//! [`VIP_NET`] (`127.77.0.0/16`), allocated by the controller and kept until
//! the service leaves desired state (`berth down`, or a deploy that removes
//! it). Every node's service proxy listens on `VIP:port` for each port the
//! service declares and forwards to the service's healthy instances, so the
//! address a client is given never changes while instances come, go and move.
//!
//! Linux routes all of `127.0.0.0/8` to `lo`, so binding a VIP needs no
//! configuration. Containers cannot reach the host's loopback, so every
//! service of a stack that runs containers also gets a
//! [`container_address`] in [`CONTAINER_NET`], derived from its VIP (same
//! last two octets), which the node adds to `lo` and proxies the same way:
//! a container's packet to it goes to its default gateway, the host, which
//! owns the address. Containers find those addresses by name through
//! [`CONTAINER_DNS`].

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// The VIP range: `127.77.0.0/16`.
pub const VIP_NET: Ipv4Addr = Ipv4Addr::new(127, 77, 0, 0);
/// Prefix length of [`VIP_NET`].
pub const VIP_PREFIX: u8 = 16;

/// The range of container-facing addresses: `198.19.0.0/16`, the upper half
/// of the benchmarking block `198.18.0.0/15` (RFC 2544), which no public
/// host uses and which Docker never picks for its networks.
pub const CONTAINER_NET: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 0);

/// Where each node serves berth's DNS for containers (UDP and TCP port 53,
/// on `lo`): `198.18.0.53`, in the lower half of the benchmarking block,
/// outside [`CONTAINER_NET`] so it is never a service's address. The Docker
/// driver gives it to containers as their first DNS server (Docker's
/// embedded DNS forwards it the names the stack network does not know) and
/// `<stack>.<namespace>.berth` as their first search domain, so a name
/// whose service has no container on the node's stack network resolves to
/// its container-facing address.
pub const CONTAINER_DNS: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 53);

/// One service's stable address, as stored under [`crate::keys::vip`] (and,
/// under [`crate::keys::vip_addr`], the same record keyed by address).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceVip {
    /// Namespace.
    pub namespace: String,
    /// Stack.
    pub stack: String,
    /// Service.
    pub service: String,
    /// The address, inside [`VIP_NET`].
    pub address: Ipv4Addr,
}

/// Whether `a` lies in [`VIP_NET`] and is usable as a host address (not the
/// network or broadcast address of the /16).
pub fn is_vip(a: Ipv4Addr) -> bool {
    let [x, y, c, d] = a.octets();
    let [nx, ny, _, _] = VIP_NET.octets();
    x == nx && y == ny && !(c == 0 && d == 0) && !(c == 255 && d == 255)
}

/// The `n`th usable VIP (0-based), or `None` past the end of the range.
pub fn nth_vip(n: u32) -> Option<Ipv4Addr> {
    let size = 1u32 << (32 - VIP_PREFIX);
    // Skip .0.0 (network) and .255.255 (broadcast).
    (n < size - 2).then(|| Ipv4Addr::from(u32::from(VIP_NET) + 1 + n))
}

/// How many VIPs the range holds.
pub const VIP_COUNT: u32 = (1u32 << (32 - VIP_PREFIX)) - 2;

/// The container-facing address of a VIP: `127.77.a.b` → `198.19.a.b`.
pub fn container_address(vip: Ipv4Addr) -> Ipv4Addr {
    let [_, _, c, d] = vip.octets();
    let [x, y, _, _] = CONTAINER_NET.octets();
    Ipv4Addr::new(x, y, c, d)
}

/// Whether `a` is a container-facing address ([`CONTAINER_NET`]/16).
pub fn is_container_address(a: Ipv4Addr) -> bool {
    let [x, y, _, _] = a.octets();
    let [nx, ny, _, _] = CONTAINER_NET.octets();
    x == nx && y == ny
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_edges() {
        assert_eq!(nth_vip(0), Some(Ipv4Addr::new(127, 77, 0, 1)));
        assert_eq!(
            nth_vip(VIP_COUNT - 1),
            Some(Ipv4Addr::new(127, 77, 255, 254))
        );
        assert_eq!(nth_vip(VIP_COUNT), None);
        assert!(is_vip(Ipv4Addr::new(127, 77, 3, 4)));
        assert!(!is_vip(Ipv4Addr::new(127, 77, 0, 0)));
        assert!(!is_vip(Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(
            container_address(Ipv4Addr::new(127, 77, 3, 4)),
            Ipv4Addr::new(198, 19, 3, 4)
        );
        assert!(is_container_address(Ipv4Addr::new(198, 19, 3, 4)));
    }
}
