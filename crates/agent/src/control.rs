//! The agent's view of the control plane: where it learns its assignments
//! and where it reports instance statuses.
//!
//! [`ControlPlane`] exists because agents on other machines will talk to the
//! servers over HTTP, never to the store; in the single-machine server the
//! agent runs in-process with [`StoreControlPlane`], straight on the store.

use std::sync::Arc;

use async_trait::async_trait;
use berth_model::{Assignment, InstanceKey, InstanceStatus, keys};
use berth_store::chunk::Part;
use berth_store::{LeaseId, Op, Revision, Store, StoreError, WatchEvent};
use futures::StreamExt;
use futures::stream::{self, BoxStream};

/// A change to this node's assignments.
#[derive(Debug, Clone, PartialEq)]
pub enum AssignmentEvent {
    /// An assignment was created or changed.
    Upsert(Box<Assignment>),
    /// An assignment was removed.
    Removed(InstanceKey),
    /// Events were lost (history compacted): list again and watch from there.
    Resync,
}

/// Errors talking to the control plane. The agent retries on all of them.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The control plane cannot be reached or answered with an error.
    #[error("control plane unavailable: {0}")]
    Unavailable(String),
}

/// A stream of assignment changes; ends (or errors) when the watch breaks.
pub type AssignmentStream = BoxStream<'static, Result<AssignmentEvent, ControlError>>;

/// What an agent needs from the servers.
#[async_trait]
pub trait ControlPlane: Send + Sync + 'static {
    /// Every assignment of `node`, and the revision the listing is at.
    async fn list_assignments(
        &self,
        node: &str,
    ) -> Result<(Vec<Assignment>, Revision), ControlError>;
    /// Changes to `node`'s assignments from revision `from` (inclusive).
    async fn watch_assignments(
        &self,
        node: &str,
        from: Revision,
    ) -> Result<AssignmentStream, ControlError>;
    /// Record an instance's status.
    async fn report(&self, status: &InstanceStatus) -> Result<(), ControlError>;
    /// Record several statuses; implementations may batch them.
    async fn report_many(&self, statuses: &[InstanceStatus]) -> Result<(), ControlError> {
        for s in statuses {
            self.report(s).await?;
        }
        Ok(())
    }
    /// Remove an instance's status (its assignment is gone and it stopped).
    /// `seq` orders the forget among the agent's reports
    /// ([`InstanceStatus::seq`]): a status stamped later is kept.
    async fn forget(&self, key: &InstanceKey, seq: u64) -> Result<(), ControlError>;
}

/// The control plane straight on a store (the single-machine server).
#[derive(Clone)]
pub struct StoreControlPlane {
    store: Arc<dyn Store>,
    /// Shared by clones: [`StoreControlPlane::set_lease`] moves them all.
    lease: Arc<std::sync::atomic::AtomicI64>,
}

impl StoreControlPlane {
    /// Use this store; statuses are written without a lease.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self::with_lease(store, 0)
    }

    /// Attach every status this agent writes to the node's lease.
    ///
    /// Statuses are facts about a live agent: when it dies they must go with
    /// it. After a `kill -9` and restart, the new agent re-reports what it
    /// runs under its new lease, and the old lease's expiry removes the rest
    /// (e.g. statuses of instances whose assignments were deleted while the
    /// agent was down), so no ghost instance outlives one lease TTL.
    pub fn with_lease(store: Arc<dyn Store>, lease: LeaseId) -> Self {
        Self {
            store,
            lease: Arc::new(std::sync::atomic::AtomicI64::new(lease)),
        }
    }

    /// The lease statuses are written on now.
    pub fn lease(&self) -> LeaseId {
        self.lease.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Write statuses on `lease` from now on: the node registered again on
    /// a new lease after the old one expired (with the statuses on it).
    pub fn set_lease(&self, lease: LeaseId) {
        self.lease.store(lease, std::sync::atomic::Ordering::SeqCst);
    }
}

fn decode_assignment(kv: &berth_store::KeyValue) -> Option<Assignment> {
    match berth_store::decode::<Assignment>(kv) {
        Ok(a) => Some(a),
        Err(e) => {
            // One bad record must not stop the node from running the rest.
            tracing::warn!(key = %kv.key, error = %e, "ignoring an unreadable assignment");
            None
        }
    }
}

#[async_trait]
impl ControlPlane for StoreControlPlane {
    async fn list_assignments(
        &self,
        node: &str,
    ) -> Result<(Vec<Assignment>, Revision), ControlError> {
        let (kvs, rev) = self.store.range(&keys::assignments_of(node)).await?;
        Ok((kvs.iter().filter_map(decode_assignment).collect(), rev))
    }

    async fn watch_assignments(
        &self,
        node: &str,
        from: Revision,
    ) -> Result<AssignmentStream, ControlError> {
        let watch = self.store.watch(&keys::assignments_of(node), from).await?;
        let events = watch.flat_map(|batch| {
            let out: Vec<Result<AssignmentEvent, ControlError>> = match batch {
                Ok(batch) => batch
                    .into_iter()
                    .filter_map(|ev| match ev {
                        WatchEvent::Put(kv) => {
                            decode_assignment(&kv).map(|a| Ok(AssignmentEvent::Upsert(Box::new(a))))
                        }
                        WatchEvent::Delete { key, .. } => {
                            keys::parse_instance(&key).map(|k| Ok(AssignmentEvent::Removed(k)))
                        }
                    })
                    .collect(),
                Err(StoreError::Compacted { .. }) => vec![Ok(AssignmentEvent::Resync)],
                Err(e) => vec![Err(ControlError::Store(e))],
            };
            stream::iter(out)
        });
        Ok(events.boxed())
    }

    async fn report(&self, status: &InstanceStatus) -> Result<(), ControlError> {
        let key = keys::status(&status.key);
        let value = berth_store::encode(&key, status)?;
        self.store.put(&key, value, self.lease()).await?;
        Ok(())
    }

    async fn report_many(&self, statuses: &[InstanceStatus]) -> Result<(), ControlError> {
        let mut parts = Vec::with_capacity(statuses.len());
        let lease = self.lease();
        for s in statuses {
            let key = keys::status(&s.key);
            let value = berth_store::encode(&key, s)?;
            parts.push(Part::op(Op::Put { key, value, lease }));
        }
        // In chunks: a node starting a few hundred instances reports them
        // at once, and etcd refuses a transaction of more than 128 ops.
        berth_store::chunk::commit(self.store.as_ref(), &[], parts).await?;
        Ok(())
    }

    async fn forget(&self, key: &InstanceKey, _seq: u64) -> Result<(), ControlError> {
        // In process, straight on the store: nothing can apply it late.
        self.store.delete(&keys::status(key)).await?;
        Ok(())
    }
}
