//! The agent: keeps this node's running supervisors in line with its
//! assignments, and reports their statuses.
//!
//! Reconciliation is level-triggered and idempotent: the agent holds the
//! desired assignments (listed, then followed by a watch; re-listed after
//! any break) and its supervisors, and for each key:
//! - desired `running`, no supervisor (or a stopped one) → start one;
//! - a supervisor with a different `uid`, or desired `stopped` → stop it
//!   gracefully; once it has stopped, look again (a new uid then starts);
//! - no assignment → stop gracefully, then `forget` the status.
//!
//! Stops never block the loop: a supervisor stops itself and the agent only
//! learns when its task ends, so scaling 100 → 1 takes one grace period, not
//! 99. Statuses are coalesced per instance by a reporter task that writes
//! only the latest of each, in batches.
//!
//! Crash-only: before anything runs, processes and cgroups a previous
//! incarnation left (it was `kill -9`ed) are killed, not adopted (see
//! [`crate::orphans`]). Containers are different: they outlive the agent
//! with their output intact, so the ones labelled with this agent's id are
//! collected first; a supervisor whose assignment uid matches one attaches
//! to it instead of starting a new one, and after each listing of the
//! assignments those no assignment wants are removed (see
//! [`crate::driver::docker`]). On shutdown every instance is stopped in
//! parallel and reported `stopped`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_model::{Assignment, DesiredState, InstanceKey, InstanceState, InstanceStatus};
use futures::StreamExt;
use tokio::sync::{Notify, watch};
use tokio::task::{Id, JoinSet};

use crate::control::{AssignmentEvent, ControlPlane};
use crate::driver::ByKind;
use crate::driver::cgroup::Cgroups;
use crate::driver::command::INHERITED_VARS;
use crate::driver::docker::{DockerDriver, Publish, StatsMap};
use crate::driver::process::ProcessDriver;
use crate::logs::{LogConfig, LogStore};
use crate::orphans;
use crate::ports::{PortAllocator, PortRange};
use crate::supervisor::{self, Backoff, Context, StatusSink};

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's id (assignments are listed for it).
    pub node_id: String,
    /// Data directory: fallback working directory, and with the node id the
    /// source of the agent id.
    pub data_dir: PathBuf,
    /// Address instances are reached on (`127.0.0.1` on one machine).
    /// Any other address means other nodes reach them: containers are then
    /// published on it ([`publish_on`]).
    pub address: String,
    /// Log file limits (used by whoever opens the [`LogStore`]).
    pub logs: LogConfig,
}

/// The address containers' ports are published on for an agent registered
/// with `address`: none on loopback (one machine: every router, DNS server
/// and proxy runs on this host and reaches a container at its bridge IP),
/// else that address (other nodes' edges connect to it; the bridge IP is
/// reachable from this host only).
pub fn publish_on(address: &str) -> Option<IpAddr> {
    address
        .parse::<IpAddr>()
        .ok()
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
}

/// Errors that end the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The data directory cannot be used.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `BERTH_PORT_RANGE` is not a range of ports.
    #[error("{0}")]
    PortRange(String),
    /// The status order mark in the data directory cannot be used.
    #[error(transparent)]
    StatusSeq(#[from] crate::seq::SeqError),
}

/// What an embedder may share with or configure in the agent beyond
/// [`AgentConfig`].
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// The latest CPU/memory sample of every running container, kept by
    /// the Docker driver (for the metrics API).
    pub container_stats: StatsMap,
    /// Health-check figures of every supervised instance (for the metrics
    /// API).
    pub health_stats: crate::health::HealthStatsMap,
    /// The Docker engine to use (`unix:///…` or `tcp://…`); `None` means
    /// `DOCKER_HOST`, else `/var/run/docker.sock`.
    pub docker_host: Option<String>,
    /// Where every status is also published as it is emitted, before the
    /// store write (for the router, DNS and TCP proxy in the same process;
    /// see [`crate::local`]).
    pub local_statuses: Option<crate::local::LocalStatuses>,
    /// The wall clock, in µs since the epoch, that statuses' `seq` never
    /// fall below (`None`: the system clock). Tests set it apart from the
    /// system's to show that the order across restarts does not rest on
    /// it (see [`crate::seq`]).
    pub wall_clock_us: Option<fn() -> u64>,
}

/// Wait before retrying the control plane.
const RETRY: Duration = Duration::from_millis(500);

enum Pending {
    Status(Box<InstanceStatus>),
    /// With its stamp (as a status's `seq`).
    Forget(u64),
}

