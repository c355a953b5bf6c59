//! The berth server: the HTTP API, the controllers, and the wiring of store,
//! scheduler and the local agent into one process.
//!
//! # Layout
//! - [`api`]: HTTP routes (axum), auth, listeners (Unix socket + TCP), OpenAPI.
//! - [`desired`]: the one write path for desired state (typed commands,
//!   compare-and-swap); [`diff`]: what a deploy would change (dry run).
//! - [`controller`]: turns desired state into assignments (reconcile loop).
//! - [`catalog`]: healthy instances, and the published-port table.
//! - [`kv`]: the user KV store, sessions and locks (Consul's semantics).
//! - [`mirror`]: the watched in-memory copy of state those loops react to.
//! - [`join`]: the join token, node credentials, registrations and drain.
//! - [`edge`]: the edge tables (router, DNS, TCP proxy) every node serves,
//!   computed from the catalog, fed to this node's edge and to agents;
//!   [`traffic`]: a service's HTTP routes.
//! - [`metrics`], [`history`], [`events`]: `GET /metrics`, the in-memory
//!   history of instance resource use, and the event log derived from state
//!   changes (bundled as [`metrics::Telemetry`]).
//! - [`peers`]: servers asking each other (the logs fan-out).
//! - [`vip`]: stable per-service addresses, discovery env and the `VIP:port` proxy table.
//! - [`run`]: opens the store, registers this node, starts the local agent,
//!   the controller and the listeners, and stops them all on shutdown.
//!
//! Every background task started here is owned by [`run`]: it is awaited on
//! shutdown, and the failure of any one of them stops the server with that
//! error instead of leaving a half-working process.

#![forbid(unsafe_code)]

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use berth_model::{Node, keys};
use berth_store::{Store, StoreError, embedded::EmbeddedStore};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub mod api;
pub mod catalog;
pub mod controller;
pub mod desired;
pub mod diff;
pub mod edge;
pub mod events;
pub mod history;
pub mod join;
pub mod kv;
pub mod leader;
pub mod metrics;
pub mod mirror;
pub mod peers;
pub mod servers;
#[cfg(test)]
mod test_util;
pub mod traffic;
pub mod ui;
pub mod vip;

/// How the server is started.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// State, logs, socket and token live here.
    pub data_dir: PathBuf,
    /// TCP addresses for the API (the Unix socket is always there).
    pub listen: Vec<SocketAddr>,
    /// This node's id (hostname by default).
    pub node_id: String,
    /// HTTP router address (`None`: no router).
    pub http: Option<SocketAddr>,
    /// DNS server address (`None`: no DNS).
    pub dns: Option<SocketAddr>,
    /// Extra listener serving only the Consul-compatible API (`None`: none;
    /// the subset is on the API listeners anyway). Usually 127.0.0.1:8500,
    /// where Consul clients look by default.
    pub consul: Option<SocketAddr>,
    /// Where state lives.
    pub store: StoreLocation,
    /// Size cap and rotation of the captured instance logs.
    pub logs: berth_agent::LogConfig,
    /// Time between two samples of the built-in metrics history.
    pub history_interval: Duration,
    /// Run a local agent (this server is also a node that runs work);
    /// `berth server --no-agent` turns it off.
    pub run_agent: bool,
    /// The address the local agent registers for this node and its
    /// instances: what other nodes' routers connect to. `127.0.0.1` (the
    /// default) is right on one machine only; `berth server --advertise IP`
    /// when agents on other machines join.
    pub advertise: std::net::IpAddr,
    /// How long a node may be down before its instances are rescheduled.
    pub reschedule_after: Duration,
    /// Whether browsers need the token on loopback listeners (see [`ui`]).
    pub dashboard_auth: ui::DashboardAuth,
    /// How often the local agent's node record gets fresh facts.
    pub facts_every: Duration,
}

