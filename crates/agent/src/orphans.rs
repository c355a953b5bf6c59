//! Crash-only start: finding and killing what a previous incarnation of this
//! agent left running.
//!
//! Every instance process carries `BERTH_AGENT_ID=<agent id>` in its
//! environment. The id is unique per node and data directory (the node id
//! plus a stable hash of the canonical data dir), so two berth servers with
//! different data dirs on one machine never touch each other's processes.
//!
//! Decision: orphans are killed, never adopted. Their stdout/stderr pipes
//! died with the old agent (their output would be lost or they would die of
//! SIGPIPE), and the agent cannot `wait` for processes that are not its
//! children; fresh instances for the same assignments start right after.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::{Pid, getpgid};

use crate::driver::command::AGENT_ID_VAR;

/// How long orphans get to exit after SIGTERM before SIGKILL.
const ORPHAN_GRACE: Duration = Duration::from_secs(2);
/// How long killed orphans get to be gone before the agent goes on anyway
/// (only a process stuck in the kernel outlives SIGKILL that long).
const KILL_WAIT: Duration = Duration::from_secs(5);

/// FNV-1a, 64 bit: a hash that is stable across Rust versions and runs
/// (`DefaultHasher` is not), so the id survives upgrades of berth.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The agent id for this node and data directory.
pub fn agent_id(node_id: &str, data_dir: &Path) -> String {
    let canonical = fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let clean: String = node_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!(
        "{clean}-{:016x}",
        fnv1a(canonical.as_os_str().as_encoded_bytes())
    )
}

/// Pids (other than this process) whose environment carries the marker.
pub fn find_marked(agent_id: &str) -> Vec<Pid> {
    let marker = format!("{AGENT_ID_VAR}={agent_id}");
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        // Unreadable (another user's, or gone) processes are not ours.
        let Ok(environ) = fs::read(e.path().join("environ")) else {
            continue;
        };
        if environ.split(|b| *b == 0).any(|kv| kv == marker.as_bytes()) && !is_zombie(pid) {
            out.push(Pid::from_raw(pid as i32));
        }
    }
    out
}

fn is_zombie(pid: u32) -> bool {
    // /proc/<pid>/stat: "pid (comm) S ..."; comm may contain spaces or ')'.
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Kill every process carrying this agent's marker: SIGTERM to their process
/// groups, up to [`ORPHAN_GRACE`] to exit, then SIGKILL, and up to
/// [`KILL_WAIT`] until none is left. Blocking; returns how many processes
/// were found.
pub fn kill_orphans(agent_id: &str) -> usize {
    let pids = find_marked(agent_id);
    if pids.is_empty() {
        return 0;
    }
    let own_group = getpgid(None).ok();
    let groups: BTreeSet<Pid> = pids
        .iter()
        .filter_map(|p| getpgid(Some(*p)).ok())
        .filter(|g| Some(*g) != own_group && g.as_raw() > 1)
        .collect();
    let signal_all = |sig: Signal| {
        for g in &groups {
            let _ = killpg(*g, sig);
        }
        for p in &pids {
            let _ = kill(*p, sig);
        }
    };
    tracing::warn!(
        count = pids.len(),
        "killing instances left by a previous run of this agent"
    );
    signal_all(Signal::SIGTERM);
    let deadline = Instant::now() + ORPHAN_GRACE;
    while Instant::now() < deadline && !find_marked(agent_id).is_empty() {
        std::thread::sleep(Duration::from_millis(20));
    }
    signal_all(Signal::SIGKILL);
    // SIGKILL takes effect when the process next runs: on a loaded machine a
    // killed orphan can live on (holding its ports and files) after the
    // signal was sent. Wait until none is left, so the fresh instances
    // started next do not race them; kill stragglers forked between scans.
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        let left = find_marked(agent_id);
        if left.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                pids = ?left,
                "processes left by a previous run still alive {KILL_WAIT:?} after SIGKILL"
            );
            break;
        }
        for p in left {
            let _ = kill(p, Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    pids.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ids_differ_per_data_dir_and_are_stable() {
        let a = agent_id("n1", Path::new("/nonexistent/a"));
        assert_eq!(a, agent_id("n1", Path::new("/nonexistent/a")));
        assert_ne!(a, agent_id("n1", Path::new("/nonexistent/b")));
        assert_ne!(a, agent_id("n2", Path::new("/nonexistent/a")));
        assert!(a.starts_with("n1-"));
    }
}
