//! Log shipping of a joined agent: every line its instances write (and
//! berth's system lines about them) goes, batched, to the server the agent
//! is joined to (`POST /v1/agent/nodes/{node}/logs`), which appends it to
//! its own log store so `berth logs [-f]` shows instances of every node.
//!
//! The agent keeps writing its own log files first (the shipper only
//! follows the store's live feed), so nothing is lost locally while the
//! server is unreachable. In memory, lines wait in a bounded buffer: when
//! the server is slow or away for long, the oldest lines are dropped and
//! counted (reported with the next accepted batch and in the agent's own
//! log) rather than growing memory or blocking the instances' pipes.
//! Batches are sent one at a time, in capture order, and retried until the
//! server takes them, so shipping resumes where it stopped after a
//! reconnect. Each batch says where its lines sit in this shipper's stream
//! (`LogBatch::stream`, `offset`): a batch sent again, after the agent gave
//! up on a hung server that then resumed and stored it anyway, is not
//! stored twice (the servers keep each node's position in the store).
//!
//! A [`ShipBarrier`] waits until every line captured so far has been
//! answered by a server: the agent holds an instance's `forget` on it, since
//! the server takes lines only of instances the node still reports (see
//! [`crate::remote::FORGET_HOLD`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use berth_model::LogLine;
use berth_model::api::LogBatch;
use tokio::sync::{Notify, broadcast, mpsc, oneshot, watch};

use crate::logs::LogStore;
use crate::remote::{ApiClient, RemoteError};

/// Limits of the shipper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShipConfig {
    /// Lines kept in memory while the server does not take them; older
    /// ones are dropped beyond this. Default 100,000.
    pub buffer_lines: usize,
    /// At most this many lines per request. Default 5,000.
    pub batch_lines: usize,
    /// At most about this many bytes of text per request (the server takes
    /// bodies up to 2 MiB). Default 512 KiB.
    pub batch_bytes: usize,
    /// How long a line may wait for more to batch with. Default 200 ms.
    pub linger: Duration,
}

impl Default for ShipConfig {
    fn default() -> Self {
        Self {
            buffer_lines: 100_000,
            batch_lines: 5_000,
            batch_bytes: 512 * 1024,
            linger: Duration::from_millis(200),
        }
    }
}

/// Counters of a shipper (cheap to clone, shared with its tasks).
#[derive(Debug, Default)]
pub struct ShipStats {
    /// Lines the server accepted.
    pub shipped: AtomicU64,
    /// Lines the server refused (instances it does not attribute to this node).
    pub refused: AtomicU64,
    /// Lines dropped before reaching the server (buffer full, or the live
    /// feed overran the buffer's filler).
    pub dropped: AtomicU64,
}

#[derive(Default)]
struct Buffer {
    /// Lines with their sequence number (ascending).
    lines: VecDeque<(u64, LogLine)>,
    next_seq: u64,
    /// The feed ended (the log store is gone).
    closed: bool,
}

