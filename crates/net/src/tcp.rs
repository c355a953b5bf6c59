//! The TCP proxy: published ports and service addresses.
//!
//! One listener per address in the table it follows, keyed by (ip, port):
//! a published Compose port (`127.0.0.1:8000`), or a service's stable
//! address and declared port (`127.77.3.9:5432`, like a Kubernetes
//! ClusterIP). Listeners are opened and closed as the table changes (an
//! address exists while its service exists, even with no healthy instance:
//! connections then get closed at once, which a client sees as a refused
//! request rather than a hang). Connections already proxied are never cut
//! by a table change. A listener that cannot be opened (the port is taken,
//! the address is not on an interface yet) is retried every
//! [`BIND_RETRY`] and on every table change.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::Backends;

/// How long to try one backend before moving to the next.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often listeners that could not be opened are tried again.
pub const BIND_RETRY: Duration = Duration::from_secs(1);

/// Runs listeners for every address in the table it watches.
pub struct PortProxy {
    table: watch::Receiver<Backends>,
}

struct Listener {
    task: JoinHandle<()>,
    backends: watch::Sender<Vec<SocketAddr>>,
}

impl PortProxy {
    /// A proxy following `table`.
    pub fn new(table: watch::Receiver<Backends>) -> Self {
        Self { table }
    }

    /// Serve until `stop` turns true. Bind failures are logged once per
    /// address and retried (another program may hold the port for a while).
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut listeners: BTreeMap<SocketAddr, Listener> = BTreeMap::new();
        let mut failing: std::collections::BTreeSet<SocketAddr> = Default::default();
        loop {
            let table = self.table.borrow_and_update().clone();
            failing.retain(|a| table.contains_key(a));
            listeners.retain(|addr, l| {
                let keep = table.contains_key(addr);
                if !keep {
                    l.task.abort();
                }
                keep
            });
            for (addr, backends) in table {
                if let Some(l) = listeners.get(&addr) {
                    l.backends.send_replace(backends);
                    continue;
                }
                match std::net::TcpListener::bind(addr).and_then(|l| {
                    l.set_nonblocking(true)?;
                    TcpListener::from_std(l)
                }) {
                    Ok(listener) => {
                        tracing::info!(%addr, "proxy listening");
                        failing.remove(&addr);
                        let (tx, rx) = watch::channel(backends);
                        let task = tokio::spawn(accept_loop(listener, rx));
                        listeners.insert(addr, Listener { task, backends: tx });
                    }
                    Err(e) => {
                        if failing.insert(addr) {
                            tracing::warn!(%addr, error = %e, "proxy cannot listen (retrying)");
                        }
                    }
                }
            }
            let retry = async {
                if failing.is_empty() {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(BIND_RETRY).await;
            };
            tokio::select! {
                changed = self.table.changed() => if changed.is_err() { break },
                _ = stop.wait_for(|s| *s) => break,
                () = retry => {}
            }
        }
        for l in listeners.into_values() {
            l.task.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, backends: watch::Receiver<Vec<SocketAddr>>) {
    let next = Arc::new(AtomicUsize::new(0));
    loop {
        let (client, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let candidates = backends.borrow().clone();
        let start = next.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            if let Some(mut upstream) = connect_any(&candidates, start).await {
                let mut client = client;
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                let _ = copy_bidirectional(&mut client, &mut upstream).await;
            }
        });
    }
}

/// Try the backends round-robin from `start`; the first that accepts wins.
async fn connect_any(candidates: &[SocketAddr], start: usize) -> Option<TcpStream> {
    let n = candidates.len();
    for i in 0..n {
        let addr = candidates[(start + i) % n];
        if let Ok(Ok(s)) = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            return Some(s);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn echo_server(tag: u8) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1];
                    if s.read_exact(&mut buf).await.is_ok() {
                        let _ = s.write_all(&[tag]).await;
                    }
                });
            }
        });
        addr
    }

    async fn ask(addr: SocketAddr) -> Option<u8> {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"?").await.ok()?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.ok()?;
        Some(b[0])
    }

    #[tokio::test]
    async fn balances_and_follows_table_changes() {
        let a = echo_server(b'a').await;
        let b = echo_server(b'b').await;
        // Find a free port for the published side.
        let published = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (tx, rx) = watch::channel(Backends::from([(published, vec![a, b])]));
        let (stop_tx, stop_rx) = watch::channel(false);
        let proxy = tokio::spawn(PortProxy::new(rx).run(stop_rx));
        let mut seen = Vec::new();
        for _ in 0..50 {
            if let Some(t) = ask(published).await {
                seen.push(t);
                if seen.len() == 4 {
                    break;
                }
            } else {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        assert!(
            seen.contains(&b'a') && seen.contains(&b'b'),
            "round-robin: {seen:?}"
        );

        // A dead backend is skipped.
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        tx.send_replace(Backends::from([(published, vec![dead, b])]));
        tokio::time::sleep(Duration::from_millis(20)).await;
        for _ in 0..4 {
            assert_eq!(ask(published).await, Some(b'b'));
        }
        // A listener whose port is taken opens once the port is free.
        let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = holder.local_addr().unwrap();
        tx.send_replace(Backends::from([(published, vec![b]), (taken, vec![a])]));
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(holder);
        let mut got = None;
        for _ in 0..60 {
            got = ask(taken).await;
            if got.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(got, Some(b'a'), "retried bind after the port was freed");
        // No backends: connection closed, not hung.
        tx.send_replace(Backends::from([(published, vec![])]));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(ask(published).await, None);
        stop_tx.send_replace(true);
        proxy.await.unwrap();
    }
}
