//! The conformance suite: the properties every [`Store`] must have, written
//! once and run against each implementation (embedded now, etcd later).
//!
//! Each property is a `pub async fn` taking a fresh, empty store and
//! panicking with a message saying what broke. [`run_all`] runs them all, one
//! fresh store each; [`conformance_tests!`](crate::conformance_tests) turns
//! them into one `#[tokio::test]` per property:
//!
//! ```ignore
//! async fn fresh() -> std::sync::Arc<dyn berth_store::Store> { /* … */ }
//! berth_store::conformance_tests!(fresh);
//! ```
//!
//! The functions need a tokio runtime with timers (they bound every wait so
//! that a broken store fails instead of hanging). Lease properties take a
//! few seconds: they use real 1 s TTLs.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::time::{Instant, sleep, timeout};

use crate::{
    Compare, KeyValue, Op, Revision, Store, StoreError, Txn, WatchBatch, WatchEvent, WatchStream,
};

/// How long any single expected event may take.
const PATIENCE: Duration = Duration::from_secs(10);

/// Calls `$m!` with the name of every property, so that [`run_all`] and
/// [`conformance_tests!`](crate::conformance_tests) cannot drift apart.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_properties {
    ($m:path, $make:expr) => {
        $m! {
            $make;
            revision_counts_write_txns,
            put_get_delete_metadata,
            range_is_sorted_and_exact_prefix,
            txn_compares_mod_revision,
            concurrent_cas_increments_lose_nothing,
            watch_from_now_sees_later_writes_in_order,
            watch_from_past_replays_then_continues_live,
            watch_ignores_keys_outside_prefix,
            delete_prefix_emits_one_delete_per_key,
            slow_watcher_gets_every_event_or_compacted,
            compaction_fails_older_watches,
            lease_expiry_deletes_keys_and_notifies,
            lease_keep_alive_keeps_keys,
            lease_revoke_deletes_keys_now,
            put_with_unknown_lease_fails
        }
    };
}

/// One `#[tokio::test]` per conformance property. `$make` is an async fn (or
/// closure) returning a fresh, empty `Arc<dyn Store>`. The calling crate needs
/// `tokio` with the `macros` and `rt-multi-thread` features.
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::__conformance_properties!($crate::__conformance_test_fns, $make);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_test_fns {
    ($make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let store: ::std::sync::Arc<dyn $crate::Store> = ($make)().await;
                $crate::conformance::$name(&*store).await;
            }
        )*
    };
}

macro_rules! run_each {
    ($make:expr; $($name:ident),* $(,)?) => {
        $(
            {
                let store = ($make)().await;
                tracing::info!(property = stringify!($name), "conformance");
                $name(&*store).await;
            }
        )*
    };
}

/// Run every property, each on a fresh store from `make`.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    crate::__conformance_properties!(run_each, make);
}

// ---------------------------------------------------------------- helpers

fn v(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

async fn must<T>(what: &str, f: impl Future<Output = crate::Result<T>>) -> T {
    match timeout(PATIENCE, f).await {
        Err(_) => panic!("{what}: no answer within {PATIENCE:?}"),
        Ok(Err(e)) => panic!("{what}: unexpected error: {e}"),
        Ok(Ok(t)) => t,
    }
}

async fn get(s: &dyn Store, key: &str) -> Option<KeyValue> {
    must(&format!("get {key}"), s.get(key)).await
}

async fn put(s: &dyn Store, key: &str, value: &str) -> Revision {
    must(&format!("put {key}"), s.put(key, v(value), 0)).await
}

async fn watch(s: &dyn Store, prefix: &str, from: Revision) -> WatchStream {
    must(
        &format!("watch {prefix} from {from}"),
        s.watch(prefix, from),
    )
    .await
}

async fn next_batch(w: &mut WatchStream, what: &str) -> WatchBatch {
    match timeout(PATIENCE, w.next()).await {
        Err(_) => panic!("{what}: no watch event within {PATIENCE:?}"),
        Ok(None) => panic!("{what}: the watch ended"),
        Ok(Some(Err(e))) => panic!("{what}: watch error: {e}"),
        Ok(Some(Ok(batch))) => {
            assert!(!batch.is_empty(), "{what}: the watch sent an empty batch");
            let revision = batch[0].revision();
            assert!(
                batch.iter().all(|e| e.revision() == revision),
                "{what}: one batch mixes revisions: {batch:?}"
            );
            batch
        }
    }
}

/// Read single-event batches until `count` events have arrived.
async fn collect_events(w: &mut WatchStream, count: usize, what: &str) -> Vec<WatchEvent> {
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        out.extend(next_batch(w, what).await);
    }
    out
}

