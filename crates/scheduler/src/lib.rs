//! Placement as a pure function: a read-only snapshot of the cluster and the
//! instances that need a node go in, a [`Plan`] comes out.
//!
//! No I/O, no clock, no tokio, no randomness: the same snapshot always gives
//! the same plan, so the controller can compute optimistically and commit
//! with compare-and-swap, recomputing when the store moved underneath it.
//!
//! # Pipeline (Nomad's, trimmed)
//!
//! Asks are grouped by service. For each group:
//! 1. **Feasibility** of every node, once per group: not draining, every
//!    constraint holds (evaluated once per distinct expression and node, and
//!    shared by the services that use it), `x-berth.placement.affinity`
//!    services run there, `anti_affinity` services do not.
//! 2. **Ranking**: feasible nodes go into a tree with one level per
//!    `spread:` preference (the values of that attribute; a node without it
//!    is in the `""` group), whose leaves are binary heaps keyed by the
//!    strategy's score:
//!    - spread (default): fewest instances of the service, then fewest
//!      instances overall, then node id;
//!    - binpack: most reserved (cpu and memory, as fractions of capacity),
//!      then most instances, then node id.
//!
//!    At each level the group with the fewest instances of the service is
//!    tried first, so instances spread over zones before nodes.
//! 3. **Pick**: pop the best node; if `max_replicas_per_node` is reached or
//!    the reservation no longer fits, drop it for this group (both only get
//!    worse as the group places more); otherwise place, update the node and
//!    push it back. Each placement costs O(log nodes), so placing N
//!    instances of S services on M nodes is O(S × M + N log M), not O(N × M).
//!
//! Instances that fit nowhere come back in [`Plan::unplaced`] with a reason
//! per class of nodes, most common first:
//! `"3 nodes: constraint node.labels.zone == east; 2 nodes: insufficient memory"`.
//!
//! `deploy.mode: global` services get at most one instance per node; the
//! caller asks for [`eligible_nodes`]`.len()` instances, which places exactly
//! one on every eligible node.
//!
//! Resources: a node's capacity is its `cpus` fact (cores) and `memory_total`
//! fact (bytes); what is already placed there (by reservation) is subtracted.
//! A node that does not report a capacity is not limited on it.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::rc::Rc;

use berth_model::{InstanceKey, Node};
use berth_spec::constraint::{Attribute, Constraint};
use berth_spec::types::{DeployMode, Service, Strategy};

pub mod constraint;

/// What the scheduler sees: nodes and where instances already run.
#[derive(Debug, Default, Clone)]
pub struct Snapshot<'a> {
    /// Every known node that is up.
    pub nodes: Vec<&'a Node>,
    /// Existing placements.
    pub placed: Vec<Placed<'a>>,
}

/// One instance already on a node.
#[derive(Debug, Clone, Copy)]
pub struct Placed<'a> {
    /// The slot.
    pub key: &'a InstanceKey,
    /// Node id it runs on.
    pub node: &'a str,
    /// What it reserves there.
    pub reservation: Reservation,
}

/// Reserved resources of one instance (`deploy.resources.reservations`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reservation {
    /// Thousandths of a CPU.
    pub millicpus: u64,
    /// Bytes.
    pub memory: u64,
}

impl Reservation {
    /// The reservation of one instance of `service`.
    pub fn of(service: &Service) -> Self {
        let r = &service.deploy.resources.reservations;
        Self {
            millicpus: r.cpus.map_or(0, millis),
            memory: r.memory_bytes.unwrap_or(0),
        }
    }
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // clamped
fn millis(cpus: f64) -> u64 {
    (cpus * 1000.0).round().clamp(0.0, u64::MAX as f64) as u64
}

/// One instance that needs a node.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// The slot.
    pub key: &'a InstanceKey,
    /// The service it is an instance of (placement, resources, mode).
    pub service: &'a Service,
}

