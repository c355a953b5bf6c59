//! Nodes with their own addresses for multi-node tests: one network
//! namespace per node, joined to the host by a veth pair.
//!
//! Node `k` (1-based) lives in namespace `berth-e2e-k`, on `10.213.k.2/24`,
//! with the host side of its veth on `10.213.k.1` as its default route, so
//! nodes reach each other through the host (IP forwarding on, an iptables
//! FORWARD accept for `10.213.0.0/16`, since Docker's policy is DROP) and
//! reach servers that listen on `10.213.k.1`. Every rule carries the comment
//! `berth-e2e` and is removed on drop, as are the namespaces and veths.
//!
//! A lock file serialises the tests that use namespaces (several test
//! binaries, or several checkouts, may run at once on one machine): the
//! names and subnets are fixed, and whatever a killed test left behind is
//! cleaned up by the next one.
//!
//! Needs root and iproute2's `ip` (and `iptables`, which scripts/deps
//! installs); [`Netns::create`] says why when it cannot, and the test skips.

use std::fs::File;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// The comment on every iptables rule the harness adds.
const TAG: &str = "berth-e2e";
const LOCK: &str = "/tmp/berth-e2e-netns.lock";

/// One node's network.
#[derive(Debug, Clone)]
pub struct NodeNet {
    /// Namespace name.
    pub ns: String,
    /// The node's address (`10.213.k.2`).
    pub addr: Ipv4Addr,
    /// The host's address on the node's link (`10.213.k.1`): where servers
    /// listen for this node.
    pub host: Ipv4Addr,
    subnet: String,
    veth: String,
}

/// The namespaces of one test; removed on drop.
pub struct Netns {
    pub nodes: Vec<NodeNet>,
    forward_was: Option<String>,
    _lock: File,
}

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn must(program: &str, args: &[&str]) {
    if let Err(e) = run(program, args) {
        panic!("setting up the test network: {e}");
    }
}

fn iptables(verb: &str, chain: &str, rule: &[&str]) -> Result<String, String> {
    let mut args = vec!["-w", verb, chain];
    args.extend_from_slice(rule);
    args.extend_from_slice(&["-m", "comment", "--comment", TAG]);
    run("iptables", &args)
}

/// Why namespaces cannot be made here (`None`: they can).
pub fn unavailable() -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        });
    if uid.as_deref() != Some("0") {
        return Some("not root: network namespaces need root".into());
    }
    for tool in ["ip", "iptables"] {
        if Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            return Some(format!(
                "`{tool}` is not installed (scripts/deps installs it)"
            ));
        }
    }
    None
}

/// Remove what an earlier run left: namespaces, veths, rules.
fn clean_up() {
    if let Ok(list) = run("ip", &["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if name.starts_with("berth-e2e-") {
                let _ = run("ip", &["netns", "del", name]);
            }
        }
    }
    if let Ok(links) = run("ip", &["-o", "link", "show"]) {
        for l in links.lines() {
            if let Some(name) = l.split(':').nth(1).map(str::trim) {
                let name = name.split('@').next().unwrap_or(name);
                if name.starts_with("bte") {
                    let _ = run("ip", &["link", "del", name]);
                }
            }
        }
    }
    for chain in ["INPUT", "OUTPUT", "FORWARD"] {
        let Ok(rules) = run("iptables", &["-w", "-S", chain]) else {
            continue;
        };
        for rule in rules.lines().filter(|r| r.contains(TAG)) {
            // `-A CHAIN spec…` → `-D CHAIN spec…`; the comment is quoted
            // by -S only when it has spaces, which ours has not.
            let spec: Vec<&str> = rule.split_whitespace().skip(2).collect();
            let mut args = vec!["-w", "-D", chain];
            args.extend(spec);
            let _ = run("iptables", &args);
        }
    }
}

