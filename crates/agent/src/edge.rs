//! A node's edge: the HTTP router, the DNS server and the TCP proxy
//! (published ports and services' stable addresses), run from the
//! [`EdgeTables`] the servers compute.
//!
//! The same code serves the server's own node (fed straight from its
//! catalog) and every joined agent (fed by [`crate::remote_edge`] from the
//! servers' edge watch), so a request to any node's router, a lookup in any
//! node's DNS and a connection to a stable address on any node reach the
//! healthy instances of every node.
//!
//! The tables are only ever replaced, never cleared: a node cut off from
//! the servers keeps serving the last ones it had.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use berth_model::api::{DnsStats, EdgeStats, RouteStats, RouterServiceStats, RouterStats};
use berth_model::edge::{EdgeTables, ServiceRef};
use berth_model::vip::CONTAINER_DNS;
use berth_net::Backends;
use berth_net::dns::{DnsMetrics, DnsMetricsSnapshot, DnsServer, Instance as DnsInstance, Zone};
use berth_net::http::metrics::LATENCY_BUCKETS_US;
use berth_net::http::{
    Backend, Route, RouteTable, Router, RouterMetrics, ServiceBackends, ServiceId,
};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// What a node's edge listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeConfig {
    /// The HTTP router's address (`None`: no router).
    pub http: Option<SocketAddr>,
    /// The DNS server's address (`None`: no DNS).
    pub dns: Option<SocketAddr>,
    /// Run the TCP proxy (published ports and `VIP:port`), put the
    /// container-facing addresses on `lo` and, next to a local Docker
    /// engine, serve berth's DNS for containers ([`CONTAINER_DNS`]).
    pub proxy: bool,
}

fn service_id(s: &ServiceRef) -> ServiceId {
    ServiceId::new(&s.namespace, &s.stack, &s.service)
}

/// The router's table.
pub fn route_table(t: &EdgeTables) -> RouteTable {
    let routes = t
        .routes
        .iter()
        .map(|r| Route {
            host: r.host.clone(),
            path_prefix: r.path_prefix.clone(),
            service: service_id(&r.service),
            strip_prefix: r.strip_prefix,
        })
        .collect();
    let services: HashMap<ServiceId, ServiceBackends> = t
        .services
        .iter()
        .map(|s| {
            let backends = s
                .backends
                .iter()
                .map(|b| Backend {
                    addr: b.addr,
                    id: b.instance.clone(),
                })
                .collect();
            (
                service_id(&s.service),
                ServiceBackends {
                    backends,
                    retries: s.retries,
                    ..ServiceBackends::default()
                },
            )
        })
        .collect();
    RouteTable::new(routes, services)
}

/// The TCP proxy's table.
pub fn port_table(t: &EdgeTables) -> Backends {
    t.proxies
        .iter()
        .map(|p| (p.listen, p.backends.clone()))
        .collect()
}

/// The zone of berth's DNS for containers: each service's
/// container-facing address under the service's names.
pub fn container_zone(t: &EdgeTables) -> Zone {
    let mut b = Zone::builder();
    for n in &t.container_names {
        b.push(
            &n.service.namespace,
            &n.service.stack,
            &n.service.service,
            DnsInstance {
                // `vip.<service>.<stack>.<namespace>.berth` too; no SRV.
                instance: format!("{}.vip", n.service.service),
                addr: n.addr.into(),
                port: None,
                node: String::new(),
            },
        );
    }
    b.build()
}

/// The DNS zone.
pub fn zone(t: &EdgeTables) -> Zone {
    let mut b = Zone::builder();
    for r in &t.dns {
        b.push(
            &r.service.namespace,
            &r.service.stack,
            &r.service.service,
            DnsInstance {
                instance: r.instance.clone(),
                addr: r.addr,
                port: r.port,
                node: r.node.clone(),
            },
        );
    }
    b.build()
}

/// Handles on an edge's counters: what its node reports and exports.
/// Cheap to clone.
#[derive(Clone, Default)]
pub struct EdgeMeters {
    /// The HTTP router, when it listens.
    pub router: Option<Router>,
    /// The DNS server's counters, when it listens.
    pub dns: Option<DnsMetrics>,
}

