//! Metrics across nodes: a `berth server --no-agent` and one real
//! `berth agent --join`; the instances run on the agent, which sends their
//! CPU/memory and health-check figures to the server. `/metrics`, the built-in history (`berth top`)
//! show them with the agent's node label, and they leave when it stops.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

#[test]
fn an_agents_instances_have_cpu_and_memory_series_with_their_node() {
    let mut berth = Berth::new();
    berth
        .env
        .insert("BERTH_HISTORY_INTERVAL".into(), "500ms".into());
    let api = berth.start_server_without_agent(free_port());
    let port: u16 = api.rsplit(':').next().unwrap().parse().unwrap();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let token = berth.ok(dir, &["token"]).trim().to_owned();

    let agent = spawn_agent(&berth, &api, &token, "n1")
        .args(&["--stats-every", "300ms"])
        .no_edge()
        .start();
    let agent_log = || agent.log();

    std::fs::write(
        dir.join("compose.yaml"),
        concat!(
            "services:\n",
            "  spin:\n",
            "    command: [\"sh\", \"-c\", \"while :; do :; done\"]\n",
            "    deploy: { replicas: 2 }\n",
            "    healthcheck: { test: [\"CMD\", \"true\"], interval: 300ms }\n",
        ),
    )
    .unwrap();
    let stack = format!("fmet{}", std::process::id());
    berth.ok(dir, &["up", "-d", "-p", &stack]);
    wait_until("spin runs on n1", Duration::from_secs(60), || {
        let ps = berth.ps(dir, &stack);
        all_ready(&ps, "spin", 2)?;
        if instances(&ps, "spin").iter().all(|i| i["node"] == "n1") {
            Ok(())
        } else {
            Err(format!("{ps:?}\nagent: {}", agent_log()))
        }
    });

    // Both instances' series, labelled with the agent's node.
    for i in ["spin.1", "spin.2"] {
        let labels = format!(
            "{{namespace=\"default\",stack=\"{stack}\",service=\"spin\",instance=\"{i}\",node=\"n1\"}}"
        );
        wait_until(
            &format!("{i}'s CPU and memory on /metrics"),
            Duration::from_secs(30),
            || {
                let m = http_get(port, "/metrics")?;
                let mem = metric(&m, &format!("berth_instance_memory_bytes{labels}"));
                let cpu = metric(&m, &format!("berth_instance_cpu_seconds_total{labels}"));
                let running = metric(
                    &m,
                    &format!(
                        "berth_instance_state{{namespace=\"default\",stack=\"{stack}\",service=\"spin\",instance=\"{i}\",node=\"n1\",state=\"running\"}}"
                    ),
                );
                // The agent's health checks, counted where they run.
                let checks = metric(&m, &format!("berth_instance_health_checks_total{labels}"));
                match (mem, cpu, running, checks) {
                    (Some(mem), Some(cpu), Some(r), Some(c))
                        if mem > 0.0 && cpu > 0.0 && r == 1.0 && c > 0.0 =>
                    {
                        Ok(())
                    }
                    got => Err(format!("{got:?}\n{m}")),
                }
            },
        );
    }

    // The built-in history has them too: `berth top` shows the node, the
    // memory, and a busy loop's CPU rate (from two reports of the agent:
    // with one there is none). Any rate above 0: on a loaded 2-core machine
    // a busy loop gets far less than a core (CI saw 6.6 % and 9.9 %).
    wait_until(
        "berth top shows n1's figures",
        Duration::from_secs(30),
        || {
            let out = berth.ok(dir, &["top", "--once", "--json", "-p", &stack]);
            let rows: Vec<Value> = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
            let ok = rows.len() == 2
                && rows.iter().all(|r| {
                    r["node"] == "n1"
                        && r["memory_bytes"].as_u64().is_some_and(|m| m > 0)
                        && r["cpu_percent"].as_f64().is_some_and(|c| c > 0.0)
                });
            if ok { Ok(()) } else { Err(out) }
        },
    );
    let table = berth.ok(dir, &["top", "--once", "-p", &stack]);
    assert!(table.contains("NODE") && table.contains("n1"), "{table}");

    // The agent stops, and its instances with it: they leave /metrics
    // (their statuses go; the report itself goes with the node's lease).
    signal(agent.pid(), "TERM");
    wait_until("n1's series are gone", Duration::from_secs(30), || {
        let m = http_get(port, "/metrics")?;
        if m.contains("node=\"n1\"") {
            Err(m)
        } else {
            Ok(())
        }
    });
}
