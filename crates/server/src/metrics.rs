//! Metrics: what `GET /metrics` exports (Prometheus/OpenMetrics text, with
//! the `prometheus-client` crate), and the [`Telemetry`] bundle the API
//! reaches metrics, history and events through.
//!
//! # Sources
//! - Store: every operation of the server's store is timed by
//!   [`MeteredStore`], a decorator around the real store.
//! - Loops: [`reconcile_pass`] is called by [`crate::mirror::follow`]
//!   after every pass of every follower (controller, catalog, traffic,
//!   event observer), with its duration and outcome.
//! - Watch lag (`berth_watch_lag_seconds{watcher,node}`): how long after a
//!   store write a follower had handled it, per follower. [`MeteredStore`]
//!   notes when it *sent* each write that certainly made a new revision (a
//!   put, or a transaction that ran a put), in a [`CommitClock`] of the
//!   last [`COMMIT_CLOCK_CAPACITY`] revisions; [`crate::mirror::follow`]
//!   reports the revisions of each burst once the pass that applied them
//!   has returned ([`WatchLag::handled`]). Counting from the send rather
//!   than the commit (which the store does not timestamp) includes the
//!   commit itself, so each figure is an **upper bound** of commit →
//!   handled. Only revisions this server wrote are measured (with several
//!   servers on one etcd, each measures its own writes; deletes and lease
//!   expiries, which may change nothing or happen inside the store, are
//!   not counted), and a follower more than the clock's capacity behind
//!   goes unmeasured until it catches up.
//! - Instances: the statuses the event observer publishes
//!   ([`crate::events::Live`]) for state, health and restarts; CPU and
//!   memory from `/proc` for processes ([`berth_agent::metrics_proc`]) and
//!   from the Docker driver's [`StatsMap`] for containers, read at scrape
//!   time. Instances on joined nodes: the latest report each agent sent
//!   ([`berth_model::api::NodeStats`], under [`keys::NODE_STATS`] on the
//!   node's lease), which [`Telemetry::follow_node_stats`] keeps in memory
//!   on every server.
//! - Who exports what: a server exports its own node's instances, and the
//!   leader also those of joined nodes (nodes with a stats report), so
//!   with several servers scraped each series comes from one of them. The
//!   built-in history holds every node's instances on every server (each
//!   dashboard shows the whole cluster).
//! - Router and DNS: their own counters ([`berth_net::http::Router::metrics`],
//!   [`berth_net::dns::DnsMetrics`]), registered once they listen, read
//!   through [`EdgeMeters`] like a joined agent reads its own. Joined
//!   nodes' routers and DNS servers: the [`EdgeStats`] in their stats
//!   reports, exported (by the leader, as their instances) with the node's
//!   label; every router and DNS series carries `node`.
//!
//! Every instance series has the labels `namespace`, `stack`, `service`,
//! `instance` (`web.2`) and `node`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use berth_agent::driver::docker::StatsMap;
use berth_agent::edge::EdgeMeters;
use berth_agent::health::HealthStatsMap;
use berth_model::api::{
    DnsStats, EdgeStats, InstanceUsage, NodeStats, RouteStats, RouterServiceStats, RouterStats,
};
use berth_model::edge::ServiceRef;
use berth_model::{EventKind, InstanceKey, InstanceState, InstanceStatus, keys};
use berth_store::{
    LeaseId, Revision, Store, StoreError, Txn, TxnResult, WatchEvent, WatchStream, decode,
};
use bytes::Bytes;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::events::{EventLog, Live};
use crate::history::{History, InstanceSample};
use berth_agent::metrics_proc;

/// The content type of `GET /metrics`.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub use berth_model::api::Usage;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoopLabels {
    follower: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LagLabels {
    watcher: &'static str,
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs … ~3.3 s.
    Histogram::new(exponential_buckets(0.000_05, 4.0, 9))
}

fn lag_histogram() -> Histogram {
    // 100 µs … ~18 s: a follower stuck behind a slow pass shows up.
    Histogram::new(exponential_buckets(0.000_1, 3.0, 12))
}

/// How many recent revisions a [`CommitClock`] remembers.
pub const COMMIT_CLOCK_CAPACITY: usize = 4096;

/// When this server sent the writes behind recent store revisions (see
/// the module docs: the start of each watch-lag measurement).
#[derive(Debug, Default)]
pub struct CommitClock(Mutex<BTreeMap<Revision, Instant>>);

impl CommitClock {
    fn sent(&self, revision: Revision, at: Instant) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Keep the earliest send: the bound must stay an upper bound.
        m.entry(revision).or_insert(at);
        while m.len() > COMMIT_CLOCK_CAPACITY {
            m.pop_first();
        }
    }

    fn get(&self, revision: Revision) -> Option<Instant> {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&revision).copied()
    }
}

/// Measures the watch lag of one server's state followers; given to
/// [`crate::mirror::follow`]. Cheap to clone.
#[derive(Clone)]
pub struct WatchLag {
    clock: Arc<CommitClock>,
    node: String,
    lag: HistogramFamily<LagLabels>,
}

impl std::fmt::Debug for WatchLag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchLag")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl WatchLag {
    /// `watcher` (a follower's type name) has handled these revisions now.
    pub fn handled(&self, watcher: &'static str, revisions: &[Revision]) {
        let now = Instant::now();
        let labels = LagLabels {
            watcher: watcher.rsplit("::").next().unwrap_or(watcher),
            node: self.node.clone(),
        };
        for rev in revisions {
            if let Some(sent) = self.clock.get(*rev) {
                self.lag
                    .get_or_create(&labels)
                    .observe(now.saturating_duration_since(sent).as_secs_f64());
            }
        }
    }
}

