//! Which servers are alive: each one keeps `/berth/servers/<node>` (its
//! node id, API addresses and pid) on a lease of its own, so the record
//! goes with a dead server within [`TTL`].
//!
//! Agents read the list (`GET /v1/agent/nodes/{node}/servers`) to fail over
//! to another server when theirs dies, so `berth agent --join` needs only
//! one URL to learn every server; admins read it at `GET /v1/servers`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use berth_model::keys;
use berth_store::{Store, StoreError, decode, encode};
use tokio::sync::watch;

use crate::leader::LeaderRecord;

/// How long a dead server stays listed.
pub const TTL: Duration = Duration::from_secs(10);

/// Keep this server's record alive until `stop` turns true, then remove it.
/// Store errors (etcd between leaders) are retried: losing the record for
/// a while only delays agents learning about this server.
pub async fn advertise(
    store: Arc<dyn Store>,
    me: LeaderRecord,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let key = keys::server(&me.node);
    let value = encode(&key, &me)?;
    let mut lease = None;
    loop {
        let held = match lease {
            Some(l) => match store.lease_keep_alive(l).await {
                Ok(()) => Some(l),
                Err(StoreError::LeaseNotFound(_)) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew this server's record; retrying");
                    Some(l)
                }
            },
            None => None,
        };
        lease = match held {
            Some(l) => Some(l),
            None => match put(store.as_ref(), &key, &value).await {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot write this server's record; retrying");
                    None
                }
            },
        };
        tokio::select! {
            () = tokio::time::sleep(TTL / 4) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    if let Some(l) = lease {
        let _ = store.lease_revoke(l).await;
    }
    Ok(())
}

async fn put(
    store: &dyn Store,
    key: &str,
    value: &bytes::Bytes,
) -> Result<berth_store::LeaseId, StoreError> {
    let lease = store.lease_grant(TTL).await?;
    store.put(key, value.clone(), lease).await?;
    Ok(lease)
}

/// Every live server's record, sorted by node id.
pub async fn list(store: &dyn Store) -> Result<Vec<LeaderRecord>, StoreError> {
    let (kvs, _) = store.range(keys::SERVERS).await?;
    let mut out = Vec::with_capacity(kvs.len());
    for kv in &kvs {
        match decode::<LeaderRecord>(kv) {
            Ok(r) => out.push(r),
            Err(e) => {
                tracing::warn!(key = %kv.key, error = %e, "skipping an unreadable server record")
            }
        }
    }
    Ok(out)
}

/// The `host:port` an agent can use for each live server: its API
/// addresses, except unspecified ones (`0.0.0.0`), which name no host to
/// connect to (such a server is reached through the URLs given to
/// `--join`).
pub fn authorities(servers: &[LeaderRecord]) -> Vec<String> {
    let mut out: Vec<String> = servers
        .iter()
        .flat_map(|s| s.api.iter())
        .filter(|a| !a.ip().is_unspecified())
        .map(SocketAddr::to_string)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// `GET /v1/servers`: the live servers.
pub async fn handler(
    axum::extract::State(ctx): axum::extract::State<crate::api::ApiContext>,
) -> Result<axum::Json<Vec<LeaderRecord>>, crate::api::error::ApiError> {
    Ok(axum::Json(list(ctx.store.as_ref()).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_server_is_listed_while_it_runs_and_not_after() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            berth_store::embedded::EmbeddedStore::open(&dir.path().join("s.redb")).unwrap(),
        );
        let me = LeaderRecord {
            node: "s1".into(),
            api: vec![
                "127.0.0.1:7001".parse().unwrap(),
                "0.0.0.0:7002".parse().unwrap(),
            ],
            pid: 1,
            since: 0,
        };
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(advertise(store.clone(), me.clone(), rx));
        let mut listed = Vec::new();
        for _ in 0..100 {
            listed = list(store.as_ref()).await.unwrap();
            if !listed.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(listed, [me]);
        assert_eq!(authorities(&listed), ["127.0.0.1:7001"]);
        stop.send_replace(true);
        task.await.unwrap().unwrap();
        assert!(list(store.as_ref()).await.unwrap().is_empty());
    }
}
