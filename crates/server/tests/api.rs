//! The HTTP API driven over real sockets, with a real embedded store and log
//! store in a tempdir: desired-state writes, the instance join, logs,
//! auth, the OpenAPI description and the listeners.

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use berth_agent::logs::LogStore;
use berth_model::api::{Instance, StackChangeResponse, SubmitStackResponse};
use berth_model::{
    Assignment, DesiredState, Health, InstanceKey, InstanceState, InstanceStatus, LogStream,
    Release, StackRecord, keys,
};
use berth_server::api::{self, ApiContext};
use berth_store::embedded::EmbeddedStore;
use berth_store::{Store, get_json, put_json};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

const COMPOSE: &str = "\
services:
  web:
    command: python3 -m http.server
    deploy:
      replicas: 2
  worker:
    command: [sleep, '1000']
";

struct Harness {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    logs: LogStore,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Harness {
    async fn start(token: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap());
        let logs = LogStore::open(dir.path().join("logs"), Default::default()).unwrap();
        let ctx = ApiContext {
            store: store.clone(),
            logs: logs.clone(),
            data_dir: dir.path().to_owned(),
            node_id: "n1".into(),
            token: token.map(str::to_owned),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(api::serve_tcp(listener, api::router(ctx), async {
            let _ = rx.await;
        }));
        Harness {
            _dir: dir,
            store,
            logs,
            addr,
            stop: Some(tx),
            server: Some(server),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> (StatusCode, Bytes) {
        let stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "x");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
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
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    }

    async fn json(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let (status, bytes) = self.send(method, path, body, None).await;
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn submit(&self) -> SubmitStackResponse {
        let (status, v) = self
            .json(
                Method::POST,
                "/v1/stacks",
                Some(json!({ "namespace": "default", "stack": stack(self._dir.path()) })),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        serde_json::from_value(v).unwrap()
    }

    async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
    }
}

fn stack(dir: &Path) -> berth_spec::types::Stack {
    let opts = berth_spec::LoadOptions {
        working_dir: dir.to_owned(),
        project_name: Some("shop".into()),
        ..Default::default()
    };
    berth_spec::load_str(Path::new("compose.yaml"), COMPOSE, &opts)
        .unwrap()
        .stack
}

#[tokio::test]
async fn submit_writes_stack_record_and_numbered_releases() {
    let h = Harness::start(None).await;
    let r = h.submit().await;
    assert_eq!((r.stack.as_str(), r.release), ("shop", 1));

    let (record, _) = get_json::<StackRecord>(&*h.store, &keys::stack("default", "shop"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.release, 1);
    assert_eq!(record.services["web"].replicas, 2);
    assert_eq!(record.services["worker"].replicas, 1);
    let (release, _) = get_json::<Release>(&*h.store, &keys::release("default", "shop", 1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(release.version, 1);
    assert_eq!(release.spec, record.spec);

    // A restart bumps the generation; a new submit keeps it and makes v2.
    let (status, _) = h
        .json(
            Method::POST,
            "/v1/stacks/default/shop/restart",
            Some(json!({ "services": ["web"] })),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h.submit().await.release, 2);
    let (record, _) = get_json::<StackRecord>(&*h.store, &keys::stack("default", "shop"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.release, 2);
    assert_eq!(record.services["web"].restart_generation, 1);
    assert_eq!(record.services["worker"].restart_generation, 0);
    h.shutdown().await;
}

/// Regression: `scale web=4000000000` was accepted.
#[tokio::test]
async fn scale_beyond_the_replica_limit_is_refused() {
    let h = Harness::start(None).await;
    h.submit().await;
    let (status, v) = h
        .json(
            Method::POST,
            "/v1/stacks/default/shop/scale",
            Some(json!({ "replicas": { "web": 4_000_000_000u32 } })),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["error"].as_str().unwrap().contains("4000000000"), "{v}");
    assert!(v["hint"].as_str().unwrap().contains("10000"), "{v}");
    h.shutdown().await;
}

#[tokio::test]
async fn scale_of_unknown_service_is_404_with_the_services_in_the_hint() {
    let h = Harness::start(None).await;
    h.submit().await;
    let (status, v) = h
        .json(
            Method::POST,
            "/v1/stacks/default/shop/scale",
            Some(json!({ "replicas": { "nope": 3 } })),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(v["error"].as_str().unwrap().contains("nope"), "{v}");
    assert!(v["hint"].as_str().unwrap().contains("web, worker"), "{v}");

    let (status, v) = h
        .json(
            Method::POST,
            "/v1/stacks/default/shop/scale",
            Some(json!({ "replicas": { "web": 5 } })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let change: StackChangeResponse = serde_json::from_value(v).unwrap();
    assert_eq!(change.services["web"].replicas, 5);

    let (status, v) = h
        .json(
            Method::POST,
            "/v1/stacks/default/ghost/scale",
            Some(json!({ "replicas": { "web": 1 } })),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(v["hint"].is_string());
    let (status, v) = h
        .json(
            Method::POST,
            "/v1/stacks/default/shop/scale",
            Some(json!({ "replicas": { "web": -1 } })),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    h.shutdown().await;
}

#[tokio::test]
async fn stop_without_body_stops_everything_and_start_undoes_it() {
    let h = Harness::start(None).await;
    h.submit().await;
    let (status, v) = h
        .json(Method::POST, "/v1/stacks/default/shop/stop", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(v["services"]["web"]["stopped"].as_bool().unwrap());
    assert!(v["services"]["worker"]["stopped"].as_bool().unwrap());
    let (_, v) = h
        .json(
            Method::POST,
            "/v1/stacks/default/shop/start",
            Some(json!({ "services": ["worker"] })),
        )
        .await;
    assert!(v["services"]["web"]["stopped"].as_bool().unwrap());
    assert!(!v["services"]["worker"]["stopped"].as_bool().unwrap());
    h.shutdown().await;
}

#[tokio::test]
async fn concurrent_writes_are_all_applied() {
    let h = Harness::start(None).await;
    h.submit().await;
    let h = Arc::new(h);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            h.json(
                Method::POST,
                "/v1/stacks/default/shop/restart",
                Some(json!({ "services": ["web"] })),
            )
            .await
            .0
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    let (record, _) = get_json::<StackRecord>(&*h.store, &keys::stack("default", "shop"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.services["web"].restart_generation, 16);
}

#[tokio::test]
async fn remove_deletes_the_record_and_every_release() {
    let h = Harness::start(None).await;
    h.submit().await;
    h.submit().await;
    let (status, v) = h
        .json(Method::DELETE, "/v1/stacks/default/shop", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(
        h.store
            .get(&keys::stack("default", "shop"))
            .await
            .unwrap()
            .is_none()
    );
    let (releases, _) = h
        .store
        .range(&keys::releases_of("default", "shop"))
        .await
        .unwrap();
    assert!(releases.is_empty());
    let (status, _) = h
        .json(Method::DELETE, "/v1/stacks/default/shop", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // A new submit after removal starts again at v1.
    assert_eq!(h.submit().await.release, 1);
    h.shutdown().await;
}

fn key(service: &str, slot: u32) -> InstanceKey {
    InstanceKey::new("default", "shop", service, slot)
}

#[tokio::test]
async fn instances_join_assignments_with_statuses() {
    let h = Harness::start(None).await;
    let spec = stack(h._dir.path());
    let assign = |slot: u32, uid: &str| Assignment {
        key: key("web", slot),
        uid: uid.into(),
        node: "n1".into(),
        release: 1,
        restart_generation: 0,
        service: spec.services["web"].clone(),
        env: Default::default(),
        desired: DesiredState::Running,
        created_at: 1,
        retire_at: None,
    };
    let status = |slot: u32, uid: &str| InstanceStatus {
        state: InstanceState::Running,
        health: Health::Healthy,
        pid: Some(1234),
        address: Some("127.0.0.1".into()),
        port: Some(4000),
        restarts: 2,
        started_at: Some(1),
        health_output: Some("ok".into()),
        limits_warning: Some("no cgroup".into()),
        ..InstanceStatus::new(key("web", slot), uid, "n1", 1, 1)
    };
    // web.1: assigned and reported; web.2: assigned only; web.3: reported
    // only (its assignment is gone: being stopped).
    for (slot, uid) in [(1, "a"), (2, "b")] {
        put_json(
            &*h.store,
            &keys::assignment("n1", &key("web", slot)),
            &assign(slot, uid),
        )
        .await
        .unwrap();
    }
    for (slot, uid) in [(1, "a"), (3, "c")] {
        let mut st = status(slot, uid);
        if slot == 3 {
            // A container published on its node: every declared port has
            // a host port.
            st.address = Some("10.0.0.7".into());
            st.port = Some(20417);
            st.host_ports = [(80, 20417), (9000, 20418)].into();
        }
        put_json(&*h.store, &keys::status(&key("web", slot)), &st)
            .await
            .unwrap();
    }
    let (status_code, v) = h
        .json(
            Method::GET,
            "/v1/instances?namespace=default&stack=shop",
            None,
        )
        .await;
    assert_eq!(status_code, StatusCode::OK);
    let rows: Vec<Instance> = serde_json::from_value(v.clone()).unwrap();
    let names: Vec<_> = rows.iter().map(|r| r.instance.as_str()).collect();
    assert_eq!(names, ["web.1", "web.2", "web.3"]);
    assert_eq!(rows[0].state, InstanceState::Running);
    assert_eq!(rows[0].address.as_deref(), Some("127.0.0.1:4000"));
    assert!(rows[0].is_ready());
    assert_eq!(rows[1].state, InstanceState::Pending);
    assert!(!rows[1].is_ready());
    assert_eq!(rows[2].desired, None);
    assert!(!rows[2].current);
    // ps --json's contract: these keys are always present.
    for k in [
        "stack",
        "service",
        "instance",
        "state",
        "health",
        "pid",
        "address",
        "host_ports",
        "restarts",
    ] {
        assert!(v[0].get(k).is_some(), "missing {k}");
        assert!(v[1].get(k).is_some(), "missing {k}");
    }
    // All of a published container's ports, not only the first.
    assert_eq!(v[2]["address"], json!("10.0.0.7:20417"));
    assert_eq!(v[2]["host_ports"], json!({"80": 20417, "9000": 20418}));
    assert_eq!(v[0]["host_ports"], json!({}));
    let (_, v) = h
        .json(Method::GET, "/v1/instances?service=worker", None)
        .await;
    assert_eq!(v, json!([]));
    h.shutdown().await;
}

#[tokio::test]
async fn logs_stream_past_then_live_without_gap_or_duplicate() {
    let h = Harness::start(None).await;
    h.submit().await;
    for i in 0..3 {
        h.logs
            .append(&key("web", 1), LogStream::Stdout, &format!("past {i}"))
            .await
            .unwrap();
    }
    h.logs
        .append(&key("worker", 1), LogStream::Stdout, "other service")
        .await
        .unwrap();

    let (status, body) = h
        .send(
            Method::GET,
            "/v1/stacks/default/shop/logs?service=web&tail=2",
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let lines: Vec<Value> = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    let texts: Vec<_> = lines.iter().map(|l| l["line"].as_str().unwrap()).collect();
    assert_eq!(texts, ["past 1", "past 2"]);

    // Follow: the past, then a line appended after the request started.
    let stream = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/v1/stacks/default/shop/logs?service=web&follow=true")
        .header("host", "x")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let mut body = resp.into_body();
    h.logs
        .append(&key("worker", 1), LogStream::Stdout, "not wanted")
        .await
        .unwrap();
    h.logs
        .append(&key("web", 2), LogStream::Stderr, "live")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let frame = body.frame().await.unwrap().unwrap();
            buf.extend_from_slice(&frame.into_data().unwrap());
            let text = String::from_utf8_lossy(&buf).to_string();
            if text.contains("\"live\"") {
                return text;
            }
        }
    })
    .await
    .unwrap();
    let texts: Vec<String> = got
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["line"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(texts, ["past 0", "past 1", "past 2", "live"]);

    let (status, v) = h
        .json(
            Method::GET,
            "/v1/stacks/default/shop/logs?since=yesterday",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let (status, _) = h
        .json(Method::GET, "/v1/stacks/default/ghost/logs", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn token_listener_rejects_requests_without_the_token() {
    let h = Harness::start(Some("s3cret")).await;
    let (status, body) = h.send(Method::GET, "/v1/health", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert!(v["error"].as_str().unwrap().contains("token"));
    let (status, _) = h.send(Method::GET, "/v1/stacks", None, Some("wrong")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = h
        .send(Method::GET, "/v1/health", None, Some("s3cret"))
        .await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["node"], "n1");
    assert!(api::token_required(&"0.0.0.0:1".parse().unwrap()));
    assert!(!api::token_required(&"127.0.0.1:1".parse().unwrap()));
    assert!(!api::token_required(&"[::1]:1".parse().unwrap()));
    h.shutdown().await;
}

#[tokio::test]
async fn every_route_is_in_the_openapi_document_and_back() {
    let h = Harness::start(None).await;
    let (status, doc) = h.json(Method::GET, "/v1/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|m| *m != "parameters")
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    let served: BTreeSet<(String, String)> = api::routes()
        .into_iter()
        .map(|(m, p)| (m.to_string(), p.to_owned()))
        .collect();
    assert_eq!(documented, served);
    // And the router really serves them: none falls through to "no such route".
    for (method, path) in &served {
        let concrete = path.replace("{ns}", "default").replace("{stack}", "shop");
        let (status, body) = h.send(method.parse().unwrap(), &concrete, None, None).await;
        let text = String::from_utf8_lossy(&body);
        assert!(
            !text.contains("no such API route") && status != StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}: {status} {text}"
        );
    }
    let (status, v) = h.json(Method::GET, "/v1/nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(v["error"].as_str().unwrap().contains("no such API route"));
    // A path parameter that does not parse gets the API's JSON error too
    // (it was axum's plain text).
    let (status, v) = h
        .json(Method::GET, "/v1/stacks/default/shop/releases/v3", None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(v["error"].as_str().unwrap().starts_with("bad path"), "{v}");
    assert!(v["hint"].as_str().unwrap().contains("openapi"), "{v}");
    h.shutdown().await;
}

#[tokio::test]
async fn unix_listener_replaces_a_stale_socket_and_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("berth.sock");
    std::fs::write(&sock, b"stale").unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
    let logs = LogStore::open(dir.path().join("logs"), Default::default()).unwrap();
    let ctx = ApiContext {
        store,
        logs,
        data_dir: dir.path().to_owned(),
        node_id: "n1".into(),
        token: None,
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let path = sock.clone();
    let server = tokio::spawn(async move {
        api::serve_unix(&path, api::router(ctx), async {
            let _ = rx.await;
        })
        .await
    });
    let stream = loop {
        match tokio::net::UnixStream::connect(&sock).await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(
            Request::get("/v1/health")
                .header("host", "x")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    drop(sender);
    tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[test]
fn token_is_created_once_private_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let t1 = api::load_or_create_token(dir.path()).unwrap();
    assert_eq!(t1.len(), 64);
    assert!(t1.bytes().all(|b| b.is_ascii_hexdigit()));
    let mode = std::fs::metadata(dir.path().join("token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(api::load_or_create_token(dir.path()).unwrap(), t1);
    let other = tempfile::tempdir().unwrap();
    assert_ne!(api::load_or_create_token(other.path()).unwrap(), t1);
}

#[tokio::test]
async fn lower_case_bearer_scheme_got_401() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start(Some("s3cret")).await;
    for (header, want) in [
        ("Authorization: bearer s3cret", "200"),
        ("Authorization: BEARER s3cret", "200"),
        ("Authorization: Bearer s3cret", "200"),
        ("Authorization: bearer wrong", "401"),
        ("Authorization: Basic s3cret", "401"),
    ] {
        let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        let req =
            format!("GET /v1/health HTTP/1.1\r\nHost: x\r\n{header}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(
            out.starts_with(&format!("HTTP/1.1 {want} ")),
            "{header}: {out}"
        );
    }
}