async fn assert_quiet(w: &mut WatchStream, within: Duration, what: &str) {
    if let Ok(item) = timeout(within, w.next()).await {
        panic!("{what}: expected no watch event, got {item:?}");
    }
}

fn put_event(e: &WatchEvent) -> &KeyValue {
    match e {
        WatchEvent::Put(kv) => kv,
        other => panic!("expected a put event, got {other:?}"),
    }
}

// ------------------------------------------------------------- properties

/// Every write transaction that changes something adds exactly 1 to the
/// revision; writes that change nothing add nothing. Counted from the
/// store's revision at the start (at least 1), not from 1: a store may share
/// its revision counter with others (several namespaces of one etcd).
pub async fn revision_counts_write_txns(s: &dyn Store) {
    let base = must("revision", s.revision()).await;
    assert!(base >= 1, "revisions start at 1, got {base}");
    assert_eq!(put(s, "/a", "1").await, base + 1, "a put must add 1");
    assert_eq!(put(s, "/b", "1").await, base + 2);
    assert_eq!(must("revision", s.revision()).await, base + 2);
    assert_eq!(
        must("delete absent", s.delete("/absent")).await,
        base + 2,
        "deleting an absent key must not create a revision"
    );
    let two_puts = Txn {
        success: vec![Op::put("/c", v("1")), Op::put("/d", v("1"))],
        ..Txn::default()
    };
    let r = must("txn of two puts", s.txn(two_puts)).await;
    assert!(r.succeeded);
    assert_eq!(
        r.revision,
        base + 3,
        "a transaction is one revision however many ops it has"
    );
    let failing = Txn {
        compare: vec![Compare::ModRevision("/a".into(), 999_999_999)],
        success: vec![Op::put("/a", v("2"))],
        failure: vec![],
    };
    let r = must("failing txn", s.txn(failing)).await;
    assert!(!r.succeeded);
    assert_eq!(
        r.revision,
        base + 3,
        "a txn that writes nothing must not create a revision"
    );
    assert_eq!(must("delete", s.delete("/a")).await, base + 4);
    assert_eq!(must("revision", s.revision()).await, base + 4);
}

/// get/put/delete keep etcd's create_revision, mod_revision and version.
pub async fn put_get_delete_metadata(s: &dyn Store) {
    assert_eq!(get(s, "/k").await, None, "a fresh store has no /k");
    let r1 = must("put", s.put("/k", v("one"), 0)).await;
    let kv = get(s, "/k").await.expect("/k after put");
    assert_eq!(kv.key, "/k");
    assert_eq!(kv.value, v("one"));
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version, kv.lease),
        (r1, r1, 1, 0)
    );
    let r2 = put(s, "/k", "two").await;
    assert_eq!(r2, r1 + 1);
    let kv = get(s, "/k").await.expect("/k after second put");
    assert_eq!(kv.value, v("two"));
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (r1, r2, 2),
        "an update keeps create_revision and bumps version"
    );
    let r3 = must("delete", s.delete("/k")).await;
    assert_eq!(r3, r2 + 1);
    assert_eq!(get(s, "/k").await, None, "/k after delete");
    let r4 = put(s, "/k", "three").await;
    let kv = get(s, "/k").await.expect("/k after re-create");
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (r4, r4, 1),
        "re-creating a deleted key starts its history over"
    );
}

/// range returns exactly the keys with the prefix, sorted, and the revision
/// it is consistent with.
pub async fn range_is_sorted_and_exact_prefix(s: &dyn Store) {
    for key in ["/a/2", "/ab", "/a/1", "/b/1", "/a", "/a/3", "/a/1/x"] {
        put(s, key, key).await;
    }
    let current = must("revision", s.revision()).await;
    let (kvs, revision) = must("range /a/", s.range("/a/")).await;
    let keys: Vec<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        ["/a/1", "/a/1/x", "/a/2", "/a/3"],
        "/a/ must not match /ab or /a"
    );
    assert_eq!(revision, current, "range must report the current revision");
    assert!(kvs.iter().all(|kv| kv.value == v(&kv.key)));
    let (kvs, _) = must("range /a", s.range("/a")).await;
    let keys: Vec<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/a", "/a/1", "/a/1/x", "/a/2", "/a/3", "/ab"]);
    let (kvs, _) = must("range everything", s.range("")).await;
    assert_eq!(kvs.len(), 7, "the empty prefix matches every key");
    let (kvs, _) = must("range /zz", s.range("/zz")).await;
    assert!(kvs.is_empty());
}

