//! `GET /v1/instances` and `GET /v1/nodes`: read-only views of placement and
//! actual state.
//!
//! An instance row is an assignment (what a node must run) joined with the
//! instance status its agent reports, by slot. Assigned but unreported slots
//! show as `pending`; statuses whose assignment is gone show until the agent
//! removes them, so a stopping instance never vanishes from `ps` early.
//! A service the controller holds back because a `depends_on` condition is
//! unmet has no assignment yet; it shows as `pending` rows that name the
//! dependency it waits for, so `ps` and `up -d` can say why nothing runs.
//! Likewise, slots the scheduler could place on no node (the controller
//! records them under `/berth/unplaced/`) show as `pending` rows whose
//! message gives the reason per class of nodes.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use berth_model::api::Instance;
use berth_model::{
    Assignment, DesiredState, Health, InstanceKey, InstanceState, InstanceStatus, Millis,
    StackRecord, Unplaced, keys,
};
use berth_spec::types::DependencyCondition;
use berth_store::{Store, decode};
use serde::Deserialize;

use super::{ApiContext, ApiError, ApiQuery, now_ms};

/// Filters of `GET /v1/instances`; each narrows the result when given.
#[derive(Debug, Default, Deserialize)]
pub struct InstanceFilter {
    /// Namespace.
    pub namespace: Option<String>,
    /// Stack (within the namespace, or any namespace when none is given).
    pub stack: Option<String>,
    /// Service.
    pub service: Option<String>,
}

impl InstanceFilter {
    fn matches(&self, key: &InstanceKey) -> bool {
        self.namespace.as_ref().is_none_or(|n| *n == key.namespace)
            && self.stack.as_ref().is_none_or(|s| *s == key.stack)
            && self.service.as_ref().is_none_or(|s| *s == key.service)
    }
}

pub(crate) async fn list(
    State(ctx): State<ApiContext>,
    ApiQuery(filter): ApiQuery<InstanceFilter>,
) -> Result<Json<Vec<Instance>>, ApiError> {
    Ok(Json(instances(&*ctx.store, &filter, now_ms()).await?))
}