/// Process-wide counters of loops that have no handle to a [`Telemetry`].
struct Global {
    passes: HistogramFamily<LoopLabels>,
    pass_errors: Family<LoopLabels, Counter>,
    events: Family<KindLabels, Counter>,
}

static GLOBAL: LazyLock<Global> = LazyLock::new(|| Global {
    passes: Family::new_with_constructor(latency_histogram),
    pass_errors: Family::default(),
    events: Family::default(),
});

/// Record one pass of a mirror follower (called by
/// [`crate::mirror::follow`]); `follower` is its type name.
pub fn reconcile_pass(follower: &'static str, took: Duration, ok: bool) {
    let labels = LoopLabels {
        follower: follower.rsplit("::").next().unwrap_or(follower),
    };
    GLOBAL
        .passes
        .get_or_create(&labels)
        .observe(took.as_secs_f64());
    // Created at the first pass, so every loop shows a 0 until it fails.
    let errors = GLOBAL.pass_errors.get_or_create(&labels);
    if !ok {
        errors.inc();
    }
}

/// Count one recorded event.
pub(crate) fn event_recorded(kind: EventKind) {
    GLOBAL
        .events
        .get_or_create(&KindLabels {
            kind: kind.as_str(),
        })
        .inc();
}

/// Timing of the operations of one store.
#[derive(Clone)]
struct StoreMetrics {
    latency: HistogramFamily<OpLabels>,
    errors: Family<OpLabels, Counter>,
    watch_batches: Counter,
    clock: Arc<CommitClock>,
    lag: HistogramFamily<LagLabels>,
}

impl StoreMetrics {
    fn new() -> Self {
        Self {
            latency: Family::new_with_constructor(latency_histogram),
            errors: Family::default(),
            watch_batches: Counter::default(),
            clock: Arc::default(),
            lag: Family::new_with_constructor(lag_histogram),
        }
    }

    fn observe<T>(&self, op: &'static str, started: Instant, res: &Result<T, StoreError>) {
        let l = OpLabels { op };
        self.latency
            .get_or_create(&l)
            .observe(started.elapsed().as_secs_f64());
        // Created at the first operation, so a 0 shows until one fails.
        let errors = self.errors.get_or_create(&l);
        if res.is_err() {
            errors.inc();
        }
    }
}

/// A [`Store`] that times every operation of the store it wraps.
pub struct MeteredStore {
    inner: Arc<dyn Store>,
    metrics: StoreMetrics,
}

macro_rules! timed {
    ($self:ident, $op:literal, $call:expr) => {{
        let started = Instant::now();
        let res = $call.await;
        $self.metrics.observe($op, started, &res);
        res
    }};
}

#[async_trait]
impl Store for MeteredStore {
    async fn get(&self, key: &str) -> berth_store::Result<Option<berth_store::KeyValue>> {
        timed!(self, "get", self.inner.get(key))
    }
    async fn range(
        &self,
        prefix: &str,
    ) -> berth_store::Result<(Vec<berth_store::KeyValue>, Revision)> {
        timed!(self, "range", self.inner.range(prefix))
    }
    async fn put(&self, key: &str, value: Bytes, lease: LeaseId) -> berth_store::Result<Revision> {
        let sent = Instant::now();
        let res = timed!(self, "put", self.inner.put(key, value, lease));
        if let Ok(rev) = &res {
            self.metrics.clock.sent(*rev, sent);
        }
        res
    }
    async fn delete(&self, key: &str) -> berth_store::Result<Revision> {
        timed!(self, "delete", self.inner.delete(key))
    }
    async fn txn(&self, txn: Txn) -> berth_store::Result<TxnResult> {
        let puts = |ops: &[berth_store::Op]| {
            ops.iter()
                .any(|op| matches!(op, berth_store::Op::Put { .. }))
        };
        let (on_success, on_failure) = (puts(&txn.success), puts(&txn.failure));
        let sent = Instant::now();
        let res = timed!(self, "txn", self.inner.txn(txn));
        if let Ok(r) = &res
            && (if r.succeeded { on_success } else { on_failure })
        {
            self.metrics.clock.sent(r.revision, sent);
        }
        res
    }
    async fn watch(&self, prefix: &str, from: Revision) -> berth_store::Result<WatchStream> {
        use futures::StreamExt;
        let stream = timed!(self, "watch", self.inner.watch(prefix, from))?;
        let batches = self.metrics.watch_batches.clone();
        Ok(stream
            .inspect(move |_| {
                batches.inc();
            })
            .boxed())
    }
    async fn revision(&self) -> berth_store::Result<Revision> {
        timed!(self, "revision", self.inner.revision())
    }
    async fn lease_grant(&self, ttl: Duration) -> berth_store::Result<LeaseId> {
        timed!(self, "lease_grant", self.inner.lease_grant(ttl))
    }
    async fn lease_keep_alive(&self, lease: LeaseId) -> berth_store::Result<()> {
        timed!(self, "lease_keep_alive", self.inner.lease_keep_alive(lease))
    }
    async fn lease_revoke(&self, lease: LeaseId) -> berth_store::Result<()> {
        timed!(self, "lease_revoke", self.inner.lease_revoke(lease))
    }
    async fn compact(&self, revision: Revision) -> berth_store::Result<()> {
        timed!(self, "compact", self.inner.compact(revision))
    }
}

