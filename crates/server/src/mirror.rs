//! An in-memory mirror of the cluster state under `/berth/`, kept current by
//! one store watch, for the loops that react to state (the controller, the
//! catalog). Reacting to a mirror instead of re-reading the store makes a
//! reconcile pass cost no I/O, and level-triggered handlers make a missed or
//! repeated notification harmless.

use std::collections::BTreeMap;
use std::sync::Arc;

use berth_agent::local::LocalStatus;
use berth_model::{Assignment, InstanceKey, InstanceStatus, Node, StackRecord, keys};
use berth_store::{Revision, Store, StoreError, WatchEvent, decode};
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;

/// Everything the controller knows, mirrored from the store.
#[derive(Debug, Default)]
pub struct Mirror {
    /// Stack records by key, with their mod revision.
    pub stacks: BTreeMap<String, (StackRecord, Revision)>,
    /// Assignments by key, with their mod revision.
    pub assignments: BTreeMap<String, (Assignment, Revision)>,
    /// Instance statuses by instance.
    pub statuses: BTreeMap<InstanceKey, InstanceStatus>,
    /// Nodes by id.
    pub nodes: BTreeMap<String, Node>,
    /// Stable service addresses by store key (see `vip.rs`), with their mod
    /// revision.
    pub vips: BTreeMap<String, (berth_model::vip::ServiceVip, Revision)>,
    /// The controller's last word on instances it could not place, by store
    /// key (`/berth/unplaced/<ns>/<stack>`), with their mod revision.
    pub unplaced: BTreeMap<String, (berth_model::Unplaced, Revision)>,
    /// Down marks by node id (see `controller::Liveness`), with their mod
    /// revision.
    pub down: BTreeMap<String, (berth_model::NodeDown, Revision)>,
}

impl Mirror {
    /// Apply one store event. Keys outside the mirrored prefixes are ignored;
    /// values that do not decode are logged and skipped (they cannot be
    /// acted on, and one bad record must not stop every other stack).
    pub fn apply(&mut self, event: &WatchEvent) {
        match event {
            WatchEvent::Put(kv) => {
                let key = kv.key.as_str();
                let rev = kv.mod_revision;
                if key.starts_with(keys::STACKS) {
                    if let Some(v) = decode_logged(kv) {
                        self.stacks.insert(kv.key.clone(), (v, rev));
                    }
                } else if key.starts_with(keys::ASSIGNMENTS) {
                    if let Some(v) = decode_logged(kv) {
                        self.assignments.insert(kv.key.clone(), (v, rev));
                    }
                } else if key.starts_with(keys::STATUS) {
                    if let Some(v) = decode_logged::<InstanceStatus>(kv) {
                        self.statuses.insert(v.key.clone(), v);
                    }
                } else if key.starts_with(keys::VIPS) {
                    if let Some(v) = decode_logged(kv) {
                        self.vips.insert(kv.key.clone(), (v, rev));
                    }
                } else if key.starts_with(keys::UNPLACED) {
                    if let Some(v) = decode_logged(kv) {
                        self.unplaced.insert(kv.key.clone(), (v, rev));
                    }
                } else if let Some(id) = key.strip_prefix(keys::NODE_DOWN) {
                    if let Some(v) = decode_logged(kv) {
                        self.down.insert(id.to_owned(), (v, rev));
                    }
                } else if let Some(id) = key.strip_prefix(keys::NODES)
                    && let Some(v) = decode_logged(kv)
                {
                    self.nodes.insert(id.to_owned(), v);
                }
            }
            WatchEvent::Delete { key, .. } => {
                self.stacks.remove(key);
                self.assignments.remove(key);
                self.vips.remove(key);
                self.unplaced.remove(key);
                if key.starts_with(keys::STATUS)
                    && let Some(k) = keys::parse_instance(key)
                {
                    self.statuses.remove(&k);
                }
                if let Some(id) = key.strip_prefix(keys::NODES) {
                    self.nodes.remove(id);
                }
                if let Some(id) = key.strip_prefix(keys::NODE_DOWN) {
                    self.down.remove(id);
                }
            }
        }
    }
}

fn decode_logged<T: serde::de::DeserializeOwned>(kv: &berth_store::KeyValue) -> Option<T> {
    match decode(kv) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::error!(key = %kv.key, error = %e, "skipping undecodable record");
            None
        }
    }
}

/// Lay this process's own agent's statuses over `mirror.statuses`.
///
/// A local status replaces the mirrored one only when the store already
/// has a status for that instance, of the same incarnation (uid), and not
/// a newer one. The agent is the only writer of its instances' statuses, so
/// the local one is then the same or a later emission still being written:
/// the overlay can be ahead of the store by the writes in flight, never
/// invent an instance (a key the store lacks, or whose status it deleted
/// with a lease, stays absent) and never bring back an older state.
pub fn overlay(mirror: &mut Mirror, local: &BTreeMap<InstanceKey, LocalStatus>) {
    for (key, entry) in local {
        let l = &entry.status;
        if let Some(stored) = mirror.statuses.get_mut(key)
            && stored.uid == l.uid
            && stored.updated_at <= l.updated_at
            && stored != l
        {
            *stored = l.clone();
        }
    }
}