/// The scheduler's answer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Instance → chosen node id, in the order they were placed.
    pub placements: Vec<(InstanceKey, String)>,
    /// Instances that fit nowhere, with a reason per class of nodes.
    pub unplaced: Vec<(InstanceKey, String)>,
}

type ServiceId<'a> = (&'a str, &'a str, &'a str);

/// The mutable view of the cluster while a plan is being made.
struct State<'a> {
    /// Nodes sorted by id: an index order that is also the tie-break order.
    nodes: Vec<&'a Node>,
    cap: Vec<(Option<u64>, Option<u64>)>,
    used: Vec<Reservation>,
    total: Vec<u32>,
    services: HashMap<ServiceId<'a>, u32>,
    /// Per service: node → instances of the service on the node.
    count: Vec<HashMap<u32, u32>>,
    /// Constraint text → whether each node satisfies it.
    constraint_cache: HashMap<String, Rc<Vec<bool>>>,
    /// Spread attribute → each node's value, interned in value order.
    spread_cache: HashMap<Attribute, Rc<Vec<u32>>>,
}

impl<'a> State<'a> {
    fn new(snapshot: &Snapshot<'a>) -> Self {
        let mut nodes = snapshot.nodes.clone();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        nodes.dedup_by(|a, b| a.id == b.id);
        let cap = nodes
            .iter()
            .map(|n| {
                (
                    constraint::fact_number(n, "cpus").map(millis),
                    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                    constraint::fact_number(n, "memory_total").map(|m| m.max(0.0) as u64),
                )
            })
            .collect();
        let index: HashMap<&str, u32> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.id.as_str(), idx(i)))
            .collect();
        let mut st = Self {
            used: vec![Reservation::default(); nodes.len()],
            total: vec![0; nodes.len()],
            nodes,
            cap,
            services: HashMap::new(),
            count: Vec::new(),
            constraint_cache: HashMap::new(),
            spread_cache: HashMap::new(),
        };
        for p in &snapshot.placed {
            // Instances on nodes that are not up hold nothing here.
            let Some(&n) = index.get(p.node) else {
                continue;
            };
            let s = st.service(service_id(p.key));
            st.add(s, n, p.reservation);
        }
        st
    }

    fn service(&mut self, id: ServiceId<'a>) -> u32 {
        let next = idx(self.services.len());
        let s = *self.services.entry(id).or_insert(next);
        if s == next {
            self.count.push(HashMap::new());
        }
        s
    }

    fn same(&self, service: u32, node: u32) -> u32 {
        let per = &self.count[service as usize];
        // Most services are new in a plan: skip hashing for them.
        if per.is_empty() {
            return 0;
        }
        per.get(&node).copied().unwrap_or(0)
    }

    fn add(&mut self, service: u32, node: u32, r: Reservation) {
        *self.count[service as usize].entry(node).or_default() += 1;
        let n = node as usize;
        self.total[n] += 1;
        self.used[n].millicpus += r.millicpus;
        self.used[n].memory += r.memory;
    }

    /// Why `r` does not fit on `node`, if it does not.
    fn misfit(&self, node: u32, r: Reservation) -> Option<&'static str> {
        let n = node as usize;
        let (cpu, mem) = self.cap[n];
        if mem.is_some_and(|c| self.used[n].memory + r.memory > c) && r.memory > 0 {
            return Some("insufficient memory");
        }
        if cpu.is_some_and(|c| self.used[n].millicpus + r.millicpus > c) && r.millicpus > 0 {
            return Some("insufficient cpu");
        }
        None
    }

    fn constraint(&mut self, c: &Constraint) -> Rc<Vec<bool>> {
        if let Some(v) = self.constraint_cache.get(&c.text) {
            return v.clone();
        }
        let v: Rc<Vec<bool>> =
            Rc::new(self.nodes.iter().map(|n| constraint::holds(c, n)).collect());
        self.constraint_cache.insert(c.text.clone(), v.clone());
        v
    }

    fn spread_values(&mut self, attr: &Attribute) -> Rc<Vec<u32>> {
        if let Some(v) = self.spread_cache.get(attr) {
            return v.clone();
        }
        let values: Vec<Option<Cow<'_, str>>> = self
            .nodes
            .iter()
            .map(|n| constraint::lookup(n, attr))
            .collect();
        let sorted: BTreeSet<&str> = values.iter().map(|v| v.as_deref().unwrap_or("")).collect();
        let ids: HashMap<&str, u32> = sorted
            .into_iter()
            .enumerate()
            .map(|(i, v)| (v, idx(i)))
            .collect();
        let v: Rc<Vec<u32>> = Rc::new(
            values
                .iter()
                .map(|v| ids[v.as_deref().unwrap_or("")])
                .collect(),
        );
        self.spread_cache.insert(attr.clone(), v.clone());
        v
    }

    /// Strategy score: smaller is better.
    fn key(&self, strategy: Strategy, service: u32, node: u32) -> Score {
        let n = node as usize;
        match strategy {
            Strategy::Spread => (self.same(service, node), self.total[n], 0, node),
            Strategy::Binpack => {
                let (cpu, mem) = self.cap[n];
                let frac = |used: u64, cap: Option<u64>| match cap {
                    Some(c) if c > 0 => used.saturating_mul(1_000_000) / c,
                    _ => 0,
                };
                let load = frac(self.used[n].memory, mem) + frac(self.used[n].millicpus, cpu);
                let load = u32::try_from(load).unwrap_or(u32::MAX);
                (u32::MAX - load, u32::MAX - self.total[n], 0, node)
            }
        }
    }
}