/// What the instance, router and DNS collectors read at scrape time.
struct Sources {
    node: String,
    live: watch::Receiver<Arc<Live>>,
    /// The latest stats report of each joined node.
    remote: std::sync::RwLock<Arc<BTreeMap<String, NodeStats>>>,
    leadership: crate::leader::Leadership,
    containers: StatsMap,
    health: HealthStatsMap,
    router: OnceLock<berth_net::http::Router>,
    dns: OnceLock<berth_net::dns::DnsMetrics>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources")
            .field("node", &self.node)
            .field("router", &self.router.get().is_some())
            .field("dns", &self.dns.get().is_some())
            .finish_non_exhaustive()
    }
}

/// Metrics, history and events of one server. Cheap to clone.
#[derive(Clone)]
pub struct Telemetry(Arc<Inner>);

struct Inner {
    registry: Registry,
    watch_lag: WatchLag,
    sources: Arc<Sources>,
    history: Arc<History>,
    events: Arc<EventLog>,
    store: Arc<dyn Store>,
}

impl Telemetry {
    /// Wrap `store` so its operations are timed; the returned store is the
    /// one the server should use everywhere.
    pub fn metered_store(store: Arc<dyn Store>) -> (Arc<dyn Store>, StoreMetricsHandle) {
        let metrics = StoreMetrics::new();
        let handle = StoreMetricsHandle(metrics.clone());
        (
            Arc::new(MeteredStore {
                inner: store,
                metrics,
            }),
            handle,
        )
    }

    /// The bundle for one server. The stats maps are the local agent's
    /// (containers' engine samples, health-check figures), read at scrape
    /// time; `leadership` says whether joined nodes' series are exported
    /// here.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node: String,
        store: Arc<dyn Store>,
        store_metrics: StoreMetricsHandle,
        events: Arc<EventLog>,
        (live, leadership): (watch::Receiver<Arc<Live>>, crate::leader::Leadership),
        (containers, health): (StatsMap, HealthStatsMap),
        history_interval: Duration,
    ) -> Self {
        let watch_lag = WatchLag {
            clock: store_metrics.0.clock.clone(),
            node: node.clone(),
            lag: store_metrics.0.lag.clone(),
        };
        let sources = Arc::new(Sources {
            node,
            live,
            remote: Default::default(),
            leadership,
            containers,
            health,
            router: OnceLock::new(),
            dns: OnceLock::new(),
        });
        let mut registry = Registry::default();
        let b = registry.sub_registry_with_prefix("berth");
        let sm = store_metrics.0;
        b.register(
            "store_operation_seconds",
            "Latency of store operations, by operation",
            sm.latency,
        );
        b.register(
            "store_operation_errors",
            "Store operations that failed, by operation",
            sm.errors,
        );
        b.register(
            "store_watch_batches",
            "Watch batches (one per store revision) delivered to the server's watches",
            sm.watch_batches,
        );
        b.register(
            "watch_lag_seconds",
            "Time from sending a store write to a state follower having handled it, by follower \
             (an upper bound of commit-to-handled; only revisions this server wrote)",
            sm.lag,
        );
        b.register(
            "reconcile_pass_seconds",
            "Duration of one pass of a state-following loop (controller, catalog, traffic, events), by loop",
            GLOBAL.passes.clone(),
        );
        b.register(
            "reconcile_pass_errors",
            "Passes of a state-following loop that failed, by loop",
            GLOBAL.pass_errors.clone(),
        );
        b.register(
            "events",
            "Events recorded in the event log, by kind",
            GLOBAL.events.clone(),
        );
        registry.register_collector(Box::new(ScrapeCollector(sources.clone())));
        Self(Arc::new(Inner {
            registry,
            watch_lag,
            sources,
            history: Arc::new(History::new(history_interval)),
            events,
            store,
        }))
    }

    /// The watch-lag recorder for [`crate::mirror::follow`].
    pub fn watch_lag(&self) -> WatchLag {
        self.0.watch_lag.clone()
    }

    /// Export the router's counters (once it listens).
    pub fn set_router(&self, router: berth_net::http::Router) {
        let _ = self.0.sources.router.set(router);
    }

    /// Export the DNS server's counters (once it listens).
    pub fn set_dns(&self, dns: berth_net::dns::DnsMetrics) {
        let _ = self.0.sources.dns.set(dns);
    }

    /// The metrics in OpenMetrics text.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.0.registry)?;
        Ok(out)
    }

    /// The in-memory history.
    pub fn history(&self) -> &History {
        &self.0.history
    }

    /// The event log.
    pub fn events(&self) -> &EventLog {
        &self.0.events
    }

    /// The (metered) store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.0.store
    }

    /// Sample every [`crate::history::INTERVAL`] into the history until
    /// `stop` turns true.
    pub async fn sample_history(self, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(self.0.history.interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stop = std::pin::pin!(crate::stopped(stop));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = &mut stop => return Ok(()),
            }
            let sources = self.0.sources.clone();
            let live = sources.live.borrow().clone();
            let remote = sources.remote();
            // /proc reads are blocking file I/O.
            let usage = tokio::task::spawn_blocking({
                let live = live.clone();
                let sources = sources.clone();
                move || local_usage(&live, &sources)
            })
            .await
            .unwrap_or_default();
            let now = crate::now_ms();
            // Every node's instances: the local ones measured now, joined
            // nodes' at their agent's last report (for the CPU rate).
            let samples: Vec<InstanceSample<'_>> = live
                .statuses
                .values()
                .filter_map(|s| {
                    if s.node == sources.node {
                        return Some(InstanceSample {
                            status: s,
                            usage: usage.get(&s.key).copied(),
                            measured_at: now,
                        });
                    }
                    let report = remote.get(&s.node)?;
                    Some(InstanceSample {
                        status: s,
                        usage: reported_usage(report, s),
                        measured_at: report.at,
                    })
                })
                .collect();
            let requests = service_requests(
                sources.edge_meters().stats().as_ref(),
                remote
                    .iter()
                    .filter(|(node, _)| **node != sources.node)
                    .filter_map(|(_, r)| r.edge.as_ref()),
            );
            self.0.history.record(now, &samples, &requests);
        }
    }
}

