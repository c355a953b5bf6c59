//! The [`Store`] over a real etcd v3 cluster: how berth runs on more than one
//! machine. Consensus, replication and failover are etcd's; this module only
//! maps the trait onto etcd's API, 1:1 wherever etcd already has the
//! semantics:
//!
//! - revisions are etcd's header revisions, [`KeyValue`] fields are etcd's;
//! - [`Compare::ModRevision`] is etcd's `mod_revision ==` compare (etcd
//!   compares an absent key as all-zero, so `0` means "absent" there too);
//! - [`Op::DeletePrefix`] is a ranged delete;
//! - watches are etcd watches from `start_revision`, re-created from the last
//!   delivered revision + 1 if the stream breaks ([`watch`]);
//! - leases are etcd leases; a keep-alive is one request/response on etcd's
//!   keep-alive stream.
//!
//! An optional [namespace](EtcdConfig::namespace) is prepended to every key
//! and stripped from everything returned.
//!
//! Requests that certainly did not reach a member (connection refused, no
//! leader) are retried within the request timeout, so a member failover is
//! a short pause. A write whose outcome is unknown (the connection died
//! mid-request) is **not** retried: it fails with [`StoreError::Backend`],
//! and the caller's reconcile loop decides, as it must for any failure.
//!
//! Differences from the embedded store that callers may meet: etcd rejects a
//! transaction touching the same key twice (e.g. `Delete(k)` then
//! `Put(k)`), and more than 128 ops per transaction by default; compaction
//! and revisions are shared by every namespace of one etcd cluster; lease
//! TTLs are rounded up to whole seconds (and to etcd's minimum TTL).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use etcd_client::{
    Certificate, Client, CompactionOptions, CompareOp, ConnectOptions, DeleteOptions, GetOptions,
    Identity, PutOptions, TlsOptions, TxnOp,
};
use tokio::time::{Instant, sleep};

use crate::{
    Compare, KeyValue, LeaseId, Op, Result, Revision, Store, StoreError, Txn, TxnResult,
    WatchStream,
};

mod config;
pub mod watch;

pub use config::{Credentials, EtcdConfig, TlsConfig, UrlError};

/// The key a revision read (and the check at connect) touches. Every key
/// berth writes starts with it (`/berth/…`, `/berth-stats/…`,
/// `/berth-logs/…`), so an etcd user whose role grants readwrite on the
/// prefix `<namespace>/berth` (or the whole `<namespace>/`) can connect;
/// reading the bare namespace key (`/acc`, which `/acc/` does not cover)
/// was refused to such a user.
const PROBE_KEY: &str = "/berth";

/// Largest response berth accepts from etcd (a `range` over many keys).
const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

/// The store over etcd. Cheap to clone; every clone shares one connection.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    namespace: Namespace,
    request_timeout: Duration,
    /// Whether the client logs in with a user and password (watches then
    /// re-authenticate when a member refuses their token).
    authenticated: bool,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("namespace", &self.namespace.0)
            .finish_non_exhaustive()
    }
}

/// The key prefix of a store, shared with its watches.
#[derive(Clone, Debug)]
pub(crate) struct Namespace(Arc<str>);

impl Namespace {
    fn key(&self, key: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len() + key.len());
        out.extend_from_slice(self.0.as_bytes());
        out.extend_from_slice(key.as_bytes());
        out
    }

    fn strip(&self, key: &[u8]) -> Result<String> {
        let rest = key.strip_prefix(self.0.as_bytes()).ok_or_else(|| {
            StoreError::Backend(format!(
                "etcd returned key {} outside namespace {}",
                String::from_utf8_lossy(key),
                self.0
            ))
        })?;
        String::from_utf8(rest.to_vec()).map_err(|_| StoreError::Codec {
            key: String::from_utf8_lossy(key).into_owned(),
            message: "etcd key is not UTF-8 (not written by berth?)".into(),
        })
    }

    fn kv(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue> {
        Ok(KeyValue {
            key: self.strip(kv.key())?,
            value: Bytes::copy_from_slice(kv.value()),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            version: kv.version(),
            lease: kv.lease(),
        })
    }
}