/// Transactions compare mod_revision (0 = absent) and apply exactly one
/// branch.
pub async fn txn_compares_mod_revision(s: &dyn Store) {
    let create = |value: &str| Txn {
        compare: vec![Compare::ModRevision("/lock".into(), 0)],
        success: vec![Op::put("/lock", v(value))],
        failure: vec![Op::put("/lost", v(value))],
    };
    let r = must("create if absent", s.txn(create("first"))).await;
    assert!(r.succeeded, "mod_revision 0 must match an absent key");
    let kv = get(s, "/lock").await.expect("/lock after create");
    assert_eq!(kv.mod_revision, r.revision);
    let r2 = must("create again", s.txn(create("second"))).await;
    assert!(!r2.succeeded, "mod_revision 0 must not match a present key");
    assert_eq!(get(s, "/lock").await.expect("/lock").value, v("first"));
    assert_eq!(
        get(s, "/lost")
            .await
            .expect("the failure branch must have run")
            .value,
        v("second")
    );
    let swap = |expected: Revision, value: &str| Txn {
        compare: vec![Compare::ModRevision("/lock".into(), expected)],
        success: vec![Op::put("/lock", v(value))],
        failure: vec![],
    };
    let stale = must(
        "swap with stale revision",
        s.txn(swap(kv.mod_revision - 1, "x")),
    )
    .await;
    assert!(!stale.succeeded);
    let ok = must(
        "swap with current revision",
        s.txn(swap(kv.mod_revision, "third")),
    )
    .await;
    assert!(ok.succeeded);
    assert_eq!(ok.revision, r2.revision + 1);
    assert_eq!(get(s, "/lock").await.expect("/lock").value, v("third"));
    let both = Txn {
        compare: vec![
            Compare::ModRevision("/lock".into(), ok.revision),
            Compare::ModRevision("/nope".into(), 0),
        ],
        success: vec![Op::Delete("/lock".into()), Op::put("/done", v("1"))],
        failure: vec![],
    };
    let r = must("multi-compare txn", s.txn(both)).await;
    assert!(r.succeeded, "every compare holds");
    assert_eq!(get(s, "/lock").await, None);
    assert_eq!(
        get(s, "/done").await.expect("/done").mod_revision,
        r.revision
    );
}

/// Many concurrent compare-and-swap increments of one counter end at the
/// exact count: no lost update.
pub async fn concurrent_cas_increments_lose_nothing(s: &dyn Store) {
    const TASKS: usize = 16;
    const EACH: usize = 25;
    let start = must("revision", s.revision()).await;
    let workers = (0..TASKS).map(|_| async move {
        for _ in 0..EACH {
            loop {
                let current = get(s, "/counter").await;
                let (n, rev) = match &current {
                    None => (0u64, 0),
                    Some(kv) => (
                        std::str::from_utf8(&kv.value)
                            .ok()
                            .and_then(|t| t.parse().ok())
                            .expect("counter holds a number"),
                        kv.mod_revision,
                    ),
                };
                let txn = Txn {
                    compare: vec![Compare::ModRevision("/counter".into(), rev)],
                    success: vec![Op::put("/counter", v(&(n + 1).to_string()))],
                    failure: vec![],
                };
                if must("cas increment", s.txn(txn)).await.succeeded {
                    break;
                }
            }
        }
    });
    futures::future::join_all(workers).await;
    let kv = get(s, "/counter").await.expect("/counter");
    let total = (TASKS * EACH) as u64;
    assert_eq!(
        kv.value,
        v(&total.to_string()),
        "lost update: counter is not {total}"
    );
    assert_eq!(kv.version, total as i64);
    assert_eq!(
        must("revision", s.revision()).await,
        start + total as i64,
        "only successful increments may create revisions"
    );
}