/// Responses and 5xx per service, summed over every node's router: this
/// server's own (counted now) and joined nodes' (as last reported), so
/// the history's request rates count whichever node's router served. A
/// joined node's counters move only when it reports (every
/// `--stats-every`), and a sum that goes down (a node gone or restarted)
/// skips one point of the rate (see [`History::record`]).
fn service_requests<'a>(
    local: Option<&'a EdgeStats>,
    remote: impl Iterator<Item = &'a EdgeStats>,
) -> HashMap<crate::history::ServiceKey, (u64, u64)> {
    let mut requests: HashMap<_, (u64, u64)> = HashMap::new();
    for router in local
        .into_iter()
        .chain(remote)
        .filter_map(|e| e.router.as_ref())
    {
        for s in &router.services {
            let id = &s.service;
            let sum = requests
                .entry((id.namespace.clone(), id.stack.clone(), id.service.clone()))
                .or_default();
            for r in &s.routes {
                sum.0 += r.requests();
                sum.1 += r.requests_by_class[4];
            }
        }
    }
    requests
}

/// The store timing of a [`MeteredStore`], registered by [`Telemetry::new`].
#[derive(Clone)]
pub struct StoreMetricsHandle(StoreMetrics);

/// CPU and memory of this node's running instances.
fn local_usage(live: &Live, sources: &Sources) -> HashMap<InstanceKey, Usage> {
    let mine = live.statuses.values().filter(|s| s.node == sources.node);
    metrics_proc::instance_usage(mine, &sources.containers)
}

/// What a joined node reported for this run of `s`, if anything.
fn reported<'a>(report: &'a NodeStats, s: &InstanceStatus) -> Option<&'a InstanceUsage> {
    if !matches!(s.state, InstanceState::Running | InstanceState::Stopping) {
        return None;
    }
    report
        .instances
        .iter()
        .find(|i| i.key == s.key && i.uid == s.uid)
}

/// The usage a joined node reported for this run of `s`, if any.
fn reported_usage(report: &NodeStats, s: &InstanceStatus) -> Option<Usage> {
    reported(report, s).map(|i| i.usage)
}

impl Sources {
    /// This server's own router and DNS server, once they listen.
    fn edge_meters(&self) -> EdgeMeters {
        EdgeMeters {
            router: self.router.get().cloned(),
            dns: self.dns.get().cloned(),
        }
    }

    fn remote(&self) -> Arc<BTreeMap<String, NodeStats>> {
        self.remote
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Telemetry {
    /// Keep every joined node's latest stats report in memory (list, then
    /// watch [`keys::NODE_STATS`]; re-list after a broken watch) until
    /// `stop` turns true.
    pub async fn follow_node_stats(self, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        use futures::StreamExt;
        let mut stop = std::pin::pin!(crate::stopped(stop));
        let store = self.0.store.clone();
        let sources = self.0.sources.clone();
        let publish = |m: &BTreeMap<String, NodeStats>| {
            *sources.remote.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(m.clone());
        };
        loop {
            let listed = async {
                let (kvs, rev) = store.range(keys::NODE_STATS).await?;
                let events = store.watch(keys::NODE_STATS, rev + 1).await?;
                Ok::<_, StoreError>((kvs, events))
            };
            let (kvs, mut events) = tokio::select! {
                r = listed => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read node stats; retrying");
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                            () = &mut stop => return Ok(()),
                        }
                    }
                },
                () = &mut stop => return Ok(()),
            };
            let mut reports = BTreeMap::new();
            for kv in &kvs {
                apply_stats(&mut reports, &WatchEvent::Put(kv.clone()));
            }
            publish(&reports);
            loop {
                let batch = tokio::select! {
                    b = events.next() => b,
                    () = &mut stop => return Ok(()),
                };
                match batch {
                    Some(Ok(batch)) => {
                        for e in &batch {
                            apply_stats(&mut reports, e);
                        }
                        publish(&reports);
                    }
                    Some(Err(e)) => {
                        tracing::info!(error = %e, "node stats watch ended; re-listing");
                        break;
                    }
                    None => break,
                }
            }
        }
    }
}

fn apply_stats(reports: &mut BTreeMap<String, NodeStats>, e: &WatchEvent) {
    match e {
        WatchEvent::Put(kv) => {
            let Some(node) = kv.key.strip_prefix(keys::NODE_STATS) else {
                return;
            };
            match decode::<NodeStats>(kv) {
                Ok(r) => {
                    reports.insert(node.to_owned(), r);
                }
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "skipping an unreadable stats report")
                }
            }
        }
        WatchEvent::Delete { key, .. } => {
            if let Some(node) = key.strip_prefix(keys::NODE_STATS) {
                reports.remove(node);
            }
        }
    }
}

/// The metrics computed at scrape time: instances, router, DNS, and the
/// server process itself.
#[derive(Debug)]
struct ScrapeCollector(Arc<Sources>);

