//! Health checks against real processes.

use berth_agent::supervisor::Supervisor;
use berth_model::{Health, InstanceState};
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn http_check_against_a_python_server_turns_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let (ctx, mut rx) = context(dir.path(), logs(dir.path()));
    let svc = service(
        "web",
        "exec python3 -m http.server \"$PORT\" --bind 127.0.0.1",
        json!({"healthcheck": {
            "test": {"type": "http", "path": "/"},
            "interval_ms": 30000, "timeout_ms": 2000, "retries": 3,
            "start_period_ms": 0, "start_interval_ms": 5000,
        }}),
    );
    let sup = Supervisor::spawn(ctx, assignment(key("web", 1), svc, "u1", "n1"));
    let first = until(&mut rx, 5, "starting", |s| {
        s.state == InstanceState::Starting
    })
    .await;
    assert_eq!(first.health, Health::Starting);
    let healthy = until(&mut rx, 20, "healthy", |s| s.health == Health::Healthy).await;
    assert!(healthy.port.is_some());
    assert!(healthy.health_output.unwrap().contains("200"));
    sup.stop().await;
}

#[tokio::test]
async fn tcp_check_uses_the_instance_port() {
    let dir = tempfile::tempdir().unwrap();
    let (ctx, mut rx) = context(dir.path(), logs(dir.path()));
    let svc = service(
        "tcp",
        "exec python3 -c 'import os,socket,time; s=socket.socket(); s.bind((\"127.0.0.1\", int(os.environ[\"PORT\"]))); s.listen(); time.sleep(1000)'",
        json!({"healthcheck": {
            "test": {"type": "tcp"},
            "interval_ms": 30000, "timeout_ms": 1000, "retries": 3,
            "start_period_ms": 0, "start_interval_ms": 5000,
        }}),
    );
    let sup = Supervisor::spawn(ctx, assignment(key("tcp", 1), svc, "u1", "n1"));
    until(&mut rx, 20, "healthy", |s| s.health == Health::Healthy).await;
    sup.stop().await;
}

#[tokio::test]
async fn failing_exec_check_turns_unhealthy_after_retries_with_its_output() {
    let dir = tempfile::tempdir().unwrap();
    let logs = logs(dir.path());
    let (ctx, mut rx) = context(dir.path(), logs.clone());
    let svc = service(
        "sick",
        "sleep 1000",
        json!({"healthcheck": {
            "test": {"type": "shell", "command": "echo nope from $BERTH_INSTANCE; exit 1"},
            "interval_ms": 100, "timeout_ms": 1000, "retries": 3,
            "start_period_ms": 0, "start_interval_ms": 100,
        }}),
    );
    let sup = Supervisor::spawn(ctx, assignment(key("sick", 1), svc, "u1", "n1"));
    let running = until(&mut rx, 5, "running", |s| s.state == InstanceState::Running).await;
    let started = std::time::Instant::now();
    let unhealthy = until(&mut rx, 10, "unhealthy", |s| s.health == Health::Unhealthy).await;
    // Three counted failures at a 100 ms interval: not before ~300 ms.
    assert!(started.elapsed() >= std::time::Duration::from_millis(250));
    assert_eq!(unhealthy.health_output.as_deref(), Some("nope from sick.1"));
    assert_eq!(
        unhealthy.pid, running.pid,
        "unhealthy is reported, not restarted"
    );
    sup.stop().await;
    let past = logs
        .read(&berth_agent::LogQuery {
            namespace: "default".into(),
            stack: "demo".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        past.iter()
            .any(|l| l.line == "health: unhealthy: nope from sick.1")
    );
}

#[tokio::test]
async fn exec_check_timeout_fails_the_probe() {
    let target = berth_agent::health::ProbeTarget {
        port: None,
        env: [("PATH".to_owned(), std::env::var("PATH").unwrap())].into(),
        working_dir: std::env::temp_dir(),
    };
    let t0 = std::time::Instant::now();
    let r = berth_agent::health::probe(
        &berth_spec::types::HealthTest::Shell {
            command: "sleep 5".into(),
        },
        &target,
        std::time::Duration::from_millis(200),
    )
    .await;
    assert!(!r.ok);
    assert!(r.output.contains("timed out"), "{}", r.output);
    assert!(t0.elapsed() < std::time::Duration::from_secs(2));
}
