//! What only the etcd store has to get right, against real etcd processes:
//! member failover under a live watch, a watch re-attaching to a compacted
//! revision, connection errors, namespace isolation, and authentication.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

use berth_store::etcd::{EtcdConfig, EtcdStore};
use berth_store::{Revision, Store, StoreError, WatchEvent};
use bytes::Bytes;
use futures::StreamExt;
use support::etcd::{EtcdCluster, etcdctl};
use tokio::time::{Instant, sleep, timeout};

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// Number of watch streams a member serves, from its Prometheus metrics.
fn watch_streams(client_port: u16) -> Option<u64> {
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", client_port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    conn.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("etcd_debugging_mvcc_watch_stream_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// Puts until one succeeds, as a caller's retry loop would; returns the
/// revision and how long it took.
async fn put_retrying(store: &EtcdStore, key: &str) -> (Revision, Duration) {
    let started = Instant::now();
    loop {
        match store.put(key, b(key), 0).await {
            Ok(revision) => return (revision, started.elapsed()),
            Err(e) => {
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "put {key} kept failing for 30 s: {e}"
                );
                sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The acceptance scenario for failover: a 3-member cluster, a watch open
/// through a store that knows all three endpoints, writes going on; kill -9
/// the member serving the watch, later the leader. Writes resume after a
/// short pause and the watch delivers every revision, without gap or
/// duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_and_writes_survive_member_and_leader_kill() {
    let mut cluster = EtcdCluster::start(3).await;
    let store = cluster.store("/failover").await;
    let start = store.revision().await.unwrap();
    let mut watch = store.watch("/k/", 0).await.unwrap();

    // Which member holds the watch stream: that is the one to kill.
    let deadline = Instant::now() + Duration::from_secs(10);
    let watched = loop {
        let serving: Vec<usize> = (0..3)
            .filter(|&i| watch_streams(cluster.members[i].client_port).unwrap_or(0) > 0)
            .collect();
        if let [one] = serving[..] {
            break one;
        }
        assert!(
            Instant::now() < deadline,
            "cannot tell which member serves the watch: {serving:?}"
        );
        sleep(Duration::from_millis(100)).await;
    };

    const WRITES: usize = 90;
    let done = std::sync::atomic::AtomicBool::new(false);
    let writer = async {
        let mut written = BTreeMap::new();
        let mut slowest = Duration::ZERO;
        for i in 0..WRITES {
            if i == 30 {
                cluster.members[watched].kill();
                // The reader keeps polling: its watch must move to a
                // surviving member by itself, live.
                let deadline = Instant::now() + Duration::from_secs(15);
                while !(0..3).any(|m| {
                    m != watched && watch_streams(cluster.members[m].client_port).unwrap_or(0) > 0
                }) {
                    assert!(
                        Instant::now() < deadline,
                        "the watch did not re-attach elsewhere"
                    );
                    sleep(Duration::from_millis(100)).await;
                }
            }
            if i == 50 {
                // Bring it back, then take the leader away.
                cluster.members[watched].restart();
                cluster.wait_healthy().await;
                let leader = cluster.leader().await;
                cluster.members[leader].kill();
            }
            let key = format!("/k/{i:03}");
            let (revision, took) = put_retrying(&store, &key).await;
            slowest = slowest.max(took);
            written.insert(key, revision);
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        (written, slowest)
    };
    let reader = async {
        // Every revision after `start` is one of our puts (a put whose reply
        // was lost may have applied and been retried: the same key twice).
        let mut expected = start + 1;
        let mut seen = BTreeMap::new();
        while seen.len() < WRITES {
            let batch = match timeout(Duration::from_secs(20), watch.next()).await {
                Ok(Some(Ok(batch))) => batch,
                other => panic!("watch stalled or failed at revision {expected}: {other:?}"),
            };
            for event in batch {
                assert_eq!(event.revision(), expected, "gap or duplicate in the watch");
                expected += 1;
                let WatchEvent::Put(kv) = event else {
                    panic!("unexpected delete {event:?}")
                };
                assert_eq!(kv.value, b(&kv.key));
                seen.insert(kv.key.clone(), kv.mod_revision);
            }
        }
        seen
    };
    let ((written, slowest), seen) = futures::join!(writer, reader);
    assert!(done.into_inner());
    assert!(
        slowest < Duration::from_secs(10),
        "a write paused for {slowest:?} during failover"
    );
    for (key, revision) in &written {
        assert!(seen.contains_key(key), "the watch never delivered {key}");
        assert!(seen[key] >= *revision, "{key} seen at an older revision");
    }
}

/// Which single member serves watch streams (waits until exactly one does).
async fn member_serving_the_watch(cluster: &EtcdCluster) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let serving: Vec<usize> = (0..cluster.members.len())
            .filter(|&i| {
                cluster.members[i].is_running()
                    && watch_streams(cluster.members[i].client_port).unwrap_or(0) > 0
            })
            .collect();
        if let [one] = serving[..] {
            return one;
        }
        assert!(
            Instant::now() < deadline,
            "cannot tell which member serves the watch: {serving:?}"
        );
        sleep(Duration::from_millis(100)).await;
    }
}

/// With user/password auth on a 3-member cluster, a watch keeps delivering
/// when the member serving it dies and it re-attaches to a member that does
/// not know its auth token. etcd's default "simple" tokens live in each
/// member's memory: the other two members are restarted first, so they have
/// forgotten the store's token, and nothing else uses the store meanwhile
/// (its unary calls would log in again by themselves). etcd then cancels the
/// re-attached watch with "invalid auth token"; the watch must log in again
/// rather than end (it used to end, and a berth server with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_watch_survives_moving_to_a_member_that_lost_its_token() {
    let mut cluster = EtcdCluster::start(3).await;
    let endpoints = cluster.endpoints();
    etcdctl(&endpoints, &["user", "add", "root:rootpw"]);
    etcdctl(&endpoints, &["auth", "enable"]);

    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("pw");
    std::fs::write(&password_file, "rootpw\n").unwrap();
    let url = format!(
        "etcd://{}/auth?user=root&password-file={}",
        endpoints.join(","),
        password_file.display()
    );
    let store = EtcdStore::connect(EtcdConfig::from_url(&url).unwrap())
        .await
        .unwrap();
    let first = store.put("/k/0", b("0"), 0).await.unwrap();
    let mut watch = store.watch("/k/", first).await.unwrap();
    let batch = timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("the watch delivered nothing within 10 s")
        .unwrap()
        .unwrap();
    assert_eq!(batch[0].revision(), first);

    // A write after the store's login, so the restarted members' data
    // covers the login's raft entry and they do not replay it.
    etcdctl(
        &endpoints,
        &["--user=root:rootpw", "put", "/auth/marker", "x"],
    );
    let watched = member_serving_the_watch(&cluster).await;
    for m in (0..3).filter(|&m| m != watched) {
        cluster.members[m].stop();
        cluster.members[m].restart();
        cluster.wait_healthy().await;
    }
    cluster.members[watched].kill();
    let survivors: Vec<String> = (0..3)
        .filter(|&m| m != watched)
        .map(|m| cluster.members[m].endpoint())
        .collect();
    // Written by someone else, so the store itself makes no call that
    // would renew its token before the watch re-attaches.
    etcdctl(&survivors, &["--user=root:rootpw", "put", "/auth/k/1", "1"]);
    let batch = match timeout(Duration::from_secs(30), watch.next()).await {
        Ok(Some(Ok(batch))) => batch,
        other => panic!("the watch did not survive the move to another member: {other:?}"),
    };
    let WatchEvent::Put(kv) = &batch[0] else {
        panic!("unexpected {batch:?}")
    };
    assert_eq!((kv.key.as_str(), &kv.value[..]), ("/k/1", &b"1"[..]));

    // And it goes on: the store's own writes reach it too.
    let r = put_retrying(&store, "/k/2").await.0;
    let batch = timeout(Duration::from_secs(20), watch.next())
        .await
        .expect("the watch delivered nothing within 20 s")
        .unwrap()
        .unwrap();
    assert_eq!(batch[0].revision(), r);
}

/// A watch whose stream broke re-attaches from its next revision; if that
/// was compacted meanwhile, it says Compacted (then ends) instead of
/// silently skipping. The stream is lazy: not polling it while etcd restarts
/// makes the order of events deterministic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reattaching_watch_reports_compaction() {
    let mut etcd = EtcdCluster::single().await;
    let store = etcd.store("/c").await;
    let mut watch = store.watch("/w/", 0).await.unwrap();
    let first = store.put("/w/1", b("x"), 0).await.unwrap();
    let batch = timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(batch[0].revision(), first);

    etcd.members[0].kill();
    etcd.members[0].restart();
    etcd.wait_healthy().await;
    let (mut last, _) = put_retrying(&store, "/w/2").await;
    for i in 3..6 {
        last = store.put(&format!("/w/{i}"), b("x"), 0).await.unwrap();
    }
    store.compact(last).await.unwrap();

    match timeout(Duration::from_secs(30), watch.next()).await {
        Ok(Some(Err(StoreError::Compacted {
            requested,
            compact_revision,
        }))) => {
            assert_eq!(
                requested,
                first + 1,
                "resumes right after the last delivered event"
            );
            assert_eq!(compact_revision, last);
        }
        other => panic!("expected Compacted after re-attaching, got {other:?}"),
    }
    assert!(
        timeout(Duration::from_secs(5), watch.next())
            .await
            .unwrap()
            .is_none(),
        "the watch ends after Compacted"
    );
}

