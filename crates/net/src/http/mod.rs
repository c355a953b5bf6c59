//! The HTTP router: a reverse proxy routing by host and path prefix to a
//! service's instances.
//!
//! Layout:
//! - [`table`]: [`RouteTable`] (what the server hands in) and its compiled
//!   lookup form.
//! - `balance`: round-robin / power-of-two-choices, the circuit breaker,
//!   the bulkhead — lock-free per-request bookkeeping.
//! - `proxy`: one request's path through the router (routing, header
//!   rewriting, retries, the breaker, upgrades), shared by both server
//!   sides, and the hyper (HTTP/2) server side.
//! - `h1`: the router's own HTTP/1.1 server side (`httparse`, reused
//!   buffers, one timer per connection); it hands h2c prior-knowledge
//!   connections to hyper.
//! - `upstream`: the router's own HTTP/1.1 client: keep-alive connections
//!   to instances, pooled per serving thread, driven from the request's own
//!   task; a connection returns to the pool when its response body has
//!   ended.
//! - `codec`: byte-level HTTP/1.1 (response heads via `httparse`, body
//!   framing, the chunked decoder), pure and property-tested.
//! - `error`: the one place router failures become HTTP responses;
//!   `date`: their `Date` header, formatted once per second per thread.
//! - [`metrics`]: counters and the [`RouterMetrics`] snapshot.
//! - [`tls`]: certificates from PEM files.
//!
//! Clients speak HTTP/1.1 or HTTP/2 (h2c prior knowledge, or ALPN over
//! TLS); instances are reached over HTTP/1.1 with pooled keep-alive
//! connections. HTTP/1.1 connections (plain, or TLS without ALPN h2) are
//! served by the router's own codec (`h1`); hyper serves HTTP/2. The route table arrives through a `watch` channel; each
//! change is compiled once and swapped in atomically, and every request
//! reads whichever table is current when it arrives, so a change never
//! touches connections or requests already running.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use std::collections::HashMap;
//! use berth_net::http::*;
//! let web = ServiceId::new("default", "shop", "web");
//! let table = RouteTable::new(
//!     vec![Route::host("web.shop.localhost", web.clone())],
//!     HashMap::from([(web, ServiceBackends {
//!         backends: vec![Backend { addr: "127.0.0.1:5000".parse().unwrap(), id: "web-1".into() }],
//!         ..Default::default()
//!     })]),
//! );
//! let (_tx, rx) = tokio::sync::watch::channel(table);
//! let router = Router::new(rx, RouterConfig::default());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! router.serve(listener, std::future::pending()).await
//! # }
//! ```

mod balance;
mod body;
mod codec;
mod date;
mod error;
mod h1;
pub mod metrics;
mod proxy;
pub mod table;
pub mod tls;
mod upstream;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

pub use body::{ProxiedBody, RespBody};
pub use error::ProxyError;
pub use metrics::{RouteSnapshot, RouterMetrics, ServiceSnapshot};
pub use table::{Backend, LbPolicy, Route, RouteTable, ServiceBackends, ServiceId};
pub use tls::{TlsError, load_tls};

use balance::{BackendState, BreakerConfig, Clock, ServiceShared, ServiceState};
use metrics::GlobalMetrics;
use table::Compiled;
use upstream::Upstream;

/// Router tuning. The defaults suit a single machine.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// Longest wait for an instance's response headers before answering 504.
    pub upstream_timeout: Duration,
    /// Longest wait for a TCP connection to an instance.
    pub connect_timeout: Duration,
    /// Consecutive failures (connect errors, timeouts, broken connections)
    /// after which an instance is ejected.
    pub failure_threshold: u32,
    /// First ejection's cool-down; each further ejection without a success
    /// in between doubles it …
    pub base_ejection: Duration,
    /// … up to this.
    pub max_ejection: Duration,
    /// Count 5xx responses from the app as failures for the breaker too.
    pub eject_on_5xx: bool,
    /// On shutdown, how long in-flight requests may take to finish.
    pub shutdown_grace: Duration,
    /// How long an idle pooled connection to an instance is kept.
    pub pool_idle_timeout: Duration,
    /// Longest TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Longest wait for a request head, counted from when the router
    /// starts waiting for it (also between requests on a kept-alive
    /// connection): against clients that send heads slowly or never.
    pub header_read_timeout: Duration,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            upstream_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(2),
            failure_threshold: 5,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(60),
            eject_on_5xx: false,
            shutdown_grace: Duration::from_secs(10),
            pool_idle_timeout: Duration::from_secs(60),
            tls_handshake_timeout: Duration::from_secs(10),
            // hyper's default.
            header_read_timeout: Duration::from_secs(30),
        }
    }
}