type Labels = Vec<(&'static str, String)>;

fn instance_labels(key: &InstanceKey, node: &str) -> Labels {
    vec![
        ("namespace", key.namespace.clone()),
        ("stack", key.stack.clone()),
        ("service", key.service.clone()),
        ("instance", key.short()),
        ("node", node.to_owned()),
    ]
}

fn service_labels(id: &ServiceRef) -> Labels {
    vec![
        ("namespace", id.namespace.clone()),
        ("stack", id.stack.clone()),
        ("service", id.service.clone()),
    ]
}

/// One metric family of constant values.
fn family<M: EncodeMetric>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl IntoIterator<Item = (Labels, M)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in rows {
        v.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

const STATES: [InstanceState; 8] = [
    InstanceState::Pending,
    InstanceState::Starting,
    InstanceState::Running,
    InstanceState::Exited,
    InstanceState::Backoff,
    InstanceState::Failed,
    InstanceState::Stopping,
    InstanceState::Stopped,
];

impl Collector for ScrapeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let src = &self.0;
        let live = src.live.borrow().clone();
        // Joined nodes' instances and edges are exported by the leader only.
        let remote = if src.leadership.borrow().is_some() {
            src.remote()
        } else {
            Arc::default()
        };
        let instances = ScrapedInstances::gather(src, &live, &remote);
        // The families keep the order scrapers have always seen.
        instances.encode_lifecycle(&mut enc)?;
        instances.encode_health_checks(&mut enc)?;
        instances.encode_usage(&mut enc)?;
        instances.encode_last_exit(&mut enc)?;
        encode_own_process(&mut enc)?;
        encode_edges(&mut enc, src, &remote)
    }
}

/// The instances one scrape exports (this node's, and joined nodes' when
/// this server leads), with their usage and health-check figures merged from
/// this node's meters and the other nodes' latest reports.
struct ScrapedInstances<'a> {
    node: &'a str,
    live: &'a Live,
    remote: &'a BTreeMap<String, NodeStats>,
    usage: HashMap<InstanceKey, Usage>,
    health: HashMap<InstanceKey, berth_agent::health::HealthStats>,
}

impl<'a> ScrapedInstances<'a> {
    fn gather(src: &'a Sources, live: &'a Live, remote: &'a BTreeMap<String, NodeStats>) -> Self {
        let mut usage = local_usage(live, src);
        let mut health = src.health.snapshot();
        for s in live.statuses.values() {
            if s.node != src.node
                && let Some(i) = remote.get(&s.node).and_then(|r| reported(r, s))
            {
                usage.insert(s.key.clone(), i.usage);
                if let Some(h) = i.health {
                    health.insert(s.key.clone(), h);
                }
            }
        }
        ScrapedInstances {
            node: &src.node,
            live,
            remote,
            usage,
            health,
        }
    }

    /// This node's instances, and those of joined nodes that have reported
    /// (`remote` is empty on a follower, so each joined node's instances
    /// are exported by one server: the leader).
    fn rows(&self) -> impl Iterator<Item = &'a InstanceStatus> + '_ {
        self.live
            .statuses
            .values()
            .filter(|s| s.node == self.node || self.remote.contains_key(&s.node))
    }

    /// State, health and restarts: known for every instance, probed or not.
    fn encode_lifecycle(&self, enc: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        family(
            enc,
            "berth_instance_state",
            "1 for the instance's current state (pending, starting, running, exited, backoff, failed, stopping, stopped)",
            MetricType::Gauge,
            self.rows().flat_map(|s| {
                STATES.iter().map(move |st| {
                    let mut l = instance_labels(&s.key, &s.node);
                    l.push(("state", st.to_string()));
                    (l, ConstGauge::new(i64::from(s.state == *st)))
                })
            }),
        )?;
        family(
            enc,
            "berth_instance_healthy",
            "1 when the instance's health check passes (or it has none and runs), else 0",
            MetricType::Gauge,
            self.rows().map(|s| {
                let ok = match s.health {
                    berth_model::Health::Healthy => true,
                    berth_model::Health::None => s.state == InstanceState::Running,
                    _ => false,
                };
                (
                    instance_labels(&s.key, &s.node),
                    ConstGauge::new(i64::from(ok)),
                )
            }),
        )?;
        family(
            enc,
            "berth_instance_restarts",
            "Restarts of the instance slot",
            MetricType::Counter,
            self.rows().map(|s| {
                (
                    instance_labels(&s.key, &s.node),
                    ConstCounter::new(u64::from(s.restarts)),
                )
            }),
        )
    }

    /// Probe counts and timing, only for instances whose current
    /// incarnation has been probed.
    fn encode_health_checks(&self, enc: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let probed = || {
            self.rows()
                .filter_map(|s| Some((s, *self.health.get(&s.key)?)))
        };
        family(
            enc,
            "berth_instance_health_checks",
            "Health-check probes run by the instance's current incarnation",
            MetricType::Counter,
            probed().map(|(s, h)| {
                (
                    instance_labels(&s.key, &s.node),
                    ConstCounter::new(h.checks),
                )
            }),
        )?;
        family(
            enc,
            "berth_instance_health_check_failures",
            "Health-check probes that failed (current incarnation)",
            MetricType::Counter,
            probed().map(|(s, h)| {
                (
                    instance_labels(&s.key, &s.node),
                    ConstCounter::new(h.failures),
                )
            }),
        )?;
        family(
            enc,
            "berth_instance_health_check_seconds",
            "Duration of the instance's last health-check probe",
            MetricType::Gauge,
            probed().map(|(s, h)| {
                (
                    instance_labels(&s.key, &s.node),
                    ConstGauge::new(h.last_seconds),
                )
            }),
        )
    }

