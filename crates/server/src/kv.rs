//! The user KV store, sessions and locks, with Consul's semantics, over the
//! [`Store`] — independent of HTTP (the handlers in [`crate::api::kv`] and
//! [`crate::api::consul`] are thin).
//!
//! KV is user data, not desired state: it is written here directly with
//! transactions, not through [`crate::desired`].
//!
//! # Mapping onto the store
//! - A key `k` of namespace `ns` is the store key `/berth/kv/<ns>/<k>`; its
//!   value is a small JSON record ([`Stored`]) holding the user's bytes
//!   (base64), Consul's `Flags`, `LockIndex` and the lock-holding `Session`.
//! - `CreateIndex`/`ModifyIndex` are the store's `create_revision` and
//!   `mod_revision`; indexes of results (`X-Consul-Index`) are store
//!   revisions, so a blocking query is a store watch from `index + 1`.
//! - Compare-and-swap (`?cas=N`) is a transaction comparing `mod_revision`.
//! - A session is `/berth/sessions/<id>`; a session with a TTL lives on a
//!   store lease of that TTL, so it expires by itself unless renewed.
//! - A lock is a key whose record names a session. Acquiring compares both
//!   the key's and the session's `mod_revision`, so a lock is never granted
//!   to a session that vanished in between. When a session ends (destroyed,
//!   or its lease expired) its locks are released — or the keys deleted,
//!   for `Behavior: delete` — by [`invalidate`], which [`destroy_session`]
//!   calls directly and [`reap_sessions`] calls for expired ones. Until the
//!   reaper has run, a lock held by a vanished session already reads as free
//!   ([`get`] and [`acquire`] check the session exists).
//!
//! Not implemented: Consul's lock-delay after an invalidation (locks are
//! free again at once), and sessions tied to node or service health checks.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use berth_model::keys;
use berth_store::{Compare, KeyValue, Op, Revision, Store, StoreError, Txn, WatchEvent};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Largest value accepted, as in Consul (512 KiB).
pub const MAX_VALUE: usize = 512 * 1024;

/// How often a contended lock or CAS-free write is retried before giving up
/// with [`KvError::Conflict`].
const RETRIES: usize = 32;

/// What KV and session operations fail with.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The key is empty or has a shape the store cannot hold.
    #[error("invalid key {key:?}: {reason}")]
    BadKey {
        /// The key given.
        key: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The value is larger than [`MAX_VALUE`].
    #[error("value of {size} bytes exceeds the {MAX_VALUE} byte limit")]
    TooLarge {
        /// Size of the value given.
        size: usize,
    },
    /// The session named does not exist (never did, destroyed, or expired).
    #[error("session {0:?} not found (destroyed or expired)")]
    SessionNotFound(String),
    /// A session's parameters are out of range.
    #[error("invalid session: {0}")]
    BadSession(String),
    /// The key kept changing under a read-modify-write; retry.
    #[error("key {0:?} kept changing under the request; retry")]
    Conflict(String),
}

/// Result alias.
pub type Result<T, E = KvError> = std::result::Result<T, E>;

/// One KV pair as clients see it (Consul's fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    /// The key, without namespace.
    pub key: String,
    /// The value.
    pub value: Bytes,
    /// Opaque user flags.
    pub flags: u64,
    /// Revision that created the key.
    pub create_index: Revision,
    /// Revision of the last write.
    pub modify_index: Revision,
    /// How many times the key has been acquired as a lock.
    pub lock_index: u64,
    /// The session holding the lock, if held.
    pub session: Option<String>,
}

/// The record stored for one key.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Stored {
    /// The user's bytes, base64 (JSON cannot carry bytes).
    #[serde(default)]
    v: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    flags: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    lock_index: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    session: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Stored {
    fn decode(kv: &KeyValue) -> Result<Self> {
        let s: Stored = berth_store::decode(kv)?;
        Ok(s)
    }

    fn encode(&self, key: &str) -> Result<Bytes> {
        Ok(berth_store::encode(key, self)?)
    }

    fn bytes(&self, key: &str) -> Result<Bytes> {
        B64.decode(&self.v).map(Bytes::from).map_err(|e| {
            KvError::Store(StoreError::Codec {
                key: key.to_owned(),
                message: e.to_string(),
            })
        })
    }
}

