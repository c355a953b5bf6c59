//! Leader election: with several servers on one store (a fleet on etcd),
//! exactly one runs the controller (and with it the scheduler).
//!
//! ```text
//!  campaign:  get /berth/leader ── taken by another ──► watch it until deleted (or TTL passes)
//!                 │ free (or our own node's, from before a restart)
//!                 ▼
//!             grant lease (TTL 5 s) ── txn: mod_revision(/berth/leader) == seen
//!                 │                        put /berth/leader {node, api, …} on the lease
//!                 ▼ won
//!             leader(revision) ── keep-alive every TTL/3, check the key is still ours
//!                 │ keep-alive refused, or no successful one for 2/3 TTL, or key changed
//!                 ▼
//!             follower ──► campaign again
//! ```
//!
//! The winner's revision of the key is its **fencing token**: the controller
//! adds `mod_revision(/berth/leader) == token` to every commit, so a deposed
//! leader that has not noticed yet (a long GC pause, a partition) can compute
//! plans but never write one. A leader that dies stops renewing; the key
//! goes with its lease within the TTL and a follower wins the next round, so
//! takeover takes at most TTL plus one campaign round-trip. A server that
//! shuts down cleanly revokes its lease, so the handover is immediate.
//!
//! Works on both stores: on the embedded one, the one server always wins.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use berth_model::Millis;
use berth_store::{Compare, LeaseId, Op, Revision, Store, StoreError, Txn, WatchEvent, decode};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::{Instant, sleep, timeout};

/// The key the leader holds, attached to its lease.
pub const KEY: &str = "/berth/leader";

/// Lease TTL of the leader key: how long a dead leader blocks takeover.
pub const TTL: Duration = Duration::from_secs(5);

/// What the leader key holds (`GET /v1/leader` returns it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    /// The leading server's node id.
    pub node: String,
    /// Its API addresses.
    #[serde(default)]
    pub api: Vec<SocketAddr>,
    /// Its pid (tells a restarted server from the one before it).
    pub pid: u32,
    /// When it won.
    pub since: Millis,
}

/// The current leadership as seen by this server: `Some(fencing token)`
/// while this server leads.
pub type Leadership = watch::Receiver<Option<Revision>>;

/// Campaign until `shutdown` turns true, publishing leadership on `tx`.
///
/// Store errors do not end the campaign (etcd may be between leaders or
/// unreachable for a moment): they cost leadership and are retried.
pub async fn campaign(
    store: Arc<dyn Store>,
    me: LeaderRecord,
    ttl: Duration,
    tx: watch::Sender<Option<Revision>>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let held = std::sync::Mutex::new(None);
        let round = tokio::select! {
            r = round(store.as_ref(), &me, ttl, &tx, &held) => r,
            _ = shutdown.wait_for(|s| *s) => Ok(Outcome::Shutdown),
        };
        let _ = tx.send(None);
        match round {
            Ok(Outcome::Shutdown) => {
                let lease = *held
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(lease) = lease {
                    // Hand over now rather than after the TTL.
                    let _ = store.lease_revoke(lease).await;
                }
                return Ok(());
            }
            Ok(Outcome::Lost) => tracing::warn!(node = %me.node, "lost leadership"),
            Ok(Outcome::Retry) => {}
            Err(e) => {
                tracing::warn!(error = %e, "leader election: store error; retrying");
                tokio::select! {
                    () = sleep(Duration::from_millis(500)) => {}
                    _ = shutdown.wait_for(|s| *s) => return Ok(()),
                }
            }
        }
    }
}

enum Outcome {
    /// Stopped (the lease held, if any, is revoked).
    Shutdown,
    /// Was leader, is not any more.
    Lost,
    /// Someone else leads or led; try again.
    Retry,
}

async fn round(
    store: &dyn Store,
    me: &LeaderRecord,
    ttl: Duration,
    tx: &watch::Sender<Option<Revision>>,
    held: &std::sync::Mutex<Option<LeaseId>>,
) -> anyhow::Result<Outcome> {
    let current = store.get(KEY).await?;
    let expect = match &current {
        None => 0,
        Some(kv) => match decode::<LeaderRecord>(kv) {
            // Our own node's key from before a restart (one server per node:
            // the data-dir lock): no need to wait for its lease to expire.
            Ok(r) if r.node == me.node => kv.mod_revision,
            _ => {
                wait_for_change(store, kv.mod_revision, ttl).await?;
                return Ok(Outcome::Retry);
            }
        },
    };
    let lease = store.lease_grant(ttl).await?;
    *held
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(lease);
    let mut record = me.clone();
    record.since = crate::now_ms();
    let value = berth_store::encode(KEY, &record)?;
    let result = store
        .txn(Txn {
            compare: vec![Compare::ModRevision(KEY.to_owned(), expect)],
            success: vec![Op::Put {
                key: KEY.to_owned(),
                value,
                lease,
            }],
            failure: vec![],
        })
        .await;
    let won = match result {
        Ok(r) if r.succeeded => r.revision,
        Ok(_) => {
            let _ = store.lease_revoke(lease).await;
            return Ok(Outcome::Retry);
        }
        Err(e) => {
            let _ = store.lease_revoke(lease).await;
            return Err(e.into());
        }
    };
    tracing::info!(node = %me.node, revision = won, "elected leader");
    let _ = tx.send(Some(won));
    hold(store, lease, won, ttl).await;
    // Make sure the key is gone before anyone else counts on it: revoking
    // is harmless if the lease already expired.
    let _ = store.lease_revoke(lease).await;
    Ok(Outcome::Lost)
}