    /// CPU and memory. Processes and containers are metered differently
    /// (cumulative seconds from /proc vs the engine's percentage over its
    /// interval), so each CPU family holds only the instances it fits.
    fn encode_usage(&self, enc: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        family(
            enc,
            "berth_instance_cpu_seconds",
            "CPU seconds used by the instance's current run (processes: the whole process tree, from /proc)",
            MetricType::Counter,
            self.rows().filter_map(|s| match self.usage.get(&s.key) {
                Some(Usage::Process { cpu_seconds, .. }) => Some((
                    instance_labels(&s.key, &s.node),
                    ConstCounter::new(*cpu_seconds),
                )),
                _ => None,
            }),
        )?;
        family(
            enc,
            "berth_instance_cpu_percent",
            "CPU use of a container over the engine's last stats interval, in percent of one core",
            MetricType::Gauge,
            self.rows().filter_map(|s| match self.usage.get(&s.key) {
                Some(Usage::Container { cpu_percent, .. }) => Some((
                    instance_labels(&s.key, &s.node),
                    ConstGauge::new(*cpu_percent),
                )),
                _ => None,
            }),
        )?;
        family(
            enc,
            "berth_instance_memory_bytes",
            "Resident memory (processes: RSS of the tree; containers: usage without page cache)",
            MetricType::Gauge,
            self.rows().filter_map(|s| {
                let bytes = match self.usage.get(&s.key)? {
                    Usage::Process { rss_bytes, .. } => *rss_bytes,
                    Usage::Container { memory_bytes, .. } => *memory_bytes,
                };
                Some((
                    instance_labels(&s.key, &s.node),
                    ConstGauge::new(bytes as i64),
                ))
            }),
        )
    }

    fn encode_last_exit(&self, enc: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        family(
            enc,
            "berth_instance_last_exit_code",
            "Exit code of the instance slot's last exit (absent when it never exited or was killed by a signal)",
            MetricType::Gauge,
            self.rows().filter_map(|s| {
                let code = s.last_exit.as_ref()?.code?;
                Some((
                    instance_labels(&s.key, &s.node),
                    ConstGauge::new(i64::from(code)),
                ))
            }),
        )
    }
}

/// The berth server process itself (its agent runs inside it).
fn encode_own_process(enc: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
    let me = metrics_proc::own_usage();
    family(
        enc,
        "process_cpu_seconds",
        "CPU seconds used by the berth server process (agent included)",
        MetricType::Counter,
        [(Labels::new(), ConstCounter::new(me.cpu_seconds))],
    )?;
    family(
        enc,
        "process_resident_memory_bytes",
        "Resident memory of the berth server process",
        MetricType::Gauge,
        [(Labels::new(), ConstGauge::new(me.rss_bytes as i64))],
    )
}

/// Every node's edge: this server's own, and (like their instances, from
/// the leader only: `remote` is empty on a follower) joined nodes', as their
/// agents last reported them. A family no node has figures for is left out.
fn encode_edges(
    enc: &mut DescriptorEncoder<'_>,
    src: &Sources,
    remote: &BTreeMap<String, NodeStats>,
) -> Result<(), std::fmt::Error> {
    let local = src.edge_meters().stats();
    let mut edges: Vec<(&str, &EdgeStats)> = Vec::new();
    if let Some(e) = &local {
        edges.push((&src.node, e));
    }
    for (node, report) in remote.iter() {
        if *node != src.node
            && let Some(e) = &report.edge
        {
            edges.push((node, e));
        }
    }
    let routers: Vec<(&str, &RouterStats)> = edges
        .iter()
        .filter_map(|(n, e)| Some((*n, e.router.as_ref()?)))
        .collect();
    if !routers.is_empty() {
        encode_router(enc, &routers)?;
    }
    let dns: Vec<(&str, &DnsStats)> = edges
        .iter()
        .filter_map(|(n, e)| Some((*n, e.dns.as_ref()?)))
        .collect();
    if !dns.is_empty() {
        encode_dns(enc, &dns)?;
    }
    Ok(())
}

/// `labels` with the node's.
fn on_node(mut labels: Labels, node: &str) -> Labels {
    labels.push(("node", node.to_owned()));
    labels
}

