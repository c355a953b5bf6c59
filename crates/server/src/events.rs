//! The event log: what happened, derived from changes of state, kept in a
//! bounded ring in the store under [`keys::EVENTS`].
//!
//! # Why derived, not emitted
//! Every change berth makes is a state change in the store (a stack record,
//! a status, a node record). The [`Observer`] follows the same mirror the
//! controller reacts to and turns the differences between two passes into
//! [`Event`]s: a deploy is a new `release` in a stack record, its end is the
//! rollout turning `complete`, an exit is a new `last_exit` in a status.
//! So no write path has to remember to emit an event, and events cannot
//! disagree with state. The first listing after a start is the baseline and
//! produces no events (they were recorded, or missed, by the previous run).
//!
//! # The ring
//! Events are written in one transaction per burst, each under
//! `/berth/events/<id>`; once more than the capacity are kept, the oldest
//! are deleted in the same transaction. Ids increase (they are at least
//! the wall clock in µs) and serve as the cursor of `GET /v1/events`.
//!
//! # One writer
//! Every server runs an observer (each needs [`Live`]), but only the
//! elected leader writes events: with several servers on one etcd each
//! would otherwise record every change once per server. The write is
//! fenced like the controller's commits (the transaction requires the
//! leader key's revision to be the one this server won with), so a deposed
//! leader that has not noticed yet cannot add a second copy. Followers keep
//! diffing, so a new leader reports changes from its last view on, not
//! since its start; the events of the changes a dying leader saw but could
//! not write before the takeover (at most one pass) can be lost or, if the
//! new leader's last view predates them, reported once by the new leader.
//! On taking over, the new leader re-reads the ring's ids from the store,
//! so trimming and id order continue from what the previous leader wrote.
//!
//! A follower keeps the events it derived while not leading (at most
//! [`UNWRITTEN_CAP`], none older than [`UNWRITTEN_AGE_MS`]); on winning, it
//! writes those seen after the ring's newest event. Without this, a change
//! made before a server's first election was never recorded: `berth up -d`
//! that starts a server deploys as soon as the API answers, often before
//! the leader lease is won, and lost its `deploy_started`. Events the
//! previous leader already wrote carry ids (µs of their write) later than
//! its own view of the change, and so no later than the follower's view of
//! it in the common case; those are skipped, not written twice.
//!
//! The observer also publishes the instance statuses it saw ([`Live`]) for
//! the metrics endpoint and the history sampler, so those need no store
//! reads of their own.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};

use berth_model::{
    Event, EventKind, Health, InstanceKey, InstanceState, InstanceStatus, RolloutState,
    ServiceDesired, StackRecord, keys,
};
use berth_store::{Compare, Op, Revision, Store, StoreError, decode, encode};
use tokio::sync::watch;

use crate::mirror::{Follower, Mirror};

/// How many events the ring keeps by default (about 1 MB of JSON).
pub const DEFAULT_CAPACITY: usize = 5_000;

/// Errors of the event log.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// Reading or writing the ring failed.
    #[error("event log: {0}")]
    Store(#[from] StoreError),
    /// The fenced write found another leader: this server no longer leads.
    #[error("event log: not written, this server is no longer the leader")]
    NotLeader,
}

/// The bounded event ring in the store.
pub struct EventLog {
    store: Arc<dyn Store>,
    capacity: usize,
    ring: Mutex<Ring>,
}

struct Ring {
    /// Ids in the store, oldest first (as far as this server knows).
    ids: VecDeque<u64>,
    last_id: u64,
}

impl Ring {
    async fn load(store: &dyn Store) -> Result<Self, EventError> {
        let (kvs, _) = store.range(keys::EVENTS).await?;
        let ids: VecDeque<u64> = kvs
            .iter()
            .filter_map(|kv| kv.key.strip_prefix(keys::EVENTS)?.parse().ok())
            .collect();
        let last_id = ids.back().copied().unwrap_or(0);
        Ok(Self { ids, last_id })
    }
}

