//! `GET /v1/instances` and `GET /v1/nodes`: read-only views of placement and
//! actual state.
//!
//! An instance row is an assignment (what a node must run) joined with the
//! instance status its agent reports, by slot. Assigned but unreported slots
//! show as `pending`; statuses whose assignment is gone show until the agent
//! removes them, so a stopping instance never vanishes from `ps` early.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use berth_model::api::Instance;
use berth_model::{
    Assignment, DesiredState, Health, InstanceKey, InstanceState, InstanceStatus, Millis, Node,
    keys,
};
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

pub(crate) async fn nodes(State(ctx): State<ApiContext>) -> Result<Json<Vec<Node>>, ApiError> {
    let (kvs, _) = ctx.store.range(keys::NODES).await?;
    let nodes = kvs.iter().map(decode).collect::<Result<Vec<Node>, _>>()?;
    Ok(Json(nodes))
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
    Ok(slots
        .into_iter()
        .filter_map(|(key, (a, s))| row(key, a.as_ref(), s.as_ref(), now))
        .collect())
}

fn row(
    key: InstanceKey,
    assignment: Option<&Assignment>,
    status: Option<&InstanceStatus>,
    now: Millis,
) -> Option<Instance> {
    let desired = assignment.map(|a| a.desired);
    let base = Instance {
        namespace: key.namespace.clone(),
        stack: key.stack.clone(),
        service: key.service.clone(),
        instance: key.short(),
        slot: key.slot,
        uid: String::new(),
        node: String::new(),
        release: 0,
        desired,
        state: InstanceState::Pending,
        health: Health::None,
        current: false,
        pid: None,
        address: None,
        port: None,
        restarts: 0,
        last_exit: None,
        started_at: None,
        uptime_s: None,
        health_output: None,
        limits_warning: None,
        message: None,
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
                release: s.release,
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
