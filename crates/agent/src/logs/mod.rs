//! Log capture for one node: every instance's stdout and stderr, line by
//! line with a timestamp, plus berth's own "system" lines about it
//! (`started pid 123`, `exited with code 1`, …).
//!
//! Lines go to size-capped rotating files under
//! `<dir>/<namespace>/<stack>/<service>.<slot>/` (`current.log`, then
//! `1.log` … `<max_files - 1>.log`, oldest last), so a chatty process can
//! never use more than `max_file_bytes × max_files` of disk, and survive
//! restarts of the instance (same slot, same directory) and of the agent.
//! One line per log line: `<ts_us> <o|e|s> <text>`.
//!
//! Writing happens on one dedicated thread fed by a bounded channel: pipe
//! readers wait when it is full (back-pressure, the child then blocks on its
//! pipe) instead of dropping lines or growing memory, and the async runtime
//! never blocks on disk. Every written line is also broadcast to
//! [`LogStore::subscribe`]rs (for `logs -f`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use berth_model::{InstanceKey, LogLine, LogStream};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{broadcast, mpsc, oneshot};

mod read;
mod writer;

pub use read::{LineFilter, LogQuery};

/// Limits of the log files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// A file is rotated before it would grow past this. Default 10 MB.
    pub max_file_bytes: u64,
    /// Files kept per instance, the current one included. Default 5.
    pub max_files: u32,
    /// Longer lines are split into pieces of at most this. Default 64 KiB.
    pub max_line_bytes: usize,
    /// Lines queued for the writer before pipe readers wait. Default 8192.
    pub queue: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            max_file_bytes: 10 * 1024 * 1024,
            max_files: 5,
            max_line_bytes: 64 * 1024,
            queue: 8192,
        }
    }
}

/// Errors of the log store.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A log file or directory could not be read or written.
    #[error("log store {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The configuration cannot work.
    #[error("invalid log configuration: {0}")]
    Config(String),
    /// The writer thread is gone (the store is shutting down).
    #[error("the log writer has stopped")]
    Closed,
}

pub(crate) enum Msg {
    Line(LogLine),
    Close(InstanceKey),
    RemoveStack {
        namespace: String,
        stack: String,
        done: oneshot::Sender<Result<(), LogError>>,
    },
    Flush(oneshot::Sender<()>),
}

struct Inner {
    dir: PathBuf,
    cfg: LogConfig,
    tx: mpsc::Sender<Msg>,
    live: broadcast::Sender<LogLine>,
    last_ts: AtomicU64,
}