impl EventLog {
    /// Open the ring, loading the ids already stored.
    pub async fn open(store: Arc<dyn Store>, capacity: usize) -> Result<Self, EventError> {
        let ring = Ring::load(store.as_ref()).await?;
        Ok(Self {
            store,
            capacity: capacity.max(1),
            ring: Mutex::new(ring),
        })
    }

    /// Re-read the ids in the store (another server may have written
    /// since this one last did).
    pub async fn reload(&self) -> Result<(), EventError> {
        let ring = Ring::load(self.store.as_ref()).await?;
        *self.ring.lock().unwrap_or_else(|p| p.into_inner()) = ring;
        Ok(())
    }

    /// The newest id in the ring as last loaded (0 when empty).
    pub fn newest_id(&self) -> u64 {
        self.ring.lock().unwrap_or_else(|p| p.into_inner()).last_id
    }

    /// Assign ids to `events` (their `id` is overwritten) and write them,
    /// deleting the oldest beyond the capacity, in one transaction. With a
    /// `fence` (the leader key's revision at this server's election) the
    /// transaction requires the key unchanged and writes nothing, returning
    /// [`EventError::NotLeader`], when it changed.
    pub async fn record(
        &self,
        mut events: Vec<Event>,
        fence: Option<Revision>,
    ) -> Result<(), EventError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut ops = Vec::with_capacity(events.len());
        {
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            let floor = crate::now_ms().saturating_mul(1000);
            for e in &mut events {
                ring.last_id = (ring.last_id + 1).max(floor);
                e.id = ring.last_id;
                ring.ids.push_back(e.id);
            }
            while ring.ids.len() > self.capacity {
                if let Some(old) = ring.ids.pop_front() {
                    ops.push(Op::Delete(keys::event(old)));
                }
            }
        }
        for e in &events {
            let key = keys::event(e.id);
            ops.push(Op::put(key.clone(), encode(&key, e)?));
        }
        let common: Vec<Compare> = fence
            .map(|token| Compare::ModRevision(crate::leader::KEY.to_owned(), token))
            .into_iter()
            .collect();
        // In chunks, each fenced: one pass can see hundreds of instances
        // start, and etcd refuses a transaction of more than 128 ops.
        let parts = ops.into_iter().map(berth_store::chunk::Part::op).collect();
        let res = berth_store::chunk::commit(self.store.as_ref(), &common, parts).await;
        if !matches!(res, Ok(ref r) if r.complete()) {
            // Not all ids and deletions were applied: the next writer
            // (this server again, or another leader) starts from the store.
            if let Ok(ring) = Ring::load(self.store.as_ref()).await {
                *self.ring.lock().unwrap_or_else(|p| p.into_inner()) = ring;
            }
            res?;
            return Err(EventError::NotLeader);
        }
        for e in &events {
            crate::metrics::event_recorded(e.kind);
        }
        Ok(())
    }
}

/// Which events a reader wants.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Only events with an id greater than this.
    pub since: u64,
    /// Only this namespace.
    pub namespace: Option<String>,
    /// Only this stack.
    pub stack: Option<String>,
    /// Only this service.
    pub service: Option<String>,
    /// Only these kinds (all when empty).
    pub kinds: Vec<EventKind>,
}

impl EventFilter {
    /// Whether `e` passes.
    pub fn matches(&self, e: &Event) -> bool {
        let eq = |want: &Option<String>, got: &Option<String>| {
            want.as_ref().is_none_or(|w| got.as_ref() == Some(w))
        };
        e.id > self.since
            && eq(&self.namespace, &e.namespace)
            && eq(&self.stack, &e.stack)
            && eq(&self.service, &e.service)
            && (self.kinds.is_empty() || self.kinds.contains(&e.kind))
    }
}

