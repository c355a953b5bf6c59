//! Issues 4 and 6 together: a container run by a joined agent is reached
//! from other nodes.
//!
//! A container's bridge IP is reachable from its own host only, so an agent
//! whose address is not loopback publishes each container's declared ports
//! on that address, at host ports it allocates, and registers
//! `address:host-port` (`driver::docker`). Here:
//! - `d1`, a joined agent on the host (dockerd runs in the host's network
//!   namespace, so its published ports bind there), advertises the host's
//!   address on node `n1`'s link (`10.213.1.1`, `common::netns`) and runs
//!   two `web` containers;
//! - `n1`, a joined agent in its own namespace (`10.213.1.2`), runs nothing
//!   but its edge: its router serves `web` from the containers on `d1`
//!   (HTTP 200, both instances), its DNS answers with `d1`'s address and
//!   the host ports, and its TCP proxy forwards the user's published port;
//! - `d1`'s own router and DNS reach its containers the same way;
//! - the engine binds only the allocated host ports on `10.213.1.1`, never
//!   the user's published port (every node's TCP proxy owns that one).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::Duration;

use common::netns::Netns;
use common::*;
use serde_json::Value;

fn stack(published: u16) -> String {
    format!(
        r#"services:
  web:
    image: berth-test/busybox:latest
    pull_policy: never
    command: ["sh", "-c", "mkdir -p /w && echo $$BERTH_INSTANCE > /w/index.html && httpd -p 9000 -h /w && exec httpd -f -p 8000 -h /w"]
    ports: ["{published}:8000", "9000"]
    # httpd as pid 1 ignores SIGTERM: do not wait 10 s for it at `down`.
    stop_grace_period: 1s
    deploy:
      replicas: 2
      placement:
        constraints: ["node.labels.kind == docker"]
    x-berth:
      healthcheck: {{ http: /, interval: 1s, start_interval: 100ms }}
"#
    )
}

const WEB: &str = "web.dockn.localhost";

