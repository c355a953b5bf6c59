//! End-to-end acceptance of zero-downtime deploys through the HTTP router
//! (issue 3): the real `berth` binary and server, busybox httpd instances,
//! and a bounded load generator (32 keep-alive HTTP/1.1 clients, hyper on
//! tokio) sending `Host: web.<stack>.localhost` to the router throughout
//! five deploys that change the code or the env, a scale 3→6→2, and a
//! failing deploy that rolls back on its own. The assertion is the issue's:
//! zero connection errors and zero 5xx.
//!
//! Along the way it checks `berth services` (the catalog the router follows)
//! and the optional Consul listener (`berth server --consul-listen`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;

mod common;

use common::*;

/// Requests per client connection before it reconnects, so the test covers
/// new connections to the router as well as long-lived ones.
const REQUESTS_PER_CONNECTION: u64 = 50;

/// Bounded load: `concurrency` clients, each on its own keep-alive
/// connection to the router, one request at a time with a short pause.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    versions: Arc<Mutex<BTreeMap<String, u64>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Load {
    fn start(router: u16, host: String, concurrency: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let versions = Arc::new(Mutex::new(BTreeMap::new()));
        let thread = {
            let (stop, ok, failures, versions) =
                (stop.clone(), ok.clone(), failures.clone(), versions.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let t0 = Instant::now();
                    let mut tasks = tokio::task::JoinSet::new();
                    for _ in 0..concurrency {
                        let (stop, ok, failures, versions, host) = (
                            stop.clone(),
                            ok.clone(),
                            failures.clone(),
                            versions.clone(),
                            host.clone(),
                        );
                        tasks.spawn(async move {
                            while !stop.load(Ordering::Relaxed) {
                                client(router, &host, &stop, &ok, &versions, |e| {
                                    failures
                                        .lock()
                                        .unwrap()
                                        .push(format!("{e} at {:?}", t0.elapsed()))
                                })
                                .await;
                            }
                        });
                    }
                    while tasks.join_next().await.is_some() {}
                });
            })
        };
        Self {
            stop,
            ok,
            failures,
            versions,
            thread,
        }
    }

    fn finish(self) -> (u64, Vec<String>, BTreeMap<String, u64>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        let failures = self.failures.lock().unwrap().clone();
        let versions = self.versions.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failures, versions)
    }
}

