//! End-to-end acceptance of the core (issue 2): the real `berth` binary, a
//! real server with its embedded store, real child processes, real sockets.
//!
//! Every test uses its own data dir and a unique stack name, so the process
//! table can be checked for leftovers by the `BERTH_STACK` each instance
//! carries in its environment.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;

#[test]
fn example_stack_up_heals_scales_and_goes_down_cleanly() {
    let mut berth = Berth::new();
    let stack = format!("poly{}", std::process::id());
    let [api_port, web_port] = free_ports();
    berth.env.insert("API_PORT".into(), api_port.to_string());
    berth.env.insert("WEB_PORT".into(), web_port.to_string());
    let dir = repo().join("examples/polyglot");

    berth.ok(&dir, &["up", "-d", "-p", &stack]);
    let ps = berth.ps(&dir, &stack);
    for (service, n) in [("api", 2), ("web", 2), ("worker", 1)] {
        all_ready(&ps, service, n).unwrap();
    }
    for i in &ps {
        for key in [
            "stack", "service", "instance", "state", "health", "pid", "address", "restarts",
        ] {
            assert!(i.get(key).is_some(), "ps --json lacks {key}: {i}");
        }
        assert_eq!(i["stack"], stack.as_str());
    }
    // The front end answers through its published port, with the API's
    // answer. `up -d` waited for the instances; the TCP proxy learns of them
    // from the store on its own, a moment later on a loaded machine.
    let mut page = String::new();
    wait_until(
        "the front end through its published port",
        Duration::from_secs(30),
        || {
            page = http_get(web_port, "/")?;
            Ok(())
        },
    );
    assert!(
        page.contains("\"api\"") && page.contains("hello from the python api"),
        "{page}"
    );

    // kill -9 of one app process: back and healthy by itself.
    let victim = instances(&ps, "api")[0].clone();
    let pid = victim["pid"].as_i64().unwrap() as i32;
    signal(pid, "KILL");
    wait_until("api instance to come back", Duration::from_secs(30), || {
        let ps = berth.ps(&dir, &stack);
        let me = ps
            .iter()
            .find(|i| i["instance"] == victim["instance"])
            .ok_or("gone")?;
        let back = me["restarts"].as_u64() >= Some(1)
            && me["pid"].as_i64() != Some(pid as i64)
            && me["health"] == "healthy";
        if back { Ok(()) } else { Err(me.to_string()) }
    });

    // scale web=5 then =1.
    berth.ok(&dir, &["scale", "-p", &stack, "web=5"]);
    wait_until("5 healthy web", Duration::from_secs(30), || {
        all_ready(&berth.ps(&dir, &stack), "web", 5)
    });
    berth.ok(&dir, &["scale", "-p", &stack, "web=1"]);
    wait_until("1 web", Duration::from_secs(30), || {
        all_ready(&berth.ps(&dir, &stack), "web", 1)
    });
    wait_until("web processes down to 1", Duration::from_secs(30), || {
        let n = processes_of(&stack, Some("web")).len();
        if n == 1 {
            Ok(())
        } else {
            Err(format!("{n} web processes"))
        }
    });
    // The proxy drops the removed instances on its own, a moment later.
    wait_until(
        "the front end after scaling down",
        Duration::from_secs(30),
        || http_get(web_port, "/").map(|_| ()),
    );

    // The worker talks to the front end, and its logs say so.
    wait_until("worker log line", Duration::from_secs(30), || {
        let logs = berth.ok(&dir, &["logs", "-p", &stack, "--tail", "20", "worker"]);
        if logs.contains("worker.1 |") && logs.contains("via api.") {
            Ok(())
        } else {
            Err(logs)
        }
    });

    berth.ok(&dir, &["down", "-p", &stack]);
    wait_until("no process left", Duration::from_secs(15), || {
        let left = processes_of(&stack, None);
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    });
    // The stack is forgotten: asking for it is "not found" (exit 4).
    let out = berth.run(&dir, &["ps", "--json", "-p", &stack]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    berth.servers.clear();
}

#[test]
fn server_killed_during_scale_converges_to_exactly_the_desired_count() {
    let mut berth = Berth::new();
    let stack = format!("crash{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("compose.yaml"),
        concat!(
            "services:\n",
            "  web:\n",
            "    command: [\"sh\", \"-c\", \"exec busybox httpd -f -p 127.0.0.1:$$PORT\"]\n",
            "    ports: [\"8080\"]\n",
            "    x-berth:\n",
            "      healthcheck: { http: /, interval: 1s, start_interval: 100ms }\n",
        ),
    )
    .unwrap();
    // busybox httpd answers 404 for / without an index; give it one.
    std::fs::write(dir.path().join("index.html"), "ok").unwrap();
    let dir = dir.path();
    berth.ok(dir, &["up", "-d", "-p", &stack]);
    all_ready(&berth.ps(dir, &stack), "web", 1).unwrap();

    berth.ok(dir, &["scale", "-p", &stack, "web=20"]);
    std::thread::sleep(Duration::from_millis(150));
    let pid = berth.server_pid().expect("server.json names the server");
    signal(pid, "KILL");
    wait_until("server gone", Duration::from_secs(30), || {
        if alive(pid) {
            Err("alive".into())
        } else {
            Ok(())
        }
    });

    berth.start_server();
    wait_until("20 healthy web", Duration::from_secs(60), || {
        berth
            .run(dir, &["ps", "-p", &stack])
            .status
            .success()
            .then_some(())
            .ok_or("no server yet")?;
        all_ready(&berth.ps(dir, &stack), "web", 20)
    });
    // Exactly 20 processes: no orphans from the killed server, no duplicates.
    wait_until("exactly 20 web processes", Duration::from_secs(20), || {
        let n = processes_of(&stack, Some("web")).len();
        if n == 20 {
            Ok(())
        } else {
            Err(format!("{n} web processes"))
        }
    });
    berth.ok(dir, &["down", "-p", &stack]);
    wait_until("no process left", Duration::from_secs(30), || {
        let left = processes_of(&stack, None);
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    });
}

#[test]
fn malformed_stack_files_fail_with_file_line_column() {
    let berth = Berth::new();
    let cases = [
        ("indent", "services:\n  web:\n    command: x\n   image: y\n"),
        ("unknown", "services:\n  web:\n    comand: sleep 1\n"),
        (
            "type",
            "services:\n  web:\n    command: sleep 1\n    deploy:\n      replicas: many\n",
        ),
        (
            "cycle",
            "services:\n  a:\n    command: x\n    depends_on: [b]\n  b:\n    command: x\n    depends_on: [a]\n",
        ),
        (
            "required",
            "services:\n  web:\n    command: echo ${NOPE:?set NOPE first}\n",
        ),
    ];
    for (name, content) in cases {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("compose.yaml"), content).unwrap();
        for args in [&["config"][..], &["up", "-d"][..]] {
            let out = berth.run(dir.path(), args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{name} {args:?}: {err}");
            let located = err.lines().any(|l| {
                l.contains("compose.yaml:")
                    && l.split("compose.yaml:").nth(1).is_some_and(|rest| {
                        let mut it = rest.split(':');
                        it.next().is_some_and(|x| x.parse::<u32>().is_ok())
                            && it.next().is_some_and(|x| x.trim().parse::<u32>().is_ok())
                    })
            });
            assert!(located, "{name} {args:?}: no file:line:column in: {err}");
        }
    }
}
