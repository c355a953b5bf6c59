//! Rolling updates of one service: which instances to start, which to
//! retire, and whether the rollout has settled or failed. Pure: a function
//! of the service's assignments and statuses, the stack record and a clock.
//!
//! # Slots and rollouts
//!
//! A slot is an instance's identity (`web.4`), and slots only ever grow: a
//! replacement is a new instance in a fresh slot (one above every slot that
//! is assigned or still reported), never a new incarnation of an old slot,
//! so an old and a new instance can run side by side. Scaling keeps the
//! rule of the core issue: the highest slots are the newest and go first.
//!
//! An instance is *current* when its assignment's service template equals
//! the stack's (replica count and update settings aside) and its restart
//! generation is the service's; every other live instance is *outdated*.
//! The rollout state is therefore in the mirror itself, and a controller
//! that crashed mid-rollout resumes where it was.
//!
//! ```text
//!  start-first:  outdated ──(new one routable)──► retiring ──(drain)──► deleted
//!                new: fresh slot, at most `parallelism` not yet routable
//!  stop-first:   outdated ──► retiring ──(drain)──► deleted ──(agent stopped it)──► new in a fresh slot
//! ```
//!
//! *Retiring* (`Assignment::retire_at`) takes an instance out of the
//! catalog, the router and DNS at once while it keeps running; once the
//! drain time has passed the assignment turns `desired: stopped` (the agent
//! stops the instance gracefully), and once the instance is stopped the
//! assignment is deleted. Keeping the retiring assignment until then means a
//! status that still says "running" can never make the instance routable
//! again. Instances that serve no traffic (not routable) skip the drain.

use std::collections::BTreeSet;

use berth_model::{
    Assignment, DesiredState, Health, InstanceState, InstanceStatus, Millis, RolloutState,
    StackRecord,
};
use berth_spec::types::Service;
use berth_store::Revision;

use crate::catalog::routable;

/// How long a retired instance keeps running, out of every routing table,
/// before it is stopped: routers pick up a table change in milliseconds, so
/// this covers the requests they had already sent it.
pub const DRAIN_MS: Millis = 1_000;

/// `deploy.update_config.monitor` when not given (Compose's default).
pub const DEFAULT_MONITOR_MS: Millis = 5_000;

/// What to do when a new instance fails during a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureAction {
    /// Roll the stack back to the release the old instances run.
    Rollback,
    /// Stop replacing instances and report it.
    Pause,
    /// Ignore the failure and keep going.
    Continue,
}

/// A service's `deploy.update_config`, with berth's defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Replacements not yet routable at once (≥ 1).
    pub parallelism: u32,
    /// Pause between batches.
    pub delay_ms: Millis,
    /// Start the new instance before retiring an old one.
    pub start_first: bool,
    /// What a failure does.
    pub failure_action: FailureAction,
    /// How long a new instance is watched after it starts.
    pub monitor_ms: Millis,
    /// Failures tolerated, as a share of the new instances.
    pub max_failure_ratio: f64,
}

/// The update policy of a service. `order` defaults to start-first for
/// services that take traffic (published ports or router routes): they must
/// never be down; to stop-first for the rest, which may hold a resource
/// (a fixed port, a lock file) that two copies cannot share.
pub fn policy(s: &Service) -> Policy {
    let uc = s.deploy.update_config.as_ref();
    let takes_traffic = !s.ports.is_empty() || !s.berth.routes.is_empty();
    let start_first = match uc.and_then(|u| u.order.as_deref()) {
        Some("start-first") => true,
        Some("stop-first") => false,
        _ => takes_traffic,
    };
    let failure_action = match uc.map(|u| u.failure_action.as_str()) {
        Some("pause") => FailureAction::Pause,
        Some("continue") => FailureAction::Continue,
        _ => FailureAction::Rollback,
    };
    Policy {
        parallelism: uc.map_or(1, |u| u.parallelism.max(1)),
        delay_ms: uc.map_or(0, |u| u.delay_ms),
        start_first,
        failure_action,
        monitor_ms: uc
            .map(|u| u.monitor_ms)
            .filter(|m| *m > 0)
            .unwrap_or(DEFAULT_MONITOR_MS),
        max_failure_ratio: uc.map_or(0.0, |u| u.max_failure_ratio.clamp(0.0, 1.0)),
    }
}