impl ServerConfig {
    /// Defaults: API on a free loopback port, router on 127.0.0.1:8080, DNS
    /// on 127.0.0.1:8600 (Consul's), the embedded store.
    pub fn new(data_dir: PathBuf, node_id: String) -> Self {
        Self {
            data_dir,
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
            node_id,
            http: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
            dns: Some(berth_net::dns::DEFAULT_ADDR),
            consul: None,
            store: StoreLocation::Embedded,
            logs: berth_agent::LogConfig::default(),
            history_interval: history::INTERVAL,
            run_agent: true,
            advertise: std::net::Ipv4Addr::LOCALHOST.into(),
            reschedule_after: Duration::from_millis(
                controller::Liveness::DEFAULT_RESCHEDULE_AFTER_MS,
            ),
            dashboard_auth: ui::DashboardAuth::Required,
            facts_every: Duration::from_secs(15),
        }
    }
}

/// Where the server keeps its state.
#[derive(Debug, Clone)]
pub enum StoreLocation {
    /// `state.redb` in the data dir (one machine).
    Embedded,
    /// An etcd cluster (a fleet); several servers may share it.
    Etcd(Box<berth_store::etcd::EtcdConfig>),
}

impl StoreLocation {
    /// `embedded` or an `etcd://` URL.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        if s == "embedded" {
            return Ok(Self::Embedded);
        }
        let cfg = berth_store::etcd::EtcdConfig::from_url(s).map_err(|e| {
            anyhow::anyhow!(
                "--store {s:?}: {e} (use `embedded` or etcd://host:2379[,host:2379][/prefix])"
            )
        })?;
        Ok(Self::Etcd(Box::new(cfg)))
    }
}

/// What a running server advertises in `<data_dir>/server.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerInfo {
    /// Server pid.
    pub pid: u32,
    /// Unix socket path.
    pub socket: PathBuf,
    /// Bound TCP API addresses.
    pub tcp: Vec<SocketAddr>,
    /// Node id.
    pub node: String,
}

/// Name of the API socket inside the data dir.
pub const SOCKET_NAME: &str = "berth.sock";

/// Milliseconds since the Unix epoch (the server's one clock).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The default node id: the host name.
pub fn default_node_id() -> String {
    nix_hostname().unwrap_or_else(|| "local".to_owned())
}

fn nix_hostname() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && !s.contains('/'))
}

