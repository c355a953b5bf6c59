//! The conformance suite against the embedded store.
//!
//! Every property runs on a fresh file with a tiny watch buffer, so that the
//! history-fallback path of watches is exercised all the time, not only when
//! a machine is slow; `run_all_with_default_options` covers the defaults.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::sync::Arc;

use berth_store::Store;
use berth_store::embedded::{EmbeddedStore, Options};

fn open(options: Options) -> Arc<dyn Store> {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open_with(&dir.path().join("store.redb"), options).unwrap();
    // The directory goes now; on Linux the open file lives on until the
    // store is dropped, so nothing is left behind in /tmp.
    drop(dir);
    Arc::new(store)
}

async fn fresh() -> Arc<dyn Store> {
    open(Options::default().watch_buffer(4))
}

berth_store::conformance_tests!(fresh);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_all_with_default_options() {
    berth_store::conformance::run_all(|| async { open(Options::default()) }).await;
}