impl EtcdStore {
    /// Connect to the cluster and check that it answers (within
    /// `connect_timeout`), so that a wrong address or bad credentials fail
    /// here, with the endpoints named, not at the first write.
    pub async fn connect(config: EtcdConfig) -> Result<Self> {
        let endpoints = config.endpoints.join(",");
        let unreachable = |e: &dyn std::fmt::Display| {
            StoreError::Backend(format!("cannot use etcd at {endpoints}: {e}"))
        };
        if config.endpoints.is_empty() {
            return Err(unreachable(&"no endpoint given"));
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_timeout(config.request_timeout)
            // Dead connections (a partitioned member) are noticed within
            // seconds even while a watch is idle.
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(3))
            .with_keep_alive_while_idle(true)
            // A member cut off from the leader refuses requests instead of
            // serving stale reads and silent watches; we move to another.
            .with_require_leader(true)
            .with_auto_token_refresh(true);
        if let Some(tls) = &config.tls {
            options = options.with_tls(tls_options(tls).map_err(|e| unreachable(&e))?);
        }
        if let Some(credentials) = &config.credentials {
            options = options.with_user(&credentials.user, &credentials.password);
        }
        let namespace = Namespace(config.namespace.clone().unwrap_or_default().into());
        let connecting = Client::connect(&config.endpoints, Some(options));
        let client = tokio::time::timeout(config.connect_timeout, connecting)
            .await
            .map_err(|_| unreachable(&format!("no answer within {:?}", config.connect_timeout)))?
            .map_err(|e| unreachable(&e))?;
        let store = Self {
            client,
            namespace,
            request_timeout: config.request_timeout,
            authenticated: config.credentials.is_some(),
        };
        tokio::time::timeout(config.connect_timeout, store.header_revision())
            .await
            .map_err(|_| unreachable(&format!("no answer within {:?}", config.connect_timeout)))?
            .map_err(|e| match e {
                StoreError::Backend(message) => unreachable(&message),
                other => other,
            })?;
        Ok(store)
    }

    /// The namespace every key lives under ("" for none).
    pub fn namespace(&self) -> &str {
        &self.namespace.0
    }

    /// The underlying etcd client (for what the trait does not cover, e.g.
    /// leader election or cluster status). Keys through it are not namespaced.
    pub fn client(&self) -> &Client {
        &self.client
    }

    async fn header_revision(&self) -> Result<Revision> {
        // Any read answers with the revision, but with auth on etcd checks
        // the key against the user's role: read one of the keys berth
        // uses, so a role granting only those works (see [`PROBE_KEY`]).
        let key = self.namespace.key(PROBE_KEY);
        let response = self
            .call("revision", Retry::Always, |mut c| {
                let key = key.clone();
                async move {
                    let options = GetOptions::new().with_count_only();
                    c.get(key, Some(options)).await
                }
            })
            .await?;
        Ok(revision(response.header()))
    }

    /// The message of a failed request; a refusal by etcd's access control
    /// says which grant berth needs.
    fn explain(&self, what: &str, e: &etcd_client::Error) -> String {
        if grpc_status(e).is_some_and(|s| s.code() == tonic::Code::PermissionDenied) {
            let prefix = format!("{}{PROBE_KEY}", self.namespace.0);
            return format!(
                "etcd {what}: {e} (the etcd user's role must allow reading and writing every key under `{prefix}`: \
                 etcdctl role grant-permission ROLE readwrite --prefix=true {prefix})"
            );
        }
        format!("etcd {what}: {e}")
    }

    /// Runs one request, retrying within the request timeout when `retry`
    /// allows it for the error seen.
    async fn call<T, F, Fut>(&self, what: &str, retry: Retry, mut request: F) -> Result<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.request_timeout;
        let mut backoff = Duration::from_millis(25);
        loop {
            match request(self.client.clone()).await {
                Ok(t) => return Ok(t),
                Err(e) => {
                    if let Some(lease) = lease_not_found(&e) {
                        return Err(StoreError::LeaseNotFound(lease));
                    }
                    let retryable = match retry {
                        Retry::Always => !is_fatal(&e),
                        Retry::IfNotSent => not_sent(&e),
                    };
                    if !retryable || Instant::now() + backoff > deadline {
                        return Err(StoreError::Backend(self.explain(what, &e)));
                    }
                    tracing::debug!(error = %e, what, "etcd: retrying");
                    sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(400));
                }
            }
        }
    }

    fn op(&self, op: &Op) -> TxnOp {
        match op {
            Op::Put { key, value, lease } => TxnOp::put(
                self.namespace.key(key),
                value.to_vec(),
                (*lease != 0).then(|| PutOptions::new().with_lease(*lease)),
            ),
            Op::Delete(key) => TxnOp::delete(self.namespace.key(key), None),
            Op::DeletePrefix(prefix) => TxnOp::delete(
                self.namespace.key(prefix),
                Some(DeleteOptions::new().with_prefix()),
            ),
        }
    }
}