/// Run the server until `shutdown` completes, then stop every instance
/// gracefully and return.
pub async fn run(
    cfg: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cfg.data_dir)
        .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    let _lock = lock_data_dir(&cfg.data_dir)?;
    if cfg.dashboard_auth == ui::DashboardAuth::Off
        && let Some(remote) = cfg.listen.iter().find(|a| !a.ip().is_loopback())
    {
        anyhow::bail!(
            "the dashboard's auth can be off only when every API listener is loopback, \
             but --listen {remote} is reachable from other machines (drop --dashboard-no-auth)"
        );
    }

    let (store, store_metrics) = metrics::Telemetry::metered_store(open_store(&cfg).await?);
    let token = api::load_or_create_token(&cfg.data_dir).context("loading the API token")?;
    let logs = berth_agent::logs::LogStore::open(cfg.data_dir.join("logs"), cfg.logs.clone())
        .context("opening the log store")?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks: JoinSet<anyhow::Result<()>> = JoinSet::new();

    let container_stats = berth_agent::driver::docker::StatsMap::default();
    let health_stats = berth_agent::health::HealthStatsMap::default();
    let (live_tx, live_rx) = watch::channel(Arc::new(events::Live::default()));
    let mut observed = live_rx.clone();
    let event_log = Arc::new(
        events::EventLog::open(store.clone(), events::DEFAULT_CAPACITY)
            .await
            .context("opening the event log")?,
    );
    // Only the elected leader runs the controller, writes events and
    // exports joined nodes' metrics.
    let (leader_tx, leader_rx) = watch::channel(None);
    let telemetry = metrics::Telemetry::new(
        cfg.node_id.clone(),
        store.clone(),
        store_metrics,
        event_log.clone(),
        (live_rx, leader_rx.clone()),
        (container_stats.clone(), health_stats.clone()),
        cfg.history_interval,
    );
    {
        let store = store.clone();
        let stop = stop_rx.clone();
        let mut observer = events::Observer::new(event_log, live_tx, leader_rx.clone());
        let lag = telemetry.watch_lag();
        tasks.spawn(async move { mirror::follow(store, stop, &mut observer, Some(lag)).await });
    }
    tasks.spawn(telemetry.clone().sample_history(stop_rx.clone()));
    tasks.spawn(telemetry.clone().follow_node_stats(stop_rx.clone()));

    // Agents on other machines join with this token (`berth token`).
    let join_token = join::ensure_join_token(store.as_ref())
        .await
        .context("creating the join token")?;
    write_private(&cfg.data_dir.join("join-token"), &join_token)?;
    tracing::info!(
        path = %cfg.data_dir.join("join-token").display(),
        "join token for `berth agent --join URL --token T` (also: `berth token`)"
    );

    // The local agent's statuses as it emits them: the edge tables below lay
    // them over the store's state, so a health change reaches the routers,
    // DNS and TCP proxies without waiting for its status write to commit.
    let local_statuses = cfg.run_agent.then(berth_agent::local::LocalStatuses::new);
    if let Some(local) = &local_statuses {
        let stats = (container_stats, health_stats);
        start_local_agent(&cfg, &store, &logs, &mut tasks, &stop_rx, stats, local).await?;
    }

    // Releases the KV locks of sessions whose TTL ran out.
    tasks.spawn(kv::reap_sessions(store.clone(), stop_rx.clone()));
    // This node's edge (router, DNS, TCP proxy) and the agents' edge
    // watches follow the same tables.
    let (mut feed, local_tables, edge_feed) = edge::Tables::new();
    {
        let store = store.clone();
        let stop = stop_rx.clone();
        let lag = telemetry.watch_lag();
        // Remote agents' edges get the overlaid tables too: the local
        // instances' health is as fresh for them as for this node's.
        let local = local_statuses.as_ref().map(|l| l.subscribe());
        tasks.spawn(
            async move { mirror::follow_with(store, stop, &mut feed, Some(lag), local).await },
        );
        let edge_cfg = berth_agent::edge::EdgeConfig {
            http: cfg.http,
            dns: cfg.dns,
            proxy: true,
        };
        let running = berth_agent::edge::start(&edge_cfg, local_tables, stop_rx.clone()).await;
        if let Some(router) = &running.router {
            telemetry.set_router(router.clone());
        }
        if let Some(dns) = &running.dns {
            telemetry.set_dns(dns.clone());
        }
        tasks.spawn(async move { running.wait().await.context("this node's edge") });
    }

    // Other servers on the same store hold log lines of their own; a logs
    // request asks them (an embedded store has no other server).
    let peers = match cfg.store {
        StoreLocation::Embedded => None,
        StoreLocation::Etcd(_) => {
            let token = join::ensure_peer_token(store.as_ref())
                .await
                .context("creating the servers' peer token")?;
            Some(peers::Peers::new(store.clone(), cfg.node_id.clone(), token))
        }
    };
    let parts = ApiParts {
        store: store.clone(),
        logs: logs.clone(),
        token,
        telemetry: telemetry.clone(),
        edge_feed,
        peers,
    };
    let (socket, bound) = serve_api(&cfg, &parts, &mut tasks, &stop_rx).await?;
    let info = ServerInfo {
        pid: std::process::id(),
        socket,
        tcp: bound.clone(),
        node: cfg.node_id.clone(),
    };
    // Only the elected leader runs the controller (and the scheduler).
    {
        let me = leader::LeaderRecord {
            node: cfg.node_id.clone(),
            api: bound.clone(),
            pid: std::process::id(),
            since: 0,
        };
        tasks.spawn(servers::advertise(
            store.clone(),
            me.clone(),
            stop_rx.clone(),
        ));
        spawn_campaign(&cfg.store, &store, me, leader_tx, &stop_rx, &mut tasks)?;
        let store = store.clone();
        let logs = logs.clone();
        let reschedule_after_ms =
            u64::try_from(cfg.reschedule_after.as_millis()).unwrap_or(u64::MAX);
        let watch_lag = telemetry.watch_lag();
        tasks.spawn(leader::while_leader(
            leader_rx.clone(),
            stop_rx.clone(),
            move |token, stop| {
                controller::run(
                    store.clone(),
                    stop,
                    Some(logs.clone()),
                    controller::Settings {
                        fence: Some(token),
                        reschedule_after_ms,
                        watch_lag: Some(watch_lag.clone()),
                    },
                )
            },
        ));
    }
    // Before saying "ready": the event observer has its baseline (what it
    // lists first produces no events), and alone on its store this server
    // has won the election (it wins at once), so the first deploy's events
    // are recorded.
    let _ = tokio::time::timeout(leader::TTL, observed.changed()).await;
    if matches!(cfg.store, StoreLocation::Embedded) {
        let mut leadership = leader_rx.clone();
        let _ = tokio::time::timeout(leader::TTL, leadership.wait_for(Option::is_some)).await;
    }
    write_info(&cfg.data_dir, &info)?;
    tracing::info!(data_dir = %cfg.data_dir.display(), api = ?bound, "berth server ready");

    let result = run_until(shutdown, tasks, &stop_tx).await;
    if cfg.run_agent
        && let Ok(Some(kv)) = store.get(&keys::node(&cfg.node_id)).await
        && kv.lease != 0
    {
        let _ = store.lease_revoke(kv.lease).await;
    }
    let _ = fs::remove_file(cfg.data_dir.join("server.json"));
    result
}

