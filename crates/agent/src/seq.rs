//! The `seq` stamped on every status (and forget) this node reports: what
//! the servers order a node's reports by (a status is written only over an
//! older one of the same node, see ARCHITECTURE.md "Status order").
//!
//! Within one run a counter keeps it growing. Across runs (an agent
//! restart, or a fenced agent starting afresh) the counter would start over,
//! so the number also never falls below the wall clock in µs, and never
//! below a high-water mark kept in the data dir. The clock alone is not
//! enough: a clock set back by X across a restart would make the servers
//! refuse the new run's reports for up to X (they read as older than the
//! previous run's). The mark makes the order independent of the clock.
//!
//! The mark on disk is a *ceiling*: every seq handed out lies below it, so
//! a run that starts from it is above everything before. It is moved
//! [`RESERVE`] ahead when a seq reaches it, so the file is written (tmp
//! file, fsync, rename, fsync of the directory) once at start and then
//! about once per [`RESERVE`] of clock time, not once per status.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// The high-water mark's file in the agent's data dir.
pub const FILE: &str = "status-seq";

/// How far (in seq units, µs of clock) the mark on disk is kept ahead of
/// the seqs handed out: 10 minutes, so a steady node writes it about
/// every 10 minutes. A restart starts up to this far above the clock; the
/// number has room for that (u64 µs: about 580,000 years).
pub const RESERVE: u64 = 600_000_000;

/// Hands out a node's status stamps: above every one before, in this run
/// and (through the mark in the data dir) in every earlier run.
#[derive(Debug)]
pub struct StatusSeq {
    path: PathBuf,
    now_us: fn() -> u64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The last seq handed out.
    last: u64,
    /// The ceiling written to disk: every seq handed out is below it.
    durable: u64,
}

/// The mark in the data dir cannot be read or written.
#[derive(Debug, thiserror::Error)]
#[error("status order mark {path}: {why}")]
pub struct SeqError {
    /// The file.
    pub path: PathBuf,
    /// What went wrong, and what to do.
    pub why: String,
}

impl StatusSeq {
    /// Start from the mark in `dir` (none yet: from the clock) and move it
    /// ahead on disk before anything is handed out. `now_us` is the wall
    /// clock in µs since the epoch (tests give another one).
    pub fn open(dir: &Path, now_us: fn() -> u64) -> Result<Self, SeqError> {
        let path = dir.join(FILE);
        let stored = match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse::<u64>().map_err(|_| SeqError {
                path: path.clone(),
                why: format!(
                    "{:?} is not a number (the agent writes one decimal number here; remove the file to start again from the clock)",
                    text.trim()
                ),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => {
                return Err(SeqError {
                    path,
                    why: e.to_string(),
                });
            }
        };
        let ceiling = stored.max(now_us()).saturating_add(RESERVE);
        write_mark(&path, ceiling).map_err(|e| SeqError {
            path: path.clone(),
            why: format!("cannot write it: {e}"),
        })?;
        Ok(Self {
            path,
            now_us,
            state: Mutex::new(State {
                last: stored,
                durable: ceiling,
            }),
        })
    }

    /// The next stamp: above every one given out before (by this run or an
    /// earlier one with this data dir), and at least the clock.
    pub fn next(&self) -> u64 {
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let next = st.last.saturating_add(1).max((self.now_us)());
        if next >= st.durable {
            // Rare (once per RESERVE of clock, or a clock jump): written
            // before the stamp is handed out, so the disk is always ahead.
            let ceiling = next.saturating_add(RESERVE);
            if let Err(e) = write_mark(&self.path, ceiling) {
                // Keep reporting: only the order across a restart is at
                // stake, and it falls back to the clock.
                tracing::warn!(
                    path = %self.path.display(),
                    error = %e,
                    "cannot move the status order mark ahead; after a restart, status order relies on the clock"
                );
            }
            st.durable = ceiling;
        }
        st.last = next;
        next
    }
}

/// Write `value` to `path` durably: a tmp file synced, renamed over
/// `path`, and the directory synced, so a crash leaves the old mark or
/// the new one, never a torn or missing file.
fn write_mark(path: &Path, value: u64) -> std::io::Result<()> {
    static TMP: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{FILE}.{}.{}",
        std::process::id(),
        TMP.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{value}")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000_000;

    fn ahead() -> u64 {
        crate::now_us() + HOUR
    }

    #[test]
    fn a_restart_with_the_clock_set_back_still_stamps_above_the_previous_run() {
        let dir = tempfile::tempdir().unwrap();
        let first = StatusSeq::open(dir.path(), ahead).unwrap();
        let mut last = 0;
        for _ in 0..1000 {
            let s = first.next();
            assert!(s > last, "{s} after {last}");
            last = s;
        }
        assert!(last >= crate::now_us() + HOUR - 60_000_000);
        drop(first);
        // The clock is now an hour behind what the first run stamped.
        let second = StatusSeq::open(dir.path(), crate::now_us).unwrap();
        let s = second.next();
        assert!(s > last, "{s} after {last}: the restart went backwards");
        assert!(second.next() > s);
    }

    #[test]
    fn the_mark_on_disk_stays_ahead_of_every_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let seq = StatusSeq::open(dir.path(), crate::now_us).unwrap();
        let read = || -> u64 {
            std::fs::read_to_string(dir.path().join(FILE))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let s = seq.next();
        assert!(read() > s);
        // Handing out past the ceiling moves it first.
        {
            let mut st = seq.state.lock().unwrap();
            st.last = st.durable + 5;
        }
        let s = seq.next();
        assert!(read() > s, "{} not above {s}", read());
        // A run killed now restarts above it.
        let again = StatusSeq::open(dir.path(), crate::now_us).unwrap();
        assert!(again.next() > s);
        // No tmp files left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(FILE)]);
    }

    #[test]
    fn a_damaged_mark_is_an_error_saying_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), "12x\n").unwrap();
        let e = StatusSeq::open(dir.path(), crate::now_us)
            .unwrap_err()
            .to_string();
        assert!(e.contains("status-seq") && e.contains("\"12x\""), "{e}");
        assert!(e.contains("remove the file"), "{e}");
    }
}