impl Netns {
    /// `n` nodes, or why not (the caller skips the test with that reason).
    pub fn create(n: usize) -> Result<Self, String> {
        if let Some(why) = unavailable() {
            return Err(why);
        }
        assert!((1..=50).contains(&n));
        let lock = File::create(LOCK).map_err(|e| format!("{LOCK}: {e}"))?;
        lock.lock().map_err(|e| format!("locking {LOCK}: {e}"))?;
        clean_up();
        let forward_was = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .ok()
            .map(|s| s.trim().to_owned());
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .map_err(|e| format!("enabling IP forwarding: {e}"))?;
        let mut me = Self {
            nodes: Vec::new(),
            forward_was,
            _lock: lock,
        };
        iptables(
            "-I",
            "FORWARD",
            &["-s", "10.213.0.0/16", "-d", "10.213.0.0/16", "-j", "ACCEPT"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        for k in 1..=n {
            let ns = format!("berth-e2e-{k}");
            let veth = format!("bte{k}h");
            let peer = format!("bte{k}n");
            let addr = Ipv4Addr::new(10, 213, k as u8, 2);
            let host = Ipv4Addr::new(10, 213, k as u8, 1);
            must("ip", &["netns", "add", &ns]);
            must(
                "ip",
                &["link", "add", &veth, "type", "veth", "peer", "name", &peer],
            );
            must("ip", &["link", "set", &peer, "netns", &ns]);
            must("ip", &["addr", "add", &format!("{host}/24"), "dev", &veth]);
            must("ip", &["link", "set", &veth, "up"]);
            let inside = |args: &[&str]| {
                let mut all = vec!["netns", "exec", ns.as_str(), "ip"];
                all.extend_from_slice(args);
                must("ip", &all);
            };
            inside(&["addr", "add", &format!("{addr}/24"), "dev", &peer]);
            inside(&["link", "set", &peer, "up"]);
            inside(&["link", "set", "lo", "up"]);
            inside(&["route", "add", "default", "via", &host.to_string()]);
            me.nodes.push(NodeNet {
                ns,
                addr,
                host,
                subnet: format!("10.213.{k}.0/24"),
                veth,
            });
        }
        Ok(me)
    }

    /// `cmd` run inside node `i`'s namespace (0-based): same program,
    /// arguments, environment and working directory.
    pub fn command(&self, i: usize, cmd: &Command) -> Command {
        exec_in(&self.nodes[i].ns, cmd)
    }

    fn partition_rules(&self, i: usize) -> Vec<(&'static str, Vec<String>)> {
        let s = self.nodes[i].subnet.clone();
        vec![
            (
                "INPUT",
                vec!["-s".into(), s.clone(), "-j".into(), "DROP".into()],
            ),
            (
                "OUTPUT",
                vec!["-d".into(), s.clone(), "-j".into(), "DROP".into()],
            ),
            (
                "FORWARD",
                vec!["-s".into(), s.clone(), "-j".into(), "DROP".into()],
            ),
            ("FORWARD", vec!["-d".into(), s, "-j".into(), "DROP".into()]),
        ]
    }

    /// Cut node `i` off from everything (servers, other nodes, the test).
    pub fn partition(&self, i: usize) {
        for (chain, rule) in self.partition_rules(i) {
            let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
            iptables("-I", chain, &rule).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    /// Undo [`Netns::partition`].
    pub fn heal(&self, i: usize) {
        for (chain, rule) in self.partition_rules(i) {
            let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
            iptables("-D", chain, &rule).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    fn server_rules(&self, i: usize, ports: &[u16]) -> Vec<(&'static str, Vec<String>)> {
        let s = self.nodes[i].subnet.clone();
        let mut out = Vec::new();
        for p in ports {
            let p = p.to_string();
            out.push((
                "INPUT",
                vec![
                    "-s".into(),
                    s.clone(),
                    "-p".into(),
                    "tcp".into(),
                    "--dport".into(),
                    p.clone(),
                    "-j".into(),
                    "DROP".into(),
                ],
            ));
            out.push((
                "OUTPUT",
                vec![
                    "-d".into(),
                    s.clone(),
                    "-p".into(),
                    "tcp".into(),
                    "--sport".into(),
                    p,
                    "-j".into(),
                    "DROP".into(),
                ],
            ));
        }
        out
    }

    /// Cut node `i` off from the servers listening on `ports` on the host
    /// only: it still reaches the other nodes, and the test reaches it.
    pub fn cut_from_servers(&self, i: usize, ports: &[u16]) {
        for (chain, rule) in self.server_rules(i, ports) {
            let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
            iptables("-I", chain, &rule).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    /// Undo [`Netns::cut_from_servers`].
    pub fn reconnect_to_servers(&self, i: usize, ports: &[u16]) {
        for (chain, rule) in self.server_rules(i, ports) {
            let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
            iptables("-D", chain, &rule).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.nodes {
            let _ = run("ip", &["netns", "del", &n.ns]);
            let _ = run("ip", &["link", "del", &n.veth]);
        }
        clean_up();
        if let Some(v) = &self.forward_was {
            let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", v);
        }
    }
}

/// `cmd` run inside namespace `ns`: same program, arguments, environment
/// and working directory.
pub fn exec_in(ns: &str, cmd: &Command) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        c.current_dir(d);
    }
    c.stdin(Stdio::null());
    c
}