/// The HTTP router. Cheap to clone; every clone serves the same table,
/// pools and counters. Dropping the last clone stops following the table.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) table: Arc<ArcSwap<Compiled>>,
    pub(crate) config: RouterConfig,
    pub(crate) breaker: BreakerConfig,
    pub(crate) clock: Clock,
    pub(crate) global: GlobalMetrics,
    registry: Arc<Mutex<Registry>>,
    follower: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

/// Per-service and per-backend state that outlives one table generation.
#[derive(Default)]
struct Registry {
    services: HashMap<ServiceId, Arc<ServiceShared>>,
    backends: HashMap<(ServiceId, SocketAddr), Arc<BackendState>>,
}

impl Registry {
    /// Compile `table`, reusing the state of services and backends it keeps
    /// and forgetting the rest.
    fn compile(&mut self, table: &RouteTable) -> Compiled {
        let mut services = HashMap::new();
        let mut backends = HashMap::new();
        let compiled = Compiled::build(table, |id, cfg| {
            let shared = self
                .services
                .get(id)
                .cloned()
                .unwrap_or_else(|| Arc::new(ServiceShared::new(id)));
            services.insert(id.clone(), shared.clone());
            let list = cfg
                .map(|c| c.backends.as_slice())
                .unwrap_or_default()
                .iter()
                .map(|b| {
                    let key = (id.clone(), b.addr);
                    let state = match self.backends.get(&key) {
                        Some(s) if s.id == b.id => s.clone(),
                        _ => Arc::new(BackendState::new(b)),
                    };
                    backends.insert(key, state.clone());
                    state
                })
                .collect();
            Arc::new(ServiceState::new(id.clone(), cfg, shared, list))
        });
        self.services = services;
        self.backends = backends;
        compiled
    }
}

impl Router {
    /// A router following `table`. Must be called inside a Tokio runtime
    /// (it spawns the task that compiles table changes).
    pub fn new(mut table: watch::Receiver<RouteTable>, config: RouterConfig) -> Self {
        let registry = Arc::new(Mutex::new(Registry::default()));
        let first = {
            let t = table.borrow_and_update().clone();
            lock(&registry).compile(&t)
        };
        let swap = Arc::new(ArcSwap::from_pointee(first));
        let follower = tokio::spawn({
            let swap = swap.clone();
            let registry = registry.clone();
            async move {
                while table.changed().await.is_ok() {
                    let t = table.borrow_and_update().clone();
                    let compiled = lock(&registry).compile(&t);
                    swap.store(Arc::new(compiled));
                    tracing::debug!(routes = t.routes().len(), "route table updated");
                    // For bench/propagation.sh HOPS=1 (wall clock: the
                    // harness compares it with other processes' stamps).
                    let at_us = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
                    tracing::debug!(target: "berth_hops", hop = "router", at_us);
                }
            }
        });

        let breaker = BreakerConfig {
            failure_threshold: config.failure_threshold.max(1),
            base_ejection: config.base_ejection,
            max_ejection: config.max_ejection.max(config.base_ejection),
        };
        Self {
            inner: Arc::new(Inner {
                table: swap,
                config,
                breaker,
                clock: Clock::new(),
                global: GlobalMetrics::default(),
                registry,
                follower,
            }),
        }
    }

