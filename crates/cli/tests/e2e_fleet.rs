//! A fleet on one machine: a `berth server --no-agent` and two
//! `berth agent --join` processes (own node ids and data dirs), all real.
//!
//! Covers: joining with the token, placement spread over the agents,
//! instances that fit no node (pending, with the scheduler's reasons),
//! health and routing to agents' instances, `berth nodes` with facts and
//! as an Ansible inventory, drain / activate, a `kill -9`ed agent going
//! down after the lease TTL, and credentials: none, another node's, a
//! removed node's.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn nodes(berth: &Berth, dir: &Path) -> Vec<Value> {
    serde_json::from_str(&berth.ok(dir, &["nodes", "--json"])).unwrap()
}

fn node_state(nodes: &[Value], id: &str) -> String {
    nodes
        .iter()
        .find(|n| n["id"] == id)
        .map_or("absent".into(), |n| n["state"].as_str().unwrap().to_owned())
}

/// Healthy running instances of `web`, by node.
fn placement(ps: &[Value]) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for i in instances(ps, "web") {
        if i["state"] == "running" && i["health"] == "healthy" {
            *m.entry(i["node"].as_str().unwrap().to_owned()).or_default() += 1;
        }
    }
    m
}

#[test]
fn agents_join_run_spread_work_and_lose_their_node_when_killed() {
    let mut berth = Berth::new();
    let http = free_port();
    let api = berth.start_server_without_agent(http);
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();

    // The token is in the data dir and `berth token` prints it.
    let token = berth.ok(dir, &["token"]).trim().to_owned();
    assert!(token.starts_with("berth-join-"), "{token}");
    let file = std::fs::read_to_string(berth.data.path().join("join-token")).unwrap();
    assert_eq!(file.trim(), token);

    // Without the join token nothing is handed out.
    let (status, _) = api_request(&api, "POST", "/v1/agent/join", None);
    assert!(
        status == 400 || status == 401,
        "join without a body: {status}"
    );

    let t = std::time::Instant::now();
    let a1 = spawn_agent(&berth, &api, &token, "n1")
        .label("zone=east")
        .args(&["--facts-every", "2s"])
        .no_edge()
        .start();
    let a2 = spawn_agent(&berth, &api, &token, "n2")
        .label("zone=west")
        .args(&["--facts-every", "2s"])
        .no_edge()
        .start();
    wait_until("both agents registered", Duration::from_secs(30), || {
        let n = nodes(&berth, dir);
        match (node_state(&n, "n1").as_str(), node_state(&n, "n2").as_str()) {
            ("up", "up") => Ok(()),
            other => Err(format!(
                "{other:?}\nagent n1: {}\nagent n2: {}",
                a1.log(),
                a2.log()
            )),
        }
    });
    eprintln!("both agents joined and registered in {:?}", t.elapsed());
    // The server itself runs no work: only the two agents are nodes.
    let listed = nodes(&berth, dir);
    assert_eq!(listed.len(), 2, "{listed:?}");
    for n in &listed {
        let f = &n["facts"];
        assert!(f["cpus"].as_u64().unwrap() >= 1, "{n}");
        assert!(f["memory_total"].as_u64().unwrap() > 0, "{n}");
        assert!(f["load_1m"].as_f64().is_some(), "{n}");
        assert!(f["disk_free"].as_u64().is_some(), "{n}");
        assert!(f["kernel"].is_string() && f["docker"].is_boolean(), "{n}");
        // Set by the server (`node.role` in constraints): joined = worker.
        assert_eq!(f["role"], "worker", "{n}");
        assert_eq!(n["address"], "127.0.0.1");
        assert_eq!(n["joined"], true);
    }
    let inventory = berth.ok(dir, &["nodes", "--format", "ansible"]);
    assert!(
        inventory.contains("n1 ansible_host=127.0.0.1"),
        "{inventory}"
    );
    assert!(inventory.contains("\n[zone_east]\nn1\n"), "{inventory}");
    assert!(inventory.contains("\n[zone_west]\nn2\n"), "{inventory}");
    let table = berth.ok(dir, &["nodes"]);
    assert!(
        table.starts_with("NODE") && table.contains("zone=east"),
        "{table}"
    );

    // Four replicas, spread two and two, healthy, reachable through the router.
    std::fs::write(dir.join("index.html"), "ok").unwrap();
    std::fs::write(
        dir.join("compose.yaml"),
        concat!(
            "services:\n",
            "  web:\n",
            "    command: [\"sh\", \"-c\", \"exec busybox httpd -f -p 127.0.0.1:$$PORT\"]\n",
            "    ports: [\"8080\"]\n",
            "    deploy: { replicas: 4 }\n",
            "    x-berth:\n",
            "      healthcheck: { http: /, interval: 1s, start_interval: 100ms }\n",
        ),
    )
    .unwrap();
    let t = std::time::Instant::now();
    berth.ok(dir, &["up", "-d", "-p", "fleet"]);
    wait_until(
        "4 healthy instances, 2 per agent",
        Duration::from_secs(60),
        || {
            let p = placement(&berth.ps(dir, "fleet"));
            let want: std::collections::BTreeMap<String, usize> =
                [("n1".to_owned(), 2), ("n2".to_owned(), 2)].into();
            if p == want {
                Ok(())
            } else {
                Err(format!("{p:?}"))
            }
        },
    );
    eprintln!("4 replicas healthy on 2 agents in {:?}", t.elapsed());
    wait_until(
        "the router serves the agents' instances",
        Duration::from_secs(20),
        || http_get_host(http, "web.fleet.localhost", "/").map(|_| ()),
    );

    // What fits nowhere stays pending, with a reason per class of nodes,
    // in `up -d`'s verdict, `ps`, `ps --json` and the stack API the
    // dashboard renders; the record goes with the stack.
    let mars = tempfile::tempdir().unwrap();
    std::fs::write(
        mars.path().join("compose.yaml"),
        concat!(
            "services:\n",
            "  far:\n",
            "    command: sleep 1000\n",
            "    deploy:\n",
            "      replicas: 2\n",
            "      placement: { constraints: [\"node.labels.zone == mars\"] }\n",
            "  big:\n",
            "    command: sleep 1000\n",
            "    deploy: { resources: { reservations: { memory: 64T } } }\n",
        ),
    )
    .unwrap();
    let err = berth.fails(
        mars.path(),
        &["up", "-d", "-p", "mars", "--wait-timeout", "3s"],
        5,
    );
    let far_reason = "no node can run it: 2 nodes: constraint node.labels.zone == mars";
    assert!(err.contains(far_reason), "{err}");
    let rows = berth.ps(dir, "mars");
    let pending: Vec<(String, String)> = rows
        .iter()
        .map(|i| {
            assert_eq!(i["state"], "pending", "{i}");
            assert_eq!(i["node"], "", "{i}");
            let m = i["message"].as_str().unwrap_or_default().to_owned();
            (i["instance"].as_str().unwrap().to_owned(), m)
        })
        .collect();
    assert_eq!(
        pending,
        [
            (
                "big.1".to_owned(),
                "no node can run it: 2 nodes: insufficient memory".to_owned()
            ),
            ("far.1".to_owned(), far_reason.to_owned()),
            ("far.2".to_owned(), far_reason.to_owned()),
        ]
    );
    let table = berth.ok(dir, &["ps", "-p", "mars"]);
    assert!(
        table.contains("far.2") && table.contains("constraint node.labels.zone == mars"),
        "{table}"
    );
    let admin = std::fs::read_to_string(berth.data.path().join("token")).unwrap();
    let (status, body) = api_request(&api, "GET", "/v1/stacks/default/mars", Some(admin.trim()));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("insufficient memory"), "{body}");
    berth.ok(mars.path(), &["down", "-p", "mars"]);
    wait_until("mars's pending rows gone", Duration::from_secs(30), || {
        let all: Vec<Value> =
            serde_json::from_str(&berth.ok(dir, &["ps", "--all-stacks", "--json"])).unwrap();
        match all.iter().filter(|i| i["stack"] == "mars").count() {
            0 => Ok(()),
            n => Err(format!("{n} rows")),
        }
    });

    // Credentials: none, another node's, and the node's own.
    let (status, _) = api_request(&api, "GET", "/v1/agent/nodes/n2/assignments", None);
    assert_eq!(status, 401);
    let (status, _) = api_request(
        &api,
        "GET",
        "/v1/agent/nodes/n2/assignments",
        Some(&a1.secret()),
    );
    assert_eq!(status, 401, "n1's secret must not open n2's assignments");
    let (status, body) = api_request(
        &api,
        "GET",
        "/v1/agent/nodes/n2/assignments",
        Some(&a2.secret()),
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"node\":\"n2\"") && !body.contains("\"node\":\"n1\""),
        "{body}"
    );

    // Drain n1: its instances are replaced on n2, then n1 takes work again.
    let t = std::time::Instant::now();
    let out = berth.ok(dir, &["node", "drain", "n1"]);
    assert!(out.contains("draining"), "{out}");
    wait_until("everything moved to n2", Duration::from_secs(60), || {
        let ps = berth.ps(dir, "fleet");
        let p = placement(&ps);
        let on_n1 = instances(&ps, "web")
            .iter()
            .filter(|i| i["node"] == "n1")
            .count();
        if p.get("n2") == Some(&4) && on_n1 == 0 {
            Ok(())
        } else {
            Err(format!("{p:?}, {on_n1} listed on n1"))
        }
    });
    eprintln!(
        "drain of n1 done (2 instances replaced on n2) in {:?}",
        t.elapsed()
    );
    assert_eq!(node_state(&nodes(&berth, dir), "n1"), "draining");
    berth.ok(dir, &["node", "activate", "n1"]);
    assert_eq!(node_state(&nodes(&berth, dir), "n1"), "up");

    // kill -9 the agent running everything, and its instances: its node
    // goes down once the lease runs out, and its statuses with it.
    let doomed: Vec<i32> = instances(&berth.ps(dir, "fleet"), "web")
        .iter()
        .filter(|i| i["node"] == "n2")
        .filter_map(|i| i["pid"].as_i64().map(|p| p as i32))
        .collect();
    assert_eq!(doomed.len(), 4);
    let mut a2 = a2;
    signal(a2.child.id() as i32, "KILL");
    for pid in &doomed {
        signal(*pid, "KILL");
    }
    let _ = a2.child.wait();
    let t = std::time::Instant::now();
    wait_until(
        "n2 down after its lease TTL",
        Duration::from_secs(30),
        || match node_state(&nodes(&berth, dir), "n2").as_str() {
            "down" => Ok(()),
            s => Err(s.to_owned()),
        },
    );

    eprintln!("n2 down {:?} after kill -9", t.elapsed());
    // Removing a node revokes its credential: its agent stops and exits,
    // and the old secret opens nothing.
    let secret1 = a1.secret();
    let mut a1 = a1;
    let t = std::time::Instant::now();
    let out = berth.ok(dir, &["node", "rm", "n1"]);
    assert!(out.contains("removed"), "{out}");
    let (status, _) = api_request(
        &api,
        "GET",
        "/v1/agent/nodes/n1/assignments",
        Some(&secret1),
    );
    assert_eq!(status, 401);
    let (status, _) = api_request(&api, "POST", "/v1/agent/nodes/n1/heartbeat", Some(&secret1));
    assert_eq!(status, 401);
    wait_until(
        "the removed agent exits",
        Duration::from_secs(30),
        || match a1.child.try_wait().unwrap() {
            Some(st) if !st.success() => Ok(()),
            Some(st) => Err(format!("exited with {st}")),
            None => Err("still running".into()),
        },
    );
    eprintln!(
        "removed agent exited {:?} after `berth node rm`",
        t.elapsed()
    );
    assert!(
        a1.log().contains("removed from the cluster"),
        "{}",
        a1.log()
    );
    assert_eq!(node_state(&nodes(&berth, dir), "n1"), "absent");
}

