//! Stable service addresses ("VIPs"): their allocation, the environment
//! they give dependents, and the service-proxy table that makes them work.
//!
//! - **Allocation** ([`changes`], [`commit`]): the controller gives every
//!   service of every stack one address from `127.77.0.0/16`
//!   ([`berth_model::vip`]), recorded under `/berth/vips/` with a reverse
//!   key per address, both written create-only in one transaction, so two
//!   controllers racing can never hand one address to two services. A
//!   service keeps its address until it leaves desired state (`down`, or a
//!   deploy that drops it). The address is picked at random among free ones
//!   (skipping any this host already listens on), so independent berth
//!   servers on one machine (tests do this) rarely pick the same one.
//! - **Environment** ([`instance_env`]): what an instance is told about the
//!   services it `depends_on` or `links` (`<NAME>_HOST`, `_PORT`, `_URL`,
//!   Docker-links-era `_PORT_<p>_TCP*`) and `BERTH_HOSTS`, the name → address
//!   map the agent turns into the instance's `/etc/hosts` (processes) or
//!   `extra_hosts` (containers). Values are VIPs, never instance addresses,
//!   so they stay true while instances move, and nothing restarts.
//! - **Proxy table** ([`proxy_table`]): `VIP:port` for every port a service
//!   declares → its healthy instances, part of the edge tables (`edge.rs`)
//!   that every node's TCP proxy serves, beside the published ports.
//!   The services of stacks that run containers are served on their
//!   container-facing address too (`198.19.x.y`, which each node adds to
//!   `lo`: [`container_addresses`], `berth_agent::edge::LoAddresses`),
//!   because a container cannot reach the host's `127.77.x.y`: process
//!   services (containers are given their names as `extra_hosts`) and
//!   container services with a declared TCP port (found by name through
//!   berth's DNS for containers, [`container_names`], when the stack
//!   network of the container's own node has no such service).

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use berth_model::edge::{ContainerName, ServiceRef};
use berth_model::vip::{self, ServiceVip};
use berth_model::{StackRecord, keys};
use berth_net::Backends;
use berth_spec::types::{Driver, Service};
use berth_store::chunk::Part;
use berth_store::{Compare, Op, Revision, Store, encode};

use crate::catalog;
use crate::mirror::Mirror;

/// Environment variable carrying `name=address` pairs (space-separated) of
/// the stack's services as this instance reaches them.
pub const HOSTS_VAR: &str = "BERTH_HOSTS";

/// Ports whose clients do not speak HTTP, so `<NAME>_URL` says `tcp://`.
const NON_HTTP_PORTS: &[u16] = &[
    21, 22, 25, 53, 110, 143, 389, 1433, 1521, 2181, 3306, 4222, 5432, 5672, 6379, 9042, 9092,
    11211, 27017,
];

/// Chooses a free address given the ones in use (`None`: none left).
pub type Picker = Box<dyn FnMut(&BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> + Send + Sync>;

/// One write of the allocation step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VipChange {
    /// Give a service its address (both keys must not exist yet).
    Allocate(ServiceVip),
    /// Free the address of a service that is gone (expecting the record at
    /// this revision).
    Free(ServiceVip, Revision),
}

/// The VIP of a service, if it has one yet.
pub fn vip_of(mirror: &Mirror, ns: &str, stack: &str, service: &str) -> Option<Ipv4Addr> {
    mirror
        .vips
        .get(&keys::vip(ns, stack, service))
        .map(|(v, _)| v.address)
}

