//! Events: a record of everything that happened to stacks, instances and
//! nodes (deploys, rollbacks, scaling, config changes, instance starts,
//! health changes and exits, nodes joining and leaving).
//!
//! Events are derived by the server from changes of desired and actual
//! state, and kept in a bounded ring in the store under [`crate::keys::EVENTS`]
//! (see `GET /v1/events`). They are a history for people and dashboards,
//! never an input to a controller: state is the truth, events narrate it.

use serde::{Deserialize, Serialize};

use crate::Millis;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A stack got a new release (first deploy, `berth deploy`, `env set`,
    /// a manual rollback) and its rollout began.
    DeployStarted,
    /// Every instance of the release runs and passed its monitor period.
    DeployFinished,
    /// The rollout stopped on a failure (`failure_action: pause`).
    DeployPaused,
    /// A failed release was replaced by the previous one automatically.
    RolledBack,
    /// A stack was removed (`berth down`).
    StackRemoved,
    /// A service's replica count changed.
    Scaled,
    /// A service was stopped (`berth stop`).
    ServiceStopped,
    /// A stopped service was started again (`berth start`).
    ServiceStarted,
    /// A service's instances are being replaced (`berth restart`).
    Restarted,
    /// Config vars (`berth env set|unset`) changed.
    ConfigChanged,
    /// An instance's process or container started.
    InstanceStarted,
    /// An instance's health check passed (after not passing).
    InstanceHealthy,
    /// An instance's health check failed `retries` times.
    InstanceUnhealthy,
    /// An instance's process or container exited (code or signal attached).
    InstanceExited,
    /// An instance could not start or its restart policy gave up.
    InstanceFailed,
    /// An instance was stopped on purpose.
    InstanceStopped,
    /// An instance is gone (scaled down, replaced, stack removed).
    InstanceRemoved,
    /// A node registered.
    NodeJoined,
    /// A node's registration ended (stopped, or its lease expired).
    NodeLeft,
}

impl EventKind {
    /// The snake_case name used on the wire (`instance_exited`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DeployStarted => "deploy_started",
            Self::DeployFinished => "deploy_finished",
            Self::DeployPaused => "deploy_paused",
            Self::RolledBack => "rolled_back",
            Self::StackRemoved => "stack_removed",
            Self::Scaled => "scaled",
            Self::ServiceStopped => "service_stopped",
            Self::ServiceStarted => "service_started",
            Self::Restarted => "restarted",
            Self::ConfigChanged => "config_changed",
            Self::InstanceStarted => "instance_started",
            Self::InstanceHealthy => "instance_healthy",
            Self::InstanceUnhealthy => "instance_unhealthy",
            Self::InstanceExited => "instance_exited",
            Self::InstanceFailed => "instance_failed",
            Self::InstanceStopped => "instance_stopped",
            Self::InstanceRemoved => "instance_removed",
            Self::NodeJoined => "node_joined",
            Self::NodeLeft => "node_left",
        }
    }

    /// Whether it is bad news (shown as a warning).
    pub fn is_warning(self) -> bool {
        matches!(
            self,
            Self::DeployPaused
                | Self::RolledBack
                | Self::InstanceUnhealthy
                | Self::InstanceFailed
                | Self::NodeLeft
        )
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One thing that happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Increasing id: the cursor of `GET /v1/events?since=<id>`.
    pub id: u64,
    /// When the server saw it (ms since the epoch).
    pub at: Millis,
    /// What happened.
    pub kind: EventKind,
    /// Namespace, for stack, service and instance events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Stack, for stack, service and instance events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack: Option<String>,
    /// Service, for service and instance events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Instance (`web.2`), for instance events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Node, for instance and node events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The release concerned (deploys, instances).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<u64>,
    /// Exit code, for `instance_exited`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Signal name, for `instance_exited` by a signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// One human-readable line.
    pub message: String,
}
