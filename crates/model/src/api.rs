//! Request and response bodies of berth's HTTP API (`/v1/...`).
//!
//! Shared by the server (which produces them) and the CLI (which consumes
//! them), so both sides agree on field names by construction. The routes and
//! their meaning are documented in the server's OpenAPI description
//! (`GET /v1/openapi.json`); this module only holds the shapes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    DesiredState, ExitInfo, Health, InstanceState, Millis, RolloutStatus, ServiceDesired, Stack,
    StackRecord,
};

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthResponse {
    /// Always true when the server answers.
    pub ok: bool,
    /// berth version of the server.
    pub version: String,
    /// Server process id.
    pub pid: u32,
    /// Id of the node the server's local agent runs as.
    pub node: String,
}

/// Error body of every non-2xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
    /// What to do about it, when there is something to say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// `POST /v1/stacks`: submit a resolved stack as a new release.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitStackRequest {
    /// Namespace to deploy into.
    pub namespace: String,
    /// The resolved stack (the client resolves its files locally).
    pub stack: Stack,
    /// Who submits (defaults to "berth").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// Why (defaults to "up").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Answer to `POST /v1/stacks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitStackResponse {
    /// Namespace.
    pub namespace: String,
    /// Stack name.
    pub stack: String,
    /// The release just created.
    pub release: u64,
}

/// `POST /v1/stacks/{ns}/{stack}/scale`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ScaleRequest {
    /// Service name → wanted replicas.
    pub replicas: BTreeMap<String, u32>,
}

/// `POST /v1/stacks/{ns}/{stack}/stop|start|restart`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ServicesRequest {
    /// Services to act on; empty means every service of the stack.
    #[serde(default)]
    pub services: Vec<String>,
}

/// Answer to scale / stop / start / restart: the stack's desired state after
/// the change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackChangeResponse {
    /// Namespace.
    pub namespace: String,
    /// Stack name.
    pub stack: String,
    /// Current release.
    pub release: u64,
    /// Desired state per service after the change.
    pub services: BTreeMap<String, ServiceDesired>,
}

/// Answer to `DELETE /v1/stacks/{ns}/{stack}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveStackResponse {
    /// Namespace.
    pub namespace: String,
    /// Stack name.
    pub stack: String,
    /// Whether the stack's captured logs were deleted too.
    pub logs_removed: bool,
    /// Named volume directories deleted (only with `volumes=true`).
    #[serde(default)]
    pub volumes_removed: Vec<String>,
}

/// One stack in `GET /v1/stacks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackSummary {
    /// Namespace.
    pub namespace: String,
    /// Stack name.
    pub name: String,
    /// Current release.
    pub release: u64,
    /// Per service: desired and observed counts.
    pub services: BTreeMap<String, ServiceSummary>,
    /// Last change of the desired state.
    pub updated_at: Millis,
}

/// Desired and observed state of one service, for summaries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSummary {
    /// Desired replicas.
    pub replicas: u32,
    /// Stopped on purpose.
    pub stopped: bool,
    /// Instances whose state is `running`.
    pub running: u32,
    /// Running instances that are healthy (or have no health check).
    pub healthy: u32,
}

/// `GET /v1/stacks/{ns}/{stack}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StackDetail {
    /// The desired state.
    pub record: StackRecord,
    /// Its instances, as `GET /v1/instances` shows them.
    pub instances: Vec<Instance>,
}

