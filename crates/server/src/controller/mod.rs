//! The deploy/scale controller: moves assignments (placement) toward the
//! stacks' desired state. Level-triggered and idempotent.
//!
//! ```text
//!  store ──watch /berth/──► Mirror ──plan()──► Changes ──txn (CAS on mod_revision)──► store
//!    ▲                                                                                   │
//!    └──────────────────────── our own writes come back through the watch ◄──────────────┘
//! ```
//!
//! The controller keeps an in-memory [`Mirror`] of stacks, assignments,
//! statuses and nodes fed by one watch, so a reconcile pass costs no store
//! read. [`plan`] is a pure function of the mirror (plus a clock and an id
//! source passed in); the resulting writes are committed in transactions
//! (one per 100 writes: etcd's limit, see [`commit`]) that compare every
//! touched key's `mod_revision` with the one the plan saw, so a plan
//! computed from stale state is rejected and recomputed once the watch has
//! caught up. A crash anywhere is recovered by running the loop
//! again: nothing here is remembered outside the store.
//!
//! What the controller does not do: run anything (agents do), or write
//! desired state (only the API does, through `desired.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use berth_model::{
    Assignment, DesiredState, Health, InstanceKey, InstanceState, InstanceStatus, Millis, NodeDown,
    RollbackCause, RolloutState, StackRecord, Unplaced, UnplacedInstance, keys,
};
use berth_scheduler::{Ask, Placed, Reservation, Snapshot};
use berth_spec::types::{DependencyCondition, DeployMode, Service};
use berth_store::chunk::Part;
use berth_store::{Compare, Op, Revision, Store, encode};
use tokio::sync::watch;

use crate::desired::{self, Command, DesiredError};
use crate::mirror::{self, Follower, Mirror};

pub mod rollout;

#[cfg(test)]
mod node_loss_tests;

pub use rollout::{Failure, FailureAction};
use rollout::{Inst, ServiceInput};

/// One write the controller wants, with the revision it expects the key at.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Create or replace an assignment.
    Put {
        /// Store key.
        key: String,
        /// New assignment (boxed: it carries a whole service spec).
        assignment: Box<Assignment>,
        /// Expected mod revision (0 = must not exist).
        expect: Revision,
    },
    /// Remove an assignment (the agent stops the instance gracefully).
    Delete {
        /// Store key.
        key: String,
        /// Expected mod revision.
        expect: Revision,
    },
}

/// A stack's unplaced instances as the controller wants them recorded
/// (`value: None` deletes the record), with the revision it expects the key
/// at. Written in the same transactions as placements, so only the leader
/// (the fencing token) can write it.
#[derive(Debug, Clone, PartialEq)]
pub struct UnplacedWrite {
    /// Store key (`/berth/unplaced/<ns>/<stack>`).
    pub key: String,
    /// The new record; `None` removes it (everything is placed).
    pub value: Option<Unplaced>,
    /// Expected mod revision (0 = must not exist).
    pub expect: Revision,
}

/// A node's down mark as the controller wants it (`since: None` deletes
/// it: the node is back, or has nothing assigned any more), with the
/// revision it expects the key at.
#[derive(Debug, Clone, PartialEq)]
pub struct DownWrite {
    /// Node id.
    pub node: String,
    /// Since when it is down.
    pub since: Option<Millis>,
    /// Expected mod revision (0 = must not exist).
    pub expect: Revision,
}

/// A rollout event for the controller to turn into a desired-state command.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// Every service runs the rollout's release and passed its monitor.
    Complete {
        /// Namespace.
        namespace: String,
        /// Stack.
        stack: String,
        /// Release.
        release: u64,
        /// Restart generation sum.
        generation: u64,
    },
    /// A new instance failed while the rollout was in progress.
    Failed {
        /// Namespace.
        namespace: String,
        /// Stack.
        stack: String,
        /// The failing release.
        release: u64,
        /// Restart generation sum.
        generation: u64,
        /// What failed and what to do about it.
        failure: Failure,
    },
}

/// What one reconcile pass wants.
#[derive(Debug, Default)]
pub struct Plan {
    /// Placement writes.
    pub changes: Vec<Change>,
    /// Rollout events (complete, failed).
    pub reports: Vec<Report>,
    /// Records of instances that fit no node, where they changed.
    pub unplaced: Vec<UnplacedWrite>,
    /// Down marks of lost nodes, where they changed.
    pub down: Vec<DownWrite>,
    /// When to plan again even if no event arrives (drain ends, `delay`
    /// passes, a monitor period ends).
    pub wake_at: Option<Millis>,
}

/// What the controller knows about nodes that went away.
#[derive(Debug, Clone, Default)]
pub struct Liveness {
    /// Nodes that still have assignments but no node record (their lease
    /// expired), with when the controller first saw them missing.
    pub down_since: BTreeMap<String, Millis>,
    /// How long a node may be missing before its instances are placed
    /// elsewhere (`--reschedule-after`).
    pub reschedule_after_ms: Millis,
}

impl Liveness {
    /// Default grace period before rescheduling a lost node's instances.
    pub const DEFAULT_RESCHEDULE_AFTER_MS: Millis = 10_000;

    /// Note which nodes with assignments are missing from `mirror` now.
    ///
    /// A node's clock starts at the down mark in the store when there is
    /// one (written by this leader or a previous one), so a change of
    /// leader continues the grace period instead of starting it again.
    pub fn observe(&mut self, mirror: &Mirror, now: Millis) {
        let missing: BTreeSet<&str> = mirror
            .assignments
            .values()
            .map(|(a, _)| a.node.as_str())
            .filter(|n| !mirror.nodes.contains_key(*n))
            .collect();
        self.down_since.retain(|n, _| missing.contains(n.as_str()));
        for n in missing {
            let stored = mirror.down.get(n).map(|(d, _)| d.since);
            let since = self.down_since.entry(n.to_owned()).or_insert_with(|| {
                match stored {
                    Some(since) => tracing::warn!(
                        node = n,
                        down_for_ms = now.saturating_sub(since),
                        "node is down (as recorded before this controller started)"
                    ),
                    None => tracing::warn!(node = n, "node is down (its record expired)"),
                }
                stored.unwrap_or(now)
            });
            if let Some(stored) = stored {
                *since = (*since).min(stored);
            }
        }
    }