/// Keeps the latest status per instance and writes it out.
struct Reporter {
    pending: Mutex<HashMap<InstanceKey, Pending>>,
    notify: Notify,
    local: Option<crate::local::LocalStatuses>,
    /// Stamps every report's [`InstanceStatus::seq`]: above every one
    /// this node gave before, in this run or an earlier one.
    seq: crate::seq::StatusSeq,
}

impl Reporter {
    fn next_seq(&self) -> u64 {
        self.seq.next()
    }

    fn put(&self, key: InstanceKey, p: Pending) {
        if let Some(local) = &self.local {
            match &p {
                Pending::Status(s) => local.publish(s),
                Pending::Forget(_) => local.forget(&key),
            }
        }
        if let Ok(mut m) = self.pending.lock() {
            m.insert(key, p);
        }
        self.notify.notify_one();
    }

    fn take(&self) -> HashMap<InstanceKey, Pending> {
        self.pending
            .lock()
            .map(|mut m| std::mem::take(&mut *m))
            .unwrap_or_default()
    }

    /// Put back what could not be written, unless something newer came.
    fn restore(&self, batch: HashMap<InstanceKey, Pending>) {
        if let Ok(mut m) = self.pending.lock() {
            for (k, p) in batch {
                m.entry(k).or_insert(p);
            }
        }
    }

    async fn write(&self, control: &dyn ControlPlane) -> bool {
        let batch = self.take();
        if batch.is_empty() {
            return true;
        }
        let statuses: Vec<InstanceStatus> = batch
            .values()
            .filter_map(|p| match p {
                Pending::Status(s) => Some((**s).clone()),
                Pending::Forget(_) => None,
            })
            .collect();
        let forgets: Vec<(&InstanceKey, u64)> = batch
            .iter()
            .filter_map(|(k, p)| match p {
                Pending::Forget(seq) => Some((k, *seq)),
                Pending::Status(_) => None,
            })
            .collect();
        let mut ok = true;
        match control.report_many(&statuses).await {
            Ok(()) => {
                let at_us = crate::now_us();
                for s in &statuses {
                    tracing::debug!(target: "berth_hops", hop = "stored", instance = %s.key, health = %s.health, at_us);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot report instance statuses; will retry");
                ok = false;
            }
        }
        for (k, seq) in &forgets {
            if let Err(e) = control.forget(k, *seq).await {
                tracing::warn!(instance = %k, error = %e, "cannot forget instance status; will retry");
                ok = false;
            }
        }
        if !ok {
            self.restore(batch);
        }
        ok
    }

    /// Write until `done` turns true and nothing is left (or, once done,
    /// the control plane keeps failing).
    async fn run(self: Arc<Self>, control: Arc<dyn ControlPlane>, mut done: watch::Receiver<bool>) {
        loop {
            let finished = *done.borrow();
            let ok = self.write(control.as_ref()).await;
            let empty = self.pending.lock().map(|m| m.is_empty()).unwrap_or(true);
            if finished && (empty || !ok) {
                return;
            }
            if !ok {
                tokio::time::sleep(RETRY).await;
                continue;
            }
            if empty {
                tokio::select! {
                    () = self.notify.notified() => {}
                    _ = done.changed() => {}
                }
            }
        }
    }
}

impl StatusSink for Reporter {
    fn update(&self, mut status: InstanceStatus) {
        // Stamped here, in emission order, not when sent: a batch that is
        // put back and retried keeps its stamps, so a server that applies
        // the first attempt late cannot win over anything emitted since.
        status.seq = self.next_seq();
        self.put(status.key.clone(), Pending::Status(Box::new(status)));
    }
}

enum Phase {
    Running,
    Stopping,
    /// The supervisor task has ended (stopped on purpose, or crashed).
    Done,
}

struct Slot {
    uid: String,
    phase: Phase,
    stop: watch::Sender<bool>,
}

struct Agent {
    ctx: Arc<Context>,
    reporter: Arc<Reporter>,
    desired: HashMap<InstanceKey, Assignment>,
    actual: HashMap<InstanceKey, Slot>,
    tasks: JoinSet<()>,
    task_keys: HashMap<Id, InstanceKey>,
}

impl Agent {
    fn start(&mut self, a: &Assignment) {
        let (stop, rx) = watch::channel(false);
        let handle = self
            .tasks
            .spawn(supervisor::run(self.ctx.clone(), a.clone(), rx));
        self.task_keys.insert(handle.id(), a.key.clone());
        self.actual.insert(
            a.key.clone(),
            Slot {
                uid: a.uid.clone(),
                phase: Phase::Running,
                stop,
            },
        );
    }