/// Check a user key: not empty (for writes), no NUL, and not so long that
/// it cannot be a store key.
pub fn check_key(key: &str, allow_empty: bool) -> Result<()> {
    let bad = |reason| KvError::BadKey {
        key: key.to_owned(),
        reason,
    };
    if key.is_empty() && !allow_empty {
        return Err(bad("a key name is required"));
    }
    if key.contains('\0') {
        return Err(bad("keys cannot contain NUL"));
    }
    if key.len() > 4096 {
        return Err(bad("keys are at most 4096 bytes"));
    }
    Ok(())
}

fn pair(ns: &str, kv: &KeyValue, live: &dyn Fn(&str) -> bool) -> Result<Pair> {
    let prefix = keys::kv_in(ns);
    let key = kv.key.strip_prefix(&prefix).unwrap_or(&kv.key).to_owned();
    let stored = Stored::decode(kv)?;
    let value = stored.bytes(&kv.key)?;
    Ok(Pair {
        key,
        value,
        flags: stored.flags,
        create_index: kv.create_revision,
        modify_index: kv.mod_revision,
        lock_index: stored.lock_index,
        session: stored.session.filter(|s| live(s)),
    })
}

/// A stored key as a [`Pair`], its lock as recorded (whether or not the
/// session still exists) — for event streams, which show writes as made.
pub fn pair_of(ns: &str, kv: &KeyValue) -> Result<Pair> {
    pair(ns, kv, &|_| true)
}

/// Ids of the sessions that exist now.
async fn live_sessions(store: &dyn Store) -> Result<std::collections::HashSet<String>> {
    let (kvs, _) = store.range(keys::SESSIONS).await?;
    Ok(kvs
        .into_iter()
        .filter_map(|kv| kv.key.strip_prefix(keys::SESSIONS).map(str::to_owned))
        .collect())
}

/// One key and the store revision the read is consistent with.
pub async fn get(store: &dyn Store, ns: &str, key: &str) -> Result<(Option<Pair>, Revision)> {
    check_key(key, false)?;
    let full = keys::kv(ns, key);
    let (kvs, rev) = store.range(&full).await?;
    let Some(kv) = kvs.into_iter().find(|kv| kv.key == full) else {
        return Ok((None, rev));
    };
    let live = live_sessions(store).await?;
    Ok((Some(pair(ns, &kv, &|s| live.contains(s))?), rev))
}

/// Every key starting with `prefix` (sorted), and the revision.
pub async fn list(store: &dyn Store, ns: &str, prefix: &str) -> Result<(Vec<Pair>, Revision)> {
    check_key(prefix, true)?;
    let (kvs, rev) = store.range(&keys::kv(ns, prefix)).await?;
    let live = live_sessions(store).await?;
    let pairs = kvs
        .iter()
        .map(|kv| pair(ns, kv, &|s| live.contains(s)))
        .collect::<Result<_>>()?;
    Ok((pairs, rev))
}

/// Keys under `prefix`; with a `separator`, keys are cut after the first
/// separator following the prefix and deduplicated (Consul's `?keys&separator=`:
/// one level of a hierarchy, "folders" ending in the separator).
pub fn key_names(pairs: &[Pair], prefix: &str, separator: Option<&str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for p in pairs {
        let name = match separator.filter(|s| !s.is_empty()) {
            Some(sep) => {
                let rest = &p.key[prefix.len().min(p.key.len())..];
                match rest.find(sep) {
                    Some(i) => p.key[..prefix.len() + i + sep.len()].to_owned(),
                    None => p.key.clone(),
                }
            }
            None => p.key.clone(),
        };
        if out.last() != Some(&name) {
            out.push(name);
        }
    }
    out
}

/// Options of a write.
#[derive(Debug, Clone, Copy, Default)]
pub struct PutOptions {
    /// Flags to store (kept from the existing entry when `None`).
    pub flags: Option<u64>,
    /// Write only if the key's `ModifyIndex` is this (0: only if absent).
    pub cas: Option<Revision>,
}

