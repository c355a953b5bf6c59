//! berth's agent: runs, on one node, the instances assigned to that node.
//!
//! It owns how instances run (drivers), keeping them running (supervision
//! and restart back-off), health checks, log capture and the reporting of
//! instance statuses. It does not decide what runs where (the scheduler and
//! controllers do, through assignments) and never writes desired state.
//!
//! # Layout
//! - [`agent`]: the reconcile loop: assignments in, supervisors, statuses out.
//! - [`control`]: [`ControlPlane`], the agent's only door to the servers, and
//!   [`StoreControlPlane`] for the single-machine server.
//! - [`supervisor`]: one task per instance: lifecycle, restart policy, back-off.
//! - [`driver`]: the [`driver::Driver`] trait, the `process` driver (with
//!   command/env building and cgroups) and the `docker` driver (containers
//!   through the Docker Engine API, adopted across agent restarts).
//! - [`health`]: exec, HTTP and TCP probes and the Compose health state machine.
//! - [`local`]: [`local::LocalStatuses`], statuses as emitted, for the
//!   router and DNS in the same process (ahead of the store by the writes
//!   in flight).
//! - [`logs`]: [`LogStore`], rotating per-instance log files and a live stream.
//! - [`ports`]: free-port allocation for instances.
//! - [`orphans`]: the agent id, and killing what a killed agent left behind.
//! - [`seq`]: the stamps a node's reports are ordered by, kept above every
//!   earlier run's through a mark in the data dir.
//! - [`facts`]: what the scheduler reads about a node (`node.facts.<name>`).
//! - [`metrics_proc`]: CPU and memory of instances (process trees from
//!   `/proc`, containers from the engine's samples).
//! - [`remote`]: `berth agent --join`: [`remote::ApiControlPlane`] over the
//!   servers' HTTP API, joining, registration and heartbeats;
//!   [`remote_logs`] and [`remote_stats`] ship its instances' log lines and
//!   resource use to the servers.
//! - [`edge`]: a node's router, DNS server and TCP proxy, run from the
//!   servers' edge tables; [`remote_edge`] follows those tables on a joined
//!   node.
//!
//! ```no_run
//! # async fn demo(store: std::sync::Arc<dyn berth_store::Store>) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use berth_agent::{AgentConfig, LogConfig, LogStore, StoreControlPlane};
//! let cfg = AgentConfig {
//!     node_id: "local".into(),
//!     data_dir: "/tmp/berth".into(),
//!     address: "127.0.0.1".into(),
//!     logs: LogConfig::default(),
//! };
//! let logs = LogStore::open(cfg.data_dir.join("logs"), cfg.logs.clone())?;
//! let (_stop, shutdown) = tokio::sync::watch::channel(false);
//! berth_agent::run(cfg, Arc::new(StoreControlPlane::new(store)), logs, shutdown).await?;
//! # Ok(()) }
//! ```

#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod agent;
pub mod control;
pub mod driver;
pub mod edge;
pub mod facts;
pub mod health;
pub mod local;
pub mod logs;
pub mod metrics_proc;
pub mod orphans;
pub mod ports;
pub mod remote;
pub mod remote_edge;
pub mod remote_logs;
pub mod remote_stats;
pub mod seq;
pub mod supervisor;

pub use agent::{AgentConfig, AgentError, AgentOptions, run, run_with};
pub use control::{
    AssignmentEvent, AssignmentStream, ControlError, ControlPlane, StoreControlPlane,
};
pub use logs::{LogConfig, LogError, LogQuery, LogStore};

/// Wall-clock milliseconds since the epoch: the agent's one clock, for the
/// timestamps in the statuses it reports.
/// Microseconds since the Unix epoch, for the `berth_hops` debug events
/// (bench/propagation.sh with `HOPS=1` lines them up with the timestamps
/// its instances take; wall clock, because they are in other processes).
pub(crate) fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

pub(crate) fn now_ms() -> berth_model::Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as berth_model::Millis)
}
