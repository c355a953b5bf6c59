//! The embedded store: one redb file, one writer thread, watches fed from a
//! broadcast channel with history in the file as the fallback.
//!
//! Layout:
//! - `codec` — byte layouts of the rows;
//! - `writer` — the only code that writes the file: group commit of queued
//!   requests, lease deadlines and expiry, history retention;
//! - `watch` — streams that replay history then follow live events.
//!
//! The file holds five tables: `kv` (key → value and etcd metadata), `meta`
//! (current revision, compact revision, next lease id), `history` (revision →
//! the events of that revision), `leases` (id → TTL) and `lease_keys` (lease,
//! key). Every write transaction is committed with redb's default
//! `Durability::Immediate`, so whatever a caller was told is committed
//! survives `kill -9` and power loss. Reads are redb read transactions (MVCC):
//! they see only committed revisions and never wait for the writer.
//!
//! Lease deadlines are kept in memory only. After a restart every persisted
//! lease gets a fresh full TTL — exactly what etcd does on a leader change —
//! so a lease outlives its owner by at most one TTL plus the downtime.

mod codec;
mod watch;
mod writer;

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redb::{Database, ReadableDatabase};
use tokio::sync::oneshot;

use crate::{
    KeyValue, LeaseId, Op, Result, Revision, Store, StoreError, Txn, TxnResult, WatchStream,
};
use watch::{Watch, backend};
use writer::{Hub, KV, Limits, META, META_REVISION, Reply, Request, Status, WriteOp, Writer};

/// Tunables of [`EmbeddedStore`]. `Options::default()` suits berth.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Options {
    /// Revisions of history kept for watches that start in the past or fall
    /// behind; older ones are compacted automatically.
    pub history_retention: u64,
    /// Group commits buffered per watch before it falls back to reading
    /// history from the file. Small is fine: falling behind costs a read,
    /// never an event.
    pub watch_buffer: usize,
    /// Most requests applied in one write transaction.
    pub max_batch: usize,
    /// redb page cache, bytes.
    pub cache_size: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            history_retention: 100_000,
            watch_buffer: 256,
            max_batch: 1024,
            cache_size: 16 << 20,
        }
    }
}

impl Options {
    /// Keep at most this many revisions of history.
    pub fn history_retention(mut self, revisions: u64) -> Self {
        self.history_retention = revisions;
        self
    }

    /// Buffer this many group commits per watch.
    pub fn watch_buffer(mut self, commits: usize) -> Self {
        self.watch_buffer = commits;
        self
    }

    /// Apply at most this many requests per write transaction.
    pub fn max_batch(mut self, requests: usize) -> Self {
        self.max_batch = requests;
        self
    }

    /// Give redb this many bytes of page cache.
    pub fn cache_size(mut self, bytes: usize) -> Self {
        self.cache_size = bytes;
        self
    }
}

/// The embedded [`Store`]. Cheap to clone; the background writer stops when
/// the last clone is dropped or [`EmbeddedStore::close`] is called.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<Database>,
    requests: Option<mpsc::Sender<Request>>,
    hub: Arc<Hub>,
    status: Arc<Status>,
    writer: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.status.close();
        // The writer stops once its queue is disconnected; wait so that the
        // file is released when the last handle is gone.
        drop(self.requests.take());
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!("embedded store writer thread panicked");
        }
    }
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Open (creating if needed) the store in the file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, Options::default())
    }

    /// [`EmbeddedStore::open`] with tunables.
    pub fn open_with(path: &Path, options: Options) -> Result<Self> {
        let db = Database::builder()
            .set_cache_size(options.cache_size)
            .create(path)
            .map_err(|e| StoreError::Backend(format!("opening {}: {e}", path.display())))?;
        let persisted = writer::init(&db)
            .map_err(|e| StoreError::Backend(format!("opening {}: {}", path.display(), e.0)))?;
        let db = Arc::new(db);
        let (requests, queue) = mpsc::channel();
        let hub = Arc::new(Hub::new(options.watch_buffer));
        let status = Arc::new(Status::default());
        let writer = Writer::new(
            db.clone(),
            queue,
            hub.clone(),
            status.clone(),
            Limits {
                history_retention: options.history_retention,
                max_batch: options.max_batch.max(1),
            },
            persisted,
        );
        let (thread_status, thread_hub) = (status.clone(), hub.clone());
        let writer = std::thread::Builder::new()
            .name("berth-store-writer".into())
            .spawn(move || {
                let outcome =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| writer.run()));
                if outcome.is_err() {
                    thread_status.fail("the store's writer thread panicked".into());
                }
                thread_hub.shut();
            })
            .map_err(|e| StoreError::Backend(format!("starting the store writer: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                requests: Some(requests),
                hub,
                status,
                writer: Some(writer),
            }),
        })
    }

    /// Finish the writes already queued, stop the writer and end open
    /// watches. Later calls on any clone return [`StoreError::Closed`]. The
    /// file itself is released when the last clone is dropped.
    pub async fn close(&self) {
        self.inner.status.close();
        self.inner.hub.shut();
        let (done, stopped) = oneshot::channel();
        if let Some(requests) = &self.inner.requests
            && requests.send(Request::Close(done)).is_ok()
        {
            // An error only means the writer is already gone.
            let _ = stopped.await;
        }
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T>>) -> Request) -> Result<T> {
        self.inner.status.check()?;
        let requests = self.inner.requests.as_ref().ok_or(StoreError::Closed)?;
        let (reply, answer) = oneshot::channel();
        requests
            .send(make(reply))
            .map_err(|_| self.inner.status.error())?;
        answer.await.map_err(|_| self.inner.status.error())?
    }

    async fn write_txn(&self, txn: Txn) -> Result<TxnResult> {
        self.call(|reply| Request::Write(WriteOp::Txn(txn), Reply::Txn(reply)))
            .await
    }

    fn read(&self) -> Result<redb::ReadTransaction> {
        self.inner.status.check()?;
        self.inner.db.begin_read().map_err(backend)
    }
}