/// One row of `GET /v1/instances` (and `berth ps`): an assigned slot joined
/// with what its agent last reported.
///
/// A slot that is assigned but not reported yet shows as `pending`; an
/// instance whose assignment is gone (it is being stopped) still shows, with
/// `desired: null`, until its agent removes its status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// Namespace.
    pub namespace: String,
    /// Stack name.
    pub stack: String,
    /// Service name.
    pub service: String,
    /// Short name `service.slot`, e.g. `web.3`.
    pub instance: String,
    /// Replica slot, from 1.
    pub slot: u32,
    /// Incarnation id (the reported one when reported, else the assigned one).
    pub uid: String,
    /// Node it runs (or is to run) on.
    pub node: String,
    /// Release it runs (or is to run).
    pub release: u64,
    /// What the controller wants: `running`, `stopped`, or null when the
    /// assignment is gone.
    pub desired: Option<DesiredState>,
    /// Lifecycle state.
    pub state: InstanceState,
    /// Health.
    pub health: Health,
    /// True when the reported incarnation is the assigned one and the
    /// assignment wants it running: the row describes what was asked for, not
    /// an older copy being replaced.
    pub current: bool,
    /// OS pid.
    pub pid: Option<u32>,
    /// `ip:port` to reach it, when it has a port.
    pub address: Option<String>,
    /// Its port (`PORT`).
    pub port: Option<u16>,
    /// Every declared port of a container published on its node's address
    /// (a node other nodes reach), with the host port it is published on
    /// there: declared → host (the first one's host port is `port`).
    /// Empty otherwise: the instance is reached at its declared ports.
    #[serde(default)]
    pub host_ports: BTreeMap<u16, u16>,
    /// Restarts of this incarnation.
    pub restarts: u32,
    /// How it last ended.
    pub last_exit: Option<ExitInfo>,
    /// When the current process started.
    pub started_at: Option<Millis>,
    /// Seconds since `started_at`, while running.
    pub uptime_s: Option<u64>,
    /// Output of the last health check.
    pub health_output: Option<String>,
    /// Why resource limits could not be applied.
    pub limits_warning: Option<String>,
    /// Why it is in its state.
    pub message: Option<String>,
}

impl Instance {
    /// Running and healthy (or without a health check), and the assigned
    /// incarnation: what `berth up -d` waits for.
    pub fn is_ready(&self) -> bool {
        self.current
            && self.state == InstanceState::Running
            && matches!(self.health, Health::Healthy | Health::None)
    }
}

/// Answer to `POST /v1/stacks/plan` (`berth deploy --dry-run`): what
/// submitting a stack would change, service by service, like `terraform plan`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployPlan {
    /// Namespace.
    pub namespace: String,
    /// Stack name.
    pub stack: String,
    /// The release now current (0 when the stack does not exist yet).
    pub current_release: u64,
    /// The release the submit would create.
    pub next_release: u64,
    /// Every service of either side, by name.
    pub services: Vec<ServicePlan>,
}

impl DeployPlan {
    /// Whether submitting would change anything at all.
    pub fn is_noop(&self) -> bool {
        self.services
            .iter()
            .all(|s| s.action == PlanAction::Unchanged)
    }
}

/// What a deploy does to one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlanAction {
    /// New service: instances are started.
    Add,
    /// Its template changed: instances are replaced by a rolling update.
    Replace,
    /// Only its replica count changed: scaled, nothing restarted.
    Scale,
    /// No longer in the stack: its instances are stopped.
    Remove,
    /// Nothing changes.
    Unchanged,
}

/// One service of a [`DeployPlan`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePlan {
    /// Service name.
    pub service: String,
    /// What happens to it.
    pub action: PlanAction,
    /// The fields that differ (`command`, `environment.FOO`, `deploy.replicas`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<FieldChange>,
    /// Why, and how (e.g. "rolling update, start-first, 1 at a time").
    pub reason: String,
}

/// One changed field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldChange {
    /// Dotted path of the field.
    pub field: String,
    /// Old value as JSON (absent when the field is new).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<serde_json::Value>,
    /// New value as JSON (absent when the field is removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<serde_json::Value>,
}

/// `GET /v1/stacks/{ns}/{stack}/releases`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleasesResponse {
    /// Namespace.
    pub namespace: String,
    /// Stack name.
    pub stack: String,
    /// The current release.
    pub current: u64,
    /// Where the rollout of the current release stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
    /// Every release, oldest first.
    pub releases: Vec<ReleaseSummary>,
}

