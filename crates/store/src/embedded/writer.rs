//! The single writer: group commit, lease deadlines, history retention.
//!
//! One OS thread owns the redb write path. It takes every request queued at
//! the moment it wakes, applies them in arrival order inside ONE write
//! transaction (each request still gets its own revision and its own
//! compare/branch evaluation, so the outcome is the same as applying them one
//! by one), commits once — one fsync for the whole group — then publishes the
//! events and answers the callers. A thread rather than a tokio task because
//! a commit blocks on `fsync`.
//!
//! Lease deadlines live here, in memory, and nowhere else: only expiry and
//! keep-alive need them, and both are decided by this thread.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use redb::{Database, ReadableTable, Table, TableDefinition, WriteTransaction};
use tokio::sync::{broadcast, oneshot};

use super::codec::{self, Corrupt, Row};
use crate::{
    Compare, KeyValue, LeaseId, Op, Result, Revision, StoreError, Txn, TxnResult, WatchBatch,
    WatchEvent,
};

/// key → `codec::encode_kv` row.
pub(super) const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// `META_*` → value.
pub(super) const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
/// revision → `codec::encode_events` of that revision.
pub(super) const HISTORY: TableDefinition<i64, &[u8]> = TableDefinition::new("history");
/// lease id → TTL in milliseconds.
pub(super) const LEASES: TableDefinition<i64, u64> = TableDefinition::new("leases");
/// (lease id, key) for every key attached to a lease, so expiry finds them
/// without scanning `kv`.
pub(super) const LEASE_KEYS: TableDefinition<(i64, &str), ()> = TableDefinition::new("lease_keys");

/// Current revision.
pub(super) const META_REVISION: &str = "revision";
/// Oldest revision whose history is still kept.
pub(super) const META_COMPACT: &str = "compact_revision";
/// Next lease id to hand out.
pub(super) const META_NEXT_LEASE: &str = "next_lease";

/// Events of one revision.
#[derive(Debug)]
pub(super) struct RevisionEvents {
    pub(super) revision: Revision,
    pub(super) events: WatchBatch,
}

/// What one group commit published, in revision order.
pub(super) type Committed = Arc<Vec<RevisionEvents>>;

/// The live-event channel. The one sender lives here, shared by the handles
/// (to subscribe) and the writer (to publish); whoever stops the store shuts
/// it, which ends every open watch — whether the writer stopped because it
/// was closed, because every handle was dropped, or because it failed.
#[derive(Debug)]
pub(super) struct Hub {
    sender: Mutex<Option<broadcast::Sender<Committed>>>,
}

