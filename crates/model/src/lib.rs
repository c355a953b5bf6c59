//! berth's core types and the store key layout.
//!
//! # What lives where in the store
//!
//! Desired state (written by the API, read by controllers):
//! - [`keys::stack`] → [`StackRecord`]: the current release of a stack and
//!   per-service scale / stopped flags.
//! - [`keys::release`] → [`Release`]: immutable, numbered resolved specs.
//!
//! Placement (written by the controller after the scheduler, read by agents):
//! - [`keys::assignment`] → [`Assignment`]: one instance a node must run.
//!
//! Actual state (written by agents only):
//! - [`keys::status`] → [`InstanceStatus`].
//! - [`keys::node`] → [`Node`], attached to the node's lease.
//!
//! Nothing here does I/O; this crate must not depend on tokio or the store.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::collections::BTreeMap;
use std::fmt;

pub use berth_spec::types::{Service, Stack};
pub use event::{Event, EventKind};
use serde::{Deserialize, Serialize};

pub mod api;
pub mod edge;
pub mod event;
pub mod history;
pub mod keys;
pub mod vip;

/// Milliseconds since the Unix epoch. The model has no clock: callers pass it.
pub type Millis = u64;

/// The default namespace.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Identifies one instance slot: `<namespace>/<stack>/<service>/<slot>`.
///
/// Slots are small integers starting at 1 (shown as `web.3`); scaling down
/// removes the highest slots first, which are also the newest.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct InstanceKey {
    /// Namespace.
    pub namespace: String,
    /// Stack name.
    pub stack: String,
    /// Service name.
    pub service: String,
    /// Replica slot, from 1.
    pub slot: u32,
}

impl InstanceKey {
    /// The key of `service.slot` of `stack` in `namespace`.
    pub fn new(
        namespace: impl Into<String>,
        stack: impl Into<String>,
        service: impl Into<String>,
        slot: u32,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            stack: stack.into(),
            service: service.into(),
            slot,
        }
    }

    /// The short display name `service.slot` used in logs and `ps`.
    pub fn short(&self) -> String {
        format!("{}.{}", self.service, self.slot)
    }
}

impl fmt::Display for InstanceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}.{}",
            self.namespace, self.stack, self.service, self.slot
        )
    }
}

/// Desired state of one stack. Written only through the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StackRecord {
    /// Namespace.
    pub namespace: String,
    /// Stack name.
    pub name: String,
    /// The release that should be running.
    pub release: u64,
    /// The resolved spec of that release (copied so controllers need one read).
    pub spec: Stack,
    /// Per-service desired scale and run flag, keyed by service name.
    pub services: BTreeMap<String, ServiceDesired>,
    /// Last change.
    pub updated_at: Millis,
    /// Config vars set with `berth env set|unset`, applied over the stack
    /// file's environment by every later deploy.
    #[serde(default, skip_serializing_if = "ConfigVars::is_empty")]
    pub config: ConfigVars,
    /// Progress of the rolling update to the current release (or of the
    /// rolling restart), as the controller reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
}

/// Config vars (`berth env set|unset`): environment changes kept apart from
/// the stack file so a later `berth deploy` does not lose them.
///
/// A value of `None` is an unset: the variable is removed even when the
/// stack file sets it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigVars {
    /// Applied to every service.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub all: BTreeMap<String, Option<String>>,
    /// Applied to one service (after `all`), keyed by service name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<String, BTreeMap<String, Option<String>>>,
}

impl ConfigVars {
    /// No config vars at all.
    pub fn is_empty(&self) -> bool {
        self.all.is_empty() && self.services.values().all(BTreeMap::is_empty)
    }

    /// `stack` with these vars applied to its services' environment.
    pub fn apply(&self, mut stack: Stack) -> Stack {
        for (name, service) in &mut stack.services {
            let one = self.services.get(name).into_iter().flatten();
            for (k, v) in self.all.iter().chain(one) {
                match v {
                    Some(v) => {
                        service.environment.insert(k.clone(), Some(v.clone()));
                    }
                    None => {
                        service.environment.remove(k);
                    }
                }
            }
        }
        stack
    }
}

/// Where the rolling update to a release stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutStatus {
    /// The release being rolled out.
    pub release: u64,
    /// The restart generation sum it was started for (a `berth restart`
    /// starts a rollout without a new release).
    #[serde(default)]
    pub generation: u64,
    /// Where it stands.
    pub state: RolloutState,
    /// Human-readable progress or the reason it stopped.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Set when this release is an automatic rollback: what failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<RollbackCause>,
    /// When it started.
    pub started_at: Millis,
    /// Last change of `state` or `message`.
    pub updated_at: Millis,
}

/// Why a release was rolled back automatically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackCause {
    /// The release that failed.
    pub from: u64,
    /// The instance whose failure decided it (`web.4`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// What failed: the health check's output or the last exit, with the
    /// instance's last log lines.
    pub reason: String,
}