type Score = (u32, u32, u32, u32);

fn idx(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

fn service_id(key: &InstanceKey) -> ServiceId<'_> {
    (&key.namespace, &key.stack, &key.service)
}

/// Static (per group) reasons a node is rejected; `None` = feasible.
struct Group<'a> {
    service: &'a Service,
    id: u32,
    reservation: Reservation,
    max_per_node: Option<u32>,
    strategy: Strategy,
    constraints: Vec<(Constraint, Rc<Vec<bool>>)>,
    bad_constraints: Vec<String>,
    affinity: Vec<(String, Option<u32>)>,
    anti_affinity: Vec<(String, Option<u32>)>,
    /// Per `spread:` preference, each node's value id.
    spread: Vec<Rc<Vec<u32>>>,
}

impl<'a> Group<'a> {
    fn new(st: &mut State<'a>, key: &'a InstanceKey, service: &'a Service) -> Self {
        let placement = &service.deploy.placement;
        let mut constraints = Vec::new();
        let mut bad_constraints = Vec::new();
        for expr in &placement.constraints {
            match Constraint::parse(expr) {
                Ok(c) => {
                    let v = st.constraint(&c);
                    constraints.push((c, v));
                }
                // The loader refuses these; a record written by an older
                // berth can still carry one, and it must not match anything.
                Err(e) => bad_constraints.push(format!("invalid constraint {expr:?}: {e}")),
            }
        }
        let mut max_per_node = placement.max_replicas_per_node;
        if service.deploy.mode == DeployMode::Global {
            max_per_node = Some(max_per_node.map_or(1, |m| m.min(1)));
        }
        let others = |names: &[String]| {
            names
                .iter()
                .map(|n| {
                    let sid = st
                        .services
                        .get(&(key.namespace.as_str(), key.stack.as_str(), n.as_str()))
                        .copied();
                    (n.clone(), sid)
                })
                .collect::<Vec<_>>()
        };
        let affinity = others(&service.berth.placement.affinity);
        let anti_affinity = others(&service.berth.placement.anti_affinity);
        Self {
            service,
            id: st.service(service_id(key)),
            reservation: Reservation::of(service),
            max_per_node,
            strategy: service.berth.placement.strategy,
            constraints,
            bad_constraints,
            affinity,
            anti_affinity,
            spread: placement
                .preferences
                .iter()
                .filter_map(|p| berth_spec::constraint::parse_spread(p).ok())
                .map(|a| st.spread_values(&a))
                .collect(),
        }
    }