struct Shared {
    buf: std::sync::Mutex<Buffer>,
    /// Every line numbered below this has been answered by a server
    /// (taken, refused) or dropped: nothing more will be done about it.
    done: watch::Sender<u64>,
    more: Notify,
    stats: Arc<ShipStats>,
    cfg: ShipConfig,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Buffer> {
        // A panic while holding the lock leaves a consistent deque.
        self.buf.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, line: LogLine) {
        let mut b = self.lock();
        if b.lines.len() >= self.cfg.buffer_lines.max(1) {
            b.lines.pop_front();
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        let seq = b.next_seq;
        b.next_seq += 1;
        b.lines.push_back((seq, line));
        self.mark_done(&b);
        drop(b);
        self.more.notify_one();
    }

    /// The next batch, oldest first, without removing it; `None` if empty.
    fn peek_batch(&self) -> Option<(u64, Vec<LogLine>)> {
        let b = self.lock();
        let mut bytes = 0usize;
        let mut out = Vec::new();
        let mut last = None;
        for (seq, l) in &b.lines {
            if out.len() >= self.cfg.batch_lines.max(1)
                || (!out.is_empty() && bytes + l.line.len() > self.cfg.batch_bytes)
            {
                break;
            }
            bytes += l.line.len() + 96;
            out.push(l.clone());
            last = Some(*seq);
        }
        last.map(|s| (s, out))
    }

    /// Remove what was sent (up to `seq`), unless drop-oldest already did.
    fn ack(&self, seq: u64) {
        let mut b = self.lock();
        while b.lines.front().is_some_and(|(s, _)| *s <= seq) {
            b.lines.pop_front();
        }
        self.mark_done(&b);
    }

    /// Publish how far the lines are done: up to the oldest still queued.
    fn mark_done(&self, b: &Buffer) {
        let done = b.lines.front().map_or(b.next_seq, |(s, _)| *s);
        self.done.send_if_modified(|d| {
            let moved = done > *d;
            *d = (*d).max(done);
            moved
        });
    }
}

/// A running shipper: [`LogShipper::start`] it before the agent starts its
/// instances (so no line is missed), [`LogShipper::finish`] it after the
/// agent stopped them (to send the last lines).
pub struct LogShipper {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    /// `None` once [`LogShipper::failed`] saw it end.
    sender: Option<tokio::task::JoinHandle<Result<(), RemoteError>>>,
    filler: tokio::task::JoinHandle<()>,
    barrier: ShipBarrier,
}

/// Waits for the lines captured so far to be shipped (see
/// [`ShipBarrier::shipped`]). Cheap to clone.
#[derive(Clone)]
pub struct ShipBarrier {
    logs: LogStore,
    /// Asks the filler for the number of the next line it will take, once
    /// it took every line the store has already broadcast.
    ask: mpsc::Sender<oneshot::Sender<u64>>,
    done: watch::Receiver<u64>,
    /// Where the last wait that timed out wanted the stream to be.
    gave_up: Arc<std::sync::Mutex<Option<u64>>>,
}

impl std::fmt::Debug for ShipBarrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShipBarrier").finish_non_exhaustive()
    }
}

impl ShipBarrier {
    /// Wait until every line appended to the log store before this call
    /// was answered by a server (or dropped), for at most `within`.
    /// `false` if it was not (servers unreachable or slow, or the shipper
    /// stopped). After one wait that timed out, later calls answer `false`
    /// at once until the shipper has caught up with it: an outage holds up
    /// its callers once, not once per call.
    pub async fn shipped(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        let upto = async {
            // Lines still queued for the store's writer are broadcast
            // before its flush answers…
            self.logs.flush().await.ok()?;
            // …and the filler takes what was broadcast before answering.
            let (tx, rx) = oneshot::channel();
            self.ask.send(tx).await.ok()?;
            rx.await.ok()
        };
        let Ok(Some(upto)) = tokio::time::timeout_at(deadline, upto).await else {
            return false;
        };
        let mut done = self.done.clone();
        {
            let gave_up = self.gave_up.lock().unwrap_or_else(|p| p.into_inner());
            if gave_up.is_some_and(|g| *done.borrow() < g) {
                return false;
            }
        }
        match tokio::time::timeout_at(deadline, done.wait_for(|d| *d >= upto)).await {
            Ok(Ok(_)) => {
                *self.gave_up.lock().unwrap_or_else(|p| p.into_inner()) = None;
                true
            }
            Ok(Err(_)) => false,
            Err(_) => {
                *self.gave_up.lock().unwrap_or_else(|p| p.into_inner()) = Some(upto);
                false
            }
        }
    }
}

impl LogShipper {
    /// Follow `logs` and ship every new line through `client`.
    pub fn start(client: ApiClient, logs: &LogStore, cfg: ShipConfig) -> Self {
        let (done, done_rx) = watch::channel(0);
        let shared = Arc::new(Shared {
            buf: std::sync::Mutex::new(Buffer::default()),
            done,
            more: Notify::new(),
            stats: Arc::new(ShipStats::default()),
            cfg,
        });
        let feed = logs.subscribe();
        let (ask, asks) = mpsc::channel(64);
        let filler = tokio::spawn(fill(feed, asks, shared.clone()));
        let (stop, stop_rx) = watch::channel(false);
        let sender = tokio::spawn(send_loop(client, shared.clone(), stop_rx));
        Self {
            shared,
            stop,
            sender: Some(sender),
            filler,
            barrier: ShipBarrier {
                logs: logs.clone(),
                ask,
                done: done_rx,
                gave_up: Default::default(),
            },
        }
    }

    /// A handle that waits for the lines captured so far to be shipped.
    pub fn barrier(&self) -> ShipBarrier {
        self.barrier.clone()
    }

    /// The counters.
    pub fn stats(&self) -> Arc<ShipStats> {
        self.shared.stats.clone()
    }