/// A watch from now sees the later writes, in order, and nothing earlier.
pub async fn watch_from_now_sees_later_writes_in_order(s: &dyn Store) {
    put(s, "/w/before", "x").await;
    let mut w = watch(s, "/w/", 0).await;
    let mut revisions = Vec::new();
    for i in 0..20 {
        revisions.push(put(s, &format!("/w/{i:02}"), &i.to_string()).await);
    }
    let events = collect_events(&mut w, 20, "watch from now").await;
    for (i, (event, revision)) in events.iter().zip(&revisions).enumerate() {
        let kv = put_event(event);
        assert_eq!(
            kv.key,
            format!("/w/{i:02}"),
            "events out of order or an earlier write seen"
        );
        assert_eq!(kv.mod_revision, *revision);
        assert_eq!(kv.value, v(&i.to_string()));
    }
    assert_quiet(&mut w, Duration::from_millis(200), "after the last write").await;
}

/// A watch from a past revision replays history from there, then follows live
/// writes made while it starts, with no gap and no duplicate.
pub async fn watch_from_past_replays_then_continues_live(s: &dyn Store) {
    let mut revisions = Vec::new();
    for i in 0..10 {
        revisions.push(put(s, &format!("/p/{i:02}"), "old").await);
    }
    let from = revisions[3];
    let writer = async {
        for i in 10..40 {
            put(s, &format!("/p/{i:02}"), "new").await;
            tokio::task::yield_now().await;
        }
    };
    let reader = async {
        let mut w = watch(s, "/p/", from).await;
        collect_events(&mut w, 36, "watch from the past").await
    };
    let ((), events) = futures::join!(writer, reader);
    let got: Vec<Revision> = events.iter().map(WatchEvent::revision).collect();
    let want: Vec<Revision> = (from..from + 36).collect();
    assert_eq!(
        got, want,
        "replay then live must be gapless and without duplicates"
    );
    for (i, event) in events.iter().enumerate() {
        assert_eq!(put_event(event).key, format!("/p/{:02}", i + 3));
    }
}

/// A prefix watch only sees keys under its prefix, even within one txn.
pub async fn watch_ignores_keys_outside_prefix(s: &dyn Store) {
    let mut w = watch(s, "/a/", 0).await;
    put(s, "/ab", "no").await;
    put(s, "/a", "no").await;
    put(s, "/b/1", "no").await;
    let r = put(s, "/a/1", "yes").await;
    let batch = next_batch(&mut w, "prefix watch").await;
    assert_eq!(batch.len(), 1, "only /a/1 matches: {batch:?}");
    assert_eq!(put_event(&batch[0]).key, "/a/1");
    assert_eq!(batch[0].revision(), r);
    let mixed = Txn {
        success: vec![
            Op::put("/b/2", v("no")),
            Op::put("/a/2", v("yes")),
            Op::put("/ac", v("no")),
        ],
        ..Txn::default()
    };
    must("mixed txn", s.txn(mixed)).await;
    let batch = next_batch(&mut w, "prefix watch, mixed txn").await;
    let keys: Vec<&str> = batch.iter().map(WatchEvent::key).collect();
    assert_eq!(keys, ["/a/2"], "a batch carries only the matching events");
    assert_quiet(&mut w, Duration::from_millis(200), "nothing else matches").await;
}

/// Deleting a prefix deletes exactly those keys, as one revision with one
/// Delete event each.
pub async fn delete_prefix_emits_one_delete_per_key(s: &dyn Store) {
    for key in ["/d/1", "/d/2", "/d/3/x", "/dd"] {
        put(s, key, "x").await;
    }
    let mut w = watch(s, "/d", 0).await;
    let r = must(
        "delete prefix",
        s.txn(Txn {
            success: vec![Op::DeletePrefix("/d/".into())],
            ..Txn::default()
        }),
    )
    .await;
    assert!(r.succeeded);
    let batch = next_batch(&mut w, "delete prefix").await;
    let mut deleted: Vec<&str> = batch
        .iter()
        .map(|e| match e {
            WatchEvent::Delete { key, mod_revision } => {
                assert_eq!(*mod_revision, r.revision);
                key.as_str()
            }
            other => panic!("expected deletes only, got {other:?}"),
        })
        .collect();
    deleted.sort_unstable();
    assert_eq!(deleted, ["/d/1", "/d/2", "/d/3/x"]);
    let (left, _) = must("range /d", s.range("/d")).await;
    let left: Vec<&str> = left.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(left, ["/dd"], "/dd does not start with /d/");
}