    /// [`Group::static_reason`] is `None`, without building the reason.
    fn feasible(&self, st: &State<'_>, node: u32) -> bool {
        let n = node as usize;
        !st.nodes[n].draining
            && self.bad_constraints.is_empty()
            && self.constraints.iter().all(|(_, ok)| ok[n])
            && self
                .affinity
                .iter()
                .all(|(_, sid)| sid.is_some_and(|s| st.same(s, node) > 0))
            && self
                .anti_affinity
                .iter()
                .all(|(_, sid)| sid.is_none_or(|s| st.same(s, node) == 0))
    }

    /// Why this group can never use `node` (during this plan), if so.
    fn static_reason(&self, st: &State<'_>, node: u32) -> Option<String> {
        let n = node as usize;
        if st.nodes[n].draining {
            return Some("draining".to_owned());
        }
        if let Some(bad) = self.bad_constraints.first() {
            return Some(bad.clone());
        }
        for (c, ok) in &self.constraints {
            if !ok[n] {
                return Some(format!("constraint {c}"));
            }
        }
        for (name, sid) in &self.affinity {
            if sid.is_none_or(|s| st.same(s, node) == 0) {
                return Some(format!("affinity: no {name} instance"));
            }
        }
        for (name, sid) in &self.anti_affinity {
            if sid.is_some_and(|s| st.same(s, node) > 0) {
                return Some(format!("anti-affinity: runs {name}"));
            }
        }
        None
    }

    /// Why `node` cannot take one more instance now, if it cannot.
    fn reason(&self, st: &State<'_>, node: u32) -> Option<String> {
        if let Some(r) = self.static_reason(st, node) {
            return Some(r);
        }
        if let Some(max) = self.max_per_node
            && st.same(self.id, node) >= max
        {
            return Some(if self.service.deploy.mode == DeployMode::Global {
                "already runs its global instance".to_owned()
            } else {
                format!("max_replicas_per_node {max} reached")
            });
        }
        st.misfit(node, self.reservation).map(str::to_owned)
    }

    fn usable(&self, st: &State<'_>, node: u32) -> bool {
        self.max_per_node
            .is_none_or(|max| st.same(self.id, node) < max)
            && st.misfit(node, self.reservation).is_none()
    }

    fn explain(&self, st: &State<'_>) -> String {
        let mut reasons: BTreeMap<String, u32> = BTreeMap::new();
        for n in 0..st.nodes.len() {
            if let Some(r) = self.reason(st, idx(n)) {
                *reasons.entry(r).or_default() += 1;
            }
        }
        explain(&reasons)
    }
}

/// The ranking structure: one level per spread preference, heaps at leaves.
enum Level {
    Leaf(BinaryHeap<Reverse<Score>>),
    Branch {
        children: Vec<Level>,
        /// (instances of the service under the child, child index), open
        /// children only.
        order: BTreeSet<(u32, usize)>,
    },
}

impl Level {
    fn build(group: &Group<'_>, st: &State<'_>, nodes: Vec<u32>, depth: usize) -> (Self, u32) {
        let Some(values) = group.spread.get(depth) else {
            let count = nodes.iter().map(|&n| st.same(group.id, n)).sum();
            let heap = nodes
                .into_iter()
                .map(|n| Reverse(st.key(group.strategy, group.id, n)))
                .collect();
            return (Self::Leaf(heap), count);
        };
        let mut by_value: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for n in nodes {
            by_value.entry(values[n as usize]).or_default().push(n);
        }
        let mut children = Vec::with_capacity(by_value.len());
        let mut order = BTreeSet::new();
        let mut total = 0;
        for (i, (_, nodes)) in by_value.into_iter().enumerate() {
            let (child, count) = Self::build(group, st, nodes, depth + 1);
            children.push(child);
            order.insert((count, i));
            total += count;
        }
        (Self::Branch { children, order }, total)
    }

