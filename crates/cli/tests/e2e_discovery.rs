//! End-to-end discovery (issue 3): DNS and the HTTP router follow health.
//! A `kill -STOP`ped instance fails its check and leaves DNS, the catalog
//! and the router; `kill -CONT` brings it back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;

#[test]
fn dns_and_router_list_exactly_the_healthy_instances() {
    let mut berth = Berth::new();
    let stack = format!("disc{}", std::process::id());
    let [http, dns] = free_ports();
    berth
        .env
        .insert("BERTH_HTTP".into(), format!("127.0.0.1:{http}"));
    berth
        .env
        .insert("BERTH_DNS".into(), format!("127.0.0.1:{dns}"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("compose.yaml"),
        concat!(
            "services:\n",
            "  web:\n",
            "    command: [\"sh\", \"-c\", \"exec busybox httpd -f -p 127.0.0.1:$$PORT\"]\n",
            "    ports: [\"8080\"]\n",
            "    restart: unless-stopped\n",
            "    deploy: { replicas: 3 }\n",
            "    x-berth:\n",
            // A 1 s timeout: a loaded machine must not fail a running
            // instance's check (the frozen one still fails it within ~3 s).
            "      healthcheck: { http: /, interval: 300ms, timeout: 1s, retries: 2, start_interval: 50ms }\n",
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("index.html"), "hello").unwrap();
    let dir = dir.path();
    berth.ok(dir, &["up", "-d", "-p", &stack]);
    let ps = berth.ps(dir, &stack);
    all_ready(&ps, "web", 3).unwrap();
    let ports = |ps: &[serde_json::Value]| -> Vec<u16> {
        let mut p: Vec<u16> = ps
            .iter()
            .filter(|i| i["health"] == "healthy")
            .filter_map(|i| i["port"].as_u64().map(|p| p as u16))
            .collect();
        p.sort();
        p
    };
    let srv_ports = || -> Vec<u16> {
        let mut p: Vec<u16> = dig(dns, &format!("web.{stack}.default.berth"), "SRV")
            .iter()
            .filter_map(|l| l.split_whitespace().nth(2)?.parse().ok())
            .collect();
        p.sort();
        p
    };
    let healthy = ports(&ps);
    assert_eq!(healthy.len(), 3);
    wait_until(
        "SRV lists the 3 healthy instances",
        Duration::from_secs(30),
        || {
            let got = srv_ports();
            if got == healthy {
                Ok(())
            } else {
                Err(format!("{got:?} != {healthy:?}"))
            }
        },
    );
    // The short form and A records answer too.
    assert_eq!(
        dig(dns, &format!("web.{stack}.berth"), "A"),
        vec!["127.0.0.1".to_owned()]
    );
    // The router serves <service>.<stack>.localhost.
    let host = format!("web.{stack}.localhost");
    wait_until("router serves the stack", Duration::from_secs(30), || {
        http_get_host(http, &host, "/").map(|_| ())
    });

    // Freeze one instance: its check fails and it disappears everywhere.
    let victim = ps
        .iter()
        .find(|i| i["health"] == "healthy")
        .unwrap()
        .clone();
    let victim_port = victim["port"].as_u64().unwrap() as u16;
    signal(victim["pid"].as_i64().unwrap() as i32, "STOP");
    wait_until(
        "frozen instance out of DNS",
        Duration::from_secs(30),
        || {
            let got = srv_ports();
            if got.len() == 2 && !got.contains(&victim_port) {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        },
    );
    let ps = berth.ps(dir, &stack);
    let me = ps
        .iter()
        .find(|i| i["instance"] == victim["instance"])
        .unwrap();
    assert_eq!(me["health"], "unhealthy", "{me}");
    // Every request through the router now succeeds without touching it.
    for _ in 0..20 {
        http_get_host(http, &host, "/").unwrap();
    }

    signal(victim["pid"].as_i64().unwrap() as i32, "CONT");
    wait_until(
        "thawed instance back in DNS",
        Duration::from_secs(30),
        || {
            let got = srv_ports();
            if got.len() == 3 {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        },
    );
    berth.ok(dir, &["down", "-p", &stack]);
}

#[test]
fn an_exited_instance_stayed_healthy_when_another_process_answered_its_check() {
    // Another process listens where the instance's check looks (as when an
    // instance fails to bind a port someone else holds): the check passes
    // whether or not the instance runs.
    let foreign = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = foreign.local_addr().unwrap().port();
    let mut berth = Berth::new();
    let stack = format!("gone{}", std::process::id());
    let [dns, http] = free_ports();
    berth
        .env
        .insert("BERTH_DNS".into(), format!("127.0.0.1:{dns}"));
    berth
        .env
        .insert("BERTH_HTTP".into(), format!("127.0.0.1:{http}"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("compose.yaml"),
        format!(
            concat!(
                "services:\n",
                "  web:\n",
                // Runs 6 s: `up -d` must see it healthy, and dig find it,
                // before it exits (2 s was tight on a loaded machine).
                "    command: [\"sh\", \"-c\", \"sleep 6; exit 1\"]\n",
                "    restart: \"no\"\n",
                "    x-berth:\n",
                "      healthcheck: {{ tcp: true, port: {port}, interval: 200ms, timeout: 1s, retries: 2, start_interval: 50ms }}\n",
            ),
            port = port
        ),
    )
    .unwrap();
    let dir = dir.path();
    berth.ok(dir, &["up", "-d", "-p", &stack]);
    let name = format!("web.{stack}.berth");
    // While it runs it is healthy and found.
    wait_until(
        "the running instance in DNS",
        Duration::from_secs(30),
        || match dig(dns, &name, "A").as_slice() {
            [a] if a == "127.0.0.1" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    wait_until(
        "the instance exited",
        Duration::from_secs(30),
        || match berth.ps(dir, &stack).first() {
            Some(i) if i["state"] == "exited" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let ps = berth.ps(dir, &stack);
    assert_eq!(ps[0]["health"], "unhealthy", "{ps:?}");
    // Gone from DNS and the catalog although the check would still pass.
    wait_until(
        "the exited instance out of DNS",
        Duration::from_secs(30),
        || match dig(dns, &name, "A").as_slice() {
            [] => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let services: serde_json::Value =
        serde_json::from_str(&berth.ok(dir, &["services", "-p", &stack, "--json"])).unwrap();
    let healthy: Vec<_> = services
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["instances"].as_array().cloned().unwrap_or_default())
        .filter(|i| i["healthy"] == true)
        .collect();
    assert!(healthy.is_empty(), "{services}");
    berth.ok(dir, &["down", "-p", &stack]);
    drop(foreign);
}