/// Something that reacts to the mirror.
pub trait Follower {
    /// Called after the initial listing and after every burst of events,
    /// with the highest revision applied so far.
    fn changed(
        &mut self,
        mirror: &Mirror,
        revision: Revision,
    ) -> impl std::future::Future<Output = anyhow::Result<()>> + Send;

    /// Called when the mirror is rebuilt from a fresh listing.
    fn relisted(&mut self) {}

    /// Wall-clock time (ms since the epoch) at which [`Follower::changed`]
    /// wants to be called again even if no event arrives: timed steps (a
    /// drain, a rollout's delay) are scheduled this way instead of sleeping
    /// inside the handler.
    fn wake_at(&self) -> Option<berth_model::Millis> {
        None
    }
}

/// List `/berth/`, then follow its watch, calling `follower` after every
/// burst, until `shutdown` turns true. Re-lists when the watch ends or
/// reports compaction, so no change is ever silently missed. With `lag`,
/// the revisions of each burst are reported to it once the pass that
/// applied them has returned.
pub async fn follow<F: Follower + Send>(
    store: Arc<dyn Store>,
    shutdown: watch::Receiver<bool>,
    follower: &mut F,
    lag: Option<crate::metrics::WatchLag>,
) -> anyhow::Result<()> {
    follow_with(store, shutdown, follower, lag, None).await
}

/// The statuses of this process's own agent as it emits them.
pub type LocalFeed = watch::Receiver<BTreeMap<InstanceKey, LocalStatus>>;