/// A server's own node refreshes its facts as a joined agent does (load,
/// free memory and disk change, and constraints read them; it used to keep
/// the ones read at start), and a refresh keeps its drain mark.
#[test]
fn a_servers_own_node_refreshes_its_facts_and_keeps_its_drain_mark() {
    let mut berth = Berth::new();
    berth.spawn_server(&[
        "server",
        "--node-id",
        "own",
        "--no-http",
        "--no-dns",
        "--facts-every",
        "200ms",
    ]);
    server_tcp_addresses(berth.data.path());
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let own = |berth: &Berth| -> Value {
        nodes(berth, dir)
            .into_iter()
            .find(|n| n["id"] == "own")
            .expect("the server's own node is listed")
    };
    let first = own(&berth);
    assert!(first["facts"]["load_1m"].is_number(), "{first}");
    assert_eq!(first["facts"]["role"], "manager", "{first}");
    let at = |n: &Value| n["updated_at"].as_u64().unwrap();
    let start = at(&first);
    wait_until(
        "the server's node record to be refreshed",
        Duration::from_secs(15),
        || {
            let n = own(&berth);
            if at(&n) > start {
                Ok(())
            } else {
                Err(format!("updated_at still {start}: {n}"))
            }
        },
    );

    berth.ok(dir, &["node", "drain", "own"]);
    let drained = own(&berth);
    assert_eq!(drained["state"], "draining", "{drained}");
    wait_until("a refresh after the drain", Duration::from_secs(15), || {
        let n = own(&berth);
        assert_eq!(
            n["state"], "draining",
            "a refresh dropped the drain mark: {n}"
        );
        if at(&n) > at(&drained) {
            Ok(())
        } else {
            Err(format!("not refreshed since the drain: {n}"))
        }
    });
    berth.ok(dir, &["node", "activate", "own"]);
    assert_eq!(own(&berth)["state"], "up");
}
