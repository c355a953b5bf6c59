//! [`DnsServer`]: the UDP and TCP listeners on one address, feeding
//! queries to the pure responder with whichever zone is current.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use super::answer::{Shape, respond};
use super::metrics::{Counters, DnsMetrics, Transport};
use super::zone::Zone;

/// Consul's DNS address, which tools and habits already point at.
pub const DEFAULT_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8600));
/// Longest TTL the server accepts.
pub const MAX_TTL: u32 = 5;
/// Largest UDP query accepted; EDNS clients may send big ones, nobody
/// sends more than this.
const UDP_RECV_BUF: usize = 4096;
/// A TCP client that sends nothing for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Concurrent TCP connections; more wait in the kernel's accept queue.
const TCP_MAX_CONNECTIONS: usize = 512;

/// Invalid [`DnsServer`] settings.
#[derive(Debug, thiserror::Error)]
pub enum DnsConfigError {
    /// The TTL is above [`MAX_TTL`]: longer caching would keep failed
    /// instances in clients' answers after they left the catalog.
    #[error(
        "DNS TTL {0}s is too long: at most {MAX_TTL}s, so that unhealthy instances leave clients' caches quickly"
    )]
    TtlTooLong(u32),
}

/// An authoritative DNS server for `berth.` on UDP and TCP.
///
/// TTL defaults to 0, as Consul's: answers are computed from the live
/// catalog in microseconds, and the catalog's promise — an instance whose
/// health check fails is gone — only holds if nobody caches it.
/// systemd-resolved and dnsmasq honour 0 by not caching.
pub struct DnsServer {
    udp: Arc<UdpSocket>,
    tcp: TcpListener,
    ttl: u32,
    counters: Arc<Counters>,
}

impl DnsServer {
    /// Bind UDP and TCP on `addr`. With port 0 both get the same ephemeral
    /// port (the UDP one, then TCP tried on it; retried a few times if TCP
    /// finds it taken).
    pub async fn bind(addr: SocketAddr) -> io::Result<Self> {
        let mut last_err = None;
        for _ in 0..if addr.port() == 0 { 16 } else { 1 } {
            let udp = UdpSocket::bind(addr).await?;
            let bound = udp.local_addr()?;
            match TcpListener::bind(bound).await {
                Ok(tcp) => {
                    return Ok(DnsServer {
                        udp: Arc::new(udp),
                        tcp,
                        ttl: 0,
                        counters: Arc::default(),
                    });
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("could not bind DNS listeners")))
    }

    /// Set the TTL of every answer, 0 to [`MAX_TTL`] seconds.
    pub fn with_ttl(mut self, ttl_secs: u32) -> Result<Self, DnsConfigError> {
        if ttl_secs > MAX_TTL {
            return Err(DnsConfigError::TtlTooLong(ttl_secs));
        }
        self.ttl = ttl_secs;
        Ok(self)
    }

    /// The UDP listener's address.
    pub fn udp_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    /// The TCP listener's address (same port as UDP).
    pub fn tcp_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// A handle on the query counters, valid after `run` consumes the server.
    pub fn metrics(&self) -> DnsMetrics {
        DnsMetrics::new(self.counters.clone())
    }

    /// Serve until `shutdown` turns true (or its sender is dropped). Every
    /// query reads the zone current at its arrival; a zone update never
    /// waits for queries in flight. All tasks are owned here and stopped
    /// on return.
    pub async fn run(self, zone: watch::Receiver<Arc<Zone>>, mut shutdown: watch::Receiver<bool>) {
        let rotate = Arc::new(AtomicUsize::new(0));
        let mut tasks = JoinSet::new();
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
        for _ in 0..workers {
            tasks.spawn(udp_worker(
                self.udp.clone(),
                zone.clone(),
                self.ttl,
                rotate.clone(),
                self.counters.clone(),
            ));
        }
        tasks.spawn(tcp_accept(self.tcp, zone, self.ttl, rotate, self.counters));
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => {}
            Some(res) = tasks.join_next() => {
                // The loops never return; a panic here is a bug worth seeing.
                if let Err(e) = res {
                    tracing::error!(error = %e, "DNS server task failed");
                }
            }
        }
        tasks.shutdown().await;
    }
}

async fn udp_worker(
    socket: Arc<UdpSocket>,
    zone: watch::Receiver<Arc<Zone>>,
    ttl: u32,
    rotate: Arc<AtomicUsize>,
    counters: Arc<Counters>,
) {
    let mut buf = vec![0u8; UDP_RECV_BUF];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // Linux reports ICMP errors of earlier sends here; nothing to
                // do but not spin if the socket is really broken.
                tracing::debug!(error = %e, "DNS UDP receive failed");
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        let current = zone.borrow().clone();
        let shape = Shape {
            ttl,
            udp: true,
            rotate: rotate.fetch_add(1, Ordering::Relaxed),
        };
        let outcome = respond(&buf[..n], &current, shape);
        counters.record(Transport::Udp, &outcome);
        if let Some(reply) = outcome.reply
            && let Err(e) = socket.send_to(&reply, peer).await
        {
            tracing::debug!(%peer, error = %e, "DNS UDP send failed");
        }
    }
}

async fn tcp_accept(
    listener: TcpListener,
    zone: watch::Receiver<Arc<Zone>>,
    ttl: u32,
    rotate: Arc<AtomicUsize>,
    counters: Arc<Counters>,
) {
    let permits = Arc::new(Semaphore::new(TCP_MAX_CONNECTIONS));
    // Owned here, so aborting this task closes every connection.
    let mut conns = JoinSet::new();
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let stream = loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((s, _)) => break s,
                    Err(e) => {
                        tracing::warn!(error = %e, "DNS TCP accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                // Reap finished connections so the set does not grow.
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        };
        let (zone, rotate, counters) = (zone.clone(), rotate.clone(), counters.clone());
        conns.spawn(async move {
            if let Err(e) = tcp_connection(stream, zone, ttl, rotate, counters).await {
                tracing::debug!(error = %e, "DNS TCP connection ended");
            }
            drop(permit);
        });
    }
}

/// RFC 7766: a connection may carry many queries, each prefixed by its
/// 2-byte length; answered in order.
async fn tcp_connection(
    mut stream: TcpStream,
    zone: watch::Receiver<Arc<Zone>>,
    ttl: u32,
    rotate: Arc<AtomicUsize>,
    counters: Arc<Counters>,
) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => r?,
        };
        buf.resize(u16::from_be_bytes(len) as usize, 0);
        tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut buf))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "query body not sent"))??;
        let current = zone.borrow().clone();
        let shape = Shape {
            ttl,
            udp: false,
            rotate: rotate.fetch_add(1, Ordering::Relaxed),
        };
        let outcome = respond(&buf, &current, shape);
        counters.record(Transport::Tcp, &outcome);
        let Some(reply) = outcome.reply else {
            // Garbage on a stream: nothing sensible can follow it.
            return Ok(());
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&(reply.len() as u16).to_be_bytes());
        framed.extend_from_slice(&reply);
        stream.write_all(&framed).await?;
    }
}
