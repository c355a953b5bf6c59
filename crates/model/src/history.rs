//! The shapes of `GET /v1/stacks/{ns}/{stack}/history`: the server's short,
//! in-memory history of per-instance resource use and per-service request
//! rates (the dashboard's charts and `berth top` read it).

use serde::{Deserialize, Serialize};

use crate::{InstanceState, Millis};

/// The history of one stack.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StackHistory {
    /// Time between two samples, in ms.
    pub interval_ms: u64,
    /// How far back the server keeps samples, in ms.
    pub retention_ms: u64,
    /// Per instance, sorted by service then slot.
    pub instances: Vec<InstanceHistory>,
    /// Per service that a node's HTTP router serves (summed over the
    /// server's own router and joined nodes' reports), sorted by name.
    pub services: Vec<ServiceHistory>,
}

/// The samples of one instance slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceHistory {
    /// `web.2`.
    pub instance: String,
    /// Service name.
    pub service: String,
    /// Slot number.
    pub slot: u32,
    /// Node that runs (or last ran) it.
    pub node: String,
    /// Oldest first.
    pub points: Vec<InstancePoint>,
}

/// One sample of one instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstancePoint {
    /// When (ms since the epoch).
    pub t: Millis,
    /// Its state then.
    pub state: InstanceState,
    /// CPU use since the previous sample, in percent of one core (`None`
    /// for the first sample of a run, or when not measurable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<f64>,
    /// Resident memory (processes: RSS of the process tree; containers:
    /// usage without page cache, as `docker stats`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Restarts so far.
    pub restarts: u32,
}

/// The request rates of one service, as seen by the HTTP router.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceHistory {
    /// Service name.
    pub service: String,
    /// Oldest first.
    pub points: Vec<ServicePoint>,
}

/// One sample of one service's traffic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServicePoint {
    /// When (ms since the epoch).
    pub t: Millis,
    /// Responses per second since the previous sample.
    pub requests_per_second: f64,
    /// 5xx responses per second since the previous sample.
    pub errors_per_second: f64,
}
