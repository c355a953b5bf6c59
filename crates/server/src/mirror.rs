//! An in-memory mirror of the cluster state under `/berth/`, kept current by
//! one store watch, for the loops that react to state (the controller, the
//! catalog). Reacting to a mirror instead of re-reading the store makes a
//! reconcile pass cost no I/O, and level-triggered handlers make a missed or
//! repeated notification harmless.

use std::collections::BTreeMap;
use std::sync::Arc;

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
            let batch = tokio::select! {
                b = events.next() => b,
                _ = &mut shutdown => return Ok(()),
                () = async { match timer { Some(t) => t.await, None => std::future::pending().await } } => continue,
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
        }
        tracing::info!("state watch ended; re-listing");
    }
}