    /// Place one instance: the chosen node, already accounted in `st`.
    fn pick(&mut self, group: &Group<'_>, st: &mut State<'_>) -> Option<u32> {
        match self {
            Self::Leaf(heap) => {
                while let Some(Reverse(score)) = heap.pop() {
                    let node = score.3;
                    if !group.usable(st, node) {
                        continue;
                    }
                    st.add(group.id, node, group.reservation);
                    heap.push(Reverse(st.key(group.strategy, group.id, node)));
                    return Some(node);
                }
                None
            }
            Self::Branch { children, order } => {
                while let Some((count, i)) = order.pop_first() {
                    if let Some(node) = children[i].pick(group, st) {
                        order.insert((count + 1, i));
                        return Some(node);
                    }
                }
                None
            }
        }
    }
}

/// Place every ask. Earlier placements in the same plan count for spread,
/// resources, `max_replicas_per_node` and affinity.
pub fn place(snapshot: &Snapshot<'_>, asks: &[Ask<'_>]) -> Plan {
    let mut st = State::new(snapshot);
    // Group asks by service, keeping first-seen order; services with an
    // affinity go last so the services they follow are placed first.
    let mut groups: Vec<(ServiceId<'_>, Vec<&Ask<'_>>)> = Vec::new();
    let mut at: HashMap<ServiceId<'_>, usize> = HashMap::new();
    for ask in asks {
        let id = service_id(ask.key);
        let i = *at.entry(id).or_insert_with(|| {
            groups.push((id, Vec::new()));
            groups.len() - 1
        });
        groups[i].1.push(ask);
    }
    groups.sort_by_key(|(_, a)| !a[0].service.berth.placement.affinity.is_empty());

    let mut plan = Plan::default();
    for (_, asks) in groups {
        let first = asks[0];
        let group = Group::new(&mut st, first.key, first.service);
        let feasible: Vec<u32> = (0..st.nodes.len())
            .map(idx)
            .filter(|&n| group.feasible(&st, n))
            .collect();
        let (mut tree, _) = Level::build(&group, &st, feasible, 0);
        let mut exhausted: Option<String> = None;
        for ask in asks {
            if exhausted.is_none() {
                if let Some(node) = tree.pick(&group, &mut st) {
                    let id = st.nodes[node as usize].id.clone();
                    plan.placements.push((ask.key.clone(), id));
                    continue;
                }
                // Nothing placed after this changes what the group sees.
                exhausted = Some(group.explain(&st));
            }
            let reason = exhausted.clone().unwrap_or_default();
            plan.unplaced.push((ask.key.clone(), reason));
        }
    }
    plan
}

/// The nodes a `global` service runs on: those that pass its constraints,
/// affinities and reservation with nothing of it placed yet. Sorted by id.
pub fn eligible_nodes(
    snapshot: &Snapshot<'_>,
    key: &InstanceKey,
    service: &Service,
) -> Vec<String> {
    let mut st = State::new(snapshot);
    let group = Group::new(&mut st, key, service);
    (0..st.nodes.len())
        .map(idx)
        .filter(|&n| {
            group.feasible(&st, n)
                && (st.same(group.id, n) > 0 || st.misfit(n, group.reservation).is_none())
        })
        .map(|n| st.nodes[n as usize].id.clone())
        .collect()
}

fn explain(rejections: &BTreeMap<String, u32>) -> String {
    if rejections.is_empty() {
        return "no nodes are up".to_owned();
    }
    let mut v: Vec<(&String, &u32)> = rejections.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    v.iter()
        .map(|(reason, n)| format!("{n} node{}: {reason}", if **n == 1 { "" } else { "s" }))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests;
