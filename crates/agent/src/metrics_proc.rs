//! CPU time and resident memory of process trees, read from `/proc`.
//!
//! An instance is its main process and everything it forked (a shell
//! running a pipeline, a server with workers), so its usage is summed over
//! the tree rooted at the pid its status reports. One pass over `/proc`
//! builds the parent map for every instance at once; the cost is one small
//! read per process on the machine, once per sample.
//!
//! Here, in the agent, because every node samples its own instances: the
//! server's local agent for the server's metrics, and a joined agent for
//! the stats it ships to the servers ([`crate::remote_stats`]).

use std::collections::{HashMap, HashSet};
use std::fs;

use berth_model::api::Usage;
use berth_model::{InstanceKey, InstanceState, InstanceStatus};

use crate::driver::docker::StatsMap;

/// Clock ticks per second of `/proc/<pid>/stat` times. Linux reports them
/// in `USER_HZ`, which is 100 on every architecture it exports to user
/// space (the kernel converts from its internal `HZ`).
const TICKS_PER_SECOND: f64 = 100.0;

/// The usage of one process tree.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TreeUsage {
    /// User + system CPU seconds of the live processes of the tree, plus
    /// that of children they already reaped.
    pub cpu_seconds: f64,
    /// Resident set size summed over the tree, in bytes (shared pages are
    /// counted once per process, as `ps` does).
    pub rss_bytes: u64,
    /// Processes in the tree.
    pub processes: u32,
}

struct Stat {
    ppid: u32,
    cpu_ticks: u64,
}

/// `(ppid, utime+stime+cutime+cstime)` from `/proc/<pid>/stat`. The command
/// name (field 2) may hold spaces and parentheses, so fields are counted
/// after its last `)`.
fn read_stat(pid: u32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    let ppid = fields.get(1)?.parse().ok()?;
    let mut ticks = 0u64;
    for i in 11..=14 {
        ticks += fields.get(i)?.parse::<i64>().ok()?.max(0) as u64;
    }
    Some(Stat {
        ppid,
        cpu_ticks: ticks,
    })
}

/// `VmRSS` of `/proc/<pid>/status`, in bytes (0 for kernel threads and
/// zombies, which have none).
fn read_rss(pid: u32) -> u64 {
    let Ok(text) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The usage of the process trees rooted at `roots`. Roots that do not
/// exist (the instance just exited) are absent from the result.
pub fn sample_trees(roots: &[u32]) -> HashMap<u32, TreeUsage> {
    let mut out = HashMap::new();
    if roots.is_empty() {
        return out;
    }
    let mut stats: HashMap<u32, Stat> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(s) = read_stat(pid) {
                stats.insert(pid, s);
            }
        }
    }
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (&pid, s) in &stats {
        children.entry(s.ppid).or_default().push(pid);
    }
    for &root in roots {
        if !stats.contains_key(&root) {
            continue;
        }
        let mut usage = TreeUsage::default();
        let mut seen = HashSet::new();
        let mut todo = vec![root];
        while let Some(pid) = todo.pop() {
            if !seen.insert(pid) {
                continue;
            }
            if let Some(s) = stats.get(&pid) {
                usage.cpu_seconds += s.cpu_ticks as f64 / TICKS_PER_SECOND;
                usage.rss_bytes += read_rss(pid);
                usage.processes += 1;
            }
            if let Some(c) = children.get(&pid) {
                todo.extend(c);
            }
        }
        out.insert(root, usage);
    }
    out
}

/// CPU and memory of the running instances among `statuses`: containers
/// from the Docker driver's latest samples, processes from `/proc` (one
/// pass for all of them). Blocking file I/O: call it off the async threads.
pub fn instance_usage<'a>(
    statuses: impl IntoIterator<Item = &'a InstanceStatus>,
    containers: &StatsMap,
) -> HashMap<InstanceKey, Usage> {
    let mut out = HashMap::new();
    let stats = containers.snapshot();
    let mut pids = Vec::new();
    for s in statuses {
        if !matches!(s.state, InstanceState::Running | InstanceState::Stopping) {
            continue;
        }
        if let Some(c) = stats.get(&s.key) {
            out.insert(
                s.key.clone(),
                Usage::Container {
                    cpu_percent: c.cpu_percent,
                    memory_bytes: c.memory_bytes,
                },
            );
        } else if let Some(pid) = s.pid {
            pids.push((&s.key, pid));
        }
    }
    let roots: Vec<u32> = pids.iter().map(|(_, p)| *p).collect();
    let trees = sample_trees(&roots);
    for (key, pid) in pids {
        if let Some(t) = trees.get(&pid) {
            out.insert(
                key.clone(),
                Usage::Process {
                    cpu_seconds: t.cpu_seconds,
                    rss_bytes: t.rss_bytes,
                },
            );
        }
    }
    out
}

/// This process's own usage (the server, with its in-process agent).
pub fn own_usage() -> TreeUsage {
    let pid = std::process::id();
    read_stat(pid)
        .map(|s| TreeUsage {
            cpu_seconds: s.cpu_ticks as f64 / TICKS_PER_SECOND,
            rss_bytes: read_rss(pid),
            processes: 1,
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_includes_its_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let me = std::process::id();
        let usage = sample_trees(&[me]);
        let u = usage[&me];
        assert!(u.processes >= 2, "{u:?}");
        assert!(u.rss_bytes > 0);
        let alone = sample_trees(&[child.id()]);
        assert_eq!(alone[&child.id()].processes, 1);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(sample_trees(&[child.id()]).is_empty());
        assert!(own_usage().rss_bytes > 0);
    }
}