fn current_revision(read: &redb::ReadTransaction) -> Result<Revision> {
    let meta = read.open_table(META).map_err(backend)?;
    let revision = meta.get(META_REVISION).map_err(backend)?;
    Ok(revision.map_or(1, |g| g.value()))
}

fn corrupt(e: codec::Corrupt) -> StoreError {
    StoreError::Backend(format!("corrupt store: {}", e.0))
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let read = self.read()?;
        let kv = read.open_table(KV).map_err(backend)?;
        let row = kv.get(key).map_err(backend)?;
        row.map(|g| codec::decode_kv(key, g.value()).map_err(corrupt))
            .transpose()
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let read = self.read()?;
        let revision = current_revision(&read)?;
        let kv = read.open_table(KV).map_err(backend)?;
        let mut out = Vec::new();
        for entry in kv.range::<&str>(prefix..).map_err(backend)? {
            let (key, value) = entry.map_err(backend)?;
            let key = key.value();
            if !key.starts_with(prefix) {
                break;
            }
            out.push(codec::decode_kv(key, value.value()).map_err(corrupt)?);
        }
        Ok((out, revision))
    }

    async fn put(&self, key: &str, value: Bytes, lease: LeaseId) -> Result<Revision> {
        let txn = Txn {
            success: vec![Op::Put {
                key: key.to_owned(),
                value,
                lease,
            }],
            ..Txn::default()
        };
        Ok(self.write_txn(txn).await?.revision)
    }

    async fn delete(&self, key: &str) -> Result<Revision> {
        let txn = Txn {
            success: vec![Op::Delete(key.to_owned())],
            ..Txn::default()
        };
        Ok(self.write_txn(txn).await?.revision)
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        self.write_txn(txn).await
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream> {
        self.inner.status.check()?;
        // Subscribe before reading anything: see the `watch` module.
        let live = self
            .inner
            .hub
            .subscribe()
            .ok_or_else(|| self.inner.status.error())?;
        let next = if from <= 0 {
            current_revision(&self.read()?)? + 1
        } else {
            from
        };
        Ok(Watch::new(
            Arc::downgrade(&self.inner.db),
            live,
            self.inner.status.clone(),
            prefix.to_owned(),
            next,
        )
        .into_stream())
    }

    async fn revision(&self) -> Result<Revision> {
        current_revision(&self.read()?)
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId> {
        self.call(|reply| Request::Write(WriteOp::LeaseGrant(ttl), Reply::Lease(reply)))
            .await
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<()> {
        self.call(|reply| Request::KeepAlive(lease, reply)).await
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<()> {
        self.call(|reply| Request::Write(WriteOp::LeaseRevoke(lease), Reply::Unit(reply)))
            .await
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        self.call(|reply| Request::Write(WriteOp::Compact(revision), Reply::Unit(reply)))
            .await
    }
}