    /// The writes that make the store's down marks match `down_since`.
    fn writes(&self, mirror: &Mirror) -> Vec<DownWrite> {
        let mut out = Vec::new();
        for (node, since) in &self.down_since {
            let expect = match mirror.down.get(node) {
                Some((d, _)) if d.since == *since => continue,
                Some((_, rev)) => *rev,
                None => 0,
            };
            out.push(DownWrite {
                node: node.clone(),
                since: Some(*since),
                expect,
            });
        }
        for (node, (_, rev)) in &mirror.down {
            if !self.down_since.contains_key(node) {
                out.push(DownWrite {
                    node: node.clone(),
                    since: None,
                    expect: *rev,
                });
            }
        }
        out
    }

    /// Whether instances on `node` are to be placed elsewhere at `now`.
    fn lost(&self, node: &str, now: Millis) -> bool {
        self.down_since
            .get(node)
            .is_some_and(|since| now >= since.saturating_add(self.reschedule_after_ms))
    }
}

/// Compute the writes that move placement toward desired state, with no
/// node down (see [`plan_with`]).
///
/// `new_uid` gives a fresh incarnation id each call.
pub fn plan(mirror: &Mirror, now: Millis, new_uid: &mut dyn FnMut() -> String) -> Plan {
    plan_with(mirror, now, &Liveness::default(), new_uid)
}

/// Compute the writes that move placement toward desired state.
///
/// Instances on a node down for longer than the grace period, and
/// instances of a `global` service on a node that is no longer eligible,
/// are evicted: their assignments are deleted and, the service being short
/// of replicas, new ones are placed on live nodes in the same plan.
pub fn plan_with(
    mirror: &Mirror,
    now: Millis,
    liveness: &Liveness,
    new_uid: &mut dyn FnMut() -> String,
) -> Plan {
    let mut out = Plan::default();
    let snapshot = snapshot(mirror);
    let mut by_service: BTreeMap<(&str, &str, &str), Vec<Inst<'_>>> = BTreeMap::new();
    let mut global_eligible: BTreeMap<(&str, &str, &str), BTreeSet<String>> = BTreeMap::new();
    for (record, _) in mirror.stacks.values() {
        for (name, service) in &record.spec.services {
            if service.deploy.mode == DeployMode::Global {
                let id = (
                    record.namespace.as_str(),
                    record.name.as_str(),
                    name.as_str(),
                );
                let key = InstanceKey {
                    namespace: record.namespace.clone(),
                    stack: record.name.clone(),
                    service: name.clone(),
                    slot: 0,
                };
                let nodes = berth_scheduler::eligible_nodes(&snapshot, &key, service);
                global_eligible.insert(id, nodes.into_iter().collect());
            }
        }
    }
    for (k, (a, rev)) in &mirror.assignments {
        let id = (
            a.key.namespace.as_str(),
            a.key.stack.as_str(),
            a.key.service.as_str(),
        );
        let node_up = mirror.nodes.contains_key(&a.node);
        if let Some(since) = liveness.down_since.get(&a.node)
            && !liveness.lost(&a.node, now)
        {
            let at = since.saturating_add(liveness.reschedule_after_ms);
            out.wake_at = Some(out.wake_at.map_or(at, |w| w.min(at)));
        }
        let evict = if liveness.lost(&a.node, now) {
            Some("its node is down")
        } else if node_up
            && global_eligible
                .get(&id)
                .is_some_and(|nodes| !nodes.contains(&a.node))
        {
            Some("its node is no longer eligible for this global service")
        } else {
            None
        };
        if let Some(why) = evict {
            tracing::info!(instance = %a.key, node = %a.node, "rescheduling: {why}");
            out.changes.push(Change::Delete {
                key: k.clone(),
                expect: *rev,
            });
            continue;
        }
        let status = mirror.statuses.get(&a.key).filter(|s| s.uid == a.uid);
        by_service
            .entry((&a.key.namespace, &a.key.stack, &a.key.service))
            .or_default()
            .push(Inst {
                key: k,
                a,
                rev: *rev,
                status,
            });
    }
    let assigned: BTreeSet<&InstanceKey> =
        mirror.assignments.values().map(|(a, _)| &a.key).collect();
    let mut wanted_services: BTreeSet<(&str, &str, &str)> = BTreeSet::new();
    let draining: BTreeSet<&str> = mirror
        .nodes
        .values()
        .filter(|n| n.draining)
        .map(|n| n.id.as_str())
        .collect();
    let mut asks: Vec<(InstanceKey, &Service, &StackRecord)> = Vec::new();
    let mut unplaced: BTreeMap<String, Unplaced> = BTreeMap::new();

    for (record, _) in mirror.stacks.values() {
        let mut all_settled = true;
        let mut failure: Option<Failure> = None;
        for (name, service) in &record.spec.services {
            let id = (
                record.namespace.as_str(),
                record.name.as_str(),
                name.as_str(),
            );
            wanted_services.insert(id);
            let desired = record.services.get(name);
            let mut instances = by_service.get(&id).cloned().unwrap_or_default();
            instances.sort_by_key(|i| i.a.key.slot);
            let of_service = |k: &InstanceKey| {
                k.namespace == record.namespace && k.stack == record.name && k.service == *name
            };
            let orphans: Vec<&InstanceStatus> = mirror
                .statuses
                .values()
                .filter(|s| of_service(&s.key) && !assigned.contains(&s.key))
                .collect();
            let max_slot = instances
                .iter()
                .map(|i| i.a.key.slot)
                .chain(
                    mirror
                        .statuses
                        .keys()
                        .filter(|k| of_service(k))
                        .map(|k| k.slot),
                )
                .max()
                .unwrap_or(0);
            let input = ServiceInput {
                record,
                spec: service,
                replicas: if service.deploy.mode == DeployMode::Global {
                    // Eligible live nodes, plus down nodes whose instance
                    // is still within its grace period.
                    let eligible = global_eligible.get(&id).map_or(0, BTreeSet::len);
                    let waiting = instances
                        .iter()
                        .filter(|i| !mirror.nodes.contains_key(&i.a.node))
                        .count();
                    u32::try_from(eligible + waiting).unwrap_or(u32::MAX)
                } else {
                    desired.map_or(service.deploy.replicas, |d| d.replicas)
                },
                stopped: desired.is_some_and(|d| d.stopped),
                generation: desired.map_or(0, |d| d.restart_generation),
                instances,
                orphans,
                max_slot,
                deps_met: dependencies_met(mirror, record, service),
                now,
                draining: &draining,
            };
            let svc = rollout::plan_service(&input, new_uid);
            for (key, assignment, expect) in svc.puts {
                out.changes.push(Change::Put {
                    key,
                    assignment: Box::new(assignment),
                    expect,
                });
            }
            for (key, expect) in svc.deletes {
                out.changes.push(Change::Delete { key, expect });
            }
            if let Some(w) = svc.wake_at {
                out.wake_at = Some(out.wake_at.map_or(w, |o| o.min(w)));
            }
            all_settled &= svc.settled;
            if failure.is_none() {
                failure = svc.failure;
            }
            if svc.create > 0 && input.deps_met {
                for slot in svc.first_slot..svc.first_slot + svc.create {
                    let key = InstanceKey {
                        namespace: record.namespace.clone(),
                        stack: record.name.clone(),
                        service: name.clone(),
                        slot,
                    };
                    asks.push((key, service, record));
                }
            }
        }
        let rollout = record
            .rollout
            .as_ref()
            .filter(|r| r.release == record.release && r.state == RolloutState::InProgress);
        if rollout.is_some() {
            let (namespace, stack) = (record.namespace.clone(), record.name.clone());
            let (release, generation) = (record.release, crate::desired::generation_of(record));
            if let Some(failure) = failure {
                out.reports.push(Report::Failed {
                    namespace,
                    stack,
                    release,
                    generation,
                    failure,
                });
            } else if all_settled {
                out.reports.push(Report::Complete {
                    namespace,
                    stack,
                    release,
                    generation,
                });
            }
        }
    }
    // Assignments of services or stacks that no longer exist.
    for (id, slots) in &by_service {
        if !wanted_services.contains(id) {
            for i in slots {
                out.changes.push(Change::Delete {
                    key: i.key.clone(),
                    expect: i.rev,
                });
            }
        }
    }

    if !asks.is_empty() {
        let scheduler_asks: Vec<Ask<'_>> = asks
            .iter()
            .map(|(key, service, _)| Ask { key, service })
            .collect();
        let result = berth_scheduler::place(&snapshot, &scheduler_asks);
        let by_key: BTreeMap<&InstanceKey, (&Service, &StackRecord)> =
            asks.iter().map(|(k, s, r)| (k, (*s, *r))).collect();
        for (key, node) in result.placements {
            let Some((service, record)) = by_key.get(&key) else {
                continue;
            };
            let generation = record
                .services
                .get(&key.service)
                .map_or(0, |d| d.restart_generation);
            let assignment = Assignment {
                uid: new_uid(),
                node: node.clone(),
                release: record.release,
                restart_generation: generation,
                service: (*service).clone(),
                env: crate::vip::instance_env(mirror, record, service),
                desired: DesiredState::Running,
                created_at: now,
                key: key.clone(),
                retire_at: None,
            };
            out.changes.push(Change::Put {
                key: keys::assignment(&node, &key),
                assignment: Box::new(assignment),
                expect: 0,
            });
        }
        for (key, reason) in result.unplaced {
            unplaced
                .entry(keys::unplaced(&key.namespace, &key.stack))
                .or_default()
                .instances
                .push(UnplacedInstance {
                    service: key.service,
                    slot: key.slot,
                    reason,
                });
        }
    }
    out.unplaced = unplaced_writes(mirror, unplaced);
    out.down = liveness.writes(mirror);
    out
}

