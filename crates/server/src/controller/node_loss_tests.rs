//! [`plan_with`] when nodes go away and come back: fake mirrors, no store.

use std::collections::BTreeMap;

use berth_model::{Node, ServiceDesired, StackRecord, keys};
use berth_store::Revision;

use super::{Change, Liveness, Plan, plan_with, uid_source};
use crate::mirror::Mirror;

const GRACE: u64 = 10_000;

fn node(id: &str) -> Node {
    Node {
        id: id.into(),
        address: "127.0.0.1".into(),
        labels: BTreeMap::new(),
        facts: BTreeMap::new(),
        draining: false,
        updated_at: 0,
    }
}

fn mirror(yaml: &str, nodes: &[&str]) -> Mirror {
    let stack = crate::test_util::stack(yaml);
    let services = stack
        .services
        .iter()
        .map(|(n, s)| {
            let d = ServiceDesired {
                replicas: s.deploy.replicas,
                stopped: false,
                restart_generation: 0,
            };
            (n.clone(), d)
        })
        .collect();
    let record = StackRecord {
        namespace: "default".into(),
        name: "shop".into(),
        release: 1,
        spec: stack,
        services,
        updated_at: 0,
        config: Default::default(),
        rollout: None,
    };
    let mut m = Mirror::default();
    m.stacks.insert(keys::stack("default", "shop"), (record, 1));
    for n in nodes {
        m.nodes.insert((*n).to_owned(), node(n));
    }
    m
}

struct Sim {
    m: Mirror,
    rev: Revision,
    liveness: Liveness,
    uids: Box<dyn FnMut() -> String>,
}

impl Sim {
    fn new(yaml: &str, nodes: &[&str]) -> Self {
        Self {
            m: mirror(yaml, nodes),
            rev: 1,
            liveness: Liveness {
                down_since: BTreeMap::new(),
                reschedule_after_ms: GRACE,
            },
            uids: Box::new(uid_source()),
        }
    }

    /// One controller pass at `now`, applied to the mirror.
    fn step(&mut self, now: u64) -> Plan {
        self.liveness.observe(&self.m, now);
        let plan = plan_with(&self.m, now, &self.liveness, &mut self.uids);
        for c in &plan.changes {
            self.rev += 1;
            match c {
                Change::Put {
                    key, assignment, ..
                } => {
                    self.m
                        .assignments
                        .insert(key.clone(), ((**assignment).clone(), self.rev));
                }
                Change::Delete { key, .. } => {
                    self.m.assignments.remove(key);
                }
            }
        }
        for d in &plan.down {
            self.rev += 1;
            match d.since {
                Some(since) => {
                    let mark = berth_model::NodeDown { since };
                    self.m.down.insert(d.node.clone(), (mark, self.rev));
                }
                None => {
                    self.m.down.remove(&d.node);
                }
            }
        }
        for w in &plan.unplaced {
            self.rev += 1;
            match &w.value {
                Some(v) => {
                    self.m.unplaced.insert(w.key.clone(), (v.clone(), self.rev));
                }
                None => {
                    self.m.unplaced.remove(&w.key);
                }
            }
        }
        plan
    }

    /// `(service, slot, node)` of every assignment.
    fn placed(&self) -> Vec<(String, u32, String)> {
        let mut v: Vec<_> = self
            .m
            .assignments
            .values()
            .map(|(a, _)| (a.key.service.clone(), a.key.slot, a.node.clone()))
            .collect();
        v.sort();
        v
    }

    fn on(&self, node: &str) -> usize {
        self.placed().iter().filter(|(_, _, n)| n == node).count()
    }
}

const WEB: &str = "services:\n  web:\n    command: sleep 100\n    deploy: { replicas: 4 }\n";

