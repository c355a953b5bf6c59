//! The end-to-end harness shared by the `e2e_*` tests: a private data dir
//! per test, the real `berth` binary, and process-table checks.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod netns;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Berth {
    pub data: tempfile::TempDir,
    pub env: BTreeMap<String, String>,
    pub servers: Vec<Child>,
}

impl Berth {
    /// Start `berth server --no-agent` (a server that runs no work itself,
    /// for tests with joined agents) with its router on 127.0.0.1:`http`
    /// and no DNS, logging to `<data>/server.log`; returns its API URL
    /// once it answers.
    pub fn start_server_without_agent(&mut self, http: u16) -> String {
        self.spawn_server(&[
            "server",
            "--no-agent",
            "--listen",
            "127.0.0.1:0",
            "--http",
            &format!("127.0.0.1:{http}"),
            "--no-dns",
        ]);
        server_tcp_addresses(self.data.path()).swap_remove(0)
    }

    /// Spawn `berth ARGS` (`args` starts with `server`) as this harness's
    /// server, logging to `<data>/server.log` and stopped on drop. It
    /// returns at once: wait with [`server_tcp_addresses`] or
    /// [`Berth::server_pid`].
    pub fn spawn_server(&mut self, args: &[&str]) {
        let log = std::fs::File::create(self.data.path().join("server.log")).unwrap();
        let child = self
            .command(self.data.path(), args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.servers.push(child);
    }

    pub fn new() -> Self {
        Self {
            data: tempfile::tempdir().unwrap(),
            env: BTreeMap::new(),
            servers: Vec::new(),
        }
    }

    pub fn command(&self, dir: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_berth"));
        c.args(args)
            .current_dir(dir)
            .env("BERTH_DATA_DIR", self.data.path())
            .env("NO_COLOR", "1")
            .env_remove("BERTH_ADDR")
            .envs(&self.env)
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, dir: &Path, args: &[&str]) -> Output {
        self.command(dir, args).output().unwrap()
    }

    pub fn ok(&self, dir: &Path, args: &[&str]) -> String {
        let out = self.run(dir, args);
        assert!(
            out.status.success(),
            "berth {args:?} failed ({}):\nstdout: {}\nstderr: {}\nserver log: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.server_log(),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run, expect exit `code`, return stderr.
    pub fn fails(&self, dir: &Path, args: &[&str], code: i32) -> String {
        let out = self.run(dir, args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "berth {args:?}:\nstdout: {}\nstderr: {stderr}\nserver log: {}",
            String::from_utf8_lossy(&out.stdout),
            self.server_log(),
        );
        stderr
    }

    pub fn ps(&self, dir: &Path, stack: &str) -> Vec<Value> {
        let out = self.ok(dir, &["ps", "--json", "-p", stack]);
        serde_json::from_str::<Vec<Value>>(&out).unwrap_or_else(|e| panic!("ps --json: {e}: {out}"))
    }

    pub fn server_pid(&self) -> Option<i32> {
        let info = std::fs::read(self.data.path().join("server.json")).ok()?;
        let v: Value = serde_json::from_slice(&info).ok()?;
        v["pid"].as_i64().map(|p| p as i32)
    }

    pub fn server_log(&self) -> String {
        let log = std::fs::read_to_string(self.data.path().join("server.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Start `berth server` as our own child (used after a kill -9).
    pub fn start_server(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.path().join("server.log"))
            .unwrap();
        let child = self
            .command(self.data.path(), &["server"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.servers.push(child);
    }
}

impl Drop for Berth {
    fn drop(&mut self) {
        if let Some(pid) = self.server_pid() {
            signal(pid, "TERM");
            let deadline = Instant::now() + Duration::from_secs(20);
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            signal(pid, "KILL");
        }
        for c in &mut self.servers {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn signal(pid: i32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .output();
}

pub fn alive(pid: i32) -> bool {
    // A zombie is dead for our purposes (its parent may be this test).
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

/// Pids of live processes whose environment says they belong to `stack`
/// (and to `service`, if given).
pub fn processes_of(stack: &str, service: Option<&str>) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
        let has = |k: &str, v: &str| vars.iter().any(|x| *x == format!("{k}={v}").as_bytes());
        if has("BERTH_STACK", stack)
            && service.is_none_or(|s| has("BERTH_SERVICE", s))
            && alive(pid)
        {
            pids.push(pid);
        }
    }
    pids
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(()) => return,
            Err(why) if Instant::now() > deadline => panic!("timed out waiting for {what}: {why}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The TCP API addresses a server started on `data` announces in its
/// `server.json`, once it has written them.
pub fn server_tcp_addresses(data: &Path) -> Vec<String> {
    let mut apis = Vec::new();
    wait_until("the server", Duration::from_secs(30), || {
        let info: Value = serde_json::from_slice(
            &std::fs::read(data.join("server.json")).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
        apis = info["tcp"]
            .as_array()
            .ok_or("no tcp")?
            .iter()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect();
        Ok(())
    });
    apis
}

/// The value of the series whose line in a `/metrics` text starts with
/// `name{labels}` (labels in the order the server writes them).
pub fn metric(metrics: &str, name_and_labels: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `N` distinct free ports: the listeners are held until all are chosen
/// (each dropped at once, [`free_port`] twice can return the same port).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().unwrap().port())
}

pub fn http_get(port: u16, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    if out.starts_with("HTTP/1.") && out.contains(" 200 ") {
        Ok(out)
    } else {
        Err(out)
    }
}

pub fn instances<'a>(ps: &'a [Value], service: &str) -> Vec<&'a Value> {
    ps.iter().filter(|i| i["service"] == service).collect()
}

pub fn all_ready(ps: &[Value], service: &str, n: usize) -> Result<(), String> {
    let list = instances(ps, service);
    let ready = list
        .iter()
        .filter(|i| i["state"] == "running" && (i["health"] == "healthy" || i["health"] == "none"))
        .count();
    if list.len() == n && ready == n {
        Ok(())
    } else {
        Err(format!(
            "{service}: {ready} ready of {} listed, want {n}: {list:?}",
            list.len()
        ))
    }
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// An HTTP GET through the router at `port` with a `Host` header.
pub fn http_get_host(port: u16, host: &str, path: &str) -> Result<String, String> {
    http_get_host_at(std::net::Ipv4Addr::LOCALHOST.into(), port, host, path)
}

/// [`http_get_host`] of a router on another address (a node's).
pub fn http_get_host_at(
    ip: std::net::IpAddr,
    port: u16,
    host: &str,
    path: &str,
) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&(ip, port).into(), Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    if out.starts_with("HTTP/1.1 200") {
        Ok(out)
    } else {
        Err(out)
    }
}

/// The body of a 200 answer to `GET /` with `Host: host` through the router
/// at `ip:port`.
pub fn router_body_at(ip: std::net::IpAddr, port: u16, host: &str) -> Result<String, String> {
    let page = http_get_host_at(ip, port, host, "/")?;
    Ok(page
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_owned())
}

/// The bodies (instance names) of `n` answers for `host` through the router
/// at `ip:port`.
pub fn served_at(
    ip: std::net::IpAddr,
    port: u16,
    host: &str,
    n: usize,
) -> Result<std::collections::BTreeSet<String>, String> {
    (0..n).map(|_| router_body_at(ip, port, host)).collect()
}

/// Make sure the Docker tests' local image exists (`scripts/test-image`).
pub fn test_image() {
    let status = Command::new(repo().join("scripts/test-image"))
        .status()
        .unwrap();
    assert!(status.success(), "scripts/test-image failed");
}

/// Run the docker CLI; its stdout (panics when it fails).
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI");
    assert!(
        out.status.success(),
        "docker {args:?}: {} (run scripts/docker-up)",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `dig +short` against berth's DNS; one answer per line.
pub fn dig(dns_port: u16, name: &str, qtype: &str) -> Vec<String> {
    dig_at(std::net::Ipv4Addr::LOCALHOST.into(), dns_port, name, qtype)
}

/// [`dig`] against a DNS server on another address (a node's).
pub fn dig_at(ip: std::net::IpAddr, dns_port: u16, name: &str, qtype: &str) -> Vec<String> {
    let server = format!("@{ip}");
    let out = Command::new("dig")
        .args([
            server.as_str(),
            "-p",
            &dns_port.to_string(),
            name,
            qtype,
            "+short",
            // One try (a retry would count twice in DNS counters), with
            // time for a loaded machine.
            "+time=10",
            "+tries=1",
        ])
        .output()
        .expect("dig is installed (scripts/test installs dnsutils)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// SIGTERM `child`, give it 10 s to stop its instances, then SIGKILL.
pub fn stop_child(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        signal(child.id() as i32, "TERM");
        for _ in 0..200 {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// What it takes to start one `berth agent --join` (kept by [`Agent`] so
/// it can be started again with the same data dir).
#[derive(Debug, Clone)]
struct AgentSpec {
    join: String,
    token: String,
    node: String,
    args: Vec<String>,
    /// The network namespace it runs in and its index in the test's
    /// [`netns::Netns`] (`None`: the host's).
    netns: Option<(String, usize)>,
    /// Environment variables set for it.
    env: Vec<(String, String)>,
}

/// A `berth agent --join` being set up: see [`spawn_agent`].
pub struct AgentBuilder<'a> {
    berth: &'a Berth,
    spec: AgentSpec,
}

/// A `berth agent --join` for node `node`, joining `join` (an API address
/// `HOST:PORT` or URL, or several comma-separated) with the join `token`.
/// Its own temp dir holds its data (`state/`) and its stderr (`agent.log`).
/// Add flags with the builder's methods, then [`AgentBuilder::start`]:
///
/// ```ignore
/// let a1 = spawn_agent(&berth, &api, &token, "n1").label("zone=east").no_edge().start();
/// ```
pub fn spawn_agent<'a>(berth: &'a Berth, join: &str, token: &str, node: &str) -> AgentBuilder<'a> {
    let join = join
        .split(',')
        .map(|j| {
            if j.contains("://") {
                j.to_owned()
            } else {
                format!("http://{j}")
            }
        })
        .collect::<Vec<_>>()
        .join(",");
    AgentBuilder {
        berth,
        spec: AgentSpec {
            join,
            token: token.to_owned(),
            node: node.to_owned(),
            args: Vec::new(),
            netns: None,
            env: Vec::new(),
        },
    }
}

impl AgentBuilder<'_> {
    /// Further `berth agent` arguments.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.spec.args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    /// `--label K=V`.
    pub fn label(self, label: &str) -> Self {
        self.args(&["--label", label])
    }

    /// No router, DNS server or TCP proxy on this node: for tests that run
    /// several agents on one host and do not exercise the node's edge
    /// (otherwise each one after the first warns that it cannot listen on
    /// 127.0.0.1:8080/8600, and they race for the same VIP listeners).
    pub fn no_edge(self) -> Self {
        self.args(&["--no-http", "--no-dns", "--no-proxy"])
    }

    /// Set an environment variable (`DOCKER_HOST` of a node's own engine).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.spec.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Run it in node `i`'s network namespace.
    pub fn in_netns(mut self, net: &netns::Netns, i: usize) -> Self {
        self.spec.netns = Some((net.nodes[i].ns.clone(), i));
        self
    }

    pub fn start(self) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let child = self.spec.spawn(self.berth, dir.path());
        Agent {
            node: self.spec.node.clone(),
            dir,
            child,
            spec: self.spec,
        }
    }
}

impl AgentSpec {
    fn spawn(&self, berth: &Berth, dir: &Path) -> Child {
        // Appended to, so a restarted agent's log follows its first life's.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))
            .unwrap();
        let state = dir.join("state");
        let mut args = vec![
            "agent",
            "--join",
            &self.join,
            "--token",
            &self.token,
            "--node-id",
            &self.node,
            "--data",
            state.to_str().unwrap(),
        ];
        args.extend(self.args.iter().map(String::as_str));
        let mut cmd = berth.command(dir, &args);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut cmd = match &self.netns {
            Some((ns, _)) => netns::exec_in(ns, &cmd),
            None => cmd,
        };
        cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap()
    }
}

/// A running `berth agent --join`, stopped (TERM, then KILL after 10 s) on
/// drop.
pub struct Agent {
    pub node: String,
    /// Its data (`state/`) and log (`agent.log`).
    pub dir: tempfile::TempDir,
    pub child: Child,
    spec: AgentSpec,
}

impl Agent {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Index of the network namespace it runs in (see
    /// [`AgentBuilder::in_netns`]).
    pub fn net(&self) -> usize {
        self.spec
            .netns
            .as_ref()
            .map(|(_, i)| *i)
            .expect("this agent runs in the host's network namespace")
    }

    /// What it wrote to stderr, over all its starts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// The node credential it was given on joining.
    pub fn secret(&self) -> String {
        let c: Value = serde_json::from_slice(
            &std::fs::read(self.dir.path().join("state/credential.json")).unwrap(),
        )
        .unwrap();
        c["secret"].as_str().unwrap().to_owned()
    }

    /// Stop it as on drop.
    pub fn stop(&mut self) {
        stop_child(&mut self.child);
    }

    /// Start it again (after it stopped or was killed) with the same
    /// arguments and data dir.
    pub fn restart(&mut self, berth: &Berth) {
        self.stop();
        self.child = self.spec.spawn(berth, self.dir.path());
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One raw HTTP/1.1 request to the API; (status, body).
pub fn api_request(api: &str, method: &str, path: &str, secret: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(api).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = secret.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {api}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

/// One etcd member on free loopback ports, killed on drop.
pub struct Etcd {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Etcd {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let [port, peer] = free_ports();
        let client = format!("http://127.0.0.1:{port}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
        let child = Command::new("etcd")
            .args(["--name", "berth-test"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("berth-test={peer_url}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("etcd is not installed: run scripts/deps");
        let etcd = Self {
            child,
            port,
            _dir: dir,
        };
        wait_until("etcd answers", Duration::from_secs(30), || {
            http_get(port, "/health").map(|_| ())
        });
        etcd
    }
}

impl Etcd {
    /// `berth server --store etcd://…/PREFIX --node-id NODE --no-http
    /// --no-dns ARGS` with its own data dir (no router or DNS: several
    /// servers share this host); (harness, its first TCP API address) once
    /// it has written it.
    pub fn server(&self, prefix: &str, node: &str, args: &[&str]) -> (Berth, String) {
        let mut b = Berth::new();
        let store = format!("etcd://127.0.0.1:{}/{prefix}", self.port);
        let mut all = vec![
            "server",
            "--store",
            &store,
            "--node-id",
            node,
            "--no-http",
            "--no-dns",
        ];
        all.extend_from_slice(args);
        b.spawn_server(&all);
        let api = server_tcp_addresses(b.data.path()).swap_remove(0);
        (b, api)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