/// One client connection: up to [`REQUESTS_PER_CONNECTION`] requests, each
/// failure reported (a failed connection counts once and is reopened).
async fn client(
    router: u16,
    host: &str,
    stop: &AtomicBool,
    ok: &AtomicU64,
    versions: &Mutex<BTreeMap<String, u64>>,
    fail: impl Fn(String),
) {
    let stream = match tokio::net::TcpStream::connect(("127.0.0.1", router)).await {
        Ok(s) => s,
        Err(e) => {
            fail(format!("connect: {e}"));
            tokio::time::sleep(Duration::from_millis(10)).await;
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(x) => x,
        Err(e) => return fail(format!("handshake: {e}")),
    };
    let conn = tokio::spawn(conn);
    for _ in 0..REQUESTS_PER_CONNECTION {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let req = Request::get("/")
            .header("host", host)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let sent = tokio::time::timeout(Duration::from_secs(10), async {
            let resp = sender.send_request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        })
        .await;
        match sent {
            Ok(Ok((status, body))) if status.is_success() => {
                ok.fetch_add(1, Ordering::Relaxed);
                let v = String::from_utf8_lossy(&body).trim().to_owned();
                *versions.lock().unwrap().entry(v).or_default() += 1;
            }
            Ok(Ok((status, body))) => {
                fail(format!(
                    "{status}: {}",
                    String::from_utf8_lossy(&body).trim()
                ));
            }
            Ok(Err(e)) => {
                fail(format!("request: {e}"));
                break;
            }
            Err(_) => {
                fail("no answer in 10 s".into());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(sender);
    let _ = conn.await;
}

fn stack_file(version: &str, command_tail: &str) -> String {
    format!(
        concat!(
            "services:\n",
            "  web:\n",
            "    command: [\"sh\", \"-c\", \"d=$$BERTH_INSTANCE; mkdir -p $$d && echo $$VERSION > $$d/index.html && {tail}\"]\n",
            "    environment:\n",
            "      VERSION: \"{version}\"\n",
            "    ports: [\"8080\"]\n",
            "    labels: {{ tier: front }}\n",
            "    stop_grace_period: 5s\n",
            "    x-berth:\n",
            "      healthcheck: {{ http: /, interval: 200ms, start_interval: 100ms, retries: 2 }}\n",
            "    deploy:\n",
            "      replicas: 3\n",
            "      update_config: {{ monitor: 1s }}\n",
        ),
        version = version,
        tail = command_tail,
    )
}

const HTTPD: &str = "exec busybox httpd -f -p 127.0.0.1:$$PORT -h $$d";

fn ready_web(ps: &[Value], n: usize) -> Result<(), String> {
    let web: Vec<&Value> = ps
        .iter()
        .filter(|i| i["service"] == "web" && !i["desired"].is_null())
        .collect();
    let ready = web
        .iter()
        .filter(|i| i["state"] == "running" && i["health"] == "healthy")
        .count();
    if web.len() == n && ready == n {
        Ok(())
    } else {
        Err(format!("{ready}/{} ready, want {n}", web.len()))
    }
}

/// A plain GET on the Consul listener; (status line, body).
fn consul_get(port: u16, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

#[test]
fn deploys_scale_and_a_failed_deploy_through_the_router_lose_no_request() {
    let mut berth = Berth::new();
    let stack = format!("rzdt{}", std::process::id());
    let [http, dns, consul] = free_ports();
    berth
        .env
        .insert("BERTH_HTTP".into(), format!("127.0.0.1:{http}"));
    berth
        .env
        .insert("BERTH_DNS".into(), format!("127.0.0.1:{dns}"));
    berth
        .env
        .insert("BERTH_CONSUL_LISTEN".into(), format!("127.0.0.1:{consul}"));
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let file = dir.join("compose.yaml");
    std::fs::write(&file, stack_file("v1", HTTPD)).unwrap();
    berth.ok(dir, &["up", "-d", "-p", &stack]);
    let host = format!("web.{stack}.localhost");
    wait_until("the router serves web", Duration::from_secs(30), || {
        http_get_host(http, &host, "/").map(|_| ())
    });

    // The catalog the router follows: three healthy instances, the route
    // the load below uses, the DNS names.
    let services: Value =
        serde_json::from_str(&berth.ok(dir, &["services", "-p", &stack, "--json"])).unwrap();
    let web = &services[0];
    assert_eq!(web["service"], "web", "{services}");
    let instances = web["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 3, "{web}");
    assert!(instances.iter().all(|i| i["healthy"] == true), "{web}");
    assert!(
        instances.iter().all(|i| i["tags"][0] == "tier=front"),
        "{web}"
    );
    assert!(
        web["routes"]
            .as_array()
            .unwrap()
            .contains(&Value::from(format!("{host}/"))),
        "{web}"
    );
    assert_eq!(web["dns"][0], format!("web.{stack}.default.berth."));
    let text = berth.ok(dir, &["services", "-p", &stack]);
    assert!(
        text.starts_with(&format!("web (stack {stack}): 3/3 healthy\n")),
        "{text}"
    );
    assert!(text.contains(&format!("http://{host}/")), "{text}");

    // The Consul listener serves the Consul subset, and only that.
    let (status, body) = consul_get(consul, &format!("/v1/health/service/web.{stack}?passing"));
    assert!(status.contains(" 200 "), "{status}");
    let entries: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(entries.as_array().unwrap().len(), 3, "{entries}");
    let (status, _) = consul_get(consul, "/v1/stacks");
    assert!(status.contains(" 404 "), "{status}");

    let load = Load::start(http, host.clone(), 32);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(500));

    // Five deploys: three change the code (the command), two the env.
    for v in 2..=6 {
        let tail = if v % 2 == 0 {
            HTTPD.to_owned()
        } else {
            format!("echo code-{v} >/dev/null && {HTTPD}")
        };
        std::fs::write(&file, stack_file(&format!("v{v}"), &tail)).unwrap();
        berth.ok(
            dir,
            &["deploy", "-p", &stack, "-m", &format!("version {v}")],
        );
        eprintln!("deployed v{v} at {:?}", t0.elapsed());
    }
    berth.ok(dir, &["scale", "-p", &stack, "web=6"]);
    wait_until("6 ready", Duration::from_secs(60), || {
        ready_web(&berth.ps(dir, &stack), 6)
    });
    eprintln!("scaled to 6 at {:?}", t0.elapsed());
    berth.ok(dir, &["scale", "-p", &stack, "web=2"]);
    wait_until("2 ready", Duration::from_secs(60), || {
        ready_web(&berth.ps(dir, &stack), 2)
    });
    eprintln!("scaled to 2 at {:?}", t0.elapsed());

    // A deploy whose instances exit at once: rolled back automatically.
    std::fs::write(
        &file,
        stack_file("v7", "echo 'cannot open database' >&2; exit 1"),
    )
    .unwrap();
    let out = berth.run(dir, &["deploy", "-p", &stack, "-m", "broken"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(5),
        "deploy of a broken release: {err}"
    );
    assert!(err.contains("rolled back"), "{err}");
    eprintln!("broken deploy returned at {:?}", t0.elapsed());
    wait_until("rollback complete", Duration::from_secs(60), || {
        let r: Value =
            serde_json::from_str(&berth.ok(dir, &["releases", "-p", &stack, "--json"])).unwrap();
        if r["rollout"]["state"] == "complete" {
            Ok(())
        } else {
            Err(r["rollout"].to_string())
        }
    });
    std::thread::sleep(Duration::from_millis(1500));
    let (ok, failures, versions) = load.finish();
    eprintln!(
        "load through the router: {ok} ok, {} failed, versions seen {versions:?}",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} requests failed; first: {:?}\nserver log: {}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(20)],
        berth.server_log()
    );
    assert!(ok > 1000, "the load generator did run: {ok}");
    for v in 1..=6 {
        assert!(
            versions.contains_key(&format!("v{v}")),
            "v{v} served: {versions:?}"
        );
    }
    assert!(!versions.contains_key("v7"), "{versions:?}");
    assert_eq!(versions.len(), 6, "only v1..v6 answered: {versions:?}");
    let last = http_get_host(http, &host, "/").unwrap();
    assert!(
        last.ends_with("v6\n"),
        "the last good release serves: {last}"
    );

    // After the rollback, the catalog lists exactly the serving instances.
    let services: Value =
        serde_json::from_str(&berth.ok(dir, &["services", "-p", &stack, "--json"])).unwrap();
    let healthy = services[0]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["healthy"] == true)
        .count();
    assert_eq!(healthy, 3, "{services}");

    berth.ok(dir, &["down", "-p", &stack]);
}