/// The stored events passing `filter`, oldest first, at most the last
/// `limit`, and the store revision the listing is consistent with (follow
/// with a watch of [`keys::EVENTS`] from `revision + 1`).
pub async fn list(
    store: &dyn Store,
    filter: &EventFilter,
    limit: usize,
) -> Result<(Vec<Event>, Revision), EventError> {
    let (kvs, rev) = store.range(keys::EVENTS).await?;
    let mut out: Vec<Event> = kvs
        .iter()
        .filter_map(|kv| decode::<Event>(kv).ok())
        .filter(|e| filter.matches(e))
        .collect();
    if out.len() > limit {
        out.drain(..out.len() - limit);
    }
    Ok((out, rev))
}

/// What the observer saw last: the instance statuses, for the metrics
/// endpoint and the history sampler.
#[derive(Debug, Default)]
pub struct Live {
    /// Every instance status, by instance (shared with the observer's own
    /// copy: one clone of the statuses per pass, not two).
    pub statuses: Arc<BTreeMap<InstanceKey, InstanceStatus>>,
    /// The store revision this view is at.
    pub revision: Revision,
}

/// The parts of a stack record events are derived from.
#[derive(Debug, Clone, PartialEq)]
struct StackView {
    release: u64,
    services: BTreeMap<String, ServiceDesired>,
    config: berth_model::ConfigVars,
    rollout: Option<(u64, u64, RolloutState)>,
    rolled_back: Option<berth_model::RollbackCause>,
    rollout_message: String,
}

impl StackView {
    fn of(r: &StackRecord) -> Self {
        Self {
            release: r.release,
            services: r.services.clone(),
            config: r.config.clone(),
            rollout: r
                .rollout
                .as_ref()
                .map(|ro| (ro.release, ro.generation, ro.state)),
            rolled_back: r
                .rollout
                .as_ref()
                .filter(|ro| ro.release == r.release)
                .and_then(|ro| ro.rolled_back.clone()),
            rollout_message: r
                .rollout
                .as_ref()
                .map(|ro| ro.message.clone())
                .unwrap_or_default(),
        }
    }
}

#[derive(Debug, Default)]
struct Seen {
    stacks: BTreeMap<(String, String), StackView>,
    statuses: Arc<BTreeMap<InstanceKey, InstanceStatus>>,
    nodes: BTreeSet<String>,
}

impl Seen {
    fn of(m: &Mirror) -> Self {
        Self {
            stacks: m
                .stacks
                .values()
                .map(|(r, _)| ((r.namespace.clone(), r.name.clone()), StackView::of(r)))
                .collect(),
            statuses: Arc::new(m.statuses.clone()),
            nodes: m.nodes.keys().cloned().collect(),
        }
    }
}

/// Follows the mirror, records the events between passes (while this
/// server leads) and publishes [`Live`]. After a re-listing (a watch gap)
/// it diffs against what it had before the gap, so changes during the gap
/// are still reported, once.
pub struct Observer {
    log: Arc<EventLog>,
    seen: Option<Seen>,
    live: watch::Sender<Arc<Live>>,
    leadership: crate::leader::Leadership,
    /// The fencing token the ring was last loaded for.
    writing_as: Option<Revision>,
    /// Events derived while not leading, oldest first: written on winning
    /// if no leader wrote past them (see the module docs).
    unwritten: VecDeque<Event>,
}

/// How many events a follower keeps for when it wins.
pub const UNWRITTEN_CAP: usize = 1_000;
/// How old (ms) a follower's kept event may be when it wins: older ones
/// were a leader's to write.
pub const UNWRITTEN_AGE_MS: u64 = 60_000;

impl Observer {
    /// An observer writing to `log` while `leadership` holds a fencing
    /// token, and publishing to `live`.
    pub fn new(
        log: Arc<EventLog>,
        live: watch::Sender<Arc<Live>>,
        leadership: crate::leader::Leadership,
    ) -> Self {
        Self {
            log,
            seen: None,
            live,
            leadership,
            writing_as: None,
            unwritten: VecDeque::new(),
        }
    }
}