/// A watcher that falls thousands of events behind still gets every event in
/// order — or an explicit Compacted error — never a silent gap.
pub async fn slow_watcher_gets_every_event_or_compacted(s: &dyn Store) {
    const WRITERS: usize = 32;
    const EACH: usize = 160;
    const TOTAL: usize = WRITERS * EACH;
    let mut w = watch(s, "/s/", 0).await;
    // Read one event first, so the watcher is following live events (not
    // replaying) when it falls behind.
    let start = put(s, "/s/first", "x").await;
    let first = next_batch(&mut w, "slow watcher, first event").await;
    assert_eq!(first[0].revision(), start);
    let writers = (0..WRITERS).map(|t| async move {
        for i in 0..EACH {
            put(s, &format!("/s/{t:02}/{i:04}"), "x").await;
        }
    });
    // Nobody reads the watch while the writes happen.
    futures::future::join_all(writers).await;
    let mut expected = start + 1;
    let mut keys = BTreeSet::new();
    while keys.len() < TOTAL {
        match timeout(PATIENCE, w.next()).await {
            Err(_) => panic!(
                "slow watcher: stalled after {} of {TOTAL} events",
                keys.len()
            ),
            Ok(None) => panic!("slow watcher: watch ended after {} events", keys.len()),
            Ok(Some(Err(StoreError::Compacted { .. }))) => {
                // Allowed: the store said so. What came before was checked.
                return;
            }
            Ok(Some(Err(e))) => panic!("slow watcher: {e}"),
            Ok(Some(Ok(batch))) => {
                for event in batch {
                    assert_eq!(
                        event.revision(),
                        expected,
                        "slow watcher: gap or reordering after {} events",
                        keys.len()
                    );
                    expected += 1;
                    assert!(
                        keys.insert(put_event(&event).key.clone()),
                        "duplicate event"
                    );
                }
            }
        }
    }
    assert_eq!(expected, start + 1 + TOTAL as i64);
}

/// After compaction, a watch from before the compacted revision gets
/// Compacted and ends; a watch from after it replays normally.
pub async fn compaction_fails_older_watches(s: &dyn Store) {
    let mut revisions = Vec::new();
    for i in 0..10 {
        revisions.push(put(s, &format!("/c/{i}"), "x").await);
    }
    let at = revisions[5];
    must("compact", s.compact(at)).await;
    let old = revisions[1];
    let mut w = watch(s, "/c/", old).await;
    match timeout(PATIENCE, w.next()).await {
        Ok(Some(Err(StoreError::Compacted {
            requested,
            compact_revision,
        }))) => {
            assert_eq!(requested, old);
            assert!(
                compact_revision > old && compact_revision <= at,
                "compact_revision {compact_revision} must be in ({old}, {at}]"
            );
        }
        other => {
            panic!("a watch from a compacted revision must fail with Compacted, got {other:?}")
        }
    }
    match timeout(PATIENCE, w.next()).await {
        Ok(None) => {}
        other => panic!("the watch must end after Compacted, got {other:?}"),
    }
    let mut w = watch(s, "/c/", at + 1).await;
    let events = collect_events(&mut w, 4, "watch after the compacted revision").await;
    let got: Vec<Revision> = events.iter().map(WatchEvent::revision).collect();
    assert_eq!(got, revisions[6..].to_vec());
    let (kvs, _) = must("range after compaction", s.range("/c/")).await;
    assert_eq!(kvs.len(), 10, "compaction drops history, not keys");
}