fn encode_router(
    enc: &mut DescriptorEncoder<'_>,
    routers: &[(&str, &RouterStats)],
) -> Result<(), std::fmt::Error> {
    const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
    let services = || {
        routers
            .iter()
            .flat_map(|(node, m)| m.services.iter().map(move |s| (*node, s)))
    };
    let routes = || {
        routers.iter().flat_map(|(node, m)| {
            m.services.iter().flat_map(move |s| {
                s.routes
                    .iter()
                    .map(move |r| (*node, &s.service, r, &m.latency_bounds_us))
            })
        })
    };
    let route_labels = |node: &str, id: &ServiceRef, r: &RouteStats| {
        let mut l = service_labels(id);
        l.push(("route", r.route.clone()));
        on_node(l, node)
    };
    family(
        enc,
        "berth_router_requests",
        "Responses of the HTTP router, by route and status class",
        MetricType::Counter,
        routes().flat_map(|(node, id, r, _)| {
            CLASSES.iter().enumerate().map(move |(i, class)| {
                let mut l = route_labels(node, id, r);
                l.push(("code", (*class).to_owned()));
                (l, ConstCounter::new(r.requests_by_class[i]))
            })
        }),
    )?;
    {
        let mut h = enc.encode_descriptor(
            "berth_router_request_seconds",
            "Latency of requests through the HTTP router, by route",
            None,
            MetricType::Histogram,
        )?;
        for (node, id, r, bounds) in routes() {
            // One count per bound, then the slower ones; a report of
            // another shape is not exported rather than misread.
            if r.latency_buckets.len() != bounds.len() + 1 {
                continue;
            }
            let mut buckets: Vec<(f64, u64)> = bounds
                .iter()
                .zip(&r.latency_buckets)
                .map(|(us, n)| (*us as f64 / 1e6, *n))
                .collect();
            buckets.push((
                f64::INFINITY,
                r.latency_buckets.last().copied().unwrap_or(0),
            ));
            h.encode_family(&route_labels(node, id, r))?
                .encode_histogram::<Labels>(
                    r.latency_sum_us as f64 / 1e6,
                    r.requests(),
                    &buckets,
                    None,
                )?;
        }
    }
    let per_service = |n: &str, s: &RouterServiceStats| on_node(service_labels(&s.service), n);
    family(
        enc,
        "berth_router_in_flight_requests",
        "Requests being proxied now, by service",
        MetricType::Gauge,
        services().map(|(n, s)| (per_service(n, s), ConstGauge::new(s.in_flight as i64))),
    )?;
    family(
        enc,
        "berth_router_ejections",
        "Times the circuit breaker ejected an instance of the service",
        MetricType::Counter,
        services().map(|(n, s)| (per_service(n, s), ConstCounter::new(s.ejections))),
    )?;
    family(
        enc,
        "berth_router_ejected_instances",
        "Instances of the service ejected by the circuit breaker now",
        MetricType::Gauge,
        services().map(|(n, s)| {
            (
                per_service(n, s),
                ConstGauge::new(s.instances_ejected as i64),
            )
        }),
    )?;
    family(
        enc,
        "berth_router_retries",
        "Requests re-sent to another instance after a connect failure",
        MetricType::Counter,
        services().map(|(n, s)| (per_service(n, s), ConstCounter::new(s.retries))),
    )?;
    let node = |n: &str| on_node(Labels::new(), n);
    family(
        enc,
        "berth_router_active_connections",
        "Client connections open on the HTTP router",
        MetricType::Gauge,
        routers
            .iter()
            .map(|(n, m)| (node(n), ConstGauge::new(m.connections_active as i64))),
    )?;
    family(
        enc,
        "berth_router_connections",
        "Client connections accepted by the HTTP router",
        MetricType::Counter,
        routers
            .iter()
            .map(|(n, m)| (node(n), ConstCounter::new(m.connections_accepted))),
    )?;
    family(
        enc,
        "berth_router_no_route",
        "Requests answered 404 because no route matched",
        MetricType::Counter,
        routers
            .iter()
            .map(|(n, m)| (node(n), ConstCounter::new(m.no_route))),
    )
}