/// Keep the lease alive while it is certainly ours; return when it may not be.
async fn hold(store: &dyn Store, lease: LeaseId, token: Revision, ttl: Duration) {
    let every = ttl / 3;
    let mut last_ok = Instant::now();
    loop {
        sleep(every).await;
        let sent = Instant::now();
        let alive = timeout(every, async {
            store.lease_keep_alive(lease).await?;
            let kv = store.get(KEY).await?;
            Ok::<bool, StoreError>(kv.is_some_and(|kv| kv.mod_revision == token))
        })
        .await;
        match alive {
            Ok(Ok(true)) => last_ok = sent,
            Ok(Ok(false)) => {
                tracing::warn!("the leader key changed under us");
                return;
            }
            Ok(Err(StoreError::LeaseNotFound(_))) => return,
            Ok(Err(e)) => tracing::warn!(error = %e, "leader lease keep-alive failed"),
            Err(_) => tracing::warn!("leader lease keep-alive timed out"),
        }
        // The store counts the TTL from when it saw our last renewal, which
        // is after `last_ok`: stepping down 1/3 TTL before that deadline
        // leaves room for clock rate differences and the stop itself.
        if last_ok.elapsed() >= ttl * 2 / 3 {
            tracing::warn!("no successful lease renewal for 2/3 of the TTL; stepping down");
            return;
        }
    }
}

/// Wait until the key changes after `seen`, or at most `ttl`.
async fn wait_for_change(store: &dyn Store, seen: Revision, ttl: Duration) -> anyhow::Result<()> {
    let mut events = store.watch(KEY, seen + 1).await?;
    let _ = timeout(ttl, async {
        while let Some(batch) = events.next().await {
            let Ok(batch) = batch else { return };
            if batch.iter().any(|e| match e {
                WatchEvent::Delete { key, .. } => key == KEY,
                WatchEvent::Put(kv) => kv.key == KEY,
            }) {
                return;
            }
        }
    })
    .await;
    Ok(())
}

/// The current leader, if any.
pub async fn current(store: &dyn Store) -> anyhow::Result<Option<LeaderRecord>> {
    let Some(kv) = store.get(KEY).await? else {
        return Ok(None);
    };
    Ok(Some(decode(&kv).context("reading the leader record")?))
}

/// Run `task` (the controller) while this server leads: started with the
/// fencing token when leadership is won, stopped (and awaited) when it is
/// lost or on shutdown. An error of the task ends the server.
pub async fn while_leader<F, Fut>(
    mut leadership: Leadership,
    mut shutdown: watch::Receiver<bool>,
    mut task: F,
) -> anyhow::Result<()>
where
    F: FnMut(Revision, watch::Receiver<bool>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    loop {
        let token = tokio::select! {
            r = leadership.wait_for(Option::is_some) => match r {
                Ok(t) => t.unwrap_or_default(),
                Err(_) => return Ok(()),
            },
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut running = tokio::spawn(task(token, stop_rx));
        let lost = tokio::select! {
            r = &mut running => return r.context("controller panicked")?,
            _ = leadership.wait_for(|t| *t != Some(token)) => true,
            _ = shutdown.wait_for(|s| *s) => false,
        };
        let _ = stop_tx.send(true);
        running.await.context("controller panicked")??;
        if !lost {
            return Ok(());
        }
        tracing::info!("controller stopped: no longer the leader");
    }
}

/// `GET /v1/leader`: who leads, as this server sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderStatus {
    /// The leader's record; `null` while there is none (an election is
    /// under way, or the leader died less than a TTL ago).
    pub leader: Option<LeaderRecord>,
    /// The node id of the server that answered.
    pub this_node: String,
    /// Whether the answering server is the leader.
    pub is_leader: bool,
}

/// The `GET /v1/leader` handler.
pub async fn status(
    axum::extract::State(ctx): axum::extract::State<crate::api::ApiContext>,
) -> Result<axum::Json<LeaderStatus>, crate::api::error::ApiError> {
    let leader = match ctx.store.get(KEY).await? {
        Some(kv) => Some(decode::<LeaderRecord>(&kv)?),
        None => None,
    };
    Ok(axum::Json(LeaderStatus {
        is_leader: leader.as_ref().is_some_and(|l| l.node == ctx.node_id),
        leader,
        this_node: ctx.node_id.clone(),
    }))
}
