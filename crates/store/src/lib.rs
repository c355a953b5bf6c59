//! The store: berth's only shared state.
//!
//! The [`Store`] trait is modelled on etcd v3 so that both implementations are
//! honest about the same semantics:
//! - one global, monotonically increasing **revision**; every write bumps it
//!   and stamps the key's `mod_revision`;
//! - get / range by prefix, put / delete;
//! - **transactions** comparing keys' `mod_revision` (compare-and-swap; a
//!   `mod_revision` of 0 means "key absent");
//! - **watch** a prefix from a revision: a stream of event batches that never
//!   silently drops events — if the history needed was compacted, the stream
//!   yields [`StoreError::Compacted`] and the watcher must re-list;
//! - **leases** with a TTL; keys attached to a lease are deleted when it
//!   expires or is revoked.
//!
//! Implementations: [`embedded::EmbeddedStore`] (redb, single file, the
//! default) and, for fleets, [`etcd::EtcdStore`]. [`conformance`] holds the test suite
//! both must pass.
//!
//! This crate knows nothing of berth's types: values are bytes. The typed
//! helpers ([`get_json`], [`put_json`]) only do serde.

#![deny(missing_docs)]

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use serde::{Serialize, de::DeserializeOwned};

pub mod chunk;
pub mod conformance;
pub mod embedded;
pub mod etcd;

/// A store revision. Starts at 1 for an empty store, as etcd's does.
pub type Revision = i64;

/// A lease id. 0 is "no lease".
pub type LeaseId = i64;

/// One key and its value, with etcd's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Bytes,
    /// Revision of the write that created the key (since its last delete).
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
    /// Number of writes since creation (1 after the first put).
    pub version: i64,
    /// Lease the key is attached to, 0 if none.
    pub lease: LeaseId,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was created or updated; `kv.mod_revision` is the event's revision.
    Put(KeyValue),
    /// The key was deleted (explicitly or by lease expiry) at `mod_revision`.
    Delete {
        /// The deleted key.
        key: String,
        /// Revision of the delete.
        mod_revision: Revision,
    },
}

impl WatchEvent {
    /// The key the event is about.
    pub fn key(&self) -> &str {
        match self {
            Self::Put(kv) => &kv.key,
            Self::Delete { key, .. } => key,
        }
    }

    /// The revision at which it happened.
    pub fn revision(&self) -> Revision {
        match self {
            Self::Put(kv) => kv.mod_revision,
            Self::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

/// Events of one revision (one transaction), in order.
pub type WatchBatch = Vec<WatchEvent>;

/// A watch: batches in revision order, or an error after which it ends.
pub type WatchStream = BoxStream<'static, Result<WatchBatch, StoreError>>;

/// A condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's `mod_revision` equals this (0 = the key does not exist).
    ModRevision(String, Revision),
}

/// An operation inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Put a value, optionally attached to a lease.
    Put {
        /// Key.
        key: String,
        /// Value.
        value: Bytes,
        /// Lease, 0 for none.
        lease: LeaseId,
    },
    /// Delete one key (no-op if absent).
    Delete(String),
    /// Delete every key starting with this prefix.
    DeletePrefix(String),
}

impl Op {
    /// A put without lease.
    pub fn put(key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        Self::Put {
            key: key.into(),
            value: value.into(),
            lease: 0,
        }
    }
}

/// A transaction: if every compare holds, apply `success`, else `failure`.
/// Applied atomically as one revision (if it writes anything).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    /// Conditions, all of which must hold.
    pub compare: Vec<Compare>,
    /// Ops applied when they hold.
    pub success: Vec<Op>,
    /// Ops applied when they do not.
    pub failure: Vec<Op>,
}

/// Outcome of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether the compares held.
    pub succeeded: bool,
    /// The store revision after the transaction.
    pub revision: Revision,
}

/// Errors of a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The watch asked for history that has been compacted away; re-list
    /// with [`Store::range`] and watch from the revision it returns.
    #[error(
        "revision {requested} has been compacted (oldest kept: {compact_revision}); re-list and watch again"
    )]
    Compacted {
        /// Revision the watch asked for.
        requested: Revision,
        /// Oldest revision still available.
        compact_revision: Revision,
    },
    /// The lease does not exist (expired or revoked).
    #[error("lease {0} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    /// The store could not be opened or written (disk, corruption, network).
    #[error("store backend error: {0}")]
    Backend(String),
    /// A value could not be (de)serialised.
    #[error("bad value at key {key}: {message}")]
    Codec {
        /// The key.
        key: String,
        /// What serde said.
        message: String,
    },
    /// The store is shutting down.
    #[error("store closed")]
    Closed,
}

/// Result alias.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// etcd-shaped key-value store. Cheap to share as `Arc<dyn Store>`.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// One key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;
    /// Every key with this prefix, sorted by key, and the store revision the
    /// listing is consistent with (watch from `revision + 1` to follow it).
    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)>;
    /// Put a value; returns the new revision.
    async fn put(&self, key: &str, value: Bytes, lease: LeaseId) -> Result<Revision>;
    /// Delete a key; returns the revision after (unchanged if it was absent).
    async fn delete(&self, key: &str) -> Result<Revision>;
    /// Atomic compare-and-swap transaction.
    async fn txn(&self, txn: Txn) -> Result<TxnResult>;
    /// Watch every key under `prefix`, starting at revision `from`
    /// (inclusive; `0` means "from now"). Events come in revision order.
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream>;
    /// Current revision.
    async fn revision(&self) -> Result<Revision>;
    /// Create a lease that expires `ttl` after its last keep-alive.
    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId>;
    /// Refresh a lease. Errors with [`StoreError::LeaseNotFound`] once gone.
    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<()>;
    /// Revoke a lease now, deleting its keys.
    async fn lease_revoke(&self, lease: LeaseId) -> Result<()>;
    /// Drop history older than `revision` (watches from before it get
    /// [`StoreError::Compacted`]).
    async fn compact(&self, revision: Revision) -> Result<()>;
}

/// Read a key as JSON.
pub async fn get_json<T: DeserializeOwned>(
    store: &dyn Store,
    key: &str,
) -> Result<Option<(T, KeyValue)>> {
    match store.get(key).await? {
        None => Ok(None),
        Some(kv) => Ok(Some((decode(&kv)?, kv))),
    }
}

/// Decode a value as JSON.
pub fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T> {
    serde_json::from_slice(&kv.value).map_err(|e| StoreError::Codec {
        key: kv.key.clone(),
        message: e.to_string(),
    })
}

/// Encode a value as JSON.
pub fn encode<T: Serialize>(key: &str, value: &T) -> Result<Bytes> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| StoreError::Codec {
            key: key.to_owned(),
            message: e.to_string(),
        })
}

/// Write a value as JSON.
pub async fn put_json<T: Serialize>(store: &dyn Store, key: &str, value: &T) -> Result<Revision> {
    store.put(key, encode(key, value)?, 0).await
}