/// The store `cfg` names: the embedded file in the data dir, or etcd.
async fn open_store(cfg: &ServerConfig) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match &cfg.store {
        StoreLocation::Embedded => Arc::new(
            EmbeddedStore::open(&cfg.data_dir.join("state.redb"))
                .with_context(|| format!("opening the store in {}", cfg.data_dir.display()))?,
        ),
        StoreLocation::Etcd(etcd) => Arc::new(
            berth_store::etcd::EtcdStore::connect((**etcd).clone())
                .await
                .context("connecting to etcd")?,
        ),
    })
}

/// What every API listener serves from.
struct ApiParts {
    store: Arc<dyn Store>,
    logs: berth_agent::logs::LogStore,
    /// The admin token (required on non-loopback listeners).
    token: String,
    telemetry: metrics::Telemetry,
    edge_feed: edge::EdgeFeed,
    /// The other servers (a shared store only).
    peers: Option<peers::Peers>,
}

/// The router, with the other servers to ask when there can be any.
fn with_peers(router: axum::Router, parts: &ApiParts) -> axum::Router {
    match &parts.peers {
        Some(p) => router.layer(axum::Extension(p.clone())),
        None => router,
    }
}

/// Bind and serve the API: the Unix socket, every `--listen` address (with
/// the dashboard), and the Consul subset on `--consul-listen`. Returns the
/// socket's path and the bound TCP addresses.
async fn serve_api(
    cfg: &ServerConfig,
    parts: &ApiParts,
    tasks: &mut JoinSet<anyhow::Result<()>>,
    stop_rx: &watch::Receiver<bool>,
) -> anyhow::Result<(PathBuf, Vec<SocketAddr>)> {
    let ctx = |token: Option<String>| api::ApiContext {
        store: parts.store.clone(),
        logs: parts.logs.clone(),
        data_dir: cfg.data_dir.clone(),
        node_id: cfg.node_id.clone(),
        token,
    };
    let socket = cfg.data_dir.join(SOCKET_NAME);
    {
        let router = with_peers(
            api::router(ctx(None))
                .layer(axum::Extension(parts.telemetry.clone()))
                .layer(axum::Extension(parts.edge_feed.clone())),
            parts,
        );
        let socket = socket.clone();
        let rx = stop_rx.clone();
        tasks.spawn(async move {
            api::serve_unix(&socket, router, stopped(rx))
                .await
                .context("API socket")
        });
    }
    let mut bound = Vec::new();
    for addr in &cfg.listen {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!(
                "binding the API to {addr} (is another server using it? pick another with --listen)"
            )
        })?;
        let local = listener.local_addr()?;
        bound.push(local);
        // Only loopback listeners are open without the token.
        let need_token = (!addr.ip().is_loopback()).then(|| parts.token.clone());
        let guard = ui::Guard {
            token: parts.token.clone(),
            loopback: addr.ip().is_loopback(),
            auth: cfg.dashboard_auth,
        };
        let router = ui::with_dashboard(
            with_peers(
                api::router(ctx(need_token))
                    .layer(axum::Extension(parts.telemetry.clone()))
                    .layer(axum::Extension(parts.edge_feed.clone())),
                parts,
            ),
            guard,
        );
        let rx = stop_rx.clone();
        tasks.spawn(async move {
            api::serve_tcp(listener, router, stopped(rx))
                .await
                .context("API listener")
        });
    }
    if let Some(addr) = cfg.consul {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!(
                "binding the Consul API to {addr} (is Consul running? pick another with --consul-listen)"
            )
        })?;
        let need_token = (!addr.ip().is_loopback()).then(|| parts.token.clone());
        let router = api::consul_router(ctx(need_token));
        tracing::info!(addr = %listener.local_addr().unwrap_or(addr), "Consul API listening");
        let rx = stop_rx.clone();
        tasks.spawn(async move {
            api::serve_tcp(listener, router, stopped(rx))
                .await
                .context("Consul API listener")
        });
    }
    Ok((socket, bound))
}