/// Whether an instance made from `running` is what `wanted` asks for: the
/// replica count and the update settings do not change a running instance.
pub fn same_template(running: &Service, wanted: &Service) -> bool {
    let strip = |s: &Service| {
        let mut s = s.clone();
        s.deploy.replicas = 0;
        s.deploy.update_config = None;
        s.deploy.rollback_config = None;
        s
    };
    running == wanted || strip(running) == strip(wanted)
}

/// One assignment with what its agent reports about that incarnation.
#[derive(Debug, Clone, Copy)]
pub struct Inst<'a> {
    /// Store key of the assignment.
    pub key: &'a String,
    /// The assignment.
    pub a: &'a Assignment,
    /// Its mod revision.
    pub rev: Revision,
    /// The status of this incarnation (an older one's does not count).
    pub status: Option<&'a InstanceStatus>,
}

impl Inst<'_> {
    fn ready(&self) -> bool {
        self.status.is_some_and(routable)
    }

    /// Why this instance counts as failed, if it does.
    fn failure(&self) -> Option<String> {
        let s = self.status?;
        let name = s.key.short();
        let crashed = matches!(
            s.state,
            InstanceState::Failed | InstanceState::Backoff | InstanceState::Exited
        ) || s.restarts > 0;
        if crashed {
            let how = match &s.last_exit {
                Some(e) => match (&e.code, &e.signal) {
                    (Some(c), _) => format!("exited with code {c}"),
                    (None, Some(sig)) => format!("was killed by {sig}"),
                    (None, None) => "exited".to_owned(),
                },
                None => format!("is {}", s.state),
            };
            let restarts = if s.restarts > 0 {
                format!(" ({} restarts)", s.restarts)
            } else {
                String::new()
            };
            // The agent's message often repeats the exit; keep it only when
            // it says more.
            let msg = s
                .message
                .as_deref()
                .filter(|m| !how.contains(m) && !m.contains(how.as_str()))
                .map_or(String::new(), |m| format!(": {m}"));
            return Some(format!("{name} {how}{restarts}{msg}"));
        }
        if s.health == Health::Unhealthy {
            let out = s.health_output.as_deref().unwrap_or("no output");
            return Some(format!("{name} health check failing: {out}"));
        }
        None
    }

    fn started(&self) -> Millis {
        self.status
            .and_then(|s| s.started_at)
            .unwrap_or(self.a.created_at)
    }
}

/// Everything the planner needs about one service.
pub struct ServiceInput<'a> {
    /// The stack's desired state.
    pub record: &'a StackRecord,
    /// The service's template.
    pub spec: &'a Service,
    /// Wanted replicas.
    pub replicas: u32,
    /// Stopped on purpose.
    pub stopped: bool,
    /// The service's restart generation.
    pub generation: u64,
    /// Its assignments, by slot.
    pub instances: Vec<Inst<'a>>,
    /// Reported statuses of slots that have no assignment any more
    /// (instances the agent is still stopping).
    pub orphans: Vec<&'a InstanceStatus>,
    /// Highest slot assigned or reported.
    pub max_slot: u32,
    /// Whether its `depends_on` conditions hold: instances are only
    /// (re)started when they do, so `berth start` keeps Compose's order.
    pub deps_met: bool,
    /// The clock.
    pub now: Millis,
    /// Nodes being drained (`berth node drain`): their instances count as
    /// outdated, so they are replaced elsewhere the way a rolling update
    /// replaces them (update order, parallelism, health).
    pub draining: &'a BTreeSet<&'a str>,
}

/// A failed new instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The instance (`web.4`) whose failure decided it.
    pub instance: berth_model::InstanceKey,
    /// What failed.
    pub reason: String,
    /// What the policy says to do.
    pub action: FailureAction,
    /// The release the outdated instances run, when they run another
    /// template (a restart-only rollout has nothing to roll back to).
    pub rollback_to: Option<u64>,
}

/// What the planner wants for one service.
#[derive(Debug, Default)]
pub struct ServiceOutput {
    /// Assignments to write (key, new value, expected revision).
    pub puts: Vec<(String, Assignment, Revision)>,
    /// Assignments to delete (key, expected revision).
    pub deletes: Vec<(String, Revision)>,
    /// New instances to place, in fresh slots from `first_slot`.
    pub create: u32,
    /// The first fresh slot.
    pub first_slot: u32,
    /// When to look again even if nothing changes (drain, delay, monitor).
    pub wake_at: Option<Millis>,
    /// Every instance is current, routable and past its monitor period.
    pub settled: bool,
    /// A new instance failed (only while a rollout is in progress).
    pub failure: Option<Failure>,
}