/// Write a value. Returns false when a `cas` did not match. A lock on the
/// key is kept (as in Consul: a plain write does not release it).
pub async fn put(
    store: &dyn Store,
    ns: &str,
    key: &str,
    value: &[u8],
    opts: PutOptions,
) -> Result<bool> {
    check_key(key, false)?;
    if value.len() > MAX_VALUE {
        return Err(KvError::TooLarge { size: value.len() });
    }
    let full = keys::kv(ns, key);
    for _ in 0..RETRIES {
        let existing = store.get(&full).await?;
        let observed = existing.as_ref().map_or(0, |kv| kv.mod_revision);
        if let Some(cas) = opts.cas
            && cas != observed
        {
            return Ok(false);
        }
        let mut record = match &existing {
            Some(kv) => Stored::decode(kv).unwrap_or_default(),
            None => Stored::default(),
        };
        record.v = B64.encode(value);
        if let Some(f) = opts.flags {
            record.flags = f;
        }
        let res = store
            .txn(Txn {
                compare: vec![Compare::ModRevision(full.clone(), observed)],
                success: vec![Op::put(full.clone(), record.encode(&full)?)],
                failure: vec![],
            })
            .await?;
        if res.succeeded {
            return Ok(true);
        }
        if opts.cas.is_some() {
            return Ok(false);
        }
    }
    Err(KvError::Conflict(key.to_owned()))
}

/// Delete a key (or, with `recurse`, every key under the prefix). With
/// `cas`, only if the key's `ModifyIndex` matches; returns whether it did.
pub async fn delete(
    store: &dyn Store,
    ns: &str,
    key: &str,
    recurse: bool,
    cas: Option<Revision>,
) -> Result<bool> {
    check_key(key, recurse)?;
    let full = keys::kv(ns, key);
    if recurse {
        store
            .txn(Txn {
                success: vec![Op::DeletePrefix(full)],
                ..Default::default()
            })
            .await?;
        return Ok(true);
    }
    let compare = match cas {
        Some(rev) => vec![Compare::ModRevision(full.clone(), rev)],
        None => vec![],
    };
    let res = store
        .txn(Txn {
            compare,
            success: vec![Op::Delete(full)],
            failure: vec![],
        })
        .await?;
    Ok(res.succeeded)
}

/// Take the lock on `key` for `session`, writing `value`. Returns false when
/// another live session holds it. Acquiring a lock already held by the same
/// session updates the value and keeps the `LockIndex`.
pub async fn acquire(
    store: &dyn Store,
    ns: &str,
    key: &str,
    value: &[u8],
    flags: Option<u64>,
    session: &str,
) -> Result<bool> {
    check_key(key, false)?;
    if value.len() > MAX_VALUE {
        return Err(KvError::TooLarge { size: value.len() });
    }
    let full = keys::kv(ns, key);
    let skey = keys::session(session);
    for _ in 0..RETRIES {
        let Some(s) = store.get(&skey).await? else {
            return Err(KvError::SessionNotFound(session.to_owned()));
        };
        let existing = store.get(&full).await?;
        let observed = existing.as_ref().map_or(0, |kv| kv.mod_revision);
        let mut record = match &existing {
            Some(kv) => Stored::decode(kv).unwrap_or_default(),
            None => Stored::default(),
        };
        match record.session.as_deref() {
            Some(holder) if holder == session => {}
            Some(holder) if store.get(&keys::session(holder)).await?.is_some() => {
                return Ok(false);
            }
            _ => {
                record.lock_index += 1;
                record.session = Some(session.to_owned());
            }
        }
        record.v = B64.encode(value);
        if let Some(f) = flags {
            record.flags = f;
        }
        let res = store
            .txn(Txn {
                compare: vec![
                    Compare::ModRevision(full.clone(), observed),
                    Compare::ModRevision(skey.clone(), s.mod_revision),
                ],
                success: vec![Op::put(full.clone(), record.encode(&full)?)],
                failure: vec![],
            })
            .await?;
        if res.succeeded {
            return Ok(true);
        }
    }
    Err(KvError::Conflict(key.to_owned()))
}

/// Release `session`'s lock on `key`, writing `value`. Returns false when
/// the session does not hold it.
pub async fn release(
    store: &dyn Store,
    ns: &str,
    key: &str,
    value: &[u8],
    flags: Option<u64>,
    session: &str,
) -> Result<bool> {
    check_key(key, false)?;
    if value.len() > MAX_VALUE {
        return Err(KvError::TooLarge { size: value.len() });
    }
    let full = keys::kv(ns, key);
    for _ in 0..RETRIES {
        let Some(existing) = store.get(&full).await? else {
            return Ok(false);
        };
        let mut record = Stored::decode(&existing)?;
        if record.session.as_deref() != Some(session) {
            return Ok(false);
        }
        record.session = None;
        record.v = B64.encode(value);
        if let Some(f) = flags {
            record.flags = f;
        }
        let res = store
            .txn(Txn {
                compare: vec![Compare::ModRevision(full.clone(), existing.mod_revision)],
                success: vec![Op::put(full.clone(), record.encode(&full)?)],
                failure: vec![],
            })
            .await?;
        if res.succeeded {
            return Ok(true);
        }
    }
    Err(KvError::Conflict(key.to_owned()))
}