/// A watch whose stream broke but whose history is still there resumes
/// with no gap and no duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reattaching_watch_resumes_without_gap() {
    let mut etcd = EtcdCluster::single().await;
    let store = etcd.store("/r").await;
    let mut watch = store.watch("/w/", 0).await.unwrap();
    let first = store.put("/w/1", b("x"), 0).await.unwrap();
    let batch = timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(batch[0].revision(), first);
    etcd.members[0].kill();
    etcd.members[0].restart();
    etcd.wait_healthy().await;
    let (second, _) = put_retrying(&store, "/w/2").await;
    let third = store.put("/w/3", b("x"), 0).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        let batch = timeout(Duration::from_secs(30), watch.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        got.extend(batch.iter().map(|e| (e.key().to_owned(), e.revision())));
    }
    assert_eq!(
        got,
        [("/w/2".to_owned(), second), ("/w/3".to_owned(), third)]
    );
}

/// Two namespaces on one etcd do not see each other's keys or events, and
/// keys come back without the namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_are_isolated_and_stripped() {
    let etcd = EtcdCluster::single().await;
    let a = etcd.store("/tenant-a").await;
    let b_store = etcd.store("/tenant-b").await;
    let mut watch_b = b_store.watch("", 0).await.unwrap();
    a.put("/berth/x", b("a"), 0).await.unwrap();
    let rb = b_store.put("/berth/x", b("b"), 0).await.unwrap();
    assert_eq!(a.get("/berth/x").await.unwrap().unwrap().value, b("a"));
    let (kvs, _) = b_store.range("").await.unwrap();
    assert_eq!(kvs.len(), 1);
    assert_eq!(
        (kvs[0].key.as_str(), kvs[0].value.clone()),
        ("/berth/x", b("b"))
    );
    let batch = timeout(Duration::from_secs(10), watch_b.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!((batch[0].key(), batch[0].revision()), ("/berth/x", rb));
    // The raw etcd holds both, under their prefixes.
    let mut raw = etcd.store("").await;
    let (all, _) = raw.range("/tenant-").await.unwrap();
    let keys: Vec<&str> = all.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/tenant-a/berth/x", "/tenant-b/berth/x"]);
    raw = etcd.store("/tenant-b").await;
    raw.delete("/berth/x").await.unwrap();
    assert!(a.get("/berth/x").await.unwrap().is_some());
}

