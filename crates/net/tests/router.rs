//! The HTTP router over real sockets on 127.0.0.1: real hyper backends
//! started here, real clients (HTTP/1.1, HTTP/2 prior knowledge, raw TCP
//! for upgrades, rustls for TLS).

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use berth_net::http::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

// ---------- backends ----------

/// A test instance: answers with its name in `x-backend` and echoes what
/// it saw in `x-seen-*` headers. `/slow?ms=N` sleeps first; `/ws` switches
/// protocols and echoes bytes.
struct TestBackend {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    /// Connections accepted.
    conns: Arc<AtomicUsize>,
    _stop: oneshot::Sender<()>,
}

async fn backend(name: &'static str) -> TestBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    backend_on(name, listener)
}

fn backend_on(name: &'static str, listener: TcpListener) -> TestBackend {
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let conns = Arc::new(AtomicUsize::new(0));
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    let h = hits.clone();
    let c = conns.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = &mut stop_rx => return,
                a = listener.accept() => a.unwrap(),
            };
            c.fetch_add(1, Ordering::SeqCst);
            let h = h.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    h.fetch_add(1, Ordering::SeqCst);
                    serve_backend(name, req)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    TestBackend {
        addr,
        hits,
        conns,
        _stop: stop_tx,
    }
}

async fn serve_backend(
    name: &'static str,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == "/ws" {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let up = on.await.unwrap();
            let mut io = TokioIo::new(up);
            let mut buf = [0u8; 1024];
            loop {
                let n = io.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                io.write_all(&buf[..n]).await.unwrap();
            }
        });
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "echo")
            .body(Full::new(Bytes::new()))
            .unwrap());
    }
    if req.uri().path() == "/slow" {
        let ms: u64 = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("ms="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(500);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut resp = Response::builder()
        .header("x-backend", name)
        .header("x-seen-path", req.uri().to_string());
    for h in [
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "forwarded",
        "x-secret",
        "connection",
    ] {
        if let Some(v) = req.headers().get(h) {
            resp = resp.header(format!("x-seen-{h}"), v.clone());
        }
    }
    let body = req.into_body().collect().await.unwrap().to_bytes();
    Ok(resp
        .body(Full::new(Bytes::from(format!("{name} {}", body.len()))))
        .unwrap())
}

/// Wait until `hits` reaches `n` (a request sent from another task got to
/// its backend), failing after 10 s: a fixed sleep is not enough on a
/// loaded machine.
async fn until_hits(hits: &AtomicUsize, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while hits.load(Ordering::SeqCst) < n {
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {n} requests reached the backend within 10 s",
            hits.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// An address nothing listens on.
async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

// ---------- router ----------

fn id(service: &str) -> ServiceId {
    ServiceId::new("default", "s", service)
}

fn svc(addrs: &[SocketAddr]) -> ServiceBackends {
    ServiceBackends {
        backends: addrs
            .iter()
            .enumerate()
            .map(|(i, a)| Backend {
                addr: *a,
                id: format!("i{i}"),
            })
            .collect(),
        ..Default::default()
    }
}

fn one_service_table(service: ServiceBackends) -> RouteTable {
    RouteTable::new(
        vec![Route::host("web.test", id("web"))],
        HashMap::from([(id("web"), service)]),
    )
}

struct TestRouter {
    addr: SocketAddr,
    table: watch::Sender<RouteTable>,
    router: Router,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start_router(table: RouteTable, config: RouterConfig) -> TestRouter {
    let (tx, rx) = watch::channel(table);
    let router = Router::new(rx, config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let r = router.clone();
    let done = tokio::spawn(async move {
        r.serve(listener, async {
            let _ = stop_rx.await;
        })
        .await
    });
    TestRouter {
        addr,
        table: tx,
        router,
        stop: Some(stop_tx),
        done,
    }
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

struct Answer {
    status: StatusCode,
    headers: hyper::HeaderMap,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
}

async fn send(
    c: &Client<HttpConnector, Full<Bytes>>,
    router: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    body: &'static str,
) -> Answer {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{router}{path}"))
        .header("host", host)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn get(
    c: &Client<HttpConnector, Full<Bytes>>,
    router: SocketAddr,
    host: &str,
    path: &str,
) -> Answer {
    send(c, router, "GET", host, path, "").await
}

// ---------- routing ----------

#[tokio::test]
async fn routes_by_exact_host_wildcard_and_longest_prefix() {
    let (a, b, c, d) = (
        backend("a").await,
        backend("b").await,
        backend("c").await,
        backend("d").await,
    );
    let table = RouteTable::new(
        vec![
            Route::host("api.example.com", id("a")),
            Route {
                host: "api.example.com".into(),
                path_prefix: "/v2".into(),
                service: id("b"),
                strip_prefix: false,
            },
            Route::host("*.example.com", id("c")),
            Route {
                host: "*".into(),
                path_prefix: "/static/".into(),
                service: id("d"),
                strip_prefix: true,
            },
        ],
        HashMap::from([
            (id("a"), svc(&[a.addr])),
            (id("b"), svc(&[b.addr])),
            (id("c"), svc(&[c.addr])),
            (id("d"), svc(&[d.addr])),
        ]),
    );
    let r = start_router(table, RouterConfig::default()).await;
    let cl = client();
    let cases = [
        ("api.example.com", "/", "a", "/"),
        ("API.Example.com:1234", "/v2/x?q=1", "b", "/v2/x?q=1"),
        ("api.example.com", "/v2", "b", "/v2"),
        ("api.example.com", "/v2x", "a", "/v2x"),
        ("foo.example.com", "/v2", "c", "/v2"),
        ("a.b.example.com", "/", "c", "/"),
        ("other.test", "/static/app.js?v=3", "d", "/app.js?v=3"),
        ("other.test", "/static", "d", "/"),
        // An exact host whose own routes match no path falls through to
        // the any-host routes.
        ("api.example.com", "/static/x", "a", "/static/x"),
    ];
    for (host, path, want, seen_path) in cases {
        let ans = get(&cl, r.addr, host, path).await;
        assert_eq!(ans.status, StatusCode::OK, "{host}{path}");
        assert_eq!(ans.header("x-backend"), want, "{host}{path}");
        assert_eq!(ans.header("x-seen-path"), seen_path, "{host}{path}");
    }
    for (host, path) in [
        ("example.com", "/"),
        ("other.test", "/"),
        ("other.test", "/staticx"),
    ] {
        let ans = get(&cl, r.addr, host, path).await;
        assert_eq!(ans.status, StatusCode::NOT_FOUND, "{host}{path}");
        assert_eq!(
            ans.body.trim(),
            format!("no route for host {host} path {path}")
        );
    }
    assert_eq!(r.router.metrics().no_route, 3);
}

#[tokio::test]
async fn round_robin_spreads_evenly() {
    let bs = [backend("a").await, backend("b").await, backend("c").await];
    let addrs: Vec<_> = bs.iter().map(|b| b.addr).collect();
    let r = start_router(one_service_table(svc(&addrs)), RouterConfig::default()).await;
    let cl = client();
    for _ in 0..30 {
        assert_eq!(
            get(&cl, r.addr, "web.test", "/").await.status,
            StatusCode::OK
        );
    }
    for b in &bs {
        assert_eq!(b.hits.load(Ordering::SeqCst), 10);
    }
    let m = r.router.metrics();
    let web = m.service(&id("web")).unwrap();
    assert_eq!(web.requests_by_class, [0, 30, 0, 0, 0]);
    assert_eq!(web.latency_buckets.iter().sum::<u64>(), 30);
}

#[tokio::test]
async fn requests_are_counted_per_route_across_table_changes() {
    let b = backend("a").await;
    let routes = |with_api: bool| {
        let mut v = vec![
            Route::host("web.test", id("web")),
            Route::host("empty.test", id("empty")),
        ];
        if with_api {
            v.push(Route {
                host: "*".into(),
                path_prefix: "/api/".into(),
                service: id("web"),
                strip_prefix: true,
            });
        }
        RouteTable::new(
            v,
            HashMap::from([(id("web"), svc(&[b.addr])), (id("empty"), svc(&[]))]),
        )
    };
    let r = start_router(routes(true), RouterConfig::default()).await;
    let cl = client();
    for _ in 0..3 {
        assert_eq!(
            get(&cl, r.addr, "web.test", "/").await.status,
            StatusCode::OK
        );
    }
    for _ in 0..2 {
        assert_eq!(
            get(&cl, r.addr, "x.test", "/api/x").await.status,
            StatusCode::OK
        );
    }
    let ans = get(&cl, r.addr, "empty.test", "/").await;
    assert_eq!(ans.status, StatusCode::SERVICE_UNAVAILABLE);

    let by_route = |m: &RouterMetrics, service: &str| -> Vec<(String, [u64; 5], u64)> {
        m.service(&id(service))
            .unwrap()
            .routes
            .iter()
            .map(|r| {
                (
                    r.route.clone(),
                    r.requests_by_class,
                    r.latency_buckets.iter().sum(),
                )
            })
            .collect()
    };
    let m = r.router.metrics();
    assert_eq!(
        by_route(&m, "web"),
        [
            ("*/api".to_owned(), [0, 2, 0, 0, 0], 2),
            ("web.test/".to_owned(), [0, 3, 0, 0, 0], 3),
        ]
    );
    assert_eq!(
        m.service(&id("web")).unwrap().requests_by_class,
        [0, 5, 0, 0, 0]
    );
    assert_eq!(
        by_route(&m, "empty"),
        [("empty.test/".to_owned(), [0, 0, 0, 0, 1], 1)]
    );

    // The /api route goes away: its counters stay (a counter never goes
    // backwards while its service exists), the others keep counting.
    r.table.send_replace(routes(false));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        get(&cl, r.addr, "x.test", "/api/x").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&cl, r.addr, "web.test", "/").await.status,
        StatusCode::OK
    );
    assert_eq!(
        by_route(&r.router.metrics(), "web"),
        [
            ("*/api".to_owned(), [0, 2, 0, 0, 0], 2),
            ("web.test/".to_owned(), [0, 4, 0, 0, 0], 4),
        ]
    );
}

#[tokio::test]
async fn connections_to_instances_are_kept_alive_and_reused() {
    let b = backend("a").await;
    let r = start_router(one_service_table(svc(&[b.addr])), RouterConfig::default()).await;
    let cl = client();
    for _ in 0..20 {
        assert_eq!(
            get(&cl, r.addr, "web.test", "/").await.status,
            StatusCode::OK
        );
        // A POST with a body and a HEAD (no body) return it to the pool too.
        let ans = send(&cl, r.addr, "POST", "web.test", "/", "12345").await;
        assert_eq!(ans.body, "a 5");
        let ans = send(&cl, r.addr, "HEAD", "web.test", "/", "").await;
        assert_eq!(ans.status, StatusCode::OK);
    }
    assert_eq!(b.hits.load(Ordering::SeqCst), 60);
    assert_eq!(b.conns.load(Ordering::SeqCst), 1, "one pooled connection");
    // Ten at once need ten connections; afterwards they are all reused.
    let burst = || {
        let cl = cl.clone();
        let addr = r.addr;
        async move {
            let all = (0..10).map(|_| {
                let cl = cl.clone();
                tokio::spawn(async move { get(&cl, addr, "web.test", "/slow?ms=100").await })
            });
            for t in all.collect::<Vec<_>>() {
                assert_eq!(t.await.unwrap().status, StatusCode::OK);
            }
        }
    };
    burst().await;
    let after_first = b.conns.load(Ordering::SeqCst);
    assert!(after_first <= 11, "{after_first}");
    burst().await;
    assert_eq!(b.conns.load(Ordering::SeqCst), after_first, "reused");
}

#[tokio::test]
async fn least_requests_prefers_the_idle_backend() {
    let (a, b) = (backend("a").await, backend("b").await);
    let mut s = svc(&[a.addr, b.addr]);
    s.policy = LbPolicy::LeastRequests;
    let r = start_router(one_service_table(s), RouterConfig::default()).await;
    let cl = client();
    // Long enough that the requests below run while it is in flight.
    let slow = {
        let cl = cl.clone();
        let addr = r.addr;
        tokio::spawn(async move { get(&cl, addr, "web.test", "/slow?ms=5000").await })
    };
    let (a_hits, b_hits) = (a.hits.clone(), b.hits.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    while a_hits.load(Ordering::SeqCst) + b_hits.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the slow request reached no backend"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let busy = if a.hits.load(Ordering::SeqCst) == 1 {
        "a"
    } else {
        "b"
    };
    for _ in 0..20 {
        if slow.is_finished() {
            break;
        }
        let ans = get(&cl, r.addr, "web.test", "/").await;
        assert_ne!(ans.header("x-backend"), busy, "went to the busy instance");
    }
    assert_eq!(slow.await.unwrap().header("x-backend"), busy);
}

// ---------- retries, breaker, bulkhead, timeouts ----------

#[tokio::test]
async fn connect_failure_is_retried_for_get_but_not_for_post() {
    let live = backend("live").await;
    let mut s = svc(&[dead_addr().await, live.addr]);
    s.retries = 1;
    let config = RouterConfig {
        failure_threshold: 1000,
        ..Default::default()
    };
    let r = start_router(one_service_table(s), config).await;
    let cl = client();
    for _ in 0..10 {
        let ans = get(&cl, r.addr, "web.test", "/").await;
        assert_eq!(ans.status, StatusCode::OK);
    }
    let mut failed = 0;
    for _ in 0..10 {
        let ans = send(&cl, r.addr, "POST", "web.test", "/", "payload").await;
        match ans.status {
            StatusCode::OK => assert_eq!(ans.body, "live 7"),
            StatusCode::BAD_GATEWAY => {
                failed += 1;
                assert!(ans.body.contains("cannot connect"), "{}", ans.body);
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!(
        failed, 5,
        "round robin sends every other POST to the dead instance"
    );
    assert_eq!(r.router.metrics().service(&id("web")).unwrap().retries, 5);
}

#[tokio::test]
async fn breaker_ejects_a_dead_backend_and_readmits_it() {
    const BASE: Duration = Duration::from_secs(2);
    let live = backend("live").await;
    let reserved = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = reserved.local_addr().unwrap();
    drop(reserved);
    let config = RouterConfig {
        failure_threshold: 2,
        base_ejection: BASE,
        ..Default::default()
    };
    let r = start_router(one_service_table(svc(&[dead, live.addr])), config).await;
    let cl = client();
    let mut errors = 0;
    // The ejection happens during these requests: its cool-down ends no
    // sooner than `before + BASE` and no later than `ejected_at + BASE`.
    let before = Instant::now();
    for _ in 0..4 {
        if get(&cl, r.addr, "web.test", "/").await.status != StatusCode::OK {
            errors += 1;
        }
    }
    assert_eq!(errors, 2, "two failures eject the dead instance");
    let m = r.router.metrics();
    let web = m.service(&id("web")).unwrap();
    assert_eq!((web.ejections, web.instances_ejected), (1, 1));
    let ejected_at = Instant::now();
    // During the cool-down nothing goes to the dead instance. Only requests
    // sent in its first half count (a loaded machine may be slow to send or
    // route them); all 20 normally are, in tens of milliseconds.
    let mut within = 0;
    for _ in 0..20 {
        if before.elapsed() >= BASE / 2 {
            break;
        }
        assert_eq!(
            get(&cl, r.addr, "web.test", "/").await.status,
            StatusCode::OK
        );
        within += 1;
    }
    assert!(within > 0, "no request was sent within the cool-down");

    // The instance comes back on the same address; after the cool-down a
    // trial request reaches it and it takes its share again.
    let revived = backend_on("revived", TcpListener::bind(dead).await.unwrap());
    tokio::time::sleep_until((ejected_at + BASE + Duration::from_millis(100)).into()).await;
    for _ in 0..10 {
        assert_eq!(
            get(&cl, r.addr, "web.test", "/").await.status,
            StatusCode::OK
        );
    }
    assert!(revived.hits.load(Ordering::SeqCst) >= 4, "readmitted");
    assert_eq!(
        r.router
            .metrics()
            .service(&id("web"))
            .unwrap()
            .instances_ejected,
        0
    );
}

#[tokio::test]
async fn bulkhead_answers_503_at_the_limit() {
    let b = backend("a").await;
    let mut s = svc(&[b.addr]);
    s.max_concurrent = Some(1);
    let r = start_router(one_service_table(s), RouterConfig::default()).await;
    let cl = client();
    let slow = {
        let cl = cl.clone();
        let addr = r.addr;
        tokio::spawn(async move { get(&cl, addr, "web.test", "/slow?ms=3000").await })
    };
    // The slow request holds the one slot once it reached the backend.
    until_hits(&b.hits, 1, "the slow request").await;
    let ans = get(&cl, r.addr, "web.test", "/").await;
    assert_eq!(ans.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        ans.body.trim(),
        "service web.s.default is at its concurrency limit (1)"
    );
    assert_eq!(slow.await.unwrap().status, StatusCode::OK);
    assert_eq!(
        get(&cl, r.addr, "web.test", "/").await.status,
        StatusCode::OK,
        "slot released"
    );
}

#[tokio::test]
async fn no_instance_is_503_and_slow_instance_is_504() {
    let b = backend("a").await;
    let table = RouteTable::new(
        vec![
            Route::host("web.test", id("web")),
            Route::host("empty.test", id("empty")),
        ],
        HashMap::from([(id("web"), svc(&[b.addr])), (id("empty"), svc(&[]))]),
    );
    let config = RouterConfig {
        upstream_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let r = start_router(table, config).await;
    let cl = client();
    let ans = get(&cl, r.addr, "empty.test", "/").await;
    assert_eq!(ans.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        ans.body.trim(),
        "no healthy instance of service empty.s.default"
    );
    let ans = get(&cl, r.addr, "web.test", "/slow?ms=2000").await;
    assert_eq!(ans.status, StatusCode::GATEWAY_TIMEOUT);
}

// ---------- table changes ----------

#[tokio::test]
async fn table_swap_does_not_cut_a_running_request() {
    let (a, b) = (backend("a").await, backend("b").await);
    let r = start_router(one_service_table(svc(&[a.addr])), RouterConfig::default()).await;
    let cl = client();
    let slow = {
        let cl = cl.clone();
        let addr = r.addr;
        tokio::spawn(async move { get(&cl, addr, "web.test", "/slow?ms=800").await })
    };
    // Swapped while the slow request is at `a`.
    until_hits(&a.hits, 1, "the slow request").await;
    r.table.send_replace(one_service_table(svc(&[b.addr])));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        get(&cl, r.addr, "web.test", "/").await.header("x-backend"),
        "b"
    );
    let ans = slow.await.unwrap();
    assert_eq!(ans.status, StatusCode::OK);
    assert_eq!(ans.header("x-backend"), "a");
}

#[tokio::test]
async fn keep_alive_connection_survives_a_table_swap() {
    let (a, b) = (backend("a").await, backend("b").await);
    let r = start_router(one_service_table(svc(&[a.addr])), RouterConfig::default()).await;
    let stream = TcpStream::connect(r.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = || {
        Request::builder()
            .uri("/")
            .header("host", "web.test")
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let first = send.send_request(req()).await.unwrap();
    assert_eq!(first.headers()["x-backend"], "a");
    first.into_body().collect().await.unwrap();
    r.table.send_replace(one_service_table(svc(&[b.addr])));
    tokio::time::sleep(Duration::from_millis(50)).await;
    send.ready().await.unwrap();
    let second = send.send_request(req()).await.unwrap();
    assert_eq!(second.headers()["x-backend"], "b");
    assert_eq!(
        r.router.metrics().connections_accepted,
        1,
        "same connection"
    );
}

// ---------- protocols ----------

#[tokio::test]
async fn websocket_style_upgrade_is_tunnelled() {
    let b = backend("a").await;
    let r = start_router(one_service_table(svc(&[b.addr])), RouterConfig::default()).await;
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: web.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut byte).await.unwrap(),
            1,
            "closed during handshake"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    for msg in [&b"hello"[..], b"over the tunnel"] {
        s.write_all(msg).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, msg);
    }
}

#[tokio::test]
async fn http2_prior_knowledge_is_proxied() {
    let b = backend("a").await;
    let r = start_router(one_service_table(svc(&[b.addr])), RouterConfig::default()).await;
    let stream = TcpStream::connect(r.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let req = Request::builder()
            .uri("http://web.test/h2?x=1")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.version(), hyper::Version::HTTP_2);
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-backend"], "a");
        assert_eq!(resp.headers()["x-seen-host"], "web.test");
        assert_eq!(resp.headers()["x-seen-path"], "/h2?x=1");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"a 0");
    }
}

#[tokio::test]
async fn forwarding_headers_are_set_and_hop_by_hop_removed() {
    let b = backend("a").await;
    let r = start_router(one_service_table(svc(&[b.addr])), RouterConfig::default()).await;
    let cl = client();
    let host = format!("web.test:{}", r.addr.port());
    let req = Request::builder()
        .uri(format!("http://{}/", r.addr))
        .header("host", &host)
        .header("x-forwarded-for", "203.0.113.7")
        .header("forwarded", "for=203.0.113.7")
        .header("connection", "keep-alive, x-secret")
        .header("x-secret", "hop")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = cl.request(req).await.unwrap();
    let h = resp.headers();
    assert_eq!(h["x-seen-x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(h["x-seen-x-forwarded-proto"], "http");
    assert_eq!(h["x-seen-x-forwarded-host"], host.as_str());
    assert_eq!(
        h["x-seen-forwarded"],
        format!("for=203.0.113.7, for=127.0.0.1;host=\"{host}\";proto=http").as_str()
    );
    assert_eq!(h["x-seen-host"], host.as_str(), "Host is passed through");
    assert!(
        h.get("x-seen-x-secret").is_none(),
        "header named in Connection leaked"
    );
}

// ---------- TLS ----------

fn write_self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let cert = rcgen::generate_simple_self_signed(vec!["web.test".to_string()]).unwrap();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    (cert_path, key_path, cert.cert.der().to_vec())
}

#[tokio::test]
async fn tls_is_terminated_with_certificates_from_files() {
    let b = backend("a").await;
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path, der) = write_self_signed(dir.path());
    let server_config = load_tls(&cert_path, &key_path).unwrap();

    let (_tx, rx) = watch::channel(one_service_table(svc(&[b.addr])));
    let router = Router::new(rx, RouterConfig::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn({
        let router = router.clone();
        async move {
            router
                .serve_tls(listener, server_config, async {
                    let _ = stop_rx.await;
                })
                .await
        }
    });

    let mut roots = rustls::RootCertStore::empty();
    roots.add(der.into()).unwrap();
    let client_config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    // No ALPN: HTTP/1.1, served by the router's own codec.
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config.clone()));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("web.test").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("/secure")
        .header("host", "web.test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-seen-x-forwarded-proto"], "https");
    assert_eq!(resp.headers()["x-seen-path"], "/secure");

    // ALPN h2: served as HTTP/2.
    let mut h2_config = client_config.clone();
    h2_config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(h2_config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("web.test").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("https://web.test/secure2")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-seen-x-forwarded-proto"], "https");
    assert_eq!(resp.headers()["x-seen-path"], "/secure2");

    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[test]
fn load_tls_names_the_file_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.pem");
    let err = load_tls(&missing, &missing).unwrap_err();
    assert!(err.to_string().contains("nope.pem"), "{err}");

    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not pem\n").unwrap();
    let err = load_tls(&empty, &empty).unwrap_err();
    assert!(matches!(err, TlsError::NoCertificate(_)), "{err}");

    let (cert, _key, _) = write_self_signed(dir.path());
    let err = load_tls(&cert, &cert).unwrap_err();
    assert!(err.to_string().contains("private key"), "{err}");
}

// ---------- shutdown ----------

#[tokio::test]
async fn shutdown_lets_a_running_request_finish_then_stops_accepting() {
    let b = backend("a").await;
    let mut r = start_router(one_service_table(svc(&[b.addr])), RouterConfig::default()).await;
    let cl = client();
    let slow = {
        let cl = cl.clone();
        let addr = r.addr;
        tokio::spawn(async move { get(&cl, addr, "web.test", "/slow?ms=600").await })
    };
    // Stopped while the request runs (not before it was accepted).
    until_hits(&b.hits, 1, "the slow request").await;
    r.stop.take().unwrap().send(()).unwrap();
    let ans = slow.await.unwrap();
    assert_eq!(ans.status, StatusCode::OK);
    tokio::time::timeout(Duration::from_secs(5), &mut r.done)
        .await
        .expect("serve returns after the last request")
        .unwrap()
        .unwrap();
    assert!(TcpStream::connect(r.addr).await.is_err(), "still accepting");
}

#[tokio::test]
async fn serves_from_per_core_threads_and_stops() {
    let b = backend("a").await;
    let (_tx, rx) = watch::channel(one_service_table(svc(&[b.addr])));
    let router = Router::new(rx, RouterConfig::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = router
        .serve_on_threads("127.0.0.1:0".parse().unwrap(), 2, stop_rx)
        .unwrap();
    let addr = server.local_addr();
    let cl = client();
    for _ in 0..20 {
        // Fresh connections, so that the kernel spreads them over both threads.
        let cl2 = client();
        assert_eq!(
            get(&cl2, addr, "web.test", "/").await.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        get(&cl, addr, "web.test", "/").await.header("x-backend"),
        "a"
    );
    assert_eq!(b.hits.load(Ordering::SeqCst), 21);
    stop_tx.send(true).unwrap();
    tokio::task::spawn_blocking(move || server.join())
        .await
        .unwrap()
        .unwrap();
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
}
