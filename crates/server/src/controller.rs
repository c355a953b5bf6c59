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
//! source passed in); the resulting writes are committed in one transaction
//! that compares every touched key's `mod_revision` with the one the plan
//! saw, so a plan computed from stale state is rejected and recomputed once
//! the watch has caught up. A crash anywhere is recovered by running the loop
//! again: nothing here is remembered outside the store.
//!
//! What the controller does not do: run anything (agents do), or write
//! desired state (only the API does, through `desired.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use berth_model::{
    Assignment, DesiredState, Health, InstanceKey, InstanceState, InstanceStatus, Millis, Node,
    StackRecord, keys,
};
use berth_scheduler::{Ask, Snapshot};
use berth_spec::types::{DependencyCondition, Service};
use berth_store::{Compare, Op, Revision, Store, Txn, encode};
use tokio::sync::watch;

use crate::mirror::{self, Follower, Mirror};

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

/// Compute the writes that move placement toward desired state.
///
/// `new_uid` gives a fresh incarnation id each call.
pub fn plan(mirror: &Mirror, now: Millis, new_uid: &mut dyn FnMut() -> String) -> Vec<Change> {
    let mut changes = Vec::new();
    // Assignments grouped by (ns, stack, service) → slot → (key, assignment, rev).
    type Slots<'a> = BTreeMap<u32, (&'a String, &'a Assignment, Revision)>;
    let mut by_service: BTreeMap<(&str, &str, &str), Slots<'_>> = BTreeMap::new();
    for (k, (a, rev)) in &mirror.assignments {
        by_service
            .entry((&a.key.namespace, &a.key.stack, &a.key.service))
            .or_default()
            .insert(a.key.slot, (k, a, *rev));
    }
    let mut wanted_services: BTreeSet<(&str, &str, &str)> = BTreeSet::new();
    let mut asks: Vec<(InstanceKey, &Service, &StackRecord)> = Vec::new();

    for (record, _) in mirror.stacks.values() {
        for (name, service) in &record.spec.services {
            let id = (
                record.namespace.as_str(),
                record.name.as_str(),
                name.as_str(),
            );
            wanted_services.insert(id);
            let desired = record.services.get(name);
            let replicas = desired.map_or(service.deploy.replicas, |d| d.replicas);
            let stopped = desired.is_some_and(|d| d.stopped);
            let generation = desired.map_or(0, |d| d.restart_generation);
            let run_state = if stopped {
                DesiredState::Stopped
            } else {
                DesiredState::Running
            };
            let empty = BTreeMap::new();
            let existing = by_service.get(&id).unwrap_or(&empty);

            for slot in 1..=replicas {
                match existing.get(&slot) {
                    Some((key, current, rev)) => {
                        let replace =
                            current.service != *service || current.restart_generation != generation;
                        if replace
                            || current.desired != run_state
                            || current.release != record.release
                        {
                            let mut next = (*current).clone();
                            if replace {
                                next.uid = new_uid();
                                next.service = service.clone();
                                next.restart_generation = generation;
                                next.created_at = now;
                            }
                            next.release = record.release;
                            next.desired = run_state;
                            changes.push(Change::Put {
                                key: (*key).clone(),
                                assignment: Box::new(next),
                                expect: *rev,
                            });
                        }
                    }
                    None if stopped => {}
                    None => {
                        if dependencies_met(mirror, record, service) {
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
            }
            for (slot, (key, _, rev)) in existing.range(replicas + 1..) {
                let _ = slot;
                changes.push(Change::Delete {
                    key: (*key).clone(),
                    expect: *rev,
                });
            }
        }
    }
    // Assignments of services or stacks that no longer exist.
    for (id, slots) in &by_service {
        if !wanted_services.contains(id) {
            for (key, _, rev) in slots.values() {
                changes.push(Change::Delete {
                    key: (*key).clone(),
                    expect: *rev,
                });
            }
        }
    }

    if !asks.is_empty() {
        let nodes: Vec<&Node> = mirror.nodes.values().collect();
        let placed: Vec<(&InstanceKey, &str)> = mirror
            .assignments
            .values()
            .map(|(a, _)| (&a.key, a.node.as_str()))
            .collect();
        let snapshot = Snapshot { nodes, placed };
        let scheduler_asks: Vec<Ask<'_>> = asks
            .iter()
            .map(|(key, service, _)| Ask {
                key,
                placement: &service.deploy.placement,
            })
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
                env: BTreeMap::new(),
                desired: DesiredState::Running,
                created_at: now,
                key: key.clone(),
            };
            changes.push(Change::Put {
                key: keys::assignment(&node, &key),
                assignment: Box::new(assignment),
                expect: 0,
            });
        }
        for (key, reason) in result.unplaced {
            tracing::warn!(instance = %key, %reason, "instance cannot be placed");
        }
    }
    changes
}

/// Whether every `depends_on` of `service` holds, judged from statuses.
///
/// A dependency "holds" when it has at least one instance and every
/// instance it has satisfies the condition; optional (`required: false`)
/// dependencies that are not part of the stack are skipped.
fn dependencies_met(mirror: &Mirror, record: &StackRecord, service: &Service) -> bool {
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

/// Run the controller until `shutdown` turns true.
pub async fn run(store: Arc<dyn Store>, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let mut controller = Controller {
        store: store.clone(),
        uids: Box::new(uid_source()),
        wait_for: 0,
    };
    mirror::follow(store, shutdown, &mut controller).await
}

struct Controller {
    store: Arc<dyn Store>,
    uids: Box<dyn FnMut() -> String + Send>,
    /// After a commit, do not plan again before the watch shows it: the plan
    /// would be computed from state we already changed.
    wait_for: Revision,
}

impl Follower for Controller {
    async fn changed(&mut self, mirror: &Mirror, seen: Revision) -> anyhow::Result<()> {
        if seen < self.wait_for {
            return Ok(());
        }
        let changes = plan(mirror, crate::now_ms(), &mut self.uids);
        if !changes.is_empty() {
            match commit(self.store.as_ref(), &changes).await? {
                Some(rev) => self.wait_for = rev,
                None => tracing::debug!("plan was stale; waiting for the watch to catch up"),
            }
        }
        Ok(())
    }

    fn relisted(&mut self) {
        self.wait_for = 0;
    }
}

/// Commit the changes atomically; `None` when a compare failed.
async fn commit(store: &dyn Store, changes: &[Change]) -> anyhow::Result<Option<Revision>> {
    let mut txn = Txn::default();
    for c in changes {
        match c {
            Change::Put {
                key,
                assignment,
                expect,
            } => {
                txn.compare.push(Compare::ModRevision(key.clone(), *expect));
                txn.success
                    .push(Op::put(key.clone(), encode(key, assignment)?));
            }
            Change::Delete { key, expect } => {
                txn.compare.push(Compare::ModRevision(key.clone(), *expect));
                txn.success.push(Op::Delete(key.clone()));
            }
        }
    }
    let result = store.txn(txn).await?;
    Ok(result.succeeded.then_some(result.revision))
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_model::ServiceDesired;

    fn stack(replicas: u32) -> StackRecord {
        let yaml = "services:\n  web:\n    command: sleep 100\n  db:\n    command: sleep 100\n";
        let opts = berth_spec::LoadOptions {
            files: vec![],
            working_dir: std::env::temp_dir(),
            project_name: Some("shop".into()),
            profiles: vec![],
            env: BTreeMap::new(),
        };
        let loaded = berth_spec::load_str(std::path::Path::new("compose.yaml"), yaml, &opts)
            .expect("test stack loads");
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
            spec: loaded.stack,
            services,
            updated_at: 0,
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

    #[test]
    fn scale_up_then_down_removes_highest_slots() {
        let mut m = mirror_with(stack(3));
        let mut n = 0;
        let mut uid = || {
            n += 1;
            format!("u{n}")
        };
        let mut rev = 10;
        let c = plan(&m, 1, &mut uid);
        assert_eq!(c.len(), 4, "3 web + 1 db: {c:?}");
        apply(&mut m, &c, &mut rev);
        assert!(plan(&m, 2, &mut uid).is_empty(), "second pass is a no-op");

        for (r, _) in m.stacks.values_mut() {
            if let Some(d) = r.services.get_mut("web") {
                d.replicas = 1;
            }
        }
        let c = plan(&m, 3, &mut uid);
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
        let c = plan(&m, 1, &mut uid);
        apply(&mut m, &c, &mut rev);
        let web_uid = |m: &Mirror| {
            m.assignments
                .values()
                .find(|(a, _)| a.key.service == "web")
                .map(|(a, _)| a.uid.clone())
        };
        let before = web_uid(&m);
        m.stacks.values_mut().for_each(|(r, _)| r.release = 2);
        let c = plan(&m, 2, &mut uid);
        apply(&mut m, &c, &mut rev);
        assert_eq!(web_uid(&m), before, "same spec, new release: no restart");
        m.stacks.values_mut().for_each(|(r, _)| {
            if let Some(s) = r.spec.services.get_mut("web") {
                s.stop_grace_period_ms = 1;
            }
        });
        let c = plan(&m, 3, &mut uid);
        apply(&mut m, &c, &mut rev);
        assert_ne!(web_uid(&m), before, "changed spec: replaced");
    }

    #[test]
    fn removed_stack_loses_its_assignments() {
        let mut m = mirror_with(stack(2));
        let mut uid = || "u".to_owned();
        let mut rev = 10;
        let c = plan(&m, 1, &mut uid);
        apply(&mut m, &c, &mut rev);
        m.stacks.clear();
        let c = plan(&m, 2, &mut uid);
        assert_eq!(
            c.iter()
                .filter(|c| matches!(c, Change::Delete { .. }))
                .count(),
            3
        );
    }
}
