//! Port allocation for instances: each replica of a service with ports gets
//! its own free TCP port, handed to it as `PORT`; a container published on
//! its node's address gets one per declared port, its host ports (see
//! `driver::docker`).
//!
//! Ports come from a range outside the kernel's ephemeral range
//! (`/proc/sys/net/ipv4/ip_local_port_range`, 32768–60999 by default). The
//! earlier way, bind to port 0 and close, took a port *from* the ephemeral
//! range, and between the close and the instance's own bind any outgoing
//! connection on the host could be given that same port (seen: an
//! instance exiting with "Address already in use" in `e2e_fleet`). The
//! default range is 20000–32000, Nomad's dynamic port range for the same
//! reason; `BERTH_PORT_RANGE=LOW-HIGH` sets another. The part of it that
//! lies inside the ephemeral range is left out (all of it is used, with a
//! warning, when nothing is left).
//!
//! Candidates are taken in turn from a cursor that starts at a random
//! place and wraps, so a port given back is not handed out again at once
//! (its TIME_WAIT connections would make some programs' bind fail), and
//! agents sharing a host start apart. A candidate is taken only when
//! - no live lease of this allocator holds it,
//! - a socket without `SO_REUSEADDR` can bind it on every IPv4 address
//!   and, IPv6-only, on every IPv6 address (nothing listens on it, nothing
//!   is bound to it on any address of either family: a container may be
//!   published on an IPv6 advertise address, a process may listen on
//!   `[::]`), and
//! - it can be claimed host-wide: several agents can share one host (a
//!   server's local agent next to a joined one, tests, benchmarks), each
//!   knowing only its own ports (measured: 1 instance in 300 failed with
//!   "Address already in use" in bench/cluster_scale.py), so a port is
//!   also claimed by an `flock` on `<tmp>/berth-ports/<port>` held for the
//!   lease's life. The lock files are left in place (at most one per port
//!   number): removing one while another process opens it would let two
//!   processes lock different files for one port.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

/// The range instances' ports are taken from unless configured.
pub const DEFAULT_RANGE: PortRange = PortRange {
    low: 20_000,
    high: 32_000,
};

/// The environment variable that sets the range (`LOW-HIGH`).
pub const RANGE_ENV: &str = "BERTH_PORT_RANGE";

/// An inclusive range of ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub low: u16,
    /// Last port (included).
    pub high: u16,
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.low, self.high)
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;

    /// `20000-32000`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            |why: &str| format!("port range {s:?}: {why} (expected LOW-HIGH, e.g. 20000-32000)");
        let (low, high) = s.trim().split_once('-').ok_or_else(|| bad("no '-'"))?;
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| bad(&format!("{:?} is not a port number", p.trim())))
        };
        let (low, high) = (port(low)?, port(high)?);
        if low == 0 || low > high {
            return Err(bad("LOW must be at least 1 and not above HIGH"));
        }
        Ok(Self { low, high })
    }
}

impl PortRange {
    /// The range `BERTH_PORT_RANGE` names, else [`DEFAULT_RANGE`].
    pub fn from_env() -> Result<Self, String> {
        match std::env::var(RANGE_ENV) {
            Ok(v) => v.parse().map_err(|e| format!("{RANGE_ENV}: {e}")),
            Err(_) => Ok(DEFAULT_RANGE),
        }
    }

    fn contains(&self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
    }
}

/// The kernel's ephemeral port range, if it can be read.
pub fn ephemeral_range() -> Option<PortRange> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(low)), Some(Ok(high))) if low <= high => Some(PortRange { low, high }),
        _ => None,
    }
}

/// The ports of `range` outside `ephemeral`; all of `range` (with a
/// warning) when that leaves none.
fn candidates(range: PortRange, ephemeral: Option<PortRange>) -> Vec<u16> {
    let all: Vec<u16> = (range.low..=range.high).collect();
    let Some(eph) = ephemeral else {
        return all;
    };
    let outside: Vec<u16> = all.iter().copied().filter(|p| !eph.contains(*p)).collect();
    if outside.is_empty() {
        tracing::warn!(
            %range, ephemeral = %eph,
            "the instance port range lies inside the kernel's ephemeral range (/proc/sys/net/ipv4/ip_local_port_range): an outgoing connection can take an instance's port before it binds it; set {RANGE_ENV} to a range outside it"
        );
        return all;
    }
    if outside.len() < all.len() {
        tracing::info!(%range, ephemeral = %eph, ports = outside.len(), "instance ports: the part of the range outside the kernel's ephemeral range");
    }
    outside
}

/// Hands out ports and takes them back.
#[derive(Debug, Clone)]
pub struct PortAllocator {
    state: Arc<Mutex<State>>,
    /// Where host-wide claims are kept.
    claims: Arc<std::path::PathBuf>,
}

#[derive(Debug)]
struct State {
    candidates: Vec<u16>,
    next: usize,
    held: HashSet<u16>,
    range: PortRange,
}

/// A port held by one instance; released when dropped.
#[derive(Debug)]
pub struct PortLease {
    port: u16,
    state: Arc<Mutex<State>>,
    /// The host-wide claim (`None` when the lock directory is unusable:
    /// then only this agent's own ports are kept apart).
    _claim: Option<nix::fcntl::Flock<std::fs::File>>,
}

