//! `berth top`: a live table of a stack's instances (state, CPU, memory,
//! requests/s, restarts), redrawn in place with plain ANSI escapes, read
//! from the server's built-in history (`GET …/history`).
//!
//! Requests per second are the router's rate for the instance's service
//! (the router counts per service, not per instance); `-` for services it
//! does not serve.

use std::collections::HashMap;
use std::time::Duration;

use berth_model::history::{InstanceHistory, StackHistory};
use clap::Args;
use serde::Serialize;

use crate::args::StackArgs;
use crate::exit;
use crate::output::{Table, print_json, print_out};
use crate::resolve::{self, stack_path};
use crate::settings::Settings;

/// `berth top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// Which stack.
    #[command(flatten)]
    pub stack: StackArgs,
    /// Print the table once and exit (no screen clearing).
    #[arg(long)]
    pub once: bool,
    /// Time between refreshes.
    #[arg(long, default_value = "2s", value_parser = crate::args::parse_duration, value_name = "DURATION")]
    pub interval: Duration,
}

/// One row of the table (also the `--json` shape).
#[derive(Debug, Serialize)]
pub struct TopRow {
    /// `web.2`.
    pub instance: String,
    /// The node it runs on.
    pub node: String,
    /// State at the last sample.
    pub state: String,
    /// CPU, percent of one core, over the last sample interval.
    pub cpu_percent: Option<f64>,
    /// Resident memory.
    pub memory_bytes: Option<u64>,
    /// The service's request rate through the router.
    pub requests_per_second: Option<f64>,
    /// Restarts so far.
    pub restarts: u32,
    /// When the sample was taken (ms since the epoch).
    pub sampled_at: u64,
}

/// The rows of the latest sample: instances gone since then are left out.
pub fn rows(h: &StackHistory) -> Vec<TopRow> {
    let latest = h
        .instances
        .iter()
        .filter_map(|i| i.points.last().map(|p| p.t))
        .max()
        .unwrap_or(0);
    let rps: HashMap<&str, f64> = h
        .services
        .iter()
        .filter_map(|s| Some((s.service.as_str(), s.points.last()?.requests_per_second)))
        .collect();
    h.instances
        .iter()
        .filter_map(|i: &InstanceHistory| {
            let p = i.points.last().filter(|p| p.t == latest)?;
            Some(TopRow {
                instance: i.instance.clone(),
                node: i.node.clone(),
                state: p.state.to_string(),
                cpu_percent: p.cpu_percent,
                memory_bytes: p.memory_bytes,
                requests_per_second: rps.get(i.service.as_str()).copied(),
                restarts: p.restarts,
                sampled_at: p.t,
            })
        })
        .collect()
}

/// `12.3M`, `512K`, `1.2G` (binary units, like `top`).
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 || v >= 100.0 {
        format!("{v:.0}{}", UNITS[u])
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

fn render(stack: &str, h: &StackHistory, rows: &[TopRow]) -> String {
    let mut t = Table::new(&[
        "INSTANCE", "NODE", "STATE", "CPU%", "MEM", "REQ/S", "RESTARTS",
    ]);
    let dash = || "-".to_owned();
    for r in rows {
        t.row(vec![
            r.instance.clone(),
            r.node.clone(),
            r.state.clone(),
            r.cpu_percent.map_or_else(dash, |c| format!("{c:.1}")),
            r.memory_bytes.map_or_else(dash, human_bytes),
            r.requests_per_second
                .map_or_else(dash, |q| format!("{q:.1}")),
            r.restarts.to_string(),
        ]);
    }
    let cpu: f64 = rows.iter().filter_map(|r| r.cpu_percent).sum();
    let mem: u64 = rows.iter().filter_map(|r| r.memory_bytes).sum();
    let mut out = format!(
        "{stack}: {} instances, CPU {cpu:.1}%, memory {} (samples every {} s)\n\n",
        rows.len(),
        human_bytes(mem),
        h.interval_ms / 1000
    );
    if rows.is_empty() {
        out.push_str(
            "no samples yet (the first comes within one interval of the server's start)\n",
        );
    } else {
        out.push_str(&t.render());
    }
    out
}

/// Show the table, refreshing until Ctrl-C (or once).
pub async fn run(settings: &Settings, args: &TopArgs) -> anyhow::Result<u8> {
    let client = settings.client();
    let stack = resolve::stack_name(settings, &client, &args.stack).await?;
    let path = format!("{}/history", stack_path(&settings.namespace, &stack));
    loop {
        // Only the newest samples are needed: two intervals back is enough.
        let since = berth_server::now_ms().saturating_sub(60_000);
        let h: StackHistory = client.get(&format!("{path}?since={since}")).await?;
        let rows = rows(&h);
        if args.once {
            if settings.json {
                print_json(&rows)?;
            } else {
                print_out(&render(&stack, &h, &rows))?;
            }
            return Ok(exit::OK);
        }
        // Home, clear screen, then the table: a flicker-free enough redraw
        // without a terminal UI library.
        print_out(&format!("\x1b[H\x1b[2J{}", render(&stack, &h, &rows)))?;
        tokio::select! {
            _ = tokio::time::sleep(args.interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(exit::OK),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_model::InstanceState;
    use berth_model::history::{InstancePoint, ServiceHistory, ServicePoint};

    fn inst(name: &str, service: &str, t: u64) -> InstanceHistory {
        InstanceHistory {
            instance: name.into(),
            service: service.into(),
            slot: 1,
            node: "n".into(),
            points: vec![InstancePoint {
                t,
                state: InstanceState::Running,
                cpu_percent: Some(2.5),
                memory_bytes: Some(3 << 20),
                restarts: 1,
            }],
        }
    }

    #[test]
    fn rows_are_the_latest_sample_with_the_service_rate() {
        let h = StackHistory {
            interval_ms: 10_000,
            retention_ms: 3_600_000,
            instances: vec![
                inst("web.1", "web", 20),
                inst("old.1", "old", 10),
                inst("db.1", "db", 20),
            ],
            services: vec![ServiceHistory {
                service: "web".into(),
                points: vec![ServicePoint {
                    t: 20,
                    requests_per_second: 4.0,
                    errors_per_second: 0.0,
                }],
            }],
        };
        let r = rows(&h);
        let names: Vec<&str> = r.iter().map(|r| r.instance.as_str()).collect();
        assert_eq!(names, ["web.1", "db.1"]);
        assert_eq!(r[0].requests_per_second, Some(4.0));
        assert_eq!(r[1].requests_per_second, None);
        let text = render("shop", &h, &r);
        assert!(
            text.contains("web.1")
                && text.contains("NODE")
                && text.contains("3.0M")
                && text.contains("4.0"),
            "{text}"
        );
    }

    #[test]
    fn bytes_read_like_top() {
        assert_eq!(human_bytes(512), "512B");
        assert_eq!(human_bytes(1536), "1.5K");
        assert_eq!(human_bytes(300 << 20), "300M");
    }
}
