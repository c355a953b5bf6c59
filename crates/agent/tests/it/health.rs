//! Health checks against real processes.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use berth_agent::driver::{Driver, DriverError, Exit, Handle, LaunchSpec, Started};
use berth_agent::supervisor::Supervisor;
use berth_model::{Health, InstanceState};
use nix::sys::signal::Signal;
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
    let sup = Supervisor::spawn(ctx, assignment(key("web", 1), svc, "u3", "n1"));
    let first = until(&mut rx, 30, "starting", |s| {
        s.state == InstanceState::Starting
    })
    .await;
    assert_eq!(first.health, Health::Starting);
    let healthy = until(&mut rx, 30, "healthy", |s| s.health == Health::Healthy).await;
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
    until(&mut rx, 30, "healthy", |s| s.health == Health::Healthy).await;
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
    let running = until(&mut rx, 30, "running", |s| {
        s.state == InstanceState::Running
    })
    .await;
    let unhealthy = until(&mut rx, 30, "unhealthy", |s| s.health == Health::Unhealthy).await;
    // Three counted failures at a 100 ms interval: not before ~300 ms after
    // the start. Measured with the supervisor's own stamps (when this test
    // got the statuses says nothing: a late receive of `running` shortens it).
    let took = unhealthy.updated_at.saturating_sub(running.updated_at);
    assert!(took >= 250, "unhealthy {took} ms after running");
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
            command: "sleep 60".into(),
        },
        &target,
        std::time::Duration::from_millis(200),
    )
    .await;
    assert!(!r.ok);
    assert!(r.output.contains("timed out"), "{}", r.output);
    // Cut at the timeout, not left to run its minute (generous: a loaded
    // machine may be slow to start and kill it).
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        t0.elapsed()
    );
}

/// The process driver, but the supervisor learns of an exit `lag` late:
/// what a busy runtime or a container engine's wait stream can do. The
/// driver's `ended` still tells the truth.
struct LateExits {
    inner: Arc<dyn Driver>,
    lag: Duration,
}

struct LateHandle {
    inner: Box<dyn Handle>,
    lag: Duration,
    /// When the inner wait returned (the supervisor re-creates its wait
    /// future on every loop, so the lag runs from the first one).
    exited_at: Option<tokio::time::Instant>,
}

#[async_trait]
impl Driver for LateExits {
    fn name(&self) -> &'static str {
        "late-exits"
    }
    fn capabilities(&self) -> berth_agent::driver::Capabilities {
        self.inner.capabilities()
    }
    async fn start(&self, spec: &LaunchSpec) -> Result<Started, DriverError> {
        let mut started = self.inner.start(spec).await?;
        started.handle = Box::new(LateHandle {
            inner: started.handle,
            lag: self.lag,
            exited_at: None,
        });
        Ok(started)
    }
}

#[async_trait]
impl Handle for LateHandle {
    fn pid(&self) -> Option<u32> {
        self.inner.pid()
    }
    fn signal(&self, signal: Signal) -> Result<(), DriverError> {
        self.inner.signal(signal)
    }
    async fn ended(&mut self) -> bool {
        self.inner.ended().await
    }
    async fn wait(&mut self) -> Result<Exit, DriverError> {
        let exit = self.inner.wait().await?;
        let at = *self.exited_at.get_or_insert_with(tokio::time::Instant::now);
        tokio::time::sleep_until(at + self.lag).await;
        Ok(exit)
    }
    async fn stop(&mut self, signal: Signal, grace: Duration) -> Result<Exit, DriverError> {
        self.inner.stop(signal, grace).await
    }
}

/// An instance whose process has exited while something else listens on
/// the port its check probes (an instance that failed to bind a port
/// another process holds, as seen in the scale benchmark).
fn foreign_port_service(
    name: &str,
    port: u16,
    command: &str,
    restart: serde_json::Value,
) -> berth_model::Service {
    service(
        name,
        command,
        json!({
            "restart": restart,
            "healthcheck": {
                "test": {"type": "tcp", "port": port},
                "interval_ms": 100, "timeout_ms": 500, "retries": 3,
                "start_period_ms": 0, "start_interval_ms": 100,
            },
        }),
    )
}

#[tokio::test]
async fn a_check_answered_by_another_process_made_an_exited_instance_healthy() {
    // Something else listens on the port (the kernel accepts into the
    // backlog: the TCP check passes).
    let foreign = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = foreign.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let (ctx, mut rx) = context_with(dir.path(), logs(dir.path()), |inner| {
        Arc::new(LateExits {
            inner,
            lag: Duration::from_millis(1500),
        })
    });
    let svc = foreign_port_service("gone", port, "exit 1", json!({"policy": "no"}));
    let sup = Supervisor::spawn(ctx, assignment(key("gone", 1), svc, "u1", "n1"));
    // Probes run every 25-100 ms while the exit is not yet seen.
    let mut seen = Vec::new();
    let exited = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let s = rx.recv().await.unwrap();
            seen.push((s.state, s.health));
            if s.state == InstanceState::Exited {
                return s;
            }
        }
    })
    .await;
    let exited = exited.unwrap_or_else(|_| panic!("not exited within 30 s: {seen:?}"));
    assert!(
        seen.iter().all(|(_, h)| *h != Health::Healthy),
        "a dead instance was reported healthy: {seen:?}"
    );
    assert_eq!(exited.last_exit.unwrap().code, Some(1));
    sup.stop().await;
    drop(foreign);
}

#[tokio::test]
async fn an_instance_that_exits_after_passing_its_check_is_not_left_healthy() {
    let foreign = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = foreign.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let (ctx, mut rx) = context(dir.path(), logs(dir.path()));
    // Alive for a while (the check passes: probes start within ~100 ms, and
    // 2 s leave room on a loaded machine), then gone; restarted once.
    // (Its own slot: instances of one slot and uid share a cgroup name.)
    let svc = foreign_port_service(
        "left",
        port,
        "sleep 2; exit 1",
        json!({"policy": "on-failure", "max_attempts": 1}),
    );
    let sup = Supervisor::spawn(ctx, assignment(key("left", 1), svc, "u1", "n1"));
    let mut seen = Vec::new();
    let failed = tokio::time::timeout(Duration::from_secs(40), async {
        loop {
            let s = rx.recv().await.unwrap();
            seen.push(s.clone());
            if s.state == InstanceState::Failed {
                return s;
            }
        }
    })
    .await;
    let failed = failed.unwrap_or_else(|_| {
        let view: Vec<_> = seen.iter().map(|s| (s.state, s.health)).collect();
        panic!("not failed within 40 s: {view:?}")
    });
    let view: Vec<_> = seen.iter().map(|s| (s.state, s.health)).collect();
    assert!(
        seen.iter()
            .any(|s| s.state == InstanceState::Running && s.health == Health::Healthy),
        "{view:?}"
    );
    assert!(
        seen.iter()
            .all(|s| s.state == InstanceState::Running || s.health != Health::Healthy),
        "healthy while not running: {view:?}"
    );
    let after_exit = seen
        .iter()
        .find(|s| s.state == InstanceState::Backoff)
        .expect("restarted once");
    assert_eq!(after_exit.health, Health::Unhealthy, "{view:?}");
    assert_eq!(
        after_exit.health_output.as_deref(),
        Some("not running: exited with code 1")
    );
    assert_eq!(failed.restarts, 1);
    sup.stop().await;
    drop(foreign);
}
