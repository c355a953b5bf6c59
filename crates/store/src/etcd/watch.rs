//! One [`Store::watch`](crate::Store::watch) over etcd: turns etcd's watch
//! responses into per-revision [`WatchBatch`]es, strips the namespace, and
//! re-creates the etcd watch from the last delivered revision + 1 when the
//! gRPC stream breaks (member killed, leader lost), so the caller never sees
//! a gap. If that revision was compacted meanwhile, the caller gets
//! [`StoreError::Compacted`], as for any watch.
//!
//! The stream is a plain `unfold` over [`Watcher`]: no background task, so
//! dropping the stream drops the etcd watch with it.

use std::collections::VecDeque;
use std::time::Duration;

use etcd_client::{Client, WatchOptions, WatchResponse};
use futures::StreamExt;
use tokio::time::{Instant, sleep};

use super::{Namespace, is_fatal};
use crate::{Revision, StoreError, WatchBatch, WatchEvent, WatchStream};

/// How long a broken watch keeps trying to re-attach before it gives up with
/// [`StoreError::Backend`] (the caller then re-lists, as after Compacted).
pub const WATCH_RECONNECT_PATIENCE: Duration = Duration::from_secs(30);

pub(super) struct Watcher {
    client: Client,
    namespace: Namespace,
    /// The namespaced prefix etcd watches.
    key: Vec<u8>,
    /// The first revision not delivered yet: where a re-created watch starts.
    next: Revision,
    pending: VecDeque<WatchBatch>,
    stream: Option<etcd_client::WatchStream>,
    /// The error that ends the watch, delivered after `pending`.
    error: Option<StoreError>,
    done: bool,
}

impl Watcher {
    pub(super) fn new(client: Client, namespace: Namespace, prefix: &str, from: Revision) -> Self {
        Self {
            key: namespace.key(prefix),
            client,
            namespace,
            next: from,
            pending: VecDeque::new(),
            stream: None,
            error: None,
            done: false,
        }
    }

    /// Opens the etcd watch now, so that errors (unreachable cluster, bad
    /// credentials) surface from `watch()` itself rather than the stream.
    pub(super) async fn start(mut self) -> crate::Result<WatchStream> {
        let stream = self.open().await?;
        self.stream = Some(stream);
        Ok(futures::stream::unfold(self, |mut w| async move {
            w.next_item().await.map(|item| (item, w))
        })
        .boxed())
    }

    async fn open(&mut self) -> crate::Result<etcd_client::WatchStream> {
        let deadline = Instant::now() + WATCH_RECONNECT_PATIENCE;
        let mut backoff = Duration::from_millis(50);
        loop {
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(self.next);
            match self.client.watch(self.key.clone(), Some(options)).await {
                Ok(stream) => return Ok(stream),
                Err(e) if is_fatal(&e) || Instant::now() + backoff > deadline => {
                    return Err(StoreError::Backend(format!(
                        "etcd watch from revision {} could not be (re-)created: {e}",
                        self.next
                    )));
                }
                Err(e) => {
                    tracing::debug!(error = %e, next = self.next, "etcd watch: retrying");
                    sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
            }
        }
    }

    async fn next_item(&mut self) -> Option<crate::Result<WatchBatch>> {
        loop {
            if let Some(batch) = self.pending.pop_front() {
                return Some(Ok(batch));
            }
            if let Some(e) = self.error.take() {
                return Some(Err(e));
            }
            if self.done {
                return None;
            }
            if self.stream.is_none() {
                match self.open().await {
                    Ok(stream) => self.stream = Some(stream),
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
            }
            let Some(stream) = self.stream.as_mut() else {
                continue;
            };
            match stream.message().await {
                Ok(Some(response)) => {
                    if let Err(e) = self.absorb(response) {
                        // Batches absorbed before the error go out first.
                        self.done = true;
                        self.stream = None;
                        self.error = Some(e);
                    }
                }
                Ok(None) => {
                    tracing::info!(next = self.next, "etcd watch stream ended; re-attaching");
                    self.stream = None;
                }
                Err(e) if is_fatal(&e) => {
                    self.done = true;
                    return Some(Err(StoreError::Backend(format!("etcd watch failed: {e}"))));
                }
                Err(e) => {
                    tracing::info!(error = %e, next = self.next, "etcd watch broke; re-attaching");
                    self.stream = None;
                }
            }
        }
    }

    /// Takes one etcd response in: events become batches, a compaction or a
    /// cancellation becomes the error that ends the watch.
    fn absorb(&mut self, response: WatchResponse) -> crate::Result<()> {
        if response.compact_revision() > 0 {
            return Err(StoreError::Compacted {
                requested: self.next,
                compact_revision: response.compact_revision(),
            });
        }
        if response.canceled() {
            return Err(StoreError::Backend(format!(
                "etcd cancelled the watch: {}",
                response.cancel_reason()
            )));
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let revision = kv.mod_revision();
            // A re-created watch starts at `next`; older events would be
            // duplicates.
            if revision < self.next {
                continue;
            }
            let key = self.namespace.strip(kv.key())?;
            let event = match event.event_type() {
                etcd_client::EventType::Put => WatchEvent::Put(self.namespace.kv(kv)?),
                etcd_client::EventType::Delete => WatchEvent::Delete {
                    key,
                    mod_revision: revision,
                },
            };
            match self.pending.back_mut() {
                Some(batch) if batch[0].revision() == revision => batch.push(event),
                _ => self.pending.push_back(vec![event]),
            }
        }
        if let Some(batch) = self.pending.back() {
            self.next = batch[0].revision() + 1;
        }
        Ok(())
    }
}
