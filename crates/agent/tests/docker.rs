//! The Docker driver against a real engine: the whole agent on an embedded
//! store, with containers from a locally made busybox image (no registry).
//!
//! These tests fail, never skip, when no engine answers: CI runs
//! `scripts/docker-up` first.

// Tests may unwrap: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Once};
use std::time::Duration;

use berth_agent::{AgentConfig, AgentOptions, LogConfig, LogQuery, LogStore, StoreControlPlane};
use berth_model::{
    Assignment, DesiredState, Health, InstanceKey, InstanceState, InstanceStatus, LogStream,
    Service, keys,
};
use berth_store::Store;
use berth_store::embedded::EmbeddedStore;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const IMAGE: &str = "berth-test/busybox:latest";
const NS: &str = "dtest";

fn docker(args: &[&str]) -> (bool, String) {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("the docker CLI is needed (scripts/docker-up installs it)");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        text.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    (out.status.success(), text.trim().to_owned())
}

/// The engine must answer, and the test image must exist: made like
/// `docker import` of a rootfs holding Debian's static busybox.
fn engine_and_image() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let (ok, out) = docker(&["info", "--format", "{{.ServerVersion}}"]);
        assert!(
            ok,
            "no Docker engine answers ({out}); run scripts/docker-up first"
        );
        if docker(&["image", "inspect", IMAGE]).0 {
            return;
        }
        let busybox = ["/usr/bin/busybox", "/bin/busybox"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("static busybox is needed (apt-get install busybox-static)");
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("rootfs");
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
        for applet in [
            "sh", "httpd", "sleep", "echo", "cat", "wget", "nc", "ls", "mkdir", "grep", "touch",
        ] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
        let tar = dir.path().join("rootfs.tar");
        let st = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .unwrap();
        assert!(st.success());
        let (ok, out) = docker(&[
            "import",
            "--change",
            "ENV PATH=/bin",
            tar.to_str().unwrap(),
            IMAGE,
        ]);
        assert!(ok, "docker import failed: {out}");
    });
}

fn service(name: &str, command: &str, extra: Value) -> Service {
    let mut v = json!({
        "name": name,
        "image": IMAGE,
        "pull_policy": "never",
        "command": command,
        "restart": {"policy": "always"},
        "deploy": {"mode": "replicated", "replicas": 1},
        "stop_signal": "SIGTERM",
        "stop_grace_period_ms": 1000,
    });
    if let (Some(obj), Value::Object(extra)) = (v.as_object_mut(), extra) {
        obj.extend(extra);
    }
    serde_json::from_value(v).unwrap()
}

fn key(stack: &str, service: &str, slot: u32) -> InstanceKey {
    InstanceKey::new(NS, stack, service, slot)
}

fn assignment(key: InstanceKey, service: Service, uid: &str) -> Assignment {
    Assignment {
        key,
        uid: uid.into(),
        node: "n1".into(),
        release: 1,
        restart_generation: 0,
        service,
        env: BTreeMap::new(),
        desired: DesiredState::Running,
        created_at: 0,
        retire_at: None,
    }
}

/// Every container of a stack, any state.
fn containers(stack: &str) -> Vec<String> {
    let (ok, out) = docker(&[
        "ps",
        "-aq",
        "--no-trunc",
        "--filter",
        &format!("label=berth.namespace={NS}"),
        "--filter",
        &format!("label=berth.stack={stack}"),
    ]);
    assert!(ok, "{out}");
    out.lines().map(str::to_owned).collect()
}

fn network_exists(stack: &str) -> bool {
    docker(&["network", "inspect", &format!("berth_{NS}_{stack}")]).0
}

/// Remove whatever a previous failed run of a test left.
fn clean(stack: &str) {
    for id in containers(stack) {
        docker(&["rm", "-f", "-v", &id]);
    }
    docker(&["network", "rm", &format!("berth_{NS}_{stack}")]);
}

struct Harness {
    store: Arc<dyn Store>,
    data: std::path::PathBuf,
    logs: LogStore,
    _dir: tempfile::TempDir,
}

struct Running {
    task: JoinHandle<()>,
    stop: watch::Sender<bool>,
}

