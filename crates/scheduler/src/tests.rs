//! Unit and property tests of [`place`].

use super::*;
use berth_spec::types::Service;
use proptest::prelude::{ProptestConfig, any, prop_assert, prop_assert_eq, proptest};
use proptest::strategy::Strategy as _;

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

fn with_capacity(mut n: Node, cpus: u32, mem: u64) -> Node {
    n.facts.insert("cpus".into(), cpus.into());
    n.facts.insert("memory_total".into(), mem.into());
    n
}

fn key(service: &str, slot: u32) -> InstanceKey {
    InstanceKey::new("default", "s", service, slot)
}

fn svc(name: &str, f: impl FnOnce(&mut Service)) -> Service {
    let mut s = Service::new(name);
    f(&mut s);
    s
}

fn run(nodes: &[Node], services: &[(&Service, u32)]) -> Plan {
    let keys: Vec<(InstanceKey, &Service)> = services
        .iter()
        .flat_map(|(s, n)| (1..=*n).map(move |i| (key(&s.name, i), *s)))
        .collect();
    let asks: Vec<Ask<'_>> = keys
        .iter()
        .map(|(k, s)| Ask { key: k, service: s })
        .collect();
    let snap = Snapshot {
        nodes: nodes.iter().collect(),
        placed: vec![],
    };
    place(&snap, &asks)
}

fn counts(plan: &Plan, service: &str) -> BTreeMap<String, u32> {
    let mut c = BTreeMap::new();
    for (k, n) in &plan.placements {
        if k.service == service {
            *c.entry(n.clone()).or_default() += 1;
        }
    }
    c
}

#[test]
fn spreads_replicas_over_nodes() {
    let nodes = [node("a", &[]), node("b", &[]), node("c", &[])];
    let web = svc("web", |_| {});
    let plan = run(&nodes, &[(&web, 6)]);
    assert_eq!(
        counts(&plan, "web").values().copied().collect::<Vec<_>>(),
        vec![2, 2, 2]
    );
    assert!(plan.unplaced.is_empty());
}

#[test]
fn constraints_and_reasons_per_node_class() {
    let nodes = [
        node("a", &[("zone", "east")]),
        node("b", &[("zone", "west")]),
        node("c", &[]),
    ];
    let db = svc("db", |s| {
        s.deploy.placement.constraints = vec!["node.labels.zone==east".into()];
        s.deploy.placement.max_replicas_per_node = Some(1);
    });
    let plan = run(&nodes, &[(&db, 2)]);
    assert_eq!(plan.placements, vec![(key("db", 1), "a".to_owned())]);
    assert_eq!(
        plan.unplaced,
        vec![(
            key("db", 2),
            "2 nodes: constraint node.labels.zone == east; 1 node: max_replicas_per_node 1 reached"
                .to_owned()
        )]
    );
}

#[test]
fn draining_nodes_get_nothing_and_no_nodes_is_said() {
    let mut a = node("a", &[]);
    a.draining = true;
    let web = svc("web", |_| {});
    let plan = run(&[a], &[(&web, 1)]);
    assert_eq!(plan.unplaced[0].1, "1 node: draining");
    let plan = run(&[], &[(&web, 1)]);
    assert_eq!(plan.unplaced[0].1, "no nodes are up");
}

#[test]
fn facts_compare_numerically_and_by_regex() {
    let mut idle = node("idle", &[]);
    idle.facts.insert("load_10m".into(), serde_json::json!(0.1));
    idle.facts
        .insert("kernel".into(), serde_json::json!("6.1.0"));
    let mut busy = node("busy", &[]);
    busy.facts
        .insert("load_10m".into(), serde_json::json!("3.5"));
    busy.facts
        .insert("kernel".into(), serde_json::json!("6.5.0"));
    let mut old = node("old", &[]);
    old.facts.insert("load_10m".into(), serde_json::json!(0.0));
    old.facts
        .insert("kernel".into(), serde_json::json!("5.10.0"));
    let batch = svc("batch", |s| {
        s.deploy.placement.constraints = vec![
            "node.facts.load_10m < 0.25".into(),
            r"node.facts.kernel ~= ^6\.".into(),
        ];
    });
    let plan = run(&[idle, busy, old], &[(&batch, 3)]);
    assert_eq!(counts(&plan, "batch"), [("idle".to_owned(), 3)].into());
}