/// One release in a [`ReleasesResponse`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseSummary {
    /// 1, 2, 3…
    pub version: u64,
    /// When it was created.
    pub created_at: Millis,
    /// Who created it.
    pub author: String,
    /// Why.
    pub message: String,
    /// Whether it is the stack's current release.
    pub current: bool,
    /// Services whose spec differs from the previous release (all for v1).
    #[serde(default)]
    pub services_changed: Vec<String>,
}

/// `POST /v1/stacks/{ns}/{stack}/rollback`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RollbackRequest {
    /// The release whose spec to restore; the previous one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<u64>,
    /// Who asks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
}

/// `POST /v1/stacks/{ns}/{stack}/env`: change config vars (a new release).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EnvRequest {
    /// Only this service; every service when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Variables to set.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Variables to remove.
    #[serde(default)]
    pub unset: Vec<String>,
    /// Who asks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
}

/// One service of `GET /v1/services`: where discovery sends its traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceCatalog {
    /// Namespace.
    pub namespace: String,
    /// Stack.
    pub stack: String,
    /// Service name.
    pub service: String,
    /// Every instance that has an address, healthy or not (`healthy` says
    /// which ones the router, DNS and the Consul API hand out).
    pub instances: Vec<crate::CatalogEntry>,
    /// Router routes, `host` followed by the path prefix (`web.shop.localhost/`).
    pub routes: Vec<String>,
    /// DNS names answering for the service's healthy instances (fully
    /// qualified, with the trailing dot).
    pub dns: Vec<String>,
    /// Published TCP ports (`127.0.0.1:5432`) forwarding to healthy instances.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub published: Vec<String>,
}

/// One target group of `GET /v1/sd/prometheus` (Prometheus `http_sd_configs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrometheusTargetGroup {
    /// `host:port` of each target.
    pub targets: Vec<String>,
    /// Labels of the group (`__meta_berth_*`, dropped after relabelling
    /// unless kept, plus `berth_*` target labels).
    pub labels: BTreeMap<String, String>,
}

/// Whether a node is usable, as `berth nodes` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Its registration is alive and it takes new instances.
    Up,
    /// Alive, but `berth node drain` moves its instances off.
    Draining,
    /// Joined, but its registration expired (agent dead or unreachable).
    Down,
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Up => "up",
            Self::Draining => "draining",
            Self::Down => "down",
        })
    }
}

/// One row of `GET /v1/nodes`: the node record (live, or the last one
/// known for a node that is down) and its state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node as it registered (labels, facts, address).
    #[serde(flatten)]
    pub node: crate::Node,
    /// Up, draining or down.
    pub state: NodeState,
    /// Instances assigned to it.
    #[serde(default)]
    pub instances: usize,
    /// Whether it joined with a credential (false for a server's own node).
    #[serde(default)]
    pub joined: bool,
}

/// `GET /v1/join-token`, `POST /v1/join-token/rotate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenResponse {
    /// The token agents pass to `berth agent --join URL --token T`.
    pub token: String,
}

/// `POST /v1/nodes/{node}/drain|activate`, `DELETE /v1/nodes/{node}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeChangeResponse {
    /// The node.
    pub node: String,
    /// What was done (`draining`, `active`, `removed`).
    pub result: String,
    /// Assignments removed (`rm`) or instances that will move (`drain`).
    #[serde(default)]
    pub instances: usize,
}

/// `POST /v1/agent/join`: exchange the join token for a node credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The node id to join as.
    pub node: String,
    /// The cluster's join token.
    pub token: String,
}

/// Answer to [`JoinRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinResponse {
    /// The node id.
    pub node: String,
    /// The node's secret: sent as `Authorization: Bearer <secret>` on
    /// `/v1/agent/nodes/{node}/…`. The server keeps only its hash.
    pub secret: String,
}

/// `PUT /v1/agent/nodes/{node}`: answer to a registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    /// Time to live of the node's registration without a heartbeat.
    pub ttl_ms: u64,
    /// Whether the node is draining (set by `berth node drain`).
    pub draining: bool,
}

