//! One [`Store::watch`](crate::Store::watch) over etcd: turns etcd's watch
//! responses into per-revision [`WatchBatch`]es, strips the namespace, and
//! re-creates the etcd watch from the last delivered revision + 1 when the
//! gRPC stream breaks (member killed, leader lost), so the caller never sees
//! a gap. If that revision was compacted meanwhile, the caller gets
//! [`StoreError::Compacted`], as for any watch.
//!
//! With a user and password, a member may refuse the watch's auth token
//! when the watch re-attaches to it: etcd's default "simple" tokens live in
//! each member's memory, so a member that restarted never saw the token, and
//! etcd cancels the watch with "invalid auth token". The client's own token
//! refresh covers unary calls only, so the watch logs in again itself and
//! re-attaches from the same revision ([`AUTH_RETRIES`] bounds it).
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

/// How many fresh logins in a row a watch tries when members keep refusing
/// its token before it ends with an error. Each one is reset as soon as etcd
/// accepts the watch: a login that works is never counted twice.
pub const AUTH_RETRIES: u32 = 3;

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
    /// Whether the client has a user and password to log in again with.
    authenticated: bool,
    /// Logins since etcd last accepted this watch.
    logins: u32,
}

impl Watcher {
    pub(super) fn new(
        client: Client,
        namespace: Namespace,
        prefix: &str,
        from: Revision,
        authenticated: bool,
    ) -> Self {
        Self {
            key: namespace.key(prefix),
            client,
            namespace,
            next: from,
            pending: VecDeque::new(),
            stream: None,
            error: None,
            done: false,
            authenticated,
            logins: 0,
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
                // The client already logged in again once for this call (its
                // auto refresh); a member that has not applied the new token
                // yet refuses it too.
                Err(e) if self.authenticated && token_refused(&e) => {
                    self.log_in_again(&e.to_string()).await?;
                }
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
                Ok(Some(response))
                    if response.canceled()
                        && self.authenticated
                        && token_refused_reason(response.cancel_reason()) =>
                {
                    self.stream = None;
                    if let Err(e) = self.log_in_again(response.cancel_reason()).await {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
                Ok(Some(response)) => {
                    if !response.canceled() {
                        // etcd took the token: the next refusal (another
                        // member, later) deserves fresh logins again.
                        self.logins = 0;
                    }
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
                Err(e) if self.authenticated && token_refused(&e) => {
                    self.stream = None;
                    if let Err(e) = self.log_in_again(&e.to_string()).await {
                        self.done = true;
                        return Some(Err(e));
                    }
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

    /// Gets a new auth token after a member refused the current one
    /// (`reason`), so the watch can be created again from `next`. Ends the
    /// watch with an error when logging in fails for good (wrong password
    /// now, user removed), or when members refused [`AUTH_RETRIES`] fresh
    /// tokens in a row.
    async fn log_in_again(&mut self, reason: &str) -> crate::Result<()> {
        if self.logins >= AUTH_RETRIES {
            return Err(StoreError::Backend(format!(
                "etcd watch from revision {}: the members refused {AUTH_RETRIES} fresh auth tokens \
                 in a row (last: {reason}); check that the etcd user still exists and its role \
                 covers the namespace",
                self.next
            )));
        }
        self.logins += 1;
        tracing::info!(
            reason,
            next = self.next,
            attempt = self.logins,
            "etcd refused the watch's auth token; logging in again"
        );
        if self.logins > 1 {
            // The members apply a new token through raft: give a lagging
            // one a moment before the next try.
            sleep(Duration::from_millis(200) * self.logins).await;
        }
        let deadline = Instant::now() + WATCH_RECONNECT_PATIENCE;
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.client.refresh_token().await {
                Ok(()) => return Ok(()),
                Err(e) if is_fatal(&e) || Instant::now() + backoff > deadline => {
                    return Err(StoreError::Backend(format!(
                        "etcd watch from revision {}: logging in again after `{reason}` failed: {e}",
                        self.next
                    )));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "etcd watch: login failed; retrying");
                    sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
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

/// Whether etcd refused a request because of its auth token (unknown on
/// this member, expired, or older than the auth store), which a new login
/// fixes. Usually Unauthenticated; etcd's in-process services keep only the
/// message (code Unknown).
fn token_refused(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::Unauthenticated || token_refused_reason(s.message())
        }
        _ => false,
    }
}

/// The same for the reason of a cancelled watch, which etcd gives as text,
/// e.g. "rpc error: code = Unauthenticated desc = etcdserver: invalid auth
/// token".
fn token_refused_reason(reason: &str) -> bool {
    reason.contains("invalid auth token")
        || reason.contains("code = Unauthenticated")
        || reason.contains("revision of auth store is old")
}

#[cfg(test)]
mod tests {
    use super::token_refused_reason;

    #[test]
    fn refused_tokens_are_told_from_other_cancellations() {
        assert!(token_refused_reason(
            "rpc error: code = Unauthenticated desc = etcdserver: invalid auth token"
        ));
        assert!(token_refused_reason(
            "etcdserver: revision of auth store is old"
        ));
        assert!(!token_refused_reason(
            "rpc error: code = PermissionDenied desc = etcdserver: permission denied"
        ));
        assert!(!token_refused_reason(
            "etcdserver: mvcc: required revision has been compacted"
        ));
    }
}
