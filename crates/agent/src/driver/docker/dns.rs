//! The DNS settings that let a container find services of its stack that
//! have no container on its own node.
//!
//! A container resolves names through Docker's embedded DNS, which answers
//! the aliases of the stack network (the services with containers on this
//! node's engine, at their container IPs: unchanged from a single machine)
//! and forwards every other name to the container's external DNS servers.
//! The driver makes berth's DNS for containers ([`CONTAINER_DNS`], served by
//! the node's edge) the first of those, followed by the servers the engine
//! would have used, and puts `<stack>.<namespace>.berth` first in the
//! search list. So `api`, unknown to the stack network, is asked again as
//! `api.shop.default.berth`, which berth answers with the service's
//! container-facing address (`198.19.x.y`, proxied by the node's TCP proxy
//! to its healthy instances on every node). Names outside `berth.` are
//! REFUSED by berth, and the engine moves on to the next server, as it does
//! for a server that does not answer.
//!
//! Only when [`CONTAINER_DNS`] is an address of this host, the network
//! namespace the engine runs in: the node's edge puts it on `lo` (as root).
//! Without it containers get the engine's defaults, as before, and find
//! other services by name only on their own node.

use std::net::{IpAddr, Ipv4Addr};

use berth_model::vip::CONTAINER_DNS;

/// What the engine resolved with before berth added its server: Docker's
/// own choice (dockerd's `dns`/`dns-search` settings, else the host's
/// resolv.conf without loopback servers, else Google's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Upstream {
    /// Name servers.
    pub servers: Vec<String>,
    /// Search domains.
    pub search: Vec<String>,
}

/// A container's DNS settings (`HostConfig.Dns`, `HostConfig.DnsSearch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerDns {
    /// Name servers, berth's first.
    pub servers: Vec<String>,
    /// Search domains, the stack's first.
    pub search: Vec<String>,
}

/// Docker's fallback when the host names no usable server.
const DEFAULT_SERVERS: [&str; 2] = ["8.8.8.8", "8.8.4.4"];

/// The stub resolver of systemd-resolved, which dockerd looks behind.
const RESOLVED_STUB: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 53);

/// `nameserver` addresses and the last `search` line of a resolv.conf.
fn parse_resolv_conf(text: &str) -> (Vec<IpAddr>, Vec<String>) {
    let mut servers = Vec::new();
    let mut search = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                // A scoped IPv6 address (`fe80::1%eth0`) is not one
                // Docker keeps either.
                if let Some(ip) = words.next().and_then(|w| w.parse().ok()) {
                    servers.push(ip);
                }
            }
            Some("search") => search = words.map(str::to_owned).collect(),
            _ => {}
        }
    }
    (servers, search)
}

/// Whether a resolv.conf names only systemd-resolved's stub (dockerd then
/// reads `/run/systemd/resolve/resolv.conf` instead).
pub fn is_resolved_stub(resolv_conf: &str) -> bool {
    let (servers, _) = parse_resolv_conf(resolv_conf);
    servers == [IpAddr::V4(RESOLVED_STUB)]
}

/// The engine's choice for a container with no DNS settings of its own, on
/// an IPv4 network: `daemon_json`'s `dns` and `dns-search` when set, else
/// the host's resolv.conf (its loopback and IPv6 servers left out, as the
/// container cannot reach the former nor, without IPv6, the latter), else
/// Google's servers.
pub fn upstream(resolv_conf: &str, daemon_json: Option<&str>) -> Upstream {
    let daemon: serde_json::Value = daemon_json
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or_default();
    let strings = |key: &str| -> Option<Vec<String>> {
        let list: Vec<String> = daemon
            .get(key)?
            .as_array()?
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        (!list.is_empty()).then_some(list)
    };
    let (servers, search) = parse_resolv_conf(resolv_conf);
    let servers = strings("dns").unwrap_or_else(|| {
        let kept: Vec<String> = servers
            .into_iter()
            .filter(|ip| ip.is_ipv4() && !ip.is_loopback())
            .map(|ip| ip.to_string())
            .collect();
        if kept.is_empty() {
            DEFAULT_SERVERS.iter().map(|s| (*s).to_owned()).collect()
        } else {
            kept
        }
    });
    Upstream {
        servers,
        search: strings("dns-search").unwrap_or(search),
    }
}