/// The instance rows matching `filter`, sorted by namespace, stack, service
/// and slot.
pub async fn instances(
    store: &dyn Store,
    filter: &InstanceFilter,
    now: Millis,
) -> Result<Vec<Instance>, ApiError> {
    // Assignments are keyed by node first, so every node's are scanned; the
    // status prefix narrows to a stack when one is named.
    let (assign_kvs, _) = store.range(keys::ASSIGNMENTS).await?;
    let status_prefix = match (&filter.namespace, &filter.stack) {
        (Some(ns), Some(stack)) => keys::status_of_stack(ns, stack),
        (Some(ns), None) => format!("{}{ns}/", keys::STATUS),
        _ => keys::STATUS.to_owned(),
    };
    let (status_kvs, _) = store.range(&status_prefix).await?;

    let mut slots: BTreeMap<InstanceKey, (Option<Assignment>, Option<InstanceStatus>)> =
        BTreeMap::new();
    for kv in &assign_kvs {
        let a: Assignment = decode(kv)?;
        if !filter.matches(&a.key) {
            continue;
        }
        let entry = slots.entry(a.key.clone()).or_default();
        // During a move two nodes may hold the slot; the running one wins.
        let replace = entry
            .0
            .as_ref()
            .is_none_or(|old| old.desired != DesiredState::Running);
        if replace {
            entry.0 = Some(a);
        }
    }
    for kv in &status_kvs {
        let s: InstanceStatus = decode(kv)?;
        if filter.matches(&s.key) {
            let key = s.key.clone();
            slots.entry(key).or_default().1 = Some(s);
        }
    }
    let stack_prefix = match (&filter.namespace, &filter.stack) {
        (Some(ns), Some(stack)) => keys::stack(ns, stack),
        (Some(ns), None) => keys::stacks_in(ns),
        _ => keys::STACKS.to_owned(),
    };
    let (stack_kvs, _) = store.range(&stack_prefix).await?;
    let mut held: BTreeMap<InstanceKey, String> = BTreeMap::new();
    for kv in &stack_kvs {
        let record: StackRecord = decode(kv)?;
        if filter.stack.as_ref().is_some_and(|s| *s != record.name) {
            continue;
        }
        for (key, why) in held_back(&record, &slots) {
            if filter.matches(&key) {
                held.insert(key, why);
            }
        }
    }
    // Slots the scheduler could place nowhere (recorded by the leader's
    // controller) have neither an assignment nor a status: without these
    // rows `ps` would show fewer instances than asked for, and not why.
    let unplaced_prefix = match (&filter.namespace, &filter.stack) {
        (Some(ns), Some(stack)) => keys::unplaced(ns, stack),
        (Some(ns), None) => format!("{}{ns}/", keys::UNPLACED),
        _ => keys::UNPLACED.to_owned(),
    };
    let (unplaced_kvs, _) = store.range(&unplaced_prefix).await?;
    for kv in &unplaced_kvs {
        let Some((namespace, stack)) = kv
            .key
            .strip_prefix(keys::UNPLACED)
            .and_then(|rest| rest.split_once('/'))
        else {
            continue;
        };
        let record: Unplaced = decode(kv)?;
        for u in record.instances {
            let key = InstanceKey {
                namespace: namespace.to_owned(),
                stack: stack.to_owned(),
                service: u.service,
                slot: u.slot,
            };
            if filter.matches(&key) && !slots.contains_key(&key) && !held.contains_key(&key) {
                held.insert(key, format!("no node can run it: {}", u.reason));
            }
        }
    }
    let mut rows: Vec<Instance> = slots
        .into_iter()
        .filter_map(|(key, (a, s))| row(key, a.as_ref(), s.as_ref(), now))
        .collect();
    rows.extend(held.into_iter().map(|(key, why)| waiting_row(&key, why)));
    rows.sort_by(|a, b| {
        (&a.namespace, &a.stack, &a.service, a.slot).cmp(&(
            &b.namespace,
            &b.stack,
            &b.service,
            b.slot,
        ))
    });
    Ok(rows)
}

