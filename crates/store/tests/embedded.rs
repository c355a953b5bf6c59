//! Embedded-store behaviour beyond the conformance suite: restart, history
//! retention, close.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::time::Duration;

use berth_store::embedded::{EmbeddedStore, Options};
use berth_store::{Store, StoreError};
use bytes::Bytes;
use futures::StreamExt;

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_leases_and_history_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let (lease, revision) = {
        let store = EmbeddedStore::open(&path).unwrap();
        store.put("/plain", b("1"), 0).await.unwrap();
        let lease = store.lease_grant(Duration::from_secs(2)).await.unwrap();
        let revision = store.put("/leased", b("2"), lease).await.unwrap();
        (lease, revision)
    };
    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(store.revision().await.unwrap(), revision);
    let kv = store
        .get("/leased")
        .await
        .unwrap()
        .expect("leased key survives");
    assert_eq!(
        (kv.lease, kv.mod_revision, kv.version),
        (lease, revision, 1)
    );
    // History survives: a watch from the start replays both puts.
    let mut w = store.watch("/", 2).await.unwrap();
    let first = w.next().await.unwrap().unwrap();
    let second = w.next().await.unwrap().unwrap();
    assert_eq!((first[0].key(), second[0].key()), ("/plain", "/leased"));
    // Lease ids stay unique across restarts.
    let newer = store.lease_grant(Duration::from_secs(60)).await.unwrap();
    assert!(
        newer > lease,
        "lease ids must not be reused after a restart"
    );
    // The old lease is alive again with a full TTL, then expires.
    store.lease_keep_alive(lease).await.unwrap();
    let deleted = tokio::time::timeout(Duration::from_secs(6), w.next())
        .await
        .expect("the restored lease never expired")
        .unwrap()
        .unwrap();
    assert_eq!(deleted[0].key(), "/leased");
    assert!(store.get("/leased").await.unwrap().is_none());
    assert!(store.get("/plain").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_trimmed_to_the_retention() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open_with(
        &dir.path().join("s.redb"),
        Options::default().history_retention(100),
    )
    .unwrap();
    for i in 0..400 {
        store
            .put(&format!("/k/{}", i % 7), b("x"), 0)
            .await
            .unwrap();
    }
    let current = store.revision().await.unwrap();
    assert_eq!(current, 401);
    let mut old = store.watch("/", 2).await.unwrap();
    match old.next().await {
        Some(Err(StoreError::Compacted {
            compact_revision, ..
        })) => {
            assert!(
                compact_revision > current - 111 && compact_revision <= current - 99,
                "kept {} revisions, wanted 100 (+10% slack)",
                current - compact_revision + 1
            );
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    // The last 100 revisions are all still there.
    let mut recent = store.watch("/", current - 99).await.unwrap();
    let mut seen = 0;
    while seen < 100 {
        seen += recent.next().await.unwrap().unwrap().len();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_ends_watches_and_refuses_calls_then_file_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = EmbeddedStore::open(&path).unwrap();
    let clone = store.clone();
    store.put("/a", b("1"), 0).await.unwrap();
    let mut w = store.watch("/", 0).await.unwrap();
    store.close().await;
    match tokio::time::timeout(Duration::from_secs(5), w.next()).await {
        Ok(Some(Err(StoreError::Closed))) => {}
        other => panic!("an open watch must end with Closed, got {other:?}"),
    }
    assert!(matches!(
        clone.put("/b", b("2"), 0).await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(clone.get("/a").await, Err(StoreError::Closed)));
    assert!(matches!(clone.watch("/", 0).await, Err(StoreError::Closed)));
    // Opening the same file while a handle lives is refused, not corrupting.
    assert!(matches!(
        EmbeddedStore::open(&path),
        Err(StoreError::Backend(_))
    ));
    drop((store, clone));
    drop(w);
    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(store.get("/a").await.unwrap().unwrap().value, b("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_failure_turns_every_later_call_into_backend_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    drop(EmbeddedStore::open(&path).unwrap());
    {
        // Damage one row behind the store's back.
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let kv: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("kv");
            let mut table = txn.open_table(kv).unwrap();
            table.insert("/bad", b"\x09garbage".as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let store = EmbeddedStore::open(&path).unwrap();
    let mut w = store.watch("/", 0).await.unwrap();
    // Updating the damaged key makes the writer read it, fail and stop.
    let err = store.put("/bad", b("x"), 0).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Backend(ref m) if m.contains("corrupt")),
        "{err}"
    );
    assert!(matches!(
        store.put("/good", b("x"), 0).await,
        Err(StoreError::Backend(_))
    ));
    assert!(matches!(
        store.get("/good").await,
        Err(StoreError::Backend(_))
    ));
    match tokio::time::timeout(Duration::from_secs(5), w.next()).await {
        Ok(Some(Err(StoreError::Backend(_)))) => {}
        other => panic!("an open watch must end with the failure, got {other:?}"),
    }
}