/// States of a rollout.
///
/// ```text
///  in_progress ──► complete
///       │
///       ├──► paused        (failure_action: pause; a new deploy resumes)
///       └──► (a new release: the automatic rollback, with `rolled_back` set)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Instances are being replaced.
    InProgress,
    /// Every instance runs the release and passed its monitor period.
    Complete,
    /// A new instance failed and `failure_action` is `pause`.
    Paused,
}

impl fmt::Display for RolloutState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::InProgress => "in_progress",
            Self::Complete => "complete",
            Self::Paused => "paused",
        })
    }
}

/// Desired state of one service of a stack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDesired {
    /// Number of replicas wanted.
    pub replicas: u32,
    /// `berth stop SERVICE` sets this; `berth start` clears it.
    #[serde(default)]
    pub stopped: bool,
    /// Bumped by `berth restart`: instances whose assignment carries an older
    /// generation are replaced.
    #[serde(default)]
    pub restart_generation: u64,
}

/// An immutable, numbered version of a stack's resolved spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    /// 1, 2, 3…
    pub version: u64,
    /// The full resolved spec.
    pub spec: Stack,
    /// When it was created.
    pub created_at: Millis,
    /// Who created it (user name or "berth").
    pub author: String,
    /// Why (e.g. "up", "deploy", "rollback to v2").
    pub message: String,
    /// The config vars in force when it was made (a rollback restores them).
    #[serde(default, skip_serializing_if = "ConfigVars::is_empty")]
    pub config: ConfigVars,
}

/// One instance a node must run: desired state, placed by the scheduler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    /// Which slot.
    pub key: InstanceKey,
    /// Unique per incarnation: a new one means "replace the running instance".
    pub uid: String,
    /// Node that runs it.
    pub node: String,
    /// Release the spec comes from.
    pub release: u64,
    /// Restart generation of the service when this was made.
    #[serde(default)]
    pub restart_generation: u64,
    /// The service template.
    pub service: Service,
    /// Extra environment the controller adds (discovery, `BERTH_*`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Run or stop.
    pub desired: DesiredState,
    /// When the controller wrote it.
    pub created_at: Millis,
    /// Set when the controller retires this instance (replaced by a rolling
    /// update, or scaled away): from then on routers, DNS and the catalog
    /// send it no new traffic, and once this time has passed the controller
    /// deletes the assignment, so the agent stops it after requests already
    /// routed to it have completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire_at: Option<Millis>,
}

/// A node that has assignments but no registration (its lease expired),
/// as the leader's controller first saw it (`/berth/down/<node>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDown {
    /// When the controller first saw it missing (ms since the epoch): its
    /// instances are rescheduled `--reschedule-after` later.
    pub since: Millis,
}

/// Instances of one stack that the scheduler could place nowhere, with why
/// (`/berth/unplaced/<ns>/<stack>`). Written by the leader's controller in
/// the same fenced transaction as its placements, deleted once every
/// instance of the stack is placed; `berth ps`, the API and the dashboard
/// show them as `pending` rows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unplaced {
    /// One entry per instance, sorted by service and slot.
    pub instances: Vec<UnplacedInstance>,
}

/// One instance that fits no node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnplacedInstance {
    /// Service name.
    pub service: String,
    /// Replica slot.
    pub slot: u32,
    /// Why, per class of nodes: `3 nodes: constraint node.labels.zone==east;
    /// 2 nodes: insufficient memory`.
    pub reason: String,
}

/// What the agent should do with an assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    /// Keep it running (per its restart policy).
    Running,
    /// Stop it gracefully and keep it stopped.
    Stopped,
}

/// Lifecycle state of an instance, as the agent sees it.
///
/// ```text
///  pending ──► starting ──► running ──► exited ──► (backoff ──► starting)
///                 │            │                      │
///                 ▼            ▼                      ▼
///              failed      stopping ──► stopped     failed (policy says no more)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Assigned, not started yet (e.g. waiting for dependencies).
    Pending,
    /// Being started.
    Starting,
    /// Process/container is alive.
    Running,
    /// Exited; the restart policy decides what happens next.
    Exited,
    /// Waiting before the next restart (crash loop back-off).
    Backoff,
    /// Could not start or gave up restarting.
    Failed,
    /// Stop signal sent, waiting for exit.
    Stopping,
    /// Stopped on purpose.
    Stopped,
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::Pending => "pending",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Exited => "exited",
            Self::Backoff => "backoff",
            Self::Failed => "failed",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
        };
        f.write_str(s)
    }
}

/// Health as `ps --json` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Has a check that has not passed yet.
    Starting,
    /// Last check passed.
    Healthy,
    /// `retries` consecutive checks failed after the start period.
    Unhealthy,
    /// No health check.
    None,
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::Starting => "starting",
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
            Self::None => "none",
        };
        f.write_str(s)
    }
}

