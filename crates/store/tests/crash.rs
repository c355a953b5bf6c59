//! `kill -9` at a random moment loses nothing that was reported committed.
//!
//! The test re-runs its own binary as a child (the ignored `crash_child`
//! test, selected by an environment variable) that CAS-increments a counter
//! from several tasks as fast as it can and prints every value the store
//! acknowledged. The parent SIGKILLs it mid-stream, reopens the file and
//! checks that the counter is at least the last acknowledged value, that the
//! revision, the key and the watch history agree, and that writes still work.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use berth_store::embedded::EmbeddedStore;
use berth_store::{Compare, Op, Store, Txn, WatchEvent};
use futures::StreamExt;

const CHILD_ENV: &str = "BERTH_STORE_CRASH_CHILD";
const COUNTER: &str = "/counter";

async fn increment(store: &dyn Store) -> u64 {
    loop {
        let (n, rev) = match store.get(COUNTER).await.unwrap() {
            None => (0, 0),
            Some(kv) => (
                std::str::from_utf8(&kv.value)
                    .unwrap()
                    .parse::<u64>()
                    .unwrap(),
                kv.mod_revision,
            ),
        };
        let txn = Txn {
            compare: vec![Compare::ModRevision(COUNTER.into(), rev)],
            success: vec![Op::put(COUNTER, (n + 1).to_string())],
            failure: vec![],
        };
        if store.txn(txn).await.unwrap().succeeded {
            return n + 1;
        }
    }
}

/// The child: only does something when started by the crash test.
#[test]
#[ignore = "child process of crash_kill_9_loses_nothing_committed"]
fn crash_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let store = EmbeddedStore::open(std::path::Path::new(&path)).unwrap();
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    loop {
                        let n = increment(&store).await;
                        println!("committed {n}");
                    }
                })
            })
            .collect();
        // The tasks loop until the parent kills the process; a panic in
        // one of them ends the child early and fails the parent's checks.
        futures::future::try_join_all(tasks).await.unwrap();
    });
}

struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn crash_kill_9_loses_nothing_committed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("crash test seed {seed}");
    let mut rng = XorShift(seed);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut previous = 0;
    for round in 0..5 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "crash_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (acked, acks) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.strip_prefix("committed ") {
                    let _ = acked.send(n.parse::<u64>().unwrap());
                }
            }
        });
        // Kill only once it is writing, at a random point of its run.
        let first = acks
            .recv_timeout(Duration::from_secs(30))
            .expect("the child never committed anything");
        std::thread::sleep(Duration::from_millis(20 + rng.below(600)));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(9),
            "round {round}: the child died before it was killed: {status}"
        );
        reader.join().unwrap();
        let last_acked = acks.try_iter().fold(first, u64::max);
        assert!(
            last_acked > previous,
            "round {round}: the child made no progress"
        );

        rt.block_on(async {
            let store = EmbeddedStore::open(&path).unwrap();
            let kv = store
                .get(COUNTER)
                .await
                .unwrap()
                .expect("counter after crash");
            let counter: u64 = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
            eprintln!("round {round}: last acknowledged {last_acked}, found {counter}");
            assert!(
                counter >= last_acked,
                "round {round}: lost acknowledged writes: counter {counter} < {last_acked}"
            );
            // Every revision after the first is one increment.
            let revision = store.revision().await.unwrap();
            assert_eq!(
                revision,
                1 + counter as i64,
                "round {round}: revision disagrees with the counter"
            );
            assert_eq!(kv.mod_revision, revision);
            assert_eq!(kv.version, counter as i64);

            // Still writable.
            let after = increment(&store).await;
            assert_eq!(after, counter + 1);
            assert_eq!(store.revision().await.unwrap(), revision + 1);

            // History is complete and agrees with the key: revision r set r-1.
            let mut watch = store.watch(COUNTER, 2).await.unwrap();
            let mut expected = 1u64;
            while expected <= after {
                let batch = tokio::time::timeout(Duration::from_secs(10), watch.next())
                    .await
                    .expect("history replay stalled")
                    .expect("watch ended")
                    .expect("history replay failed");
                for event in batch {
                    let WatchEvent::Put(kv) = event else {
                        panic!("only puts were written")
                    };
                    assert_eq!(kv.mod_revision, expected as i64 + 1);
                    assert_eq!(kv.value, expected.to_string());
                    expected += 1;
                }
            }
            previous = after;
        });
        // The store (dropped above) released the file for the next child.
    }
}