    fn forget(&mut self, key: &InstanceKey) {
        let seq = self.reporter.next_seq();
        self.reporter.put(key.clone(), Pending::Forget(seq));
        let logs = self.ctx.logs.clone();
        let key = key.clone();
        // Only releases the file handle; cheap and nothing waits on it.
        self.tasks.spawn(async move { logs.close(&key).await });
    }

    fn reconcile(&mut self, key: &InstanceKey) {
        let want = self.desired.get(key).cloned();
        match (want, self.actual.get_mut(key)) {
            (Some(a), None) => match a.desired {
                DesiredState::Running => self.start(&a),
                DesiredState::Stopped => {
                    let mut st = supervisor::initial_status(&a, &self.ctx.node, &self.ctx.address);
                    st.state = InstanceState::Stopped;
                    self.reporter.update(st);
                }
            },
            (Some(a), Some(slot)) => match slot.phase {
                Phase::Running if slot.uid != a.uid || a.desired == DesiredState::Stopped => {
                    slot.stop.send_replace(true);
                    slot.phase = Phase::Stopping;
                }
                Phase::Running | Phase::Stopping => {}
                Phase::Done => {
                    if a.desired == DesiredState::Running {
                        self.actual.remove(key);
                        self.start(&a);
                    }
                }
            },
            (None, Some(slot)) => match slot.phase {
                Phase::Running => {
                    slot.stop.send_replace(true);
                    slot.phase = Phase::Stopping;
                }
                Phase::Stopping => {}
                Phase::Done => {
                    self.actual.remove(key);
                    self.forget(key);
                }
            },
            (None, None) => {}
        }
    }

    fn reconcile_all(&mut self) {
        let keys: HashSet<InstanceKey> = self
            .desired
            .keys()
            .chain(self.actual.keys())
            .cloned()
            .collect();
        for k in keys {
            self.reconcile(&k);
        }
    }

    fn task_done(&mut self, id: Id) {
        let Some(key) = self.task_keys.remove(&id) else {
            return;
        };
        if let Some(slot) = self.actual.get_mut(&key) {
            slot.phase = Phase::Done;
        }
        self.reconcile(&key);
    }

    fn apply(&mut self, ev: AssignmentEvent) -> bool {
        match ev {
            AssignmentEvent::Upsert(a) => {
                if a.node != self.ctx.node {
                    return true;
                }
                let key = a.key.clone();
                self.desired.insert(key.clone(), *a);
                self.reconcile(&key);
            }
            AssignmentEvent::Removed(key) => {
                self.desired.remove(&key);
                if self.actual.contains_key(&key) {
                    self.reconcile(&key);
                } else {
                    self.forget(&key);
                }
            }
            AssignmentEvent::Resync => return false,
        }
        true
    }

    async fn shutdown(&mut self) {
        for slot in self.actual.values_mut() {
            slot.stop.send_replace(true);
        }
        while let Some(res) = self.tasks.join_next().await {
            if let Err(e) = res {
                tracing::error!(error = %e, "supervisor task failed during shutdown");
            }
        }
    }
}

fn log_task_result(res: &Result<(Id, ()), tokio::task::JoinError>) -> Id {
    match res {
        Ok((id, ())) => *id,
        Err(e) => {
            tracing::error!(error = %e, "supervisor task failed");
            e.id()
        }
    }
}

/// Run the agent until `shutdown` turns true (or its sender is dropped).
pub async fn run(
    cfg: AgentConfig,
    control: Arc<dyn ControlPlane>,
    logs: LogStore,
    shutdown: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    run_with(cfg, control, logs, shutdown, AgentOptions::default()).await
}

/// [`run`] with [`AgentOptions`].
pub async fn run_with(
    cfg: AgentConfig,
    control: Arc<dyn ControlPlane>,
    logs: LogStore,
    mut shutdown: watch::Receiver<bool>,
    options: AgentOptions,
) -> Result<(), AgentError> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| AgentError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    let ports = PortAllocator::with_range(PortRange::from_env().map_err(AgentError::PortRange)?);
    let agent_id = orphans::agent_id(&cfg.node_id, &cfg.data_dir);
    let cgroups = Arc::new(Cgroups::detect(&agent_id));
    {
        let id = agent_id.clone();
        let cg = cgroups.clone();
        let cleanup = tokio::task::spawn_blocking(move || {
            let n = orphans::kill_orphans(&id);
            let c = cg.remove_leftovers();
            (n, c)
        });
        if let Ok((n, c)) = cleanup.await
            && (n > 0 || c > 0)
        {
            tracing::warn!(
                processes = n,
                cgroups = c,
                "cleaned up after a previous run"
            );
        }
    }