/// How an instance last ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Exit code, if it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// Signal name, if killed (`SIGKILL`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// When.
    pub at: Millis,
}

/// Actual state of one instance. Written only by the agent that runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// Which slot.
    pub key: InstanceKey,
    /// The assignment incarnation this reports on.
    pub uid: String,
    /// Node it runs on.
    pub node: String,
    /// Release it runs.
    pub release: u64,
    /// Lifecycle state.
    pub state: InstanceState,
    /// Health.
    pub health: Health,
    /// OS pid of the process (group leader), or the container's main pid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Address other services reach it on (an IP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Port it is reached on at `address`, if the service has ports: a
    /// process's `PORT`; a container's first declared port, or the host
    /// port that port is published on (see `host_ports`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Declared container port → the port on `address` it is published on,
    /// for a container published on its node's address so other nodes
    /// reach it (an agent whose address is not loopback). Empty when the
    /// instance is reached on its declared ports (processes; containers on
    /// one machine, at their bridge IP).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub host_ports: BTreeMap<u16, u16>,
    /// Restarts of this incarnation.
    pub restarts: u32,
    /// How it last ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<ExitInfo>,
    /// When the current process started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Millis>,
    /// Output of the last health check (trimmed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_output: Option<String>,
    /// Why resource limits could not be applied, if they could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits_warning: Option<String>,
    /// Human-readable reason for the current state (e.g. why it failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Last update.
    pub updated_at: Millis,
    /// Where this report stands among the reporting agent's reports: it
    /// only grows within an agent (a hybrid clock: the next value is
    /// `max(previous + 1, now in µs)`, so it also grows across restarts of
    /// an agent whose clock is not stepped back). Servers write a joined
    /// agent's status only over an older one from the same node (see
    /// `server::api::agent::statuses`), so a report that a hung server
    /// applies late never replaces a newer one the agent sent elsewhere
    /// meanwhile. 0: not ordered (agents before this field, fixtures),
    /// written unconditionally.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub seq: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl InstanceStatus {
    /// What an agent knows of incarnation `uid` of `key` on `node` before
    /// it starts it: `Pending`, no health result, no process, address or
    /// port, no restarts. The agent's first report starts from this, and so
    /// do fixtures, setting what differs with struct update syntax
    /// (`InstanceStatus { state: Running, ..InstanceStatus::new(…) }`).
    pub fn new(
        key: InstanceKey,
        uid: impl Into<String>,
        node: impl Into<String>,
        release: u64,
        updated_at: Millis,
    ) -> Self {
        Self {
            key,
            uid: uid.into(),
            node: node.into(),
            release,
            state: InstanceState::Pending,
            health: Health::None,
            pid: None,
            address: None,
            port: None,
            host_ports: BTreeMap::new(),
            restarts: 0,
            last_exit: None,
            started_at: None,
            health_output: None,
            limits_warning: None,
            message: None,
            updated_at,
            seq: 0,
        }
    }

    /// The port on `address` that reaches declared port `target`: its host
    /// port when the container is published ([`Self::host_ports`]), else
    /// `target` itself.
    pub fn port_of(&self, target: u16) -> u16 {
        self.host_ports.get(&target).copied().unwrap_or(target)
    }
}

/// A machine running an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Stable id (hostname by default).
    pub id: String,
    /// Address other nodes reach its instances on.
    pub address: String,
    /// Static labels (`--label k=v`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Dynamic facts (cpu count, memory, load…), refreshed by the agent.
    #[serde(default)]
    pub facts: BTreeMap<String, serde_json::Value>,
    /// `drain` stops new placements and moves instances off.
    #[serde(default)]
    pub draining: bool,
    /// Last heartbeat.
    pub updated_at: Millis,
}

/// Which stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    /// The process's stdout.
    Stdout,
    /// The process's stderr.
    Stderr,
    /// berth's own notes about the instance (started, exited with 1, …).
    System,
}

/// One captured log line.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LogLine {
    /// Instance that wrote it.
    pub key: InstanceKey,
    /// Capture time, microseconds since the Unix epoch (orders merges).
    pub ts_us: u64,
    /// Stream.
    pub stream: LogStream,
    /// The text, without the trailing newline.
    pub line: String,
}

/// One instance as service discovery sees it: derived from actual state
/// (or registered from outside through the Consul-compatible API), never
/// edited by hand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogEntry {
    /// Namespace.
    pub namespace: String,
    /// Stack (`""` for services registered from outside).
    pub stack: String,
    /// Service name.
    pub service: String,
    /// Instance id (`web.3`, or the registration id).
    pub instance: String,
    /// Node it runs on.
    pub node: String,
    /// IP address it is reachable on.
    pub address: String,
    /// Port, if it listens on one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Tags (from labels / registration).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Free-form metadata (release, uid, …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    /// Passing its health check (or has none) and running.
    pub healthy: bool,
}
