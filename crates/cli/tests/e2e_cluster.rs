//! Issue 6's acceptance on a real cluster: a 3-member etcd cluster on
//! loopback, two `berth server --store etcd://… --no-agent` (one elected
//! leader) on the host, and three `berth agent --join` processes, each in
//! its own network namespace with its own address (`common::netns`:
//! `10.213.k.2`, reaching the servers on the host side of its veth). The
//! agents register those addresses, so the servers' routers reach their
//! instances across the veths, and a partition is iptables dropping all of
//! that node's traffic (the agent stays alive, its instances keep running,
//! it just cannot reach any server or node).
//!
//! Covers: constraint + spread placement; `kill -9` of an agent and its
//! instances → replacements healthy elsewhere, with the router's error
//! window measured by a load loop; the agent back with the same data dir →
//! no duplicates; a partition → the cut-off node fences itself and at most
//! one copy of a singleton serves through the router after TTL + grace;
//! `kill -9` of the etcd leader → deploys still work; `scale bulk=N` (60 by default).
//!
//! Skipped (with a message) where network namespaces cannot be made: not
//! root, or no iproute2. CI runs as root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::netns::Netns;
use common::*;
use serde_json::Value;

/// The node registration TTL of the servers (`join::NODE_TTL`).
const TTL: Duration = Duration::from_secs(10);
/// `--reschedule-after` given to the servers.
const GRACE: Duration = Duration::from_secs(1);

struct Member {
    name: String,
    client: u16,
    child: Child,
}

/// A 3-member etcd cluster on loopback, killed on drop.
struct EtcdCluster {
    members: Vec<Member>,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let free: [u16; 6] = free_ports();
        let ports: Vec<(u16, u16)> = free.chunks(2).map(|p| (p[0], p[1])).collect();
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("e{i}=http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("berth-e2e-{}", std::process::id());
        let members = ports
            .iter()
            .enumerate()
            .map(|(i, (c, p))| {
                let name = format!("e{i}");
                let client = format!("http://127.0.0.1:{c}");
                let peer = format!("http://127.0.0.1:{p}");
                let log = std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap();
                let child = Command::new("etcd")
                    .args(["--name", &name])
                    .arg("--data-dir")
                    .arg(dir.path().join(&name))
                    .args(["--listen-client-urls", &client])
                    .args(["--advertise-client-urls", &client])
                    .args(["--listen-peer-urls", &peer])
                    .args(["--initial-advertise-peer-urls", &peer])
                    .args(["--initial-cluster", &initial])
                    .args(["--initial-cluster-token", &token])
                    .args(["--initial-cluster-state", "new"])
                    .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
                    .stdin(Stdio::null())
                    .stdout(log.try_clone().unwrap())
                    .stderr(log)
                    .spawn()
                    .expect("etcd is not installed: run scripts/deps");
                Member {
                    name,
                    client: *c,
                    child,
                }
            })
            .collect();
        let cluster = Self { members, _dir: dir };
        for m in &cluster.members {
            wait_until("etcd member healthy", Duration::from_secs(30), || {
                http_get(m.client, "/health").map(|_| ())
            });
        }
        cluster
    }

    fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Index of the member that is the raft leader.
    fn leader(&self) -> Result<usize, String> {
        for (i, m) in self.members.iter().enumerate() {
            let Ok(mut s) = TcpStream::connect(("127.0.0.1", m.client)) else {
                continue;
            };
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let _ = write!(
                s,
                "POST /v3/maintenance/status HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
            );
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            let Some(body) = out.split("\r\n\r\n").nth(1) else {
                continue;
            };
            let v: Value = serde_json::from_str(body).map_err(|e| format!("{e}: {out}"))?;
            if v["leader"].is_string() && v["leader"] == v["header"]["member_id"] {
                return Ok(i);
            }
        }
        Err("no member says it leads".into())
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            let _ = m.child.kill();
            let _ = m.child.wait();
        }
    }
}

