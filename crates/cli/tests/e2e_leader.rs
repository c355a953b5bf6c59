//! Leader election across servers sharing one real etcd: only the elected
//! server runs the controller; `kill -9` of the leader hands over within
//! seconds (the leader key's lease TTL), and a deploy submitted to the
//! survivor runs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A `berth server` with its own data dir and node id on the shared etcd.
fn server(etcd: &Etcd, node: &str) -> Berth {
    etcd.server(&std::process::id().to_string(), node, &[]).0
}

fn api_port(b: &Berth) -> u16 {
    let info: Value =
        serde_json::from_slice(&std::fs::read(b.data.path().join("server.json")).unwrap()).unwrap();
    let addr = info["tcp"][0].as_str().unwrap();
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

fn leader_of(b: &Berth) -> Result<Value, String> {
    let out = http_get(api_port(b), "/v1/leader")?;
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).map_err(|e| format!("{e}: {out}"))
}

#[test]
fn the_survivor_takes_over_and_runs_a_deploy() {
    let etcd = Etcd::start();
    let s1 = server(&etcd, "s1");
    let s2 = server(&etcd, "s2");
    let mut leader = String::new();
    wait_until("a leader is elected", Duration::from_secs(20), || {
        let (a, b) = (leader_of(&s1)?, leader_of(&s2)?);
        if a["leader"].is_null() || a["leader"] != b["leader"] {
            return Err(format!("s1 sees {a}, s2 sees {b}"));
        }
        leader = a["leader"]["node"].as_str().unwrap().to_owned();
        Ok(())
    });
    // Exactly one leads, and both agree on it.
    let firsts = [leader_of(&s1).unwrap(), leader_of(&s2).unwrap()];
    assert_eq!(
        firsts.iter().filter(|s| s["is_leader"] == true).count(),
        1,
        "{firsts:?}"
    );
    // The Consul endpoint reports the same server.
    let (dead, survivor, survivor_id) = if leader == "s1" {
        (s1, s2, "s2")
    } else {
        (s2, s1, "s1")
    };
    let consul = http_get(api_port(&survivor), "/v1/status/leader").unwrap();
    assert!(
        consul.contains(&format!("127.0.0.1:{}", api_port(&dead))),
        "{consul}"
    );

    let pid = dead.server_pid().unwrap();
    signal(pid, "KILL");
    let killed = Instant::now();
    wait_until("the survivor leads", Duration::from_secs(15), || {
        let s = leader_of(&survivor)?;
        if s["is_leader"] == true {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    let takeover = killed.elapsed();
    eprintln!("takeover after kill -9: {takeover:?}");
    assert!(takeover < Duration::from_secs(15));

    // A deploy submitted to the survivor is placed (on its own node: the
    // dead one's record is still alive for up to its lease) and runs.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("compose.yaml"),
        format!(
            "services:\n  tick:\n    command: sleep 300\n    deploy:\n      replicas: 2\n      placement:\n        constraints: [\"node.id == {survivor_id}\"]\n"
        ),
    )
    .unwrap();
    let stack = format!("lead{}", std::process::id());
    survivor.ok(dir.path(), &["up", "-d", "-p", &stack]);
    wait_until("the deploy runs", Duration::from_secs(30), || {
        all_ready(&survivor.ps(dir.path(), &stack), "tick", 2)
    });
    survivor.ok(dir.path(), &["down", "-p", &stack]);
    drop(dead);
}

/// The events of a stack as `berth events --json` lists them.
fn events_of(b: &Berth, dir: &std::path::Path, stack: &str) -> Vec<Value> {
    b.ok(dir, &["events", "--json", "-p", stack, "--tail", "1000"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every server observes every change (it needs the statuses for its
/// metrics), but only the leader writes events, fenced: with two servers
/// on one etcd each event appears once.
#[test]
fn events_are_recorded_once_by_the_leader() {
    let etcd = Etcd::start();
    let s1 = server(&etcd, "s1");
    let s2 = server(&etcd, "s2");
    wait_until("a leader is elected", Duration::from_secs(20), || {
        let (a, b) = (leader_of(&s1)?, leader_of(&s2)?);
        if a["leader"].is_null() || a["leader"] != b["leader"] {
            return Err(format!("s1 sees {a}, s2 sees {b}"));
        }
        Ok(())
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("compose.yaml"),
        "services:\n  tick:\n    command: sleep 300\n    deploy:\n      replicas: 2\n",
    )
    .unwrap();
    let stack = format!("ev{}", std::process::id());
    s2.ok(dir.path(), &["up", "-d", "-p", &stack]);
    wait_until("the deploy runs", Duration::from_secs(30), || {
        all_ready(&s2.ps(dir.path(), &stack), "tick", 2)
    });
    s1.ok(dir.path(), &["scale", "-p", &stack, "tick=3"]);
    let kinds = |events: &[Value], kind: &str| events.iter().filter(|e| e["kind"] == kind).count();
    wait_until("the events are recorded", Duration::from_secs(30), || {
        let events = events_of(&s1, dir.path(), &stack);
        if kinds(&events, "instance_started") >= 3 && kinds(&events, "scaled") >= 1 {
            Ok(())
        } else {
            Err(format!("{events:?}"))
        }
    });
    // Give a second writer, if there were one, time to add its copies.
    std::thread::sleep(Duration::from_secs(2));
    let events = events_of(&s1, dir.path(), &stack);
    let mut seen = std::collections::BTreeSet::new();
    for e in &events {
        let what = (
            e["kind"].to_string(),
            e["instance"].to_string(),
            e["release"].to_string(),
            e["message"].to_string(),
        );
        assert!(seen.insert(what), "recorded twice: {e}\nall: {events:#?}");
    }
    assert_eq!(kinds(&events, "deploy_started"), 1, "{events:#?}");
    assert_eq!(kinds(&events, "scaled"), 1, "{events:#?}");
    assert_eq!(kinds(&events, "instance_started"), 3, "{events:#?}");
    // Both servers read the same ring.
    assert_eq!(events, events_of(&s2, dir.path(), &stack));
    s1.ok(dir.path(), &["down", "-p", &stack]);
}
