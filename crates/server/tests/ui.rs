//! The dashboard's server side over real sockets: the embedded front end,
//! the browser guard in front of the API, the stack watch (SSE) and the
//! dashboard's read routes. The browser itself is tested in
//! `crates/cli/tests/ui_dashboard.rs`.

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use berth_agent::logs::LogStore;
use berth_model::{Health, InstanceKey, InstanceState, InstanceStatus, keys};
use berth_server::api::{self, ApiContext};
use berth_server::ui::{self, DashboardAuth, Guard};
use berth_store::embedded::EmbeddedStore;
use berth_store::{Store, put_json};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

const TOKEN: &str = "t0ken";

struct Server {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    addr: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(auth: DashboardAuth) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap());
    let logs = LogStore::open(dir.path().join("logs"), Default::default()).unwrap();
    let ctx = ApiContext {
        store: store.clone(),
        logs,
        data_dir: dir.path().to_owned(),
        node_id: "n1".into(),
        token: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let guard = Guard {
        token: TOKEN.into(),
        loopback: true,
        auth,
    };
    let router = ui::with_dashboard(api::router(ctx), guard);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(api::serve_tcp(listener, router, async {
        let _ = rx.await;
    }));
    Server {
        _dir: dir,
        store,
        addr,
        _stop: tx,
    }
}