/// The node's log store. Cheap to clone.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl LogStore {
    /// Open (creating) the store in `dir` and start its writer thread.
    pub fn open(dir: PathBuf, cfg: LogConfig) -> Result<Self, LogError> {
        if cfg.max_files == 0 || cfg.max_line_bytes == 0 || cfg.queue == 0 {
            return Err(LogError::Config(
                "max_files, max_line_bytes and queue must be at least 1".into(),
            ));
        }
        // A piece of a split line plus its prefix must fit in one file.
        if cfg.max_file_bytes < cfg.max_line_bytes as u64 + 32 {
            return Err(LogError::Config(format!(
                "max_file_bytes ({}) must exceed max_line_bytes ({}) by at least 32",
                cfg.max_file_bytes, cfg.max_line_bytes
            )));
        }
        std::fs::create_dir_all(&dir).map_err(|source| LogError::Io {
            path: dir.clone(),
            source,
        })?;
        let (tx, rx) = mpsc::channel(cfg.queue);
        let (live, _) = broadcast::channel(4096);
        writer::spawn(dir.clone(), cfg.clone(), rx, live.clone()).map_err(|source| {
            LogError::Io {
                path: dir.clone(),
                source,
            }
        })?;
        Ok(Self {
            inner: Arc::new(Inner {
                dir,
                cfg,
                tx,
                live,
                last_ts: AtomicU64::new(0),
            }),
        })
    }

    /// The directory the store writes to.
    pub fn dir(&self) -> &std::path::Path {
        &self.inner.dir
    }

    /// Every new line of every instance on this node, as it is written.
    pub fn subscribe(&self) -> broadcast::Receiver<LogLine> {
        self.inner.live.subscribe()
    }

    /// A capture timestamp: wall-clock microseconds, strictly increasing
    /// across the store so merged output has a total order.
    fn now_us(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let mut last = self.inner.last_ts.load(Ordering::Relaxed);
        loop {
            let next = now.max(last + 1);
            match self.inner.last_ts.compare_exchange_weak(
                last,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    /// Append one line (split at newlines and at `max_line_bytes`). Waits
    /// while the writer is behind.
    pub async fn append(
        &self,
        key: &InstanceKey,
        stream: LogStream,
        text: &str,
    ) -> Result<(), LogError> {
        for line in text.split('\n') {
            for piece in split_at_most(line, self.inner.cfg.max_line_bytes) {
                let msg = Msg::Line(LogLine {
                    key: key.clone(),
                    ts_us: self.now_us(),
                    stream,
                    line: piece.to_owned(),
                });
                self.inner
                    .tx
                    .send(msg)
                    .await
                    .map_err(|_| LogError::Closed)?;
            }
        }
        Ok(())
    }

    /// Store lines captured elsewhere (another node's agent shipped them to
    /// this server), keeping their capture timestamps so merged reads and
    /// `logs -f` order them with local lines. Waits while the writer is
    /// behind (back-pressure reaches the shipping agent as a slower answer).
    pub async fn ingest(&self, lines: Vec<LogLine>) -> Result<(), LogError> {
        for l in lines {
            for text in l.line.split('\n') {
                for piece in split_at_most(text, self.inner.cfg.max_line_bytes) {
                    let msg = Msg::Line(LogLine {
                        key: l.key.clone(),
                        ts_us: l.ts_us,
                        stream: l.stream,
                        line: piece.to_owned(),
                    });
                    self.inner
                        .tx
                        .send(msg)
                        .await
                        .map_err(|_| LogError::Closed)?;
                }
            }
        }
        Ok(())
    }

    /// A line written by berth about the instance.
    pub async fn system(&self, key: &InstanceKey, text: &str) {
        if let Err(e) = self.append(key, LogStream::System, text).await {
            tracing::warn!(instance = %key, error = %e, "could not log a system line");
        }
    }

    /// Read `reader` to its end, logging each line. Lines longer than
    /// `max_line_bytes` are split; invalid UTF-8 is replaced.
    pub async fn capture<R: AsyncRead + Unpin>(
        &self,
        key: &InstanceKey,
        stream: LogStream,
        reader: R,
    ) {
        let max = self.inner.cfg.max_line_bytes;
        let mut reader = BufReader::with_capacity(max.clamp(4096, 64 * 1024), reader);
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let buf = match reader.fill_buf().await {
                Ok(b) => b,
                Err(e) => {
                    tracing::debug!(instance = %key, error = %e, "pipe read failed");
                    break;
                }
            };
            if buf.is_empty() {
                break;
            }
            let room = max.saturating_sub(pending.len());
            let (take, complete) = match buf.iter().take(room).position(|b| *b == b'\n') {
                Some(i) => (i + 1, true),
                None if buf.len() >= room => (room, true),
                None => (buf.len(), false),
            };
            pending.extend_from_slice(&buf[..take]);
            reader.consume(take);
            if complete {
                if pending.last() == Some(&b'\n') {
                    pending.pop();
                }
                let text = String::from_utf8_lossy(&pending).into_owned();
                pending.clear();
                if self.append(key, stream, &text).await.is_err() {
                    return;
                }
            }
        }
        if !pending.is_empty() {
            let text = String::from_utf8_lossy(&pending).into_owned();
            let _ = self.append(key, stream, &text).await;
        }
    }

    /// Close the instance's files (it was removed). Its logs stay on disk.
    pub async fn close(&self, key: &InstanceKey) {
        let _ = self.inner.tx.send(Msg::Close(key.clone())).await;
    }

    /// Wait until every line appended so far is on disk.
    pub async fn flush(&self) -> Result<(), LogError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Msg::Flush(tx))
            .await
            .map_err(|_| LogError::Closed)?;
        rx.await.map_err(|_| LogError::Closed)
    }

    /// Past lines, merged across instances in time order.
    pub async fn read(&self, q: &LogQuery) -> Result<Vec<LogLine>, LogError> {
        self.read_filtered(q, std::sync::Arc::new(|_: &LogLine| true))
            .await
    }

    /// Past lines that `keep` accepts (a search, a page before a cursor),
    /// merged in time order; `q.tail` counts only accepted lines.
    pub async fn read_filtered(
        &self,
        q: &LogQuery,
        keep: read::LineFilter,
    ) -> Result<Vec<LogLine>, LogError> {
        self.flush().await?;
        let dir = self.inner.dir.clone();
        let q = q.clone();
        tokio::task::spawn_blocking(move || read::read(&dir, &q, &keep))
            .await
            .map_err(|_| LogError::Closed)?
    }

    /// Delete every log of a stack (on `down`).
    pub async fn remove_stack(&self, namespace: &str, stack: &str) -> Result<(), LogError> {
        let (done, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Msg::RemoveStack {
                namespace: namespace.to_owned(),
                stack: stack.to_owned(),
                done,
            })
            .await
            .map_err(|_| LogError::Closed)?;
        rx.await.map_err(|_| LogError::Closed)?
    }
}

/// Split `s` into pieces of at most `max` bytes, on char boundaries.
fn split_at_most(s: &str, max: usize) -> Vec<&str> {
    if s.len() <= max {
        return vec![s];
    }
    let mut out = Vec::new();
    let mut rest = s;
    while rest.len() > max {
        let mut cut = max;
        while cut > 0 && !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        if cut == 0 {
            // A single char wider than max (max < 4): take the whole char.
            cut = rest.chars().next().map_or(rest.len(), char::len_utf8);
        }
        out.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    out.push(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::split_at_most;

    #[test]
    fn long_lines_split_on_char_boundaries() {
        assert_eq!(split_at_most("abcdef", 4), ["abcd", "ef"]);
        assert_eq!(split_at_most("ééé", 3), ["é", "é", "é"]);
        assert_eq!(split_at_most("", 3), [""]);
    }
}