/// The writes that make the stored unplaced records equal `want` (by store
/// key): only records that differ are written, so a pass that changes
/// nothing writes nothing (and does not wake itself up through the watch).
fn unplaced_writes(mirror: &Mirror, mut want: BTreeMap<String, Unplaced>) -> Vec<UnplacedWrite> {
    for u in want.values_mut() {
        u.instances
            .sort_by(|a, b| (&a.service, a.slot).cmp(&(&b.service, b.slot)));
    }
    let mut out = Vec::new();
    for (key, (have, rev)) in &mirror.unplaced {
        match want.remove(key) {
            Some(w) if w == *have => {}
            value => out.push(UnplacedWrite {
                key: key.clone(),
                value,
                expect: *rev,
            }),
        }
    }
    out.extend(want.into_iter().map(|(key, value)| UnplacedWrite {
        key,
        value: Some(value),
        expect: 0,
    }));
    for w in &out {
        if let Some(first) = w.value.as_ref().and_then(|v| v.instances.first()) {
            tracing::warn!(
                stack = %w.key,
                count = w.value.as_ref().map_or(0, |v| v.instances.len()),
                reason = %first.reason,
                "instances cannot be placed"
            );
        }
    }
    out
}

/// What the scheduler sees: the nodes that are up and every assignment.
fn snapshot(mirror: &Mirror) -> Snapshot<'_> {
    Snapshot {
        nodes: mirror.nodes.values().collect(),
        placed: mirror
            .assignments
            .values()
            .map(|(a, _)| Placed {
                key: &a.key,
                node: a.node.as_str(),
                reservation: Reservation::of(&a.service),
            })
            .collect(),
    }
}

/// Whether every `depends_on` of `service` holds, judged from statuses.
///
/// A dependency "holds" when it has at least one instance and every
/// instance it has satisfies the condition; optional (`required: false`)
/// dependencies that are not part of the stack are skipped.
fn dependencies_met(mirror: &Mirror, record: &StackRecord, service: &Service) -> bool {
    if service.depends_on.is_empty() {
        return true;
    }
    // Only statuses of the current incarnation count: a status left from
    // before a `stop` or a replacement says nothing about what runs now.
    let current: std::collections::HashMap<&InstanceKey, &str> = mirror
        .assignments
        .values()
        .map(|(a, _)| (&a.key, a.uid.as_str()))
        .collect();
    service.depends_on.iter().all(|(dep, d)| {
        if !record.spec.services.contains_key(dep) {
            return !d.required;
        }
        let instances: Vec<&InstanceStatus> = mirror
            .statuses
            .values()
            .filter(|s| {
                s.key.namespace == record.namespace
                    && s.key.stack == record.name
                    && s.key.service == *dep
                    && current.get(&s.key) == Some(&s.uid.as_str())
            })
            .collect();
        !instances.is_empty()
            && instances.iter().all(|s| match d.condition {
                DependencyCondition::ServiceStarted => s.state == InstanceState::Running,
                DependencyCondition::ServiceHealthy => {
                    s.state == InstanceState::Running
                        && matches!(s.health, Health::Healthy | Health::None)
                }
                DependencyCondition::ServiceCompletedSuccessfully => {
                    s.state == InstanceState::Exited
                        && s.last_exit.as_ref().is_some_and(|e| e.code == Some(0))
                }
            })
    })
}

/// A source of unique incarnation ids: time, pid and a counter, so ids from
/// a restarted server never collide with the previous run's.
pub fn uid_source() -> impl FnMut() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let boot = crate::now_ms();
    let pid = std::process::id();
    move || {
        format!(
            "{boot:x}-{pid:x}-{:x}",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        )
    }
}