impl EdgeMeters {
    /// The counters now (`None` when the node runs neither a router nor
    /// a DNS server).
    pub fn stats(&self) -> Option<EdgeStats> {
        if self.router.is_none() && self.dns.is_none() {
            return None;
        }
        Some(EdgeStats {
            router: self.router.as_ref().map(|r| router_stats(&r.metrics())),
            dns: self.dns.as_ref().map(|d| dns_stats(&d.snapshot())),
        })
    }

    /// The counters as a joined node sends them: [`EdgeMeters::stats`]
    /// without the routes that never served a request, and without the
    /// services left with no route and nothing to count. Every node's
    /// router has every route of the cluster, so a report of all of them
    /// would grow with the cluster rather than with the node's traffic; the
    /// cost is that a route's series appears with its first request.
    pub fn report(&self) -> Option<EdgeStats> {
        self.stats().map(without_idle_routes)
    }
}

/// `stats` without the routes that served nothing, and without the
/// services then left with no route and nothing else counted.
fn without_idle_routes(mut stats: EdgeStats) -> EdgeStats {
    if let Some(router) = &mut stats.router {
        for s in &mut router.services {
            s.routes.retain(|r| r.requests() > 0);
        }
        router
            .services
            .retain(|s| !s.routes.is_empty() || s.in_flight + s.ejections + s.retries > 0);
    }
    stats
}