/// [`follow`], with the statuses of this process's own agent laid over the
/// mirror as soon as they are emitted (`local`), for the followers that
/// route traffic: on one machine a health change then reaches the router
/// without waiting for the status write to commit. The store stays the
/// source of truth: see [`overlay`] for when a local status is used.
pub async fn follow_with<F: Follower + Send>(
    store: Arc<dyn Store>,
    shutdown: watch::Receiver<bool>,
    follower: &mut F,
    lag: Option<crate::metrics::WatchLag>,
    mut local: Option<LocalFeed>,
) -> anyhow::Result<()> {
    let name = std::any::type_name::<F>();
    // Revisions applied to the mirror but not yet handled by a pass.
    let mut applied: Vec<Revision> = Vec::new();
    let mut shutdown = std::pin::pin!(crate::stopped(shutdown));
    loop {
        let (kvs, rev) = store.range(keys::ROOT).await?;
        let mut mirror = Mirror::default();
        for kv in kvs {
            mirror.apply(&WatchEvent::Put(kv));
        }
        if let Some(local) = &mut local {
            overlay(&mut mirror, &local.borrow_and_update());
        }
        follower.relisted();
        let mut events = store.watch(keys::ROOT, rev + 1).await?;
        let mut seen = rev;
        loop {
            let started = std::time::Instant::now();
            let pass = follower.changed(&mirror, seen).await;
            crate::metrics::reconcile_pass(name, started.elapsed(), pass.is_ok());
            pass?;
            if let Some(lag) = &lag {
                lag.handled(name, &applied);
            }
            applied.clear();
            let timer = follower.wake_at().map(|at| {
                let wait = at.saturating_sub(crate::now_ms());
                // A few ms late so the deadline has surely passed.
                tokio::time::sleep(std::time::Duration::from_millis(wait + 5))
            });
            let local_changed = async {
                match &mut local {
                    Some(rx) => {
                        if rx.changed().await.is_err() {
                            // The agent is gone: nothing more will come.
                            std::future::pending::<()>().await;
                        }
                        overlay(&mut mirror, &rx.borrow_and_update());
                    }
                    None => std::future::pending().await,
                }
            };
            let batch = tokio::select! {
                b = events.next() => b,
                _ = &mut shutdown => return Ok(()),
                () = async { match timer { Some(t) => t.await, None => std::future::pending().await } } => continue,
                () = local_changed => continue,
            };
            let Some(batch) = batch else { break };
            let mut batch = Some(batch);
            let mut relist = false;
            // Drain everything already queued so a burst costs one pass.
            while let Some(b) = batch.take() {
                match b {
                    Ok(b) => {
                        for e in &b {
                            seen = seen.max(e.revision());
                            if applied.last() != Some(&e.revision()) {
                                applied.push(e.revision());
                            }
                            mirror.apply(e);
                        }
                    }
                    Err(StoreError::Compacted { .. }) => relist = true,
                    Err(e) => return Err(e.into()),
                }
                if relist {
                    break;
                }
                batch = events.next().now_or_never().flatten();
            }
            if relist {
                break;
            }
            if let Some(local) = &mut local {
                // A stored status older than the local one must not undo it.
                overlay(&mut mirror, &local.borrow_and_update());
            }
        }
        tracing::info!("state watch ended; re-listing");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_agent::local::LocalStatuses;
    use berth_model::{Health, InstanceState};
    use berth_store::embedded::EmbeddedStore;

    fn status(uid: &str, health: Health, updated_at: u64) -> InstanceStatus {
        InstanceStatus {
            state: InstanceState::Running,
            health,
            pid: Some(42),
            address: Some("127.0.0.1".into()),
            port: Some(8000),
            started_at: Some(1),
            ..InstanceStatus::new(
                InstanceKey::new("default", "shop", "web", 1),
                uid,
                "n1",
                1,
                updated_at,
            )
        }
    }

    fn health_of(mirror: &Mirror) -> Option<Health> {
        mirror.statuses.values().next().map(|s| s.health)
    }

    #[test]
    fn overlay_is_only_ever_ahead_of_the_store() {
        let local = LocalStatuses::new();
        let feed = local.subscribe();
        let mut mirror = Mirror::default();

        // Never invents an instance the store does not have.
        local.publish(&status("u1", Health::Healthy, 5));
        overlay(&mut mirror, &feed.borrow());
        assert!(mirror.statuses.is_empty());

        // Replaces an older stored status of the same incarnation...
        let stored = status("u1", Health::Starting, 3);
        mirror.statuses.insert(stored.key.clone(), stored.clone());
        overlay(&mut mirror, &feed.borrow());
        assert_eq!(health_of(&mirror), Some(Health::Healthy));

        // ...but not a newer one, nor another incarnation's.
        mirror
            .statuses
            .insert(stored.key.clone(), status("u1", Health::Unhealthy, 9));
        overlay(&mut mirror, &feed.borrow());
        assert_eq!(health_of(&mirror), Some(Health::Unhealthy));
        mirror
            .statuses
            .insert(stored.key.clone(), status("u2", Health::Starting, 1));
        overlay(&mut mirror, &feed.borrow());
        assert_eq!(health_of(&mirror), Some(Health::Starting));
    }

    /// Records the health the follower saw at each pass.
    struct Seen(tokio::sync::mpsc::UnboundedSender<Option<Health>>);

    impl Follower for Seen {
        async fn changed(&mut self, mirror: &Mirror, _: Revision) -> anyhow::Result<()> {
            let _ = self.0.send(health_of(mirror));
            Ok(())
        }
    }

    async fn next_health(
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<Option<Health>>,
        want: Option<Health>,
    ) {
        let wait = async {
            while let Some(h) = rx.recv().await {
                if h == want {
                    return;
                }
            }
            panic!("follower stopped before seeing {want:?}");
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), wait)
            .await
            .unwrap_or_else(|_| panic!("follower never saw {want:?}"));
    }

    #[tokio::test]
    async fn follow_with_sees_local_statuses_before_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let starting = status("u1", Health::Starting, 1);
        let key = keys::status(&starting.key);
        berth_store::put_json(store.as_ref(), &key, &starting)
            .await
            .unwrap();

        let local = LocalStatuses::new();
        let (stop_tx, stop_rx) = watch::channel(false);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let follow = tokio::spawn({
            let store = store.clone();
            let feed = local.subscribe();
            async move { follow_with(store, stop_rx, &mut Seen(tx), None, Some(feed)).await }
        });
        next_health(&mut rx, Some(Health::Starting)).await;

        // No store write: the local status alone reaches the follower.
        local.publish(&status("u1", Health::Healthy, 2));
        next_health(&mut rx, Some(Health::Healthy)).await;

        // A stored write older than the local status (in flight when the
        // agent moved on) does not undo it; the store catching up is a no-op.
        local.publish(&status("u1", Health::Unhealthy, 4));
        next_health(&mut rx, Some(Health::Unhealthy)).await;
        berth_store::put_json(store.as_ref(), &key, &status("u1", Health::Healthy, 2))
            .await
            .unwrap();
        berth_store::put_json(store.as_ref(), &key, &status("u1", Health::Unhealthy, 4))
            .await
            .unwrap();
        // The store deleting the status (lease expiry) wins over the overlay.
        store.delete(&key).await.unwrap();
        let mut passes = Vec::new();
        let wait = async {
            while let Some(h) = rx.recv().await {
                passes.push(h);
                if h.is_none() {
                    break;
                }
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), wait)
            .await
            .unwrap();
        assert!(
            passes[..passes.len() - 1]
                .iter()
                .all(|h| *h == Some(Health::Unhealthy)),
            "the older stored status must never show through: {passes:?}"
        );

        stop_tx.send(true).unwrap();
        follow.await.unwrap().unwrap();
    }
}