#[test]
fn reservations_limit_what_fits() {
    const G: u64 = 1 << 30;
    let nodes = [
        with_capacity(node("a", &[]), 2, 4 * G),
        with_capacity(node("b", &[]), 8, G),
    ];
    let big = svc("big", |s| {
        s.deploy.resources.reservations.memory_bytes = Some(2 * G);
        s.deploy.resources.reservations.cpus = Some(0.5);
    });
    let plan = run(&nodes, &[(&big, 3)]);
    assert_eq!(counts(&plan, "big"), [("a".to_owned(), 2)].into());
    assert_eq!(
        plan.unplaced[0].1, "2 nodes: insufficient memory",
        "a is full, b is too small"
    );
    let cpu = svc("cpu", |s| s.deploy.resources.reservations.cpus = Some(3.0));
    let plan = run(&nodes, &[(&cpu, 3)]);
    assert_eq!(counts(&plan, "cpu"), [("b".to_owned(), 2)].into());
    assert_eq!(plan.unplaced[0].1, "2 nodes: insufficient cpu");
}

#[test]
fn spread_preference_balances_zones_before_nodes() {
    // East has three nodes, west one: plain spread would put 3 of 4 in east.
    let nodes = [
        node("e1", &[("zone", "east")]),
        node("e2", &[("zone", "east")]),
        node("e3", &[("zone", "east")]),
        node("w1", &[("zone", "west")]),
    ];
    let web = svc("web", |s| {
        s.deploy.placement.preferences = vec!["node.labels.zone".into()];
    });
    let plan = run(&nodes, &[(&web, 4)]);
    let c = counts(&plan, "web");
    assert_eq!(c["w1"], 2);
    assert_eq!(c.values().sum::<u32>(), 4);
}

#[test]
fn binpack_fills_one_node_first() {
    const G: u64 = 1 << 30;
    let nodes = [
        with_capacity(node("a", &[]), 4, 4 * G),
        with_capacity(node("b", &[]), 4, 4 * G),
    ];
    let w = svc("w", |s| {
        s.berth.placement.strategy = berth_spec::types::Strategy::Binpack;
        s.deploy.resources.reservations.memory_bytes = Some(G);
    });
    let plan = run(&nodes, &[(&w, 5)]);
    assert_eq!(
        counts(&plan, "w"),
        [("a".to_owned(), 4), ("b".to_owned(), 1)].into()
    );
}

#[test]
fn global_runs_one_per_eligible_node() {
    let nodes = [
        node("a", &[("gpu", "yes")]),
        node("b", &[("gpu", "yes")]),
        node("c", &[]),
    ];
    let agent = svc("agent", |s| {
        s.deploy.mode = DeployMode::Global;
        s.deploy.placement.constraints = vec!["node.labels.gpu == yes".into()];
    });
    let snap = Snapshot {
        nodes: nodes.iter().collect(),
        placed: vec![],
    };
    assert_eq!(eligible_nodes(&snap, &key("agent", 1), &agent), ["a", "b"]);
    let plan = run(&nodes, &[(&agent, 3)]);
    assert_eq!(
        counts(&plan, "agent"),
        [("a".to_owned(), 1), ("b".to_owned(), 1)].into()
    );
    assert_eq!(
        plan.unplaced[0].1,
        "2 nodes: already runs its global instance; 1 node: constraint node.labels.gpu == yes"
    );
}

#[test]
fn affinity_follows_and_anti_affinity_avoids() {
    let nodes = [node("a", &[]), node("b", &[]), node("c", &[])];
    let cache = svc("cache", |_| {});
    let web = svc("web", |s| s.berth.placement.affinity = vec!["cache".into()]);
    let db = svc("db", |s| {
        s.berth.placement.anti_affinity = vec!["cache".into()];
    });
    // web is asked first but must wait for cache's placement.
    let plan = run(&nodes, &[(&web, 2), (&cache, 1), (&db, 2)]);
    let at = counts(&plan, "cache");
    let cache_node = at.keys().next().unwrap().clone();
    assert_eq!(counts(&plan, "web"), [(cache_node.clone(), 2)].into());
    let db_nodes = counts(&plan, "db");
    assert_eq!(db_nodes.len(), 2);
    assert!(!db_nodes.contains_key(&cache_node));
    let lonely = svc("lonely", |s| {
        s.berth.placement.affinity = vec!["nope".into()]
    });
    let plan = run(&nodes, &[(&lonely, 1)]);
    assert_eq!(plan.unplaced[0].1, "3 nodes: affinity: no nope instance");
}