/// Which failures a request may be retried after.
#[derive(Clone, Copy)]
enum Retry {
    /// Reads and idempotent requests: any transient failure.
    Always,
    /// Writes: only failures that prove the request never reached etcd, so a
    /// retry cannot apply it twice.
    IfNotSent,
}

fn revision(header: Option<&etcd_client::ResponseHeader>) -> Revision {
    header.map_or(0, etcd_client::ResponseHeader::revision)
}

fn tls_options(tls: &TlsConfig) -> Result<TlsOptions, String> {
    let read = |path: &std::path::Path, what: &str| {
        std::fs::read(path).map_err(|e| format!("cannot read TLS {what} {}: {e}", path.display()))
    };
    let mut options = TlsOptions::new();
    if let Some(ca) = &tls.ca {
        options = options.ca_certificate(Certificate::from_pem(read(ca, "CA")?));
    }
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            options = options.identity(Identity::from_pem(
                read(cert, "certificate")?,
                read(key, "key")?,
            ));
        }
        (None, None) => {}
        _ => return Err("TLS cert and key go together: give both or neither".into()),
    }
    if let Some(domain) = &tls.domain {
        options = options.domain_name(domain.clone());
    }
    Ok(options)
}

fn grpc_status(e: &etcd_client::Error) -> Option<&tonic::Status> {
    match e {
        etcd_client::Error::GRpcStatus(status) => Some(status),
        _ => None,
    }
}

/// etcd reports an unknown lease as `NotFound` with this message (its error
/// protocol is status code + fixed string; there is nothing more structured).
fn lease_not_found(e: &etcd_client::Error) -> Option<LeaseId> {
    let gone = match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::NotFound && s.message().contains("lease not found")
        }
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("lease not found"),
        _ => false,
    };
    // The caller fills in the id it asked about.
    gone.then_some(0)
}

/// Failures no retry can fix: bad request, permissions, compaction.
pub(crate) fn is_fatal(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    match e {
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            Code::InvalidArgument
                | Code::NotFound
                | Code::PermissionDenied
                | Code::Unauthenticated
                | Code::OutOfRange
                | Code::FailedPrecondition
                | Code::AlreadyExists
                | Code::ResourceExhausted
                | Code::Unimplemented
        ),
        etcd_client::Error::InvalidArgs(_)
        | etcd_client::Error::InvalidUri(_)
        | etcd_client::Error::Utf8Error(_)
        | etcd_client::Error::InvalidMetadataValue(_)
        | etcd_client::Error::EndpointsNotManaged => true,
        _ => false,
    }
}

