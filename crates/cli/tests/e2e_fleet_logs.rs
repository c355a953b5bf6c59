//! Logs across nodes: a `berth server --no-agent` and one real
//! `berth agent --join`; the only instance runs on the agent, and
//! `berth logs` / `berth logs -f` on the server show what it writes
//! (shipped by the agent, which keeps its own files too).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// A child process stopped (TERM, then KILL) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            signal(self.0.id() as i32, "TERM");
            for _ in 0..200 {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A raw POST to the API; the status code.
fn post_status(api: &str, path: &str, body: &str) -> u16 {
    let mut s = TcpStream::connect(api).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {api}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn logs_of_an_agents_instances_are_shown_and_followed_on_the_server() {
    let mut berth = Berth::new();
    let http = free_port();
    let api = berth.start_server_without_agent(http);
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let token = berth.ok(dir, &["token"]).trim().to_owned();

    let agent = spawn_agent(&berth, &api, &token, "n1").no_edge().start();
    let state = agent.dir.path().join("state");
    let agent_log = || agent.log();

    // busybox httpd -vv writes a line per request on stderr.
    for f in ["index.html", "before-follow.txt", "after-follow.txt"] {
        std::fs::write(dir.join(f), "ok").unwrap();
    }
    std::fs::write(
        dir.join("compose.yaml"),
        concat!(
            "services:\n",
            "  web:\n",
            "    command: [\"sh\", \"-c\", \"exec busybox httpd -f -vv -p 127.0.0.1:$$PORT\"]\n",
            "    ports: [\"8080\"]\n",
            "    x-berth:\n",
            "      healthcheck: { http: /, interval: 1s, start_interval: 100ms }\n",
        ),
    )
    .unwrap();
    berth.ok(dir, &["up", "-d", "-p", "flogs"]);
    wait_until("web healthy on n1", Duration::from_secs(60), || {
        let ps = berth.ps(dir, "flogs");
        all_ready(&ps, "web", 1)?;
        match instances(&ps, "web")[0]["node"].as_str() {
            Some("n1") => Ok(()),
            other => Err(format!("on {other:?}\nagent: {}", agent_log())),
        }
    });
    wait_until(
        "the router serves the agent's instance",
        Duration::from_secs(20),
        || http_get_host(http, "web.flogs.localhost", "/before-follow.txt").map(|_| ()),
    );

    // Past lines: the request is in `berth logs` on the server.
    let t = Instant::now();
    wait_until(
        "the request's line in `berth logs`",
        Duration::from_secs(20),
        || {
            let out = berth.ok(dir, &["logs", "-p", "flogs"]);
            if out.contains("url:/before-follow.txt") {
                Ok(())
            } else {
                Err(format!("{out}\nagent: {}", agent_log()))
            }
        },
    );
    eprintln!("a past line shipped and listed within {:?}", t.elapsed());
    // The agent keeps its own copy.
    let local = std::fs::read_to_string(state.join("logs/default/flogs/web.1/current.log"))
        .unwrap_or_else(|e| panic!("agent's local log file: {e}"));
    assert!(local.contains("url:/before-follow.txt"), "{local}");

    // Following: a line written after `logs -f` started shows up in it.
    let mut follow = Proc(
        berth
            .command(dir, &["logs", "-f", "-p", "flogs"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let seen = Arc::new(Mutex::new(String::new()));
    let mut out = follow.0.stdout.take().unwrap();
    let sink = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    wait_until(
        "`logs -f` printed the past lines",
        Duration::from_secs(20),
        || {
            let s = seen.lock().unwrap();
            if s.contains("url:/before-follow.txt") {
                Ok(())
            } else {
                Err(s.clone())
            }
        },
    );
    assert!(!seen.lock().unwrap().contains("url:/after-follow.txt"));
    let t = Instant::now();
    http_get_host(http, "web.flogs.localhost", "/after-follow.txt").unwrap();
    wait_until("the new line in `logs -f`", Duration::from_secs(20), || {
        let s = seen.lock().unwrap();
        if s.contains("url:/after-follow.txt") {
            Ok(())
        } else {
            Err(format!("{s}\nagent: {}", agent_log()))
        }
    });
    eprintln!("a new line reached `logs -f` within {:?}", t.elapsed());
    // In time order: the earlier request's line comes first.
    let s = seen.lock().unwrap().clone();
    assert!(
        s.find("url:/before-follow.txt") < s.find("url:/after-follow.txt"),
        "{s}"
    );
    drop(follow);

    // The route takes the node's credential, like every agent route.
    let status = post_status(&api, "/v1/agent/nodes/n1/logs", "{\"lines\":[]}");
    assert_eq!(status, 401);

    berth.ok(dir, &["down", "-p", "flogs"]);
}