impl Hub {
    pub(super) fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        Self {
            sender: Mutex::new(Some(sender)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<broadcast::Sender<Committed>>> {
        // Poisoning only means a panic elsewhere while holding the lock; the
        // Option inside is still meaningful.
        self.sender.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A receiver of everything published from now on, or None once shut.
    pub(super) fn subscribe(&self) -> Option<broadcast::Receiver<Committed>> {
        self.lock().as_ref().map(broadcast::Sender::subscribe)
    }

    fn publish(&self, committed: Committed) {
        if let Some(sender) = self.lock().as_ref() {
            // No receiver (no watch open) is fine.
            let _ = sender.send(committed);
        }
    }

    pub(super) fn shut(&self) {
        drop(self.lock().take());
    }
}

/// Whether the store still works, shared by handles, watches and the writer.
#[derive(Debug, Default)]
pub(super) struct Status {
    failure: OnceLock<String>,
    closed: AtomicBool,
}

impl Status {
    pub(super) fn fail(&self, message: String) {
        tracing::error!(error = %message, "embedded store writer failed; every later call returns this error");
        let _ = self.failure.set(message);
    }

    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Ok while the store is usable.
    pub(super) fn check(&self) -> Result<()> {
        if let Some(message) = self.failure.get() {
            return Err(StoreError::Backend(message.clone()));
        }
        if self.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Closed);
        }
        Ok(())
    }

    /// The error to report once the writer is gone.
    pub(super) fn error(&self) -> StoreError {
        match self.check() {
            Err(e) => e,
            // Gone without failing or being closed: it panicked (logged).
            Ok(()) => StoreError::Backend("the store's writer thread stopped unexpectedly".into()),
        }
    }
}

/// A request to the writer.
pub(super) enum Request {
    /// Anything that writes to the file.
    Write(WriteOp, Reply),
    /// Refresh a lease's in-memory deadline; never touches the file.
    KeepAlive(LeaseId, oneshot::Sender<Result<()>>),
    /// Finish what is queued before this, then stop.
    Close(oneshot::Sender<()>),
}

/// A write.
pub(super) enum WriteOp {
    Txn(Txn),
    LeaseGrant(Duration),
    LeaseRevoke(LeaseId),
    Compact(Revision),
}

/// Where the answer to a write goes.
pub(super) enum Reply {
    Txn(oneshot::Sender<Result<TxnResult>>),
    Lease(oneshot::Sender<Result<LeaseId>>),
    Unit(oneshot::Sender<Result<()>>),
}

enum Outcome {
    Txn(Result<TxnResult>),
    Lease(Result<LeaseId>),
    Unit(Result<()>),
}

impl Reply {
    fn send(self, outcome: Outcome) {
        // A caller that stopped waiting (dropped future) is not an error.
        match (self, outcome) {
            (Reply::Txn(tx), Outcome::Txn(r)) => drop(tx.send(r)),
            (Reply::Lease(tx), Outcome::Lease(r)) => drop(tx.send(r)),
            (Reply::Unit(tx), Outcome::Unit(r)) => drop(tx.send(r)),
            _ => tracing::error!(
                "embedded store: reply of the wrong kind (bug); caller sees an error"
            ),
        }
    }
}

/// An error after which the write transaction cannot be trusted: the writer
/// stops and the store reports [`StoreError::Backend`] from then on.
#[derive(Debug)]
pub(super) struct Fatal(pub(super) String);

macro_rules! fatal_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Fatal {
            fn from(e: $t) -> Self {
                Fatal(e.to_string())
            }
        }
    )*};
}
fatal_from!(
    redb::Error,
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError
);

impl From<Corrupt> for Fatal {
    fn from(e: Corrupt) -> Self {
        Fatal(format!("corrupt store: {}", e.0))
    }
}

/// Tunables of the writer.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) history_retention: u64,
    pub(super) max_batch: usize,
}

struct LiveLease {
    ttl: Duration,
    deadline: Instant,
}

/// Counters read at open.
pub(super) struct Persisted {
    pub(super) revision: Revision,
    pub(super) compact_revision: Revision,
    pub(super) next_lease: LeaseId,
    pub(super) leases: Vec<(LeaseId, u64)>,
}

pub(super) struct Writer {
    db: Arc<Database>,
    requests: Receiver<Request>,
    hub: Arc<Hub>,
    status: Arc<Status>,
    limits: Limits,
    revision: Revision,
    compact_revision: Revision,
    next_lease: LeaseId,
    leases: HashMap<LeaseId, LiveLease>,
}

struct Tables<'t> {
    kv: Table<'t, &'static str, &'static [u8]>,
    meta: Table<'t, &'static str, i64>,
    history: Table<'t, i64, &'static [u8]>,
    leases: Table<'t, i64, u64>,
    lease_keys: Table<'t, (i64, &'static str), ()>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, Fatal> {
        Ok(Self {
            kv: txn.open_table(KV)?,
            meta: txn.open_table(META)?,
            history: txn.open_table(HISTORY)?,
            leases: txn.open_table(LEASES)?,
            lease_keys: txn.open_table(LEASE_KEYS)?,
        })
    }

    fn row(&self, key: &str) -> Result<Option<Row>, Fatal> {
        match self.kv.get(key)? {
            None => Ok(None),
            Some(guard) => Ok(Some(codec::decode_row(key, guard.value())?)),
        }
    }
}

