//! End-to-end with a real Docker engine (issue 4): a stack mixing a
//! container service and a process service comes up healthy, and `down -v`
//! leaves none of berth's containers, networks or named volumes behind.
//! Needs an engine (scripts/docker-up) — it fails, not skips, without one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI");
    assert!(
        out.status.success(),
        "docker {args:?}: {} (run scripts/docker-up)",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn mixed_stack_runs_and_down_v_removes_containers_networks_and_volumes() {
    let status = Command::new(repo().join("scripts/test-image"))
        .status()
        .unwrap();
    assert!(status.success(), "scripts/test-image failed");
    let berth = Berth::new();
    let stack = format!("dock{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("compose.yaml"),
        concat!(
            "services:\n",
            "  box:\n",
            "    image: berth-test/busybox:latest\n",
            "    pull_policy: never\n",
            "    command: [\"sh\", \"-c\", \"echo hi > /data/hi; exec httpd -f -p 8000 -h /data\"]\n",
            "    ports: [\"8000\"]\n",
            "    volumes: [\"data:/data\"]\n",
            "    restart: unless-stopped\n",
            "    x-berth:\n",
            "      healthcheck: { http: /hi, interval: 1s, start_interval: 100ms }\n",
            "  local:\n",
            "    command: sleep 1000\n",
            "volumes:\n",
            "  data: {}\n",
        ),
    )
    .unwrap();
    let dir = dir.path();
    berth.ok(dir, &["up", "-d", "-p", &stack]);
    let ps = berth.ps(dir, &stack);
    all_ready(&ps, "box", 1).unwrap();
    all_ready(&ps, "local", 1).unwrap();
    let label = format!("label=berth.stack={stack}");
    assert_eq!(docker(&["ps", "-q", "--filter", &label]).lines().count(), 1);
    assert!(
        docker(&["volume", "ls", "-q"])
            .lines()
            .any(|v| v == format!("{stack}_data"))
    );

    berth.ok(dir, &["down", "-v", "-p", &stack]);
    wait_until(
        "containers, network and volume gone",
        Duration::from_secs(30),
        || {
            let containers = docker(&["ps", "-aq", "--filter", &label]);
            let networks = docker(&["network", "ls", "-q", "--filter", &label]);
            let volume = docker(&["volume", "ls", "-q"])
                .lines()
                .any(|v| v == format!("{stack}_data"));
            if containers.trim().is_empty() && networks.trim().is_empty() && !volume {
                Ok(())
            } else {
                Err(format!(
                    "containers {containers:?} networks {networks:?} volume {volume}"
                ))
            }
        },
    );
    assert!(processes_of(&stack, None).is_empty());
}
