//! The whole agent on a real embedded store through StoreControlPlane.

use std::os::unix::process::CommandExt;
use std::sync::Arc;
use std::time::Duration;

use berth_agent::{AgentConfig, LogConfig, StoreControlPlane};
use berth_model::{Assignment, DesiredState, InstanceState, InstanceStatus, keys};
use berth_store::Store;
use berth_store::embedded::EmbeddedStore;
use serde_json::json;

use crate::common::*;

async fn statuses(store: &dyn Store) -> Vec<InstanceStatus> {
    let (kvs, _) = store.range(keys::STATUS).await.unwrap();
    kvs.iter()
        .map(|kv| berth_store::decode(kv).unwrap())
        .collect()
}

/// The statuses once `pred` holds; fails after 30 s (process starts and
/// stops on a loaded machine) with the last ones read.
async fn eventually(
    store: &dyn Store,
    what: &str,
    pred: impl Fn(&[InstanceStatus]) -> bool,
) -> Vec<InstanceStatus> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = statuses(store).await;
        if pred(&s) {
            return s;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after 30 s waiting for {what}: {s:#?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many `up` lines slot `slot` has logged.
async fn ups(logs: &berth_agent::LogStore, slot: u32) -> usize {
    let q = berth_agent::LogQuery {
        namespace: "default".into(),
        stack: "demo".into(),
        ..Default::default()
    };
    let lines = logs.read(&q).await.unwrap();
    lines
        .iter()
        .filter(|l| l.key.slot == slot && l.line == "up")
        .count()
}

/// Wait until slot `slot` has logged `n` `up` lines: `running` is reported
/// at spawn, before the shell has echoed, and an instance stopped before
/// that never says it.
async fn wait_ups(logs: &berth_agent::LogStore, slot: u32, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got = ups(logs, slot).await;
        if got >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot {slot} logged {got} `up` lines, not {n}, within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn put(store: &dyn Store, a: &Assignment) {
    berth_store::put_json(store, &keys::assignment(&a.node, &a.key), a)
        .await
        .unwrap();
}

#[tokio::test]
async fn agent_runs_assignments_from_the_store_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let store: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&dir.path().join("store.redb")).unwrap());

    // A process left by a previous incarnation of this agent.
    let agent_id = berth_agent::orphans::agent_id("n1", &data);
    let mut orphan = std::process::Command::new("sleep")
        .arg("1000")
        .env("BERTH_AGENT_ID", &agent_id)
        .process_group(0)
        .spawn()
        .unwrap();

    let svc = service("web", "echo up; sleep 1000", json!({}));
    for slot in 1..=3 {
        put(
            store.as_ref(),
            &assignment(key("web", slot), svc.clone(), &format!("u{slot}"), "n1"),
        )
        .await;
    }
    // Another node's assignment is not ours.
    put(
        store.as_ref(),
        &assignment(key("web", 9), svc.clone(), "x", "n2"),
    )
    .await;

    let cfg = AgentConfig {
        node_id: "n1".into(),
        data_dir: data.clone(),
        address: "127.0.0.1".into(),
        logs: LogConfig::default(),
    };
    let logs = berth_agent::LogStore::open(data.join("logs"), cfg.logs.clone()).unwrap();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let control = Arc::new(StoreControlPlane::new(store.clone()));
    let agent = tokio::spawn(berth_agent::run(cfg, control, logs.clone(), shutdown));

    let running = eventually(store.as_ref(), "3 running", |s| {
        s.len() == 3 && s.iter().all(|s| s.state == InstanceState::Running)
    })
    .await;
    orphan.wait().unwrap();
    assert!(running.iter().all(|s| s.node == "n1"));
    let pid_of = |all: &[InstanceStatus], slot: u32| {
        all.iter()
            .find(|s| s.key.slot == slot)
            .unwrap()
            .pid
            .unwrap()
    };

    // Added while running.
    put(
        store.as_ref(),
        &assignment(key("web", 4), svc.clone(), "u4", "n1"),
    )
    .await;
    let all = eventually(store.as_ref(), "4 running", |s| {
        s.len() == 4 && s.iter().all(|s| s.state == InstanceState::Running)
    })
    .await;

    // Removed: stopped and forgotten.
    let pid3 = pid_of(&all, 3);
    wait_ups(&logs, 3, 1).await;
    store
        .delete(&keys::assignment("n1", &key("web", 3)))
        .await
        .unwrap();
    eventually(store.as_ref(), "slot 3 forgotten", |s| {
        s.len() == 3 && s.iter().all(|s| s.key.slot != 3)
    })
    .await;
    assert!(wait_gone(pid3).await);

    // A new uid replaces the instance.
    let pid2 = pid_of(&all, 2);
    wait_ups(&logs, 2, 1).await;
    put(
        store.as_ref(),
        &assignment(key("web", 2), svc.clone(), "u2-new", "n1"),
    )
    .await;
    let all = eventually(store.as_ref(), "slot 2 replaced", |s| {
        s.iter()
            .any(|s| s.key.slot == 2 && s.uid == "u2-new" && s.state == InstanceState::Running)
    })
    .await;
    assert!(wait_gone(pid2).await);
    assert_ne!(pid_of(&all, 2), pid2);

    // Desired stopped.
    let pid1 = pid_of(&all, 1);
    wait_ups(&logs, 1, 1).await;
    let mut a1 = assignment(key("web", 1), svc.clone(), "u1", "n1");
    a1.desired = DesiredState::Stopped;
    put(store.as_ref(), &a1).await;
    eventually(store.as_ref(), "slot 1 stopped", |s| {
        s.iter()
            .any(|s| s.key.slot == 1 && s.state == InstanceState::Stopped)
    })
    .await;
    assert!(wait_gone(pid1).await);
    // …and running again.
    a1.desired = DesiredState::Running;
    put(store.as_ref(), &a1).await;
    let all = eventually(store.as_ref(), "slot 1 running again", |s| {
        s.iter()
            .any(|s| s.key.slot == 1 && s.state == InstanceState::Running)
    })
    .await;

    // Shutdown stops everything and reports it.
    let pids: Vec<u32> = all.iter().filter_map(|s| s.pid).collect();
    // Every instance started so far has said `up`: slot 1 twice, slot 2
    // twice (old and new uid), slots 3 and 4 once.
    for (slot, n) in [(1, 2), (2, 2), (4, 1)] {
        wait_ups(&logs, slot, n).await;
    }
    stop.send_replace(true);
    tokio::time::timeout(Duration::from_secs(10), agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    for pid in pids {
        assert!(wait_gone(pid).await, "pid {pid} still alive");
    }
    let end = statuses(store.as_ref()).await;
    assert!(
        end.iter().all(|s| s.state == InstanceState::Stopped),
        "{end:#?}"
    );

    let past = logs
        .read(&berth_agent::LogQuery {
            namespace: "default".into(),
            stack: "demo".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let ups = past.iter().filter(|l| l.line == "up").count();
    assert_eq!(ups, 6, "one `up` per incarnation, kept across stops");
}

#[tokio::test]
async fn scaling_down_many_takes_one_grace_period_not_many() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&dir.path().join("store.redb")).unwrap());
    // Ignores SIGTERM: every stop waits the full grace, 1 s, so 19 stops
    // one after the other take at least 19 s.
    let svc = service(
        "w",
        "trap '' TERM; sleep 1000; echo never",
        json!({"stop_grace_period_ms": 1000}),
    );
    for slot in 1..=20 {
        put(
            store.as_ref(),
            &assignment(key("w", slot), svc.clone(), "u", "n1"),
        )
        .await;
    }
    let cfg = AgentConfig {
        node_id: "n1".into(),
        data_dir: data.clone(),
        address: "127.0.0.1".into(),
        logs: LogConfig::default(),
    };
    let logs = berth_agent::LogStore::open(data.join("logs"), cfg.logs.clone()).unwrap();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let agent = tokio::spawn(berth_agent::run(
        cfg,
        Arc::new(StoreControlPlane::new(store.clone())),
        logs,
        shutdown,
    ));
    eventually(store.as_ref(), "20 running", |s| {
        s.len() == 20 && s.iter().all(|s| s.state == InstanceState::Running)
    })
    .await;
    let t0 = std::time::Instant::now();
    let mut txn = berth_store::Txn::default();
    for slot in 2..=20 {
        txn.success.push(berth_store::Op::Delete(keys::assignment(
            "n1",
            &key("w", slot),
        )));
    }
    store.txn(txn).await.unwrap();
    eventually(store.as_ref(), "1 left", |s| s.len() == 1).await;
    let took = t0.elapsed();
    // In parallel: about one grace period. The bound leaves a loaded machine
    // room and is still far below the 19 s of stops in sequence.
    assert!(
        took < Duration::from_secs(8),
        "19 stops in parallel took {took:?}"
    );
    stop.send_replace(true);
    agent.await.unwrap().unwrap();
}
