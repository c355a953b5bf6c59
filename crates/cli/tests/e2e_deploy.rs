//! End-to-end acceptance of zero-downtime deploys (issue 3): the real
//! `berth` binary and server, real busybox httpd instances behind a real
//! published port, and a load generator hammering that port throughout five
//! deploys, a scale 3→6→2 and a failing deploy that rolls back on its own.
//! The assertion is the issue's: zero failed requests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::*;

/// One request, no keep-alive: the body on a 200, an error otherwise.
fn get(port: u16) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET / HTTP/1.0\r\nHost: localhost\r\n\r\n").map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read: {e}"))?;
    if out.starts_with("HTTP/1.") && out.lines().next().is_some_and(|l| l.contains(" 200 ")) {
        Ok(out
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .trim()
            .to_owned())
    } else if out.is_empty() {
        Err("connection closed without an answer".into())
    } else {
        Err(format!(
            "bad answer: {}",
            out.lines().next().unwrap_or_default()
        ))
    }
}

/// N client threads, each GETting in a loop until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    versions: Arc<Mutex<BTreeMap<String, u64>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, concurrency: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let versions = Arc::new(Mutex::new(BTreeMap::new()));
        let threads = (0..concurrency)
            .map(|_| {
                let (stop, ok, failures, versions) =
                    (stop.clone(), ok.clone(), failures.clone(), versions.clone());
                let t0 = Instant::now();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match get(port) {
                            Ok(body) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                *versions.lock().unwrap().entry(body).or_default() += 1;
                            }
                            Err(e) => failures
                                .lock()
                                .unwrap()
                                .push(format!("{e} at {:?}", t0.elapsed())),
                        }
                        // Bounded: the machine's two cores are shared.
                        std::thread::sleep(Duration::from_millis(10));
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok,
            failures,
            versions,
            threads,
        }
    }

    fn finish(self) -> (u64, Vec<String>, BTreeMap<String, u64>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        let versions = self.versions.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failures, versions)
    }
}

fn stack_file(port: u16, version: &str, command_tail: &str) -> String {
    format!(
        concat!(
            "services:\n",
            "  web:\n",
            "    command: [\"sh\", \"-c\", \"d=$$BERTH_INSTANCE; mkdir -p $$d && echo $$VERSION > $$d/index.html && {tail}\"]\n",
            "    environment:\n",
            "      VERSION: \"{version}\"\n",
            "    ports: [\"{port}:8080\"]\n",
            "    stop_grace_period: 5s\n",
            "    x-berth:\n",
            "      healthcheck: {{ http: /, interval: 200ms, start_interval: 100ms, retries: 2 }}\n",
            "    deploy:\n",
            "      replicas: 3\n",
            "      update_config: {{ monitor: 1s }}\n",
        ),
        port = port,
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

#[test]
fn deploys_scale_and_a_failed_deploy_under_load_lose_no_request() {
    let mut berth = Berth::new();
    berth.env.insert("USER".into(), "tester".into());
    let stack = format!("zdt{}", std::process::id());
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let file = dir.join("compose.yaml");
    std::fs::write(&file, stack_file(port, "v1", HTTPD)).unwrap();
    berth.ok(dir, &["up", "-d", "-p", &stack]);
    wait_until(
        "the published port answers",
        Duration::from_secs(30),
        || get(port).map(|_| ()),
    );

    let load = Load::start(port, 32);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(500));

    // A dry run names the changed field and writes nothing.
    std::fs::write(&file, stack_file(port, "v2", HTTPD)).unwrap();
    let plan = berth.ok(dir, &["deploy", "-p", &stack, "--dry-run", "--json"]);
    let plan: Value = serde_json::from_str(&plan).unwrap();
    assert_eq!(plan["services"][0]["action"], "replace", "{plan}");
    assert_eq!(
        plan["services"][0]["changes"][0]["field"], "environment.VERSION",
        "{plan}"
    );

    for v in 2..=6 {
        std::fs::write(&file, stack_file(port, &format!("v{v}"), HTTPD)).unwrap();
        let msg = format!("version {v}");
        berth.ok(dir, &["deploy", "-p", &stack, "-m", &msg]);
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
        stack_file(port, "v7", "echo 'cannot open database' >&2; exit 1"),
    )
    .unwrap();
    let out = berth.run(dir, &["deploy", "-p", &stack, "-m", "broken"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(5),
        "deploy of a broken release: {err}"
    );
    eprintln!("broken deploy returned at {:?}: {err}", t0.elapsed());
    assert!(err.contains("rolled back"), "{err}");
    assert!(err.contains("exited with code 1"), "{err}");
    assert!(
        err.contains("cannot open database"),
        "log lines quoted: {err}"
    );

    // Let the rollback settle while the load keeps running.
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
        "load: {ok} ok, {} failed, versions seen {versions:?}",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} requests failed; first: {:?}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(20)]
    );
    assert!(ok > 1000, "the load generator did run: {ok}");
    for v in 1..=6 {
        assert!(
            versions.contains_key(&format!("v{v}")),
            "v{v} served: {versions:?}"
        );
    }
    assert!(!versions.contains_key("v7"));
    assert_eq!(get(port).unwrap(), "v6", "the last good release serves");
    // A deploy sets the scale to the file's again (3), and its rollback kept that.
    ready_web(&berth.ps(dir, &stack), 3).unwrap();

    // The history: v1 up, v2..v6 deploys, v7 broken, v8 its rollback.
    let r: Value =
        serde_json::from_str(&berth.ok(dir, &["releases", "-p", &stack, "--json"])).unwrap();
    let releases = r["releases"].as_array().unwrap();
    assert_eq!(releases.len(), 8, "{r}");
    assert_eq!(releases[2]["message"], "version 3");
    assert_eq!(releases[2]["author"], "tester");
    assert!(
        releases[7]["message"]
            .as_str()
            .unwrap()
            .starts_with("automatic rollback of v7"),
        "{r}"
    );
    assert_eq!(r["current"], 8);

    // A manual rollback, and config vars: both new releases, rolled out.
    berth.ok(dir, &["rollback", "-p", &stack, "v3"]);
    assert_eq!(get(port).unwrap(), "v3");
    berth.ok(dir, &["env", "-p", &stack, "set", "VERSION=from-env"]);
    assert_eq!(get(port).unwrap(), "from-env");
    let env = berth.ok(dir, &["env", "-p", &stack]);
    assert!(env.contains("VERSION=from-env  (berth env)"), "{env}");
    // Config vars survive the next deploy of the file.
    std::fs::write(&file, stack_file(port, "v9", HTTPD)).unwrap();
    berth.ok(dir, &["deploy", "-p", &stack]);
    assert_eq!(get(port).unwrap(), "from-env");
    berth.ok(dir, &["env", "-p", &stack, "unset", "VERSION"]);
    assert_eq!(get(port).unwrap(), "", "unset removes the variable");

    berth.ok(dir, &["down", "-p", &stack]);
}