#[test]
fn a_joined_agents_containers_are_served_by_another_nodes_router_dns_and_proxy() {
    let net = match Netns::create(1) {
        Ok(n) => n,
        Err(why) => {
            eprintln!("SKIPPED e2e_docker_nodes: {why}");
            return;
        }
    };
    test_image();
    let node = &net.nodes[0];
    let (host_ip, n1_ip): (IpAddr, IpAddr) = (node.host.into(), node.addr.into());

    // A server that runs nothing itself, answering on loopback (for d1 and
    // the CLI) and on n1's link.
    let mut b = Berth::new();
    let server_http = free_port();
    b.spawn_server(&[
        "server",
        "--no-agent",
        "--listen",
        "127.0.0.1:0",
        "--listen",
        &format!("{}:0", node.host),
        "--http",
        &format!("127.0.0.1:{server_http}"),
        "--no-dns",
    ]);
    let apis = server_tcp_addresses(b.data.path());
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let token = b.ok(dir, &["token"]).trim().to_owned();

    // d1: on the host, where dockerd publishes; its TCP proxy is off (the
    // server's own edge holds the host's loopback published port).
    let (d1_http, d1_dns) = (free_port(), free_port());
    let d1 = spawn_agent(&b, &apis[0], &token, "d1")
        .label("kind=docker")
        .args(&[
            "--advertise",
            &node.host.to_string(),
            "--http",
            &format!("127.0.0.1:{d1_http}"),
            "--dns",
            &format!("127.0.0.1:{d1_dns}"),
            "--no-proxy",
        ])
        .start();
    let n1 = spawn_agent(&b, &apis[1], &token, "n1")
        .label("kind=plain")
        .args(&[
            "--http",
            &format!("{}:8080", node.addr),
            "--dns",
            &format!("{}:8600", node.addr),
        ])
        .in_netns(&net, 0)
        .start();
    wait_until("d1 and n1 up", Duration::from_secs(30), || {
        let n: Vec<Value> = serde_json::from_str(&b.ok(dir, &["nodes", "--json"])).unwrap();
        let up: BTreeSet<&str> = n
            .iter()
            .filter(|n| n["state"] == "up")
            .filter_map(|n| n["id"].as_str())
            .collect();
        if up == BTreeSet::from(["d1", "n1"]) {
            Ok(())
        } else {
            Err(format!("{n:?}\nd1: {}\nn1: {}", d1.log(), n1.log()))
        }
    });

    let published = free_port();
    std::fs::write(dir.join("compose.yaml"), stack(published)).unwrap();
    let up = std::time::Instant::now();
    b.ok(dir, &["up", "-d", "-p", "dockn"]);
    wait_until("web healthy on d1", Duration::from_secs(40), || {
        all_ready(&b.ps(dir, "dockn"), "web", 2).map_err(|e| format!("{e}\n{}", d1.log()))
    });

    eprintln!(
        "2 containers on d1 healthy {:?} after `up -d`",
        up.elapsed()
    );
    // Registered with d1's advertised address and a host port each.
    let ps = b.ps(dir, "dockn");
    let mut host_ports = BTreeSet::new();
    let mut second_ports = BTreeSet::new();
    for i in instances(&ps, "web") {
        assert_eq!(i["node"], "d1", "{i}");
        let (ip, port) = i["address"]
            .as_str()
            .and_then(|a| a.rsplit_once(':'))
            .unwrap_or_else(|| panic!("no address: {i}"));
        assert_eq!(ip, node.host.to_string(), "{i}");
        let port: u16 = port.parse().unwrap();
        assert_eq!(i["port"].as_u64(), Some(u64::from(port)), "{i}");
        assert!(port != 8000 && port != published, "{i}");
        host_ports.insert(port);
        // Every declared port with its host port (`ps --json` showed only
        // the first one before).
        let map = i["host_ports"]
            .as_object()
            .unwrap_or_else(|| panic!("no host_ports: {i}"));
        assert_eq!(map.len(), 2, "{i}");
        assert_eq!(map["8000"].as_u64(), Some(u64::from(port)), "{i}");
        let second = map["9000"].as_u64().unwrap_or_else(|| panic!("{i}"));
        second_ports.insert(u16::try_from(second).unwrap());
    }
    assert_eq!(host_ports.len(), 2, "one host port per container");
    assert_eq!(second_ports.len(), 2, "one host port per container");
    assert!(host_ports.is_disjoint(&second_ports));
    // The engine binds exactly those, on that address.
    let bound_of = |target: &str| {
        let mut bound = BTreeSet::new();
        for id in docker(&["ps", "-q", "--filter", "label=berth.stack=dockn"]).lines() {
            let out = docker(&["port", id, target]);
            for line in out.lines() {
                let (ip, port) = line.trim().rsplit_once(':').unwrap();
                assert_eq!(ip, node.host.to_string(), "{out}");
                bound.insert(port.parse::<u16>().unwrap());
            }
        }
        bound
    };
    assert_eq!(bound_of("8000/tcp"), host_ports);
    assert_eq!(bound_of("9000/tcp"), second_ports);

    // n1's router serves both containers (HTTP 200 from each).
    let want: BTreeSet<String> = ["web.1".to_owned(), "web.2".to_owned()].into();
    wait_until(
        "n1's router reaches the containers on d1",
        Duration::from_secs(20),
        || {
            let got = served_at(n1_ip, 8080, WEB, 6)?;
            if got == want {
                Ok(())
            } else {
                Err(format!("{got:?}\n{}", n1.log()))
            }
        },
    );
    // n1's DNS answers with d1's address and the host ports.
    assert_eq!(
        dig_at(n1_ip, 8600, "web.dockn.berth", "A"),
        vec![node.host.to_string()]
    );
    let srv: BTreeSet<u16> = dig_at(n1_ip, 8600, "web.dockn.default.berth", "SRV")
        .iter()
        .filter_map(|l| l.split_whitespace().nth(2)?.parse().ok())
        .collect();
    assert_eq!(srv, host_ports);
    // n1's TCP proxy forwards the published port, on n1's own loopback.
    let mut curl = Command::new("curl");
    curl.args(["-sS", "-m", "3", &format!("http://127.0.0.1:{published}/")]);
    wait_until("n1's TCP proxy", Duration::from_secs(10), || {
        let out = net.command(0, &curl).output().map_err(|e| e.to_string())?;
        let body = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if want.contains(&body) {
            Ok(())
        } else {
            Err(format!(
                "{body:?} {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                n1.log()
            ))
        }
    });

    // The node running them reaches them too: d1's router and DNS, and the
    // server's router, all on the host.
    let lo: IpAddr = Ipv4Addr::LOCALHOST.into();
    assert_eq!(served_at(lo, d1_http, WEB, 6).unwrap(), want);
    assert_eq!(served_at(lo, server_http, WEB, 6).unwrap(), want);
    assert_eq!(
        dig(d1_dns, "web.dockn.berth", "A"),
        vec![node.host.to_string()]
    );
    // ... and the host port answers from n1's namespace directly.
    let port = *host_ports.first().unwrap();
    let mut direct = Command::new("curl");
    direct.args(["-sS", "-m", "3", &format!("http://{host_ip}:{port}/")]);
    let out = net.command(0, &direct).output().unwrap();
    assert!(
        want.contains(String::from_utf8_lossy(&out.stdout).trim()),
        "{out:?}"
    );
    // So does each container's second declared port, at the host port
    // `ps --json` shows for it.
    for port in &second_ports {
        let mut direct = Command::new("curl");
        direct.args(["-sS", "-m", "3", &format!("http://{host_ip}:{port}/")]);
        wait_until("the second port answers", Duration::from_secs(10), || {
            let out = net
                .command(0, &direct)
                .output()
                .map_err(|e| e.to_string())?;
            if want.contains(String::from_utf8_lossy(&out.stdout).trim()) {
                Ok(())
            } else {
                Err(format!("{out:?}"))
            }
        });
    }

    b.ok(dir, &["down", "-p", "dockn"]);
    wait_until("the containers gone", Duration::from_secs(30), || {
        let left = docker(&["ps", "-aq", "--filter", "label=berth.stack=dockn"]);
        if left.trim().is_empty() {
            Ok(())
        } else {
            Err(left)
        }
    });
    drop((d1, n1));
}