/// A response's status, headers and body.
struct Reply {
    status: StatusCode,
    headers: hyper::HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> Reply {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder().method(method).uri(path);
    if !headers.iter().any(|(k, _)| *k == "host") {
        req = req.header("host", addr.to_string());
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = match body {
        Some(v) => {
            req = req.header("content-type", "application/json");
            Full::new(Bytes::from(v.to_string()))
        }
        None => Full::new(Bytes::new()),
    };
    let resp = sender.send_request(req.body(body).unwrap()).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

const BROWSER: (&str, &str) = ("sec-fetch-site", "same-origin");
const BEARER: (&str, &str) = ("authorization", "Bearer t0ken");

async fn submit(s: &Server) {
    let opts = berth_spec::LoadOptions {
        working_dir: s._dir.path().to_owned(),
        project_name: Some("shop".into()),
        ..Default::default()
    };
    let compose = "services:\n  web:\n    command: python3 -m http.server\n";
    let stack = berth_spec::load_str(Path::new("compose.yaml"), compose, &opts)
        .unwrap()
        .stack;
    let r = send(
        s.addr,
        Method::POST,
        "/v1/stacks",
        &[],
        Some(json!({"namespace": "default", "stack": stack})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
}

#[tokio::test]
async fn the_front_end_is_served_with_a_strict_policy() {
    let s = start(DashboardAuth::Required).await;
    let r = send(s.addr, Method::GET, "/ui", &[BROWSER], None).await;
    assert_eq!(r.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(r.headers["location"], "/ui/");
    let r = send(s.addr, Method::GET, "/ui/", &[BROWSER], None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&r.body).contains("<script src=\"app.js\""));
    let csp = r.headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    let r = send(s.addr, Method::GET, "/ui/app.js", &[BROWSER], None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
}

#[tokio::test]
async fn browsers_need_the_token_on_loopback_and_cross_site_writes_are_refused() {
    let s = start(DashboardAuth::Required).await;
    // The CLI on loopback: no token, as before.
    let r = send(s.addr, Method::GET, "/v1/stacks", &[], None).await;
    assert_eq!(r.status, StatusCode::OK);
    // A browser without the token, or with a wrong one.
    let r = send(s.addr, Method::GET, "/v1/stacks", &[BROWSER], None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let wrong = ("authorization", "Bearer nope");
    let r = send(
        s.addr,
        Method::GET,
        "/v1/stacks",
        &[("origin", "http://x"), wrong],
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = send(s.addr, Method::GET, "/v1/stacks", &[BROWSER, BEARER], None).await;
    assert_eq!(r.status, StatusCode::OK);
    // A write from another site is refused even with the token, and
    // changes nothing.
    submit(&s).await;
    let body = json!({"replicas": {"web": 4}});
    let evil = [("origin", "http://evil.example"), BEARER];
    let r = send(
        s.addr,
        Method::POST,
        "/v1/stacks/default/shop/scale",
        &evil,
        Some(body.clone()),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(
        r.json()["error"].as_str().unwrap().contains("cross-site"),
        "{}",
        r.json()
    );
    let detail = send(s.addr, Method::GET, "/v1/stacks/default/shop", &[], None)
        .await
        .json();
    assert_eq!(detail["record"]["services"]["web"]["replicas"], 1);
    // The same write from the dashboard's own origin goes through.
    let origin = format!("http://{}", s.addr);
    let own = [("origin", origin.as_str()), BROWSER, BEARER];
    let r = send(
        s.addr,
        Method::POST,
        "/v1/stacks/default/shop/scale",
        &own,
        Some(body),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json());
}

#[tokio::test]
async fn with_auth_off_only_loopback_host_names_are_served() {
    let s = start(DashboardAuth::Off).await;
    let r = send(s.addr, Method::GET, "/v1/stacks", &[BROWSER], None).await;
    assert_eq!(r.status, StatusCode::OK);
    let rebound = [BROWSER, ("host", "attacker.example")];
    let r = send(s.addr, Method::GET, "/v1/stacks", &rebound, None).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

/// Reads SSE events from a streaming body until `want` says stop.
async fn read_events(
    body: &mut hyper::body::Incoming,
    buf: &mut String,
    mut want: impl FnMut(&str, &Value) -> bool,
) {
    loop {
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut event = "message";
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = if v.trim() == "state" {
                        "state"
                    } else {
                        "other"
                    };
                    if v.trim() == "removed" {
                        event = "removed";
                    }
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            let v = serde_json::from_str(&data).unwrap_or(Value::Null);
            if want(event, &v) {
                return;
            }
        }
        let frame = body.frame().await.unwrap().unwrap();
        if let Some(d) = frame.data_ref() {
            buf.push_str(&String::from_utf8_lossy(d));
        }
    }
}

#[tokio::test]
async fn the_stack_watch_streams_a_snapshot_per_change() {
    let s = start(DashboardAuth::Required).await;
    let r = send(
        s.addr,
        Method::GET,
        "/v1/stacks/default/nope/watch",
        &[],
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    submit(&s).await;

    let stream = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/v1/stacks/default/shop/watch")
        .header("host", s.addr.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut body = resp.into_body();
    let mut buf = String::new();
    let step = Duration::from_secs(10);

    // At connect: the record, no instance reported yet.
    tokio::time::timeout(
        step,
        read_events(&mut body, &mut buf, |e, v| {
            assert_eq!(e, "state");
            assert_eq!(v["record"]["name"], "shop");
            true
        }),
    )
    .await
    .unwrap();

    // An agent reports web.1 running: the next snapshot shows it.
    let key = InstanceKey::new("default", "shop", "web", 1);
    let status = InstanceStatus {
        state: InstanceState::Running,
        health: Health::Healthy,
        pid: Some(42),
        address: Some("127.0.0.1".into()),
        port: Some(4000),
        started_at: Some(1),
        ..InstanceStatus::new(key.clone(), "u1", "n1", 1, 1)
    };
    put_json(&*s.store, &keys::status(&key), &status)
        .await
        .unwrap();
    tokio::time::timeout(
        step,
        read_events(&mut body, &mut buf, |e, v| {
            e == "state"
                && v["instances"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|i| i["instance"] == "web.1" && i["state"] == "running" && i["pid"] == 42)
        }),
    )
    .await
    .unwrap();

    // Removing the stack ends the stream with `removed`.
    let r = send(s.addr, Method::DELETE, "/v1/stacks/default/shop", &[], None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json());
    tokio::time::timeout(
        step,
        read_events(&mut body, &mut buf, |e, _| e == "removed"),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn releases_and_the_network_view_are_served() {
    let s = start(DashboardAuth::Required).await;
    submit(&s).await;
    let r = send(
        s.addr,
        Method::GET,
        "/v1/stacks/default/shop/releases/1",
        &[],
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["version"], 1);
    assert!(r.json()["spec"]["services"]["web"].is_object());
    let r = send(
        s.addr,
        Method::GET,
        "/v1/stacks/default/shop/releases/9",
        &[],
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = send(s.addr, Method::GET, "/v1/network", &[], None).await;
    assert_eq!(r.status, StatusCode::OK);
    let net = r.json();
    let web = &net[0];
    assert_eq!(
        (web["stack"].as_str(), web["service"].as_str()),
        (Some("shop"), Some("web"))
    );
    assert!(
        web["dns"]
            .as_array()
            .unwrap()
            .contains(&json!("web.shop.default.berth"))
    );
    assert!(
        web["routes"]
            .as_array()
            .unwrap()
            .contains(&json!({"host": "web.shop.localhost", "path": "/"}))
    );
}