/// The host's [`upstream`], read from its files now (a resolv.conf that
/// changed since, DHCP say, is followed by the next container).
pub fn host_upstream() -> Upstream {
    let etc = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let conf = if is_resolved_stub(&etc) {
        std::fs::read_to_string("/run/systemd/resolve/resolv.conf").unwrap_or(etc)
    } else {
        etc
    };
    let daemon = std::fs::read_to_string("/etc/docker/daemon.json").ok();
    upstream(&conf, daemon.as_deref())
}

/// Whether `domain` is one the engine accepts as a search domain: labels
/// of letters, digits and inner `-`, each 1–63 long.
fn valid_domain(domain: &str) -> bool {
    domain.len() <= 253
        && domain.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// The settings of a container of `stack` in `namespace`: berth's server,
/// then `up`'s; the stack's domain, then `up`'s. A stack or namespace that
/// is not a valid domain label gets no search domain (its containers can
/// still ask for `<service>.<stack>.<namespace>.berth` as the full name).
pub fn container_dns(namespace: &str, stack: &str, up: &Upstream) -> ContainerDns {
    let berth = CONTAINER_DNS.to_string();
    let mut servers = vec![berth.clone()];
    servers.extend(up.servers.iter().filter(|s| **s != berth).cloned());
    let domain = format!("{stack}.{namespace}.berth").to_ascii_lowercase();
    let mut search: Vec<String> = valid_domain(&domain)
        .then_some(domain)
        .into_iter()
        .collect();
    for d in &up.search {
        if !search.contains(d) {
            search.push(d.clone());
        }
    }
    ContainerDns { servers, search }
}

/// Whether [`CONTAINER_DNS`] is an address of this network namespace (a
/// bind on it succeeds): the node's edge put it on `lo`, so containers
/// reach it through their gateway.
pub fn served_here() -> bool {
    std::net::UdpSocket::bind((CONTAINER_DNS, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_is_the_engines_choice() {
        let conf = "# generated\nsearch corp.example lab.example\nnameserver 127.0.0.1\nnameserver 10.0.0.2\nnameserver fd00::1\noptions edns0\n";
        assert_eq!(
            upstream(conf, None),
            Upstream {
                servers: vec!["10.0.0.2".into()],
                search: vec!["corp.example".into(), "lab.example".into()],
            }
        );
        // Only loopback servers: Docker's defaults.
        assert_eq!(
            upstream("nameserver 127.0.0.11\n", None).servers,
            ["8.8.8.8", "8.8.4.4"]
        );
        // dockerd's own settings win; a broken daemon.json is ignored.
        let daemon = r#"{"dns": ["192.0.2.53"], "dns-search": ["d.example"]}"#;
        assert_eq!(
            upstream(conf, Some(daemon)),
            Upstream {
                servers: vec!["192.0.2.53".into()],
                search: vec!["d.example".into()],
            }
        );
        assert_eq!(upstream(conf, Some("{")), upstream(conf, None));
        assert!(is_resolved_stub("nameserver 127.0.0.53\noptions edns0\n"));
        assert!(!is_resolved_stub(conf));
    }

    #[test]
    fn berth_comes_first_and_the_rest_is_kept() {
        let up = Upstream {
            servers: vec!["10.0.0.2".into()],
            search: vec!["corp.example".into()],
        };
        assert_eq!(
            container_dns("default", "Shop", &up),
            ContainerDns {
                servers: vec!["198.18.0.53".into(), "10.0.0.2".into()],
                search: vec!["shop.default.berth".into(), "corp.example".into()],
            }
        );
        // Not a domain the engine takes: no search domain of berth's.
        let d = container_dns("default", "my_stack", &up);
        assert_eq!(d.search, ["corp.example"]);
        assert_eq!(d.servers[0], CONTAINER_DNS.to_string());
    }
}