/// Create the tables and counters of a new file, or read those of an
/// existing one.
pub(super) fn init(db: &Database) -> Result<Persisted, Fatal> {
    let txn = db.begin_write()?;
    let persisted = {
        let mut t = Tables::open(&txn)?;
        let revision = t.meta.get(META_REVISION)?.map(|g| g.value());
        let (revision, compact_revision, next_lease) = match revision {
            Some(revision) => {
                let compact = t.meta.get(META_COMPACT)?.map(|g| g.value()).unwrap_or(1);
                let next_lease = t.meta.get(META_NEXT_LEASE)?.map(|g| g.value()).unwrap_or(1);
                (revision, compact, next_lease)
            }
            None => {
                // etcd starts at revision 1 with nothing in it.
                t.meta.insert(META_REVISION, 1)?;
                t.meta.insert(META_COMPACT, 1)?;
                t.meta.insert(META_NEXT_LEASE, 1)?;
                (1, 1, 1)
            }
        };
        let mut leases = Vec::new();
        for entry in t.leases.iter()? {
            let (id, ttl) = entry?;
            leases.push((id.value(), ttl.value()));
        }
        Persisted {
            revision,
            compact_revision,
            next_lease,
            leases,
        }
    };
    txn.commit()?;
    Ok(persisted)
}

fn deadline(now: Instant, ttl: Duration) -> Instant {
    now.checked_add(ttl)
        .unwrap_or_else(|| now + Duration::from_secs(u64::from(u32::MAX)))
}

impl Writer {
    pub(super) fn new(
        db: Arc<Database>,
        requests: Receiver<Request>,
        hub: Arc<Hub>,
        status: Arc<Status>,
        limits: Limits,
        persisted: Persisted,
    ) -> Self {
        let now = Instant::now();
        // Deadlines are not persisted: like etcd after a leader change, every
        // lease that survived a restart gets its full TTL again.
        let leases = persisted
            .leases
            .into_iter()
            .map(|(id, ttl_ms)| {
                let ttl = Duration::from_millis(ttl_ms);
                (
                    id,
                    LiveLease {
                        ttl,
                        deadline: deadline(now, ttl),
                    },
                )
            })
            .collect();
        Self {
            db,
            requests,
            hub,
            status,
            limits,
            revision: persisted.revision,
            compact_revision: persisted.compact_revision,
            next_lease: persisted.next_lease,
            leases,
        }
    }

    /// The thread's body: returns when every handle is gone, on `Close`, or
    /// on a fatal error (recorded in [`Status`]).
    pub(super) fn run(mut self) {
        let closing = self.serve();
        let Writer {
            db, requests, hub, ..
        } = self;
        // Queued requests are answered (with an error) by dropping them; the
        // file is released before `close()` returns.
        drop(requests);
        hub.shut();
        drop(db);
        if let Some(reply) = closing {
            let _ = reply.send(());
        }
    }