impl Harness {
    fn new() -> Self {
        engine_and_image();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("store.redb")).unwrap());
        let logs = LogStore::open(data.join("logs"), LogConfig::default()).unwrap();
        Self {
            store,
            data,
            logs,
            _dir: dir,
        }
    }

    fn start(&self, options: AgentOptions) -> Running {
        self.start_at("127.0.0.1", options)
    }

    /// Start the agent registered with `address` (not loopback: other
    /// nodes reach its instances, so containers are published on it).
    fn start_at(&self, address: &str, options: AgentOptions) -> Running {
        let cfg = AgentConfig {
            node_id: "n1".into(),
            data_dir: self.data.clone(),
            address: address.into(),
            logs: LogConfig::default(),
        };
        let (stop, shutdown) = watch::channel(false);
        let control = Arc::new(StoreControlPlane::new(self.store.clone()));
        let logs = self.logs.clone();
        let task = tokio::spawn(async move {
            berth_agent::run_with(cfg, control, logs, shutdown, options)
                .await
                .unwrap();
        });
        Running { task, stop }
    }

    async fn put(&self, a: &Assignment) {
        berth_store::put_json(self.store.as_ref(), &keys::assignment("n1", &a.key), a)
            .await
            .unwrap();
    }

    async fn remove(&self, k: &InstanceKey) {
        self.store.delete(&keys::assignment("n1", k)).await.unwrap();
    }

    async fn statuses(&self) -> Vec<InstanceStatus> {
        let (kvs, _) = self.store.range(keys::STATUS).await.unwrap();
        kvs.iter()
            .map(|kv| berth_store::decode(kv).unwrap())
            .collect()
    }

    async fn status_of(&self, k: &InstanceKey) -> Option<InstanceStatus> {
        self.statuses().await.into_iter().find(|s| &s.key == k)
    }

    async fn eventually(
        &self,
        k: &InstanceKey,
        secs: u64,
        what: &str,
        pred: impl Fn(&InstanceStatus) -> bool,
    ) -> InstanceStatus {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.status_of(k).await;
            if let Some(s) = &s
                && pred(s)
            {
                return s.clone();
            }
            if tokio::time::Instant::now() > deadline {
                let logs = self.lines(k).await;
                panic!("timed out waiting for {what}: {s:#?}\nlogs: {logs:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn lines(&self, k: &InstanceKey) -> Vec<(LogStream, String)> {
        let q = LogQuery {
            namespace: k.namespace.clone(),
            stack: k.stack.clone(),
            services: vec![k.service.clone()],
            since_us: None,
            tail: None,
        };
        self.logs
            .read(&q)
            .await
            .unwrap()
            .into_iter()
            .filter(|l| &l.key == k)
            .map(|l| (l.stream, l.line))
            .collect()
    }
}

async fn until(secs: u64, what: &str, mut pred: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !pred() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {secs} s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn http_get(addr: &str, port: u16) -> String {
    let mut s = tokio::net::TcpStream::connect((addr, port)).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

const WEB: &str = "mkdir -p /tmp/www && echo hello-from-web > /tmp/www/index.html && \
                   echo web starting && exec httpd -f -p 8080 -h /tmp/www";

fn web(extra: Value) -> Service {
    let mut extra = extra;
    if let Value::Object(o) = &mut extra {
        o.insert("ports".into(), json!([{"target": 8080, "protocol": "tcp"}]));
        o.insert(
            "healthcheck".into(),
            json!({"test": {"type": "http", "path": "/"}, "interval_ms": 500,
                   "timeout_ms": 1000, "retries": 3, "start_period_ms": 0,
                   "start_interval_ms": 200}),
        );
    }
    service("web", WEB, extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_runs_healthy_restarts_after_docker_kill_and_is_adopted_not_duplicated() {
    let stack = "life";
    let h = Harness::new();
    clean(stack);
    let k = key(stack, "web", 1);
    h.put(&assignment(k.clone(), web(json!({})), "uid-life-1"))
        .await;
    let options = AgentOptions::default();
    let stats = options.container_stats.clone();
    let agent = h.start(options);

    let st = h
        .eventually(&k, 60, "running and healthy", |s| {
            s.state == InstanceState::Running && s.health == Health::Healthy
        })
        .await;
    let addr = st.address.clone().unwrap();
    assert_ne!(addr, "127.0.0.1", "the address is the container's IP");
    assert_eq!(st.port, Some(8080), "the port is the first target port");
    assert!(http_get(&addr, 8080).await.contains("hello-from-web"));
    assert!(network_exists(stack));
    let first = containers(stack);
    assert_eq!(first.len(), 1);
    let (_, name) = docker(&["inspect", "--format", "{{.Name}}", &first[0]]);
    assert_eq!(name, "/berth-dtest-life-web-1-uidlife1");
    let (_, labels) = docker(&["inspect", "--format", "{{json .Config.Labels}}", &first[0]]);
    let labels: BTreeMap<String, String> = serde_json::from_str(&labels).unwrap();
    assert_eq!(labels["berth.service"], "web");
    assert_eq!(labels["berth.instance"], "1");
    assert_eq!(labels["berth.uid"], "uid-life-1");
    assert_eq!(labels["berth.release"], "1");
    assert!(labels["berth.agent"].starts_with("n1-"));
    let (_, policy) = docker(&[
        "inspect",
        "--format",
        "{{.HostConfig.RestartPolicy.Name}}",
        &first[0],
    ]);
    assert_eq!(policy, "no");

    // Output reaches the log store.
    let key2 = k.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let lines = h.lines(&key2).await;
        if lines
            .iter()
            .any(|(s, l)| *s == LogStream::Stdout && l == "web starting")
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no log: {lines:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The engine's stats reach the shared map.
    until(30, "a stats sample", || {
        stats
            .get(&k)
            .is_some_and(|s| s.container_id == first[0] && s.memory_bytes > 0)
    })
    .await;

    // docker kill → berth restarts it, in a new container.
    assert!(docker(&["kill", &first[0]]).0);
    let st = h
        .eventually(&k, 30, "restarted", |s| {
            s.restarts == 1 && s.state == InstanceState::Running && s.health == Health::Healthy
        })
        .await;
    let second = containers(stack);
    assert_eq!(second.len(), 1, "the killed container is removed");
    assert_ne!(second[0], first[0]);
    assert!(
        http_get(st.address.as_deref().unwrap(), 8080)
            .await
            .contains("hello")
    );

    // The agent dies (no cleanup runs), another starts: it adopts the
    // running container instead of starting a second one.
    agent.task.abort();
    let _ = agent.task.await;
    // The dead agent's last report stays in the store: wait for a newer one
    // (the new agent's), however long the new agent takes to get there.
    let before = h.status_of(&k).await.unwrap().updated_at;
    let agent = h.start(AgentOptions::default());
    let st = h
        .eventually(&k, 60, "adopted (a newer status)", |s| {
            s.updated_at > before
                && s.state == InstanceState::Running
                && s.health == Health::Healthy
        })
        .await;
    assert_eq!(containers(stack), second, "same container, no duplicate");
    assert_eq!(st.restarts, 1, "the restart count survives adoption");
    let lines = h.lines(&k).await;
    assert!(
        lines.iter().any(|(_, l)| l.contains("(adopted)")),
        "{lines:?}"
    );

    // Assignment removed → container and the stack network removed.
    h.remove(&k).await;
    until(30, "container removed", || containers(stack).is_empty()).await;
    until(30, "network removed", || !network_exists(stack)).await;

    agent.stop.send_replace(true);
    agent.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_node_other_nodes_reach_containers_are_published_on_its_address_and_adopted_so() {
    // The default bridge's gateway: an address of this host that is not
    // loopback, as a node's advertise address is.
    let (ok, ip) = docker(&[
        "network",
        "inspect",
        "bridge",
        "--format",
        "{{(index .IPAM.Config 0).Gateway}}",
    ]);
    assert!(ok && !ip.is_empty(), "no default bridge gateway: {ip}");
    let stack = "pub";
    let h = Harness::new();
    clean(stack);
    let (k1, k2) = (key(stack, "web", 1), key(stack, "web", 2));
    // "8080:80" style: the user's published port is the edge proxy's,
    // never bound by the engine.
    let web = |published: u16| {
        let mut w = web(json!({}));
        w.ports[0].published = Some(published);
        w
    };
    h.put(&assignment(k1.clone(), web(18080), "uid-pub-1"))
        .await;
    h.put(&assignment(k2.clone(), web(18080), "uid-pub-2"))
        .await;
    let agent = h.start_at(&ip, AgentOptions::default());

    let mut seen = Vec::new();
    for k in [&k1, &k2] {
        let st = h
            .eventually(k, 60, "published and healthy", |s| {
                s.state == InstanceState::Running && s.health == Health::Healthy
            })
            .await;
        assert_eq!(st.address.as_deref(), Some(ip.as_str()), "{st:#?}");
        let port = st.port.unwrap();
        assert_ne!(port, 8080, "a host port of its own");
        assert_ne!(port, 18080, "not the user's published port");
        assert_eq!(st.host_ports, BTreeMap::from([(8080, port)]));
        // Reached on the node's address at its host port.
        assert!(http_get(&ip, port).await.contains("hello-from-web"));
        seen.push(port);
    }
    assert_ne!(seen[0], seen[1], "one host port per container");
    let ids = containers(stack);
    let (_, bindings) = docker(&[
        "inspect",
        "--format",
        "{{json .HostConfig.PortBindings}}",
        &ids[0],
    ]);
    assert!(
        bindings.contains(&format!("\"HostIp\":\"{ip}\"")),
        "{bindings}"
    );
    assert!(!bindings.contains("18080"), "{bindings}");

    // The agent dies; the next adopts the containers with their host
    // ports (and holds them, so nothing else is handed them).
    agent.task.abort();
    let _ = agent.task.await;
    // The dead agent's last reports stay in the store: wait for newer ones.
    let before = [
        h.status_of(&k1).await.unwrap().updated_at,
        h.status_of(&k2).await.unwrap().updated_at,
    ];
    let agent = h.start_at(&ip, AgentOptions::default());
    for ((k, port), before) in [(&k1, seen[0]), (&k2, seen[1])].into_iter().zip(before) {
        let st = h
            .eventually(k, 60, "adopted with its host port (a newer status)", |s| {
                s.updated_at > before
                    && s.state == InstanceState::Running
                    && s.health == Health::Healthy
                    && s.port == Some(port)
            })
            .await;
        assert_eq!(st.host_ports, BTreeMap::from([(8080, port)]));
    }
    assert_eq!(containers(stack), ids, "adopted, not replaced");
    let lines = h.lines(&k1).await;
    assert!(
        lines
            .iter()
            .any(|(_, l)| l.contains(&format!("published on {ip}:{}->8080", seen[0]))),
        "{lines:?}"
    );

    h.remove(&k1).await;
    h.remove(&k2).await;
    until(30, "containers removed", || containers(stack).is_empty()).await;
    agent.stop.send_replace(true);
    agent.task.await.unwrap();
}

/// A UDP echo in the network namespace of process `pid` (a container's
/// init): binds `port` there, says so on `ready`, then answers every
/// datagram with `echo:` and its bytes until it gets `bye` or none comes
/// for 30 s. The busybox image has no UDP server; the echo runs in this
/// process, on a thread moved into the container's namespace.
fn udp_echo_in_netns(
    pid: u32,
    port: u16,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) -> std::thread::JoinHandle<()> {
    use std::os::fd::AsRawFd;
    std::thread::spawn(move || {
        let ns = match std::fs::File::open(format!("/proc/{pid}/ns/net")) {
            Ok(f) => f,
            Err(e) => {
                let _ = ready.send(Err(format!("/proc/{pid}/ns/net: {e}")));
                return;
            }
        };
        // SAFETY: setns on a valid, open namespace fd; it moves only this
        // thread, which then does nothing but the echo.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            let _ = ready.send(Err(format!("setns: {}", std::io::Error::last_os_error())));
            return;
        }
        let sock = match std::net::UdpSocket::bind(("0.0.0.0", port)) {
            Ok(s) => s,
            Err(e) => {
                let _ = ready.send(Err(format!("bind :{port} in the container: {e}")));
                return;
            }
        };
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let _ = ready.send(Ok(()));
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            if &buf[..n] == b"bye" {
                return;
            }
            let mut reply = b"echo:".to_vec();
            reply.extend_from_slice(&buf[..n]);
            let _ = sock.send_to(&reply, from);
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_udp_port_reaches_the_container_on_a_publishing_node() {
    // "PORT:53/udp" on a node other nodes reach (the bridge gateway as its
    // advertise address): no proxy carries UDP, so the engine binds the
    // published port on 127.0.0.1 (no host_ip) and datagrams sent there
    // reach the container's port 53. Before, nothing was bound.
    let (ok, ip) = docker(&[
        "network",
        "inspect",
        "bridge",
        "--format",
        "{{(index .IPAM.Config 0).Gateway}}",
    ]);
    assert!(ok && !ip.is_empty(), "no default bridge gateway: {ip}");
    let stack = "udp";
    let h = Harness::new();
    clean(stack);
    let published = {
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let k = key(stack, "dns", 1);
    let svc = service(
        "dns",
        "exec sleep 1000",
        json!({"ports": [{"target": 53, "published": published, "protocol": "udp"}]}),
    );
    h.put(&assignment(k.clone(), svc, "uid-udp-1")).await;
    let agent = h.start_at(&ip, AgentOptions::default());
    h.eventually(&k, 60, "running", |s| s.state == InstanceState::Running)
        .await;
    let ids = containers(stack);
    assert_eq!(ids.len(), 1);
    let (ok, bound) = docker(&["port", &ids[0], "53/udp"]);
    assert!(ok, "{bound}");
    assert_eq!(bound, format!("127.0.0.1:{published}"));

    let (_, pid) = docker(&["inspect", "--format", "{{.State.Pid}}", &ids[0]]);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let echo = udp_echo_in_netns(pid.parse().unwrap(), 53, ready_tx);
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the echo starts within 10 s")
        .unwrap();
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(("127.0.0.1", published)).await.unwrap();
    // A datagram can be lost: send again until the answer comes (bounded).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 64];
    let reply = loop {
        client.send(b"ping").await.unwrap();
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(500), client.recv(&mut buf)).await
        {
            break buf[..n].to_vec();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no answer through 127.0.0.1:{published}/udp within 15 s"
        );
    };
    assert_eq!(reply, b"echo:ping");
    client.send(b"bye").await.unwrap();
    tokio::task::spawn_blocking(move || echo.join().unwrap())
        .await
        .unwrap();

    h.remove(&k).await;
    until(30, "container removed", || containers(stack).is_empty()).await;
    agent.stop.send_replace(true);
    agent.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_advertise_address_the_engine_cannot_bind_is_named_in_the_instances_message() {
    // TEST-NET-3: not an address of this host, as when the agent runs in
    // another network namespace than dockerd.
    let stack = "badadv";
    let h = Harness::new();
    clean(stack);
    let k = key(stack, "web", 1);
    h.put(&assignment(k.clone(), web(json!({})), "uid-badadv-1"))
        .await;
    let agent = h.start_at("203.0.113.77", AgentOptions::default());
    let st = h
        .eventually(&k, 30, "a start failure that says why", |s| {
            s.message
                .as_deref()
                .is_some_and(|m| m.contains("203.0.113.77") && m.contains("--advertise"))
        })
        .await;
    // Not a restart loop: the address is fixed for the agent's life.
    assert_eq!(st.state, InstanceState::Failed, "{st:#?}");
    h.remove(&k).await;
    until(30, "containers removed", || containers(stack).is_empty()).await;
    agent.stop.send_replace(true);
    agent.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_reach_each_other_by_name_with_limits_and_a_kept_named_volume() {
    let stack = "net";
    let h = Harness::new();
    clean(stack);
    docker(&["volume", "rm", "net_data"]);
    let kw = key(stack, "web", 1);
    let web = web(json!({
        "volumes": [{"type": "volume", "source": "data", "target": "/data"}],
        "deploy": {"mode": "replicated", "replicas": 1, "resources": {
            "limits": {"cpus": 0.5, "memory_bytes": 67108864u64, "pids": 100},
            "reservations": {"memory_bytes": 33554432u64}}},
    }));
    // The client's exec health check runs inside its container and reaches
    // web by its service name on the stack network.
    let kc = key(stack, "client", 1);
    let client = service(
        "client",
        "touch /data/client-was-here; exec sleep 1000",
        json!({
            "volumes": [{"type": "volume", "source": "data", "target": "/data"}],
            "healthcheck": {"test": {"type": "shell", "command": "wget -qO- http://web:8080/ | grep hello-from-web"},
                            "interval_ms": 500, "timeout_ms": 2000, "retries": 3,
                            "start_period_ms": 0, "start_interval_ms": 200},
        }),
    );
    h.put(&assignment(kw.clone(), web, "uid-net-w")).await;
    h.put(&assignment(kc.clone(), client, "uid-net-c")).await;
    let agent = h.start(AgentOptions::default());

    h.eventually(&kc, 60, "client healthy through web's name", |s| {
        s.health == Health::Healthy
    })
    .await;
    let w = h
        .eventually(&kw, 30, "web healthy", |s| s.health == Health::Healthy)
        .await;
    assert!(w.address.is_some());

    let id = docker(&[
        "ps",
        "-q",
        "--filter",
        "label=berth.stack=net",
        "--filter",
        "label=berth.service=web",
    ])
    .1;
    let (_, limits) = docker(&[
        "inspect",
        "--format",
        "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}} {{.HostConfig.PidsLimit}} {{.HostConfig.MemoryReservation}}",
        &id,
    ]);
    assert_eq!(limits, "500000000 67108864 100 33554432");
    let (ok, vlabels) = docker(&[
        "volume",
        "inspect",
        "--format",
        "{{json .Labels}}",
        "net_data",
    ]);
    assert!(ok, "{vlabels}");
    assert!(vlabels.contains("\"berth.stack\":\"net\""), "{vlabels}");

    // Removing the assignments removes containers and network, keeps the
    // named volume; remove_stack_volumes (down -v) removes it.
    h.remove(&kw).await;
    h.remove(&kc).await;
    until(30, "containers removed", || containers(stack).is_empty()).await;
    until(30, "network removed", || !network_exists(stack)).await;
    assert!(docker(&["volume", "inspect", "net_data"]).0, "volume kept");
    let removed =
        berth_agent::driver::docker::remove_stack_volumes(None, NS, stack, Duration::from_secs(10))
            .await
            .unwrap();
    assert_eq!(removed, ["net_data"]);
    assert!(!docker(&["volume", "inspect", "net_data"]).0);

    agent.stop.send_replace(true);
    agent.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_with_pull_policy_never_fails_clearly_and_a_build_service_runs() {
    let stack = "img";
    let h = Harness::new();
    clean(stack);
    docker(&["rmi", "-f", "img-built"]);

    let km = key(stack, "missing", 1);
    let mut missing = service("missing", "sleep 1000", json!({}));
    missing.image = Some("berth-test/nope:1".into());
    h.put(&assignment(km.clone(), missing, "uid-img-m")).await;

    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("greeting.txt"), "built-with-berth\n").unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile.berth"),
        format!("FROM {IMAGE}\nARG WHO=nobody\nCOPY greeting.txt /greeting.txt\nRUN echo \"arg=$WHO\" > /who.txt\n"),
    )
    .unwrap();
    let kb = key(stack, "built", 1);
    let mut built = service(
        "built",
        "cat /greeting.txt /who.txt; exec sleep 1000",
        json!({"build": {"context": ctx.path(), "dockerfile": "Dockerfile.berth",
                         "args": {"WHO": "berth"}}}),
    );
    built.image = None;
    built.pull_policy = None;
    h.put(&assignment(kb.clone(), built, "uid-img-b")).await;
    let agent = h.start(AgentOptions::default());

    let st = h
        .eventually(&km, 30, "missing image failed", |s| {
            s.state == InstanceState::Failed
        })
        .await;
    let msg = st.message.unwrap();
    assert!(msg.contains("berth-test/nope:1"), "{msg}");
    assert!(
        msg.contains("never") && msg.contains("docker load"),
        "{msg}"
    );

    h.eventually(&kb, 120, "built service running", |s| {
        s.state == InstanceState::Running
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let lines = h.lines(&kb).await;
        let out = lines
            .iter()
            .any(|(s, l)| *s == LogStream::Stdout && l == "built-with-berth");
        let arg = lines.iter().any(|(_, l)| l == "arg=berth");
        let build = lines
            .iter()
            .any(|(s, l)| *s == LogStream::System && l.starts_with("build: "));
        if out && arg && build {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{lines:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(docker(&["image", "inspect", "img-built"]).0);

    agent.stop.send_replace(true);
    agent.task.await.unwrap();
    assert!(containers(stack).is_empty(), "shutdown removes containers");
    assert!(!network_exists(stack));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_engine_container_services_fail_clearly_and_processes_still_run() {
    let stack = "noeng";
    let h = Harness::new();
    let kd = key(stack, "db", 1);
    h.put(&assignment(
        kd.clone(),
        service("db", "sleep 1000", json!({})),
        "uid-ne-d",
    ))
    .await;
    let kp = key(stack, "worker", 1);
    let mut proc_svc = service("worker", "exec sleep 1000", json!({}));
    proc_svc.image = None;
    proc_svc.pull_policy = None;
    h.put(&assignment(kp.clone(), proc_svc, "uid-ne-p")).await;
    let agent = h.start(AgentOptions {
        docker_host: Some("unix:///nonexistent/docker.sock".into()),
        ..Default::default()
    });

    let st = h
        .eventually(&kd, 30, "db failed", |s| s.state == InstanceState::Failed)
        .await;
    let msg = st.message.unwrap();
    assert!(msg.contains("`db`"), "{msg}");
    assert!(
        msg.contains("DOCKER_HOST") && msg.contains("dockerd"),
        "{msg}"
    );
    h.eventually(&kp, 30, "process running", |s| {
        s.state == InstanceState::Running
    })
    .await;

    agent.stop.send_replace(true);
    agent.task.await.unwrap();
}
