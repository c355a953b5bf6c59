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
    let [d1_http, d1_dns] = free_ports();
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
    wait_until("n1's TCP proxy", Duration::from_secs(30), || {
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
    // Each edge follows the store on its own: wait for each.
    let lo: IpAddr = Ipv4Addr::LOCALHOST.into();
    for (what, port) in [
        ("d1's router", d1_http),
        ("the server's router", server_http),
    ] {
        wait_until(what, Duration::from_secs(30), || {
            let got = served_at(lo, port, WEB, 6)?;
            if got == want {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        });
    }
    wait_until("d1's DNS", Duration::from_secs(30), || {
        let got = dig(d1_dns, "web.dockn.berth", "A");
        if got == vec![node.host.to_string()] {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    });
    // ... and the host port answers from n1's namespace directly.
    let port = *host_ports.first().unwrap();
    let mut direct = Command::new("curl");
    direct.args(["-sS", "-m", "3", &format!("http://{host_ip}:{port}/")]);
    wait_until("the host port from n1", Duration::from_secs(30), || {
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
    // So does each container's second declared port, at the host port
    // `ps --json` shows for it.
    for port in &second_ports {
        let mut direct = Command::new("curl");
        direct.args(["-sS", "-m", "3", &format!("http://{host_ip}:{port}/")]);
        wait_until("the second port answers", Duration::from_secs(30), || {
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

/// A Docker engine of its own in a node's network namespace (a second
/// `dockerd`, its data in a temp dir), so that node's containers are on
/// another host as far as networking goes: another bridge, another stack
/// network, ports published in the node's namespace. The test image is
/// loaded into it from the host's engine. Stopped on drop.
struct NodeEngine {
    dir: tempfile::TempDir,
    child: std::process::Child,
}

impl NodeEngine {
    fn start(net: &Netns, i: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let p = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
        let log = std::fs::File::create(dir.path().join("dockerd.log")).unwrap();
        // nsenter, not `ip netns exec`: that one mounts a fresh /sys,
        // which hides the cgroup hierarchy dockerd needs.
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", net.nodes[i].ns))
            .args([
                "dockerd",
                "--data-root",
                &p("data"),
                "--exec-root",
                &p("exec"),
            ])
            .args([
                "--pidfile",
                &p("pid"),
                "--host",
                &format!("unix://{}", p("sock")),
            ])
            .args(["--cgroup-parent", "berth-e2e-engine"])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("nsenter and dockerd are installed");
        let engine = Self { dir, child };
        wait_until(
            "the node's own dockerd answers",
            Duration::from_secs(30),
            || {
                let out = engine
                    .docker_cmd(&["info"])
                    .output()
                    .map_err(|e| e.to_string())?;
                if out.status.success() {
                    Ok(())
                } else {
                    Err(engine.log())
                }
            },
        );
        let mut save = Command::new("docker")
            .args(["save", "berth-test/busybox:latest"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let image = save.stdout.take().unwrap();
        let load = engine
            .docker_cmd(&["load", "-q"])
            .stdin(image)
            .output()
            .unwrap();
        assert!(save.wait().unwrap().success(), "docker save failed");
        assert!(load.status.success(), "docker load: {load:?}");
        engine
    }

    fn host(&self) -> String {
        format!("unix://{}", self.dir.path().join("sock").display())
    }

    fn docker_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("docker");
        c.env("DOCKER_HOST", self.host()).args(args);
        c
    }

    fn docker(&self, args: &[&str]) -> String {
        let out = self.docker_cmd(args).output().unwrap();
        assert!(out.status.success(), "docker {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }
}

impl Drop for NodeEngine {
    fn drop(&mut self) {
        // dockerd stops its containers and unmounts what it mounted.
        stop_child(&mut self.child);
    }
}

/// The id of the one container of `service` in stack `stack` on an engine.
fn container_of(ps: &str, what: &str) -> String {
    let ids: Vec<&str> = ps.split_whitespace().collect();
    assert_eq!(ids.len(), 1, "one container of {what}: {ps:?}");
    ids[0].to_owned()
}

/// An HTTP GET of `/` on `host:port` from inside a container (busybox
/// `nc`: the image's static `wget` cannot resolve names): the body, or what
/// went wrong.
fn fetch_in(container: &str, host: &str, port: u16) -> Result<String, String> {
    let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {host} {port}");
    let out = Command::new("docker")
        .args(["exec", container, "sh", "-c", &script])
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let ok = text.lines().next().is_some_and(|l| l.contains(" 200 "));
    match text.lines().map(str::trim).rfind(|l| !l.is_empty()) {
        Some(body) if ok && out.status.success() => Ok(body.to_owned()),
        _ => Err(format!(
            "GET http://{host}:{port}/: {text:?} {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// What `n` GETs of `host:port` from `container` answered.
fn answers(container: &str, host: &str, port: u16, n: usize) -> Result<BTreeSet<String>, String> {
    (0..n).map(|_| fetch_in(container, host, port)).collect()
}

const NAMES_STACK: &str = r#"services:
  api:
    image: berth-test/busybox:latest
    pull_policy: never
    command: ["sh", "-c", "mkdir -p /w && echo $$BERTH_INSTANCE > /w/index.html && echo ok > /w/health && exec httpd -f -p 8000 -h /w"]
    ports: ["8000"]
    stop_grace_period: 1s
    deploy:
      replicas: 2
      placement:
        constraints: ["node.labels.kind == d2"]
    x-berth:
      healthcheck: { http: /health, interval: 1s, start_interval: 100ms }
  echo:
    command: ["sh", "-c", "d=$$(mktemp -d) && echo $$BERTH_INSTANCE > $$d/index.html && exec busybox httpd -f -p $$PORT -h $$d"]
    ports: ["7000"]
    deploy:
      placement:
        constraints: ["node.labels.kind == d2"]
    x-berth:
      healthcheck: { http: /, interval: 1s, start_interval: 100ms }
  client:
    image: berth-test/busybox:latest
    pull_policy: never
    command: ["sleep", "3600"]
    stop_grace_period: 1s
    deploy:
      placement:
        constraints: ["node.labels.kind == d1"]
"#;

/// A container finds, by service name and declared port, services with no
/// container on its own node: a container service and a process service on
/// another node, through berth's DNS for containers (198.18.0.53, served
/// by the host's edge) and the container-facing addresses its TCP proxy
/// serves; and it stops reaching an instance that turns unhealthy or is
/// removed.
///
/// - `d1`: a joined agent on the host, with the host's engine (`client`);
///   the server's edge serves the host (as in the test above).
/// - `d2`: a joined agent in its own namespace with an engine of its own
///   there (`api` ×2, containers; `echo`, a process).
#[test]
fn a_container_reaches_services_on_another_node_by_name() {
    let net = match Netns::create(1) {
        Ok(n) => n,
        Err(why) => {
            eprintln!("SKIPPED e2e_docker_nodes: {why}");
            return;
        }
    };
    test_image();
    let node = &net.nodes[0];
    let engine = NodeEngine::start(&net, 0);

    let mut b = Berth::new();
    b.spawn_server(&[
        "server",
        "--no-agent",
        "--listen",
        "127.0.0.1:0",
        "--listen",
        &format!("{}:0", node.host),
        "--no-http",
        "--no-dns",
    ]);
    let apis = server_tcp_addresses(b.data.path());
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let token = b.ok(dir, &["token"]).trim().to_owned();
    let d1 = spawn_agent(&b, &apis[0], &token, "d1")
        .label("kind=d1")
        .args(&["--advertise", &node.host.to_string()])
        .no_edge()
        .start();
    let d2 = spawn_agent(&b, &apis[1], &token, "d2")
        .label("kind=d2")
        .env("DOCKER_HOST", &engine.host())
        .args(&["--no-http", "--no-dns"])
        .in_netns(&net, 0)
        .start();
    let logs = || {
        format!(
            "server: {}\nd1: {}\nd2: {}",
            b.server_log(),
            d1.log(),
            d2.log()
        )
    };
    wait_until("d1 and d2 up", Duration::from_secs(30), || {
        let n: Vec<Value> = serde_json::from_str(&b.ok(dir, &["nodes", "--json"])).unwrap();
        let up: BTreeSet<&str> = n
            .iter()
            .filter(|n| n["state"] == "up")
            .filter_map(|n| n["id"].as_str())
            .collect();
        if up == BTreeSet::from(["d1", "d2"]) {
            Ok(())
        } else {
            Err(format!("{n:?}\n{}", logs()))
        }
    });

    // The server's edge puts berth's DNS address on the host's `lo` as it
    // starts; d1's driver gives it to containers only once it is there.
    wait_until(
        "198.18.0.53 on the host's lo",
        Duration::from_secs(20),
        || {
            let out = Command::new("ip")
                .args(["-4", "-o", "addr", "show", "dev", "lo"])
                .output()
                .map_err(|e| e.to_string())?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if text.contains(" 198.18.0.53/32 ") {
                Ok(())
            } else {
                Err(format!("{text}\n{}", logs()))
            }
        },
    );
    std::fs::write(dir.join("compose.yaml"), NAMES_STACK).unwrap();
    let up = std::time::Instant::now();
    b.ok(dir, &["up", "-d", "-p", "ctrn"]);
    wait_until("the stack ready", Duration::from_secs(60), || {
        let ps = b.ps(dir, "ctrn");
        all_ready(&ps, "api", 2)
            .and(all_ready(&ps, "echo", 1))
            .and(all_ready(&ps, "client", 1))
            .map_err(|e| format!("{e}\n{}", logs()))
    });

    // The host's DNS for containers names the api's container-facing
    // address (the test's own server answers it, not some other one).
    let lo: IpAddr = Ipv4Addr::new(198, 18, 0, 53).into();
    let mut api_addr = String::new();
    wait_until(
        "berth's DNS for containers answers on the host",
        Duration::from_secs(30),
        || {
            let a = dig_at(lo, 53, "api.ctrn.default.berth", "A");
            match a.as_slice() {
                [one] if one.starts_with("198.19.") => {
                    api_addr = one.clone();
                    Ok(())
                }
                _ => Err(format!("{a:?}\n{}", logs())),
            }
        },
    );
    let client = container_of(
        &docker(&["ps", "-q", "--filter", "label=berth.stack=ctrn"]),
        "client on the host's engine",
    );
    let hosts_engine = docker(&["inspect", "-f", "{{json .HostConfig}}", &client]);
    let hc: Value = serde_json::from_str(&hosts_engine).unwrap();
    assert_eq!(hc["Dns"][0], "198.18.0.53", "{hc}");
    assert_eq!(hc["DnsSearch"][0], "ctrn.default.berth", "{hc}");

    // (b) the container service on d2, by name and declared port: both
    // instances answer, through the host's proxy on the api's address.
    let both: BTreeSet<String> = ["api.1".to_owned(), "api.2".to_owned()].into();
    wait_until(
        "the client reaches both api containers on d2 by name",
        Duration::from_secs(30),
        || {
            let got = answers(&client, "api", 8000, 6)?;
            if got == both {
                Ok(())
            } else {
                Err(format!("{got:?}\n{}", logs()))
            }
        },
    );
    eprintln!(
        "the client reached api.1 and api.2 on d2 by name {:?} after `up -d`",
        up.elapsed()
    );
    // (a) the process service on d2, by name and declared port.
    wait_until(
        "the client reaches the echo process on d2 by name",
        Duration::from_secs(20),
        || match fetch_in(&client, "echo", 7000)? {
            body if body == "echo.1" => Ok(()),
            body => Err(format!("{body:?}\n{}", logs())),
        },
    );

    // api.1 turns unhealthy: the client is sent to api.2 only.
    let api1 = container_of(
        &engine.docker(&[
            "ps",
            "-q",
            "--filter",
            "label=berth.service=api",
            "--filter",
            "label=berth.instance=1",
        ]),
        "api.1",
    );
    engine.docker(&["exec", &api1, "busybox", "rm", "/w/health"]);
    let health = |slot: &str| -> String {
        let ps = b.ps(dir, "ctrn");
        instances(&ps, "api")
            .iter()
            .find(|i| i["instance"].as_str().is_some_and(|n| n.ends_with(slot)))
            .map(|i| i["health"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    };
    wait_until(
        "api.1 unhealthy",
        Duration::from_secs(20),
        || match health(".1").as_str() {
            "unhealthy" => Ok(()),
            h => Err(format!("api.1 is {h:?}")),
        },
    );
    let unhealthy = std::time::Instant::now();
    let only = |who: &str| -> BTreeSet<String> { [who.to_owned()].into() };
    wait_until(
        "the client no longer reaches the unhealthy api.1",
        Duration::from_secs(20),
        || {
            let got = answers(&client, "api", 8000, 6)?;
            if got == only("api.2") {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        },
    );

    eprintln!(
        "api.1 out of the client's answers {:?} after ps showed it unhealthy",
        unhealthy.elapsed()
    );
    // Healthy again, then api.2 removed: api.1 only.
    engine.docker(&["exec", &api1, "sh", "-c", "echo ok > /w/health"]);
    wait_until(
        "api.1 healthy again",
        Duration::from_secs(20),
        || match health(".1").as_str() {
            "healthy" => Ok(()),
            h => Err(format!("api.1 is {h:?}")),
        },
    );
    b.ok(dir, &["scale", "-p", "ctrn", "api=1"]);
    wait_until(
        "the client no longer reaches the removed api.2",
        Duration::from_secs(30),
        || {
            let got = answers(&client, "api", 8000, 6)?;
            if got == only("api.1") && instances(&b.ps(dir, "ctrn"), "api").len() == 1 {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        },
    );
    assert_eq!(dig_at(lo, 53, "api.ctrn.default.berth", "A"), [api_addr]);

    b.ok(dir, &["down", "-p", "ctrn"]);
    wait_until("the containers gone", Duration::from_secs(30), || {
        let left = docker(&["ps", "-aq", "--filter", "label=berth.stack=ctrn"])
            + &engine.docker(&["ps", "-aq", "--filter", "label=berth.stack=ctrn"]);
        if left.trim().is_empty() {
            Ok(())
        } else {
            Err(left)
        }
    });
    drop((d1, d2));
}
