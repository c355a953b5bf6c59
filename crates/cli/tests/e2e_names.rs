//! End-to-end "deploy, and it just connects" (issue 3): unmodified
//! Compose-style files whose services call each other by service name.
//!
//! - Two process services: the caller fetches `http://api:8000/` by name
//!   (its `/etc/hosts` maps `api` to the service's stable address, served by
//!   berth's proxy), gets `API_HOST`/`_PORT`/`_URL` and the Docker-links
//!   variables, and keeps reaching the api after `kill -9` of the api and
//!   after the api moves to a new instance, with no restart of its own.
//! - A container and processes: the container calls a process service by
//!   name, and a process calls the container service by name.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// A tiny HTTP server on `$PORT` answering `<BERTH_INSTANCE> <pid>`.
const API_PY: &str = r#"
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("%s %d\n" % (os.environ["BERTH_INSTANCE"], os.getpid())).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

/// Dumps its environment once, then fetches `$TARGET` forever, writing the
/// last answer (or error) to `<name>.out` atomically.
const CALLER_PY: &str = r#"
import json, os, sys, time, urllib.request
name = os.environ["BERTH_SERVICE"]
with open(name + ".env.tmp", "w") as f:
    json.dump({"pid": os.getpid(), "env": dict(os.environ)}, f)
os.rename(name + ".env.tmp", name + ".env")
n = 0
while True:
    n += 1
    try:
        body = urllib.request.urlopen(os.environ["TARGET"], timeout=2).read().decode().strip()
        line = "%d ok %s" % (n, body)
    except Exception as e:
        line = "%d err %s" % (n, e)
    with open(name + ".out.tmp", "w") as f:
        f.write(line)
    os.rename(name + ".out.tmp", name + ".out")
    time.sleep(0.1)
"#;

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

/// The caller's last result: (sequence number, ok, body or error).
fn last(dir: &Path, name: &str) -> Option<(u64, bool, String)> {
    let s = std::fs::read_to_string(dir.join(format!("{name}.out"))).ok()?;
    let mut it = s.splitn(3, ' ');
    let n = it.next()?.parse().ok()?;
    let ok = it.next()? == "ok";
    Some((n, ok, it.next().unwrap_or_default().to_owned()))
}

/// Wait for a successful answer newer than `after` and return its body.
fn answer_after(berth: &Berth, dir: &Path, name: &str, after: u64) -> (u64, String) {
    let mut got = None;
    wait_until(
        &format!("{name} reaches its peer by name"),
        Duration::from_secs(30),
        || match last(dir, name) {
            Some((n, true, body)) if n > after => {
                got = Some((n, body));
                Ok(())
            }
            other => Err(format!("{other:?}\n{}", berth.server_log())),
        },
    );
    got.unwrap()
}

fn env_of(dir: &Path, name: &str) -> (i64, BTreeMap<String, String>) {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.env"))).unwrap())
            .unwrap();
    (
        v["pid"].as_i64().unwrap(),
        serde_json::from_value(v["env"].clone()).unwrap(),
    )
}

fn api_pid(berth: &Berth, dir: &Path, stack: &str) -> i64 {
    let ps = berth.ps(dir, stack);
    instances(&ps, "api")[0]["pid"].as_i64().unwrap()
}