#[test]
fn a_lost_nodes_instances_move_after_the_grace_period_only() {
    let mut s = Sim::new(WEB, &["a", "b"]);
    s.step(0);
    assert_eq!((s.on("a"), s.on("b")), (2, 2));

    // b's lease expires: it is down, but its instances stay for the grace.
    s.m.nodes.remove("b");
    let p = s.step(1_000);
    assert!(p.changes.is_empty(), "{:?}", p.changes);
    assert_eq!(p.wake_at, Some(1_000 + GRACE), "wakes when the grace ends");
    assert_eq!(s.liveness.down_since.get("b"), Some(&1_000));
    assert!(s.step(1_000 + GRACE - 1).changes.is_empty());

    // Grace over: b's two are deleted and placed on a in one plan.
    let p = s.step(1_000 + GRACE);
    let deletes = p
        .changes
        .iter()
        .filter(|c| matches!(c, Change::Delete { key, .. } if key.contains("/b/")))
        .count();
    assert_eq!(deletes, 2, "{:?}", p.changes);
    assert_eq!((s.on("a"), s.on("b")), (4, 0));
    assert!(s.step(1_000 + GRACE + 1).changes.is_empty(), "settled");

    // b comes back: it has nothing assigned (so its agent stops what it
    // still runs), is no longer down, and gets nothing moved back.
    s.m.nodes.insert("b".into(), node("b"));
    assert!(s.step(20_000).changes.is_empty());
    assert!(s.liveness.down_since.is_empty());
    assert_eq!(s.on("b"), 0);
}

#[test]
fn a_node_back_within_the_grace_keeps_its_instances() {
    let mut s = Sim::new(WEB, &["a", "b"]);
    s.step(0);
    let before = s.placed();
    s.m.nodes.remove("b");
    s.step(1_000);
    s.m.nodes.insert("b".into(), node("b"));
    assert!(s.step(5_000).changes.is_empty());
    assert!(s.step(1_000 + GRACE * 2).changes.is_empty());
    assert_eq!(s.placed(), before);
    assert!(s.liveness.down_since.is_empty());
}

#[test]
fn with_no_live_node_left_instances_wait_instead_of_vanishing() {
    let mut s = Sim::new(WEB, &["a"]);
    s.step(0);
    s.m.nodes.remove("a");
    s.step(1);
    // Deleted after the grace (their node is gone), and pending: nowhere
    // to go until a node joins.
    s.step(1 + GRACE);
    assert!(s.placed().is_empty());
    s.m.nodes.insert("c".into(), node("c"));
    s.step(1 + GRACE + 1);
    assert_eq!(s.on("c"), 4);
}

#[test]
fn global_services_follow_the_eligible_nodes() {
    let yaml = "services:\n  agent:\n    command: sleep 100\n    deploy:\n      mode: global\n      placement:\n        constraints: [\"node.labels.role == worker\"]\n";
    let mut s = Sim::new(yaml, &[]);
    for id in ["a", "b", "c"] {
        let mut n = node(id);
        n.labels.insert("role".into(), "worker".into());
        s.m.nodes.insert(id.into(), n);
    }
    s.m.nodes.insert("m".into(), node("m"));
    s.step(0);
    assert_eq!((s.on("a"), s.on("b"), s.on("c"), s.on("m")), (1, 1, 1, 0));

    // Down within the grace: its instance still counts, nothing churns.
    s.m.nodes.remove("c");
    assert!(s.step(1_000).changes.is_empty());
    // After the grace it goes, and no second copy lands anywhere.
    s.step(1_000 + GRACE);
    assert_eq!((s.on("a"), s.on("b"), s.on("c")), (1, 1, 0));

    // A label change makes a ineligible: its instance is removed (not the
    // highest slot on some other node).
    s.m.nodes.get_mut("a").unwrap().labels.clear();
    s.step(20_000);
    assert_eq!((s.on("a"), s.on("b")), (0, 1));
    // A new eligible node gets one.
    let mut d = node("d");
    d.labels.insert("role".into(), "worker".into());
    s.m.nodes.insert("d".into(), d);
    s.step(21_000);
    assert_eq!((s.on("b"), s.on("d")), (1, 1));
    assert!(s.step(22_000).changes.is_empty());
}