/// How a controller runs.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// The leader key's revision when this server won the election: every
    /// commit requires it unchanged, so a deposed leader cannot write.
    /// `None` runs unfenced (tests, a single server).
    pub fence: Option<Revision>,
    /// Grace period before a lost node's instances are rescheduled.
    pub reschedule_after_ms: Millis,
    /// Where the controller's watch lag is measured (`None`: not measured).
    pub watch_lag: Option<crate::metrics::WatchLag>,
}

/// Run the controller until `shutdown` turns true. `logs` (this node's log
/// store) lets an automatic rollback quote the failing instance's last lines.
pub async fn run(
    store: Arc<dyn Store>,
    shutdown: watch::Receiver<bool>,
    logs: Option<berth_agent::logs::LogStore>,
    settings: Settings,
) -> anyhow::Result<()> {
    let mut controller = Controller {
        store: store.clone(),
        uids: Box::new(uid_source()),
        wait_for: 0,
        wake_at: None,
        reported: BTreeSet::new(),
        logs,
        fence: settings.fence,
        liveness: Liveness {
            down_since: BTreeMap::new(),
            reschedule_after_ms: settings.reschedule_after_ms,
        },
        vip_picker: Box::new(crate::vip::random_picker()),
    };
    mirror::follow(store, shutdown, &mut controller, settings.watch_lag).await
}

/// Log lines quoted in an automatic rollback's reason.
const REASON_LOG_LINES: usize = 5;

struct Controller {
    store: Arc<dyn Store>,
    uids: Box<dyn FnMut() -> String + Send + Sync>,
    /// After a commit, do not plan again before the watch shows it: the plan
    /// would be computed from state we already changed.
    wait_for: Revision,
    /// The last plan's wake-up time.
    wake_at: Option<Millis>,
    /// Reports already turned into commands, so one failure is acted on once
    /// even while the watch has not shown the command's effect yet.
    reported: BTreeSet<(String, String, u64, u64)>,
    logs: Option<berth_agent::logs::LogStore>,
    fence: Option<Revision>,
    liveness: Liveness,
    /// Chooses free service addresses (random, see `vip.rs`).
    vip_picker: crate::vip::Picker,
}

impl Follower for Controller {
    async fn changed(&mut self, mirror: &Mirror, seen: Revision) -> anyhow::Result<()> {
        if seen < self.wait_for {
            // Our own commit will come back through the watch and wake us.
            self.wake_at = None;
            return Ok(());
        }
        // Services get their stable addresses before their instances (and
        // their dependents') are created, so the discovery environment is
        // complete from the first start.
        let vips = crate::vip::changes(mirror, &mut self.vip_picker);
        if !vips.is_empty()
            && let Some(rev) = crate::vip::commit(self.store.as_ref(), &vips, self.fence).await?
        {
            self.wait_for = rev;
            self.wake_at = None;
            return Ok(());
        }
        let now = crate::now_ms();
        self.liveness.observe(mirror, now);
        let plan = plan_with(mirror, now, &self.liveness, &mut self.uids);
        self.wake_at = plan.wake_at;
        if !plan.changes.is_empty() || !plan.unplaced.is_empty() || !plan.down.is_empty() {
            match commit(self.store.as_ref(), &plan, self.fence).await? {
                Some(rev) => self.wait_for = rev,
                None => tracing::debug!("plan was stale; waiting for the watch to catch up"),
            }
        }
        for report in plan.reports {
            self.report(report).await?;
        }
        Ok(())
    }

    fn relisted(&mut self) {
        self.wait_for = 0;
    }

    fn wake_at(&self) -> Option<Millis> {
        self.wake_at
    }
}

impl Controller {
    /// Turn a rollout event into a desired-state command (the only way the
    /// controller touches desired state).
    async fn report(&mut self, report: Report) -> anyhow::Result<()> {
        let (namespace, stack, release, generation) = match &report {
            Report::Complete {
                namespace,
                stack,
                release,
                generation,
            }
            | Report::Failed {
                namespace,
                stack,
                release,
                generation,
                ..
            } => (namespace.clone(), stack.clone(), *release, *generation),
        };
        let id = (namespace.clone(), stack.clone(), release, generation);
        if !self.reported.insert(id) {
            return Ok(());
        }
        let cmd = match report {
            Report::Complete { .. } => Command::SetRollout {
                namespace,
                stack,
                release,
                generation,
                state: RolloutState::Complete,
                message: format!("every instance runs v{release}"),
            },
            Report::Failed { failure, .. } => {
                let reason = self.reason(&failure).await;
                match (failure.action, failure.rollback_to) {
                    (FailureAction::Rollback, Some(to)) => {
                        tracing::warn!(%namespace, %stack, release, to, %reason, "rollout failed; rolling back");
                        Command::Rollback {
                            namespace,
                            stack,
                            to: Some(to),
                            author: "berth".into(),
                            if_current: Some(release),
                            cause: Some(RollbackCause {
                                from: release,
                                instance: Some(failure.instance.short()),
                                reason,
                            }),
                        }
                    }
                    (action, _) => {
                        let why = if action == FailureAction::Rollback {
                            " (nothing to roll back to: a restart, or the first release)"
                        } else {
                            ""
                        };
                        tracing::warn!(%namespace, %stack, release, %reason, "rollout failed; paused");
                        Command::SetRollout {
                            namespace,
                            stack,
                            release,
                            generation,
                            state: RolloutState::Paused,
                            message: format!("paused{why}: {reason}"),
                        }
                    }
                }
            }
        };
        match desired::apply(self.store.as_ref(), &cmd, crate::now_ms()).await {
            Ok(_) => Ok(()),
            // The stack moved on (a newer deploy, a removal): nothing to do.
            Err(DesiredError::Superseded { .. } | DesiredError::StackNotFound { .. }) => Ok(()),
            Err(DesiredError::Store(e)) => Err(e.into()),
            Err(e) => {
                tracing::error!(error = %e, "rollout report refused");
                Ok(())
            }
        }
    }

    /// The failure, with the failing instance's last log lines.
    async fn reason(&self, failure: &Failure) -> String {
        let mut reason = failure.reason.clone();
        let Some(logs) = &self.logs else {
            return reason;
        };
        let key = &failure.instance;
        let q = berth_agent::logs::LogQuery {
            namespace: key.namespace.clone(),
            stack: key.stack.clone(),
            services: vec![key.service.clone()],
            since_us: None,
            tail: None,
        };
        if let Ok(lines) = logs.read(&q).await {
            let mine: Vec<&str> = lines
                .iter()
                .filter(|l| l.key == *key && l.stream != berth_model::LogStream::System)
                .map(|l| l.line.as_str())
                .collect();
            let tail = &mine[mine.len().saturating_sub(REASON_LOG_LINES)..];
            if !tail.is_empty() {
                reason.push_str("; last log lines: ");
                reason.push_str(&tail.join(" | "));
            }
        }
        reason
    }
}

