//! The statuses of this process's own agent, as they are emitted, for
//! in-process readers that must not wait for the store.
//!
//! On one machine the router, DNS and the TCP proxy run in the same process
//! as the agent. Their tables are built from the store's state watch, so a
//! health change used to reach them only after the status write committed
//! (a durable redb commit, queued behind every other writer's fsync: the
//! tail of discovery propagation was tens of ms on a busy disk). The agent
//! therefore also publishes every status here, synchronously, before the
//! reporter writes it; the server's traffic followers lay these over their
//! mirror of the store (`server::mirror::follow_with`).
//!
//! The store stays the source of truth. This is only ever *ahead* of it by
//! the writes in flight, because the agent is the only writer of its
//! instances' statuses: readers apply an entry only to an instance the store
//! already has, of the same incarnation (uid), and never over a newer
//! status. A forgotten instance keeps its last status here for
//! [`FORGOTTEN_KEPT`] (so readers do not fall back to an older stored
//! status, e.g. `running` after `stopping`, while the delete is in flight),
//! then the entry is dropped.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_model::{InstanceKey, InstanceStatus};
use tokio::sync::watch;

/// How long the last status of a forgotten instance is kept: far longer
/// than a status delete takes to reach the store, short enough that a
/// server running for months does not accumulate every slot it ever ran.
pub const FORGOTTEN_KEPT: Duration = Duration::from_secs(60);

/// One instance's latest status, as emitted.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalStatus {
    /// The whole status.
    pub status: InstanceStatus,
    /// When the agent forgot the instance (its assignment is gone), if it did.
    pub forgotten: Option<Instant>,
}

/// Latest status of every instance this process's agent supervises (and of
/// those it forgot in the last [`FORGOTTEN_KEPT`]). Cheap to clone; every
/// clone shares one map.
#[derive(Debug, Clone)]
pub struct LocalStatuses {
    latest: Arc<watch::Sender<BTreeMap<InstanceKey, LocalStatus>>>,
}

impl Default for LocalStatuses {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalStatuses {
    /// An empty map.
    pub fn new() -> Self {
        Self {
            latest: Arc::new(watch::channel(BTreeMap::new()).0),
        }
    }

    /// Follow the map: the receiver sees every change (coalesced, as a
    /// `watch` does; the map itself always holds the latest of each).
    pub fn subscribe(&self) -> watch::Receiver<BTreeMap<InstanceKey, LocalStatus>> {
        self.latest.subscribe()
    }

    /// The agent emitted this status.
    pub fn publish(&self, status: &InstanceStatus) {
        self.latest.send_modify(|m| {
            m.insert(
                status.key.clone(),
                LocalStatus {
                    status: status.clone(),
                    forgotten: None,
                },
            );
        });
    }

    /// The agent forgot this instance (it stopped and its assignment is
    /// gone); entries forgotten more than [`FORGOTTEN_KEPT`] ago are dropped.
    pub fn forget(&self, key: &InstanceKey) {
        let now = Instant::now();
        self.latest.send_modify(|m| {
            if let Some(entry) = m.get_mut(key) {
                entry.forgotten.get_or_insert(now);
            }
            m.retain(|_, e| {
                e.forgotten
                    .is_none_or(|at| now.duration_since(at) < FORGOTTEN_KEPT)
            });
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(slot: u32) -> InstanceStatus {
        InstanceStatus {
            state: berth_model::InstanceState::Running,
            health: berth_model::Health::Healthy,
            ..InstanceStatus::new(
                berth_model::InstanceKey::new("default", "s", "web", slot),
                "u1",
                "local",
                1,
                1,
            )
        }
    }

    #[test]
    fn forgotten_entries_are_kept_then_dropped() {
        let local = LocalStatuses::new();
        let rx = local.subscribe();
        local.publish(&status(1));
        local.publish(&status(2));
        local.forget(&status(1).key);
        let m = rx.borrow().clone();
        assert_eq!(m.len(), 2, "a just-forgotten instance is kept");
        assert!(m[&status(1).key].forgotten.is_some());
        assert!(m[&status(2).key].forgotten.is_none());

        // Pretend the first was forgotten long ago: the next forget drops it.
        local.latest.send_modify(|m| {
            if let Some(e) = m.get_mut(&status(1).key) {
                e.forgotten = Instant::now().checked_sub(FORGOTTEN_KEPT * 2);
            }
        });
        local.forget(&status(2).key);
        let m = rx.borrow().clone();
        assert_eq!(m.keys().cloned().collect::<Vec<_>>(), vec![status(2).key]);

        // A new incarnation replaces a forgotten entry.
        local.publish(&status(2));
        assert!(rx.borrow()[&status(2).key].forgotten.is_none());
    }
}