impl ServiceOutput {
    fn wake(&mut self, at: Millis) {
        self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
    }
}

/// Plan one service.
pub fn plan_service(inp: &ServiceInput<'_>, new_uid: &mut dyn FnMut() -> String) -> ServiceOutput {
    let record = inp.record;
    let now = inp.now;
    let pol = policy(inp.spec);
    let n = inp.replicas as usize;
    let mut out = ServiceOutput {
        first_slot: inp.max_slot + 1,
        ..Default::default()
    };
    // Modified copies, written once at the end (several steps may touch one).
    let mut edits: Vec<(Inst<'_>, Assignment)> = Vec::new();

    let (live, retiring) = advance_retiring(inp, &mut out, &mut edits);

    if inp.stopped {
        stop_all(&live, n, &mut out, &mut edits);
        return finish(out, edits);
    }

    let is_current = |i: &Inst<'_>| {
        i.a.restart_generation == inp.generation
            && same_template(&i.a.service, inp.spec)
            && !inp.draining.contains(i.a.node.as_str())
    };
    if restart_stopped(inp, &live, &is_current, &mut edits, new_uid) {
        return finish(out, edits);
    }

    let (mut cur, mut old): (Vec<Inst<'_>>, Vec<Inst<'_>>) =
        live.iter().copied().partition(|i| is_current(i));
    for i in &cur {
        if i.a.release != record.release {
            let e = edit(&mut edits, *i);
            edits[e].1.release = record.release;
        }
    }

    let progress = Progress::of(record, &pol);
    if progress.active && !progress.cont {
        out.failure = rollout_failure(inp, &pol, &progress, &cur, &old);
    }
    let halted = progress.paused || out.failure.is_some();

    // Too many current instances (scaled down): the ones that serve nothing
    // first, then the newest (highest slots).
    if cur.len() > n {
        cur.sort_by_key(|i| (!progress.done(i), i.a.key.slot));
        for i in cur.split_off(n) {
            retire(&mut out, &mut edits, i, now);
        }
    }
    let counts = Counts {
        wanted: n,
        current: cur.len(),
        ready: cur.iter().filter(|i| progress.done(i)).count(),
        in_flight: cur.iter().filter(|i| !progress.done(i)).count(),
        retiring,
        orphans: inp
            .orphans
            .iter()
            .filter(|s| {
                matches!(
                    s.state,
                    InstanceState::Running | InstanceState::Starting | InstanceState::Stopping
                )
            })
            .count(),
    };
    let last_batch = cur
        .iter()
        .filter(|i| progress.in_rollout(i))
        .map(|i| i.a.created_at)
        .max();
    let delay_ok = match last_batch {
        Some(t) if pol.delay_ms > 0 && t + pol.delay_ms > now => {
            out.wake(t + pol.delay_ms);
            false
        }
        _ => true,
    };
    let may_advance = !halted && delay_ok;
    // Outdated instances that serve nothing are of no use to anyone.
    old.sort_by_key(|i| (i.ready(), i.a.key.slot));

    if pol.start_first {
        replace_start_first(
            &mut out,
            &mut edits,
            &mut old,
            &counts,
            &pol,
            may_advance,
            now,
        );
    } else {
        replace_stop_first(
            &mut out,
            &mut edits,
            &mut old,
            &counts,
            &pol,
            may_advance,
            now,
        );
    }

    out.settled = settled(&mut out, &cur, &old, &counts, &progress, &pol, now);
    finish(out, edits)
}

/// Moves every retiring instance one step along drain → stop → delete.
/// Returns the instances that are not retiring, and how many are (they
/// still occupy a replica until their process is gone).
fn advance_retiring<'a>(
    inp: &ServiceInput<'a>,
    out: &mut ServiceOutput,
    edits: &mut Vec<(Inst<'a>, Assignment)>,
) -> (Vec<Inst<'a>>, usize) {
    let mut live: Vec<Inst<'a>> = Vec::new();
    let mut retiring = 0usize;
    for i in &inp.instances {
        match i.a.retire_at {
            Some(t) if t > inp.now => {
                out.wake(t);
                retiring += 1;
            }
            // Drained: stop it, still retiring (so out of every table)…
            Some(_) if i.a.desired == DesiredState::Running => {
                let e = edit(edits, *i);
                edits[e].1.desired = DesiredState::Stopped;
                retiring += 1;
            }
            // …and forget it once its process is gone.
            Some(_) => {
                if i.status.is_none_or(|s| {
                    matches!(
                        s.state,
                        InstanceState::Stopped | InstanceState::Exited | InstanceState::Failed
                    )
                }) {
                    out.deletes.push((i.key.clone(), i.rev));
                }
                retiring += 1;
            }
            None => live.push(*i),
        }
    }
    (live, retiring)
}

