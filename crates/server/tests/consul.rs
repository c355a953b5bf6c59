//! The KV store and the Consul-compatible API over real sockets, with a real
//! embedded store in a tempdir — and driven by clients nobody here wrote:
//! Prometheus (Debian's package) with `consul_sd_configs`, asserted through
//! its own `/api/v1/targets`, and `py-consul` from PyPI.

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_agent::logs::LogStore;
use berth_model::{Health, InstanceKey, InstanceState, InstanceStatus, keys};
use berth_server::api::{self, ApiContext};
use berth_store::embedded::EmbeddedStore;
use berth_store::{Store, put_json};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

struct Harness {
    dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    reaper_stop: tokio::sync::watch::Sender<bool>,
}

async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: &[u8],
    hdrs: &[(&str, &str)],
) -> Reply {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "x");
    for (k, v) in hdrs {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::copy_from_slice(body))).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    Reply {
        status,
        headers,
        body: resp.into_body().collect().await.unwrap().to_bytes(),
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    fn index(&self) -> i64 {
        self.headers["x-consul-index"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }
}

impl Harness {
    async fn start() -> Self {
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
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(api::serve_tcp(listener, api::router(ctx), async {
            let _ = rx.await;
        }));
        let (reaper_stop, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(berth_server::kv::reap_sessions(store.clone(), stop_rx));
        Harness {
            dir,
            store,
            addr,
            stop: Some(tx),
            reaper_stop,
        }
    }

    async fn req(&self, method: Method, path: &str, body: &[u8], hdrs: &[(&str, &str)]) -> Reply {
        request(self.addr, method, path, body, hdrs).await
    }

    async fn get(&self, path: &str) -> Reply {
        self.req(Method::GET, path, b"", &[]).await
    }

    async fn put(&self, path: &str, body: &[u8]) -> Reply {
        self.req(Method::PUT, path, body, &[]).await
    }

    async fn status(&self, service: &str, slot: u32, port: u16, health: Health) {
        let key = InstanceKey::new("default", "shop", service, slot);
        let s = InstanceStatus {
            state: InstanceState::Running,
            health,
            pid: Some(1),
            address: Some("127.0.0.1".into()),
            port: Some(port),
            started_at: Some(1),
            ..InstanceStatus::new(key.clone(), format!("u{slot}"), "n1", 1, 1)
        };
        put_json(&*self.store, &keys::status(&key), &s)
            .await
            .unwrap();
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = self.reaper_stop.send(true);
    }
}

#[tokio::test]
async fn kv_reads_writes_cas_and_listing_in_consuls_shape() {
    let h = Harness::start().await;
    let r = h.put("/v1/kv/app/config/db", b"pg://db").await;
    assert_eq!((r.status, r.json()), (StatusCode::OK, json!(true)));
    h.put("/v1/kv/app/config/cache?flags=42", b"redis").await;
    h.put("/v1/kv/app/name", b"shop").await;

    let r = h.get("/v1/kv/app/config/cache").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["x-consul-knownleader"], "true");
    let v = r.json();
    assert_eq!(v[0]["Key"], "app/config/cache");
    assert_eq!(v[0]["Value"], "cmVkaXM="); // base64("redis")
    assert_eq!(v[0]["Flags"], 42);
    assert_eq!(v[0]["LockIndex"], 0);
    assert_eq!(v[0]["Session"], Value::Null);
    let modify = v[0]["ModifyIndex"].as_i64().unwrap();
    assert!(v[0]["CreateIndex"].as_i64().unwrap() <= modify && modify <= r.index());

    assert_eq!(&h.get("/v1/kv/app/name?raw").await.body[..], b"shop");
    let keys = h.get("/v1/kv/app/?keys&separator=/").await.json();
    assert_eq!(keys, json!(["app/config/", "app/name"]));
    let all = h.get("/v1/kv/?recurse").await.json();
    assert_eq!(all.as_array().unwrap().len(), 3);

    // Namespaces are separate key spaces.
    let r = h
        .req(
            Method::PUT,
            "/v1/kv/app/name",
            b"staging",
            &[("x-berth-namespace", "staging")],
        )
        .await;
    assert_eq!(r.json(), json!(true));
    assert_eq!(
        &h.get("/v1/kv/app/name?raw&ns=staging").await.body[..],
        b"staging"
    );
    assert_eq!(&h.get("/v1/kv/app/name?raw").await.body[..], b"shop");

    // Compare-and-swap on the modify index.
    let idx = h.get("/v1/kv/app/name").await.json()[0]["ModifyIndex"]
        .as_i64()
        .unwrap();
    assert_eq!(
        h.put("/v1/kv/app/name?cas=0", b"x").await.json(),
        json!(false)
    );
    assert_eq!(
        h.put(&format!("/v1/kv/app/name?cas={idx}"), b"v2")
            .await
            .json(),
        json!(true)
    );
    assert_eq!(
        h.put(&format!("/v1/kv/app/name?cas={idx}"), b"v3")
            .await
            .json(),
        json!(false)
    );
    assert_eq!(&h.get("/v1/kv/app/name?raw").await.body[..], b"v2");

    // Missing keys: 404 with an index, so a client can block on creation.
    let r = h.get("/v1/kv/nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.index() > 0);
    let r = h.req(Method::DELETE, "/v1/kv/app/?recurse", b"", &[]).await;
    assert_eq!(r.json(), json!(true));
    assert_eq!(
        h.get("/v1/kv/app/?recurse").await.status,
        StatusCode::NOT_FOUND
    );

    // Errors are Consul-style plain text.
    let r = h.get("/v1/kv/a?index=1&wait=soon").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&r.body).contains("Invalid wait time"));
    let r = h.put("/v1/kv/big", &vec![b'x'; 600 * 1024]).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn blocking_kv_get_returns_on_change_and_times_out_without_one() {
    let h = Harness::start().await;
    h.put("/v1/kv/cfg", b"1").await;
    let index = h.get("/v1/kv/cfg").await.index();

    // Unrelated writes do not wake it; the wait bounds it.
    h.put("/v1/kv/cfg2", b"x").await;
    let t0 = Instant::now();
    let r = h.get(&format!("/v1/kv/cfg?index={index}&wait=400ms")).await;
    assert!(
        t0.elapsed() >= Duration::from_millis(350),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(r.json()[0]["Value"], "MQ==");

    let writer = {
        let store = h.store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            berth_server::kv::put(&*store, "default", "cfg", b"2", Default::default())
                .await
                .unwrap();
        })
    };
    let t0 = Instant::now();
    let r = h.get(&format!("/v1/kv/cfg?index={index}&wait=30s")).await;
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(r.json()[0]["Value"], "Mg==");
    assert!(r.index() > index);
    writer.await.unwrap();
}

