//! `berth nodes`: the cluster's nodes as a table, JSON, or an Ansible
//! inventory grouped by label.

use std::collections::BTreeMap;

use berth_model::api::{NodeInfo, NodeState};
use clap::{Args, ValueEnum};

use crate::exit;
use crate::output::{Table, print_json, print_out};
use crate::settings::Settings;

/// Output formats of `berth nodes` besides the table and `--json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NodesFormat {
    /// The aligned table (default).
    Table,
    /// JSON (same as --json).
    Json,
    /// An Ansible INI inventory: every node in `berth_nodes` with
    /// `ansible_host`, and one group per label (`[zone_east]`) and state.
    Ansible,
}

/// `berth nodes`.
#[derive(Debug, Args)]
pub struct NodesArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: NodesFormat,
}

/// List the nodes.
pub async fn run(settings: &Settings, args: &NodesArgs) -> anyhow::Result<u8> {
    let nodes: Vec<NodeInfo> = settings.client().get("/v1/nodes").await?;
    match (settings.json, args.format) {
        (true, _) | (_, NodesFormat::Json) => print_json(&nodes)?,
        (_, NodesFormat::Ansible) => print_out(&ansible(&nodes))?,
        (_, NodesFormat::Table) if nodes.is_empty() => eprintln!("no nodes"),
        (_, NodesFormat::Table) => print_out(&table(&nodes))?,
    }
    Ok(exit::OK)
}

fn gib(bytes: Option<u64>) -> String {
    bytes.map_or(String::new(), |b| {
        format!("{:.1}G", b as f64 / (1u64 << 30) as f64)
    })
}

fn table(nodes: &[NodeInfo]) -> String {
    let mut t = Table::new(&[
        "NODE",
        "STATE",
        "ADDRESS",
        "INSTANCES",
        "CPUS",
        "MEM FREE",
        "LOAD 1/5/15",
        "LABELS",
    ]);
    for n in nodes {
        let f = &n.node.facts;
        let num = |k: &str| f.get(k).and_then(serde_json::Value::as_f64);
        let load = match (num("load_1m"), num("load_5m"), num("load_15m")) {
            (Some(a), Some(b), Some(c)) => format!("{a:.2} {b:.2} {c:.2}"),
            _ => String::new(),
        };
        let mem = match (
            f.get("memory_free").and_then(serde_json::Value::as_u64),
            f.get("memory_total").and_then(serde_json::Value::as_u64),
        ) {
            (Some(free), Some(total)) => format!("{}/{}", gib(Some(free)), gib(Some(total))),
            _ => String::new(),
        };
        let labels: Vec<String> = n
            .node
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        t.row(vec![
            n.node.id.clone(),
            n.state.to_string(),
            n.node.address.clone(),
            n.instances.to_string(),
            f.get("cpus").map(ToString::to_string).unwrap_or_default(),
            mem,
            load,
            labels.join(","),
        ]);
    }
    t.render()
}

/// An Ansible group name: letters, digits and `_`, not starting with a digit.
fn group_name(parts: &[&str]) -> String {
    let mut g: String = parts
        .join("_")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if g.starts_with(|c: char| c.is_ascii_digit()) {
        g.insert(0, '_');
    }
    g
}

/// The inventory: `[berth_nodes]` with every node's `ansible_host` and
/// berth's view as host variables, then `[berth_up]`/`[berth_down]`/…
/// and one group per label value.
pub fn ansible(nodes: &[NodeInfo]) -> String {
    let mut out = String::from("# berth nodes --format ansible\n[berth_nodes]\n");
    let mut groups: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for n in nodes {
        let mut line = n.node.id.clone();
        if !n.node.address.is_empty() {
            line.push_str(&format!(" ansible_host={}", n.node.address));
        }
        line.push_str(&format!(" berth_state={}", n.state));
        for key in ["arch", "os"] {
            if let Some(v) = n.node.facts.get(key).and_then(serde_json::Value::as_str) {
                line.push_str(&format!(" berth_{key}={v}"));
            }
        }
        out.push_str(&line);
        out.push('\n');
        let state = match n.state {
            NodeState::Up => "up",
            NodeState::Draining => "draining",
            NodeState::Down => "down",
        };
        groups
            .entry(group_name(&["berth", state]))
            .or_default()
            .push(&n.node.id);
        for (k, v) in &n.node.labels {
            groups
                .entry(group_name(&[k, v]))
                .or_default()
                .push(&n.node.id);
        }
    }
    for (g, hosts) in groups {
        out.push_str(&format!("\n[{g}]\n"));
        for h in hosts {
            out.push_str(h);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_model::Node;

    fn info(id: &str, labels: &[(&str, &str)], state: NodeState) -> NodeInfo {
        NodeInfo {
            node: Node {
                id: id.into(),
                address: "10.0.0.7".into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                facts: [("arch".to_owned(), "x86_64".into())].into_iter().collect(),
                draining: false,
                updated_at: 0,
            },
            state,
            instances: 0,
            joined: true,
        }
    }

    #[test]
    fn inventory_groups_by_label_and_state() {
        let inv = ansible(&[
            info("a", &[("zone", "east")], NodeState::Up),
            info("b", &[("zone", "east"), ("disk", "ssd")], NodeState::Down),
            info("c", &[("zone", "us-west.2")], NodeState::Up),
        ]);
        assert!(
            inv.contains(
                "[berth_nodes]\na ansible_host=10.0.0.7 berth_state=up berth_arch=x86_64\n"
            ),
            "{inv}"
        );
        assert!(inv.contains("\n[zone_east]\na\nb\n"), "{inv}");
        assert!(inv.contains("\n[zone_us_west_2]\nc\n"), "{inv}");
        assert!(inv.contains("\n[disk_ssd]\nb\n"), "{inv}");
        assert!(inv.contains("\n[berth_down]\nb\n"), "{inv}");
        assert!(inv.contains("\n[berth_up]\na\nc\n"), "{inv}");
    }
}