/// Wait for `shutdown` or the first task to fail, then stop every task and
/// wait for them all. The first failure is the result.
async fn run_until(
    shutdown: impl std::future::Future<Output = ()>,
    mut tasks: JoinSet<anyhow::Result<()>>,
    stop_tx: &watch::Sender<bool>,
) -> anyhow::Result<()> {
    let failure = tokio::select! {
        _ = shutdown => None,
        Some(res) = tasks.join_next() => Some(flatten(res)),
    };
    let _ = stop_tx.send(true);
    let mut result = match failure {
        Some(Err(e)) => Err(e),
        _ => Ok(()),
    };
    while let Some(res) = tasks.join_next().await {
        if let Err(e) = flatten(res) {
            tracing::error!(error = %e, "task failed during shutdown");
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    result
}

/// Campaign for leadership on a thread of its own (a current-thread
/// runtime) and, on etcd, over a connection of its own. A controller pass
/// over a few hundred instances keeps the server's runtime busy (planning,
/// encoding, committing in chunks) for longer than the renewal period; a
/// keep-alive queued behind it made the leader step down in the middle of
/// that very work, and the next leader started it over.
fn spawn_campaign(
    location: &StoreLocation,
    store: &Arc<dyn Store>,
    me: leader::LeaderRecord,
    leader_tx: watch::Sender<Option<berth_store::Revision>>,
    stop_rx: &watch::Receiver<bool>,
    tasks: &mut JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let etcd = match location {
        StoreLocation::Etcd(cfg) => Some((**cfg).clone()),
        StoreLocation::Embedded => None,
    };
    let shared = store.clone();
    let stop = stop_rx.clone();
    let thread = std::thread::Builder::new()
        .name("berth-leader".into())
        .spawn(move || -> anyhow::Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the leader election's runtime")?;
            rt.block_on(async move {
                let store: Arc<dyn Store> = match etcd {
                    Some(cfg) => Arc::new(
                        berth_store::etcd::EtcdStore::connect(cfg)
                            .await
                            .context("connecting to etcd for the leader election")?,
                    ),
                    // One process owns the embedded store.
                    None => shared,
                };
                leader::campaign(store, me, leader::TTL, leader_tx, stop).await
            })
        })
        .context("starting the leader election's thread")?;
    tasks.spawn(async move {
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .context("leader election thread")?
            .map_err(|_| anyhow::anyhow!("the leader election thread panicked"))?
    });
    Ok(())
}

/// Register this server's own node (on a lease: if the server dies, the
/// node record expires and, in a fleet, its work is rescheduled) and run
/// its agent straight on the store.
async fn start_local_agent(
    cfg: &ServerConfig,
    store: &Arc<dyn Store>,
    logs: &berth_agent::LogStore,
    tasks: &mut JoinSet<anyhow::Result<()>>,
    stop_rx: &watch::Receiver<bool>,
    (container_stats, health_stats): (
        berth_agent::driver::docker::StatsMap,
        berth_agent::health::HealthStatsMap,
    ),
    local_statuses: &berth_agent::local::LocalStatuses,
) -> anyhow::Result<()> {
    let lease = store.lease_grant(join::NODE_TTL).await?;
    let node = Node {
        id: cfg.node_id.clone(),
        address: cfg.advertise.to_string(),
        labels: Default::default(),
        facts: own_facts(&cfg.data_dir),
        // Merged in from the drain mark by `join::put_record`, so `berth
        // node drain` survives a server restart.
        draining: false,
        updated_at: now_ms(),
    };
    join::put_record(store.as_ref(), node.clone(), lease, |_| Ok(vec![])).await?;
    // Shared by the agent's status writes, the facts refresh and the
    // keep-alive, which moves all of them to a new lease if this one expires.
    let control = Arc::new(berth_agent::StoreControlPlane::with_lease(
        store.clone(),
        lease,
    ));
    tasks.spawn(keep_lease_alive(
        store.clone(),
        OwnNode {
            node: node.clone(),
            data_dir: cfg.data_dir.clone(),
            control: control.clone(),
            statuses: local_statuses.clone(),
        },
        stop_rx.clone(),
    ));
    tasks.spawn(refresh_own_facts(
        store.clone(),
        cfg.data_dir.clone(),
        node,
        control.clone(),
        cfg.facts_every,
        stop_rx.clone(),
    ));

    let agent_cfg = berth_agent::AgentConfig {
        node_id: cfg.node_id.clone(),
        data_dir: cfg.data_dir.clone(),
        address: cfg.advertise.to_string(),
        logs: cfg.logs.clone(),
    };
    let logs = logs.clone();
    let rx = stop_rx.clone();
    let local_statuses = local_statuses.clone();
    tasks.spawn(async move {
        let options = berth_agent::AgentOptions {
            container_stats,
            health_stats,
            local_statuses: Some(local_statuses),
            ..Default::default()
        };
        berth_agent::run_with(agent_cfg, control, logs, rx, options)
            .await
            .context("agent failed")
    });
    Ok(())
}

/// The facts of this server's own node: the machine's, and
/// `node.role == manager` for constraints.
fn own_facts(data_dir: &Path) -> std::collections::BTreeMap<String, serde_json::Value> {
    let mut facts = berth_agent::facts::collect(data_dir);
    facts.insert(
        join::ROLE_FACT.to_owned(),
        serde_json::Value::from(join::ROLE_MANAGER),
    );
    facts
}

/// Rewrite the server's own node record with fresh facts every `every`,
/// as a joined agent re-registers (`berth agent --facts-every`): load,
/// free memory and disk change, and constraints such as
/// `node.facts.load_1m < 0.25` read them. A failed write is retried at the
/// next tick; the lease keep-alive, not this, decides whether the node
/// is up.
async fn refresh_own_facts(
    store: Arc<dyn Store>,
    data_dir: PathBuf,
    mut node: Node,
    control: Arc<berth_agent::StoreControlPlane>,
    every: Duration,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut stop = std::pin::pin!(stopped(stop));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => return Ok(()),
        }
        let dir = data_dir.clone();
        // /proc, statvfs and a connect to Docker's socket: blocking calls.
        match tokio::task::spawn_blocking(move || own_facts(&dir)).await {
            Ok(facts) => node.facts = facts,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read this node's facts; retrying");
                continue;
            }
        }
        node.updated_at = now_ms();
        let lease = control.lease();
        if let Err(e) = join::put_record(store.as_ref(), node.clone(), lease, |_| Ok(vec![])).await
        {
            tracing::warn!(error = %e, "cannot refresh this node's facts; retrying");
        }
    }
}