/// Agent `node` in namespace `i`, joining the server whose API addresses
/// are `apis` (its listener on that namespace's link).
fn start_agent(
    berth: &Berth,
    net: &Netns,
    i: usize,
    apis: &[String],
    token: &str,
    node: &str,
    label: &str,
) -> Agent {
    let host = net.nodes[i].host.to_string();
    let api = apis
        .iter()
        .find(|a| a.rsplit_once(':').is_some_and(|(h, _)| h == host))
        .unwrap_or_else(|| panic!("no listener on {host} in {apis:?}"));
    spawn_agent(berth, api, token, node)
        .label(label)
        .in_netns(net, i)
        // The servers' routers are measured here; the nodes' own edge is
        // e2e_edge's.
        .args(&["--no-http", "--no-dns"])
        .start()
}

/// A server on the host, listening on loopback (for the test) and on the
/// host side of every node's veth; its API addresses (loopback first).
fn server(etcd: &EtcdCluster, net: &Netns, node: &str, prefix: &str) -> (Berth, Vec<String>, u16) {
    let mut b = Berth::new();
    let http = free_port();
    let store = format!("etcd://{}/{prefix}", etcd.endpoints());
    let mut args: Vec<String> = [
        "server",
        "--store",
        &store,
        "--node-id",
        node,
        "--no-agent",
        "--listen",
        "127.0.0.1:0",
        "--http",
        &format!("127.0.0.1:{http}"),
        "--no-dns",
        "--reschedule-after",
        &format!("{}s", GRACE.as_secs()),
    ]
    .map(str::to_owned)
    .into();
    for n in &net.nodes {
        args.push("--listen".into());
        args.push(format!("{}:0", n.host));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    b.spawn_server(&args);
    let apis = server_tcp_addresses(b.data.path());
    (b, apis, http)
}

fn leader_of(api: &str) -> Result<Value, String> {
    let port: u16 = api.rsplit(':').next().unwrap().parse().unwrap();
    let out = http_get(port, "/v1/leader")?;
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).map_err(|e| format!("{e}: {out}"))
}