/// What the allocation step must write: an address for every service that
/// has none, and freeing those of services no stack has any more.
///
/// `pick` chooses a free address given the ones in use (see
/// [`random_picker`]); when it finds none, the service stays without one
/// (and a warning is logged): its dependents then get no discovery
/// variables for it, but everything else still runs.
pub fn changes(
    mirror: &Mirror,
    pick: &mut dyn FnMut(&BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr>,
) -> Vec<VipChange> {
    let mut used: BTreeSet<Ipv4Addr> = mirror.vips.values().map(|(v, _)| v.address).collect();
    let mut wanted = BTreeSet::new();
    let mut out = Vec::new();
    for (record, _) in mirror.stacks.values() {
        for name in record.spec.services.keys() {
            let key = keys::vip(&record.namespace, &record.name, name);
            wanted.insert(key.clone());
            if mirror.vips.contains_key(&key) {
                continue;
            }
            match pick(&used) {
                Some(address) => {
                    used.insert(address);
                    out.push(VipChange::Allocate(ServiceVip {
                        namespace: record.namespace.clone(),
                        stack: record.name.clone(),
                        service: name.clone(),
                        address,
                    }));
                }
                None => tracing::warn!(
                    namespace = %record.namespace, stack = %record.name, service = %name,
                    "no free service address left in 127.77.0.0/16"
                ),
            }
        }
    }
    for (key, (v, rev)) in &mirror.vips {
        if !wanted.contains(key) {
            out.push(VipChange::Free(v.clone(), *rev));
        }
    }
    out
}

/// Commit the allocation step; the revision after the last transaction
/// applied, `None` when the first one's compares failed (another controller
/// got there first: the watch brings its write). A partly applied step is
/// finished by the next pass, which sees the applied part.
/// `fence` is the leader key's revision when this controller is the elected
/// one (its writes must fail once it no longer is), as for placement.
pub async fn commit(
    store: &dyn Store,
    changes: &[VipChange],
    fence: Option<Revision>,
) -> anyhow::Result<Option<Revision>> {
    let common: Vec<Compare> = fence
        .map(|token| Compare::ModRevision(crate::leader::KEY.to_owned(), token))
        .into_iter()
        .collect();
    let mut parts = Vec::with_capacity(changes.len());
    for c in changes {
        // An address and its reverse key stay in one transaction.
        parts.push(match c {
            VipChange::Allocate(v) => {
                let key = keys::vip(&v.namespace, &v.stack, &v.service);
                let addr = keys::vip_addr(v.address);
                Part {
                    compare: vec![
                        Compare::ModRevision(key.clone(), 0),
                        Compare::ModRevision(addr.clone(), 0),
                    ],
                    success: vec![
                        Op::put(key.clone(), encode(&key, v)?),
                        Op::put(addr.clone(), encode(&addr, v)?),
                    ],
                }
            }
            VipChange::Free(v, rev) => {
                let key = keys::vip(&v.namespace, &v.stack, &v.service);
                Part {
                    compare: vec![Compare::ModRevision(key.clone(), *rev)],
                    success: vec![Op::Delete(key), Op::Delete(keys::vip_addr(v.address))],
                }
            }
        });
    }
    // In chunks under etcd's ops limit (see `berth_store::chunk`): a stack
    // of many services allocates all its addresses in one pass.
    let done = berth_store::chunk::commit(store, &common, parts).await?;
    Ok(done.revision)
}

/// A picker that starts at a random address and takes the first one free,
/// skipping addresses something on this host already listens on.
pub fn random_picker() -> impl FnMut(&BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> + Send + Sync {
    let state = std::collections::hash_map::RandomState::new();
    let mut counter = 0u64;
    move |used| {
        counter += 1;
        let mut h = state.build_hasher();
        h.write_u64(counter);
        let start = (h.finish() % u64::from(vip::VIP_COUNT)) as u32;
        let busy = local_listeners();
        (0..vip::VIP_COUNT)
            .filter_map(|i| vip::nth_vip((start + i) % vip::VIP_COUNT))
            .find(|a| !used.contains(a) && !busy.contains(a))
    }
}

/// IPv4 addresses with a listening TCP socket on this host (from
/// `/proc/net/tcp`; empty when it cannot be read).
fn local_listeners() -> BTreeSet<Ipv4Addr> {
    let Ok(text) = std::fs::read_to_string("/proc/net/tcp") else {
        return BTreeSet::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let local = f.nth(1)?;
            let state = f.nth(1)?;
            if state != "0A" {
                return None;
            }
            let hex = local.split(':').next()?;
            // The kernel prints the address in host byte order.
            let n = u32::from_str_radix(hex, 16).ok()?;
            Some(Ipv4Addr::from(u32::from_be(n.to_le())))
        })
        .collect()
}

/// `api-v2` → `API_V2`: the prefix of a service's variables.
pub fn env_name(service: &str) -> String {
    service
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// `http` unless the port says otherwise (`app_protocol`, or a well-known
/// non-HTTP port such as 5432 or 6379, which gets `tcp`).
fn scheme(service: &Service, port: u16) -> String {
    let declared = service
        .ports
        .iter()
        .find(|p| p.target == port)
        .and_then(|p| p.app_protocol.clone());
    match declared {
        Some(p) => p.to_ascii_lowercase(),
        None if NON_HTTP_PORTS.contains(&port) => "tcp".to_owned(),
        None => "http".to_owned(),
    }
}

/// Where an instance of `consumer` reaches service `target` of the same
/// stack: a process goes through the VIP; a container reaches a process
/// service on its container-facing address and a container service by name
/// (the stack network's aliases when the service has containers on the
/// same node, otherwise berth's DNS for containers, which answers the
/// service's container-facing address).
fn address_for(consumer: &Service, target: &Service, name: &str, vip: Ipv4Addr) -> String {
    match (consumer.driver(), target.driver()) {
        (Driver::Process, _) => vip.to_string(),
        (Driver::Docker, Driver::Process) => vip::container_address(vip).to_string(),
        (Driver::Docker, Driver::Docker) => name.to_owned(),
    }
}

/// The discovery environment of an instance of `service` in `record`:
/// `BERTH_HOSTS`, and for each service it `depends_on` or `links`:
/// `<NAME>_HOST`, `<NAME>_PORT`, `<NAME>_URL` and, per declared port `p`,
/// `<NAME>_PORT_<p>_TCP`, `_TCP_ADDR`, `_TCP_PORT`, `_TCP_PROTO`.
/// Variables the service's own environment sets (or unsets) are left out.
pub fn instance_env(
    mirror: &Mirror,
    record: &StackRecord,
    service: &Service,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let vip_of = |name: &str| vip_of(mirror, &record.namespace, &record.name, name);

    let mut hosts = Vec::new();
    for (name, target) in &record.spec.services {
        let Some(vip) = vip_of(name) else { continue };
        // Containers resolve container services through the network's DNS.
        if service.driver() == Driver::Docker && target.driver() == Driver::Docker {
            continue;
        }
        let addr = address_for(service, target, name, vip);
        hosts.push(format!("{name}={addr}"));
        hosts.push(format!("{name}.{}={addr}", record.name));
    }
    if !hosts.is_empty() {
        env.insert(HOSTS_VAR.to_owned(), hosts.join(" "));
    }

    let deps: BTreeSet<&str> = service
        .depends_on
        .keys()
        .map(String::as_str)
        .chain(service.links.iter().map(String::as_str))
        .collect();
    for dep in deps {
        let (Some(target), Some(vip)) = (record.spec.services.get(dep), vip_of(dep)) else {
            continue;
        };
        let host = address_for(service, target, dep, vip);
        let n = env_name(dep);
        env.insert(format!("{n}_HOST"), host.clone());
        let ports = target.tcp_ports();
        if let Some(&first) = ports.first() {
            env.insert(format!("{n}_PORT"), first.to_string());
            env.insert(
                format!("{n}_URL"),
                format!("{}://{host}:{first}", scheme(target, first)),
            );
        }
        for p in ports {
            env.insert(format!("{n}_PORT_{p}_TCP"), format!("tcp://{host}:{p}"));
            env.insert(format!("{n}_PORT_{p}_TCP_ADDR"), host.clone());
            env.insert(format!("{n}_PORT_{p}_TCP_PORT"), p.to_string());
            env.insert(format!("{n}_PORT_{p}_TCP_PROTO"), "tcp".to_owned());
        }
    }
    env.retain(|k, _| !service.environment.contains_key(k));
    env
}

/// Whether a stack runs containers (its services then need
/// container-facing addresses).
fn has_containers(record: &StackRecord) -> bool {
    record
        .spec
        .services
        .values()
        .any(|s| s.driver() == Driver::Docker)
}

/// The services containers reach on a container-facing address, with it:
/// in stacks that run containers, every process service, and every
/// container service that declares a TCP port (the proxy has nothing to
/// forward for one that declares none; its own node's containers still
/// find it on the stack network).
fn container_facing(mirror: &Mirror) -> Vec<(ServiceRef, &Service, Ipv4Addr)> {
    let mut out = Vec::new();
    for (record, _) in mirror.stacks.values() {
        if !has_containers(record) {
            continue;
        }
        for (name, svc) in &record.spec.services {
            if svc.driver() == Driver::Docker && svc.tcp_ports().is_empty() {
                continue;
            }
            if let Some(v) = vip_of(mirror, &record.namespace, &record.name, name) {
                let id = ServiceRef {
                    namespace: record.namespace.clone(),
                    stack: record.name.clone(),
                    service: name.clone(),
                };
                out.push((id, svc, vip::container_address(v)));
            }
        }
    }
    out
}

/// The container-facing addresses every node must serve (see
/// [`container_facing`]).
pub fn container_addresses(mirror: &Mirror) -> BTreeSet<Ipv4Addr> {
    container_facing(mirror)
        .into_iter()
        .map(|(_, _, a)| a)
        .collect()
}

/// What berth's DNS for containers answers: each service with a
/// container-facing address and a declared TCP port, sorted by service.
pub fn container_names(mirror: &Mirror) -> Vec<ContainerName> {
    let mut out: Vec<ContainerName> = container_facing(mirror)
        .into_iter()
        .filter(|(_, svc, _)| !svc.tcp_ports().is_empty())
        .map(|(service, _, addr)| ContainerName { service, addr })
        .collect();
    out.sort_by(|a, b| a.service.cmp(&b.service));
    out
}

/// Healthy instance addresses behind port number `index` of a service (the
/// first port of a process instance is its own `PORT`; any other port, and
/// every port of a container, is the declared port on the instance's
/// address, or the host port it is published on there).
pub fn service_backends(
    mirror: &Mirror,
    record: &StackRecord,
    name: &str,
    index: usize,
    target: u16,
) -> Vec<SocketAddr> {
    let retiring = catalog::retiring(mirror);
    let is_container = record
        .spec
        .services
        .get(name)
        .is_some_and(|s| s.driver() == Driver::Docker);
    mirror
        .statuses
        .values()
        .filter(|s| {
            s.key.namespace == record.namespace
                && s.key.stack == record.name
                && s.key.service == name
                && catalog::routable(s)
                && !retiring.contains(&s.key)
        })
        .filter_map(|s| {
            let addr: IpAddr = s.address.as_deref()?.parse().ok()?;
            let p = if index == 0 && !is_container {
                s.port?
            } else {
                s.port_of(target)
            };
            Some(SocketAddr::new(addr, p))
        })
        .collect()
}

/// `VIP:port` (and `container-address:port` where needed) → healthy
/// instances, for every declared port of every service with a VIP.
pub fn proxy_table(mirror: &Mirror) -> Backends {
    let mut table = Backends::new();
    let serve_containers = container_addresses(mirror);
    for (record, _) in mirror.stacks.values() {
        for (name, svc) in &record.spec.services {
            let Some(vip) = vip_of(mirror, &record.namespace, &record.name, name) else {
                continue;
            };
            let caddr = vip::container_address(vip);
            for (i, p) in svc.tcp_ports().into_iter().enumerate() {
                let backends = service_backends(mirror, record, name, i, p);
                if serve_containers.contains(&caddr) {
                    table.insert(SocketAddr::new(caddr.into(), p), backends.clone());
                }
                table.insert(SocketAddr::new(vip.into(), p), backends);
            }
        }
    }
    table
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use berth_model::{Health, InstanceKey, InstanceState, InstanceStatus};
    use berth_store::{KeyValue, WatchEvent};

    use crate::test_util::stack as load;

    /// A mirror holding stack `shop` of namespace `default` from `yaml`
    /// (shared with the edge tables' tests).
    pub(crate) fn mirror(yaml: &str) -> Mirror {
        let spec = load(yaml);
        let record = StackRecord {
            namespace: "default".into(),
            name: "shop".into(),
            release: 1,
            services: BTreeMap::new(),
            spec,
            updated_at: 0,
            config: Default::default(),
            rollout: None,
        };
        let mut m = Mirror::default();
        m.stacks.insert(keys::stack("default", "shop"), (record, 1));
        m
    }

    fn put(m: &mut Mirror, key: &str, value: &impl serde::Serialize, rev: i64) {
        m.apply(&WatchEvent::Put(KeyValue {
            key: key.into(),
            value: serde_json::to_vec(value).unwrap().into(),
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            lease: 0,
        }));
    }

    fn allocate(m: &mut Mirror) {
        let mut n = 0;
        let mut pick = |used: &BTreeSet<Ipv4Addr>| {
            n += 1;
            let a = Ipv4Addr::new(127, 77, 0, n);
            assert!(!used.contains(&a));
            Some(a)
        };
        for c in changes(m, &mut pick) {
            let VipChange::Allocate(v) = c else {
                panic!("{c:?}")
            };
            let key = keys::vip(&v.namespace, &v.stack, &v.service);
            put(m, &key, &v, 2);
        }
    }

    const STACK: &str = "
services:
  api:
    command: ./api
    ports: ['8000', '9000']
  db:
    command: ./db
    expose: ['5432']
  web:
    command: ./web
    depends_on: [api]
    links: [db]
    environment:
      DB_HOST: db.example
  box:
    image: busybox
    depends_on: [api, cache]
  cache:
    image: redis
    ports: ['6379']
";

    #[test]
    fn allocation_is_once_per_service_and_freed_with_the_stack() {
        let mut m = mirror(STACK);
        allocate(&mut m);
        assert_eq!(m.vips.len(), 5);
        let mut never = |_: &BTreeSet<Ipv4Addr>| -> Option<Ipv4Addr> { panic!("no new address") };
        assert!(changes(&m, &mut never).is_empty());
        m.stacks.clear();
        let freed = changes(&m, &mut never);
        assert_eq!(freed.len(), 5);
        assert!(freed.iter().all(|c| matches!(c, VipChange::Free(..))));
    }

    #[test]
    fn dependents_get_stable_variables_and_user_values_win() {
        let mut m = mirror(STACK);
        allocate(&mut m);
        let (record, _) = m.stacks.values().next().unwrap();
        let web = &record.spec.services["web"];
        let env = instance_env(&m, record, web);
        let api = vip_of(&m, "default", "shop", "api").unwrap().to_string();
        let db = vip_of(&m, "default", "shop", "db").unwrap().to_string();
        assert_eq!(env["API_HOST"], api);
        assert_eq!(env["API_PORT"], "8000");
        assert_eq!(env["API_URL"], format!("http://{api}:8000"));
        assert_eq!(env["API_PORT_9000_TCP"], format!("tcp://{api}:9000"));
        assert_eq!(env["API_PORT_9000_TCP_ADDR"], api);
        assert_eq!(env["API_PORT_9000_TCP_PORT"], "9000");
        // Linked, and the user's own DB_HOST is kept.
        assert!(!env.contains_key("DB_HOST"));
        assert_eq!(env["DB_URL"], format!("tcp://{db}:5432"));
        assert!(env[HOSTS_VAR].split(' ').any(|h| h == format!("api={api}")));
        assert!(
            env[HOSTS_VAR]
                .split(' ')
                .any(|h| h == format!("api.shop={api}"))
        );
        // No variables for services it does not depend on.
        assert!(!env.contains_key("CACHE_HOST"));

        // A container reaches a process service on its container-facing
        // address and a container service by name.
        let boxed = &record.spec.services["box"];
        let env = instance_env(&m, record, boxed);
        let api_c = vip::container_address(api.parse().unwrap()).to_string();
        assert_eq!(env["API_HOST"], api_c);
        assert_eq!(env["CACHE_HOST"], "cache");
        assert_eq!(env["CACHE_URL"], "tcp://cache:6379");
        assert!(!env[HOSTS_VAR].contains("cache="));
        assert!(env[HOSTS_VAR].contains(&format!("api={api_c}")));
    }

    #[test]
    fn proxy_table_maps_vip_ports_to_healthy_instances() {
        let mut m = mirror(STACK);
        allocate(&mut m);
        let status =
            |service: &str, slot: u32, addr: &str, port: u16, health: Health| InstanceStatus {
                state: InstanceState::Running,
                health,
                address: Some(addr.into()),
                port: Some(port),
                ..InstanceStatus::new(
                    InstanceKey::new("default", "shop", service, slot),
                    format!("u{slot}"),
                    "n1",
                    1,
                    0,
                )
            };
        for s in [
            status("api", 1, "127.0.0.1", 41001, Health::Healthy),
            status("api", 2, "127.0.0.1", 41002, Health::Unhealthy),
            status("cache", 1, "172.18.0.5", 6379, Health::None),
        ] {
            m.statuses.insert(s.key.clone(), s);
        }
        let t = proxy_table(&m);
        let api = vip_of(&m, "default", "shop", "api").unwrap();
        let cache = vip_of(&m, "default", "shop", "cache").unwrap();
        let sa = |ip: Ipv4Addr, p| SocketAddr::new(ip.into(), p);
        assert_eq!(
            t[&sa(api, 8000)],
            vec!["127.0.0.1:41001".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            t[&sa(api, 9000)],
            vec!["127.0.0.1:9000".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            t[&sa(cache, 6379)],
            vec!["172.18.0.5:6379".parse::<SocketAddr>().unwrap()]
        );
        // The stack runs containers: its services are served on their
        // container-facing address too, containers' like processes'.
        assert!(t.contains_key(&sa(vip::container_address(api), 8000)));
        assert_eq!(
            t[&sa(vip::container_address(cache), 6379)],
            vec!["172.18.0.5:6379".parse::<SocketAddr>().unwrap()]
        );
        // berth's DNS for containers names the services with a declared
        // TCP port: not `box` (a container with none) nor `web` (a process
        // with none, which still gets its address for `extra_hosts`).
        let names: Vec<(String, Ipv4Addr)> = container_names(&m)
            .into_iter()
            .map(|n| (n.service.service, n.addr))
            .collect();
        let caddr = |s: &str| vip::container_address(vip_of(&m, "default", "shop", s).unwrap());
        assert_eq!(
            names,
            [
                ("api".to_owned(), caddr("api")),
                ("cache".to_owned(), caddr("cache")),
                ("db".to_owned(), caddr("db")),
            ]
        );
        let lo = container_addresses(&m);
        assert!(lo.contains(&caddr("web")) && !lo.contains(&caddr("box")));

        // A container published on its node's address (a node other nodes
        // reach): the VIP forwards to that address at its host port.
        let mut published = status("cache", 2, "10.213.1.1", 34001, Health::None);
        published.host_ports = BTreeMap::from([(6379, 34001)]);
        m.statuses.insert(published.key.clone(), published);
        let t = proxy_table(&m);
        assert_eq!(
            t[&sa(cache, 6379)],
            vec![
                "172.18.0.5:6379".parse::<SocketAddr>().unwrap(),
                "10.213.1.1:34001".parse().unwrap()
            ]
        );
    }

    #[test]
    fn env_names() {
        assert_eq!(env_name("api-v2.x"), "API_V2_X");
    }
}
