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
    // The agent keeps its own copy (its writer flushes the file after
    // publishing the line to the shipper: wait rather than race it).
    wait_until(
        "the line in the agent's own file",
        Duration::from_secs(30),
        || {
            let local = std::fs::read_to_string(state.join("logs/default/flogs/web.1/current.log"))
                .map_err(|e| format!("agent's local log file: {e}"))?;
            if local.contains("url:/before-follow.txt") {
                Ok(())
            } else {
                Err(local)
            }
        },
    );

    // Following: a line written after `logs -f` started shows up in it.
    let mut follow = Proc(
        berth
            .command(dir, &["logs", "-f", "-p", "flogs"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let seen = collect(follow.0.stdout.take().unwrap());
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

/// The lines an instance on a joined node writes while it stops (berth's
/// `stopping`/`stopped` and what the program prints on SIGTERM) reach the
/// server: the agent holds the instance's forget until they are shipped
/// (the server refuses lines of instances the node no longer reports).
#[test]
fn the_last_lines_of_an_agents_instance_reach_the_server() {
    let mut berth = Berth::new();
    let api = berth.start_server_without_agent(free_port());
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let token = berth.ok(dir, &["token"]).trim().to_owned();
    let agent = spawn_agent(&berth, &api, &token, "n1").no_edge().start();

    std::fs::write(
        dir.join("compose.yaml"),
        concat!(
            "services:\n",
            "  bye:\n",
            "    command: [\"sh\", \"-c\", \"trap 'echo bye-on-term; exit 0' TERM; echo trap-set; while true; do sleep 0.1; done\"]\n",
        ),
    )
    .unwrap();
    berth.ok(dir, &["up", "-d", "-p", "last"]);
    // The trap is set once its line is shipped: TERM before it would kill
    // the shell without the line this test looks for.
    wait_until(
        "bye running on n1, its trap set",
        Duration::from_secs(60),
        || {
            let ps = berth.ps(dir, "last");
            match instances(&ps, "bye")
                .first()
                .and_then(|i| i["node"].as_str())
            {
                Some("n1") => {}
                other => return Err(format!("on {other:?}\nagent: {}", agent.log())),
            }
            let out = berth.ok(dir, &["logs", "-p", "last"]);
            if out.contains("trap-set") {
                Ok(())
            } else {
                Err(format!("{out}\nagent: {}", agent.log()))
            }
        },
    );

    berth.ok(dir, &["scale", "-p", "last", "bye=0"]);
    // The instance is gone from the server (forgotten)…
    wait_until("bye forgotten", Duration::from_secs(30), || {
        let ps = berth.ps(dir, "last");
        if instances(&ps, "bye").is_empty() {
            Ok(())
        } else {
            Err(format!("{ps:?}\nagent: {}", agent.log()))
        }
    });
    // …and its last lines reach the server: they were shipped before the
    // forget (without the hold they were refused, and never came). Waited
    // for, since the server's log writer may still be writing them.
    wait_until(
        "the last lines in `berth logs`",
        Duration::from_secs(20),
        || {
            let out = berth.ok(dir, &["logs", "-p", "last"]);
            match ["stopping (SIGTERM", "bye-on-term", "stopped: "]
                .into_iter()
                .find(|want| !out.contains(want))
            {
                None => Ok(()),
                Some(want) => Err(format!("{want:?} missing:\n{out}\nagent: {}", agent.log())),
            }
        },
    );
}

/// Appends `line` to the file an instance `tail -F`s.
fn append(path: &std::path::Path, line: &str) {
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    writeln!(f, "{line}").unwrap();
}

/// Collects a child's stdout or stderr into a string, on a thread.
fn collect(mut from: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let seen = Arc::new(Mutex::new(String::new()));
    let sink = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    seen
}

fn wait_for_text(what: &str, seen: &Mutex<String>, text: &str) {
    wait_until(what, Duration::from_secs(20), || {
        let s = seen.lock().unwrap();
        if s.contains(text) {
            Ok(())
        } else {
            Err(s.clone())
        }
    });
}

/// Two servers on one real etcd, each with its local agent running one
/// service, whose lines stay on that server. `berth logs` (past, `--tail`,
/// `--grep`, `-f`) asked of s1 shows s2's lines too; with s2 killed, s1
/// still answers, with a warning naming s2.
#[test]
fn logs_asked_of_one_server_include_every_servers_lines() {
    let etcd = Etcd::start();
    // Each with its own local agent.
    let (s1, api1) = etcd.server("fanout", "s1", &[]);
    let (s2, _) = etcd.server("fanout", "s2", &[]);
    wait_until("both servers listed", Duration::from_secs(15), || {
        let (_, body) = api_request(&api1, "GET", "/v1/servers", None);
        if body.contains("\"s1\"") && body.contains("\"s2\"") {
            Ok(())
        } else {
            Err(body)
        }
    });
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let fed = dir.join("b.txt");
    std::fs::write(&fed, "b-line-1\n").unwrap();
    // Each instance ends with its server (`--pid`: the server is its
    // parent), so killing s2 leaves nothing behind.
    std::fs::write(
        dir.join("compose.yaml"),
        format!(
            concat!(
                "services:\n",
                "  a:\n",
                "    command: [\"sh\", \"-c\", \"echo a-says-hello; exec tail -f /dev/null --pid=$$PPID\"]\n",
                "    deploy: {{ placement: {{ constraints: [\"node.id == s1\"] }} }}\n",
                "  b:\n",
                "    command: [\"sh\", \"-c\", \"exec tail -n +1 -F {} --pid=$$PPID\"]\n",
                "    deploy: {{ placement: {{ constraints: [\"node.id == s2\"] }} }}\n",
            ),
            fed.display()
        ),
    )
    .unwrap();
    s1.ok(dir, &["up", "-d", "-p", "fanlogs"]);

    // Each server holds only its own node's lines...
    let held = |b: &Berth, service: &str| {
        std::fs::read_to_string(
            b.data
                .path()
                .join(format!("logs/default/fanlogs/{service}.1/current.log")),
        )
        .unwrap_or_default()
    };
    wait_until("b's line stored on s2", Duration::from_secs(20), || {
        if held(&s2, "b").contains("b-line-1") {
            Ok(())
        } else {
            Err(s2.server_log())
        }
    });
    assert!(!held(&s1, "b").contains("b-line-1"), "{}", held(&s1, "b"));
    // ... and either one answers with both.
    for (name, s) in [("s1", &s1), ("s2", &s2)] {
        wait_until(
            &format!("both lines via {name}"),
            Duration::from_secs(20),
            || {
                let out = s.run(dir, &["logs", "-p", "fanlogs"]);
                let (stdout, stderr) = (
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                );
                assert!(out.status.success(), "{stdout}\n{stderr}");
                if stderr.is_empty()
                    && stdout.contains("a-says-hello")
                    && stdout.contains("b-line-1")
                {
                    Ok(())
                } else {
                    Err(stdout.into_owned())
                }
            },
        );
    }

    // Limits and searches hold over the merge: the newest line is s2's.
    append(&fed, "b-line-2");
    wait_until("b-line-2 via s1", Duration::from_secs(20), || {
        let out = s1.ok(dir, &["logs", "-p", "fanlogs", "--tail", "1"]);
        if out.contains("b-line-2") {
            Ok(())
        } else {
            Err(out)
        }
    });
    let last = s1.ok(
        dir,
        &["logs", "-p", "fanlogs", "--tail", "1", "--no-prefix"],
    );
    assert_eq!(last.trim(), "b-line-2");
    let found = s1.ok(
        dir,
        &[
            "logs",
            "-p",
            "fanlogs",
            "--grep",
            "line|hello",
            "--no-prefix",
        ],
    );
    let mut got: Vec<&str> = found.lines().collect();
    let (b1, b2) = (
        got.iter().position(|l| *l == "b-line-1"),
        got.iter().position(|l| *l == "b-line-2"),
    );
    assert!(b1 < b2, "{found}");
    got.sort_unstable();
    assert_eq!(got, ["a-says-hello", "b-line-1", "b-line-2"], "{found}");
    let json = s1.ok(dir, &["logs", "-p", "fanlogs", "--json"]);
    let stamps: Vec<u64> = json
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["ts_us"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "{json}");

    // Following s1: a line printed on s2's side arrives.
    let mut follow = s1
        .command(dir, &["logs", "-f", "-p", "fanlogs", "--no-prefix"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let seen = collect(follow.stdout.take().unwrap());
    let warned = collect(follow.stderr.take().unwrap());
    let follow = Proc(follow);
    wait_for_text("`logs -f` printed the past", &seen, "b-line-2");
    let t = Instant::now();
    append(&fed, "b-line-3");
    wait_for_text("s2's new line in `logs -f` on s1", &seen, "b-line-3");
    eprintln!(
        "a line on s2 reached `logs -f` on s1 within {:?}",
        t.elapsed()
    );

    // s2 dies: the follow says so, and s1 still answers, naming s2.
    signal(s2.server_pid().unwrap(), "KILL");
    wait_for_text(
        "`logs -f` says s2 stopped answering",
        &seen,
        "server s2 stopped answering",
    );
    let out = s1.run(dir, &["logs", "-p", "fanlogs"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("a-says-hello"), "{stdout}");
    assert!(
        stderr.contains("warning: server s2 did not answer"),
        "(s2's record outlives it by its lease, 7.5 s at least)\nstdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        warned.lock().unwrap().is_empty(),
        "{}",
        warned.lock().unwrap()
    );
    // No `down`: it would wait for s2's node lease to expire and for s1 to
    // lead; the instances end with their servers (`--pid`).
    drop(follow);
}