/// Commit a plan: the revision after the last transaction applied, `None`
/// when the first one's compares failed (the plan was stale).
///
/// A plan of more than [`berth_store::chunk::MAX_TXN_OPS`] writes (scaling
/// to a few hundred instances, a lost node's instances) goes in several
/// transactions, in plan order, because etcd refuses bigger ones. Each is
/// fenced (the leader's token) and compares the revision of every key it
/// writes, so none applies a stale or deposed leader's decision; but one
/// can fail after earlier ones were applied. The next pass then plans from
/// what was applied: placements already made count against their nodes,
/// an evicted instance whose replacement was not written yet is placed
/// again. So a big plan is carried out in steps, never twice.
async fn commit(
    store: &dyn Store,
    plan: &Plan,
    fence: Option<Revision>,
) -> anyhow::Result<Option<Revision>> {
    let (changes, unplaced) = (&plan.changes, &plan.unplaced);
    let common: Vec<Compare> = fence
        .map(|token| Compare::ModRevision(crate::leader::KEY.to_owned(), token))
        .into_iter()
        .collect();
    let mut parts = Vec::with_capacity(changes.len() + unplaced.len());
    for c in changes {
        parts.push(match c {
            Change::Put {
                key,
                assignment,
                expect,
            } => Part::guarded(
                Compare::ModRevision(key.clone(), *expect),
                Op::put(key.clone(), encode(key, assignment)?),
            ),
            Change::Delete { key, expect } => Part::guarded(
                Compare::ModRevision(key.clone(), *expect),
                Op::Delete(key.clone()),
            ),
        });
    }
    for w in unplaced {
        parts.push(Part::guarded(
            Compare::ModRevision(w.key.clone(), w.expect),
            match &w.value {
                Some(v) => Op::put(w.key.clone(), encode(&w.key, v)?),
                None => Op::Delete(w.key.clone()),
            },
        ));
    }
    for d in &plan.down {
        let key = keys::node_down(&d.node);
        parts.push(Part::guarded(
            Compare::ModRevision(key.clone(), d.expect),
            match d.since {
                Some(since) => Op::put(key.clone(), encode(&key, &NodeDown { since })?),
                None => Op::Delete(key),
            },
        ));
    }
    let done = berth_store::chunk::commit(store, &common, parts).await?;
    if done.applied > 0 && !done.complete() {
        tracing::debug!(
            applied = done.applied,
            of = done.of,
            "plan applied in part; the rest is planned again"
        );
    }
    Ok(done.revision)
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_model::{Node, ServiceDesired};

    fn stack(replicas: u32) -> StackRecord {
        let yaml = "services:\n  web:\n    command: sleep 100\n  db:\n    command: sleep 100\n";
        let mut services = BTreeMap::new();
        services.insert(
            "web".to_owned(),
            ServiceDesired {
                replicas,
                stopped: false,
                restart_generation: 0,
            },
        );
        StackRecord {
            namespace: "default".into(),
            name: "shop".into(),
            release: 1,
            spec: crate::test_util::stack(yaml),
            services,
            updated_at: 0,
            config: Default::default(),
            rollout: None,
        }
    }

    fn mirror_with(record: StackRecord) -> Mirror {
        let mut m = Mirror::default();
        m.stacks.insert(keys::stack("default", "shop"), (record, 5));
        m.nodes.insert(
            "n1".into(),
            Node {
                id: "n1".into(),
                address: "127.0.0.1".into(),
                labels: BTreeMap::new(),
                facts: BTreeMap::new(),
                draining: false,
                updated_at: 0,
            },
        );
        m
    }

    fn apply(m: &mut Mirror, changes: &[Change], rev: &mut Revision) {
        for c in changes {
            *rev += 1;
            match c {
                Change::Put {
                    key, assignment, ..
                } => {
                    m.assignments
                        .insert(key.clone(), ((**assignment).clone(), *rev));
                }
                Change::Delete { key, .. } => {
                    m.assignments.remove(key);
                }
            }
        }
    }

    /// Regression: `berth stop` then `berth start` used to start every
    /// service at once, and a stale "healthy" status of a stopped
    /// dependency let dependants through.
    #[test]
    fn start_after_stop_waits_for_healthy_dependencies() {
        let yaml = "services:\n  db:\n    command: sleep 100\n  app:\n    command: sleep 100\n    depends_on:\n      db: { condition: service_healthy }\n";
        let spec = load(yaml);
        let mut record = stack(1);
        record.spec = spec;
        record.services.clear();
        let mut m = mirror_with(record);
        let mut n = 0;
        let mut uid = || {
            n += 1;
            format!("u{n}")
        };
        let mut rev = 10;
        let services = |c: &[Change]| -> Vec<String> {
            c.iter()
                .filter_map(|c| match c {
                    Change::Put { assignment, .. }
                        if assignment.desired == DesiredState::Running =>
                    {
                        Some(assignment.key.service.clone())
                    }
                    _ => None,
                })
                .collect()
        };
        // First `up`: only db, app waits.
        let c = plan(&m, 1, &mut uid).changes;
        assert_eq!(services(&c), vec!["db".to_owned()]);
        apply(&mut m, &c, &mut rev);
        let status = |m: &Mirror, service: &str, state, health| {
            let (a, _) = m
                .assignments
                .values()
                .find(|(a, _)| a.key.service == service)
                .unwrap();
            InstanceStatus {
                state,
                health,
                pid: Some(1),
                ..InstanceStatus::new(a.key.clone(), a.uid.clone(), "n1", 1, 0)
            }
        };
        let db = status(&m, "db", InstanceState::Running, Health::Healthy);
        m.statuses.insert(db.key.clone(), db);
        let c = plan(&m, 2, &mut uid).changes;
        assert_eq!(services(&c), vec!["app".to_owned()]);
        apply(&mut m, &c, &mut rev);

        // `berth stop`: both stopped; the agent reports db stopped.
        for (r, _) in m.stacks.values_mut() {
            for name in ["db", "app"] {
                r.services.insert(
                    name.into(),
                    ServiceDesired {
                        replicas: 1,
                        stopped: true,
                        restart_generation: 0,
                    },
                );
            }
        }
        let c = plan(&m, 3, &mut uid).changes;
        apply(&mut m, &c, &mut rev);
        let db = status(&m, "db", InstanceState::Stopped, Health::Healthy);
        m.statuses.insert(db.key.clone(), db);

        // `berth start`: db first; app only once db is healthy again.
        for (r, _) in m.stacks.values_mut() {
            r.services.values_mut().for_each(|d| d.stopped = false);
        }
        let c = plan(&m, 4, &mut uid).changes;
        assert_eq!(services(&c), vec!["db".to_owned()]);
        apply(&mut m, &c, &mut rev);
        assert!(
            services(&plan(&m, 5, &mut uid).changes).is_empty(),
            "app waits for db"
        );
        let db = status(&m, "db", InstanceState::Running, Health::Healthy);
        m.statuses.insert(db.key.clone(), db);
        assert_eq!(
            services(&plan(&m, 6, &mut uid).changes),
            vec!["app".to_owned()]
        );
    }

    #[test]
    fn scale_up_then_down_removes_highest_slots() {
        let mut m = mirror_with(stack(3));
        let mut n = 0;
        let mut uid = || {
            n += 1;
            format!("u{n}")
        };
        let mut rev = 10;
        let c = plan(&m, 1, &mut uid).changes;
        assert_eq!(c.len(), 4, "3 web + 1 db: {c:?}");
        apply(&mut m, &c, &mut rev);
        assert!(
            plan(&m, 2, &mut uid).changes.is_empty(),
            "second pass is a no-op"
        );

        for (r, _) in m.stacks.values_mut() {
            if let Some(d) = r.services.get_mut("web") {
                d.replicas = 1;
            }
        }
        // Nothing routable: stopped (retiring) at once, deleted next pass.
        let c = plan(&m, 3, &mut uid).changes;
        let stopped: Vec<_> = c
            .iter()
            .filter_map(|c| match c {
                Change::Put { assignment, .. }
                    if assignment.desired == DesiredState::Stopped
                        && assignment.retire_at.is_some() =>
                {
                    Some(assignment.key.slot)
                }
                _ => None,
            })
            .collect();
        assert_eq!(stopped, vec![2, 3]);
        apply(&mut m, &c, &mut rev);
        let c = plan(&m, 4, &mut uid).changes;
        let deleted: Vec<_> = c
            .iter()
            .filter_map(|c| match c {
                Change::Delete { key, .. } => keys::parse_instance(key).map(|k| k.slot),
                Change::Put { .. } => None,
            })
            .collect();
        assert_eq!(deleted, vec![2, 3]);
    }

    #[test]
    fn spec_change_replaces_and_release_bump_alone_does_not() {
        let mut m = mirror_with(stack(1));
        let mut n = 0;
        let mut uid = || {
            n += 1;
            format!("u{n}")
        };
        let mut rev = 10;
        let c = plan(&m, 1, &mut uid).changes;
        apply(&mut m, &c, &mut rev);
        let web_uid = |m: &Mirror| {
            m.assignments
                .values()
                .find(|(a, _)| a.key.service == "web")
                .map(|(a, _)| a.uid.clone())
        };
        let before = web_uid(&m);
        m.stacks.values_mut().for_each(|(r, _)| r.release = 2);
        let c = plan(&m, 2, &mut uid).changes;
        apply(&mut m, &c, &mut rev);
        assert_eq!(web_uid(&m), before, "same spec, new release: no restart");
        m.stacks.values_mut().for_each(|(r, _)| {
            if let Some(s) = r.spec.services.get_mut("web") {
                s.stop_grace_period_ms = 1;
            }
        });
        // Stop-first: stopped, deleted, then a new instance.
        for now in 3..6 {
            let c = plan(&m, now, &mut uid).changes;
            apply(&mut m, &c, &mut rev);
        }
        assert!(web_uid(&m).is_some());
        assert_ne!(web_uid(&m), before, "changed spec: replaced");
    }

    #[test]
    fn removed_stack_loses_its_assignments() {
        let mut m = mirror_with(stack(2));
        let mut uid = || "u".to_owned();
        let mut rev = 10;
        let c = plan(&m, 1, &mut uid).changes;
        apply(&mut m, &c, &mut rev);
        m.stacks.clear();
        let c = plan(&m, 2, &mut uid).changes;
        assert_eq!(
            c.iter()
                .filter(|c| matches!(c, Change::Delete { .. }))
                .count(),
            3
        );
    }

    // ---- rolling updates -------------------------------------------------

    const WEB: &str = "services:\n  web:\n    command: sleep 100\n    ports: ['18080:80']\n    environment: {VERSION: '1'}\n";

    use crate::test_util::stack as load;

    /// A simulated cluster: the mirror, a clock, uids, and an "agent" that
    /// reports statuses for assignments.
    struct Sim {
        m: Mirror,
        now: Millis,
        rev: Revision,
        n: u32,
    }

    impl Sim {
        /// An assignment (and its revision) made for `release`.
        fn assignment_of_release(&self, release: u64) -> (Assignment, berth_store::Revision) {
            self.m
                .assignments
                .values()
                .find(|(a, _)| a.release == release)
                .cloned()
                .expect("an instance of the release")
        }

        fn new(yaml: &str, replicas: u32) -> Self {
            let spec = load(yaml);
            let services = spec
                .services
                .keys()
                .map(|k| {
                    (
                        k.clone(),
                        ServiceDesired {
                            replicas,
                            stopped: false,
                            restart_generation: 0,
                        },
                    )
                })
                .collect();
            let record = StackRecord {
                namespace: "default".into(),
                name: "shop".into(),
                release: 1,
                spec,
                services,
                updated_at: 0,
                config: Default::default(),
                rollout: None,
            };
            Self {
                m: mirror_with(record),
                now: 1_000,
                rev: 10,
                n: 0,
            }
        }

        fn record(&mut self) -> &mut StackRecord {
            &mut self.m.stacks.values_mut().next().expect("one stack").0
        }

        /// Submit a new release: the spec edited by `f`, rollout in progress.
        fn deploy(&mut self, f: impl FnOnce(&mut berth_spec::types::Service)) {
            let now = self.now;
            let r = self.record();
            r.release += 1;
            if let Some(s) = r.spec.services.get_mut("web") {
                f(s);
            }
            r.rollout = Some(berth_model::RolloutStatus {
                release: r.release,
                generation: 0,
                state: RolloutState::InProgress,
                message: String::new(),
                rolled_back: None,
                started_at: now,
                updated_at: now,
            });
        }

        fn step(&mut self) -> Plan {
            let mut n = self.n;
            let mut uid = || {
                n += 1;
                format!("u{n}")
            };
            let plan = plan(&self.m, self.now, &mut uid);
            self.n = n;
            apply(&mut self.m, &plan.changes, &mut self.rev);
            // The agent forgets the statuses of deleted assignments once
            // their instance stopped (here: at once).
            let assigned: BTreeSet<InstanceKey> = self
                .m
                .assignments
                .values()
                .map(|(a, _)| a.key.clone())
                .collect();
            self.m.statuses.retain(|k, _| assigned.contains(k));
            plan
        }

        /// The agent starts every assignment and reports it routable.
        fn healthy(&mut self) -> bool {
            let now = self.now;
            let mut changed = false;
            for (a, _) in self.m.assignments.values() {
                if a.desired == DesiredState::Stopped {
                    let stopped = self
                        .m
                        .statuses
                        .get(&a.key)
                        .is_some_and(|s| s.state == InstanceState::Stopped);
                    if !stopped {
                        let mut st = status(a, now, Health::None);
                        st.state = InstanceState::Stopped;
                        self.m.statuses.insert(a.key.clone(), st);
                        changed = true;
                    }
                    continue;
                }
                let fresh = self.m.statuses.get(&a.key).is_none_or(|s| s.uid != a.uid);
                if fresh {
                    self.m
                        .statuses
                        .insert(a.key.clone(), status(a, now, Health::Healthy));
                    changed = true;
                }
            }
            changed
        }

        /// Slots (with release) of the live, non-retiring web instances.
        fn serving(&self) -> Vec<(u32, u64)> {
            self.m
                .assignments
                .values()
                .filter(|(a, _)| a.retire_at.is_none())
                .filter(|(a, _)| {
                    self.m
                        .statuses
                        .get(&a.key)
                        .is_some_and(|s| s.uid == a.uid && crate::catalog::routable(s))
                })
                .map(|(a, _)| (a.key.slot, a.release))
                .collect()
        }

        fn slots(&self) -> Vec<u32> {
            self.m
                .assignments
                .values()
                .map(|(a, _)| a.key.slot)
                .collect()
        }

        /// Run agent + controller until nothing changes, advancing the clock
        /// past drains; asserts `min_serving` routable instances throughout.
        fn converge(&mut self, min_serving: usize) -> Vec<Report> {
            let mut reports = Vec::new();
            for _ in 0..100 {
                let plan = self.step();
                assert!(
                    self.serving().len() >= min_serving,
                    "capacity dropped: {:?} (slots {:?})",
                    self.serving(),
                    self.slots()
                );
                reports.extend(plan.reports.clone());
                let started = self.healthy();
                if plan.changes.is_empty() && !started {
                    match plan.wake_at {
                        Some(w) if plan.reports.is_empty() => self.now = self.now.max(w),
                        _ => return reports,
                    }
                }
            }
            panic!("did not converge: {:?}", self.slots());
        }
    }

    fn status(a: &Assignment, now: Millis, health: Health) -> InstanceStatus {
        InstanceStatus {
            state: InstanceState::Running,
            health,
            pid: Some(1),
            address: Some("127.0.0.1".into()),
            port: Some(1),
            started_at: Some(now),
            ..InstanceStatus::new(a.key.clone(), a.uid.clone(), a.node.clone(), a.release, now)
        }
    }

    fn set_env(v: &str) -> impl FnOnce(&mut berth_spec::types::Service) {
        let v = v.to_owned();
        move |s| {
            s.environment.insert("VERSION".into(), Some(v));
        }
    }

    #[test]
    fn start_first_surges_and_retires_only_after_the_new_one_is_routable() {
        let mut sim = Sim::new(WEB, 3);
        sim.converge(0);
        assert_eq!(sim.serving(), vec![(1, 1), (2, 1), (3, 1)]);
        sim.deploy(set_env("2"));

        // First pass: one new instance in a fresh slot, nobody retired.
        let p = sim.step();
        assert_eq!(sim.slots(), vec![1, 2, 3, 4]);
        assert!(p.changes.iter().all(|c| matches!(c, Change::Put { .. })));
        assert_eq!(sim.serving().len(), 3, "old ones still serve");
        // Not routable yet: nothing more happens.
        let p = sim.step();
        assert!(p.changes.is_empty(), "{:?}", p.changes);
        // Routable: one old instance is retired (drained, not deleted yet)
        // and the next new one starts.
        let _ = sim.healthy();
        sim.step();
        let retiring: Vec<u32> = sim
            .m
            .assignments
            .values()
            .filter(|(a, _)| a.retire_at.is_some())
            .map(|(a, _)| a.key.slot)
            .collect();
        assert_eq!(retiring, vec![1]);
        assert_eq!(sim.slots(), vec![1, 2, 3, 4, 5]);

        let reports = sim.converge(3);
        assert_eq!(sim.serving(), vec![(4, 2), (5, 2), (6, 2)]);
        assert!(
            matches!(reports.last(), Some(Report::Complete { release: 2, .. })),
            "{reports:?}"
        );
    }

    #[test]
    fn retired_instances_are_deleted_after_the_drain() {
        let mut sim = Sim::new(WEB, 1);
        sim.converge(0);
        sim.deploy(set_env("2"));
        sim.step();
        let _ = sim.healthy();
        let p = sim.step();
        let wake = p.wake_at.expect("a drain deadline");
        assert_eq!(wake, sim.now + rollout::DRAIN_MS);
        assert_eq!(sim.slots(), vec![1, 2]);
        sim.now = wake - 1;
        assert!(sim.step().changes.is_empty(), "not before the deadline");
        sim.now = wake;
        sim.step();
        assert_eq!(sim.slots(), vec![1, 2], "stopping, still out of service");
        assert!(sim.serving() == vec![(2, 2)]);
        let _ = sim.healthy(); // the agent reports it stopped
        sim.step();
        assert_eq!(sim.slots(), vec![2]);
    }

    #[test]
    fn stop_first_never_runs_two_copies() {
        let yaml = "services:\n  web:\n    command: sleep 100\n    environment: {VERSION: '1'}\n";
        let mut sim = Sim::new(yaml, 2);
        sim.converge(0);
        sim.deploy(set_env("2"));
        for _ in 0..50 {
            let p = sim.step();
            let live = sim.m.assignments.values().count();
            assert!(live <= 2, "stop-first ran {live} copies: {:?}", sim.slots());
            let _ = sim.healthy();
            if p.changes.is_empty() {
                match p.wake_at {
                    Some(w) => sim.now = w,
                    None => break,
                }
            }
        }
        let releases: Vec<u64> = sim.m.assignments.values().map(|(a, _)| a.release).collect();
        assert_eq!(releases, vec![2, 2]);
    }

    #[test]
    fn parallelism_two_starts_two_at_a_time() {
        let yaml = "services:\n  web:\n    command: sleep 100\n    ports: ['18080:80']\n    deploy:\n      update_config: {parallelism: 2}\n";
        let mut sim = Sim::new(yaml, 4);
        sim.converge(0);
        sim.deploy(set_env("2"));
        sim.step();
        assert_eq!(sim.slots(), vec![1, 2, 3, 4, 5, 6]);
        assert!(sim.step().changes.is_empty(), "waits for the batch");
        sim.converge(4);
        let serving: Vec<u64> = sim.serving().iter().map(|(_, r)| *r).collect();
        assert_eq!(serving, vec![2, 2, 2, 2]);
    }

    #[test]
    fn failing_new_instance_reports_a_rollback_and_old_ones_keep_serving() {
        let mut sim = Sim::new(WEB, 2);
        sim.converge(0);
        sim.deploy(set_env("broken"));
        sim.step();
        // The new instance crash-loops.
        let (a, _) = sim.assignment_of_release(2);
        let mut st = status(&a, sim.now, Health::Starting);
        st.state = InstanceState::Backoff;
        st.restarts = 2;
        st.last_exit = Some(berth_model::ExitInfo {
            code: Some(1),
            signal: None,
            at: sim.now,
        });
        sim.m.statuses.insert(a.key.clone(), st);
        let p = sim.step();
        assert_eq!(sim.serving().len(), 2, "old instances untouched");
        let Some(Report::Failed {
            release, failure, ..
        }) = p.reports.first()
        else {
            panic!("no failure report: {:?}", p.reports);
        };
        assert_eq!(*release, 2);
        assert_eq!(failure.action, FailureAction::Rollback);
        assert_eq!(failure.rollback_to, Some(1));
        assert!(
            failure.reason.contains("exited with code 1"),
            "{}",
            failure.reason
        );
        assert!(
            p.changes.is_empty(),
            "no further replacement: {:?}",
            p.changes
        );

        // What desired.rs's Rollback does: a v3 with v1's spec.
        let v1 = load(WEB);
        let now = sim.now;
        let r = sim.record();
        r.release = 3;
        r.spec = v1;
        r.rollout = Some(berth_model::RolloutStatus {
            release: 3,
            generation: 0,
            state: RolloutState::InProgress,
            message: String::new(),
            rolled_back: None,
            started_at: now,
            updated_at: now,
        });
        let p = sim.step();
        assert!(
            p.changes
                .iter()
                .any(|c| matches!(c, Change::Put { key, assignment, .. }
                if key.ends_with("000003") && assignment.desired == DesiredState::Stopped)),
            "the failed instance is stopped at once, without a drain: {:?}",
            p.changes
        );
        let reports = sim.converge(2);
        assert_eq!(
            sim.serving(),
            vec![(1, 3), (2, 3)],
            "the same old instances, now v3"
        );
        assert!(matches!(
            reports.last(),
            Some(Report::Complete { release: 3, .. })
        ));
    }

    #[test]
    fn pause_stops_replacing() {
        let yaml = "services:\n  web:\n    command: sleep 100\n    ports: ['18080:80']\n    deploy:\n      update_config: {failure_action: pause}\n";
        let mut sim = Sim::new(yaml, 2);
        sim.converge(0);
        sim.deploy(set_env("2"));
        sim.step();
        let (a, _) = sim.assignment_of_release(2);
        let mut st = status(&a, sim.now, Health::Unhealthy);
        st.health_output = Some("HTTP 500".into());
        sim.m.statuses.insert(a.key.clone(), st);
        let p = sim.step();
        let Some(Report::Failed { failure, .. }) = p.reports.first() else {
            panic!("{:?}", p.reports)
        };
        assert_eq!(failure.action, FailureAction::Pause);
        assert!(failure.reason.contains("HTTP 500"));
        sim.record().rollout.as_mut().expect("rollout").state = RolloutState::Paused;
        for _ in 0..3 {
            assert!(sim.step().changes.is_empty());
        }
        assert_eq!(sim.serving().len(), 2);
    }

    #[test]
    fn a_new_controller_resumes_a_rollout_half_way() {
        let mut sim = Sim::new(WEB, 3);
        sim.converge(0);
        sim.deploy(set_env("2"));
        sim.step();
        let _ = sim.healthy();
        sim.step();
        // "Crash": a controller with other uids and nothing in memory plans
        // from the same mirror; it must neither start another surge nor
        // forget the retiring instance.
        sim.n = 1000;
        let before = sim.slots();
        let p = sim.step();
        assert!(
            p.changes.is_empty(),
            "the first new instance of the next batch is not routable yet: {:?}",
            p.changes
        );
        assert_eq!(sim.slots(), before);
        sim.converge(3);
        let serving: Vec<u64> = sim.serving().iter().map(|(_, r)| *r).collect();
        assert_eq!(serving, vec![2, 2, 2]);
    }

    #[test]
    fn scale_during_a_rollout() {
        let mut sim = Sim::new(WEB, 3);
        sim.converge(0);
        sim.deploy(set_env("2"));
        sim.step();
        let _ = sim.healthy();
        sim.step();
        // Scale up mid-rollout: the extra instances come at once, on v2.
        sim.record().services.get_mut("web").expect("web").replicas = 6;
        sim.step();
        let _ = sim.healthy();
        sim.converge(3);
        let serving: Vec<u64> = sim.serving().iter().map(|(_, r)| *r).collect();
        assert_eq!(serving, vec![2; 6]);
        // Scale down: the highest (newest) slots go, drained first.
        let keep: Vec<u32> = sim.serving().iter().map(|(s, _)| *s).take(2).collect();
        sim.record().services.get_mut("web").expect("web").replicas = 2;
        sim.converge(2);
        let left: Vec<u32> = sim.serving().iter().map(|(s, _)| *s).collect();
        assert_eq!(left, keep);
    }

    #[test]
    fn restart_rolls_too() {
        let mut sim = Sim::new(WEB, 2);
        sim.converge(0);
        let now = sim.now;
        let r = sim.record();
        r.services.get_mut("web").expect("web").restart_generation = 1;
        r.rollout = Some(berth_model::RolloutStatus {
            release: 1,
            generation: 1,
            state: RolloutState::InProgress,
            message: String::new(),
            rolled_back: None,
            started_at: now,
            updated_at: now,
        });
        sim.step();
        assert_eq!(sim.slots(), vec![1, 2, 3], "one at a time, start-first");
        sim.converge(2);
        assert_eq!(sim.slots(), vec![3, 4]);
    }
}