fn node_states(berth: &Berth, dir: &Path) -> BTreeMap<String, String> {
    let n: Vec<Value> = serde_json::from_str(&berth.ok(dir, &["nodes", "--json"])).unwrap();
    n.iter()
        .map(|n| {
            (
                n["id"].as_str().unwrap().to_owned(),
                n["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Healthy running instances of `service`, by node.
fn placement(ps: &[Value], service: &str) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for i in instances(ps, service) {
        if i["state"] == "running" && i["health"] == "healthy" {
            *m.entry(i["node"].as_str().unwrap().to_owned()).or_default() += 1;
        }
    }
    m
}

/// Each instance serves a page naming itself and its pid (`$$` of the
/// shell that execs httpd, i.e. the server's pid), on every address of its
/// node: other nodes reach it on the node's own.
const STACK: &str = r#"services:
  web:
    command: ["sh", "-c", "d=$$(mktemp -d /tmp/berth-e2e-cluster.XXXXXX) && echo \"$$BERTH_INSTANCE $$$$\" > $$d/index.html && exec busybox httpd -f -p $$PORT -h $$d"]
    ports: ["8080"]
    deploy:
      replicas: 4
      placement:
        constraints: ["node.labels.zone == east"]
    x-berth:
      healthcheck: { http: /, interval: 1s, start_interval: 100ms }
  solo:
    command: ["sh", "-c", "d=$$(mktemp -d /tmp/berth-e2e-cluster.XXXXXX) && echo \"$$BERTH_INSTANCE $$$$\" > $$d/index.html && exec busybox httpd -f -p $$PORT -h $$d"]
    ports: ["8080"]
    deploy:
      replicas: 1
      placement:
        max_replicas_per_node: 1
    x-berth:
      healthcheck: { http: /, interval: 1s, start_interval: 100ms }
"#;

const BULK: &str = r#"services:
  bulk:
    command: ["sh", "-c", "exec busybox httpd -f -p $$PORT -h /tmp"]
    ports: ["8080"]
    x-berth:
      healthcheck: { tcp: true, interval: 2s, start_interval: 200ms }
"#;

/// `berth ps` through `berth`'s server; its log when that fails.
fn ps_or_log(berth: &Berth, dir: &Path, stack: &str) -> Result<Vec<Value>, String> {
    let out = berth.run(dir, &["ps", "--json", "-p", stack]);
    if !out.status.success() {
        return Err(format!(
            "ps: {}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            berth.server_log()
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// Copies of `service` running: its processes, less helpers one of them
/// started (the `mktemp` of a starting instance).
fn copy_pids(stack: &str, service: &str) -> BTreeSet<i32> {
    let pids = processes_of(stack, Some(service));
    let parent = |pid: i32| -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit(')')
            .next()?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    pids.iter()
        .filter(|p| parent(**p).is_none_or(|pp| !pids.contains(&pp)))
        .copied()
        .collect()
}

fn copies(stack: &str, service: &str) -> usize {
    copy_pids(stack, service).len()
}

/// The pid in a page served through the router.
fn served_pid(page: &str) -> Option<i32> {
    page.split("\r\n\r\n")
        .nth(1)?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// An agent's log lines about its lease (heartbeats, registering, fencing),
/// which say when it stopped being renewed and when it fenced.
fn fence_lines(log: &str) -> String {
    log.lines()
        .filter(|l| {
            ["fenc", "heartbeat", "regist"]
                .iter()
                .any(|w| l.contains(w))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_real_cluster_places_survives_node_loss_partition_and_etcd_leader_loss() {
    let net = match Netns::create(3) {
        Ok(n) => n,
        Err(why) => {
            eprintln!("SKIPPED e2e_cluster: {why}");
            return;
        }
    };
    let etcd = EtcdCluster::start();
    let prefix = format!("e2e-cluster-{}", std::process::id());
    let (s1, apis1, http1) = server(&etcd, &net, "s1", &prefix);
    let (_s2, apis2, _http2) = server(&etcd, &net, "s2", &prefix);
    let (api1, api2) = (&apis1[0], &apis2[0]);
    wait_until("a leader is elected", Duration::from_secs(20), || {
        let (a, b) = (leader_of(api1)?, leader_of(api2)?);
        if a["leader"].is_null() || a["leader"] != b["leader"] {
            return Err(format!("s1 sees {a}, s2 sees {b}"));
        }
        Ok(())
    });
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let token = s1.ok(dir, &["token"]).trim().to_owned();

    // n1 and n3 join s1, n2 joins s2: any server serves any agent.
    let mut agents = vec![
        start_agent(&s1, &net, 0, &apis1, &token, "n1", "zone=east"),
        start_agent(&s1, &net, 1, &apis2, &token, "n2", "zone=east"),
        start_agent(&s1, &net, 2, &apis1, &token, "n3", "zone=west"),
    ];
    wait_until("three nodes up", Duration::from_secs(30), || {
        let st = node_states(&s1, dir);
        let up = st.values().filter(|s| *s == "up").count();
        if up == 3 {
            Ok(())
        } else {
            Err(format!("{st:?}\n{}", agents[0].log()))
        }
    });

    // Constraint and spread: web only in zone east, two per east node.
    std::fs::write(dir.join("compose.yaml"), STACK).unwrap();
    s1.ok(dir, &["up", "-d", "-p", "clu"]);
    wait_until(
        "web 2+2 on east, solo healthy",
        Duration::from_secs(60),
        || {
            let ps = s1.ps(dir, "clu");
            let web = placement(&ps, "web");
            let want: BTreeMap<String, usize> = [("n1".into(), 2), ("n2".into(), 2)].into();
            if web == want && placement(&ps, "solo").values().sum::<usize>() == 1 {
                Ok(())
            } else {
                Err(format!("web {web:?}, solo {:?}", placement(&ps, "solo")))
            }
        },
    );
    // Each instance is registered with its node's own address, which is
    // how the servers' routers reach it.
    for i in s1.ps(dir, "clu") {
        let node = i["node"].as_str().unwrap();
        let a = agents.iter().find(|a| a.node == node).unwrap();
        let host = i["address"].as_str().and_then(|a| a.rsplit_once(':'));
        assert_eq!(
            host.map(|h| h.0),
            Some(&*net.nodes[a.net()].addr.to_string()),
            "{i}"
        );
    }
    wait_until("the router serves web", Duration::from_secs(20), || {
        http_get_host(http1, "web.clu.localhost", "/").map(|_| ())
    });

    // kill -9 n1's agent and every process it started, under load.
    let stop_load = Arc::new(AtomicBool::new(false));
    let samples: Arc<Mutex<Vec<(Instant, bool)>>> = Arc::default();
    let load = {
        let (stop, samples) = (stop_load.clone(), samples.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let ok = http_get_host(http1, "web.clu.localhost", "/").is_ok();
                samples.lock().unwrap().push((Instant::now(), ok));
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let doomed: Vec<i32> = s1
        .ps(dir, "clu")
        .iter()
        .filter(|i| i["node"] == "n1")
        .filter_map(|i| i["pid"].as_i64().map(|p| p as i32))
        .collect();
    assert!(doomed.len() >= 2, "{doomed:?}");
    let killed = Instant::now();
    signal(agents[0].child.id() as i32, "KILL");
    for pid in &doomed {
        signal(*pid, "KILL");
    }
    let _ = agents[0].child.wait();
    wait_until(
        "n1's web instances healthy on n2 (the only other east node)",
        // The node's lease (TTL 10 s) lapses, the grace passes, two
        // instances start and pass a check: about 11 s; room for load.
        Duration::from_secs(30),
        || {
            let web = placement(&s1.ps(dir, "clu"), "web");
            if web.get("n2") == Some(&4) {
                Ok(())
            } else {
                Err(format!("{web:?}"))
            }
        },
    );
    let recovered = killed.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    stop_load.store(true, Ordering::SeqCst);
    load.join().unwrap();
    let samples = samples.lock().unwrap();
    let errors: Vec<Instant> = samples
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(t, _)| *t)
        .collect();
    let window = match (errors.first(), errors.last()) {
        (Some(a), Some(b)) => *b - *a,
        _ => Duration::ZERO,
    };
    eprintln!(
        "kill -9 of n1: web healthy elsewhere after {recovered:?}; router: {} errors of {} requests, error window {window:?}",
        errors.len(),
        samples.len()
    );
    assert!(window <= Duration::from_secs(15), "error window {window:?}");
    assert!(
        samples.last().is_some_and(|(_, ok)| *ok),
        "the router still fails after recovery"
    );
    drop(samples);

    // n1 back with the same data dir: no duplicates.
    agents[0].restart(&s1);
    wait_until(
        "n1 up again",
        Duration::from_secs(30),
        || match node_states(&s1, dir).get("n1").map(String::as_str) {
            Some("up") => Ok(()),
            s => Err(format!("{s:?}")),
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(copies("clu", "web"), 4);
    assert_eq!(copies("clu", "solo"), 1);
    assert_eq!(instances(&s1.ps(dir, "clu"), "web").len(), 4);

    // Partition the node running solo. It fences itself (stops solo)
    // before its lease expires; solo is replaced after TTL + grace.
    let ps = s1.ps(dir, "clu");
    let solo = instances(&ps, "solo")[0].clone();
    let cut_node = solo["node"].as_str().unwrap().to_owned();
    let old_pid = solo["pid"].as_i64().unwrap() as i32;
    let cut = agents.iter().position(|a| a.node == cut_node).unwrap();
    let cut_at = Instant::now();
    net.partition(agents[cut].net());
    // When the old copy is gone, watched on a thread of its own: the loop
    // below waits for requests into the cut network (seconds each), which
    // would make a timely fence look late.
    let fence_watch = std::thread::spawn(move || {
        while cut_at.elapsed() < TTL + GRACE + Duration::from_secs(20) {
            if !alive(old_pid) {
                return Some(cut_at.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    });
    let mut served_by: Vec<(Duration, i32)> = Vec::new();
    let mut copies_max = 0;
    let mut previous = BTreeSet::new();
    let mut new_pid = None;
    while cut_at.elapsed() < TTL + GRACE + Duration::from_secs(12) {
        if let Ok(page) = http_get_host(http1, "solo.clu.localhost", "/")
            && let Some(pid) = served_pid(&page)
        {
            served_by.push((cut_at.elapsed(), pid));
            if pid != old_pid {
                new_pid.get_or_insert(pid);
            }
        }
        // From the cut on: the old copy stops before the lease can expire
        // and the new one starts after it, so two never run at once.
        // A copy is a process seen in two scans 50 ms apart: a process
        // that exists for less (one being forked or reaped) serves nothing.
        let now = copy_pids("clu", "solo");
        let n = now.intersection(&previous).count();
        if now.len() > 1 {
            for p in &now {
                let stat = std::fs::read_to_string(format!("/proc/{p}/stat"));
                eprintln!(
                    "{:?} after the cut: {}",
                    cut_at.elapsed(),
                    stat.unwrap_or_default()
                );
            }
        }
        previous = now;
        copies_max = copies_max.max(n);
        if new_pid.is_some() && cut_at.elapsed() > TTL + GRACE + Duration::from_secs(3) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let fenced_after = fence_watch.join().unwrap();
    let last_old = served_by
        .iter()
        .filter(|(_, p)| *p == old_pid)
        .map(|(t, _)| *t)
        .max();
    let first_new = served_by
        .iter()
        .find(|(_, p)| *p != old_pid)
        .map(|(t, _)| *t);
    // The agent's own account: how long it had gone unrenewed (silent_for)
    // when it fenced, TTL − one heartbeat (7.5 s) when on time.
    let fencing = agents[cut].log();
    let fencing = fencing
        .lines()
        .find(|l| l.contains("fencing (stopping"))
        .unwrap_or("no fencing line");
    eprintln!(
        "partition of {cut_node}: solo fenced after {fenced_after:?}, old copy last served at {last_old:?}, new copy first served at {first_new:?}, at most {copies_max} solo process(es) at once; agent: {fencing}"
    );
    assert!(
        agents[cut].child.try_wait().unwrap().is_none(),
        "the partitioned agent must stay alive"
    );
    let fenced_after = fenced_after.unwrap_or_else(|| {
        panic!(
            "the partitioned node did not fence itself:\n{}",
            agents[cut].log()
        )
    });
    // The agent fences at TTL − one heartbeat after the last renewal it
    // sent (before the cut), so solo is gone before the lease can expire.
    assert!(
        fenced_after <= TTL,
        "partition of {cut_node}: solo (pid {old_pid}) still ran {fenced_after:?} after the cut, \
         past the lease TTL {TTL:?}; the agent's renewals and fencing:\n{}",
        fence_lines(&agents[cut].log())
    );
    assert!(
        copies_max <= 1,
        "partition of {cut_node}: {copies_max} copies of solo ran at once (old pid {old_pid} \
         gone {fenced_after:?} after the cut, the new one first served at {first_new:?})"
    );
    assert!(
        last_old.is_none_or(|t| t <= TTL),
        "old copy served at {last_old:?}"
    );
    assert!(
        first_new.is_some(),
        "solo never came back elsewhere: {served_by:?}"
    );
    assert!(
        agents[cut].log().contains("fencing"),
        "{}",
        agents[cut].log()
    );

    // Heal: the node comes back, runs only what is still assigned to it.
    net.heal(agents[cut].net());
    wait_until(
        "the partitioned node up again",
        Duration::from_secs(30),
        || match node_states(&s1, dir).get(&cut_node).map(String::as_str) {
            Some("up") => Ok(()),
            s => Err(format!("{s:?}")),
        },
    );
    // The agent logs "unfencing" as its heartbeat gets through, the moment
    // the servers see it up; its log writer flushes every 50 ms.
    wait_until(
        "the node's unfencing log line",
        // A re-registration whose answer was lost past its 2.5 s bound
        // logs it only at the next beat: seconds, more on a loaded machine.
        Duration::from_secs(30),
        || {
            let log = agents[cut].log();
            if log.contains("unfencing") {
                Ok(())
            } else {
                Err(log)
            }
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(copies("clu", "solo"), 1);
    assert_eq!(copies("clu", "web"), 4);
    wait_until(
        "4 web ready after the heal",
        Duration::from_secs(30),
        || all_ready(&s1.ps(dir, "clu"), "web", 4),
    );

    // Kill the etcd leader: a deploy still goes through.
    let mut etcd = etcd;
    let mut lead = 0;
    wait_until("an etcd leader", Duration::from_secs(10), || {
        lead = etcd.leader()?;
        Ok(())
    });
    let name = etcd.members[lead].name.clone();
    let _ = etcd.members[lead].child.kill();
    let _ = etcd.members[lead].child.wait();
    let t = Instant::now();
    // At once, no retry by the test: the store fails over to a live member.
    s1.ok(dir, &["scale", "-p", "clu", "web=6"]);
    wait_until("6 web healthy", Duration::from_secs(60), || {
        all_ready(&ps_or_log(&s1, dir, "clu")?, "web", 6)
    });
    eprintln!(
        "etcd leader {name} killed: scale web=6 accepted and healthy after {:?}",
        t.elapsed()
    );

    // Many instances across the three agents: issue 6 asks for 300, which
    // this 2-core test box does not reach (see BENCHMARKS.md, "cluster");
    // BERTH_E2E_CLUSTER_SCALE=300 runs that.
    let scale: usize = std::env::var("BERTH_E2E_CLUSTER_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    std::fs::write(dir.join("bulk.yaml"), BULK).unwrap();
    s1.ok(dir, &["up", "-d", "-p", "blk", "-f", "bulk.yaml"]);
    wait_until("1 bulk", Duration::from_secs(30), || {
        all_ready(&ps_or_log(&s1, dir, "blk")?, "bulk", 1)
    });
    let t = Instant::now();
    s1.ok(dir, &["scale", "-p", "blk", &format!("bulk={scale}")]);
    wait_until(
        "every bulk instance healthy",
        Duration::from_secs(240),
        || {
            let ps = ps_or_log(&s1, dir, "blk")?;
            all_ready(&ps, "bulk", scale).map_err(|e| e.chars().take(200).collect())
        },
    );
    let took = t.elapsed();
    let spread = placement(&s1.ps(dir, "blk"), "bulk");
    eprintln!("scale bulk={scale} across 3 agents: all healthy in {took:?}, {spread:?}");
    assert_eq!(spread.len(), 3, "{spread:?}");
    assert_eq!(processes_of("blk", Some("bulk")).len(), scale);

    s1.ok(dir, &["down", "-p", "blk"]);
    s1.ok(dir, &["down", "-p", "clu"]);
    wait_until("everything stopped", Duration::from_secs(60), || {
        let n = processes_of("clu", None).len() + processes_of("blk", None).len();
        if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} left"))
        }
    });
    drop(agents);
    for d in std::fs::read_dir("/tmp").unwrap().flatten() {
        let p: PathBuf = d.path();
        if p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("berth-e2e-cluster."))
        {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}
