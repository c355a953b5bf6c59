//! An agent outlives its server: two `berth server --store etcd://…` on one
//! real etcd, one `berth agent --join` given only the first server's URL.
//! The agent learns the second server from the first, and when the first
//! is `kill -9`ed, or hangs (`kill -STOP`: it still accepts connections,
//! and never answers), it switches to the second without restarting
//! anything and without fencing: its instances keep their pids, its node
//! stays up past the lease TTL, and work placed through the second server
//! reaches it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// GET with the admin token; (status, body).
fn admin_get(berth: &Berth, api: &str, path: &str) -> (u16, String) {
    let token = std::fs::read_to_string(berth.data.path().join("token")).unwrap();
    api_request(api, "GET", path, Some(token.trim()))
}

fn running_pids(berth: &Berth, dir: &Path) -> Vec<i64> {
    let mut pids: Vec<i64> = instances(&berth.ps(dir, "fo"), "web")
        .iter()
        .filter(|i| i["state"] == "running" && i["current"] == true)
        .filter_map(|i| i["pid"].as_i64())
        .collect();
    pids.sort_unstable();
    pids
}

/// Resumes a stopped process when dropped (before its harness tries to
/// stop it), whatever the test's outcome.
struct Resume(i32);

impl Drop for Resume {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

#[test]
fn an_agent_switches_server_when_its_server_dies_and_keeps_its_processes() {
    fails_over("KILL");
}

#[test]
fn an_agent_leaves_a_hung_server_without_fencing_and_keeps_its_processes() {
    fails_over("STOP");
}

/// Send `sig` to the agent's server, then check the agent carries on with
/// the other one.
fn fails_over(sig: &str) {
    let etcd = Etcd::start();
    let no_agent = ["--no-agent", "--listen", "127.0.0.1:0"];
    let (s1, api1) = etcd.server("failover", "s1", &no_agent);
    let (s2, api2) = etcd.server("failover", "s2", &no_agent);
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();

    // Both servers are listed (admin route), by either server.
    wait_until("both servers listed", Duration::from_secs(30), || {
        let (status, body) = admin_get(&s2, &api2, "/v1/servers");
        let list: Vec<Value> = serde_json::from_str(&body).map_err(|e| format!("{status} {e}"))?;
        let nodes: Vec<&str> = list.iter().filter_map(|s| s["node"].as_str()).collect();
        if nodes == ["s1", "s2"] {
            Ok(())
        } else {
            Err(format!("{nodes:?}"))
        }
    });

    // The agent is given s1 only.
    let token = s1.ok(dir, &["token"]).trim().to_owned();
    let agent = spawn_agent(&s1, &api1, &token, "n1").no_edge().start();
    let agent_log = || agent.log();
    wait_until("the agent learned s2", Duration::from_secs(30), || {
        let log = agent_log();
        if log.contains("known servers") && log.contains(&api2) {
            Ok(())
        } else {
            Err(log)
        }
    });

    std::fs::write(
        dir.join("compose.yaml"),
        "services:\n  web:\n    command: sleep 1000\n    deploy: { replicas: 2 }\n",
    )
    .unwrap();
    s1.ok(dir, &["up", "-d", "-p", "fo"]);
    let before = running_pids(&s1, dir);
    assert_eq!(before.len(), 2, "{before:?}");

    // kill -9 s1: the agent moves to s2 at its next call. kill -STOP: its
    // next heartbeat gets no answer, and moves on within its bound.
    let t = Instant::now();
    let s1_pid = s1.server_pid().unwrap();
    signal(s1_pid, sig);
    let _resume = (sig == "STOP").then_some(Resume(s1_pid));
    wait_until("the agent switched to s2", Duration::from_secs(20), || {
        if agent_log().contains("switching to the next one") {
            Ok(())
        } else {
            Err(agent_log())
        }
    });
    eprintln!("agent switched server {:?} after kill -{sig}", t.elapsed());

    // Past the node lease's TTL (10 s): a node that had not switched would
    // be down and fenced. Its processes are the same ones.
    let deadline = t + Duration::from_secs(12);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let nodes: Vec<Value> = serde_json::from_str(&s2.ok(dir, &["nodes", "--json"])).unwrap();
    let n1 = nodes.iter().find(|n| n["id"] == "n1").unwrap();
    assert_eq!(n1["state"], "up", "{nodes:?}\nagent: {}", agent_log());
    assert!(!agent_log().contains("fencing"), "agent: {}", agent_log());
    assert_eq!(running_pids(&s2, dir), before, "agent: {}", agent_log());
    for pid in &before {
        assert!(alive(*pid as i32), "instance {pid} was restarted");
    }

    // Work placed through s2 (the leader now) reaches the agent.
    s2.ok(dir, &["scale", "-p", "fo", "web=3"]);
    wait_until(
        "3 running via s2",
        Duration::from_secs(30),
        || match running_pids(&s2, dir).len() {
            3 => Ok(()),
            n => Err(format!("{n} running\nagent: {}", agent_log())),
        },
    );
}
