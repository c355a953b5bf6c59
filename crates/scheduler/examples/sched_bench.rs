//! Scheduler throughput: 100,000 instances on 5,000 simulated nodes with
//! constraints (labels, platform, a numeric fact), spread over a zone label,
//! reservations and `max_replicas_per_node`.
//!
//! ```text
//! cargo run --release -p berth-scheduler --example sched_bench [NODES] [SERVICES] [REPLICAS]
//! ```
//!
//! Also runs, in the same process, the previous scheduler's algorithm (every
//! node scanned for every instance, constraints parsed per node) on a slice
//! of the same asks, so the speed-up is measured side by side.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use berth_model::{InstanceKey, Node};
use berth_scheduler::{Ask, Snapshot, place};
use berth_spec::constraint::Constraint;
use berth_spec::types::Service;

const ZONES: usize = 5;

fn nodes(n: usize) -> Vec<Node> {
    (0..n)
        .map(|i| {
            let mut facts = BTreeMap::new();
            let arch = if i % 4 == 3 { "aarch64" } else { "x86_64" };
            facts.insert("arch".to_owned(), arch.into());
            facts.insert("os".to_owned(), "linux".into());
            facts.insert("cpus".to_owned(), 16.into());
            facts.insert("memory_total".to_owned(), (64u64 << 30).into());
            #[allow(clippy::cast_precision_loss)]
            facts.insert(
                "load_15m".to_owned(),
                ((i * 37 % 100) as f64 / 100.0).into(),
            );
            Node {
                id: format!("node-{i:05}"),
                address: format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
                labels: [
                    ("zone".to_owned(), format!("z{}", i % ZONES)),
                    (
                        "tier".to_owned(),
                        if i % 10 == 0 { "db" } else { "app" }.into(),
                    ),
                ]
                .into(),
                facts,
                draining: i % 97 == 0,
                updated_at: 0,
            }
        })
        .collect()
}

fn services(n: usize) -> Vec<Service> {
    (0..n)
        .map(|i| {
            let mut s = Service::new(format!("svc{i:04}"));
            let p = &mut s.deploy.placement;
            p.constraints.push("node.platform.arch == x86_64".into());
            match i % 4 {
                0 => p
                    .constraints
                    .push(format!("node.labels.zone != z{}", i % ZONES)),
                1 => p.constraints.push("node.facts.load_15m < 0.8".into()),
                2 => p.constraints.push("node.labels.tier == app".into()),
                _ => {}
            }
            if i % 2 == 0 {
                p.preferences.push("node.labels.zone".into());
            }
            if i % 3 == 0 {
                p.max_replicas_per_node = Some(2);
            }
            s.deploy.resources.reservations.cpus = Some(0.1);
            s.deploy.resources.reservations.memory_bytes = Some(128 << 20);
            s
        })
        .collect()
}

/// The previous scheduler: O(instances × nodes), constraints re-parsed for
/// every node, spread by (same-service count, node count, id).
fn naive(snapshot: &Snapshot<'_>, asks: &[Ask<'_>]) -> usize {
    let mut per_service: HashMap<(&str, &str), u32> = HashMap::new();
    let mut per_node: HashMap<&str, u32> = HashMap::new();
    let mut placed = 0;
    for ask in asks {
        let sid = ask.key.service.as_str();
        let mut best: Option<(&Node, (u32, u32))> = None;
        for node in &snapshot.nodes {
            let same = per_service
                .get(&(node.id.as_str(), sid))
                .copied()
                .unwrap_or(0);
            if node.draining {
                continue;
            }
            let ok = ask.service.deploy.placement.constraints.iter().all(|e| {
                Constraint::parse(e).is_ok_and(|c| berth_scheduler::constraint::holds(&c, node))
            });
            if !ok
                || ask
                    .service
                    .deploy
                    .placement
                    .max_replicas_per_node
                    .is_some_and(|m| same >= m)
            {
                continue;
            }
            let score = (same, per_node.get(node.id.as_str()).copied().unwrap_or(0));
            if best
                .as_ref()
                .is_none_or(|(b, bs)| score < *bs || (score == *bs && node.id < b.id))
            {
                best = Some((node, score));
            }
        }
        if let Some((node, _)) = best {
            *per_service.entry((node.id.as_str(), sid)).or_default() += 1;
            *per_node.entry(node.id.as_str()).or_default() += 1;
            placed += 1;
        }
    }
    placed
}

fn arg(i: usize, default: usize) -> usize {
    std::env::args()
        .nth(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let (n_nodes, n_services, replicas) = (arg(1, 5_000), arg(2, 1_000), arg(3, 100));
    let nodes = nodes(n_nodes);
    let services = services(n_services);
    let keys: Vec<(InstanceKey, &Service)> = services
        .iter()
        .flat_map(|s| {
            (1..=u32::try_from(replicas).unwrap_or(u32::MAX)).map(move |slot| {
                (
                    InstanceKey::new("default", "bench", s.name.clone(), slot),
                    s,
                )
            })
        })
        .collect();
    let asks: Vec<Ask<'_>> = keys
        .iter()
        .map(|(key, service)| Ask { key, service })
        .collect();
    let snapshot = Snapshot {
        nodes: nodes.iter().collect(),
        placed: vec![],
    };

    let start = Instant::now();
    let plan = place(&snapshot, &asks);
    let took = start.elapsed().as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let rate = asks.len() as f64 / took;
    let mut per_node: HashMap<&str, usize> = HashMap::new();
    for (_, n) in &plan.placements {
        *per_node.entry(n).or_default() += 1;
    }
    println!(
        "berth scheduler: {} instances, {} services, {} nodes: {} placed, {} unplaced in {:.3} s = {:.0} placements/s (max {} per node, {} nodes used)",
        asks.len(),
        n_services,
        n_nodes,
        plan.placements.len(),
        plan.unplaced.len(),
        took,
        rate,
        per_node.values().max().copied().unwrap_or(0),
        per_node.len(),
    );

    // The old algorithm on a slice: it is O(N × nodes), the full run would
    // take minutes.
    let slice = &asks[..asks.len().min(2_000)];
    let start = Instant::now();
    let placed = naive(&snapshot, slice);
    let naive_took = start.elapsed().as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let naive_rate = slice.len() as f64 / naive_took;
    println!(
        "previous O(N x nodes) scheduler: {} instances ({placed} placed) in {naive_took:.3} s = {naive_rate:.0} placements/s",
        slice.len(),
    );
    println!("speed-up: {:.0}x", rate / naive_rate);
}