impl Follower for Observer {
    async fn changed(&mut self, mirror: &Mirror, revision: Revision) -> anyhow::Result<()> {
        let now = Seen::of(mirror);
        let at = crate::now_ms();
        let mut events = match &self.seen {
            Some(before) => diff(before, &now, at),
            None => Vec::new(),
        };
        self.live.send_replace(Arc::new(Live {
            statuses: now.statuses.clone(),
            revision,
        }));
        self.seen = Some(now);
        let Some(token) = *self.leadership.borrow() else {
            self.writing_as = None;
            self.keep_unwritten(events, at);
            return Ok(());
        };
        // A failed write loses these events but must not stop the server:
        // events narrate state, nothing depends on them.
        if self.writing_as != Some(token) {
            if let Err(e) = self.log.reload().await {
                tracing::warn!(error = %e, "could not read the event ring; events not recorded");
                return Ok(());
            }
            self.writing_as = Some(token);
            let mut caught_up = self.catch_up(self.log.newest_id(), at);
            caught_up.append(&mut events);
            events = caught_up;
        }
        if let Err(e) = self.log.record(events, Some(token)).await {
            tracing::warn!(error = %e, "could not record events");
        }
        Ok(())
    }
}

impl Observer {
    /// Keep a follower's events for when it wins, within the bounds.
    fn keep_unwritten(&mut self, events: Vec<Event>, now: u64) {
        self.unwritten.extend(events);
        while self.unwritten.len() > UNWRITTEN_CAP
            || self
                .unwritten
                .front()
                .is_some_and(|e| e.at.saturating_add(UNWRITTEN_AGE_MS) < now)
        {
            self.unwritten.pop_front();
        }
    }

    /// The kept events no leader wrote: those seen after the ring's newest
    /// event (`newest_id`, µs of its write) and young enough.
    fn catch_up(&mut self, newest_id: u64, now: u64) -> Vec<Event> {
        self.unwritten
            .drain(..)
            .filter(|e| {
                e.at.saturating_mul(1000) > newest_id
                    && e.at.saturating_add(UNWRITTEN_AGE_MS) >= now
            })
            .collect()
    }
}

fn base(kind: EventKind, at: u64, message: String) -> Event {
    Event {
        id: 0,
        at,
        kind,
        namespace: None,
        stack: None,
        service: None,
        instance: None,
        node: None,
        release: None,
        exit_code: None,
        signal: None,
        message,
    }
}

fn stack_event(kind: EventKind, at: u64, ns: &str, stack: &str, message: String) -> Event {
    Event {
        namespace: Some(ns.to_owned()),
        stack: Some(stack.to_owned()),
        ..base(kind, at, message)
    }
}

fn instance_event(kind: EventKind, at: u64, s: &InstanceStatus, message: String) -> Event {
    Event {
        namespace: Some(s.key.namespace.clone()),
        stack: Some(s.key.stack.clone()),
        service: Some(s.key.service.clone()),
        instance: Some(s.key.short()),
        node: Some(s.node.clone()),
        release: Some(s.release),
        ..base(kind, at, message)
    }
}

/// The events between two views, in a stable order: nodes, stacks, then
/// instances.
fn diff(before: &Seen, now: &Seen, at: u64) -> Vec<Event> {
    let mut out = Vec::new();
    for n in now.nodes.difference(&before.nodes) {
        out.push(Event {
            node: Some(n.clone()),
            ..base(EventKind::NodeJoined, at, format!("node {n} joined"))
        });
    }
    for n in before.nodes.difference(&now.nodes) {
        out.push(Event {
            node: Some(n.clone()),
            ..base(EventKind::NodeLeft, at, format!("node {n} left"))
        });
    }
    for ((ns, name), new) in &now.stacks {
        match before.stacks.get(&(ns.clone(), name.clone())) {
            None => out.push(Event {
                release: Some(new.release),
                ..stack_event(
                    EventKind::DeployStarted,
                    at,
                    ns,
                    name,
                    format!("deploy of {name} v{} started", new.release),
                )
            }),
            Some(old) => stack_diff(ns, name, old, new, at, &mut out),
        }
    }
    for (ns, name) in before.stacks.keys() {
        if !now.stacks.contains_key(&(ns.clone(), name.clone())) {
            out.push(stack_event(
                EventKind::StackRemoved,
                at,
                ns,
                name,
                format!("stack {name} removed"),
            ));
        }
    }
    for (key, new) in now.statuses.iter() {
        instance_diff(before.statuses.get(key), new, at, &mut out);
    }
    for (key, old) in before.statuses.iter() {
        if !now.statuses.contains_key(key) {
            out.push(instance_event(
                EventKind::InstanceRemoved,
                at,
                old,
                format!("{} removed", key.short()),
            ));
        }
    }
    out
}