impl PortLease {
    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for PortLease {
    fn drop(&mut self) {
        if let Ok(mut st) = self.state.lock() {
            st.held.remove(&self.port);
        }
    }
}

impl Default for PortAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl PortAllocator {
    /// An allocator over [`DEFAULT_RANGE`] (minus the ephemeral range).
    pub fn new() -> Self {
        Self::with_range(DEFAULT_RANGE)
    }

    /// An allocator over `range`, minus the kernel's ephemeral range.
    pub fn with_range(range: PortRange) -> Self {
        Self::build(
            range,
            candidates(range, ephemeral_range()),
            std::env::temp_dir().join("berth-ports"),
        )
    }

    fn build(range: PortRange, candidates: Vec<u16>, claims: std::path::PathBuf) -> Self {
        // Agents sharing a host start at different places.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as usize)
            ^ (std::process::id() as usize).wrapping_mul(2_654_435_761);
        let next = seed % candidates.len().max(1);
        Self {
            state: Arc::new(Mutex::new(State {
                candidates,
                next,
                held: HashSet::new(),
                range,
            })),
            claims: Arc::new(claims),
        }
    }

    /// A free port of the range that no other live lease (of this agent
    /// or another on the host) holds.
    pub fn allocate(&self) -> std::io::Result<PortLease> {
        let mut st = self
            .state
            .lock()
            .map_err(|_| std::io::Error::other("port allocator lock poisoned"))?;
        let n = st.candidates.len();
        for _ in 0..n {
            let port = st.candidates[st.next];
            st.next = (st.next + 1) % n;
            if st.held.contains(&port) || !bindable(port) {
                continue;
            }
            let claim = match claim_host_wide(&self.claims, port) {
                Claim::Taken => continue,
                Claim::Held(lock) => Some(lock),
                Claim::Unavailable => None,
            };
            st.held.insert(port);
            return Ok(PortLease {
                port,
                state: self.state.clone(),
                _claim: claim,
            });
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!(
                "every port of the range {} is in use (set {RANGE_ENV}=LOW-HIGH to a larger range outside /proc/sys/net/ipv4/ip_local_port_range)",
                st.range
            ),
        ))
    }

    /// Hold `port`, which something of this agent's already uses (the host
    /// port of an adopted container), so no other lease gets it. `None`
    /// when another live lease, here or in another agent, holds it.
    pub fn claim(&self, port: u16) -> Option<PortLease> {
        let mut st = self.state.lock().ok()?;
        if st.held.contains(&port) {
            return None;
        }
        let claim = match claim_host_wide(&self.claims, port) {
            Claim::Taken => return None,
            Claim::Held(lock) => Some(lock),
            Claim::Unavailable => None,
        };
        st.held.insert(port);
        Some(PortLease {
            port,
            state: self.state.clone(),
            _claim: claim,
        })
    }
}

/// Whether nothing is bound to `port` on any IPv4 or IPv6 address: a bind
/// of a family's wildcard address conflicts with any address of that
/// family (an IPv4 one alone misses a listener on an IPv6 address).
/// Without `SO_REUSEADDR`, so a port that still has connections in
/// TIME_WAIT is passed over too.
fn bindable(port: u16) -> bool {
    let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    let Ok(sock) = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None) else {
        return false;
    };
    if sock.bind(&v4.into()).is_err() {
        return false;
    }
    match socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None) {
        // IPv6-only, so this checks the IPv6 side alone (the IPv4 one is
        // held by `sock` meanwhile).
        Ok(sock6) => sock6.set_only_v6(true).is_ok() && sock6.bind(&v6.into()).is_ok(),
        // No IPv6 on this host: nothing can be bound there.
        Err(_) => true,
    }
}

enum Claim {
    Held(nix::fcntl::Flock<std::fs::File>),
    /// Another process (agent) holds the port.
    Taken,
    /// The lock directory cannot be used (read-only tmp…).
    Unavailable,
}