    fn serve(&mut self) -> Option<oneshot::Sender<()>> {
        loop {
            let first = match self.next_deadline() {
                Some(at) => self
                    .requests
                    .recv_timeout(at.saturating_duration_since(Instant::now())),
                None => self
                    .requests
                    .recv()
                    .map_err(|_| RecvTimeoutError::Disconnected),
            };
            let mut batch = Vec::new();
            let mut closing = None;
            match first {
                Ok(Request::Close(reply)) => closing = Some(reply),
                Ok(request) => batch.push(request),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return None,
            }
            while closing.is_none() && batch.len() < self.limits.max_batch {
                match self.requests.try_recv() {
                    Ok(Request::Close(reply)) => closing = Some(reply),
                    Ok(request) => batch.push(request),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            if !self.process(batch) || closing.is_some() {
                return closing;
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.leases.values().map(|l| l.deadline).min()
    }

    /// Apply one group; false once the writer must stop.
    fn process(&mut self, batch: Vec<Request>) -> bool {
        let now = Instant::now();
        let mut writes = Vec::with_capacity(batch.len());
        for request in batch {
            match request {
                Request::Write(op, reply) => writes.push((op, reply)),
                Request::KeepAlive(id, reply) => {
                    let outcome = match self.leases.get_mut(&id) {
                        Some(lease) => {
                            lease.deadline = deadline(now, lease.ttl);
                            Ok(())
                        }
                        None => Err(StoreError::LeaseNotFound(id)),
                    };
                    let _ = reply.send(outcome);
                }
                // `serve` never puts Close in a batch.
                Request::Close(reply) => drop(reply),
            }
        }
        let expired: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, lease)| lease.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        if writes.is_empty() && expired.is_empty() {
            return true;
        }
        let mut committed = Vec::new();
        match self.commit_group(&writes, &expired, &mut committed) {
            Ok(outcomes) => {
                if !committed.is_empty() {
                    self.hub.publish(Arc::new(committed));
                }
                for ((_, reply), outcome) in writes.into_iter().zip(outcomes) {
                    reply.send(outcome);
                }
                true
            }
            Err(Fatal(message)) => {
                // Set before the replies are dropped so callers read it.
                self.status.fail(message);
                false
            }
        }
    }

    fn commit_group(
        &mut self,
        writes: &[(WriteOp, Reply)],
        expired: &[LeaseId],
        committed: &mut Vec<RevisionEvents>,
    ) -> Result<Vec<Outcome>, Fatal> {
        let txn = self.db.begin_write()?;
        let mut outcomes = Vec::with_capacity(writes.len());
        {
            let mut t = Tables::open(&txn)?;
            for (op, _) in writes {
                let outcome = match op {
                    WriteOp::Txn(txn) => Outcome::Txn(self.apply_txn(&mut t, txn, committed)?),
                    WriteOp::LeaseGrant(ttl) => Outcome::Lease(Ok(self.grant(&mut t, *ttl)?)),
                    WriteOp::LeaseRevoke(id) => Outcome::Unit(self.revoke(&mut t, *id, committed)?),
                    WriteOp::Compact(revision) => {
                        self.compact(&mut t, *revision)?;
                        Outcome::Unit(Ok(()))
                    }
                };
                outcomes.push(outcome);
            }
            for id in expired {
                // A keep-alive or revoke in this very group may have won.
                let still_expired = self
                    .leases
                    .get(id)
                    .is_some_and(|lease| lease.deadline <= Instant::now());
                if still_expired {
                    tracing::debug!(lease = id, "lease expired");
                    let _ = self.revoke(&mut t, *id, committed)?;
                }
            }
            self.retain_history(&mut t)?;
            t.meta.insert(META_REVISION, self.revision)?;
            t.meta.insert(META_COMPACT, self.compact_revision)?;
            t.meta.insert(META_NEXT_LEASE, self.next_lease)?;
        }
        txn.commit()?;
        Ok(outcomes)
    }

    fn apply_txn(
        &mut self,
        t: &mut Tables<'_>,
        txn: &Txn,
        committed: &mut Vec<RevisionEvents>,
    ) -> Result<Result<TxnResult>, Fatal> {
        let mut succeeded = true;
        for compare in &txn.compare {
            match compare {
                Compare::ModRevision(key, expected) => {
                    let actual = t.row(key)?.map_or(0, |row| row.mod_revision);
                    if actual != *expected {
                        succeeded = false;
                        break;
                    }
                }
            }
        }
        let ops = if succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        // Validate before touching anything: a txn is all or nothing.
        for op in ops {
            if let Op::Put { lease, .. } = op
                && *lease != 0
                && !self.leases.contains_key(lease)
            {
                return Ok(Err(StoreError::LeaseNotFound(*lease)));
            }
        }
        let revision = self.revision + 1;
        let mut events = Vec::new();
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    let previous = t.row(key)?;
                    let (create_revision, version, old_lease) = match previous {
                        Some(p) => (p.create_revision, p.version + 1, p.lease),
                        None => (revision, 1, 0),
                    };
                    if old_lease != *lease {
                        if old_lease != 0 {
                            t.lease_keys.remove((old_lease, key.as_str()))?;
                        }
                        if *lease != 0 {
                            t.lease_keys.insert((*lease, key.as_str()), ())?;
                        }
                    }
                    let row = Row {
                        create_revision,
                        mod_revision: revision,
                        version,
                        lease: *lease,
                    };
                    t.kv.insert(key.as_str(), codec::encode_kv(row, value).as_slice())?;
                    events.push(WatchEvent::Put(KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision,
                        mod_revision: revision,
                        version,
                        lease: *lease,
                    }));
                }
                Op::Delete(key) => delete_key(t, key, revision, &mut events)?,
                Op::DeletePrefix(prefix) => {
                    let mut keys = Vec::new();
                    for entry in t.kv.range::<&str>(prefix.as_str()..)? {
                        let (key, _) = entry?;
                        if !key.value().starts_with(prefix.as_str()) {
                            break;
                        }
                        keys.push(key.value().to_owned());
                    }
                    for key in keys {
                        delete_key(t, &key, revision, &mut events)?;
                    }
                }
            }
        }
        self.finish_revision(t, revision, events, committed)?;
        Ok(Ok(TxnResult {
            succeeded,
            revision: self.revision,
        }))
    }

    /// Record a revision's events, if it has any (a write that changes
    /// nothing, like deleting an absent key, does not create a revision).
    fn finish_revision(
        &mut self,
        t: &mut Tables<'_>,
        revision: Revision,
        events: WatchBatch,
        committed: &mut Vec<RevisionEvents>,
    ) -> Result<(), Fatal> {
        if events.is_empty() {
            return Ok(());
        }
        t.history
            .insert(revision, codec::encode_events(&events).as_slice())?;
        self.revision = revision;
        committed.push(RevisionEvents { revision, events });
        Ok(())
    }

    fn grant(&mut self, t: &mut Tables<'_>, ttl: Duration) -> Result<LeaseId, Fatal> {
        let id = self.next_lease;
        self.next_lease += 1;
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        t.leases.insert(id, ttl_ms)?;
        let ttl = Duration::from_millis(ttl_ms);
        self.leases.insert(
            id,
            LiveLease {
                ttl,
                deadline: deadline(Instant::now(), ttl),
            },
        );
        Ok(id)
    }

    fn revoke(
        &mut self,
        t: &mut Tables<'_>,
        id: LeaseId,
        committed: &mut Vec<RevisionEvents>,
    ) -> Result<Result<()>, Fatal> {
        if self.leases.remove(&id).is_none() {
            return Ok(Err(StoreError::LeaseNotFound(id)));
        }
        let mut keys = Vec::new();
        for entry in t.lease_keys.range((id, "")..(id + 1, ""))? {
            let (key, _) = entry?;
            keys.push(key.value().1.to_owned());
        }
        let revision = self.revision + 1;
        let mut events = Vec::new();
        for key in &keys {
            // `lease_keys` mirrors `kv`; check anyway rather than delete a
            // key that moved to another lease.
            if t.row(key)?.is_some_and(|row| row.lease == id) {
                delete_key(t, key, revision, &mut events)?;
            } else {
                t.lease_keys.remove((id, key.as_str()))?;
            }
        }
        t.leases.remove(id)?;
        self.finish_revision(t, revision, events, committed)?;
        Ok(Ok(()))
    }

    fn compact(&mut self, t: &mut Tables<'_>, revision: Revision) -> Result<(), Fatal> {
        // etcd refuses to compact the future; keeping the current revision
        // means a watch "from now" is never compacted.
        let revision = revision.min(self.revision);
        if revision <= self.compact_revision {
            return Ok(());
        }
        t.history.retain_in::<i64, _>(..revision, |_, _| false)?;
        self.compact_revision = revision;
        Ok(())
    }

    /// Keep at most `history_retention` revisions of history, trimming in
    /// steps of a tenth so that it is not done on every write.
    fn retain_history(&mut self, t: &mut Tables<'_>) -> Result<(), Fatal> {
        let keep = i64::try_from(self.limits.history_retention.max(1)).unwrap_or(i64::MAX);
        let slack = (keep / 10).max(1);
        let kept = self.revision - self.compact_revision + 1;
        if kept > keep.saturating_add(slack) {
            self.compact(t, self.revision - keep + 1)?;
        }
        Ok(())
    }
}

fn delete_key(
    t: &mut Tables<'_>,
    key: &str,
    revision: Revision,
    events: &mut WatchBatch,
) -> Result<(), Fatal> {
    let removed = match t.kv.remove(key)? {
        None => return Ok(()),
        Some(guard) => codec::decode_row(key, guard.value())?,
    };
    if removed.lease != 0 {
        t.lease_keys.remove((removed.lease, key))?;
    }
    events.push(WatchEvent::Delete {
        key: key.to_owned(),
        mod_revision: revision,
    });
    Ok(())
}