/// Wait until a key under `prefix` for which `relevant` holds changes after
/// revision `after`, or `timeout` passes. Returns whether it changed.
///
/// A watch from `after + 1`, not a polling loop. If that history was
/// compacted, it answers "changed" at once: the caller re-reads, and a
/// spurious wake-up is allowed by Consul's blocking-query contract.
pub async fn wait_for_change(
    store: &dyn Store,
    prefix: &str,
    relevant: impl Fn(&str) -> bool,
    after: Revision,
    timeout: Duration,
) -> Result<bool> {
    let mut events = match store.watch(prefix, after + 1).await {
        Ok(w) => w,
        Err(StoreError::Compacted { .. }) => return Ok(true),
        Err(e) => return Err(e.into()),
    };
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            batch = events.next() => match batch {
                Some(Ok(batch)) => {
                    if batch.iter().any(|e| e.revision() > after && relevant(e.key())) {
                        return Ok(true);
                    }
                }
                Some(Err(StoreError::Compacted { .. })) => return Ok(true),
                Some(Err(e)) => return Err(e.into()),
                None => return Err(StoreError::Closed.into()),
            },
            _ = &mut deadline => return Ok(false),
        }
    }
}

/// What happens to a session's locks when it ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Behavior {
    /// The locks are released; the keys stay.
    #[default]
    Release,
    /// The locked keys are deleted.
    Delete,
}

/// A session as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Its id (a UUID).
    pub id: String,
    /// A name for humans.
    #[serde(default)]
    pub name: String,
    /// The node that created it.
    pub node: String,
    /// TTL in seconds (0: none; the session lives until destroyed).
    #[serde(default)]
    pub ttl_secs: u64,
    /// What happens to its locks when it ends.
    #[serde(default)]
    pub behavior: Behavior,
    /// The lock delay asked for, in nanoseconds (recorded and reported;
    /// not enforced).
    #[serde(default)]
    pub lock_delay_ns: u64,
    /// The store lease it lives on (0 without TTL).
    #[serde(default)]
    pub lease: i64,
}

/// A session and its store indexes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// The session.
    pub session: Session,
    /// Revision it was created at.
    pub create_index: Revision,
    /// Revision it was last written at.
    pub modify_index: Revision,
}

/// What a client asks for when creating a session.
#[derive(Debug, Clone, Default)]
pub struct SessionRequest {
    /// A name for humans.
    pub name: String,
    /// Time to live; `None` for a session that lives until destroyed.
    pub ttl: Option<Duration>,
    /// What happens to its locks when it ends.
    pub behavior: Behavior,
    /// Consul's lock delay (recorded, not enforced).
    pub lock_delay: Duration,
}

/// Shortest and longest TTL, as in Consul.
pub const TTL_RANGE: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(86_400));

/// A random UUID (version 4), from the kernel's generator.
pub fn new_uuid() -> Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| StoreError::Backend(format!("reading /dev/urandom: {e}")))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// Create a session owned by `node`. The TTL is not range-checked here (the
/// HTTP layer applies Consul's 10s–24h range; tests use shorter ones).
pub async fn create_session(
    store: &dyn Store,
    node: &str,
    req: SessionRequest,
) -> Result<SessionInfo> {
    let id = new_uuid()?;
    let lease = match req.ttl {
        Some(ttl) if !ttl.is_zero() => store.lease_grant(ttl).await?,
        _ => 0,
    };
    let session = Session {
        id: id.clone(),
        name: req.name,
        node: node.to_owned(),
        ttl_secs: req.ttl.map_or(0, |t| t.as_secs().max(1)),
        behavior: req.behavior,
        lock_delay_ns: req.lock_delay.as_nanos().min(u64::MAX as u128) as u64,
        lease,
    };
    let key = keys::session(&id);
    let rev = store
        .put(&key, berth_store::encode(&key, &session)?, lease)
        .await?;
    Ok(SessionInfo {
        session,
        create_index: rev,
        modify_index: rev,
    })
}