    /// Wait for the sender to end by itself: only when the server revoked
    /// the node's credential (`Err(Revoked)`), or the feed closed.
    /// Pends forever after that. Cancel-safe.
    pub async fn failed(&mut self) -> Result<(), RemoteError> {
        let Some(handle) = self.sender.as_mut() else {
            return std::future::pending().await;
        };
        let res = handle.await;
        self.sender = None;
        match res {
            Ok(r) => r,
            Err(e) => Err(RemoteError::AgentTask(format!("log shipper: {e}"))),
        }
    }

    /// Send what is buffered (trying for at most `within`), then stop.
    pub async fn finish(self, within: Duration) {
        // Lines still queued in the store's writer reach the feed first.
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.stop.send_replace(true);
        self.shared.more.notify_one();
        if let Some(mut sender) = self.sender
            && tokio::time::timeout(within, &mut sender).await.is_err()
        {
            sender.abort();
        }
        self.filler.abort();
        let s = &self.shared.stats;
        let left = self.shared.lock().lines.len() as u64;
        tracing::info!(
            shipped = s.shipped.load(Ordering::Relaxed),
            dropped = s.dropped.load(Ordering::Relaxed) + left,
            "log shipping stopped"
        );
    }
}

async fn fill(
    mut feed: broadcast::Receiver<LogLine>,
    mut asks: mpsc::Receiver<oneshot::Sender<u64>>,
    shared: Arc<Shared>,
) {
    use broadcast::error::{RecvError, TryRecvError};
    let lagged = |n: u64| {
        shared.stats.dropped.fetch_add(n, Ordering::Relaxed);
        tracing::warn!(lines = n, "log shipping fell behind the live feed");
    };
    let closed = || {
        shared.lock().closed = true;
        shared.more.notify_one();
    };
    loop {
        tokio::select! {
            res = feed.recv() => match res {
                Ok(line) => shared.push(line),
                Err(RecvError::Lagged(n)) => lagged(n),
                Err(RecvError::Closed) => return closed(),
            },
            Some(ask) = asks.recv() => {
                // Take everything already broadcast, then say where the
                // stream stands.
                loop {
                    match feed.try_recv() {
                        Ok(line) => shared.push(line),
                        Err(TryRecvError::Lagged(n)) => lagged(n),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Closed) => {
                            closed();
                            break;
                        }
                    }
                }
                let _ = ask.send(shared.lock().next_seq);
            }
        }
    }
}