#[test]
fn unplaced_instances_are_recorded_with_reasons_until_placed() {
    let yaml = "services:\n  web:\n    command: sleep 100\n    deploy:\n      replicas: 2\n      placement:\n        constraints: [\"node.labels.zone == east\"]\n";
    let mut s = Sim::new(yaml, &["a", "b"]);
    let p = s.step(0);
    assert!(p.changes.is_empty(), "{:?}", p.changes);
    let key = keys::unplaced("default", "shop");
    assert_eq!(p.unplaced.len(), 1);
    assert_eq!(p.unplaced[0].key, key);
    let (record, _) = &s.m.unplaced[&key];
    let slots: Vec<(&str, u32, &str)> = record
        .instances
        .iter()
        .map(|i| (i.service.as_str(), i.slot, i.reason.as_str()))
        .collect();
    assert_eq!(
        slots,
        [
            ("web", 1, "2 nodes: constraint node.labels.zone == east"),
            ("web", 2, "2 nodes: constraint node.labels.zone == east"),
        ]
    );
    // Unchanged: nothing is written again (no write, no wake-up loop).
    assert!(s.step(1).unplaced.is_empty());

    // A node that fits joins: both are placed and the record goes in the
    // same plan.
    let mut east = node("c");
    east.labels.insert("zone".into(), "east".into());
    s.m.nodes.insert("c".into(), east);
    let p = s.step(2);
    assert_eq!(s.on("c"), 2);
    assert_eq!(p.unplaced.len(), 1);
    assert_eq!(p.unplaced[0].value, None);
    assert!(s.m.unplaced.is_empty());
    assert!(s.step(3).unplaced.is_empty());
}

#[test]
fn a_removed_stacks_unplaced_record_is_deleted() {
    let mut s = Sim::new(WEB, &[]);
    s.step(0);
    let key = keys::unplaced("default", "shop");
    assert_eq!(s.m.unplaced[&key].0.instances[0].reason, "no nodes are up");
    s.m.stacks.clear();
    let p = s.step(1);
    assert_eq!(p.unplaced.len(), 1);
    assert!(s.m.unplaced.is_empty());
}

#[test]
fn a_new_leader_continues_the_grace_period_from_the_stored_mark() {
    let mut s = Sim::new(WEB, &["a", "b"]);
    s.step(0);
    s.m.nodes.remove("b");
    let p = s.step(1_000);
    assert_eq!(p.down.len(), 1, "the mark is written: {:?}", p.down);
    assert_eq!(s.m.down["b"].0.since, 1_000);
    assert!(s.step(2_000).down.is_empty(), "written once");

    // The leader changes at 6 s: the new one starts with no memory, and
    // still moves b's instances when the grace that began at 1 s ends,
    // not 10 s after it took over.
    s.liveness = Liveness {
        down_since: BTreeMap::new(),
        reschedule_after_ms: GRACE,
    };
    let p = s.step(6_000);
    assert!(p.changes.is_empty() && p.down.is_empty(), "{p:?}");
    assert_eq!(p.wake_at, Some(1_000 + GRACE));
    s.step(1_000 + GRACE);
    assert_eq!((s.on("a"), s.on("b")), (4, 0));
    // Nothing is assigned to b any more: its mark goes.
    let p = s.step(1_000 + GRACE + 1);
    assert_eq!(p.down.len(), 1);
    assert!(s.m.down.is_empty());
}

#[test]
fn a_node_back_within_the_grace_loses_its_down_mark() {
    let mut s = Sim::new(WEB, &["a", "b"]);
    s.step(0);
    s.m.nodes.remove("b");
    s.step(1_000);
    assert!(s.m.down.contains_key("b"));
    s.m.nodes.insert("b".into(), node("b"));
    s.step(2_000);
    assert!(s.m.down.is_empty());
}