/// An expired lease deletes its keys, and watchers see the deletes.
pub async fn lease_expiry_deletes_keys_and_notifies(s: &dyn Store) {
    // Stamped before the grant: the TTL runs from the grant, and the set-up
    // below may take a while on a loaded machine.
    let granted = Instant::now();
    let lease = must("grant", s.lease_grant(Duration::from_secs(1))).await;
    must("put with lease", s.put("/l/a", v("x"), lease)).await;
    must("put with lease", s.put("/l/b", v("x"), lease)).await;
    put(s, "/l/plain", "x").await;
    assert_eq!(get(s, "/l/a").await.expect("/l/a").lease, lease);
    let mut w = watch(s, "/l/", 0).await;
    let mut deleted = BTreeSet::new();
    while deleted.len() < 2 {
        for event in next_batch(&mut w, "lease expiry").await {
            match event {
                WatchEvent::Delete { key, .. } => {
                    deleted.insert(key);
                }
                other => panic!("expected lease deletes, got {other:?}"),
            }
        }
    }
    assert!(
        granted.elapsed() >= Duration::from_millis(500),
        "the lease expired long before its TTL"
    );
    assert_eq!(deleted.into_iter().collect::<Vec<_>>(), ["/l/a", "/l/b"]);
    assert_eq!(get(s, "/l/a").await, None);
    assert!(
        get(s, "/l/plain").await.is_some(),
        "a key without lease must stay"
    );
    assert!(
        matches!(s.lease_keep_alive(lease).await, Err(StoreError::LeaseNotFound(id)) if id == lease),
        "keep-alive of an expired lease must fail with LeaseNotFound"
    );
}

/// Keep-alives keep a lease (and its keys) alive past its TTL; it expires
/// once they stop.
pub async fn lease_keep_alive_keeps_keys(s: &dyn Store) {
    // A 2 s TTL renewed every 250 ms: a keep-alive may come up to 1.75 s
    // late (a loaded machine) before the lease lapses.
    let lease = must("grant", s.lease_grant(Duration::from_secs(2))).await;
    must("put with lease", s.put("/ka", v("x"), lease)).await;
    for _ in 0..12 {
        sleep(Duration::from_millis(250)).await;
        must("keep-alive", s.lease_keep_alive(lease)).await;
    }
    assert!(
        get(s, "/ka").await.is_some(),
        "kept-alive lease lost its key after 3 s (past its 2 s TTL)"
    );
    let stopped = Instant::now();
    while get(s, "/ka").await.is_some() {
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "the lease did not expire within 10 s after keep-alives stopped"
        );
        sleep(Duration::from_millis(50)).await;
    }
}

/// Revoking a lease deletes its keys at once (one revision); keys moved off
/// the lease stay; the lease is gone afterwards.
pub async fn lease_revoke_deletes_keys_now(s: &dyn Store) {
    let lease = must("grant", s.lease_grant(Duration::from_secs(60))).await;
    must("put", s.put("/r/1", v("x"), lease)).await;
    must("put", s.put("/r/2", v("x"), lease)).await;
    must("put", s.put("/r/moved", v("x"), lease)).await;
    put(s, "/r/moved", "detached").await;
    put(s, "/r/plain", "x").await;
    let mut w = watch(s, "/r/", 0).await;
    must("revoke", s.lease_revoke(lease)).await;
    let batch = next_batch(&mut w, "revoke").await;
    let mut keys: Vec<&str> = batch
        .iter()
        .map(|e| match e {
            WatchEvent::Delete { key, .. } => key.as_str(),
            other => panic!("expected deletes, got {other:?}"),
        })
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["/r/1", "/r/2"],
        "revoke deletes the lease's keys in one revision"
    );
    assert!(
        get(s, "/r/moved").await.is_some(),
        "a key re-put without lease left it"
    );
    assert!(get(s, "/r/plain").await.is_some());
    assert!(matches!(
        s.lease_revoke(lease).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    assert!(matches!(
        s.lease_keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(_))
    ));
}

/// Putting with a lease that does not exist fails and changes nothing, even
/// inside a transaction with other ops.
pub async fn put_with_unknown_lease_fails(s: &dyn Store) {
    let before = must("revision", s.revision()).await;
    let bogus = 0x7eed_beef;
    assert!(
        matches!(s.put("/u", v("x"), bogus).await, Err(StoreError::LeaseNotFound(id)) if id == bogus),
        "put with an unknown lease must fail with LeaseNotFound"
    );
    let txn = Txn {
        success: vec![
            Op::put("/u/other", v("x")),
            Op::Put {
                key: "/u".into(),
                value: v("x"),
                lease: bogus,
            },
        ],
        ..Txn::default()
    };
    assert!(matches!(
        s.txn(txn).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    assert_eq!(
        get(s, "/u/other").await,
        None,
        "a failed txn must not apply any op"
    );
    assert_eq!(must("revision", s.revision()).await, before);
}
