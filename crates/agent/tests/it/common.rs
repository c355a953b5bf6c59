//! Helpers shared by the tests.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use berth_agent::driver::Driver;
use berth_agent::driver::cgroup::Cgroups;
use berth_agent::driver::process::ProcessDriver;
use berth_agent::ports::PortAllocator;
use berth_agent::supervisor::{Backoff, Context};
use berth_agent::{LogConfig, LogStore};
use berth_model::{Assignment, DesiredState, InstanceKey, InstanceStatus, Service};
use tokio::sync::mpsc;

pub fn key(service: &str, slot: u32) -> InstanceKey {
    InstanceKey::new("default", "demo", service, slot)
}

/// A service running `command` through `sh -c`, with `extra` JSON fields.
pub fn service(name: &str, command: &str, extra: serde_json::Value) -> Service {
    let mut v = serde_json::json!({
        "name": name,
        "command": command,
        "restart": {"policy": "always"},
        "deploy": {"mode": "replicated", "replicas": 1},
        "stop_signal": "SIGTERM",
        "stop_grace_period_ms": 300,
    });
    if let (Some(obj), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
        obj.extend(extra);
    }
    serde_json::from_value(v).unwrap()
}

/// An assignment of `service` to `key`. Tests run in parallel in one agent
/// id, and an instance's cgroup is named after its slot and uid: tests
/// must not share both, or one instance's end kills the other's processes.
pub fn assignment(key: InstanceKey, service: Service, uid: &str, node: &str) -> Assignment {
    Assignment {
        key,
        uid: uid.into(),
        node: node.into(),
        release: 1,
        restart_generation: 0,
        service,
        env: BTreeMap::new(),
        desired: DesiredState::Running,
        created_at: 0,
        retire_at: None,
    }
}

pub fn fast_backoff() -> Backoff {
    Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(400),
        reset_after: Duration::from_secs(10),
    }
}

pub fn logs(dir: &Path) -> LogStore {
    LogStore::open(dir.join("logs"), LogConfig::default()).unwrap()
}

pub fn context(
    dir: &Path,
    logs: LogStore,
) -> (Arc<Context>, mpsc::UnboundedReceiver<InstanceStatus>) {
    context_with(dir, logs, |driver| driver)
}

/// [`context`] with the process driver wrapped by `wrap`.
pub fn context_with(
    dir: &Path,
    logs: LogStore,
    wrap: impl FnOnce(Arc<dyn Driver>) -> Arc<dyn Driver>,
) -> (Arc<Context>, mpsc::UnboundedReceiver<InstanceStatus>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let agent_id = format!("test-{}", std::process::id());
    let ctx = Context {
        driver: wrap(Arc::new(ProcessDriver::new(Arc::new(Cgroups::detect(
            &agent_id,
        ))))),
        logs,
        ports: PortAllocator::new(),
        sink: Arc::new(tx),
        node: "n1".into(),
        address: "127.0.0.1".into(),
        agent_id,
        fallback_dir: dir.to_path_buf(),
        inherited_env: std::env::vars()
            .filter(|(k, _)| berth_agent::driver::command::INHERITED_VARS.contains(&k.as_str()))
            .collect(),
        backoff: fast_backoff(),
        health_stats: Default::default(),
    };
    (Arc::new(ctx), rx)
}

/// Receive statuses until one matches, failing after `secs` with the last
/// status seen. Bounds that involve starting a process should be generous
/// (≥ 20 s): CI runs these on a loaded 2-core machine.
pub async fn until(
    rx: &mut mpsc::UnboundedReceiver<InstanceStatus>,
    secs: u64,
    what: &str,
    pred: impl Fn(&InstanceStatus) -> bool,
) -> InstanceStatus {
    let mut last = None;
    let fut = async {
        loop {
            let s = rx.recv().await.expect("status channel closed");
            if pred(&s) {
                return s;
            }
            last = Some(s);
        }
    };
    let got = tokio::time::timeout(Duration::from_secs(secs), fut).await;
    match got {
        Ok(s) => s,
        Err(_) => panic!("timed out after {secs} s waiting for {what}; last status: {last:#?}"),
    }
}

/// Whether a process is gone (or a zombie nobody reaped yet: it runs no code).
pub fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Live pids in process group `pgid`, the leader excluded.
pub fn group_members(pgid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == pgid {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        // Fields after comm: state ppid pgrp ...
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(pgid) && f[0] != "Z" {
            out.push(pid);
        }
    }
    out
}

/// Whether `pid` is gone within 10 s (a stopped instance's processes are
/// normally gone already; the bound only covers a loaded machine).
pub async fn wait_gone(pid: u32) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        if gone(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gone(pid)
}