#[test]
fn processes_call_each_other_by_name_through_stable_addresses() {
    let berth = Berth::new();
    let stack = format!("names{}", std::process::id());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write(dir, "api.py", API_PY);
    write(dir, "caller.py", CALLER_PY);
    write(
        dir,
        "compose.yaml",
        concat!(
            "services:\n",
            "  api:\n",
            "    command: [\"python3\", \"-u\", \"api.py\"]\n",
            "    ports: [\"8000\"]\n",
            "    expose: [\"9000\"]\n",
            "    restart: always\n",
            "    x-berth:\n",
            "      healthcheck: { http: /, interval: 300ms, timeout: 1s, retries: 2, start_period: 30s, start_interval: 50ms }\n",
            "  caller:\n",
            "    command: [\"python3\", \"-u\", \"caller.py\"]\n",
            "    environment:\n",
            "      TARGET: http://api:8000/\n",
            "      API_PORT_9000_TCP_PROTO: mine\n",
            "    depends_on:\n",
            "      api: { condition: service_healthy }\n",
        ),
    );
    berth.ok(dir, &["up", "-d", "-p", &stack]);
    let (n0, body) = answer_after(&berth, dir, "caller", 0);
    assert!(body.starts_with("api.1 "), "{body}");

    // The discovery variables: the stable address, never an instance's.
    let (caller_pid, env) = env_of(dir, "caller");
    let host = env["API_HOST"].clone();
    assert!(host.starts_with("127.77."), "{env:?}");
    assert_eq!(env["API_PORT"], "8000");
    assert_eq!(env["API_URL"], format!("http://{host}:8000"));
    assert_eq!(env["API_PORT_8000_TCP"], format!("tcp://{host}:8000"));
    assert_eq!(env["API_PORT_8000_TCP_ADDR"], host);
    assert_eq!(env["API_PORT_8000_TCP_PORT"], "8000");
    assert_eq!(env["API_PORT_9000_TCP_PORT"], "9000");
    // The user's own value is kept.
    assert_eq!(env["API_PORT_9000_TCP_PROTO"], "mine");
    assert!(
        env["BERTH_HOSTS"]
            .split(' ')
            .any(|h| h == format!("api.{stack}={host}")),
        "{env:?}"
    );
    // The host's own /etc/hosts is untouched.
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap();
    assert!(!hosts.contains("127.77."), "{hosts}");
    // The variables work too, and so does `name.stack`.
    assert!(
        http_get_addr(&format!("{host}:8000")).is_ok_and(|b| b.contains("api.1")),
        "{host}:8000"
    );

    // kill -9 of the api: it is restarted (a new process on a new port),
    // and the caller reaches it again with no restart of its own.
    let old = api_pid(&berth, dir, &stack);
    signal(old as i32, "KILL");
    let mut body = String::new();
    let mut n = n0;
    wait_until(
        "the caller reaches the restarted api",
        Duration::from_secs(30),
        || {
            let (m, b) = answer_after(&berth, dir, "caller", n);
            n = m;
            body = b;
            if body.ends_with(&format!(" {old}")) {
                Err(format!("still the old pid: {body}"))
            } else {
                Ok(())
            }
        },
    );
    assert!(body.starts_with("api."), "{body}");

    // The api moves to a new instance (a new slot, a new port): same.
    berth.ok(dir, &["restart", "-p", &stack, "api"]);
    wait_until(
        "the caller reaches the replacement api",
        Duration::from_secs(40),
        || {
            let (m, b) = answer_after(&berth, dir, "caller", n);
            n = m;
            if b.starts_with("api.1 ") {
                Err(format!("still api.1: {b}"))
            } else {
                Ok(())
            }
        },
    );
    let (pid_now, env_now) = env_of(dir, "caller");
    assert_eq!(pid_now, caller_pid, "the caller was not restarted");
    assert_eq!(env_now["API_HOST"], host);
    assert!(alive(caller_pid as i32));

    // `down` frees the addresses: nothing listens on the VIP any more.
    berth.ok(dir, &["down", "-p", &stack]);
    wait_until(
        "the VIP is closed",
        Duration::from_secs(10),
        || match std::net::TcpStream::connect(format!("{host}:8000")) {
            Ok(_) => Err("still listening".into()),
            Err(_) => Ok(()),
        },
    );
}

/// An HTTP GET to `addr` (ip:port).
fn http_get_addr(addr: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET / HTTP/1.0\r\nHost: x\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

#[test]
fn containers_and_processes_call_each_other_by_name() {
    let status = Command::new(repo().join("scripts/test-image"))
        .status()
        .unwrap();
    assert!(status.success(), "scripts/test-image failed");
    let berth = Berth::new();
    let stack = format!("namesdock{}", std::process::id());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write(dir, "api.py", API_PY);
    write(dir, "caller.py", CALLER_PY);
    write(
        dir,
        "compose.yaml",
        concat!(
            "services:\n",
            "  api:\n",
            "    command: [\"python3\", \"-u\", \"api.py\"]\n",
            "    ports: [\"8000\"]\n",
            "    restart: always\n",
            "  box:\n",
            "    image: berth-test/busybox:latest\n",
            "    pull_policy: never\n",
            // Serves a page, and asks the process service by name forever.
            "    command: [\"sh\", \"-c\", \"mkdir -p /www && echo from-the-container > /www/index.html && httpd -p 8080 -h /www && while :; do printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc api 8000 | tail -n 1; sleep 0.3; done\"]\n",
            "    expose: [\"8080\"]\n",
            "    depends_on: [api]\n",
            "  caller:\n",
            "    command: [\"python3\", \"-u\", \"caller.py\"]\n",
            "    environment:\n",
            "      TARGET: http://box:8080/\n",
            "    depends_on: [box]\n",
        ),
    );
    berth.ok(dir, &["up", "-d", "-p", &stack]);

    // Process → container, by name.
    let (_, body) = answer_after(&berth, dir, "caller", 0);
    assert_eq!(body, "from-the-container");
    let (_, env) = env_of(dir, "caller");
    assert!(env["BOX_HOST"].starts_with("127.77."), "{env:?}");

    // Container → process, by name: the container's log shows the api's
    // answer.
    wait_until(
        "the container reaches the process service by name",
        Duration::from_secs(30),
        || {
            let logs = berth.ok(dir, &["logs", "-p", &stack, "box"]);
            if logs.contains("api.1 ") {
                Ok(())
            } else {
                Err(logs)
            }
        },
    );
    // Its variables point at the container-facing address.
    let ps = berth.ps(dir, &stack);
    let box_ip = instances(&ps, "box")[0]["address"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!box_ip.starts_with("127."), "{box_ip}");
    berth.ok(dir, &["down", "-p", &stack]);
}