    /// Serve plain HTTP (HTTP/1.1 and h2c) on `listener` until `shutdown`
    /// completes; then stop accepting, let requests in flight finish for up
    /// to [`RouterConfig::shutdown_grace`], and close what is left.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        self.serve_inner(listener, None, shutdown).await
    }

    /// Serve HTTPS (HTTP/1.1 and HTTP/2 by ALPN) on `listener`, terminating
    /// TLS with `tls` (see [`load_tls`]). Shutdown as [`Router::serve`].
    pub async fn serve_tls(
        &self,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        self.serve_inner(listener, Some(acceptor), shutdown).await
    }

    /// A connection pool to instances. Each serve call has its own, so
    /// that pooled connections stay on the runtime (thread) that uses them.
    fn upstream(&self) -> Arc<Upstream> {
        let config = &self.inner.config;
        Arc::new(Upstream::new(
            config.connect_timeout,
            config.pool_idle_timeout,
        ))
    }

    /// The counters now.
    pub fn metrics(&self) -> RouterMetrics {
        let g = &self.inner.global;
        let registry = lock(&self.inner.registry);
        let mut services: Vec<ServiceSnapshot> = registry
            .services
            .values()
            .map(|s| {
                let ejected = registry
                    .backends
                    .iter()
                    .filter(|((id, _), b)| *id == s.metrics.id && b.is_ejected(&self.inner.clock))
                    .count();
                s.metrics.snapshot(
                    u64::from(s.in_flight.load(Ordering::Relaxed)),
                    ejected as u64,
                )
            })
            .collect();
        services.sort_by(|a, b| a.service.cmp(&b.service));
        RouterMetrics {
            connections_accepted: g.connections_accepted.load(Ordering::Relaxed),
            connections_active: g.connections_active.load(Ordering::Relaxed),
            no_route: g.no_route.load(Ordering::Relaxed),
            services,
        }
    }

    /// Serve plain HTTP on `addr` from `threads` OS threads, each running a
    /// single-threaded runtime with its own `SO_REUSEPORT` listener and its
    /// own connection pool: the kernel spreads connections over the threads
    /// and a request never crosses threads, which saves the wake-ups a
    /// work-stealing runtime pays per request. Returns once every listener
    /// is bound (port 0 is resolved once and shared); the threads stop when
    /// `shutdown` turns true.
    pub fn serve_on_threads(
        &self,
        addr: SocketAddr,
        threads: usize,
        shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<ThreadedServer> {
        let mut addr = addr;
        let mut listeners = Vec::new();
        for _ in 0..threads.max(1) {
            let l = reuseport_listener(addr)?;
            addr = l.local_addr()?;
            listeners.push(l);
        }
        let mut handles = Vec::new();
        for (i, l) in listeners.into_iter().enumerate() {
            let router = self.clone();
            let mut stop = shutdown.clone();
            let handle = std::thread::Builder::new()
                .name(format!("berth-router-{i}"))
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(async move {
                        let listener = TcpListener::from_std(l)?;
                        router
                            .serve(listener, async move {
                                let _ = stop.wait_for(|s| *s).await;
                            })
                            .await
                    })
                })?;
            handles.push(handle);
        }
        Ok(ThreadedServer { addr, handles })
    }

    async fn serve_inner(
        &self,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let upstream = self.upstream();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.inner.config.header_read_timeout);
        builder.http2().timer(TokioTimer::new());
        let builder = Arc::new(builder);
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        // For the router's own HTTP/1.1 connections (hyper's are told by
        // `graceful`).
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut conns = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "router accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let inner = self.inner.clone();
            let upstream = upstream.clone();
            let builder = builder.clone();
            let watcher = graceful.watcher();
            let tls = tls.clone();
            let stop = stop_rx.clone();
            conns.spawn(async move {
                let _active = ActiveConnection::new(inner.clone());
                match tls {
                    None => {
                        let serve = h1::Serve {
                            inner,
                            upstream,
                            builder,
                            watcher,
                            stop,
                        };
                        h1::serve(serve, stream, peer, false).await
                    }
                    Some(acceptor) => {
                        let timeout = inner.config.tls_handshake_timeout;
                        match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                            Ok(Ok(s)) if s.get_ref().1.alpn_protocol() == Some(b"h2") => {
                                serve_connection(inner, upstream, &builder, watcher, s, peer, true)
                                    .await
                            }
                            Ok(Ok(s)) => {
                                let serve = h1::Serve {
                                    inner,
                                    upstream,
                                    builder,
                                    watcher,
                                    stop,
                                };
                                h1::serve(serve, s, peer, true).await
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed")
                            }
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    }
                }
            });
        }
        drop(listener);
        let grace = self.inner.config.shutdown_grace;
        let _ = stop_tx.send(true);
        let drained = async {
            graceful.shutdown().await;
            while conns.join_next().await.is_some() {}
        };
        if tokio::time::timeout(grace, drained).await.is_err() {
            tracing::warn!(
                remaining = conns.len(),
                "router shutdown grace period over; closing remaining connections"
            );
        }
        conns.shutdown().await;
        Ok(())
    }
}

pub(crate) async fn serve_connection<IO>(
    inner: Arc<Inner>,
    upstream: Arc<Upstream>,
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    io: IO,
    peer: SocketAddr,
    tls: bool,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(proxy::ConnInfo::new(peer, tls, upstream));
    let service = hyper::service::service_fn(move |req| {
        let inner = inner.clone();
        let conn = conn.clone();
        async move { Ok::<_, std::convert::Infallible>(proxy::handle(&inner, &conn, req).await) }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}

/// The threads started by [`Router::serve_on_threads`].
pub struct ThreadedServer {
    addr: SocketAddr,
    handles: Vec<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl ThreadedServer {
    /// The address every thread listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Wait for every thread to stop (after shutdown); the first error wins.
    pub fn join(self) -> std::io::Result<()> {
        let mut result = Ok(());
        for h in self.handles {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("router thread panicked")));
            if result.is_ok() {
                result = r;
            }
        }
        result
    }
}

fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Counts an open client connection while alive.
struct ActiveConnection(Arc<Inner>);

impl ActiveConnection {
    fn new(inner: Arc<Inner>) -> Self {
        let g = &inner.global;
        g.connections_accepted.fetch_add(1, Ordering::Relaxed);
        g.connections_active.fetch_add(1, Ordering::Relaxed);
        Self(inner)
    }
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.0
            .global
            .connections_active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// The registry lock guards only compile and snapshot work, never a
/// request; a panic while holding it leaves data that is still consistent
/// enough to read, so poisoning is ignored.
fn lock(m: &Mutex<Registry>) -> std::sync::MutexGuard<'_, Registry> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