fn stack_diff(
    ns: &str,
    name: &str,
    old: &StackView,
    new: &StackView,
    at: u64,
    out: &mut Vec<Event>,
) {
    if new.release != old.release {
        let e = match &new.rolled_back {
            Some(cause) => {
                let who = cause
                    .instance
                    .as_deref()
                    .map(|i| format!(" ({i})"))
                    .unwrap_or_default();
                let reason = cause.reason.lines().next().unwrap_or("");
                stack_event(
                    EventKind::RolledBack,
                    at,
                    ns,
                    name,
                    format!(
                        "v{} failed{who}: {reason}; rolled back as v{}",
                        cause.from, new.release
                    ),
                )
            }
            None => stack_event(
                EventKind::DeployStarted,
                at,
                ns,
                name,
                format!(
                    "deploy of {name} v{} started (was v{})",
                    new.release, old.release
                ),
            ),
        };
        out.push(Event {
            release: Some(new.release),
            ..e
        });
    }
    if new.config != old.config {
        out.push(stack_event(
            EventKind::ConfigChanged,
            at,
            ns,
            name,
            format!("config vars of {name} changed"),
        ));
    }
    if new.rollout != old.rollout
        && let Some((release, _, state)) = new.rollout
    {
        let (kind, what) = match state {
            RolloutState::Complete => (EventKind::DeployFinished, "finished"),
            RolloutState::Paused => (EventKind::DeployPaused, "paused"),
            RolloutState::InProgress => (EventKind::DeployStarted, ""),
        };
        // An in-progress rollout of a new release was reported above; one
        // of the same release is a `berth restart`, reported per service.
        if state != RolloutState::InProgress {
            let detail = if new.rollout_message.is_empty() {
                String::new()
            } else {
                format!(": {}", new.rollout_message)
            };
            out.push(Event {
                release: Some(release),
                ..stack_event(
                    kind,
                    at,
                    ns,
                    name,
                    format!("rollout of {name} v{release} {what}{detail}"),
                )
            });
        }
    }
    for (svc, d) in &new.services {
        let service_event = |kind, message| Event {
            service: Some(svc.clone()),
            ..stack_event(kind, at, ns, name, message)
        };
        let Some(o) = old.services.get(svc) else {
            continue;
        };
        if d.replicas != o.replicas {
            out.push(service_event(
                EventKind::Scaled,
                format!("{svc} scaled from {} to {}", o.replicas, d.replicas),
            ));
        }
        if d.stopped != o.stopped {
            let (kind, verb) = if d.stopped {
                (EventKind::ServiceStopped, "stopped")
            } else {
                (EventKind::ServiceStarted, "started")
            };
            out.push(service_event(kind, format!("{svc} {verb}")));
        }
        if d.restart_generation > o.restart_generation {
            out.push(service_event(
                EventKind::Restarted,
                format!("{svc} restarting (rolling)"),
            ));
        }
    }
}

