//! End-to-end regression tests for the review findings on the core (issue 2):
//! the real `berth` binary, a real server, real processes and sockets. Each
//! test is named after the bug it pins.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// A temp dir holding `compose.yaml` with `yaml`.
fn stack_dir(yaml: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("compose.yaml"), yaml).unwrap();
    dir
}

fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

#[test]
fn up_d_reported_the_old_release_as_healthy_after_a_broken_update() {
    let berth = Berth::new();
    let stack = unique("upd");
    let dir = stack_dir("services:\n  web:\n    command: sleep 1000\n");
    berth.ok(dir.path(), &["up", "-d", "-p", &stack]);
    std::fs::write(
        dir.path().join("compose.yaml"),
        "services:\n  web:\n    command: sh -c 'echo broken update; exit 1'\n",
    )
    .unwrap();
    let err = berth.fails(
        dir.path(),
        &["up", "-d", "-p", &stack, "--wait-timeout", "60s"],
        5,
    );
    assert!(err.contains("exited with code 1"), "{err}");
}

#[test]
fn up_d_waited_for_the_timeout_on_an_exit_and_named_the_wrong_reason() {
    let berth = Berth::new();
    let stack = unique("fast");
    let dir = stack_dir(concat!(
        "services:\n",
        "  ok:\n    command: sleep 1000\n",
        "  bad:\n    command: sh -c 'echo cannot open config; exit 1'\n",
    ));
    let began = Instant::now();
    let err = berth.fails(
        dir.path(),
        &["up", "-d", "-p", &stack, "--wait-timeout", "60s"],
        5,
    );
    assert!(began.elapsed() < Duration::from_secs(30), "{err}");
    assert!(
        err.contains("service bad: bad.1: exited with code 1"),
        "{err}"
    );
    assert!(err.contains("cannot open config"), "last log lines: {err}");
    assert!(!err.contains("service ok"), "ok is not failed: {err}");
    assert!(!err.contains("not running and healthy after"), "{err}");
}

#[test]
fn up_d_waited_for_the_timeout_on_an_unhealthy_service() {
    let berth = Berth::new();
    let stack = unique("sick");
    let dir = stack_dir(concat!(
        "services:\n",
        "  web:\n",
        "    command: sleep 1000\n",
        "    healthcheck:\n",
        "      test: [\"CMD-SHELL\", \"echo db is down; exit 1\"]\n",
        "      interval: 200ms\n",
        "      retries: 1\n",
    ));
    let began = Instant::now();
    let err = berth.fails(
        dir.path(),
        &["up", "-d", "-p", &stack, "--wait-timeout", "60s"],
        5,
    );
    assert!(began.elapsed() < Duration::from_secs(30), "{err}");
    assert!(err.contains("web.1: unhealthy: db is down"), "{err}");
}

#[test]
fn a_service_held_back_by_depends_on_had_no_row_and_a_wrong_timeout_reason() {
    let berth = Berth::new();
    let stack = unique("deps");
    // db's check fails, but within its long start period that only keeps it
    // `starting`: web waits for it for ever.
    let dir = stack_dir(concat!(
        "services:\n",
        "  db:\n",
        "    command: sleep 1000\n",
        "    healthcheck:\n",
        "      test: [\"CMD-SHELL\", \"exit 1\"]\n",
        "      interval: 1h\n",
        "      start_period: 1h\n",
        "  web:\n",
        "    command: sleep 1000\n",
        "    depends_on:\n",
        "      db: { condition: service_healthy }\n",
    ));
    let err = berth.fails(
        dir.path(),
        &["up", "-d", "-p", &stack, "--wait-timeout", "2s"],
        5,
    );
    assert!(
        err.contains("service web: not ready after 2s: waiting for db: service_healthy"),
        "{err}"
    );
    let ps = berth.ps(dir.path(), &stack);
    let web = ps
        .iter()
        .find(|i| i["service"] == "web")
        .expect("a web row");
    assert_eq!(web["state"], "pending", "{web}");
    assert_eq!(web["message"], "waiting for db: service_healthy", "{web}");
    let table = berth.ok(dir.path(), &["ps", "-p", &stack]);
    assert!(table.contains("waiting for db: service_healthy"), "{table}");
}

#[test]
fn config_json_panicked_on_a_closed_pipe() {
    let berth = Berth::new();
    let dir = stack_dir("services:\n  web:\n    command: sleep 1000\n");
    survives_closed_stdout(&berth, dir.path(), &["config", "--json"]);
}

