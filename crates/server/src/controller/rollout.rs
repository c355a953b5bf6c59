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

    let mut live: Vec<Inst<'_>> = Vec::new();
    let mut retiring = 0usize;
    for i in &inp.instances {
        match i.a.retire_at {
            Some(t) if t > now => {
                out.wake(t);
                retiring += 1;
            }
            // Drained: stop it, still retiring (so out of every table)…
            Some(_) if i.a.desired == DesiredState::Running => {
                let e = edit(&mut edits, *i);
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

    if inp.stopped {
        for (k, i) in live.iter().enumerate() {
            if k >= n {
                out.deletes.push((i.key.clone(), i.rev));
            } else if i.a.desired != DesiredState::Stopped {
                let e = edit(&mut edits, *i);
                edits[e].1.desired = DesiredState::Stopped;
            }
        }
        out.settled = true;
        return finish(out, edits);
    }

    let is_current = |i: &Inst<'_>| {
        i.a.restart_generation == inp.generation
            && same_template(&i.a.service, inp.spec)
            && !inp.draining.contains(i.a.node.as_str())
    };
    // Instances stopped by `berth stop`, now wanted again: nothing serves,
    // so they are restarted in place, on the new template if it changed.
    let mut restarted = false;
    for i in &live {
        if i.a.desired == DesiredState::Stopped && inp.deps_met {
            let current = is_current(i);
            let e = edit(&mut edits, *i);
            let a = &mut edits[e].1;
            a.desired = DesiredState::Running;
            a.release = record.release;
            if !current {
                a.uid = new_uid();
                a.service = inp.spec.clone();
                a.restart_generation = inp.generation;
                a.created_at = now;
            }
            restarted = true;
        }
    }
    if restarted {
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

    let rollout = record
        .rollout
        .as_ref()
        .filter(|r| r.release == record.release);
    let active = rollout.is_some_and(|r| r.state == RolloutState::InProgress);
    let paused = rollout.is_some_and(|r| r.state == RolloutState::Paused);
    let since = rollout.map_or(Millis::MAX, |r| r.started_at);
    let in_rollout = |i: &Inst<'_>| active && i.a.created_at >= since;
    let cont = pol.failure_action == FailureAction::Continue;
    // With `continue`, a failed instance is as good as a routable one for
    // the rollout's progress: it is not waited for.
    let done = |i: &Inst<'_>| i.ready() || (cont && i.failure().is_some());

    if active && !cont {
        let new: Vec<&Inst<'_>> = cur.iter().filter(|i| in_rollout(i)).collect();
        let failed: Vec<(&Inst<'_>, String)> = new
            .iter()
            .filter_map(|i| i.failure().map(|r| (*i, r)))
            .collect();
        if let Some((first, reason)) = failed.first()
            && failed.len() as f64 / new.len().max(1) as f64 > pol.max_failure_ratio
        {
            let restart_only = old.iter().any(|o| same_template(&o.a.service, inp.spec));
            let rollback_to = if restart_only {
                None
            } else {
                old.iter()
                    .map(|o| o.a.release)
                    .max()
                    .or_else(|| record.release.checked_sub(1).filter(|v| *v > 0))
            };
            out.failure = Some(Failure {
                instance: first.a.key.clone(),
                reason: reason.clone(),
                action: pol.failure_action,
                rollback_to,
            });
        }
    }
    let halted = paused || out.failure.is_some();

    // Too many current instances (scaled down): the ones that serve nothing
    // first, then the newest (highest slots).
    if cur.len() > n {
        cur.sort_by_key(|i| (!done(i), i.a.key.slot));
        for i in cur.split_off(n) {
            retire(&mut out, &mut edits, i, now);
        }
    }
    let ready_cur = cur.iter().filter(|i| done(i)).count();
    let in_flight = cur.iter().filter(|i| !done(i)).count();
    let last_batch = cur
        .iter()
        .filter(|i| in_rollout(i))
        .map(|i| i.a.created_at)
        .max();
    let delay_ok = match last_batch {
        Some(t) if pol.delay_ms > 0 && t + pol.delay_ms > now => {
            out.wake(t + pol.delay_ms);
            false
        }
        _ => true,
    };
    // Outdated instances that serve nothing are of no use to anyone.
    old.sort_by_key(|i| (i.ready(), i.a.key.slot));
    let missing = n.saturating_sub(cur.len());

    if pol.start_first {
        // Keep enough outdated instances to make up for current ones that
        // do not take traffic yet.
        let keep_old = n.saturating_sub(ready_cur).min(old.len());
        let surplus = old.len() - keep_old;
        for i in old.drain(..surplus) {
            retire(&mut out, &mut edits, i, now);
        }
        let extra = n.saturating_sub(cur.len() + old.len());
        let replacements = if halted || !delay_ok {
            0
        } else {
            (missing - extra).min((pol.parallelism as usize).saturating_sub(in_flight))
        };
        out.create = (extra + replacements) as u32;
    } else {
        let orphans = inp
            .orphans
            .iter()
            .filter(|s| {
                matches!(
                    s.state,
                    InstanceState::Running | InstanceState::Starting | InstanceState::Stopping
                )
            })
            .count();
        // Everything counts against the replica count until its process is
        // gone: two copies must never run side by side.
        let occupying = cur.len() + old.len() + retiring + orphans;
        out.create = n.saturating_sub(occupying) as u32;
        if ready_cur >= n {
            for i in old.drain(..) {
                retire(&mut out, &mut edits, i, now);
            }
        } else if !halted && delay_ok && in_flight == 0 && retiring == 0 && orphans == 0 {
            let k = (pol.parallelism as usize).min(old.len());
            for i in old.drain(..k) {
                retire(&mut out, &mut edits, i, now);
            }
        }
    }

    let mut settled = old.is_empty() && retiring == 0 && cur.len() == n && out.create == 0;
    for i in &cur {
        if !done(i) {
            settled = false;
        } else if in_rollout(i) && i.ready() {
            let until = i.started() + pol.monitor_ms;
            if until > now {
                settled = false;
                out.wake(until);
            }
        }
    }
    out.settled = settled && out.deletes.is_empty();
    finish(out, edits)
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