/// Write a secret file readable only by its owner.
fn write_private(path: &Path, content: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, format!("{content}\n"))
        .and_then(|()| fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)))
        .and_then(|()| fs::rename(&tmp, path))
        .with_context(|| format!("writing {}", path.display()))
}

fn flatten(res: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    res.map_err(|e| anyhow::anyhow!("task panicked: {e}"))?
}

/// Resolves once `rx` turns true (or its sender is gone).
pub async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn keep_lease_alive(
    store: Arc<dyn Store>,
    own: OwnNode,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(3));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stop = std::pin::pin!(stopped(stop));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => return Ok(()),
        }
        let lease = own.control.lease();
        match store.lease_keep_alive(lease).await {
            Ok(()) => {}
            Err(StoreError::LeaseNotFound(_)) => {
                tracing::warn!(
                    lease,
                    "this server's node lease expired (the store was slow or unreachable for \
                     longer than its TTL); registering the node again"
                );
                match own.register_again(store.as_ref()).await {
                    Ok(lease) => tracing::info!(lease, "this server's node registered again"),
                    Err(e) => tracing::warn!(
                        error = %e,
                        "cannot register this server's node again; retrying"
                    ),
                }
            }
            // The store is slow or unreachable: the next tick tries again;
            // if the lease expires meanwhile, the node registers again then.
            Err(e) => tracing::warn!(error = %e, lease, "node lease keep-alive failed; retrying"),
        }
    }
}