#[test]
fn existing_placements_count() {
    let nodes = [node("a", &[]), node("b", &[])];
    let web = svc("web", |_| {});
    let (k1, k2, k3) = (key("web", 1), key("web", 2), key("web", 3));
    let snap = Snapshot {
        nodes: nodes.iter().collect(),
        placed: vec![
            Placed {
                key: &k1,
                node: "a",
                reservation: Reservation::default(),
            },
            Placed {
                key: &k2,
                node: "gone",
                reservation: Reservation::default(),
            },
        ],
    };
    let plan = place(
        &snap,
        &[Ask {
            key: &k3,
            service: &web,
        }],
    );
    assert_eq!(plan.placements, vec![(k3, "b".to_owned())]);
}

// ---- properties ----

const LABELS: [&str; 3] = ["east", "west", "north"];

#[derive(Debug, Clone)]
struct NodeGen {
    zone: Option<usize>,
    draining: bool,
    cpus: Option<u32>,
    mem_gb: Option<u64>,
    load: u8,
}

#[derive(Debug, Clone)]
struct SvcGen {
    zone: Option<(usize, bool)>,
    max_per_node: Option<u32>,
    cpus_tenths: u8,
    mem_gb: u8,
    binpack: bool,
    spread: bool,
    global: bool,
    load_below: Option<u8>,
    replicas: u32,
}

fn node_gen() -> impl proptest::strategy::Strategy<Value = NodeGen> {
    (
        proptest::option::of(0..3usize),
        proptest::bool::weighted(0.1),
        proptest::option::of(1..16u32),
        proptest::option::of(1..32u64),
        0..10u8,
    )
        .prop_map(|(zone, draining, cpus, mem_gb, load)| NodeGen {
            zone,
            draining,
            cpus,
            mem_gb,
            load,
        })
}

fn svc_gen() -> impl proptest::strategy::Strategy<Value = SvcGen> {
    (
        proptest::option::of((0..3usize, any::<bool>())),
        proptest::option::of(1..4u32),
        0..30u8,
        0..6u8,
        any::<bool>(),
        any::<bool>(),
        proptest::bool::weighted(0.2),
        proptest::option::of(0..10u8),
        0..40u32,
    )
        .prop_map(
            |(
                zone,
                max_per_node,
                cpus_tenths,
                mem_gb,
                binpack,
                spread,
                global,
                load_below,
                replicas,
            )| {
                SvcGen {
                    zone,
                    max_per_node,
                    cpus_tenths,
                    mem_gb,
                    binpack,
                    spread,
                    global,
                    load_below,
                    replicas,
                }
            },
        )
}