/// etcd refuses a transaction of more than `--max-txn-ops` (128) ops
/// whole; the chunked commit berth's big writers use gets all of them in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_writes_go_in_chunks_under_max_txn_ops() {
    use berth_store::chunk::{self, Part};
    use berth_store::{Compare, Op, Txn};
    let etcd = EtcdCluster::single().await;
    let store = etcd.store("/chunks").await;
    let fence = store.put("/leader", b("me"), 0).await.unwrap();
    let put = |i: usize| Op::put(format!("/k/{i:03}"), b("v"));
    let whole = Txn {
        compare: Vec::new(),
        success: (0..150).map(put).collect(),
        failure: Vec::new(),
    };
    let err = store.txn(whole).await.unwrap_err();
    assert!(err.to_string().contains("too many operations"), "{err}");
    let common = [Compare::ModRevision("/leader".into(), fence)];
    let parts: Vec<Part> = (0..300)
        .map(|i| Part::guarded(Compare::ModRevision(format!("/k/{i:03}"), 0), put(i)))
        .collect();
    let done = chunk::commit(&store, &common, parts).await.unwrap();
    assert!(done.complete(), "{done:?}");
    assert_eq!(done.of, 4);
    let (kvs, rev) = store.range("/k/").await.unwrap();
    assert_eq!(kvs.len(), 300);
    assert_eq!(done.revision, Some(rev));
    // A moved fence stops the very first chunk: a deposed leader writes
    // nothing, however big its plan.
    store.put("/leader", b("other"), 0).await.unwrap();
    let parts: Vec<Part> = (300..450)
        .map(|i| Part::guarded(Compare::ModRevision(format!("/k/{i:03}"), 0), put(i)))
        .collect();
    let done = chunk::commit(&store, &common, parts).await.unwrap();
    assert_eq!((done.applied, done.revision), (0, None));
    assert_eq!(store.range("/k/").await.unwrap().0.len(), 300);
}

/// Nothing listening: connect fails within its timeout, naming the endpoint.
#[tokio::test]
async fn connect_to_nothing_fails_fast_and_says_where() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = EtcdConfig::new([format!("127.0.0.1:{port}")]);
    config.connect_timeout = Duration::from_secs(1);
    let started = Instant::now();
    let err = EtcdStore::connect(config).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let message = err.to_string();
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
}