/// What lives on the server's own node lease, to write again on a new one.
struct OwnNode {
    node: Node,
    data_dir: PathBuf,
    control: Arc<berth_agent::StoreControlPlane>,
    statuses: berth_agent::local::LocalStatuses,
}

impl OwnNode {
    /// After the node lease expired (and the node record and the local
    /// agent's statuses with it), as a joined agent registers again: a new
    /// lease, the node record with fresh facts (and its drain mark), then
    /// every status the local agent last gave for an instance it still
    /// runs. The agent writes later statuses on the new lease. Returns the
    /// new lease.
    async fn register_again(&self, store: &dyn Store) -> anyhow::Result<berth_store::LeaseId> {
        let lease = store.lease_grant(join::NODE_TTL).await?;
        let dir = self.data_dir.clone();
        let mut node = self.node.clone();
        if let Ok(facts) = tokio::task::spawn_blocking(move || own_facts(&dir)).await {
            node.facts = facts;
        }
        node.updated_at = now_ms();
        if let Err(e) = join::put_record(store, node, lease, |_| Ok(vec![])).await {
            // The next tick finds the old lease still gone and tries again.
            let _ = store.lease_revoke(lease).await;
            return Err(e.into());
        }
        self.control.set_lease(lease);
        // A status the agent publishes while these are written could be
        // overwritten by the older copy: write again until nothing changed
        // in between (the agent writes each change after publishing it).
        let mut latest = self.statuses.subscribe();
        for _ in 0..5 {
            let statuses: Vec<berth_model::InstanceStatus> = latest
                .borrow_and_update()
                .values()
                .filter(|s| s.forgotten.is_none())
                .map(|s| s.status.clone())
                .collect();
            berth_agent::ControlPlane::report_many(self.control.as_ref(), &statuses).await?;
            if !latest.has_changed().unwrap_or(false) {
                break;
            }
        }
        Ok(lease)
    }
}

/// One server per data dir: a second one would fight over the instances.
fn lock_data_dir(dir: &Path) -> anyhow::Result<nix::fcntl::Flock<fs::File>> {
    let path = dir.join("server.lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|_| {
        anyhow::anyhow!(
            "another berth server is already running with data dir {} (stop it, or use another --data-dir)",
            dir.display()
        )
    })
}