/// `GET /v1/agent/nodes/{node}/servers`: where the node's agent can reach
/// a server (`host:port` of every live server's API), to fail over to when
/// its server stops answering.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerList {
    /// `host:port`, sorted.
    pub servers: Vec<String>,
}

/// `GET /v1/agent/nodes/{node}/assignments`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssignmentList {
    /// The node's assignments.
    pub assignments: Vec<crate::Assignment>,
    /// The store revision the listing is at (watch from the next one).
    pub revision: i64,
}

/// One line of the NDJSON stream of
/// `GET /v1/agent/nodes/{node}/assignments/watch?from=REV`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WatchLine {
    /// An assignment was created or changed at `revision`.
    Upsert {
        /// Revision of the change.
        revision: i64,
        /// The assignment.
        assignment: Box<crate::Assignment>,
    },
    /// An assignment was removed at `revision`.
    Removed {
        /// Revision of the change.
        revision: i64,
        /// The instance.
        key: crate::InstanceKey,
    },
    /// History from the asked revision was compacted: list again.
    Resync,
    /// Nothing happened; sent periodically so a dead connection is noticed.
    Progress,
}

/// `POST /v1/agent/nodes/{node}/logs`: a batch of log lines captured on
/// the node, in capture order per instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogBatch {
    /// The lines, with their capture timestamps.
    pub lines: Vec<crate::LogLine>,
    /// Lines the node dropped (buffer full while the server was slow or
    /// unreachable) since its previous accepted batch.
    #[serde(default)]
    pub dropped: u64,
    /// The shipper's stream: one per run of the agent's log shipper
    /// (0: not given, by agents before it; such a batch is stored as is).
    #[serde(default)]
    pub stream: u64,
    /// Position in `stream` of the first line (the stream numbers its
    /// lines 0, 1, 2, …, and a batch holds consecutive ones). Servers keep
    /// how far each node's stream was stored (under
    /// [`crate::keys::log_position`]), so a batch sent again (after a
    /// server hung and resumed, or its answer was lost) stores only the
    /// lines not stored yet, whichever server stored them.
    #[serde(default)]
    pub offset: u64,
}

/// `POST /v1/agent/nodes/{node}/forget`: remove the status of an instance
/// the node stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgetRequest {
    /// The instance (its fields at the top level, as the body was before
    /// `seq`).
    #[serde(flatten)]
    pub key: crate::InstanceKey,
    /// The agent's stamp of the forget, from the same clock as
    /// [`crate::InstanceStatus::seq`]: the status is removed only if older
    /// (a forget a hung server applies late must not remove the status of
    /// the slot's next instance on the node). 0: unordered, removed as before.
    #[serde(default)]
    pub seq: u64,
}

/// How far a node's log stream was stored ([`crate::keys::log_position`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogPosition {
    /// [`LogBatch::stream`].
    pub stream: u64,
    /// Position of the first line not stored yet.
    pub next: u64,
}

/// Answer to [`LogBatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogBatchResponse {
    /// Lines stored.
    pub accepted: u64,
    /// Lines of instances neither assigned to the node nor reported by it
    /// (not stored).
    pub refused: u64,
    /// Lines of the batch stored before (it was sent again), not stored
    /// twice.
    #[serde(default)]
    pub duplicates: u64,
}

/// Resource use of one instance at one moment (`GET /metrics`, the
/// built-in history, `berth top`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Usage {
    /// A process tree, from `/proc`.
    Process {
        /// CPU seconds used so far by the run.
        cpu_seconds: f64,
        /// Resident memory of the tree.
        rss_bytes: u64,
    },
    /// A container, from the engine's one-shot stats (sampled every 5 s).
    Container {
        /// CPU in percent of one core between the last two samples.
        cpu_percent: f64,
        /// Memory in use, page cache excluded.
        memory_bytes: u64,
    },
}