/// The unassigned slots of `record`'s services whose `depends_on` is unmet,
/// with what each waits for ("waiting for db: service_healthy"). Judged like
/// the controller judges it: a dependency holds when it has instances and
/// every one satisfies the condition.
fn held_back(
    record: &StackRecord,
    slots: &BTreeMap<InstanceKey, (Option<Assignment>, Option<InstanceStatus>)>,
) -> Vec<(InstanceKey, String)> {
    type Slots = BTreeMap<InstanceKey, (Option<Assignment>, Option<InstanceStatus>)>;
    fn of<'a>(
        slots: &'a Slots,
        record: &'a StackRecord,
        service: &'a str,
    ) -> impl Iterator<Item = &'a (Option<Assignment>, Option<InstanceStatus>)> + 'a {
        slots
            .iter()
            .filter(move |(k, _)| {
                k.namespace == record.namespace && k.stack == record.name && k.service == service
            })
            .map(|(_, v)| v)
    }
    let mut out = Vec::new();
    for (name, desired) in &record.services {
        let Some(service) = record.spec.services.get(name) else {
            continue;
        };
        if desired.stopped
            || service.depends_on.is_empty()
            || of(slots, record, name).next().is_some()
        {
            continue;
        }
        let unmet = service.depends_on.iter().find(|(dep, d)| {
            if !record.spec.services.contains_key(*dep) {
                return d.required;
            }
            let statuses: Vec<&InstanceStatus> = of(slots, record, dep)
                .filter_map(|(_, s)| s.as_ref())
                .collect();
            statuses.is_empty()
                || !statuses.iter().all(|s| match d.condition {
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
        });
        let Some((dep, d)) = unmet else {
            continue;
        };
        let condition = match d.condition {
            DependencyCondition::ServiceStarted => "service_started",
            DependencyCondition::ServiceHealthy => "service_healthy",
            DependencyCondition::ServiceCompletedSuccessfully => "service_completed_successfully",
        };
        for slot in 1..=desired.replicas {
            let key = InstanceKey {
                namespace: record.namespace.clone(),
                stack: record.name.clone(),
                service: name.clone(),
                slot,
            };
            out.push((key, format!("waiting for {dep}: {condition}")));
        }
    }
    out
}

/// The row of a slot held back by an unmet dependency.
/// An instance the scheduler could place nowhere (`berth ps` shows it
/// `pending`, with why).
fn waiting_row(key: &InstanceKey, why: String) -> Instance {
    Instance {
        desired: Some(DesiredState::Running),
        message: Some(why),
        ..unreported_row(key)
    }
}

/// The row of an instance nothing is known of yet: what [`row`] fills in
/// from the assignment and the status.
fn unreported_row(key: &InstanceKey) -> Instance {
    Instance {
        namespace: key.namespace.clone(),
        stack: key.stack.clone(),
        service: key.service.clone(),
        instance: key.short(),
        slot: key.slot,
        uid: String::new(),
        node: String::new(),
        release: 0,
        desired: None,
        state: InstanceState::Pending,
        health: Health::None,
        current: false,
        pid: None,
        address: None,
        port: None,
        host_ports: Default::default(),
        restarts: 0,
        last_exit: None,
        started_at: None,
        uptime_s: None,
        health_output: None,
        limits_warning: None,
        message: None,
    }
}

fn row(
    key: InstanceKey,
    assignment: Option<&Assignment>,
    status: Option<&InstanceStatus>,
    now: Millis,
) -> Option<Instance> {
    let desired = assignment.map(|a| a.desired);
    let base = Instance {
        desired,
        ..unreported_row(&key)
    };
    match (assignment, status) {
        (None, None) => None,
        (Some(a), None) => Some(Instance {
            uid: a.uid.clone(),
            node: a.node.clone(),
            release: a.release,
            state: match a.desired {
                DesiredState::Running => InstanceState::Pending,
                DesiredState::Stopped => InstanceState::Stopped,
            },
            current: a.desired == DesiredState::Running,
            message: match a.desired {
                DesiredState::Running => {
                    Some(format!("assigned to node {}, not reported yet", a.node))
                }
                DesiredState::Stopped => None,
            },
            ..base
        }),
        (a, Some(s)) => {
            let same_incarnation = a.is_some_and(|a| a.uid == s.uid);
            let message = match (a, same_incarnation) {
                (None, _) => s
                    .message
                    .clone()
                    .or(Some("assignment removed; stopping".into())),
                (Some(a), false) => Some(format!(
                    "being replaced by incarnation {} (release {})",
                    a.uid, a.release
                )),
                (Some(_), true) => s.message.clone(),
            };
            let running = s.state == InstanceState::Running;
            Some(Instance {
                uid: s.uid.clone(),
                node: s.node.clone(),
                // A release that kept this service's spec keeps its instance:
                // the assignment's release is what it now runs.
                release: match a {
                    Some(a) if same_incarnation => a.release.max(s.release),
                    _ => s.release,
                },
                state: s.state,
                health: s.health,
                current: same_incarnation && desired == Some(DesiredState::Running),
                pid: s.pid,
                address: match (&s.address, s.port) {
                    (Some(ip), Some(port)) if ip.contains(':') => Some(format!("[{ip}]:{port}")),
                    (Some(ip), Some(port)) => Some(format!("{ip}:{port}")),
                    _ => None,
                },
                port: s.port,
                host_ports: s.host_ports.clone(),
                restarts: s.restarts,
                last_exit: s.last_exit.clone(),
                started_at: s.started_at,
                uptime_s: s
                    .started_at
                    .filter(|_| running)
                    .map(|t| now.saturating_sub(t) / 1000),
                health_output: s.health_output.clone(),
                limits_warning: s.limits_warning.clone(),
                message,
                ..base
            })
        }
    }
}