/// Whether the request provably never reached a member: the connection was
/// refused, or the member refused it before proposing (no leader).
fn not_sent(e: &etcd_client::Error) -> bool {
    if let Some(status) = grpc_status(e)
        && status.code() == tonic::Code::Unavailable
        && status.message().contains("no leader")
    {
        return true;
    }
    // etcd_client::Error has no `source()`: start the walk at the error it
    // wraps, or a refused connection to a dead member (wrapped as
    // Status → transport error → connect error → io::Error) is never seen
    // and a write fails instead of going to a live member.
    let mut source: Option<&(dyn std::error::Error + 'static)> = match e {
        etcd_client::Error::GRpcStatus(s) => Some(s),
        etcd_client::Error::TransportError(t) => Some(t),
        etcd_client::Error::IoError(io) => Some(io),
        _ => Some(e),
    };
    // A reset while the TCP connection is being set up (a member killed
    // mid-handshake) also proves nothing was sent — but only inside the
    // connector's error: a reset of an established connection may come
    // after etcd applied the write.
    let mut connecting = false;
    while let Some(err) = source {
        connecting |= err.to_string().starts_with("tcp connect error");
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::AddrNotAvailable => {
                    return true;
                }
                std::io::ErrorKind::ConnectionReset if connecting => return true,
                _ => {}
            }
        }
        source = err.source();
    }
    false
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let key = self.namespace.key(key);
        let response = self
            .call("get", Retry::Always, |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        response
            .kvs()
            .first()
            .map(|kv| self.namespace.kv(kv))
            .transpose()
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let key = self.namespace.key(prefix);
        let response = self
            .call("range", Retry::Always, |c| {
                let key = key.clone();
                async move {
                    // etcd returns a range sorted by key already.
                    let mut kv = c.kv_client().max_decoding_message_size(MAX_RESPONSE_BYTES);
                    kv.get(key, Some(GetOptions::new().with_prefix())).await
                }
            })
            .await?;
        let kvs = response
            .kvs()
            .iter()
            .map(|kv| self.namespace.kv(kv))
            .collect::<Result<Vec<_>>>()?;
        Ok((kvs, revision(response.header())))
    }

    async fn put(&self, key: &str, value: Bytes, lease: LeaseId) -> Result<Revision> {
        let key = self.namespace.key(key);
        let response = self
            .call("put", Retry::IfNotSent, |mut c| {
                let (key, value) = (key.clone(), value.to_vec());
                async move {
                    let options = (lease != 0).then(|| PutOptions::new().with_lease(lease));
                    c.put(key, value, options).await
                }
            })
            .await
            .map_err(|e| with_lease(e, lease))?;
        Ok(revision(response.header()))
    }

    async fn delete(&self, key: &str) -> Result<Revision> {
        let key = self.namespace.key(key);
        let response = self
            .call("delete", Retry::IfNotSent, |mut c| {
                let key = key.clone();
                async move { c.delete(key, None).await }
            })
            .await?;
        Ok(revision(response.header()))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        let compares: Vec<etcd_client::Compare> = txn
            .compare
            .iter()
            .map(|Compare::ModRevision(key, rev)| {
                etcd_client::Compare::mod_revision(self.namespace.key(key), CompareOp::Equal, *rev)
            })
            .collect();
        let success: Vec<TxnOp> = txn.success.iter().map(|op| self.op(op)).collect();
        let failure: Vec<TxnOp> = txn.failure.iter().map(|op| self.op(op)).collect();
        let response = self
            .call("txn", Retry::IfNotSent, |mut c| {
                let request = etcd_client::Txn::new()
                    .when(compares.clone())
                    .and_then(success.clone())
                    .or_else(failure.clone());
                async move { c.txn(request).await }
            })
            .await
            .map_err(|e| {
                // etcd does not say which lease; name the first one used.
                let lease = txn
                    .success
                    .iter()
                    .chain(&txn.failure)
                    .find_map(|op| match op {
                        Op::Put { lease, .. } if *lease != 0 => Some(*lease),
                        _ => None,
                    })
                    .unwrap_or(0);
                with_lease(e, lease)
            })?;
        Ok(TxnResult {
            succeeded: response.succeeded(),
            revision: revision(response.header()),
        })
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream> {
        // "From now" is "after the current revision": fixing it here makes a
        // re-created watch resume exactly where this one started.
        let from = if from <= 0 {
            self.header_revision().await? + 1
        } else {
            from
        };
        watch::Watcher::new(
            self.client.clone(),
            self.namespace.clone(),
            prefix,
            from,
            self.authenticated,
        )
        .start()
        .await
    }

    async fn revision(&self) -> Result<Revision> {
        self.header_revision().await
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId> {
        let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let seconds = i64::try_from(seconds.max(1)).unwrap_or(i64::MAX);
        let response = self
            .call("lease grant", Retry::IfNotSent, |mut c| async move {
                c.lease_grant(seconds, None).await
            })
            .await?;
        Ok(response.id())
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<()> {
        self.call("lease keep-alive", Retry::Always, |mut c| async move {
            // One request and its answer on etcd's keep-alive stream; the
            // stream closes when both halves drop here.
            let (_keeper, _responses) = c.lease_keep_alive(lease).await?;
            Ok(())
        })
        .await
        .map_err(|e| with_lease(e, lease))
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<()> {
        self.call("lease revoke", Retry::IfNotSent, |mut c| async move {
            c.lease_revoke(lease).await
        })
        .await
        .map_err(|e| with_lease(e, lease))?;
        Ok(())
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        let result = self
            .call("compact", Retry::Always, |mut c| async move {
                c.compact(revision, Some(CompactionOptions::new())).await
            })
            .await;
        match result {
            Ok(_) => Ok(()),
            // Compacting to where etcd already is (or before) is done.
            Err(StoreError::Backend(message)) if message.contains("has been compacted") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Puts the lease id the caller asked about into a `LeaseNotFound`.
fn with_lease(e: StoreError, lease: LeaseId) -> StoreError {
    match e {
        StoreError::LeaseNotFound(_) => StoreError::LeaseNotFound(lease),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_connection_inside_a_grpc_status_is_not_sent() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let e = etcd_client::Error::GRpcStatus(tonic::Status::from_error(Box::new(refused)));
        assert!(not_sent(&e));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let e = etcd_client::Error::GRpcStatus(tonic::Status::from_error(Box::new(reset)));
        assert!(
            !not_sent(&e),
            "a reset connection may have carried the write"
        );
    }
}
