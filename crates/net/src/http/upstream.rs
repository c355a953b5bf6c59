//! Connections to instances: HTTP/1.1 keep-alive, pooled per serving
//! runtime.
//!
//! Each `serve` call (one per router thread) owns one [`Upstream`], so a
//! pooled connection is only ever used by the thread that opened it. A
//! request takes an idle connection to its instance (the most recently
//! used one, whose buffers are warm) or opens one, and holds it as a
//! [`Lease`] until the response body has been passed on completely; only
//! then does the connection go back to the pool. A body that ends early
//! (the client went away) drops the connection instead: its state is
//! unknown.
//!
//! Compared with hyper-util's general-purpose client this does no per
//! request URI rewriting, key hashing or boxing, and spawns no task per
//! request to wait for the connection to become idle: a connection that
//! is not idle yet when taken is waited for by the request that takes it.
//!
//! A connection's I/O runs in its own task, started when it is opened; the
//! task ends when the instance closes the connection or when the pool (or
//! a lease) drops the connection's sender.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::http::UpstreamBody;

/// Idle connections kept per instance; more are closed when returned.
const MAX_IDLE_PER_INSTANCE: usize = 1024;

/// Why a request did not get a response from an instance.
#[derive(Debug)]
pub(crate) enum UpstreamError {
    /// No connection could be opened (refused, unreachable, timed out):
    /// the request never reached the instance.
    Connect(std::io::Error),
    /// The connection broke or the instance answered something that is not
    /// HTTP.
    Request(hyper::Error),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Connect(e) => write!(f, "connect: {e}"),
            UpstreamError::Request(e) => write!(f, "{e}"),
        }
    }
}

/// A pool of connections to instances, for one serving runtime.
pub(crate) struct Upstream {
    pool: Arc<Pool>,
    reaper: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.reaper.abort();
    }
}

struct Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

struct Idle {
    sender: SendRequest<UpstreamBody>,
    since: Instant,
}

impl Upstream {
    /// A pool whose idle connections close after `idle_timeout`. Must be
    /// called inside the runtime that will use it (it starts the task that
    /// closes idle connections).
    pub(crate) fn new(connect_timeout: Duration, idle_timeout: Duration) -> Self {
        let pool = Arc::new(Pool {
            idle: Mutex::new(HashMap::new()),
            connect_timeout,
            idle_timeout,
        });
        let weak: Weak<Pool> = Arc::downgrade(&pool);
        let every = (idle_timeout / 2).max(Duration::from_millis(100));
        let reaper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { return };
                pool.sweep();
            }
        });
        Self { pool, reaper }
    }

    /// Send `req` (origin-form URI, `Host` set) to the instance at `addr`.
    /// A pooled connection that turns out closed before the request was
    /// written is skipped, so only requests that may have reached the
    /// instance fail with [`UpstreamError::Request`].
    pub(crate) async fn send(
        &self,
        addr: SocketAddr,
        mut req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Lease), UpstreamError> {
        loop {
            let (mut sender, reused) = match self.pool.checkout(addr) {
                Some(s) => (s, true),
                None => (self.connect(addr).await?, false),
            };
            if reused && !sender.is_ready() && sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let lease = Lease {
                        pool: self.pool.clone(),
                        addr,
                        sender: Some(sender),
                    };
                    return Ok((resp, lease));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(UpstreamError::Request(e.into_error())),
                },
            }
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<SendRequest<UpstreamBody>, UpstreamError> {
        let stream =
            match tokio::time::timeout(self.pool.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(UpstreamError::Connect(e)),
                Err(_) => {
                    return Err(UpstreamError::Connect(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no connection within {:?}", self.pool.connect_timeout),
                    )));
                }
            };
        // Requests and responses are small and written whole: never wait
        // for an ACK before sending.
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Request)?;
        // Owned by `sender`: the task ends when the connection closes or
        // every sender is dropped.
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%addr, error = %e, "connection to instance ended with an error");
            }
        });
        Ok(sender)
    }
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Vec<Idle>>> {
        // Only plain pushes and pops happen under the lock.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn checkout(&self, addr: SocketAddr) -> Option<SendRequest<UpstreamBody>> {
        let mut idle = self.lock();
        let list = idle.get_mut(&addr)?;
        while let Some(c) = list.pop() {
            if !c.sender.is_closed() {
                return Some(c.sender);
            }
        }
        None
    }

    fn put(&self, addr: SocketAddr, sender: SendRequest<UpstreamBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        let list = idle.entry(addr).or_default();
        if list.len() < MAX_IDLE_PER_INSTANCE {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Close connections idle for longer than the timeout, forget closed
    /// ones and instances without any.
    fn sweep(&self) {
        let mut idle = self.lock();
        let timeout = self.idle_timeout;
        idle.retain(|_, list| {
            list.retain(|c| !c.sender.is_closed() && c.since.elapsed() < timeout);
            !list.is_empty()
        });
    }
}

/// A connection in use by one request; [`Lease::release`] returns it to
/// the pool, dropping it closes it.
pub(crate) struct Lease {
    pool: Arc<Pool>,
    addr: SocketAddr,
    sender: Option<SendRequest<UpstreamBody>>,
}

impl Lease {
    /// The response has been read to its end: the connection can take the
    /// next request.
    pub(crate) fn release(&mut self) {
        if let Some(s) = self.sender.take() {
            self.pool.put(self.addr, s);
        }
    }
}