/// `berth stop`: the first `n` slots are kept, stopped (so `berth start`
/// brings them back in place), and any beyond the replica count go.
fn stop_all<'a>(
    live: &[Inst<'a>],
    n: usize,
    out: &mut ServiceOutput,
    edits: &mut Vec<(Inst<'a>, Assignment)>,
) {
    for (k, i) in live.iter().enumerate() {
        if k >= n {
            out.deletes.push((i.key.clone(), i.rev));
        } else if i.a.desired != DesiredState::Stopped {
            let e = edit(edits, *i);
            edits[e].1.desired = DesiredState::Stopped;
        }
    }
    out.settled = true;
}

/// Instances stopped by `berth stop`, now wanted again: nothing serves,
/// so they are restarted in place, on the new template if it changed.
/// Returns whether any was; the rest of the plan waits for the next pass.
fn restart_stopped<'a>(
    inp: &ServiceInput<'a>,
    live: &[Inst<'a>],
    is_current: &dyn Fn(&Inst<'_>) -> bool,
    edits: &mut Vec<(Inst<'a>, Assignment)>,
    new_uid: &mut dyn FnMut() -> String,
) -> bool {
    let mut restarted = false;
    for i in live {
        if i.a.desired == DesiredState::Stopped && inp.deps_met {
            let current = is_current(i);
            let e = edit(edits, *i);
            let a = &mut edits[e].1;
            a.desired = DesiredState::Running;
            a.release = inp.record.release;
            if !current {
                a.uid = new_uid();
                a.service = inp.spec.clone();
                a.restart_generation = inp.generation;
                a.created_at = inp.now;
            }
            restarted = true;
        }
    }
    restarted
}

/// Where the rollout of the stack's current release stands (a rollout
/// record of an older release says nothing about this one).
struct Progress {
    active: bool,
    paused: bool,
    /// When the rollout started: instances created since are its own.
    since: Millis,
    /// The policy's failure action is `continue`.
    cont: bool,
}

impl Progress {
    fn of(record: &StackRecord, pol: &Policy) -> Self {
        let rollout = record
            .rollout
            .as_ref()
            .filter(|r| r.release == record.release);
        Progress {
            active: rollout.is_some_and(|r| r.state == RolloutState::InProgress),
            paused: rollout.is_some_and(|r| r.state == RolloutState::Paused),
            since: rollout.map_or(Millis::MAX, |r| r.started_at),
            cont: pol.failure_action == FailureAction::Continue,
        }
    }

    fn in_rollout(&self, i: &Inst<'_>) -> bool {
        self.active && i.a.created_at >= self.since
    }

    /// With `continue`, a failed instance is as good as a routable one for
    /// the rollout's progress: it is not waited for.
    fn done(&self, i: &Inst<'_>) -> bool {
        i.ready() || (self.cont && i.failure().is_some())
    }
}

/// The first of the rollout's new instances to fail, once more of them have
/// failed than the policy tolerates.
fn rollout_failure(
    inp: &ServiceInput<'_>,
    pol: &Policy,
    progress: &Progress,
    cur: &[Inst<'_>],
    old: &[Inst<'_>],
) -> Option<Failure> {
    let new: Vec<&Inst<'_>> = cur.iter().filter(|i| progress.in_rollout(i)).collect();
    let failed: Vec<(&Inst<'_>, String)> = new
        .iter()
        .filter_map(|i| i.failure().map(|r| (*i, r)))
        .collect();
    let (first, reason) = failed.first()?;
    let too_many = failed.len() as f64 / new.len().max(1) as f64 > pol.max_failure_ratio;
    if !too_many {
        return None;
    }
    let restart_only = old.iter().any(|o| same_template(&o.a.service, inp.spec));
    let rollback_to = if restart_only {
        None
    } else {
        old.iter()
            .map(|o| o.a.release)
            .max()
            .or_else(|| inp.record.release.checked_sub(1).filter(|v| *v > 0))
    };
    Some(Failure {
        instance: first.a.key.clone(),
        reason: reason.clone(),
        action: pol.failure_action,
        rollback_to,
    })
}

/// The current instances the replacement steps work from (after scale-down).
struct Counts {
    /// Wanted replicas.
    wanted: usize,
    current: usize,
    /// Current instances done (routable, or failed under `continue`).
    ready: usize,
    /// Current instances not done yet.
    in_flight: usize,
    /// Instances retiring (draining or stopping).
    retiring: usize,
    /// Unassigned slots whose instance the agent still runs or is stopping.
    orphans: usize,
}

/// Start-first: new instances come up beside the outdated ones, which are
/// retired only as new ones become routable.
fn replace_start_first<'a>(
    out: &mut ServiceOutput,
    edits: &mut Vec<(Inst<'a>, Assignment)>,
    old: &mut Vec<Inst<'a>>,
    c: &Counts,
    pol: &Policy,
    may_advance: bool,
    now: Millis,
) {
    // Keep enough outdated instances to make up for current ones that
    // do not take traffic yet.
    let keep_old = c.wanted.saturating_sub(c.ready).min(old.len());
    let surplus = old.len() - keep_old;
    for i in old.drain(..surplus) {
        retire(out, edits, i, now);
    }
    let missing = c.wanted.saturating_sub(c.current);
    let extra = c.wanted.saturating_sub(c.current + old.len());
    let replacements = if may_advance {
        (missing - extra).min((pol.parallelism as usize).saturating_sub(c.in_flight))
    } else {
        0
    };
    out.create = (extra + replacements) as u32;
}

/// Stop-first: outdated instances are retired a batch at a time, and their
/// replacements created only once they are gone.
fn replace_stop_first<'a>(
    out: &mut ServiceOutput,
    edits: &mut Vec<(Inst<'a>, Assignment)>,
    old: &mut Vec<Inst<'a>>,
    c: &Counts,
    pol: &Policy,
    may_advance: bool,
    now: Millis,
) {
    // Everything counts against the replica count until its process is
    // gone: two copies must never run side by side.
    let occupying = c.current + old.len() + c.retiring + c.orphans;
    out.create = c.wanted.saturating_sub(occupying) as u32;
    if c.ready >= c.wanted {
        for i in old.drain(..) {
            retire(out, edits, i, now);
        }
    } else if may_advance && c.in_flight == 0 && c.retiring == 0 && c.orphans == 0 {
        let k = (pol.parallelism as usize).min(old.len());
        for i in old.drain(..k) {
            retire(out, edits, i, now);
        }
    }
}

/// Every instance is current, done, and (for the rollout's new ones) past
/// its monitor period; wakes the controller when the next one ends.
fn settled(
    out: &mut ServiceOutput,
    cur: &[Inst<'_>],
    old: &[Inst<'_>],
    c: &Counts,
    progress: &Progress,
    pol: &Policy,
    now: Millis,
) -> bool {
    let mut settled = old.is_empty() && c.retiring == 0 && c.current == c.wanted && out.create == 0;
    for i in cur {
        if !progress.done(i) {
            settled = false;
        } else if progress.in_rollout(i) && i.ready() {
            let until = i.started() + pol.monitor_ms;
            if until > now {
                settled = false;
                out.wake(until);
            }
        }
    }
    settled && out.deletes.is_empty()
}

/// The index of `i`'s modified copy in `edits`, made on first use.
fn edit<'a>(edits: &mut Vec<(Inst<'a>, Assignment)>, i: Inst<'a>) -> usize {
    if let Some(pos) = edits.iter().position(|(e, _)| e.key == i.key) {
        return pos;
    }
    edits.push((i, i.a.clone()));
    edits.len() - 1
}

/// Take an instance out of service: out of every routing table at once,
/// stopped after the drain when it takes traffic (at once otherwise), and
/// deleted once stopped.
fn retire<'a>(
    out: &mut ServiceOutput,
    edits: &mut Vec<(Inst<'a>, Assignment)>,
    i: Inst<'a>,
    now: Millis,
) {
    let e = edit(edits, i);
    let a = &mut edits[e].1;
    if i.ready() {
        let at = now + DRAIN_MS;
        a.retire_at = Some(at);
        out.wake(at);
    } else {
        a.retire_at = Some(now);
        a.desired = DesiredState::Stopped;
    }
}

fn finish(mut out: ServiceOutput, edits: Vec<(Inst<'_>, Assignment)>) -> ServiceOutput {
    for (i, a) in edits {
        if out.deletes.iter().any(|(k, _)| k == i.key) || a == *i.a {
            continue;
        }
        out.puts.push((i.key.clone(), a, i.rev));
    }
    out
}
