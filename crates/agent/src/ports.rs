//! Port allocation for instances: each replica of a service with ports gets
//! its own free TCP port on 127.0.0.1, handed to it as `PORT`.
//!
//! The kernel picks a free port (bind to port 0, read it, close); the
//! allocator remembers the ports its live instances hold so two replicas
//! never get the same one even if the kernel hands a port out twice.

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
            if held.insert(port) {
                return Ok(PortLease {
                    port,
                    held: self.held.clone(),
                });
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "no free port found after 64 tries",
        ))
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
}