/// Runs `args` with its stdout closed before berth writes; it must end
/// quietly (no panic) and successfully.
fn survives_closed_stdout(berth: &Berth, dir: &std::path::Path, args: &[&str]) {
    let mut child = berth
        .command(dir, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    assert!(out.status.success(), "{args:?}: {}: {stderr}", out.status);
}

#[test]
fn deploy_releases_env_and_kv_panicked_on_a_closed_pipe() {
    let berth = Berth::new();
    let stack = unique("pipe");
    let dir = stack_dir("services:\n  web:\n    command: sleep 1000\n");
    berth.ok(dir.path(), &["up", "-d", "-p", &stack]);
    berth.ok(dir.path(), &["kv", "put", "pipe/a", "1"]);
    for args in [
        &["deploy", "--dry-run", "-p", &stack][..],
        &["releases", "-p", &stack],
        &["releases", "-p", &stack, "--json"],
        &["env", "-p", &stack],
        &["kv", "ls", "pipe/"],
        &["kv", "get", "pipe/a"],
    ] {
        survives_closed_stdout(&berth, dir.path(), args);
    }
}

#[test]
fn wrong_names_exited_0_logs_nosuch_ps_nosuch_bad_namespace() {
    let berth = Berth::new();
    let stack = unique("names");
    let dir = stack_dir(
        "services:\n  web:\n    command: sleep 1000\n  worker:\n    command: sleep 1000\n",
    );
    berth.ok(dir.path(), &["up", "-d", "-p", &stack]);

    let err = berth.fails(dir.path(), &["logs", "-p", &stack, "nosuch"], 4);
    assert!(
        err.contains("nosuch") && err.contains("web, worker"),
        "{err}"
    );

    let err = berth.fails(dir.path(), &["ps", "-p", "nosuch"], 4);
    assert!(
        err.contains("no stack \"nosuch\"") && err.contains(&stack),
        "{err}"
    );

    let err = berth.fails(dir.path(), &["ps", "-n", "Bad/NS"], 2);
    assert!(err.contains("invalid namespace name"), "{err}");
    assert!(err.contains("lower-case"), "{err}");
}

#[test]
fn durations_like_1m30s_were_rejected_by_the_cli_and_parsed_three_ways() {
    let berth = Berth::new();
    let stack = unique("dur");
    let dir = stack_dir("services:\n  web:\n    command: sh -c 'echo hello; exec sleep 1000'\n");
    berth.ok(
        dir.path(),
        &["up", "-d", "-p", &stack, "--wait-timeout", "1m30s"],
    );
    wait_until("the hello line", Duration::from_secs(30), || {
        let logs = berth.ok(dir.path(), &["logs", "-p", &stack, "--since", "1m30s"]);
        if logs.contains("hello") {
            Ok(())
        } else {
            Err(logs)
        }
    });
    let err = berth.fails(dir.path(), &["logs", "-p", &stack, "--since", "2x"], 2);
    assert!(err.contains("1h30m"), "{err}");
    let out = berth.run(
        dir.path(),
        &["up", "-d", "-p", &stack, "--wait-timeout", "soon"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("1m30s"));
}

#[test]
fn log_cap_was_not_configurable() {
    let berth = Berth::new();
    let stack = unique("logcap");
    let log = std::fs::File::create(berth.data.path().join("server.log")).unwrap();
    let mut server = berth
        .command(berth.data.path(), &["server", "--log-max-file-size", "2k"])
        .env("BERTH_LOG_MAX_FILES", "2")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_until("the server", Duration::from_secs(30), || {
        let v = berth.ok(berth.data.path(), &["version", "--json"]);
        if v.contains("\"pid\"") {
            Ok(())
        } else {
            Err(format!("{v}\n{}", berth.server_log()))
        }
    });
    let dir = stack_dir(concat!(
        "services:\n",
        "  chatty:\n",
        "    command: sh -c 'while true; do echo 0123456789012345678901234567890123456789; sleep 0.001; done'\n",
    ));
    berth.ok(dir.path(), &["up", "-d", "-p", &stack]);
    let logs = berth
        .data
        .path()
        .join("logs/default")
        .join(&stack)
        .join("chatty.1");
    wait_until("a rotation", Duration::from_secs(30), || {
        if logs.join("1.log").exists() {
            Ok(())
        } else {
            Err("not rotated yet".into())
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let files: Vec<(String, u64)> = std::fs::read_dir(&logs)
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .collect();
    assert!(files.len() <= 2, "{files:?}");
    assert!(files.iter().all(|(_, n)| *n <= 2048), "{files:?}");
    berth.ok(dir.path(), &["down", "-p", &stack]);
    signal(server.id() as i32, "TERM");
    let _ = server.wait();
}

#[test]
fn autostarted_server_wrote_colour_codes_into_server_log() {
    let berth = Berth::new();
    let stack = unique("ansi");
    let dir = stack_dir("services:\n  web:\n    command: sleep 1000\n");
    berth.ok(dir.path(), &["up", "-d", "-p", &stack]);
    let log = std::fs::read_to_string(berth.data.path().join("server.log")).unwrap();
    assert!(log.contains("INFO"), "{log}");
    assert!(!log.contains('\x1b'), "{log:?}");
}