    // Before anything is reported: the mark in the data dir is moved ahead
    // of every stamp this run will hand out until it is moved again.
    let seq = crate::seq::StatusSeq::open(
        &cfg.data_dir,
        options.wall_clock_us.unwrap_or(crate::now_us),
    )?;
    let reporter = Arc::new(Reporter {
        pending: Mutex::new(HashMap::new()),
        notify: Notify::new(),
        local: options.local_statuses.clone(),
        seq,
    });
    let (reporter_done, reporter_rx) = watch::channel(false);
    let reporter_task = tokio::spawn(reporter.clone().run(control.clone(), reporter_rx));

    let inherited_env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| INHERITED_VARS.contains(&k.as_str()))
        .collect();
    let docker = Arc::new(DockerDriver::new(
        options.docker_host.clone(),
        agent_id.clone(),
        logs.clone(),
        options.container_stats.clone(),
        publish_on(&cfg.address).map(|ip| Publish {
            ip,
            ports: ports.clone(),
        }),
    ));
    let adoptable = docker.collect_adoptable().await;
    if adoptable > 0 {
        tracing::info!(containers = adoptable, "found running containers to adopt");
    }
    let ctx = Arc::new(Context {
        driver: Arc::new(ByKind {
            process: Arc::new(
                ProcessDriver::new(cgroups).with_hosts_dir(cfg.data_dir.join("hosts")),
            ),
            docker: docker.clone(),
        }),
        logs,
        ports,
        sink: reporter.clone(),
        node: cfg.node_id.clone(),
        address: cfg.address.clone(),
        agent_id,
        fallback_dir: cfg.data_dir.clone(),
        inherited_env,
        backoff: Backoff::default(),
        health_stats: options.health_stats.clone(),
    });
    let mut agent = Agent {
        ctx,
        reporter,
        desired: HashMap::new(),
        actual: HashMap::new(),
        tasks: JoinSet::new(),
        task_keys: HashMap::new(),
    };

    'outer: loop {
        let listed = tokio::select! {
            () = supervisor::stop_requested(&mut shutdown) => break 'outer,
            r = control.list_assignments(&cfg.node_id) => r,
        };
        let (list, rev) = match listed {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list assignments; retrying");
                tokio::select! {
                    () = supervisor::stop_requested(&mut shutdown) => break 'outer,
                    () = tokio::time::sleep(RETRY) => continue 'outer,
                }
            }
        };
        agent.desired = list
            .into_iter()
            .filter(|a| a.node == cfg.node_id)
            .map(|a| (a.key.clone(), a))
            .collect();
        agent.reconcile_all();
        // Supervisors for these were just started (and claim their
        // containers); any other leftover container is removed.
        docker.sweep(
            agent
                .desired
                .values()
                .filter(|a| a.desired == DesiredState::Running)
                .map(|a| (a.key.clone(), a.uid.clone()))
                .collect(),
        );

        let mut events = match control.watch_assignments(&cfg.node_id, rev + 1).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch assignments; retrying");
                tokio::select! {
                    () = supervisor::stop_requested(&mut shutdown) => break 'outer,
                    () = tokio::time::sleep(RETRY) => continue 'outer,
                }
            }
        };
        loop {
            tokio::select! {
                () = supervisor::stop_requested(&mut shutdown) => break 'outer,
                Some(res) = agent.tasks.join_next_with_id() => {
                    let id = log_task_result(&res);
                    agent.task_done(id);
                }
                ev = events.next() => match ev {
                    Some(Ok(ev)) => {
                        if !agent.apply(ev) {
                            continue 'outer;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "assignment watch failed; re-listing");
                        tokio::time::sleep(RETRY).await;
                        continue 'outer;
                    }
                    None => {
                        tracing::warn!("assignment watch ended; re-listing");
                        tokio::time::sleep(RETRY).await;
                        continue 'outer;
                    }
                },
            }
        }
    }

    agent.shutdown().await;
    reporter_done.send_replace(true);
    if let Err(e) = reporter_task.await {
        tracing::error!(error = %e, "status reporter failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_stamps_grow_and_start_at_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        let r = Reporter {
            pending: Mutex::new(HashMap::new()),
            notify: Notify::new(),
            local: None,
            seq: crate::seq::StatusSeq::open(dir.path(), crate::now_us).unwrap(),
        };
        let before = crate::now_us();
        let key = InstanceKey::new("d", "s", "web", 1);
        let mut last = 0;
        for _ in 0..1000 {
            r.update(InstanceStatus::new(key.clone(), "u", "n", 1, 0));
            let Some(Pending::Status(s)) = r.take().remove(&key) else {
                panic!("a pending status")
            };
            assert!(s.seq > last, "{} after {last}", s.seq);
            last = s.seq;
        }
        assert!(last >= before + 999);
    }
}