/// With auth enabled in etcd: the right credentials (from an etcd:// URL)
/// work, none or wrong ones are refused at connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_with_user_and_password() {
    let etcd = EtcdCluster::single().await;
    let endpoint = etcd.endpoints()[0].clone();
    let etcdctl = |args: &[&str]| etcdctl(std::slice::from_ref(&endpoint), args);
    etcdctl(&["user", "add", "root:rootpw"]);
    etcdctl(&["auth", "enable"]);

    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("pw");
    std::fs::write(&password_file, "rootpw\n").unwrap();
    let url = format!(
        "etcd://{endpoint}/auth?user=root&password-file={}",
        password_file.display()
    );
    let store = EtcdStore::connect(EtcdConfig::from_url(&url).unwrap())
        .await
        .unwrap();
    let r = store.put("/k", b("v"), 0).await.unwrap();
    assert_eq!(store.get("/k").await.unwrap().unwrap().mod_revision, r);
    let mut watch = store.watch("/", 0).await.unwrap();
    let r2 = store.put("/k", b("w"), 0).await.unwrap();
    let batch = timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(batch[0].revision(), r2);

    let wrong = format!("etcd://{endpoint}?user=root&password=nope");
    let err = EtcdStore::connect(EtcdConfig::from_url(&wrong).unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("authentication failed"), "{err}");
    let anonymous = EtcdStore::connect(EtcdConfig::new([endpoint.clone()])).await;
    assert!(
        anonymous.is_err(),
        "a client without credentials must be refused"
    );
}

/// An etcd user whose role grants only its namespace's keys (the usual
/// least-privilege set-up: `readwrite --prefix=true /acc/`) can connect
/// and use the store; with a namespace outside its grant, connecting fails
/// and says which grant is missing. (The check at connect used to read the
/// bare namespace key `/acc`, which `/acc/` does not cover.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_granted_only_its_namespace_can_connect() {
    let etcd = EtcdCluster::single().await;
    let endpoint = etcd.endpoints()[0].clone();
    let etcdctl = |args: &[&str]| etcdctl(std::slice::from_ref(&endpoint), args);
    etcdctl(&["user", "add", "root:rootpw"]);
    etcdctl(&["user", "add", "berth:berthpw"]);
    etcdctl(&["role", "add", "berth"]);
    etcdctl(&[
        "role",
        "grant-permission",
        "berth",
        "readwrite",
        "--prefix=true",
        "/acc/",
    ]);
    etcdctl(&["user", "grant-role", "berth", "berth"]);
    etcdctl(&["auth", "enable"]);

    let url = format!("etcd://{endpoint}/acc?user=berth&password=berthpw");
    let store = EtcdStore::connect(EtcdConfig::from_url(&url).unwrap())
        .await
        .unwrap();
    let mut watch = store.watch("/berth/", 0).await.unwrap();
    let r = store.put("/berth/k", b("v"), 0).await.unwrap();
    assert_eq!(
        store.get("/berth/k").await.unwrap().unwrap().mod_revision,
        r
    );
    assert_eq!(store.revision().await.unwrap(), r);
    let batch = timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(batch[0].revision(), r);

    let outside = format!("etcd://{endpoint}/other?user=berth&password=berthpw");
    let err = EtcdStore::connect(EtcdConfig::from_url(&outside).unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("permission denied")
            && err.contains("grant-permission ROLE readwrite --prefix=true /other/berth"),
        "{err}"
    );
}

/// TLS with client certificates, configured through an etcd:// URL: the
/// right CA and certificate work (reads, writes, watches); no client
/// certificate, or plain http, is refused at connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() {
    let files = support::etcd::TlsFiles::generate();
    let etcd = EtcdCluster::single_tls(&files).await;
    let endpoint = etcd.endpoints()[0].clone();
    let url = format!(
        "etcd://{endpoint}/tls?ca={}&cert={}&key={}",
        files.ca.display(),
        files.client_cert.display(),
        files.client_key.display()
    );
    let store = EtcdStore::connect(EtcdConfig::from_url(&url).unwrap())
        .await
        .unwrap();
    let mut watch = store.watch("/", 0).await.unwrap();
    let r = store.put("/k", b("v"), 0).await.unwrap();
    let batch = timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(batch[0].revision(), r);

    let fast = |url: &str| {
        let mut config = EtcdConfig::from_url(url).unwrap();
        config.connect_timeout = Duration::from_secs(2);
        config
    };
    let no_client_cert = fast(&format!("etcd://{endpoint}?ca={}", files.ca.display()));
    assert!(EtcdStore::connect(no_client_cert).await.is_err());
    let plain = fast(&format!("etcd://{endpoint}"));
    assert!(EtcdStore::connect(plain).await.is_err());
    let missing_ca =
        EtcdConfig::from_url(&format!("etcd://{endpoint}?ca=/nonexistent/ca.pem")).unwrap();
    let err = EtcdStore::connect(missing_ca).await.unwrap_err();
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
}
