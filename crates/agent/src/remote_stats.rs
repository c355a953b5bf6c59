//! Resource stats of a joined agent: every `--stats-every` (10 s by
//! default) the agent samples its running instances (process trees from
//! `/proc`, containers from the engine's samples, as the server's local
//! agent does) and POSTs the report to `/v1/agent/nodes/{node}/stats`. The
//! server keeps the latest report per node on the node's lease, so a dead
//! node's figures vanish with it, and every server's `/metrics`, built-in
//! history and `berth top` show them. The report also carries the counters
//! of the node's own router and DNS server ([`EdgeMeters::report`]: the
//! routes that served a request), which the leader's `/metrics` exports
//! with the node's label.
//!
//! Which instances run, and with which pid, the agent learns from the
//! statuses it reports: [`Tapped`] wraps its control plane and keeps the
//! latest one per instance. A report that fails is not retried: the next
//! one, a few seconds later, supersedes it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use berth_model::api::{InstanceUsage, NodeStats};
use berth_model::{Assignment, InstanceKey, InstanceStatus};
use berth_store::Revision;
use tokio::sync::watch;

use crate::control::{AssignmentStream, ControlError, ControlPlane};
use crate::driver::docker::StatsMap;
use crate::edge::EdgeMeters;
use crate::health::HealthStatsMap;
use crate::remote::ApiClient;

/// Default time between two reports.
pub const DEFAULT_EVERY: Duration = Duration::from_secs(10);

/// The latest status the agent reported for each of its instances.
/// Cheap to clone; clones share the map.
#[derive(Debug, Clone, Default)]
pub struct ReportedStatuses(Arc<Mutex<HashMap<InstanceKey, InstanceStatus>>>);

impl ReportedStatuses {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<InstanceKey, InstanceStatus>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every instance's latest status.
    pub fn snapshot(&self) -> Vec<InstanceStatus> {
        self.lock().values().cloned().collect()
    }
}

/// A [`ControlPlane`] that notes every status reported through it.
pub struct Tapped {
    inner: Arc<dyn ControlPlane>,
    seen: ReportedStatuses,
}

impl Tapped {
    /// Wrap `inner`, noting statuses in `seen`.
    pub fn new(inner: Arc<dyn ControlPlane>, seen: ReportedStatuses) -> Self {
        Self { inner, seen }
    }
}

#[async_trait]
impl ControlPlane for Tapped {
    async fn list_assignments(
        &self,
        node: &str,
    ) -> Result<(Vec<Assignment>, Revision), ControlError> {
        self.inner.list_assignments(node).await
    }
    async fn watch_assignments(
        &self,
        node: &str,
        from: Revision,
    ) -> Result<AssignmentStream, ControlError> {
        self.inner.watch_assignments(node, from).await
    }
    async fn report(&self, status: &InstanceStatus) -> Result<(), ControlError> {
        // Noted whether or not the server took it: it is what runs here.
        self.seen.lock().insert(status.key.clone(), status.clone());
        self.inner.report(status).await
    }
    async fn report_many(&self, statuses: &[InstanceStatus]) -> Result<(), ControlError> {
        {
            let mut seen = self.seen.lock();
            for s in statuses {
                seen.insert(s.key.clone(), s.clone());
            }
        }
        self.inner.report_many(statuses).await
    }
    async fn forget(&self, key: &InstanceKey, seq: u64) -> Result<(), ControlError> {
        self.seen.lock().remove(key);
        self.inner.forget(key, seq).await
    }
}

/// Sample the running instances among `statuses`, with their health-check
/// figures.
pub fn sample(
    statuses: &[InstanceStatus],
    (containers, health): (&StatsMap, &HealthStatsMap),
    at: u64,
) -> NodeStats {
    let usage = crate::metrics_proc::instance_usage(statuses, containers);
    let health = health.snapshot();
    let mut instances: Vec<InstanceUsage> = statuses
        .iter()
        .filter_map(|s| {
            Some(InstanceUsage {
                key: s.key.clone(),
                uid: s.uid.clone(),
                usage: *usage.get(&s.key)?,
                health: health.get(&s.key).copied(),
            })
        })
        .collect();
    instances.sort_by(|a, b| a.key.cmp(&b.key));
    NodeStats {
        at,
        instances,
        edge: None,
    }
}

/// The running reporter; [`StatsShipper::stop`] ends it (dropping it
/// tells it to stop without waiting).
#[derive(Debug)]
pub struct StatsShipper {
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for StatsShipper {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

impl StatsShipper {
    /// Report every `every` until stopped.
    pub fn start(
        client: ApiClient,
        statuses: ReportedStatuses,
        (stats, edge): ((StatsMap, HealthStatsMap), EdgeMeters),
        every: Duration,
    ) -> Self {
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(ship(client, statuses, (stats, edge), every, rx));
        Self {
            stop,
            task: Some(task),
        }
    }

    /// Stop reporting and wait for the task.
    pub async fn stop(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
        {
            tracing::error!(error = %e, "stats reporter failed");
        }
    }
}

async fn ship(
    client: ApiClient,
    statuses: ReportedStatuses,
    (stats, edge): ((StatsMap, HealthStatsMap), EdgeMeters),
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let every = every.max(Duration::from_millis(100));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let snapshot = statuses.snapshot();
        let (containers, health) = stats.clone();
        // /proc reads are blocking file I/O.
        let mut report = match tokio::task::spawn_blocking(move || {
            sample(&snapshot, (&containers, &health), crate::now_ms())
        })
        .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "sampling instance stats failed");
                continue;
            }
        };
        report.edge = edge.report();
        // Bounded by the interval: a report later than the next is useless.
        let sent = tokio::time::timeout(every, client.ship_stats(&report)).await;
        match sent {
            Ok(Ok(())) => {
                if failing {
                    tracing::info!("instance stats reach the server again");
                }
                failing = false;
            }
            // Logged once per outage, not every interval.
            Ok(Err(e)) if !failing => {
                tracing::warn!(error = %e, "cannot send instance stats; will keep trying");
                failing = true;
            }
            Err(_) if !failing => {
                tracing::warn!("sending instance stats timed out; will keep trying");
                failing = true;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_model::InstanceState;

    fn status(slot: u32, pid: Option<u32>, state: InstanceState) -> InstanceStatus {
        InstanceStatus {
            state,
            pid,
            started_at: Some(1),
            ..InstanceStatus::new(
                InstanceKey::new("default", "s", "web", slot),
                format!("u{slot}"),
                "n1",
                1,
                1,
            )
        }
    }

    #[test]
    fn a_report_holds_the_running_process_trees() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let statuses = [
            status(1, Some(child.id()), InstanceState::Running),
            // Not running: no figures.
            status(2, Some(child.id()), InstanceState::Exited),
            // Running but its process is gone.
            status(3, Some(u32::MAX - 1), InstanceState::Running),
        ];
        let health = HealthStatsMap::default();
        health.record(&statuses[0].key, false, Duration::from_millis(3));
        let report = sample(&statuses, (&StatsMap::default(), &health), 42);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(report.at, 42);
        assert_eq!(report.instances.len(), 1, "{report:?}");
        assert_eq!(report.instances[0].uid, "u1");
        let h = report.instances[0].health.unwrap();
        assert_eq!((h.checks, h.failures), (1, 1));
        match report.instances[0].usage {
            berth_model::api::Usage::Process { rss_bytes, .. } => assert!(rss_bytes > 0),
            u => panic!("{u:?}"),
        }
    }
}