fn build(nodes: &[NodeGen], svcs: &[SvcGen]) -> (Vec<Node>, Vec<Service>) {
    const G: u64 = 1 << 30;
    let nodes = nodes
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let mut n = node(&format!("n{i:03}"), &[]);
            if let Some(z) = g.zone {
                n.labels.insert("zone".into(), LABELS[z].into());
            }
            n.draining = g.draining;
            if let Some(c) = g.cpus {
                n.facts.insert("cpus".into(), c.into());
            }
            if let Some(m) = g.mem_gb {
                n.facts.insert("memory_total".into(), (m * G).into());
            }
            n.facts.insert(
                "load_10m".into(),
                format!("{}", f64::from(g.load) / 10.0).into(),
            );
            n
        })
        .collect();
    let svcs = svcs
        .iter()
        .enumerate()
        .map(|(i, g)| {
            svc(&format!("s{i}"), |s| {
                let p = &mut s.deploy.placement;
                if let Some((z, eq)) = g.zone {
                    let op = if eq { "==" } else { "!=" };
                    p.constraints
                        .push(format!("node.labels.zone {op} {}", LABELS[z]));
                }
                if let Some(l) = g.load_below {
                    p.constraints
                        .push(format!("node.facts.load_10m < {}", f64::from(l) / 10.0));
                }
                p.max_replicas_per_node = g.max_per_node;
                if g.spread {
                    p.preferences.push("node.labels.zone".into());
                }
                let r = &mut s.deploy.resources.reservations;
                r.cpus = (g.cpus_tenths > 0).then(|| f64::from(g.cpus_tenths) / 10.0);
                r.memory_bytes = (g.mem_gb > 0).then(|| u64::from(g.mem_gb) * G);
                if g.binpack {
                    s.berth.placement.strategy = berth_spec::types::Strategy::Binpack;
                }
                if g.global {
                    s.deploy.mode = DeployMode::Global;
                }
            })
        })
        .collect();
    (nodes, svcs)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn placements_respect_every_rule(
        ng in proptest::collection::vec(node_gen(), 0..25),
        sg in proptest::collection::vec(svc_gen(), 1..6),
    ) {
        let (nodes, svcs) = build(&ng, &sg);
        let asks: Vec<(InstanceKey, &Service)> = svcs
            .iter()
            .zip(&sg)
            .flat_map(|(s, g)| (1..=g.replicas).map(move |i| (key(&s.name, i), s)))
            .collect();
        let ask_refs: Vec<Ask<'_>> = asks.iter().map(|(k, s)| Ask { key: k, service: s }).collect();
        let snap = Snapshot { nodes: nodes.iter().collect(), placed: vec![] };
        let plan = place(&snap, &ask_refs);
        // Deterministic.
        prop_assert_eq!(&plan, &place(&snap, &ask_refs));
        // Every ask answered exactly once.
        prop_assert_eq!(plan.placements.len() + plan.unplaced.len(), asks.len());
        let by_id: BTreeMap<&str, &Node> = nodes.iter().map(|n| (n.id.as_str(), n)).collect();
        let by_name: BTreeMap<&str, &Service> = svcs.iter().map(|s| (s.name.as_str(), s)).collect();
        let mut per: BTreeMap<(&str, &str), u32> = BTreeMap::new();
        let mut used: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for (k, n) in &plan.placements {
            let node = by_id[n.as_str()];
            let s = by_name[k.service.as_str()];
            prop_assert!(!node.draining);
            for c in &s.deploy.placement.constraints {
                let c = Constraint::parse(c).unwrap();
                prop_assert!(constraint::holds(&c, node), "{} on {}", c, n);
            }
            let e = per.entry((&k.service, n)).or_default();
            *e += 1;
            if let Some(m) = s.deploy.placement.max_replicas_per_node {
                prop_assert!(*e <= m);
            }
            if s.deploy.mode == DeployMode::Global {
                prop_assert!(*e <= 1);
            }
            let r = Reservation::of(s);
            let u = used.entry(n).or_default();
            u.0 += r.millicpus;
            u.1 += r.memory;
        }
        for (n, (cpu, mem)) in used {
            let node = by_id[n];
            if let Some(c) = constraint::fact_number(node, "cpus") {
                prop_assert!(cpu as f64 <= c * 1000.0);
            }
            if let Some(m) = constraint::fact_number(node, "memory_total") {
                prop_assert!(mem as f64 <= m);
            }
        }
        // A reason accounts for every node, one class each.
        for (_, reason) in &plan.unplaced {
            if nodes.is_empty() {
                prop_assert_eq!(reason.as_str(), "no nodes are up");
                continue;
            }
            let total: usize = reason
                .split("; ")
                .map(|part| part.split(' ').next().unwrap().parse::<usize>().unwrap())
                .sum();
            prop_assert_eq!(total, nodes.len(), "{}", reason);
        }
    }

    #[test]
    fn global_places_exactly_one_per_eligible_node(
        ng in proptest::collection::vec(node_gen(), 0..30),
        g in svc_gen(),
    ) {
        let (nodes, svcs) = build(&ng, &[SvcGen { global: true, ..g }]);
        let s = &svcs[0];
        let snap = Snapshot { nodes: nodes.iter().collect(), placed: vec![] };
        let eligible = eligible_nodes(&snap, &key(&s.name, 1), s);
        let keys: Vec<InstanceKey> = (1..=u32::try_from(eligible.len()).unwrap()).map(|i| key(&s.name, i)).collect();
        let asks: Vec<Ask<'_>> = keys.iter().map(|k| Ask { key: k, service: s }).collect();
        let plan = place(&snap, &asks);
        prop_assert!(plan.unplaced.is_empty());
        let mut got: Vec<String> = plan.placements.iter().map(|(_, n)| n.clone()).collect();
        got.sort();
        prop_assert_eq!(got, eligible);
    }
}