fn claim_host_wide(dir: &std::path::Path, port: u16) -> Claim {
    if std::fs::create_dir_all(dir).is_err() {
        return Claim::Unavailable;
    }
    let file = match std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(port.to_string()))
    {
        Ok(f) => f,
        Err(_) => return Claim::Unavailable,
    };
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Claim::Held(lock),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Claim::Taken,
        Err(_) => Claim::Unavailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> std::path::PathBuf {
        std::env::temp_dir().join("berth-ports")
    }

    #[test]
    fn leases_are_distinct_released_and_outside_the_ephemeral_range() {
        let a = PortAllocator::new();
        let eph = ephemeral_range();
        let leases: Vec<_> = (0..50).map(|_| a.allocate().unwrap()).collect();
        let set: HashSet<u16> = leases.iter().map(PortLease::port).collect();
        assert_eq!(set.len(), 50);
        for p in &set {
            assert!(DEFAULT_RANGE.contains(*p), "{p}");
            assert!(eph.is_none_or(|e| !e.contains(*p)), "{p} is ephemeral");
        }
        drop(leases);
        assert!(a.state.lock().unwrap().held.is_empty());
    }

    #[test]
    fn two_allocators_on_one_host_never_share_a_port() {
        // Two agents' allocators (no shared memory) over one small range: a
        // port one holds is locked for the other.
        let range = PortRange {
            low: 21_000,
            high: 21_299,
        };
        let all: Vec<u16> = (range.low..=range.high).collect();
        let a = PortAllocator::build(range, all.clone(), claims());
        let b = PortAllocator::build(range, all, claims());
        let mine: Vec<_> = (0..100).map(|_| a.allocate().unwrap()).collect();
        let theirs: Vec<_> = (0..100).map(|_| b.allocate().unwrap()).collect();
        let ours: HashSet<u16> = mine.iter().map(PortLease::port).collect();
        assert!(theirs.iter().all(|l| !ours.contains(&l.port())));
        let held = mine[0].port();
        assert!(matches!(claim_host_wide(&claims(), held), Claim::Taken));
        drop(mine);
        assert!(matches!(claim_host_wide(&claims(), held), Claim::Held(_)));
    }

    #[test]
    fn a_port_something_listens_on_is_passed_over() {
        // A real listener on a port of the range, on one address only.
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = busy.local_addr().unwrap().port();
        let range = PortRange {
            low: port,
            high: port,
        };
        let dir = tempfile::tempdir().unwrap();
        let a = PortAllocator::build(range, vec![port], dir.path().to_path_buf());
        let err = a.allocate().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        assert!(err.to_string().contains(&format!("{port}-{port}")), "{err}");
        drop(busy);
        assert_eq!(a.allocate().unwrap().port(), port);
    }

    #[test]
    fn a_port_something_listens_on_over_ipv6_only_is_passed_over() {
        // A listener on an IPv6 address (an IPv6 advertise address, a
        // program on [::1]): a bind on 0.0.0.0 alone would not see it.
        let busy = match std::net::TcpListener::bind("[::1]:0") {
            Ok(l) => l,
            Err(e) => {
                eprintln!("SKIPPED: no IPv6 loopback on this host ({e})");
                return;
            }
        };
        let port = busy.local_addr().unwrap().port();
        assert!(
            std::net::TcpListener::bind(("0.0.0.0", port)).is_ok(),
            "the IPv4 side of {port} is free: only an IPv6 check can see the listener"
        );
        let range = PortRange {
            low: port,
            high: port,
        };
        let dir = tempfile::tempdir().unwrap();
        let a = PortAllocator::build(range, vec![port], dir.path().to_path_buf());
        let err = a.allocate().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        drop(busy);
        assert_eq!(a.allocate().unwrap().port(), port);
    }

    #[test]
    fn an_outgoing_connection_never_takes_a_handed_out_port() {
        // The failure this range exists for: a port handed out, not yet
        // bound by its instance, while the host opens connections. Each
        // outgoing connection gets an ephemeral port; none of them may be
        // one of ours.
        let a = PortAllocator::new();
        let leases: Vec<_> = (0..100).map(|_| a.allocate().unwrap()).collect();
        let ours: HashSet<u16> = leases.iter().map(PortLease::port).collect();
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let to = server.local_addr().unwrap();
        let mut conns = Vec::new();
        for _ in 0..200 {
            let c = std::net::TcpStream::connect(to).unwrap();
            let local = c.local_addr().unwrap().port();
            assert!(!ours.contains(&local), "connection took port {local}");
            conns.push((c, server.accept().unwrap()));
        }
    }

    #[test]
    fn ranges_parse_and_leave_out_the_ephemeral_part() {
        assert_eq!("20000-32000".parse::<PortRange>().unwrap(), DEFAULT_RANGE);
        assert!("20000".parse::<PortRange>().is_err());
        assert!("2-1".parse::<PortRange>().is_err());
        assert!("0-10".parse::<PortRange>().is_err());
        let e = "a-70000".parse::<PortRange>().unwrap_err();
        assert!(e.contains("\"a\" is not a port number"), "{e}");
        let eph = PortRange {
            low: 32_768,
            high: 60_999,
        };
        let c = candidates(
            PortRange {
                low: 32_760,
                high: 32_770,
            },
            Some(eph),
        );
        assert_eq!(c, (32_760..32_768).collect::<Vec<u16>>());
        // All inside: the whole range, rather than nothing.
        let c = candidates(
            PortRange {
                low: 40_000,
                high: 40_009,
            },
            Some(eph),
        );
        assert_eq!(c.len(), 10);
    }

    #[test]
    fn a_claimed_port_is_never_handed_out_again_until_released() {
        // An adopted container's host port: claimed by the new agent, so
        // neither it nor another agent hands it out.
        let (a, b) = (PortAllocator::new(), PortAllocator::new());
        let port = a.allocate().unwrap().port();
        let claimed = a.claim(port).expect("free again once its lease is gone");
        assert!(a.claim(port).is_none(), "held here");
        assert!(b.claim(port).is_none(), "held host-wide");
        drop(claimed);
        assert!(b.claim(port).is_some());
    }
}
