//! Placement as a pure function: a read-only snapshot of the cluster and the
//! instances that need a node go in, a [`Plan`] comes out.
//!
//! No I/O, no clock, no tokio, no randomness: the same snapshot always gives
//! the same plan, so the controller can compute optimistically and commit
//! with compare-and-swap, recomputing when the store moved underneath it.
//!
//! Pipeline for each instance to place (Nomad's, trimmed):
//! feasibility (node not draining, constraints hold, `max_replicas_per_node`)
//! → score (spread: fewest instances of the same service, then fewest
//! instances overall; ties broken by node id) → pick the best node.
//! Instances that fit nowhere are returned with a reason per group of nodes.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::collections::{BTreeMap, HashMap};

use berth_model::{InstanceKey, Node};
use berth_spec::types::Placement;

pub mod constraint;

/// What the scheduler sees: nodes and where instances already run.
#[derive(Debug, Default, Clone)]
pub struct Snapshot<'a> {
    /// Every known node that is up.
    pub nodes: Vec<&'a Node>,
    /// Existing placements: instance → node id.
    pub placed: Vec<(&'a InstanceKey, &'a str)>,
}

/// One instance that needs a node.
#[derive(Debug, Clone)]
pub struct Ask<'a> {
    /// The slot.
    pub key: &'a InstanceKey,
    /// The service's placement rules.
    pub placement: &'a Placement,
}

/// The scheduler's answer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Instance → chosen node id.
    pub placements: Vec<(InstanceKey, String)>,
    /// Instances that fit nowhere, with a reason such as
    /// `"2 nodes: constraint node.labels.zone == east; 1 node: draining"`.
    pub unplaced: Vec<(InstanceKey, String)>,
}

/// Place every ask. Earlier placements in the same plan count for spread.
pub fn place(snapshot: &Snapshot<'_>, asks: &[Ask<'_>]) -> Plan {
    // Counters are keyed by (node, service identity) and node; the snapshot
    // is read once so placing N instances is O(N × nodes).
    let mut per_service: HashMap<(&str, (&str, &str, &str)), u32> = HashMap::new();
    let mut per_node: HashMap<&str, u32> = HashMap::new();
    for (key, node) in &snapshot.placed {
        *per_service.entry((node, service_id(key))).or_default() += 1;
        *per_node.entry(node).or_default() += 1;
    }
    let mut plan = Plan::default();
    for ask in asks {
        let sid = service_id(ask.key);
        let mut best: Option<(&Node, (u32, u32))> = None;
        let mut rejections: BTreeMap<String, u32> = BTreeMap::new();
        for node in &snapshot.nodes {
            let same = per_service
                .get(&(node.id.as_str(), sid))
                .copied()
                .unwrap_or(0);
            if let Err(reason) = feasible(node, ask.placement, same) {
                *rejections.entry(reason).or_default() += 1;
                continue;
            }
            let score = (same, per_node.get(node.id.as_str()).copied().unwrap_or(0));
            let better = match &best {
                None => true,
                Some((b, bs)) => score < *bs || (score == *bs && node.id < b.id),
            };
            if better {
                best = Some((node, score));
            }
        }
        match best {
            Some((node, _)) => {
                *per_service.entry((node.id.as_str(), sid)).or_default() += 1;
                *per_node.entry(node.id.as_str()).or_default() += 1;
                plan.placements.push((ask.key.clone(), node.id.clone()));
            }
            None => plan.unplaced.push((ask.key.clone(), explain(&rejections))),
        }
    }
    plan
}

fn service_id(key: &InstanceKey) -> (&str, &str, &str) {
    (&key.namespace, &key.stack, &key.service)
}

fn feasible(node: &Node, placement: &Placement, same_service: u32) -> Result<(), String> {
    if node.draining {
        return Err("draining".to_owned());
    }
    for expr in &placement.constraints {
        match constraint::Constraint::parse(expr) {
            Ok(c) if c.holds(node) => {}
            Ok(_) => return Err(format!("constraint {expr}")),
            Err(e) => return Err(format!("invalid constraint {expr:?}: {e}")),
        }
    }
    if let Some(max) = placement.max_replicas_per_node
        && same_service >= max
    {
        return Err(format!("max_replicas_per_node {max} reached"));
    }
    Ok(())
}

fn explain(rejections: &BTreeMap<String, u32>) -> String {
    if rejections.is_empty() {
        return "no nodes are up".to_owned();
    }
    rejections
        .iter()
        .map(|(reason, n)| format!("{n} node{}: {reason}", if *n == 1 { "" } else { "s" }))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, labels: &[(&str, &str)]) -> Node {
        Node {
            id: id.into(),
            address: "127.0.0.1".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            facts: BTreeMap::new(),
            draining: false,
            updated_at: 0,
        }
    }

    fn key(service: &str, slot: u32) -> InstanceKey {
        InstanceKey {
            namespace: "default".into(),
            stack: "s".into(),
            service: service.into(),
            slot,
        }
    }

    #[test]
    fn spreads_replicas_over_nodes() {
        let nodes = [node("a", &[]), node("b", &[]), node("c", &[])];
        let snap = Snapshot {
            nodes: nodes.iter().collect(),
            placed: vec![],
        };
        let keys: Vec<_> = (1..=6).map(|i| key("web", i)).collect();
        let placement = Placement::default();
        let asks: Vec<_> = keys
            .iter()
            .map(|k| Ask {
                key: k,
                placement: &placement,
            })
            .collect();
        let plan = place(&snap, &asks);
        let mut count: BTreeMap<&str, u32> = BTreeMap::new();
        for (_, n) in &plan.placements {
            *count.entry(n).or_default() += 1;
        }
        assert_eq!(count.values().copied().collect::<Vec<_>>(), vec![2, 2, 2]);
        assert!(plan.unplaced.is_empty());
    }

    #[test]
    fn constraints_and_reasons() {
        let nodes = [
            node("a", &[("zone", "east")]),
            node("b", &[("zone", "west")]),
            node("c", &[]),
        ];
        let snap = Snapshot {
            nodes: nodes.iter().collect(),
            placed: vec![],
        };
        let k = key("db", 1);
        let east = Placement {
            constraints: vec!["node.labels.zone == east".into()],
            max_replicas_per_node: Some(1),
            ..Placement::default()
        };
        let k2 = key("db", 2);
        let plan = place(
            &snap,
            &[
                Ask {
                    key: &k,
                    placement: &east,
                },
                Ask {
                    key: &k2,
                    placement: &east,
                },
            ],
        );
        assert_eq!(plan.placements, vec![(k, "a".to_owned())]);
        assert_eq!(plan.unplaced.len(), 1);
        assert_eq!(
            plan.unplaced[0].1,
            "2 nodes: constraint node.labels.zone == east; 1 node: max_replicas_per_node 1 reached"
        );
    }

    #[test]
    fn draining_nodes_get_nothing() {
        let mut a = node("a", &[]);
        a.draining = true;
        let snap = Snapshot {
            nodes: vec![&a],
            placed: vec![],
        };
        let k = key("web", 1);
        let p = Placement::default();
        let plan = place(
            &snap,
            &[Ask {
                key: &k,
                placement: &p,
            }],
        );
        assert_eq!(plan.unplaced[0].1, "1 node: draining");
    }
}
