//! Throughput of the embedded store on this machine.
//!
//! `cargo run --release -p berth-store --example store_bench`
//!
//! Every put is a durable (fsync'd) commit; concurrent writers share commits
//! through the writer's group commit, which is what the 32-writer figure
//! shows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_store::Store;
use berth_store::embedded::EmbeddedStore;
use bytes::Bytes;
use futures::StreamExt;

const VALUE: &[u8] = br#"{"state":"running","health":"healthy","pid":12345,"address":"127.0.0.1:40000","restarts":0}"#;

async fn puts(store: Arc<dyn Store>, writers: usize, each: usize, tag: &str) -> Duration {
    let start = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let store = store.clone();
            let tag = tag.to_owned();
            tokio::spawn(async move {
                for i in 0..each {
                    store
                        .put(
                            &format!("/bench/{tag}/{w}/{i}"),
                            Bytes::from_static(VALUE),
                            0,
                        )
                        .await
                        .expect("put");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer task");
    }
    start.elapsed()
}

fn rate(n: usize, elapsed: Duration) -> String {
    format!("{:>9.0}/s", n as f64 / elapsed.as_secs_f64())
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&dir.path().join("bench.redb")).expect("open store"));

    println!(
        "berth-store embedded (redb), durable commits, {}-byte values",
        VALUE.len()
    );
    println!("{:-<64}", "");

    let n = 1000;
    let t = puts(store.clone(), 1, n, "seq").await;
    println!(
        "puts, 1 writer          {:>6} puts in {:>7.2?}  {}",
        n,
        t,
        rate(n, t)
    );

    for writers in [8, 32] {
        let each = 8000 / writers;
        let t = puts(store.clone(), writers, each, &format!("par{writers}")).await;
        let n = writers * each;
        println!(
            "puts, {writers:>2} writers        {n:>6} puts in {t:>7.2?}  {}",
            rate(n, t)
        );
    }

    let n = 20_000;
    let start = Instant::now();
    for i in 0..n {
        store
            .get(&format!("/bench/seq/0/{}", i % 1000))
            .await
            .expect("get");
    }
    let t = start.elapsed();
    println!(
        "gets, 1 reader          {n:>6} gets in {t:>7.2?}  {}",
        rate(n, t)
    );

    let (kvs, _) = store.range("/bench/").await.expect("range");
    let start = Instant::now();
    let (again, _) = store.range("/bench/").await.expect("range");
    let t = start.elapsed();
    assert_eq!(kvs.len(), again.len());
    println!("range of {:>6} keys                in {t:>7.2?}", kvs.len());

    for watchers in [10, 100] {
        let writers = 32;
        let each = 100;
        let events = writers * each;
        let from = store.revision().await.expect("revision") + 1;
        let mut streams = Vec::new();
        for _ in 0..watchers {
            streams.push(store.watch("/bench/fan/", from).await.expect("watch"));
        }
        let start = Instant::now();
        let readers: Vec<_> = streams
            .into_iter()
            .map(|mut w| {
                tokio::spawn(async move {
                    let mut seen = 0;
                    while seen < events {
                        seen += w
                            .next()
                            .await
                            .expect("watch ended")
                            .expect("watch error")
                            .len();
                    }
                })
            })
            .collect();
        puts(store.clone(), writers, each, "fan").await;
        let write_time = start.elapsed();
        for reader in readers {
            reader.await.expect("watch reader");
        }
        let t = start.elapsed();
        println!(
            "watch fan-out {watchers:>3} watchers x {events} events: writes {write_time:.2?}, all delivered in {t:.2?} ({} deliveries)",
            rate(watchers * events, t).trim()
        );
        let _ = store
            .txn(berth_store::Txn {
                success: vec![berth_store::Op::DeletePrefix("/bench/fan/".into())],
                ..Default::default()
            })
            .await;
    }
}