fn instance_diff(
    old: Option<&InstanceStatus>,
    new: &InstanceStatus,
    at: u64,
    out: &mut Vec<Event>,
) {
    let short = new.key.short();
    let same_run = old.is_some_and(|o| o.uid == new.uid && o.started_at == new.started_at);
    let old_state = old.filter(|_| same_run).map(|o| o.state);
    let old_health = old.filter(|_| same_run).map(|o| o.health);
    if let Some(exit) = &new.last_exit
        && old.and_then(|o| o.last_exit.as_ref()) != Some(exit)
        && !matches!(new.state, InstanceState::Stopping | InstanceState::Stopped)
    {
        let how = match (&exit.signal, exit.code) {
            (Some(sig), _) => format!("killed by {sig}"),
            (None, Some(code)) => format!("exited with code {code}"),
            (None, None) => "exited".to_owned(),
        };
        out.push(Event {
            exit_code: exit.code,
            signal: exit.signal.clone(),
            ..instance_event(EventKind::InstanceExited, at, new, format!("{short} {how}"))
        });
    }
    if new.state != InstanceState::Running || old_state == Some(InstanceState::Running) {
        // Not a (re)start.
    } else {
        let pid = new.pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
        out.push(instance_event(
            EventKind::InstanceStarted,
            at,
            new,
            format!("{short} started{pid}, release v{}", new.release),
        ));
    }
    if new.health != old_health.unwrap_or(Health::None) {
        match new.health {
            Health::Healthy => out.push(instance_event(
                EventKind::InstanceHealthy,
                at,
                new,
                format!("{short} is healthy"),
            )),
            Health::Unhealthy => {
                let why = new
                    .health_output
                    .as_deref()
                    .and_then(|o| o.lines().find(|l| !l.trim().is_empty()))
                    .map(|l| format!(": {}", l.trim()))
                    .unwrap_or_default();
                out.push(instance_event(
                    EventKind::InstanceUnhealthy,
                    at,
                    new,
                    format!("{short} is unhealthy{why}"),
                ));
            }
            Health::Starting | Health::None => {}
        }
    }
    if old_state != Some(new.state) {
        match new.state {
            InstanceState::Failed => {
                let why = new
                    .message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default();
                out.push(instance_event(
                    EventKind::InstanceFailed,
                    at,
                    new,
                    format!("{short} failed{why}"),
                ));
            }
            InstanceState::Stopped => out.push(instance_event(
                EventKind::InstanceStopped,
                at,
                new,
                format!("{short} stopped"),
            )),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_model::ExitInfo;

    fn status(slot: u32, state: InstanceState, health: Health) -> InstanceStatus {
        InstanceStatus {
            state,
            health,
            pid: Some(42),
            started_at: Some(1),
            ..InstanceStatus::new(
                InstanceKey::new("default", "shop", "web", slot),
                "u1",
                "n1",
                1,
                1,
            )
        }
    }

    fn seen(statuses: Vec<InstanceStatus>) -> Seen {
        Seen {
            statuses: Arc::new(statuses.into_iter().map(|s| (s.key.clone(), s)).collect()),
            ..Default::default()
        }
    }

    fn kinds(events: &[Event]) -> Vec<EventKind> {
        events.iter().map(|e| e.kind).collect()
    }

    #[test]
    fn an_instance_lifecycle_reads_as_events() {
        let a = seen(vec![status(1, InstanceState::Starting, Health::Starting)]);
        let b = seen(vec![status(1, InstanceState::Running, Health::Starting)]);
        let c = seen(vec![status(1, InstanceState::Running, Health::Healthy)]);
        let mut dead = status(1, InstanceState::Backoff, Health::Starting);
        dead.last_exit = Some(ExitInfo {
            code: Some(3),
            signal: None,
            at: 5,
        });
        let d = seen(vec![dead]);
        assert_eq!(kinds(&diff(&a, &b, 0)), [EventKind::InstanceStarted]);
        assert_eq!(kinds(&diff(&b, &c, 0)), [EventKind::InstanceHealthy]);
        // No change, no event.
        assert!(diff(&c, &c, 0).is_empty());
        let exit = diff(&c, &d, 0);
        assert_eq!(kinds(&exit), [EventKind::InstanceExited]);
        assert_eq!(exit[0].exit_code, Some(3));
        assert_eq!(exit[0].instance.as_deref(), Some("web.1"));
        assert_eq!(
            kinds(&diff(&d, &Seen::default(), 0)),
            [EventKind::InstanceRemoved]
        );
    }

    fn node(id: &str) -> berth_model::Node {
        berth_model::Node {
            id: id.into(),
            address: "127.0.0.1".into(),
            labels: Default::default(),
            facts: Default::default(),
            draining: false,
            updated_at: 1,
        }
    }

    /// A change seen before this server first led (as `berth up -d` that
    /// starts a server deploys before the election is won) is recorded once
    /// it leads; one a previous leader already wrote is not written again.
    #[tokio::test]
    async fn a_change_seen_before_leading_is_recorded_on_winning() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(berth_store::embedded::EmbeddedStore::open(&dir.path().join("db")).unwrap());
        let log = Arc::new(EventLog::open(store.clone(), 100).await.unwrap());
        let (lead_tx, lead_rx) = watch::channel(None);
        let (live_tx, _live_rx) = watch::channel(Arc::new(Live::default()));
        let mut observer = Observer::new(log, live_tx, lead_rx);
        let mut mirror = Mirror::default();
        observer.changed(&mirror, 1).await.unwrap();
        mirror.nodes.insert("n1".into(), node("n1"));
        observer.changed(&mirror, 2).await.unwrap();
        let none = list(store.as_ref(), &EventFilter::default(), 10)
            .await
            .unwrap();
        assert!(none.0.is_empty(), "a follower wrote {:?}", none.0);

        let token = store
            .put(crate::leader::KEY, bytes::Bytes::from_static(b"s1"), 0)
            .await
            .unwrap();
        lead_tx.send_replace(Some(token));
        observer.changed(&mirror, 3).await.unwrap();
        let (events, _) = list(store.as_ref(), &EventFilter::default(), 10)
            .await
            .unwrap();
        assert_eq!(kinds(&events), [EventKind::NodeJoined], "{events:?}");

        // Deposed, it sees n2 join, which the next leader records; winning
        // again, it must not write n2's join a second time.
        lead_tx.send_replace(None);
        mirror.nodes.insert("n2".into(), node("n2"));
        observer.changed(&mirror, 4).await.unwrap();
        let other = Arc::new(EventLog::open(store.clone(), 100).await.unwrap());
        other
            .record(
                vec![Event {
                    node: Some("n2".into()),
                    ..base(
                        EventKind::NodeJoined,
                        crate::now_ms(),
                        "node n2 joined".into(),
                    )
                }],
                Some(token),
            )
            .await
            .unwrap();
        let token = store
            .put(crate::leader::KEY, bytes::Bytes::from_static(b"s1"), 0)
            .await
            .unwrap();
        lead_tx.send_replace(Some(token));
        observer.changed(&mirror, 5).await.unwrap();
        let (events, _) = list(store.as_ref(), &EventFilter::default(), 10)
            .await
            .unwrap();
        assert_eq!(
            kinds(&events),
            [EventKind::NodeJoined, EventKind::NodeJoined],
            "{events:?}"
        );
    }

    #[test]
    fn a_new_run_of_the_same_slot_is_a_start() {
        let a = seen(vec![status(1, InstanceState::Running, Health::None)]);
        let mut s = status(1, InstanceState::Running, Health::None);
        s.uid = "u2".into();
        let b = seen(vec![s]);
        assert_eq!(kinds(&diff(&a, &b, 0)), [EventKind::InstanceStarted]);
    }

    #[test]
    fn filters_match_scope_and_cursor() {
        let e = Event {
            id: 10,
            ..stack_event(EventKind::Scaled, 0, "default", "shop", String::new())
        };
        let f = EventFilter {
            stack: Some("shop".into()),
            ..Default::default()
        };
        assert!(f.matches(&e));
        assert!(
            !EventFilter {
                since: 10,
                ..f.clone()
            }
            .matches(&e)
        );
        assert!(
            !EventFilter {
                stack: Some("blog".into()),
                ..Default::default()
            }
            .matches(&e)
        );
    }
}