fn session_info(kv: &KeyValue) -> Result<SessionInfo> {
    Ok(SessionInfo {
        session: berth_store::decode(kv)?,
        create_index: kv.create_revision,
        modify_index: kv.mod_revision,
    })
}

/// One session, if it exists, and the revision of the read.
pub async fn session(store: &dyn Store, id: &str) -> Result<(Option<SessionInfo>, Revision)> {
    let key = keys::session(id);
    let (kvs, rev) = store.range(&key).await?;
    match kvs.iter().find(|kv| kv.key == key) {
        Some(kv) => Ok((Some(session_info(kv)?), rev)),
        None => Ok((None, rev)),
    }
}

/// Every session, and the revision of the read.
pub async fn sessions(store: &dyn Store) -> Result<(Vec<SessionInfo>, Revision)> {
    let (kvs, rev) = store.range(keys::SESSIONS).await?;
    Ok((kvs.iter().map(session_info).collect::<Result<_>>()?, rev))
}

/// Push a session's expiry back by its TTL.
pub async fn renew_session(store: &dyn Store, id: &str) -> Result<SessionInfo> {
    let (Some(info), _) = session(store, id).await? else {
        return Err(KvError::SessionNotFound(id.to_owned()));
    };
    if info.session.lease != 0 {
        match store.lease_keep_alive(info.session.lease).await {
            Ok(()) => {}
            Err(StoreError::LeaseNotFound(_)) => {
                return Err(KvError::SessionNotFound(id.to_owned()));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(info)
}

/// End a session now and release (or delete) its locks.
pub async fn destroy_session(store: &dyn Store, id: &str) -> Result<()> {
    let (info, _) = session(store, id).await?;
    let behavior = info
        .as_ref()
        .map_or(Behavior::Release, |i| i.session.behavior);
    match info.map(|i| i.session.lease) {
        Some(lease) if lease != 0 => match store.lease_revoke(lease).await {
            Ok(()) | Err(StoreError::LeaseNotFound(_)) => {}
            Err(e) => return Err(e.into()),
        },
        _ => {}
    }
    store.delete(&keys::session(id)).await?;
    invalidate(store, id, behavior).await
}

/// Release (or delete, per `behavior`) every key locked by `session`, in
/// every namespace. Safe to repeat.
pub async fn invalidate(store: &dyn Store, session: &str, behavior: Behavior) -> Result<()> {
    let (kvs, _) = store.range(keys::KV).await?;
    for kv in kvs {
        let Ok(record) = Stored::decode(&kv) else {
            continue;
        };
        if record.session.as_deref() != Some(session) {
            continue;
        }
        let op = match behavior {
            Behavior::Delete => Op::Delete(kv.key.clone()),
            Behavior::Release => {
                let released = Stored {
                    session: None,
                    ..record
                };
                Op::put(kv.key.clone(), released.encode(&kv.key)?)
            }
        };
        // A concurrent write wins; its record is re-checked on the next pass
        // of the reaper only if it still names the session, which a write
        // keeps — so retry this one key until it settles.
        let res = store
            .txn(Txn {
                compare: vec![Compare::ModRevision(kv.key.clone(), kv.mod_revision)],
                success: vec![op],
                failure: vec![],
            })
            .await?;
        if !res.succeeded {
            Box::pin(invalidate(store, session, behavior)).await?;
            return Ok(());
        }
    }
    Ok(())
}

/// Follow `/berth/sessions/` and, when a session disappears (its lease
/// expired, or it was deleted), release its locks. Also sweeps locks of
/// sessions that vanished while no reaper ran. Runs until `stop`.
pub async fn reap_sessions(
    store: Arc<dyn Store>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut stop = std::pin::pin!(crate::stopped(stop));
    loop {
        let (kvs, rev) = store.range(keys::SESSIONS).await?;
        let mut known: HashMap<String, Behavior> = HashMap::new();
        for kv in &kvs {
            if let Ok(info) = session_info(kv) {
                known.insert(info.session.id, info.session.behavior);
            }
        }
        sweep_orphans(&*store, &known).await?;
        let mut events = store.watch(keys::SESSIONS, rev + 1).await?;
        loop {
            let batch = tokio::select! {
                b = events.next() => b,
                _ = &mut stop => return Ok(()),
            };
            match batch {
                Some(Ok(batch)) => {
                    for e in batch {
                        match e {
                            WatchEvent::Put(kv) => {
                                if let Ok(info) = session_info(&kv) {
                                    known.insert(info.session.id, info.session.behavior);
                                }
                            }
                            WatchEvent::Delete { key, .. } => {
                                let Some(id) = key.strip_prefix(keys::SESSIONS) else {
                                    continue;
                                };
                                let behavior = known.remove(id).unwrap_or_default();
                                invalidate(&*store, id, behavior).await?;
                            }
                        }
                    }
                }
                Some(Err(StoreError::Compacted { .. })) | None => break,
                Some(Err(e)) => return Err(e.into()),
            }
        }
    }
}

/// Release locks whose session is not among `live`.
async fn sweep_orphans(store: &dyn Store, live: &HashMap<String, Behavior>) -> Result<()> {
    let (kvs, _) = store.range(keys::KV).await?;
    let orphans: BTreeMap<String, ()> = kvs
        .iter()
        .filter_map(|kv| Stored::decode(kv).ok()?.session)
        .filter(|s| !live.contains_key(s))
        .map(|s| (s, ()))
        .collect();
    for s in orphans.keys() {
        invalidate(store, s, Behavior::Release).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use berth_store::embedded::EmbeddedStore;

    fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let s: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        (dir, s)
    }

    #[tokio::test]
    async fn put_get_list_and_namespaces_are_separate() {
        let (_d, s) = store();
        assert!(
            put(
                &*s,
                "default",
                "app/db/url",
                b"pg://x",
                PutOptions::default()
            )
            .await
            .unwrap()
        );
        assert!(
            put(
                &*s,
                "default",
                "app/name",
                b"shop",
                PutOptions {
                    flags: Some(7),
                    cas: None
                }
            )
            .await
            .unwrap()
        );
        assert!(
            put(&*s, "staging", "app/name", b"other", PutOptions::default())
                .await
                .unwrap()
        );
        let (p, _) = get(&*s, "default", "app/name").await.unwrap();
        let p = p.unwrap();
        assert_eq!(
            (&p.value[..], p.flags, p.session.as_deref()),
            (&b"shop"[..], 7, None)
        );
        let (all, _) = list(&*s, "default", "app/").await.unwrap();
        let names: Vec<_> = all.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(names, ["app/db/url", "app/name"]);
        assert_eq!(key_names(&all, "app/", Some("/")), ["app/db/", "app/name"]);
        let (p, _) = get(&*s, "staging", "app/name").await.unwrap();
        assert_eq!(&p.unwrap().value[..], b"other");
        assert!(delete(&*s, "default", "app/", true, None).await.unwrap());
        assert!(list(&*s, "default", "").await.unwrap().0.is_empty());
        assert_eq!(list(&*s, "staging", "").await.unwrap().0.len(), 1);
    }

    #[tokio::test]
    async fn cas_writes_only_at_the_observed_index() {
        let (_d, s) = store();
        let cas = |c| PutOptions {
            flags: None,
            cas: Some(c),
        };
        assert!(put(&*s, "default", "k", b"1", cas(0)).await.unwrap());
        assert!(
            !put(&*s, "default", "k", b"2", cas(0)).await.unwrap(),
            "cas=0 only creates"
        );
        let idx = get(&*s, "default", "k")
            .await
            .unwrap()
            .0
            .unwrap()
            .modify_index;
        assert!(put(&*s, "default", "k", b"2", cas(idx)).await.unwrap());
        assert!(
            !put(&*s, "default", "k", b"3", cas(idx)).await.unwrap(),
            "stale index"
        );
        let p = get(&*s, "default", "k").await.unwrap().0.unwrap();
        assert_eq!(&p.value[..], b"2");
        assert!(p.create_index < p.modify_index);
        assert!(!delete(&*s, "default", "k", false, Some(idx)).await.unwrap());
        assert!(
            delete(&*s, "default", "k", false, Some(p.modify_index))
                .await
                .unwrap()
        );
        assert!(get(&*s, "default", "k").await.unwrap().0.is_none());
    }

    #[tokio::test]
    async fn locks_are_exclusive_and_freed_by_release_destroy_and_expiry() {
        let (_d, s) = store();
        let a = create_session(&*s, "n1", SessionRequest::default())
            .await
            .unwrap()
            .session
            .id;
        let b = create_session(&*s, "n1", SessionRequest::default())
            .await
            .unwrap()
            .session
            .id;
        assert!(
            acquire(&*s, "default", "leader", b"a", None, &a)
                .await
                .unwrap()
        );
        assert!(
            acquire(&*s, "default", "leader", b"a2", None, &a)
                .await
                .unwrap(),
            "re-entrant"
        );
        assert!(
            !acquire(&*s, "default", "leader", b"b", None, &b)
                .await
                .unwrap()
        );
        assert!(
            !release(&*s, "default", "leader", b"", None, &b)
                .await
                .unwrap()
        );
        let p = get(&*s, "default", "leader").await.unwrap().0.unwrap();
        assert_eq!(
            (p.session.as_deref(), p.lock_index, &p.value[..]),
            (Some(a.as_str()), 1, &b"a2"[..])
        );
        assert!(
            release(&*s, "default", "leader", b"", None, &a)
                .await
                .unwrap()
        );
        assert!(
            acquire(&*s, "default", "leader", b"b", None, &b)
                .await
                .unwrap()
        );
        assert_eq!(
            get(&*s, "default", "leader")
                .await
                .unwrap()
                .0
                .unwrap()
                .lock_index,
            2
        );
        destroy_session(&*s, &b).await.unwrap();
        let p = get(&*s, "default", "leader").await.unwrap().0.unwrap();
        assert_eq!(p.session, None, "destroy releases");
        assert!(matches!(
            acquire(&*s, "default", "leader", b"", None, &b).await,
            Err(KvError::SessionNotFound(_))
        ));

        // A TTL'd session that is not renewed expires; the reaper releases.
        let (stop_tx, stop_rx) = watch::channel(false);
        let reaper = tokio::spawn(reap_sessions(s.clone(), stop_rx));
        let c = create_session(
            &*s,
            "n1",
            SessionRequest {
                ttl: Some(Duration::from_secs(1)),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .session
        .id;
        assert!(
            acquire(&*s, "default", "leader", b"c", None, &c)
                .await
                .unwrap()
        );
        let (_, rev) = get(&*s, "default", "leader").await.unwrap();
        let full = keys::kv("default", "leader");
        let changed = wait_for_change(&*s, keys::KV, |k| k == full, rev, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(changed, "the reaper's release wakes a blocking query");
        let p = get(&*s, "default", "leader").await.unwrap().0.unwrap();
        assert_eq!((p.session, &p.value[..]), (None, &b"c"[..]));
        assert!(matches!(
            renew_session(&*s, &c).await,
            Err(KvError::SessionNotFound(_))
        ));
        stop_tx.send(true).unwrap();
        reaper.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn delete_behavior_removes_the_locked_keys() {
        let (_d, s) = store();
        let req = SessionRequest {
            behavior: Behavior::Delete,
            ..Default::default()
        };
        let a = create_session(&*s, "n1", req).await.unwrap().session.id;
        assert!(
            acquire(&*s, "default", "svc/lock", b"x", None, &a)
                .await
                .unwrap()
        );
        destroy_session(&*s, &a).await.unwrap();
        assert!(get(&*s, "default", "svc/lock").await.unwrap().0.is_none());
    }

    #[tokio::test]
    async fn blocking_wait_returns_on_a_relevant_write_and_times_out_otherwise() {
        let (_d, s) = store();
        put(&*s, "default", "a", b"1", PutOptions::default())
            .await
            .unwrap();
        let (_, rev) = get(&*s, "default", "a").await.unwrap();
        let full = keys::kv("default", "a");
        let f2 = full.clone();
        // An unrelated write does not wake it.
        put(&*s, "default", "ab", b"1", PutOptions::default())
            .await
            .unwrap();
        let changed = wait_for_change(&*s, &full, |k| k == f2, rev, Duration::from_millis(200))
            .await
            .unwrap();
        assert!(!changed);
        let writer = {
            let s = s.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                put(&*s, "default", "a", b"2", PutOptions::default())
                    .await
                    .unwrap();
            })
        };
        let t0 = std::time::Instant::now();
        let changed = wait_for_change(&*s, &full, |k| k == full, rev, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(changed && t0.elapsed() < Duration::from_secs(5));
        writer.await.unwrap();
    }

    #[test]
    fn uuids_are_v4_shaped_and_differ() {
        let a = new_uuid().unwrap();
        let b = new_uuid().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }
}
