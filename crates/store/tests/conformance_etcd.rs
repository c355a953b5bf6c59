//! The conformance suite against a real etcd (Debian's etcd-server 3.4).
//!
//! Each property gets its own single-member etcd (about half a second to
//! start), so it sees a store that is really fresh: its own revisions and
//! its own compaction. Every store uses a namespace, so key prefixing and
//! stripping is exercised by every property. `run_all_on_one_shared_etcd`
//! then runs the whole suite in sequence on one etcd, a namespace per
//! property: stores that share revisions and history with earlier ones.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use berth_store::Store;
use support::etcd::{EtcdBacked, EtcdCluster};

async fn fresh() -> Arc<dyn Store> {
    Arc::new(EtcdBacked::fresh("/conformance").await)
}

berth_store::conformance_tests!(fresh);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_all_on_one_shared_etcd() {
    let etcd = Arc::new(EtcdCluster::single().await);
    let count = AtomicUsize::new(0);
    berth_store::conformance::run_all(|| {
        let etcd = etcd.clone();
        let n = count.fetch_add(1, Ordering::SeqCst);
        async move {
            let store = etcd.store(&format!("/shared/{n:02}")).await;
            Arc::new(EtcdBacked { store, etcd }) as Arc<dyn Store>
        }
    })
    .await;
    assert!(count.load(Ordering::SeqCst) >= 15, "every property ran");
}