#[tokio::test]
async fn kv_event_stream_sends_current_value_then_changes() {
    let h = Harness::start().await;
    h.put("/v1/kv/feed/a", b"1").await;
    let stream = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/v1/kv/feed/?recurse")
        .header("host", "x")
        .header("accept", "text/event-stream")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut text = String::new();
    let mut wrote = false;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(text.contains("event: delete") && text.contains("\"feed/b\"")) {
        assert!(Instant::now() < deadline, "events so far: {text}");
        if text.contains("\"feed/a\"") && !wrote {
            wrote = true;
            h.put("/v1/kv/feed/b", b"2").await;
            h.req(Method::DELETE, "/v1/kv/feed/a", b"", &[]).await;
        }
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
    let puts = text.matches("event: put").count();
    assert_eq!(puts, 2, "{text}");
    assert!(text.find("\"feed/b\"").unwrap() < text.find("event: delete").unwrap());
}

#[tokio::test]
async fn sessions_and_locks_over_http() {
    let h = Harness::start().await;
    let a = h
        .put("/v1/session/create", br#"{"Name":"a","TTL":"10s"}"#)
        .await
        .json()["ID"]
        .as_str()
        .unwrap()
        .to_owned();
    let b = h.put("/v1/session/create", b"").await.json()["ID"]
        .as_str()
        .unwrap()
        .to_owned();
    let info = h.get(&format!("/v1/session/info/{a}")).await.json();
    assert_eq!(
        (info[0]["Name"].clone(), info[0]["TTL"].clone()),
        (json!("a"), json!("10s"))
    );
    assert_eq!(info[0]["Behavior"], "release");

    assert_eq!(
        h.put(&format!("/v1/kv/lead?acquire={a}"), b"me")
            .await
            .json(),
        json!(true)
    );
    assert_eq!(
        h.put(&format!("/v1/kv/lead?acquire={b}"), b"me")
            .await
            .json(),
        json!(false)
    );
    let v = h.get("/v1/kv/lead").await.json();
    assert_eq!(
        (v[0]["Session"].clone(), v[0]["LockIndex"].clone()),
        (json!(a), json!(1))
    );
    let r = h.put(&format!("/v1/session/renew/{a}"), b"").await;
    assert_eq!(r.json()[0]["ID"], json!(a));
    assert_eq!(
        h.put(&format!("/v1/kv/lead?release={a}"), b"").await.json(),
        json!(true)
    );
    assert_eq!(
        h.put(&format!("/v1/kv/lead?acquire={b}"), b"").await.json(),
        json!(true)
    );
    assert_eq!(
        h.put(&format!("/v1/session/destroy/{b}"), b"").await.json(),
        json!(true)
    );
    assert_eq!(h.get("/v1/kv/lead").await.json()[0]["Session"], Value::Null);
    assert_eq!(
        h.get(&format!("/v1/session/info/{b}")).await.json(),
        json!([])
    );
    assert_eq!(
        h.put(&format!("/v1/session/renew/{b}"), b"").await.status,
        StatusCode::NOT_FOUND
    );
    let r = h
        .put("/v1/kv/x?acquire=00000000-0000-4000-8000-000000000000", b"")
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = h.put("/v1/session/create", br#"{"TTL":"1s"}"#).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        h.get("/v1/session/list")
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn catalog_and_health_list_berths_instances_and_registered_services() {
    let h = Harness::start().await;
    h.status("web", 1, 4001, Health::Healthy).await;
    h.status("web", 2, 4002, Health::Unhealthy).await;
    let r = h
        .put(
            "/v1/agent/service/register",
            br#"{"name":"ext","id":"ext-1","tags":["metrics"],"address":"127.0.0.1","port":9100,"meta":{"team":"ops"}}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);

    let r = h.get("/v1/catalog/services").await;
    assert_eq!(r.json(), json!({ "ext": ["metrics"], "web.shop": [] }));
    let svc = h.get("/v1/catalog/service/web.shop").await.json();
    let ports: Vec<_> = svc
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["ServicePort"].clone())
        .collect();
    assert_eq!(ports, [json!(4001), json!(4002)]);
    assert_eq!(svc[0]["ServiceID"], "shop.web.1");
    assert_eq!(svc[0]["ServiceAddress"], "127.0.0.1");
    assert_eq!(svc[0]["ServiceMeta"]["berth_stack"], "shop");
    let ext = h.get("/v1/catalog/service/ext?tag=metrics").await.json();
    assert_eq!(
        (
            ext[0]["ServiceID"].clone(),
            ext[0]["ServiceMeta"]["team"].clone()
        ),
        (json!("ext-1"), json!("ops"))
    );
    assert_eq!(
        h.get("/v1/catalog/service/ext?tag=other").await.json(),
        json!([])
    );

    let all = h.get("/v1/health/service/web.shop").await.json();
    assert_eq!(all.as_array().unwrap().len(), 2);
    assert_eq!(all[1]["Checks"][1]["Status"], "critical");
    let passing = h.get("/v1/health/service/web.shop?passing").await;
    let v = passing.json();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(
        (
            v[0]["Service"]["Port"].clone(),
            v[0]["Node"]["Node"].clone()
        ),
        (json!(4001), json!("n1"))
    );
    assert_eq!(
        h.get("/v1/health/service/web.shop?ns=other").await.json(),
        json!([])
    );

    // A blocking health query wakes when web.2 turns healthy, and not for
    // writes that change nothing it shows.
    let index = passing.index();
    let store_h = h.store.clone();
    let flip = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        berth_server::kv::put(&*store_h, "default", "noise", b"1", Default::default())
            .await
            .unwrap();
    });
    let t0 = Instant::now();
    let r = h
        .get(&format!(
            "/v1/health/service/web.shop?passing&index={index}&wait=1s"
        ))
        .await;
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "woke for nothing"
    );
    assert_eq!(r.json().as_array().unwrap().len(), 1);
    flip.await.unwrap();
    let index = r.index();
    let waiter = {
        let path = format!("/v1/health/service/web.shop?passing&index={index}&wait=30s");
        let addr = h.addr;
        tokio::spawn(async move { request(addr, Method::GET, &path, b"", &[]).await.json() })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.status("web", 2, 4002, Health::Healthy).await;
    let v = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);

    // Deregistration removes it; an unknown ID is a 404.
    assert_eq!(
        h.put("/v1/agent/service/deregister/ext-1", b"")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        h.put("/v1/agent/service/deregister/ext-1", b"")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(h.get("/v1/catalog/service/ext").await.json(), json!([]));

    let me = h.get("/v1/agent/self").await.json();
    assert_eq!(me["Config"]["Datacenter"], "berth");
    // No election yet: no leader, as Consul says it.
    assert_eq!(h.get("/v1/status/leader").await.json(), json!(""));
    assert_eq!(h.get("/v1/status/peers").await.json(), json!([]));
    let (tx, mut rx) = tokio::sync::watch::channel(None);
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let me = berth_server::leader::LeaderRecord {
        node: "n1".into(),
        api: vec![h.addr],
        pid: std::process::id(),
        since: 0,
    };
    let campaign = tokio::spawn(berth_server::leader::campaign(
        h.store.clone(),
        me,
        berth_server::leader::TTL,
        tx,
        stop_rx,
    ));
    rx.wait_for(Option::is_some).await.unwrap();
    assert_eq!(
        h.get("/v1/status/leader").await.json(),
        json!(h.addr.to_string())
    );
    assert_eq!(
        h.get("/v1/status/peers").await.json(),
        json!([h.addr.to_string()])
    );
    let status = h.get("/v1/leader").await.json();
    assert_eq!(status["leader"]["node"], "n1");
    assert_eq!(status["is_leader"], true);
    // A clean stop hands over at once: the key goes with the lease.
    stop.send(true).unwrap();
    campaign.await.unwrap().unwrap();
    assert_eq!(h.get("/v1/leader").await.json()["leader"], Value::Null);
}

/// A tiny HTTP server answering `/metrics` with a counter, as a scrape
/// target for Prometheus.
async fn metrics_target() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async { "# TYPE berth_test_up counter\nberth_test_up 1\n" }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills the child when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Ignored by default: Debian bookworm's `prometheus` is built without
/// Consul SD, so on these machines it cannot run. With an upstream build:
/// `BERTH_PROMETHEUS=/path/to/prometheus cargo test -p berth-server --test
/// consul -- --ignored prometheus`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Prometheus built with Consul SD (Debian's is not); set BERTH_PROMETHEUS"]
async fn prometheus_consul_sd_discovers_berths_instances() {
    // BERTH_PROMETHEUS names another build (Debian bookworm's package is
    // built without Consul SD: its changelog says "Disable Consul SD until
    // its Debian package is back in shape").
    let prometheus = std::env::var_os("BERTH_PROMETHEUS")
        .map(std::path::PathBuf::from)
        .or_else(|| which("prometheus"))
        .expect("the `prometheus` binary is needed (Debian package `prometheus`; scripts/deps installs it)");
    let probe = tempfile::tempdir().unwrap();
    let probe_cfg = probe.path().join("p.yml");
    std::fs::write(
        &probe_cfg,
        "scrape_configs:\n  - job_name: p\n    consul_sd_configs:\n      - server: 127.0.0.1:1\n",
    )
    .unwrap();
    let promtool = prometheus.with_file_name("promtool");
    let check = std::process::Command::new(&promtool)
        .args(["check", "config"])
        .arg(&probe_cfg)
        .output()
        .unwrap();
    let why = String::from_utf8_lossy(&check.stderr).to_string()
        + &String::from_utf8_lossy(&check.stdout);
    assert!(
        !why.contains("consul_sd_configs not found"),
        "{} is built without Consul service discovery; set BERTH_PROMETHEUS to an upstream build",
        prometheus.display()
    );
    let h = Harness::start().await;
    let p1 = metrics_target().await;
    let p2 = metrics_target().await;
    h.status("web", 1, p1, Health::Healthy).await;
    h.status("web", 2, p2, Health::Healthy).await;
    h.status("web", 3, free_port(), Health::Unhealthy).await;
    let ext = metrics_target().await;
    let r = h
        .put(
            "/v1/agent/service/register",
            format!(r#"{{"Name":"ext","ID":"ext-1","Address":"127.0.0.1","Port":{ext}}}"#)
                .as_bytes(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);

    let web_port = free_port();
    let config = h.dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 500ms\n\
             scrape_configs:\n  - job_name: berth\n    consul_sd_configs:\n      - server: 127.0.0.1:{}\n        refresh_interval: 1s\n\
             \x20   relabel_configs:\n      - source_labels: [__meta_consul_health]\n        regex: passing\n        action: keep\n      - source_labels: [__meta_consul_service]\n        target_label: service\n",
            h.addr.port()
        ),
    )
    .unwrap();
    let _child = Child(
        std::process::Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                h.dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{web_port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(h.dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .unwrap(),
    );

    // Prometheus's own view: the healthy web instances and the registered
    // service, scraped successfully; the unhealthy one dropped.
    let want = {
        let mut w = vec![
            (format!("127.0.0.1:{ext}"), "ext".to_owned()),
            (format!("127.0.0.1:{p1}"), "web.shop".to_owned()),
            (format!("127.0.0.1:{p2}"), "web.shop".to_owned()),
        ];
        w.sort();
        w
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = Value::Null;
    loop {
        if let Ok(v) = prom_targets(web_port).await {
            let mut got: Vec<(String, String)> = v["data"]["activeTargets"]
                .as_array()
                .unwrap_or(&vec![])
                .iter()
                .filter(|t| t["health"] == "up")
                .map(|t| {
                    (
                        t["labels"]["instance"].as_str().unwrap_or("").to_owned(),
                        t["labels"]["service"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect();
            got.sort();
            if got == want {
                break;
            }
            last = v;
        }
        let log = std::fs::read_to_string(h.dir.path().join("prometheus.log")).unwrap_or_default();
        assert!(
            Instant::now() < deadline,
            "Prometheus did not discover {want:?}; targets: {last}\nlog:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // A change in berth reaches Prometheus: web.2 fails its check.
    h.status("web", 2, p2, Health::Unhealthy).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = prom_targets(web_port).await.unwrap_or(Value::Null);
        let instances: Vec<&str> = v["data"]["activeTargets"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t["labels"]["instance"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        if !instances.is_empty() && !instances.contains(&format!("127.0.0.1:{p2}").as_str()) {
            break;
        }
        assert!(Instant::now() < deadline, "web.2 still a target: {v}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn prom_targets(port: u16) -> Result<Value, Box<dyn std::error::Error>> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::get("/api/v1/targets")
        .header("host", "127.0.0.1")
        .body(Full::new(Bytes::new()))?;
    let resp = sender.send_request(req).await?;
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(serde_json::from_slice(&body)?)
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| p.is_file())
}

const PY_CLIENT: &str = r#"
import sys, threading, time
import consul

c = consul.Consul(host="127.0.0.1", port=int(sys.argv[1]))

# KV put / get / cas
assert c.kv.put("app/colour", "blue")
index, data = c.kv.get("app/colour")
assert data["Value"] == b"blue", data
assert not c.kv.put("app/colour", "red", cas=0), "cas=0 must not overwrite"
assert c.kv.put("app/colour", "red", cas=data["ModifyIndex"])
assert not c.kv.put("app/colour", "green", cas=data["ModifyIndex"]), "stale cas"
index, data = c.kv.get("app/colour")
assert data["Value"] == b"red"

# A blocking get returns when another writer changes the key.
def writer():
    time.sleep(0.5)
    consul.Consul(host="127.0.0.1", port=int(sys.argv[1])).kv.put("app/colour", "green")
# t0 before the writer starts: whenever the get is sent, it returns green no
# sooner than the writer's 0.5 s after t0.
t0 = time.time()
threading.Thread(target=writer).start()
new_index, data = c.kv.get("app/colour", index=index, wait="20s")
elapsed = time.time() - t0
assert data["Value"] == b"green", data
assert int(new_index) > int(index)
assert 0.3 < elapsed < 10, elapsed

# Sessions and locks: the second acquirer fails until the first releases.
s1 = c.session.create(name="one", ttl=10)
s2 = c.session.create(name="two", behavior="delete")
assert c.kv.put("service/leader", "one", acquire=s1)
assert not c.kv.put("service/leader", "two", acquire=s2)
index, data = c.kv.get("service/leader")
assert data["Session"] == s1 and data["LockIndex"] == 1, data
c.session.renew(s1)
assert c.kv.put("service/leader", "", release=s1)
assert c.kv.put("service/leader", "two", acquire=s2)
index, info = c.session.info(s2)
assert info["Behavior"] == "delete", info
c.session.destroy(s2)
index, data = c.kv.get("service/leader")
assert data is None, "behavior=delete removes the lock key"

# Catalog: berth's instance and a service registered through the agent API.
assert c.agent.service.register("pyapp", service_id="pyapp-1", address="127.0.0.1", port=7000, tags=["v1"])
index, services = c.catalog.services()
assert services.get("pyapp") == ["v1"] and "web.shop" in services, services
index, nodes = c.health.service("web.shop", passing=True)
assert [n["Service"]["Port"] for n in nodes] == [4001], nodes
index, nodes = c.catalog.service("pyapp")
assert nodes[0]["ServicePort"] == 7000 and nodes[0]["ServiceID"] == "pyapp-1", nodes
assert c.agent.service.deregister("pyapp-1")
index, services = c.catalog.services()
assert "pyapp" not in services
index, keys = c.kv.get("", keys=True)
assert keys == ["app/colour"], keys
print("py-consul: all checks passed")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_consul_client_works_against_berth() {
    let h = Harness::start().await;
    h.status("web", 1, 4001, Health::Healthy).await;
    h.status("web", 2, 4002, Health::Starting).await;
    let lib = h.dir.path().join("py");
    let pip = tokio::process::Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(&lib)
        .arg("py-consul")
        .output()
        .await
        .unwrap();
    assert!(
        pip.status.success(),
        "pip install py-consul failed: {}",
        String::from_utf8_lossy(&pip.stderr)
    );
    let script = h.dir.path().join("client.py");
    std::fs::write(&script, PY_CLIENT).unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("python3")
            .arg(&script)
            .arg(h.addr.port().to_string())
            .env("PYTHONPATH", &lib)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("all checks passed"),
        "py-consul script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Debian's Prometheus has HTTP service discovery (`http_sd_configs`), so
/// berth serves that shape at `/v1/sd/prometheus`: the real Prometheus
/// discovers and scrapes berth's healthy instances, with berth's labels,
/// and drops an instance whose check fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_http_sd_discovers_berths_instances() {
    let prometheus = which("prometheus").expect(
        "the `prometheus` binary is needed (Debian package `prometheus`; scripts/deps installs it)",
    );
    let h = Harness::start().await;
    let p1 = metrics_target().await;
    let p2 = metrics_target().await;
    h.status("web", 1, p1, Health::Healthy).await;
    h.status("web", 2, p2, Health::Healthy).await;
    h.status("web", 3, free_port(), Health::Unhealthy).await;

    // The endpoint itself: healthy instances only, one group each.
    let groups = h.get("/v1/sd/prometheus?namespace=default").await.json();
    let targets: Vec<&str> = groups
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["targets"][0].as_str().unwrap())
        .collect();
    assert_eq!(
        targets,
        [format!("127.0.0.1:{p1}"), format!("127.0.0.1:{p2}")]
    );
    assert_eq!(groups[0]["labels"]["berth_service"], "web");
    assert_eq!(groups[0]["labels"]["__meta_berth_meta_release"], "1");
    assert_eq!(
        h.get("/v1/sd/prometheus?namespace=staging").await.json(),
        json!([])
    );

    let web_port = free_port();
    let config = h.dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 500ms\n\
             scrape_configs:\n  - job_name: berth\n    http_sd_configs:\n      - url: http://127.0.0.1:{}/v1/sd/prometheus\n        refresh_interval: 1s\n\
             \x20   relabel_configs:\n      - source_labels: [__meta_berth_meta_release]\n        target_label: release\n",
            h.addr.port()
        ),
    )
    .unwrap();
    let log_path = h.dir.path().join("prometheus.log");
    let _child = Child(
        std::process::Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                h.dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{web_port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    );

    // Prometheus's own view: both healthy instances scraped ("up"), with
    // berth's labels and the relabelled release; the unhealthy one absent.
    // Sorted like `up_targets`' answer: the ports are random, so p2 may sort
    // before p1.
    let mut want = vec![
        (format!("127.0.0.1:{p1}"), "web.1".to_owned()),
        (format!("127.0.0.1:{p2}"), "web.2".to_owned()),
    ];
    want.sort();
    let up_targets = |v: &Value| -> Vec<(String, String)> {
        let mut got: Vec<(String, String)> = v["data"]["activeTargets"]
            .as_array()
            .unwrap_or(&vec![])
            .iter()
            .filter(|t| {
                t["health"] == "up"
                    && t["labels"]["berth_service"] == "web"
                    && t["labels"]["berth_stack"] == "shop"
                    && t["labels"]["release"] == "1"
            })
            .map(|t| {
                (
                    t["labels"]["instance"].as_str().unwrap_or("").to_owned(),
                    t["labels"]["berth_instance"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned(),
                )
            })
            .collect();
        got.sort();
        got
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = Value::Null;
    loop {
        if let Ok(v) = prom_targets(web_port).await {
            if up_targets(&v) == want {
                break;
            }
            last = v;
        }
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        assert!(
            Instant::now() < deadline,
            "Prometheus did not discover {want:?}; targets: {last}\nlog:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // A change in berth reaches Prometheus: web.2 fails its check.
    h.status("web", 2, p2, Health::Unhealthy).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = prom_targets(web_port).await.unwrap_or(Value::Null);
        let instances: Vec<&str> = v["data"]["activeTargets"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t["labels"]["instance"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        if instances == [format!("127.0.0.1:{p1}").as_str()] {
            break;
        }
        assert!(Instant::now() < deadline, "web.2 still a target: {v}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