/// The router's counters as reported and exported.
pub fn router_stats(m: &RouterMetrics) -> RouterStats {
    RouterStats {
        connections_accepted: m.connections_accepted,
        connections_active: m.connections_active,
        no_route: m.no_route,
        latency_bounds_us: LATENCY_BUCKETS_US.to_vec(),
        services: m
            .services
            .iter()
            .map(|s| RouterServiceStats {
                service: ServiceRef {
                    namespace: s.service.namespace.clone(),
                    stack: s.service.stack.clone(),
                    service: s.service.service.clone(),
                },
                in_flight: s.in_flight,
                ejections: s.ejections,
                instances_ejected: s.instances_ejected,
                retries: s.retries,
                routes: s
                    .routes
                    .iter()
                    .map(|r| RouteStats {
                        route: r.route.clone(),
                        requests_by_class: r.requests_by_class,
                        latency_buckets: r.latency_buckets.to_vec(),
                        latency_sum_us: r.latency_sum_us,
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// The DNS server's counters as reported and exported, keyed by the
/// metrics' label values.
pub fn dns_stats(d: &DnsMetricsSnapshot) -> DnsStats {
    let map = |rows: &[(&str, u64)]| {
        rows.iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect::<BTreeMap<String, u64>>()
    };
    let (t, r) = (&d.by_type, &d.by_rcode);
    DnsStats {
        queries: map(&[("udp", d.udp_queries), ("tcp", d.tcp_queries)]),
        by_type: map(&[
            ("A", t.a),
            ("AAAA", t.aaaa),
            ("SRV", t.srv),
            ("SOA", t.soa),
            ("ANY", t.any),
            ("other", t.other),
        ]),
        by_rcode: map(&[
            ("NOERROR", r.noerror),
            ("FORMERR", r.formerr),
            ("NXDOMAIN", r.nxdomain),
            ("NOTIMP", r.notimp),
            ("REFUSED", r.refused),
            ("BADVERS", r.badvers),
        ]),
        truncated: d.truncated,
        dropped: d.dropped,
    }
}

/// A running edge: its router and DNS counters (for metrics), and the
/// tasks to wait for.
pub struct RunningEdge {
    /// The router, when it listens.
    pub router: Option<Router>,
    /// Where the router listens.
    pub http_addr: Option<SocketAddr>,
    /// The DNS server's counters, when it listens.
    pub dns: Option<DnsMetrics>,
    tasks: JoinSet<std::io::Result<()>>,
}

impl RunningEdge {
    /// Handles on its counters.
    pub fn meters(&self) -> EdgeMeters {
        EdgeMeters {
            router: self.router.clone(),
            dns: self.dns.clone(),
        }
    }

    /// Wait until every part has stopped (after `stop` turned true); the
    /// first failure, if any.
    pub async fn wait(mut self) -> std::io::Result<()> {
        let mut result = Ok(());
        while let Some(r) = self.tasks.join_next().await {
            let r = r.map_err(std::io::Error::other).and_then(|r| r);
            if let Err(e) = r
                && result.is_ok()
            {
                result = Err(e);
            }
        }
        result
    }
}

/// Start the edge `cfg` asks for, following `tables` until `stop` turns
/// true. A router or DNS port that cannot be bound is logged and that part
/// left out (the rest of the node still works), as on a single machine.
pub async fn start(
    cfg: &EdgeConfig,
    tables: watch::Receiver<Arc<EdgeTables>>,
    stop: watch::Receiver<bool>,
) -> RunningEdge {
    let first = tables.borrow().clone();
    let (routes_tx, routes_rx) = watch::channel(route_table(&first));
    let (zone_tx, zone_rx) = watch::channel(Arc::new(zone(&first)));
    let (ports_tx, ports_rx) = watch::channel(port_table(&first));
    let (containers_tx, containers_rx) = watch::channel(Arc::new(container_zone(&first)));
    let mut tasks = JoinSet::new();
    let publisher = Publisher {
        routes: routes_tx,
        zone: zone_tx,
        ports: ports_tx,
        containers: containers_tx,
        lo: cfg.proxy.then(LoAddresses::default),
    };
    tasks.spawn(publisher.run(tables, stop.clone()));

    let mut out = RunningEdge {
        router: None,
        http_addr: None,
        dns: None,
        tasks,
    };
    if cfg.proxy {
        let stop = stop.clone();
        out.tasks.spawn(async move {
            berth_net::tcp::PortProxy::new(ports_rx).run(stop).await;
            Ok(())
        });
    }
    if cfg.proxy && local_docker_engine() {
        out.tasks
            .spawn(serve_container_dns(containers_rx, stop.clone()));
    }
    if let Some(addr) = cfg.http {
        start_router(&mut out, addr, routes_rx, stop.clone());
    }
    if let Some(addr) = cfg.dns {
        match DnsServer::bind(addr).await {
            Ok(server) => {
                out.dns = Some(server.metrics());
                tracing::info!(%addr, "DNS listening");
                out.tasks.spawn(async move {
                    server.run(zone_rx, stop).await;
                    Ok(())
                });
            }
            Err(e) => {
                tracing::warn!(%addr, error = %e, "DNS not started: cannot listen (choose another with --dns, or --no-dns)")
            }
        }
    }
    out
}

/// The router is a convenience: if its port is taken (another server, a
/// web server), the node still runs, and says so.
fn start_router(
    out: &mut RunningEdge,
    addr: SocketAddr,
    routes: watch::Receiver<RouteTable>,
    stop: watch::Receiver<bool>,
) {
    // The router's threads share the port with SO_REUSEPORT, which would
    // also let a second server (or anything else using it) share it
    // silently: a plain bind first makes a taken port an error here.
    let addr = match std::net::TcpListener::bind(addr).and_then(|probe| probe.local_addr()) {
        Ok(bound) => bound,
        Err(e) => {
            tracing::warn!(%addr, error = %e, "HTTP router not started: cannot listen (choose another with --http, or --no-http)");
            return;
        }
    };
    let router = Router::new(routes, Default::default());
    // On its own threads (one current-thread runtime per core) rather than
    // on the node's runtime: proxying is the hot path, and sharing the
    // work-stealing runtime with the API, agent and controller halved its
    // throughput in bench/router.sh.
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let server = match router.serve_on_threads(addr, threads, stop) {
        Ok(server) => server,
        Err(e) => {
            tracing::warn!(%addr, error = %e, "HTTP router not started: cannot listen (choose another with --http, or --no-http)");
            return;
        }
    };
    tracing::info!(addr = %server.local_addr(), threads, "HTTP router listening");
    out.http_addr = Some(server.local_addr());
    out.router = Some(router);
    out.tasks.spawn(async move {
        tokio::task::spawn_blocking(move || server.join())
            .await
            .map_err(std::io::Error::other)?
    });
}

/// Whether containers run on this host: the default Docker socket exists,
/// or `DOCKER_HOST` names a Unix socket (an engine elsewhere runs its
/// containers on another host, which this node's addresses do not serve).
fn local_docker_engine() -> bool {
    match std::env::var("DOCKER_HOST") {
        Ok(h) if !h.is_empty() => h.starts_with("unix://"),
        _ => std::path::Path::new("/var/run/docker.sock").exists(),
    }
}

/// How often a node tries again to serve berth's DNS for containers when
/// another process holds its port.
const CONTAINER_DNS_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// berth's DNS for containers: [`CONTAINER_DNS`] on `lo`, port 53 (UDP and
/// TCP; the engine gives containers servers without a port), answering
/// each service's names with its container-facing address
/// ([`container_zone`]). Containers get it from the Docker driver
/// (`driver::docker::dns`), which looks for the address on the host: it is
/// added at once, so containers created from the node's start get it.
/// Port 53 is held only while the tables name a service (some stack runs
/// containers), so berth processes that run none (tests on one host) leave
/// it to one that does.
///
/// Without root the address cannot be added, nor port 53 bound: said once,
/// and containers keep the engine's DNS (other services by name on their
/// own node only). A port held by another process (another berth on this
/// host, which then serves it) is tried again every
/// [`CONTAINER_DNS_RETRY`]. The address stays on `lo` after the node
/// stops: a container's query to it is then refused at once and the
/// engine asks its next server, where an absent address would make every
/// lookup wait for a timeout.
async fn serve_container_dns(
    mut zone: watch::Receiver<Arc<Zone>>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let addr = SocketAddr::new(CONTAINER_DNS.into(), 53);
    let fallback = "containers find other services by name only when those have \
                    containers on the same node (the stack network's aliases)";
    if let Err(e) = ip_addr("add", CONTAINER_DNS).await {
        tracing::warn!(%addr, error = %e, "berth's DNS for containers not served: cannot add its address to lo (needs root / CAP_NET_ADMIN and iproute2's `ip`); {fallback}");
        return Ok(());
    }
    let mut said = false;
    loop {
        tokio::select! {
            named = zone.wait_for(|z| !z.services().is_empty()) => if named.is_err() { return Ok(()) },
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        let server = match DnsServer::bind(addr).await {
            Ok(server) => server,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                tracing::warn!(%addr, error = %e, "berth's DNS for containers not served: port 53 needs root (CAP_NET_BIND_SERVICE); {fallback}");
                return Ok(());
            }
            Err(e) => {
                if !said {
                    said = true;
                    tracing::info!(%addr, error = %e, "berth's DNS for containers: cannot listen yet (another berth on this host may serve it); retrying");
                }
                tokio::select! {
                    () = tokio::time::sleep(CONTAINER_DNS_RETRY) => {}
                    _ = stop.wait_for(|s| *s) => return Ok(()),
                }
                continue;
            }
        };
        said = false;
        tracing::info!(%addr, "DNS for containers listening");
        let (quit_tx, quit) = watch::channel(false);
        let run = server.run(zone.clone(), quit);
        tokio::pin!(run);
        let stopping = tokio::select! {
            () = &mut run => false,
            _ = zone.wait_for(|z| z.services().is_empty()) => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        quit_tx.send_replace(true);
        run.await;
        if stopping {
            return Ok(());
        }
        tracing::info!(%addr, "DNS for containers closed: no stack runs containers");
    }
}

/// Turns each new [`EdgeTables`] into the components' tables.
struct Publisher {
    routes: watch::Sender<RouteTable>,
    zone: watch::Sender<Arc<Zone>>,
    ports: watch::Sender<Backends>,
    /// berth's DNS for containers.
    containers: watch::Sender<Arc<Zone>>,
    /// `None` when this node runs no TCP proxy.
    lo: Option<LoAddresses>,
}

impl Publisher {
    async fn run(
        mut self,
        mut tables: watch::Receiver<Arc<EdgeTables>>,
        mut stop: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        loop {
            let t = tables.borrow_and_update().clone();
            self.publish(&t).await;
            let feed_gone = tokio::select! {
                changed = tables.changed() => changed.is_err(),
                _ = stop.wait_for(|s| *s) => break,
            };
            if feed_gone {
                // The feed is gone (shutting down): keep what we have
                // until told to stop.
                let _ = stop.wait_for(|s| *s).await;
                break;
            }
        }
        if let Some(lo) = &mut self.lo {
            lo.sync(&BTreeSet::new()).await;
        }
        Ok(())
    }

    async fn publish(&mut self, t: &EdgeTables) {
        // Addresses first: the proxy binds them as soon as it sees the table.
        if let Some(lo) = &mut self.lo {
            lo.sync(&t.lo_addresses.iter().copied().collect()).await;
        }
        let table = route_table(t);
        self.routes.send_if_modified(|current| {
            let changed = *current != table;
            *current = table;
            changed
        });
        let ports = port_table(t);
        self.ports.send_if_modified(|current| {
            let changed = *current != ports;
            *current = ports;
            changed
        });
        let zone = zone(t);
        for r in zone.rejected() {
            tracing::warn!(name = %r, "not published in DNS");
        }
        self.zone.send_if_modified(|current| {
            let changed = current.services() != zone.services();
            if changed {
                *current = Arc::new(zone);
            }
            changed
        });
        let containers = container_zone(t);
        self.containers.send_if_modified(|current| {
            let changed = current.services() != containers.services();
            if changed {
                *current = Arc::new(containers);
            }
            changed
        });
    }
}

/// Container-facing addresses on `lo`: added when a stack needs them,
/// removed when no stack does any more (and at shutdown). Only addresses
/// this node added are ever removed. Needs `CAP_NET_ADMIN` (root); without
/// it, says once why containers cannot reach services through them.
#[derive(Debug, Default)]
pub struct LoAddresses {
    added: BTreeSet<Ipv4Addr>,
    warned: bool,
}

impl LoAddresses {
    /// Make `lo` carry exactly the wanted addresses (of those we manage).
    pub async fn sync(&mut self, wanted: &BTreeSet<Ipv4Addr>) {
        for a in wanted.difference(&self.added.clone()) {
            match ip_addr("add", *a).await {
                Ok(()) => {
                    self.added.insert(*a);
                }
                Err(e) => {
                    if !self.warned {
                        self.warned = true;
                        tracing::warn!(address = %a, error = %e, "cannot add a container-facing service address to lo (needs root / CAP_NET_ADMIN and iproute2's `ip`): containers cannot reach services on other nodes, nor process services, by name");
                    }
                }
            }
        }
        let gone: Vec<Ipv4Addr> = self.added.difference(wanted).copied().collect();
        for a in gone {
            if let Err(e) = ip_addr("del", a).await {
                tracing::debug!(address = %a, error = %e, "cannot remove a service address from lo");
            }
            self.added.remove(&a);
        }
    }
}

/// `ip addr add|del A/32 dev lo`; an address already there counts as added
/// (iproute2 says "File exists", or since 6.x "Address already assigned").
async fn ip_addr(verb: &str, a: Ipv4Addr) -> Result<(), String> {
    let out = tokio::process::Command::new("ip")
        .args(["addr", verb, &format!("{a}/32"), "dev", "lo"])
        .output()
        .await
        .map_err(|e| format!("running `ip`: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let there = stderr.contains("File exists") || stderr.contains("already assigned");
    if out.status.success() || (verb == "add" && there) {
        Ok(())
    } else {
        Err(stderr.trim().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_model::edge::{DnsRecord, HttpBackend, HttpRoute, HttpService, TcpProxy};

    fn web() -> ServiceRef {
        ServiceRef {
            namespace: "default".into(),
            stack: "shop".into(),
            service: "web".into(),
        }
    }

    fn tables() -> EdgeTables {
        EdgeTables {
            routes: vec![HttpRoute {
                host: "web.shop.localhost".into(),
                path_prefix: "/".into(),
                service: web(),
                strip_prefix: false,
            }],
            services: vec![HttpService {
                service: web(),
                backends: vec![HttpBackend {
                    addr: "10.0.0.2:41000".parse().unwrap(),
                    instance: "web.1".into(),
                }],
                retries: 2,
            }],
            proxies: vec![TcpProxy {
                listen: "127.77.0.9:80".parse().unwrap(),
                backends: vec!["10.0.0.2:41000".parse().unwrap()],
            }],
            dns: vec![DnsRecord {
                service: web(),
                instance: "web.1".into(),
                addr: "10.0.0.2".parse().unwrap(),
                port: Some(41000),
                node: "n2".into(),
            }],
            lo_addresses: vec![],
            container_names: vec![berth_model::edge::ContainerName {
                service: web(),
                addr: "198.19.0.9".parse().unwrap(),
            }],
        }
    }

    #[test]
    fn tables_convert_for_each_component() {
        let t = tables();
        let routes = route_table(&t);
        assert_eq!(routes.routes().len(), 1);
        let id = ServiceId::new("default", "shop", "web");
        assert_eq!(routes.routes()[0].service, id);
        let s = &routes.services()[&id];
        assert_eq!(s.retries, 2);
        assert_eq!(s.backends[0].addr, "10.0.0.2:41000".parse().unwrap());
        let ports = port_table(&t);
        assert_eq!(
            ports[&"127.77.0.9:80".parse().unwrap()],
            vec!["10.0.0.2:41000".parse::<SocketAddr>().unwrap()]
        );
        let z = zone(&t);
        assert_eq!(z.services().len(), 1);
        assert!(z.names().any(|n| n == "web.shop.default.berth"));
        // berth's DNS for containers: the service's container-facing
        // address under the same names, not its instances.
        let c = container_zone(&t);
        let web = &c.services()[&berth_net::dns::ServiceName {
            namespace: "default".into(),
            stack: "shop".into(),
            service: "web".into(),
        }];
        let addrs: Vec<std::net::IpAddr> = web.iter().map(|i| i.addr).collect();
        assert_eq!(addrs, ["198.19.0.9".parse::<std::net::IpAddr>().unwrap()]);
        assert!(c.names().any(|n| n == "web.shop.default.berth"));
    }

    #[test]
    fn a_report_leaves_out_routes_that_served_nothing() {
        let route = |name: &str, n: u64| RouteStats {
            route: name.into(),
            requests_by_class: [0, n, 0, 0, 0],
            latency_buckets: vec![n],
            latency_sum_us: n,
        };
        let service = |name: &str, routes: Vec<RouteStats>, retries: u64| RouterServiceStats {
            service: ServiceRef {
                service: name.into(),
                ..web()
            },
            in_flight: 0,
            ejections: 0,
            instances_ejected: 0,
            retries,
            routes,
        };
        let stats = EdgeStats {
            router: Some(RouterStats {
                services: vec![
                    service("web", vec![route("web/", 3), route("idle/", 0)], 0),
                    // Nothing counted at all: left out.
                    service("quiet", vec![route("quiet/", 0)], 0),
                    // No request served, but a retry counted: kept.
                    service("flaky", vec![route("flaky/", 0)], 1),
                ],
                ..RouterStats::default()
            }),
            dns: None,
        };
        let report = without_idle_routes(stats);
        let services: Vec<(String, Vec<String>)> = report
            .router
            .unwrap()
            .services
            .into_iter()
            .map(|s| {
                (
                    s.service.service,
                    s.routes.into_iter().map(|r| r.route).collect(),
                )
            })
            .collect();
        assert_eq!(
            services,
            [
                ("web".to_owned(), vec!["web/".to_owned()]),
                ("flaky".to_owned(), vec![])
            ]
        );
    }

    /// A node keeps serving the last tables when its feed ends (the server
    /// went away), and follows a new table when one comes.
    #[tokio::test]
    async fn the_router_follows_the_tables_and_keeps_the_last_ones() {
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let baddr = backend.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = backend.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                });
            }
        });
        let (tx, rx) = watch::channel(Arc::new(EdgeTables::default()));
        let (stop_tx, stop) = watch::channel(false);
        let cfg = EdgeConfig {
            http: Some("127.0.0.1:0".parse().unwrap()),
            dns: None,
            proxy: false,
        };
        let edge = start(&cfg, rx, stop).await;
        let http = edge.http_addr.unwrap();
        let get = || async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: web.shop.localhost\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out).await;
            out
        };
        assert!(get().await.starts_with("HTTP/1.1 404"));
        let mut t = tables();
        t.services[0].backends[0].addr = baddr;
        tx.send_replace(Arc::new(t));
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        while !get().await.starts_with("HTTP/1.1 200") {
            assert!(
                tokio::time::Instant::now() < deadline,
                "not routed within 20 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        drop(tx);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(get().await.starts_with("HTTP/1.1 200"));
        // What the node reports: the 404 before the route existed, the
        // 200s through it, no DNS server.
        let stats = edge.meters().stats().unwrap();
        assert_eq!(stats.dns, None);
        let router = stats.router.unwrap();
        assert_eq!(router.no_route, 1);
        assert_eq!(router.latency_bounds_us, LATENCY_BUCKETS_US);
        let service = &router.services[0];
        assert_eq!(service.service, web());
        let route = &service.routes[0];
        assert_eq!(route.route, "web.shop.localhost/");
        assert!(route.requests_by_class[1] >= 2, "{route:?}");
        assert_eq!(route.requests(), route.latency_buckets.iter().sum::<u64>());
        stop_tx.send_replace(true);
        edge.wait().await.unwrap();
    }
}
