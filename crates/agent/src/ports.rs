//! Port allocation for instances: each replica of a service with ports gets
//! its own free TCP port on 127.0.0.1, handed to it as `PORT`.
//!
//! The kernel picks a free port (bind to port 0, read it, close); the
//! allocator remembers the ports its live instances hold so two replicas
//! never get the same one even if the kernel hands a port out twice.
//!
//! Several agents can share one host (a server's local agent next to a
//! joined one, tests, benchmarks), and each only knows its own ports: two
//! of them were handed the same port (measured: 1 instance in 300 failed
//! with "Address already in use" in bench/cluster_scale.py). So a port is
//! also claimed host-wide, by an `flock` on `<tmp>/berth-ports/<port>` held
//! for the lease's life: another agent that gets the same port from the
//! kernel finds it locked and picks again. The lock files are left in
//! place (at most one per port number): removing one while another process
//! opens it would let two processes lock different files for one port.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

/// Hands out ports and takes them back.
#[derive(Debug, Clone, Default)]
pub struct PortAllocator {
    held: Arc<Mutex<HashSet<u16>>>,
}

/// A port held by one instance; released when dropped.
#[derive(Debug)]
pub struct PortLease {
    port: u16,
    held: Arc<Mutex<HashSet<u16>>>,
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
        if let Ok(mut held) = self.held.lock() {
            held.remove(&self.port);
        }
    }
}

impl PortAllocator {
    /// A new, empty allocator.
    pub fn new() -> Self {
        Self::default()
    }

    /// A free port on 127.0.0.1 that no other live lease holds.
    pub fn allocate(&self) -> std::io::Result<PortLease> {
        for _ in 0..64 {
            let port = TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port();
            let mut held = self
                .held
                .lock()
                .map_err(|_| std::io::Error::other("port allocator lock poisoned"))?;
            if held.contains(&port) {
                continue;
            }
            let claim = match claim_host_wide(port) {
                Claim::Taken => continue,
                Claim::Held(lock) => Some(lock),
                Claim::Unavailable => None,
            };
            held.insert(port);
            return Ok(PortLease {
                port,
                held: self.held.clone(),
                _claim: claim,
            });
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "no free port found after 64 tries",
        ))
    }
}

enum Claim {
    Held(nix::fcntl::Flock<std::fs::File>),
    /// Another process (agent) holds the port.
    Taken,
    /// The lock directory cannot be used (read-only tmp…).
    Unavailable,
}

fn claim_host_wide(port: u16) -> Claim {
    let dir = std::env::temp_dir().join("berth-ports");
    if std::fs::create_dir_all(&dir).is_err() {
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

    #[test]
    fn leases_are_distinct_and_released() {
        let a = PortAllocator::new();
        let leases: Vec<_> = (0..50).map(|_| a.allocate().unwrap()).collect();
        let set: HashSet<u16> = leases.iter().map(PortLease::port).collect();
        assert_eq!(set.len(), 50);
        drop(leases);
        assert!(a.held.lock().unwrap().is_empty());
    }

    #[test]
    fn two_allocators_on_one_host_never_share_a_port() {
        // Two agents' allocators (no shared memory): a port one holds is
        // locked for the other.
        let (a, b) = (PortAllocator::new(), PortAllocator::new());
        let mine: Vec<_> = (0..100).map(|_| a.allocate().unwrap()).collect();
        let theirs: Vec<_> = (0..100).map(|_| b.allocate().unwrap()).collect();
        let ours: HashSet<u16> = mine.iter().map(PortLease::port).collect();
        assert!(theirs.iter().all(|l| !ours.contains(&l.port())));
        let held = mine[0].port();
        assert!(matches!(claim_host_wide(held), Claim::Taken));
        drop(mine);
        assert!(matches!(claim_host_wide(held), Claim::Held(_)));
    }
}