fn write_info(dir: &Path, info: &ServerInfo) -> anyhow::Result<()> {
    let path = dir.join("server.json");
    let tmp = dir.join("server.json.tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(info)?)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
    fs::rename(&tmp, &path)?;
    Ok(())
}

#[cfg(test)]
mod own_node_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

    use super::*;
    use berth_agent::ControlPlane;
    use berth_agent::local::LocalStatuses;
    use berth_model::{InstanceKey, InstanceStatus};
    use berth_store::WatchEvent;
    use futures::StreamExt;

    /// The server's own node lease expires (what etcd does when the server
    /// could not renew it within the TTL: a slow or failing etcd). The
    /// server used to exit with `lease … not found`; now its node comes
    /// back on a new lease, with the statuses of the instances its agent
    /// runs (not those it forgot), later statuses go on the new lease, and
    /// the keep-alive goes on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_expired_own_node_lease_registers_the_node_again() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let node = Node {
            id: "own".into(),
            address: "127.0.0.1".into(),
            labels: Default::default(),
            facts: Default::default(),
            draining: false,
            updated_at: 0,
        };
        let old = store.lease_grant(join::NODE_TTL).await.unwrap();
        join::put_record(store.as_ref(), node.clone(), old, |_| Ok(vec![]))
            .await
            .unwrap();
        let control = Arc::new(berth_agent::StoreControlPlane::with_lease(
            store.clone(),
            old,
        ));
        let statuses = LocalStatuses::new();
        let running = InstanceStatus::new(
            InstanceKey::new("default", "shop", "web", 1),
            "u1",
            "own",
            1,
            0,
        );
        let forgotten = InstanceStatus::new(
            InstanceKey::new("default", "shop", "web", 2),
            "u2",
            "own",
            1,
            0,
        );
        for s in [&running, &forgotten] {
            statuses.publish(s);
            control.report(s).await.unwrap();
        }
        control.forget(&forgotten.key, 0).await.unwrap();
        statuses.forget(&forgotten.key);

        let (stop_tx, stop_rx) = watch::channel(false);
        let own = OwnNode {
            node,
            data_dir: dir.path().to_owned(),
            control: control.clone(),
            statuses,
        };
        let task = tokio::spawn(keep_lease_alive(store.clone(), own, stop_rx));
        let mut events = store.watch("/", 0).await.unwrap();
        store.lease_revoke(old).await.unwrap();
        assert!(store.get(&keys::node("own")).await.unwrap().is_none());

        let status_key = keys::status(&running.key);
        let (mut node_back, mut status_back) = (None, None);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while node_back.is_none() || status_back.is_none() {
            let batch = tokio::time::timeout_at(deadline, events.next())
                .await
                .expect("the node and its status did not come back within 30 s")
                .expect("watch ended")
                .unwrap();
            for event in batch {
                if let WatchEvent::Put(kv) = event {
                    if kv.key == keys::node("own") {
                        node_back = Some(kv.lease);
                    } else if kv.key == status_key {
                        status_back = Some(kv.lease);
                    }
                }
            }
        }
        let new = node_back.unwrap();
        assert_ne!(new, old, "the node came back on the expired lease");
        assert_eq!(status_back, Some(new), "the status is on another lease");
        assert_eq!(control.lease(), new);
        assert!(
            store
                .get(&keys::status(&forgotten.key))
                .await
                .unwrap()
                .is_none(),
            "a forgotten instance's status was written again"
        );
        let record: Node =
            berth_store::decode(&store.get(&keys::node("own")).await.unwrap().unwrap()).unwrap();
        assert!(!record.facts.is_empty(), "registered again without facts");

        // Later statuses go on the new lease, which is kept alive.
        control.report(&running).await.unwrap();
        assert_eq!(store.get(&status_key).await.unwrap().unwrap().lease, new);
        store.lease_keep_alive(new).await.unwrap();
        assert!(!task.is_finished(), "the keep-alive ended: {task:?}");
        stop_tx.send(true).unwrap();
        task.await.unwrap().unwrap();
    }
}