async fn send_loop(
    client: ApiClient,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), RemoteError> {
    let mut reported_dropped = 0u64;
    // This run's stream: a restarted agent numbers its lines from 0 again,
    // under another stream, so none of them passes for one already stored.
    let stream = crate::now_us().max(1);
    let mut backoff = Duration::ZERO;
    let mut warned = false;
    loop {
        let stopping = *stop.borrow();
        let Some((last, lines)) = shared.peek_batch() else {
            if stopping || shared.lock().closed {
                return Ok(());
            }
            tokio::select! {
                () = shared.more.notified() => {}
                _ = stop.changed() => {}
            }
            if !*stop.borrow() {
                // Let a burst gather into one request.
                tokio::time::sleep(shared.cfg.linger).await;
            }
            continue;
        };
        let dropped_total = shared.stats.dropped.load(Ordering::Relaxed);
        let batch = LogBatch {
            // The lines of a batch are consecutive in the stream.
            offset: (last + 1).saturating_sub(lines.len() as u64),
            lines,
            dropped: dropped_total - reported_dropped,
            stream,
        };
        match client.ship_logs(&batch).await {
            Ok(answer) => {
                shared.ack(last);
                reported_dropped = dropped_total;
                shared
                    .stats
                    .shipped
                    .fetch_add(answer.accepted, Ordering::Relaxed);
                shared
                    .stats
                    .refused
                    .fetch_add(answer.refused, Ordering::Relaxed);
                if backoff > Duration::ZERO {
                    tracing::info!("log shipping resumed");
                }
                backoff = Duration::ZERO;
                warned = false;
            }
            Err(e @ RemoteError::Revoked { .. }) => return Err(e),
            Err(RemoteError::Refused {
                status, message, ..
            }) if (400..500).contains(&status) => {
                // Retrying the same batch cannot succeed (e.g. a server
                // without this route): drop it, say so once.
                shared
                    .stats
                    .dropped
                    .fetch_add(batch.lines.len() as u64, Ordering::Relaxed);
                shared.ack(last);
                if !warned {
                    tracing::warn!(status, %message, "the server refused a batch of log lines; dropped");
                    warned = true;
                }
            }
            Err(e) => {
                if stopping {
                    return Ok(());
                }
                if !warned {
                    tracing::warn!(error = %e, "cannot ship log lines; retrying (they stay in the local log files)");
                    warned = true;
                }
                backoff = (backoff * 2).clamp(Duration::from_millis(500), Duration::from_secs(10));
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_model::{InstanceKey, LogStream};

    fn line(n: usize, len: usize) -> LogLine {
        LogLine {
            key: InstanceKey::new("default", "s", "web", 1),
            ts_us: n as u64,
            stream: LogStream::Stdout,
            line: "x".repeat(len),
        }
    }

    fn shared(cfg: ShipConfig) -> Shared {
        Shared {
            buf: Default::default(),
            done: watch::channel(0).0,
            more: Notify::new(),
            stats: Default::default(),
            cfg,
        }
    }

    /// A server that fails its first `fail` requests (503), then takes
    /// every batch; the lines it took, in order.
    async fn flaky_server(fail: usize) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let got = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = got.clone();
        tokio::spawn(async move {
            let mut n = 0;
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 65536];
                // Headers, then Content-Length bytes of body.
                let body = loop {
                    let k = s.read(&mut buf).await.unwrap();
                    req.extend_from_slice(&buf[..k]);
                    let text = String::from_utf8_lossy(&req).into_owned();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|h| {
                                h.to_ascii_lowercase()
                                    .strip_prefix("content-length: ")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            break body.to_owned();
                        }
                    }
                };
                n += 1;
                let answer = if n <= fail {
                    "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
                } else {
                    let batch: LogBatch = serde_json::from_str(&body).unwrap();
                    let k = batch.lines.len();
                    sink.lock()
                        .unwrap()
                        .extend(batch.lines.into_iter().map(|l| l.line));
                    let json = format!("{{\"accepted\":{k},\"refused\":0}}");
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
                        json.len()
                    )
                };
                s.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        (addr, got)
    }

    #[tokio::test]
    async fn lines_wait_while_the_server_fails_then_arrive_in_order() {
        let (addr, got) = flaky_server(2).await;
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path().to_path_buf(), Default::default()).unwrap();
        let client = ApiClient::new(addr, "n1".into(), Some("secret".into()));
        let shipper = LogShipper::start(client, &store, ShipConfig::default());
        let key = line(0, 0).key;
        for i in 0..3 {
            store
                .append(&key, LogStream::Stdout, &format!("line {i}"))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while got.lock().unwrap().len() < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                got.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(*got.lock().unwrap(), ["line 0", "line 1", "line 2"]);
        let stats = shipper.stats();
        assert_eq!(stats.shipped.load(Ordering::Relaxed), 3);
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 0);
        shipper.finish(Duration::from_secs(1)).await;
        // The local files have them too.
        let local = store
            .read(&crate::logs::LogQuery {
                namespace: "default".into(),
                stack: "s".into(),
                services: vec![],
                since_us: None,
                tail: None,
            })
            .await
            .unwrap();
        assert_eq!(local.len(), 3);
    }

    #[test]
    fn full_buffer_drops_oldest_and_counts() {
        let s = shared(ShipConfig {
            buffer_lines: 3,
            ..ShipConfig::default()
        });
        for n in 0..5 {
            s.push(line(n, 1));
        }
        assert_eq!(s.stats.dropped.load(Ordering::Relaxed), 2);
        let (last, batch) = s.peek_batch().unwrap();
        assert_eq!(batch.iter().map(|l| l.ts_us).collect::<Vec<_>>(), [2, 3, 4]);
        assert_eq!(last, 4);
    }

    #[test]
    fn batches_are_capped_and_acked_in_order() {
        let s = shared(ShipConfig {
            batch_lines: 2,
            batch_bytes: 1 << 20,
            ..ShipConfig::default()
        });
        for n in 0..5 {
            s.push(line(n, 1));
        }
        let (last, batch) = s.peek_batch().unwrap();
        assert_eq!(batch.len(), 2);
        // A drop-oldest between peek and ack must not remove unsent lines.
        s.ack(last);
        let (_, batch) = s.peek_batch().unwrap();
        assert_eq!(batch[0].ts_us, 2);

        let s = shared(ShipConfig {
            batch_bytes: 1000,
            ..ShipConfig::default()
        });
        for n in 0..4 {
            s.push(line(n, 600));
        }
        // One line always goes, even when larger than the cap.
        let (_, batch) = s.peek_batch().unwrap();
        assert_eq!(batch.len(), 1);
    }
}