fn encode_dns(
    enc: &mut DescriptorEncoder<'_>,
    servers: &[(&str, &DnsStats)],
) -> Result<(), std::fmt::Error> {
    // One row per node and label value of a keyed counter.
    let keyed = |label: &'static str, pick: fn(&DnsStats) -> &BTreeMap<String, u64>| {
        servers.iter().flat_map(move |(node, d)| {
            pick(d).iter().map(move |(k, v)| {
                (
                    on_node(vec![(label, k.clone())], node),
                    ConstCounter::new(*v),
                )
            })
        })
    };
    family(
        enc,
        "berth_dns_queries",
        "DNS queries received, by transport",
        MetricType::Counter,
        keyed("transport", |d| &d.queries),
    )?;
    family(
        enc,
        "berth_dns_queries_by_type",
        "DNS queries by question type",
        MetricType::Counter,
        keyed("type", |d| &d.by_type),
    )?;
    family(
        enc,
        "berth_dns_responses",
        "DNS replies by response code",
        MetricType::Counter,
        keyed("rcode", |d| &d.by_rcode),
    )?;
    family(
        enc,
        "berth_dns_truncated",
        "UDP replies cut short with the TC bit",
        MetricType::Counter,
        servers
            .iter()
            .map(|(n, d)| (on_node(Labels::new(), n), ConstCounter::new(d.truncated))),
    )?;
    family(
        enc,
        "berth_dns_dropped",
        "DNS messages dropped unanswered",
        MetricType::Counter,
        servers
            .iter()
            .map(|(n, d)| (on_node(Labels::new(), n), ConstCounter::new(d.dropped))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_store::{Op, embedded::EmbeddedStore};

    /// A router report of one route of `default/shop/web`: 3 × 2xx and
    /// 1 × 5xx, two within 250 µs and two within 1 ms.
    fn edge_report() -> EdgeStats {
        let mut latency_buckets = vec![0; berth_net::http::metrics::LATENCY_BUCKETS_US.len() + 1];
        latency_buckets[0] = 2;
        latency_buckets[2] = 2;
        EdgeStats {
            router: Some(RouterStats {
                connections_accepted: 7,
                connections_active: 1,
                no_route: 2,
                latency_bounds_us: berth_net::http::metrics::LATENCY_BUCKETS_US.to_vec(),
                services: vec![RouterServiceStats {
                    service: ServiceRef {
                        namespace: "default".into(),
                        stack: "shop".into(),
                        service: "web".into(),
                    },
                    in_flight: 0,
                    ejections: 0,
                    instances_ejected: 0,
                    retries: 1,
                    routes: vec![RouteStats {
                        route: "web.shop.localhost/".into(),
                        requests_by_class: [0, 3, 0, 0, 1],
                        latency_buckets,
                        latency_sum_us: 2_000,
                    }],
                }],
            }),
            dns: Some(DnsStats {
                queries: [("udp".to_owned(), 4), ("tcp".to_owned(), 0)].into(),
                by_type: [("SRV".to_owned(), 4)].into(),
                by_rcode: [("NOERROR".to_owned(), 4)].into(),
                truncated: 0,
                dropped: 0,
            }),
        }
    }

    /// A scrape of a server on node `s1` with no router of its own, which
    /// has a report from `n2` with router and DNS counters and one from an
    /// agent that sends no edge counters (`n3`, an older agent).
    async fn scrape_with_reports(leader: bool) -> String {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let (store, handle) = Telemetry::metered_store(store);
        let events = Arc::new(EventLog::open(store.clone(), 10).await.unwrap());
        let (_live_tx, live) = watch::channel(Arc::new(Live::default()));
        let (_lead_tx, leadership) = watch::channel(leader.then_some(1));
        let t = Telemetry::new(
            "s1".into(),
            store,
            handle,
            events,
            (live, leadership),
            Default::default(),
            Duration::from_secs(10),
        );
        let mut reports = BTreeMap::new();
        let with_edge = NodeStats {
            at: 1,
            instances: vec![],
            edge: Some(edge_report()),
        };
        let put = |node: &str, json: Vec<u8>| {
            WatchEvent::Put(berth_store::KeyValue {
                key: keys::node_stats(node),
                value: Bytes::from(json),
                create_revision: 1,
                mod_revision: 1,
                version: 1,
                lease: 0,
            })
        };
        apply_stats(
            &mut reports,
            &put("n2", serde_json::to_vec(&with_edge).unwrap()),
        );
        // What an agent without edge counters sends.
        apply_stats(
            &mut reports,
            &put("n3", br#"{"at":1,"instances":[]}"#.to_vec()),
        );
        assert_eq!(reports.len(), 2, "the older report is accepted");
        assert_eq!(reports["n3"].edge, None);
        *t.0.sources.remote.write().unwrap() = Arc::new(reports);
        t.encode().unwrap()
    }

    #[tokio::test]
    async fn the_leader_exports_joined_nodes_routers_and_dns_with_their_node() {
        let out = scrape_with_reports(true).await;
        let web = r#"namespace="default",stack="shop",service="web",route="web.shop.localhost/",node="n2""#;
        for line in [
            format!(r#"berth_router_requests_total{{{web},code="2xx"}} 3"#),
            format!(r#"berth_router_requests_total{{{web},code="5xx"}} 1"#),
            format!(r#"berth_router_request_seconds_count{{{web}}} 4"#),
            format!(r#"berth_router_request_seconds_bucket{{le="0.00025",{web}}} 2"#),
            format!(r#"berth_router_request_seconds_bucket{{le="0.001",{web}}} 4"#),
            format!(r#"berth_router_request_seconds_bucket{{le="+Inf",{web}}} 4"#),
            r#"berth_router_retries_total{namespace="default",stack="shop",service="web",node="n2"} 1"#.into(),
            r#"berth_router_connections_total{node="n2"} 7"#.into(),
            r#"berth_router_no_route_total{node="n2"} 2"#.into(),
            r#"berth_dns_queries_total{transport="udp",node="n2"} 4"#.into(),
            r#"berth_dns_queries_by_type_total{type="SRV",node="n2"} 4"#.into(),
            r#"berth_dns_responses_total{rcode="NOERROR",node="n2"} 4"#.into(),
        ] {
            assert!(out.lines().any(|l| l == line), "no {line} in:\n{out}");
        }
        assert!(!out.contains(r#"node="n3""#), "{out}");
    }

    #[tokio::test]
    async fn a_follower_leaves_joined_nodes_edges_to_the_leader() {
        let out = scrape_with_reports(false).await;
        assert!(!out.contains("berth_router_"), "{out}");
        assert!(!out.contains("berth_dns_"), "{out}");
    }

    #[test]
    fn history_request_counts_add_every_nodes_router() {
        let local = edge_report();
        let mut other = edge_report();
        other.router.as_mut().unwrap().services[0].routes[0].requests_by_class = [0, 10, 0, 0, 0];
        // A node without a router adds nothing.
        let dns_only = EdgeStats {
            router: None,
            ..edge_report()
        };
        let sums = service_requests(Some(&local), [&other, &dns_only].into_iter());
        let key = ("default".to_owned(), "shop".to_owned(), "web".to_owned());
        assert_eq!(sums[&key], (14, 1));
    }

    #[tokio::test]
    async fn watch_lag_counts_the_revisions_this_server_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let (store, handle) = Telemetry::metered_store(inner.clone());
        let lag = WatchLag {
            clock: handle.0.clock.clone(),
            node: "n1".into(),
            lag: handle.0.lag.clone(),
        };
        let put = store.put("/a", Bytes::from_static(b"1"), 0).await.unwrap();
        let txn = store
            .txn(Txn {
                compare: vec![],
                success: vec![Op::put("/b", "2")],
                failure: vec![],
            })
            .await
            .unwrap();
        // Not ours (written around the metered store), and a delete: not
        // measured.
        let other = inner.put("/c", Bytes::from_static(b"3"), 0).await.unwrap();
        let del = store.delete("/a").await.unwrap();
        lag.handled("controller::Controller", &[put, txn.revision, other, del]);
        let mut registry = Registry::default();
        registry.register("watch_lag_seconds", "lag", handle.0.lag.clone());
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(
            out.contains("watch_lag_seconds_count{watcher=\"Controller\",node=\"n1\"} 2"),
            "{out}"
        );
    }
}