/// One instance in a [`NodeStats`] report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceUsage {
    /// The instance.
    pub key: crate::InstanceKey,
    /// The incarnation measured (a sample of an older run is not shown
    /// for a newer one).
    pub uid: String,
    /// What it used.
    pub usage: Usage,
    /// Its health-check figures, when it has a check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthStats>,
}

/// Health-check figures of one instance's current incarnation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthStats {
    /// Probes run by this incarnation.
    pub checks: u64,
    /// Probes that failed.
    pub failures: u64,
    /// Duration of the last probe, in seconds.
    pub last_seconds: f64,
}

/// `POST /v1/agent/nodes/{node}/stats`: the resource use of a joined
/// node's running instances, sampled by its agent; the server keeps the
/// latest report per node (on the node's lease) for every server's
/// metrics, history and `berth top`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStats {
    /// When the node sampled them (its clock; rates are computed between
    /// two reports of the same node).
    pub at: Millis,
    /// Its running instances.
    pub instances: Vec<InstanceUsage>,
    /// The counters of the node's own router and DNS server. Absent from
    /// agents older than these counters (and from nodes that run neither),
    /// so a server accepts reports with or without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge: Option<EdgeStats>,
}

/// What a node's edge ([`crate::edge`]) counted since it started: its HTTP
/// router and its DNS server, each absent when the node does not run it.
/// `GET /metrics` exports these with the node's label, for the server's
/// own node and (from the leader) for joined nodes, whose agents send them
/// in their [`NodeStats`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EdgeStats {
    /// The HTTP router's counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<RouterStats>,
    /// The DNS server's counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsStats>,
}

/// An HTTP router's counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RouterStats {
    /// Client connections accepted since start.
    pub connections_accepted: u64,
    /// Client connections open now.
    pub connections_active: u64,
    /// Requests answered 404 because no route matched.
    pub no_route: u64,
    /// Upper bounds of the latency histogram's buckets, in microseconds;
    /// each route's `latency_buckets` has one more entry, for the slower
    /// requests. Sent with the counts so a reader never assumes its own.
    pub latency_bounds_us: Vec<u64>,
    /// Per service the router has seen.
    pub services: Vec<RouterServiceStats>,
}

/// One service's counters in a [`RouterStats`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterServiceStats {
    /// The service.
    #[serde(flatten)]
    pub service: crate::edge::ServiceRef,
    /// Requests being proxied now.
    pub in_flight: u64,
    /// Times an instance was ejected by the circuit breaker.
    pub ejections: u64,
    /// Instances ejected now.
    pub instances_ejected: u64,
    /// Requests re-sent to another instance after a connect failure.
    pub retries: u64,
    /// Per route reaching it.
    pub routes: Vec<RouteStats>,
}

/// One route's counters in a [`RouterServiceStats`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteStats {
    /// Host then path prefix: `web.shop.localhost/`, `*/static`.
    pub route: String,
    /// Responses by status class: 1xx, 2xx, 3xx, 4xx, 5xx.
    pub requests_by_class: [u64; 5],
    /// Requests per latency bucket (see [`RouterStats::latency_bounds_us`]).
    pub latency_buckets: Vec<u64>,
    /// Sum of the latencies, in microseconds.
    pub latency_sum_us: u64,
}

impl RouteStats {
    /// Total responses.
    pub fn requests(&self) -> u64 {
        self.requests_by_class.iter().sum()
    }
}

/// A DNS server's counters. Each map is keyed by the label value the
/// metric carries (`udp`, `SRV`, `NXDOMAIN`…).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DnsStats {
    /// Queries received, by transport.
    pub queries: BTreeMap<String, u64>,
    /// Queries by question type.
    pub by_type: BTreeMap<String, u64>,
    /// Replies by response code.
    pub by_rcode: BTreeMap<String, u64>,
    /// UDP replies cut short with the TC bit.
    pub truncated: u64,
    /// Messages dropped unanswered.
    pub dropped: u64,
}
