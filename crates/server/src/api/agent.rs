//! The agents' API (`/v1/agent/…`): joining, registration and heartbeats,
//! the node's own assignments (listed and watched), its statuses, its
//! instances' log lines and their resource use.
//!
//! These routes never take the admin token: `POST /v1/agent/join` takes
//! the join token, and every `/v1/agent/nodes/{node}/…` route takes that
//! node's own secret (see [`crate::join`]). A node can read only its own
//! assignments and write only statuses of instances assigned to it (or
//! that it reported before, while it stops them), whichever listener the
//! request came through, loopback included.

use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use berth_model::api::{
    AssignmentList, JoinRequest, JoinResponse, LogBatch, LogBatchResponse, NodeStats,
    RegisterResponse, WatchLine,
};
use berth_model::{Assignment, InstanceKey, InstanceStatus, LogLine, Node, keys};
use berth_store::chunk::Part;
use berth_store::{Compare, Op, Revision, StoreError, Txn, WatchEvent, decode, encode};
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;

use super::{ApiContext, ApiError, ApiJson, ApiPath, ApiQuery, bearer_token, now_ms};
use crate::join::{self, NodeAuthError, NodeCredential};

/// How often an idle watch sends a progress line.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

fn secret(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
}

async fn auth(
    ctx: &ApiContext,
    node: &str,
    headers: &HeaderMap,
) -> Result<NodeCredential, ApiError> {
    Ok(join::authenticate(ctx.store.as_ref(), node, secret(headers)).await?)
}

/// `POST /v1/agent/join`.
pub(crate) async fn join_cluster(
    State(ctx): State<ApiContext>,
    ApiJson(req): ApiJson<JoinRequest>,
) -> Result<axum::Json<JoinResponse>, ApiError> {
    Ok(axum::Json(
        join::join(ctx.store.as_ref(), &req.node, &req.token, now_ms()).await?,
    ))
}

/// `PUT /v1/agent/nodes/{node}`: register or refresh the node record.
pub(crate) async fn register(
    State(ctx): State<ApiContext>,
    ApiPath(node): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(record): ApiJson<Node>,
) -> Result<axum::Json<RegisterResponse>, ApiError> {
    let cred = auth(&ctx, &node, &headers).await?;
    if record.id != node {
        return Err(NodeAuthError::Forbidden {
            node,
            what: format!("register as node {}", record.id),
        }
        .into());
    }
    if record.address.parse::<std::net::IpAddr>().is_err() {
        return Err(ApiError::bad_request(
            format!("node address {:?} is not an IP address", record.address),
            "pass --advertise IP to `berth agent`",
        ));
    }
    Ok(axum::Json(
        join::register(ctx.store.as_ref(), Some(&cred), record, now_ms()).await?,
    ))
}

/// `GET /v1/agent/nodes/{node}/servers`: every live server's API address,
/// for the agent to fail over to.
pub(crate) async fn servers(
    State(ctx): State<ApiContext>,
    ApiPath(node): ApiPath<String>,
    headers: HeaderMap,
) -> Result<axum::Json<berth_model::api::ServerList>, ApiError> {
    auth(&ctx, &node, &headers).await?;
    let live = crate::servers::list(ctx.store.as_ref()).await?;
    Ok(axum::Json(berth_model::api::ServerList {
        servers: crate::servers::authorities(&live),
    }))
}

/// `POST /v1/agent/nodes/{node}/heartbeat`: 409 when the registration expired.
pub(crate) async fn heartbeat(
    State(ctx): State<ApiContext>,
    ApiPath(node): ApiPath<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    auth(&ctx, &node, &headers).await?;
    join::heartbeat(ctx.store.as_ref(), &node).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn decode_assignment(kv: &berth_store::KeyValue) -> Option<Assignment> {
    decode::<Assignment>(kv)
        .inspect_err(
            |e| tracing::warn!(key = %kv.key, error = %e, "skipping an unreadable assignment"),
        )
        .ok()
}

/// `GET /v1/agent/nodes/{node}/assignments`.
pub(crate) async fn assignments(
    State(ctx): State<ApiContext>,
    ApiPath(node): ApiPath<String>,
    headers: HeaderMap,
) -> Result<axum::Json<AssignmentList>, ApiError> {
    auth(&ctx, &node, &headers).await?;
    let (kvs, revision) = ctx.store.range(&keys::assignments_of(&node)).await?;
    Ok(axum::Json(AssignmentList {
        assignments: kvs.iter().filter_map(decode_assignment).collect(),
        revision,
    }))
}

/// Query of the watch route.
#[derive(Debug, Deserialize)]
pub struct WatchParams {
    /// First revision to send (inclusive).
    pub from: Revision,
}

fn line(l: &WatchLine) -> Bytes {
    let mut v = serde_json::to_vec(l).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

fn lines_of(batch: Vec<WatchEvent>) -> Vec<Bytes> {
    batch
        .into_iter()
        .filter_map(|ev| match ev {
            WatchEvent::Put(kv) => decode_assignment(&kv).map(|a| {
                line(&WatchLine::Upsert {
                    revision: kv.mod_revision,
                    assignment: Box::new(a),
                })
            }),
            WatchEvent::Delete { key, mod_revision } => keys::parse_instance(&key).map(|k| {
                line(&WatchLine::Removed {
                    revision: mod_revision,
                    key: k,
                })
            }),
        })
        .collect()
}

/// `GET /v1/agent/nodes/{node}/assignments/watch?from=REV`: NDJSON
/// [`WatchLine`]s, a progress line every few seconds when idle; a
/// `resync` line (then the end) when `from` was compacted away.
pub(crate) async fn watch(
    State(ctx): State<ApiContext>,
    ApiPath(node): ApiPath<String>,
    headers: HeaderMap,
    ApiQuery(params): ApiQuery<WatchParams>,
) -> Result<Response, ApiError> {
    auth(&ctx, &node, &headers).await?;
    let prefix = keys::assignments_of(&node);
    let events = match ctx.store.watch(&prefix, params.from.max(1)).await {
        Ok(w) => w,
        Err(StoreError::Compacted { .. }) => {
            let body = Body::from(line(&WatchLine::Resync));
            return Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response());
        }
        Err(e) => return Err(e.into()),
    };
    struct St {
        events: berth_store::WatchStream,
        done: bool,
    }
    let stream = futures::stream::unfold(
        St {
            events,
            done: false,
        },
        |mut st| async move {
            if st.done {
                return None;
            }
            let out: Vec<Bytes> = tokio::select! {
                next = st.events.next() => match next {
                    Some(Ok(batch)) => lines_of(batch),
                    Some(Err(StoreError::Compacted { .. })) => {
                        st.done = true;
                        vec![line(&WatchLine::Resync)]
                    }
                    Some(Err(e)) => {
                        // The agent reconnects from its last revision.
                        tracing::warn!(error = %e, "assignment watch failed");
                        return None;
                    }
                    None => return None,
                },
                () = tokio::time::sleep(PROGRESS_EVERY) => vec![line(&WatchLine::Progress)],
            };
            Some((
                Ok::<_, std::convert::Infallible>(Bytes::from(out.concat())),
                st,
            ))
        },
    );
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// `POST /v1/agent/nodes/{node}/statuses`: a batch of statuses, written on
/// the node's lease, each only over an older report of the same node.
///
/// An agent that gives up on a hung server sends the batch again elsewhere
/// and goes on reporting there; the hung server, once resumed, still
/// applies the batch it had received. So each write is conditional: the
/// stored record is read and the put is a compare-and-swap on its mod
/// revision, skipped when the stored status is the same node's with a
/// [`InstanceStatus::seq`] at least as high (the late copy, or a duplicate).
/// When another server wrote one of the keys in between, the batch is read
/// and judged again. A status without `seq` (an older agent) is written as
/// before, unconditionally.
pub(crate) async fn statuses(
    State(ctx): State<ApiContext>,
    ApiPath(node): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(batch): ApiJson<Vec<InstanceStatus>>,
) -> Result<StatusCode, ApiError> {
    auth(&ctx, &node, &headers).await?;
    if batch.is_empty() {
        return Ok(StatusCode::NO_CONTENT);
    }
    let lease = join::node_lease(ctx.store.as_ref(), &node).await?;
    let (assigned, _) = ctx.store.range(&keys::assignments_of(&node)).await?;
    let mine: std::collections::HashSet<String> = assigned.into_iter().map(|kv| kv.key).collect();
    let batch = latest_per_instance(batch);
    for attempt in 1..=STATUS_WRITE_TRIES {
        let stored = read_statuses(&ctx, &batch).await?;
        let mut parts = Vec::with_capacity(batch.len());
        for (s, kv) in batch.iter().zip(stored) {
            let key = keys::status(&s.key);
            let old = kv.as_ref().and_then(|kv| decode::<InstanceStatus>(kv).ok());
            let allowed = s.node == node
                && (mine.contains(&keys::assignment(&node, &s.key))
                    || old.as_ref().is_some_and(|o| o.node == node));
            if !allowed {
                return Err(NodeAuthError::Forbidden {
                    node,
                    what: format!("report on instance {} (not assigned to it)", s.key),
                }
                .into());
            }
            if !supersedes(s, old.as_ref()) {
                continue;
            }
            let put = Op::Put {
                value: encode(&key, s)?,
                key: key.clone(),
                lease,
            };
            parts.push(if s.seq == 0 {
                Part::op(put)
            } else {
                let rev = kv.as_ref().map_or(0, |kv| kv.mod_revision);
                Part::guarded(Compare::ModRevision(key, rev), put)
            });
        }
        if parts.is_empty() {
            return Ok(StatusCode::NO_CONTENT);
        }
        // In chunks: etcd refuses a transaction of more than 128 ops, and a
        // node starting a few hundred instances reports them in one batch.
        let done = berth_store::chunk::commit(ctx.store.as_ref(), &[], parts).await?;
        if done.complete() {
            return Ok(StatusCode::NO_CONTENT);
        }
        tracing::debug!(%node, attempt, "a status changed under a batch; judging it again");
    }
    // The agent keeps the batch and sends it again.
    Err(ApiError::Internal(format!(
        "the statuses of node {node} kept changing while this batch was written ({STATUS_WRITE_TRIES} tries)"
    )))
}

/// How many times a status batch is read and judged again when another
/// writer changed one of its keys between the read and the write (only two
/// servers applying copies of the same agent's reports race here).
const STATUS_WRITE_TRIES: usize = 5;

/// How many stored statuses are read at once: a batch of a few hundred
/// costs a few round trips to etcd, not one per status.
const STATUS_READS_AT_ONCE: usize = 32;

/// One status per instance: the highest `seq` (the last one on a tie, as
/// when each was written in turn).
fn latest_per_instance(batch: Vec<InstanceStatus>) -> Vec<InstanceStatus> {
    let mut out: Vec<InstanceStatus> = Vec::with_capacity(batch.len());
    let mut at: std::collections::HashMap<InstanceKey, usize> = Default::default();
    for s in batch {
        match at.get(&s.key) {
            Some(&i) => {
                if s.seq >= out[i].seq {
                    out[i] = s;
                }
            }
            None => {
                at.insert(s.key.clone(), out.len());
                out.push(s);
            }
        }
    }
    out
}

/// The stored record of each status's key, in the batch's order.
async fn read_statuses(
    ctx: &ApiContext,
    batch: &[InstanceStatus],
) -> Result<Vec<Option<berth_store::KeyValue>>, ApiError> {
    let reads: Vec<_> = batch
        .iter()
        .map(|s| {
            let store = ctx.store.clone();
            let key = keys::status(&s.key);
            async move { store.get(&key).await }
        })
        .collect();
    let reads = futures::stream::iter(reads).buffered(STATUS_READS_AT_ONCE);
    Ok(futures::TryStreamExt::try_collect(reads).await?)
}

/// Whether `incoming` may replace `stored`, the status at its key: not
/// when both are ordered reports of the same node and the stored one is
/// not older (statuses of another node, or unordered ones, cannot be
/// compared and are replaced as before).
fn supersedes(incoming: &InstanceStatus, stored: Option<&InstanceStatus>) -> bool {
    match stored {
        Some(old) => {
            incoming.seq == 0 || old.seq == 0 || old.node != incoming.node || incoming.seq > old.seq
        }
        None => true,
    }
}

/// The status at `key` if `node` wrote it (its mod revision).
async fn owned_status(
    ctx: &ApiContext,
    key: &str,
    node: &str,
) -> Result<Option<Revision>, ApiError> {
    Ok(match ctx.store.get(key).await? {
        Some(kv) => decode::<InstanceStatus>(&kv)
            .ok()
            .filter(|s| s.node == node)
            .map(|_| kv.mod_revision),
        None => None,
    })
}

/// `POST /v1/agent/nodes/{node}/forget`: remove the status of an instance
/// the node stopped (no-op when absent; refused when another node's), and
/// only if the stored status is older than the forget (its `seq`): a forget
/// a hung server applies after it resumed must not remove the status the
/// slot's next instance on this node reported since.
pub(crate) async fn forget(
    State(ctx): State<ApiContext>,
    ApiPath(node): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<berth_model::api::ForgetRequest>,
) -> Result<StatusCode, ApiError> {
    auth(&ctx, &node, &headers).await?;
    let key = keys::status(&req.key);
    let Some(kv) = ctx.store.get(&key).await? else {
        return Ok(StatusCode::NO_CONTENT);
    };
    // Another node's status for the same slot (the instance moved), or a
    // report stamped after the forget: nothing of this node's to forget.
    let Ok(stored) = decode::<InstanceStatus>(&kv) else {
        return Ok(StatusCode::NO_CONTENT);
    };
    if stored.node != node || (req.seq != 0 && stored.seq != 0 && stored.seq > req.seq) {
        return Ok(StatusCode::NO_CONTENT);
    }
    // Only if it is still the one judged here.
    ctx.store
        .txn(Txn {
            compare: vec![Compare::ModRevision(key.clone(), kv.mod_revision)],
            success: vec![Op::Delete(key)],
            failure: vec![],
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/agent/nodes/{node}/logs`: lines the node's instances wrote,
/// appended to this server's log store with their capture timestamps, so
/// `berth logs [-f]` merges them with every other instance's in time order.
///
/// Lines of instances neither assigned to the node nor last reported by it
/// are not stored but counted as refused, rather than failing the batch:
/// the last lines of an instance the node just stopped and forgot may
/// arrive after its status is gone, and retrying them could never succeed.
///
/// A batch sent again (the agent gave up on a hung server that then
/// resumed, or an answer was lost) is not stored twice: the batch's place
/// in the agent's stream is claimed first (see [`claim_log_lines`]), and
/// only the lines past what any server claimed are stored.
pub(crate) async fn logs(
    State(ctx): State<ApiContext>,
    ApiPath(node): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(mut batch): ApiJson<LogBatch>,
) -> Result<axum::Json<LogBatchResponse>, ApiError> {
    auth(&ctx, &node, &headers).await?;
    if batch.dropped > 0 {
        tracing::warn!(%node, dropped = batch.dropped, "the agent dropped log lines (buffer full while this server was slow or unreachable)");
    }
    if batch.lines.is_empty() {
        return Ok(axum::Json(LogBatchResponse {
            accepted: 0,
            refused: 0,
            duplicates: 0,
        }));
    }
    let claim = if batch.stream == 0 {
        None
    } else {
        let claim = claim_log_lines(&ctx, &node, &batch).await?;
        let skip = usize::try_from(claim.duplicates).unwrap_or(usize::MAX);
        batch.lines.drain(..skip.min(batch.lines.len()));
        if batch.lines.is_empty() {
            tracing::debug!(%node, duplicates = claim.duplicates, "a log batch sent again was stored before");
            return Ok(axum::Json(LogBatchResponse {
                accepted: 0,
                refused: 0,
                duplicates: claim.duplicates,
            }));
        }
        Some(claim)
    };
    let duplicates = claim.as_ref().map_or(0, |c| c.duplicates);
    let (assigned, _) = ctx.store.range(&keys::assignments_of(&node)).await?;
    let mine: std::collections::HashSet<String> = assigned.into_iter().map(|kv| kv.key).collect();
    // One decision per instance, not per line.
    let mut allowed: std::collections::HashMap<InstanceKey, bool> = Default::default();
    for l in &batch.lines {
        if allowed.contains_key(&l.key) {
            continue;
        }
        let ok = mine.contains(&keys::assignment(&node, &l.key))
            || owned_status(&ctx, &keys::status(&l.key), &node)
                .await?
                .is_some();
        allowed.insert(l.key.clone(), ok);
    }
    let total = batch.lines.len() as u64;
    let lines: Vec<LogLine> = batch
        .lines
        .into_iter()
        .filter(|l| allowed.get(&l.key).copied().unwrap_or(false))
        .collect();
    let accepted = lines.len() as u64;
    if accepted < total {
        tracing::debug!(%node, refused = total - accepted, "log lines of instances not on this node refused");
    }
    if let Err(e) = ctx.logs.ingest(lines).await {
        if let Some(claim) = claim {
            // Not stored after all: give the lines back, so the agent's
            // next attempt (here or elsewhere) stores them.
            if let Err(undo) = ctx.store.txn(claim.undo).await {
                tracing::warn!(%node, error = %undo, "cannot give back a log batch's claim; its lines are lost");
            }
        }
        return Err(ApiError::Internal(format!("storing log lines: {e}")));
    }
    Ok(axum::Json(LogBatchResponse {
        accepted,
        refused: total - accepted,
        duplicates,
    }))
}

/// What [`claim_log_lines`] claimed.
struct LogClaim {
    /// Leading lines of the batch already stored (by any server).
    duplicates: u64,
    /// Puts the position back as it was (if still the claimed one).
    undo: Txn,
}

/// How many times a log batch's claim is tried again when another server
/// moved the node's position in between.
const LOG_CLAIM_TRIES: usize = 5;

/// Move the node's stored log position past `batch` (a compare-and-swap on
/// [`keys::log_position`], shared by every server), and say how many of its
/// leading lines an earlier copy stored. The position moves before the
/// lines are stored, so two servers holding copies of one batch never
/// both store it; a server that then fails to store them puts it back.
async fn claim_log_lines(
    ctx: &ApiContext,
    node: &str,
    batch: &LogBatch,
) -> Result<LogClaim, ApiError> {
    let key = keys::log_position(node);
    let end = batch.offset.saturating_add(batch.lines.len() as u64);
    for _ in 0..LOG_CLAIM_TRIES {
        let kv = ctx.store.get(&key).await?;
        let stored = kv
            .as_ref()
            .and_then(|kv| decode::<berth_model::api::LogPosition>(kv).ok());
        let rev = kv.as_ref().map_or(0, |kv| kv.mod_revision);
        let next = match stored {
            Some(p) if p.stream == batch.stream => p.next,
            // Another stream (the agent restarted): its lines are new.
            _ => 0,
        };
        let duplicates = next.saturating_sub(batch.offset).min(end - batch.offset);
        if next >= end {
            return Ok(LogClaim {
                duplicates,
                undo: Txn::default(),
            });
        }
        let position = berth_model::api::LogPosition {
            stream: batch.stream,
            next: end,
        };
        let claimed = ctx
            .store
            .txn(Txn {
                compare: vec![Compare::ModRevision(key.clone(), rev)],
                success: vec![Op::put(key.clone(), encode(&key, &position)?)],
                failure: vec![],
            })
            .await?;
        if claimed.succeeded {
            let restore = match &kv {
                Some(kv) => Op::put(key.clone(), kv.value.clone()),
                None => Op::Delete(key.clone()),
            };
            return Ok(LogClaim {
                duplicates,
                undo: Txn {
                    compare: vec![Compare::ModRevision(key, claimed.revision)],
                    success: vec![restore],
                    failure: vec![],
                },
            });
        }
    }
    // The agent sends the batch again.
    Err(ApiError::Internal(format!(
        "the log position of node {node} kept changing while this batch was claimed ({LOG_CLAIM_TRIES} tries)"
    )))
}

/// Query of the edge watch route.
#[derive(Debug, Deserialize)]
pub struct EdgeWatchParams {
    /// The [`berth_model::edge::EdgeTables::etag`] the agent already has:
    /// the tables are not sent again at connect when they are unchanged.
    #[serde(default)]
    pub have: Option<String>,
}

fn progress_line() -> Bytes {
    let mut v = serde_json::to_vec(&berth_model::edge::EdgeLine::Progress).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// `GET /v1/agent/nodes/{node}/edge/watch?have=ETAG`: NDJSON
/// [`berth_model::edge::EdgeLine`]s: the whole edge tables at connect
/// (unless `have` is their tag) and after every change, a progress line
/// every few seconds when idle. The credential is checked again before each
/// line, so a removed node stops getting tables at once.
pub(crate) async fn edge_watch(
    State(ctx): State<ApiContext>,
    ApiPath(node): ApiPath<String>,
    headers: HeaderMap,
    ApiQuery(params): ApiQuery<EdgeWatchParams>,
    feed: Option<axum::Extension<crate::edge::EdgeFeed>>,
) -> Result<Response, ApiError> {
    auth(&ctx, &node, &headers).await?;
    let Some(axum::Extension(crate::edge::EdgeFeed(mut rx))) = feed else {
        return Err(ApiError::Internal(
            "this API router computes no edge tables".into(),
        ));
    };
    let secret = secret(&headers).map(str::to_owned);
    let current = rx.borrow_and_update().clone();
    let first =
        (params.have.as_deref() != Some(current.etag.as_str())).then(|| current.line.clone());
    struct St {
        rx: tokio::sync::watch::Receiver<std::sync::Arc<crate::edge::EdgeFrame>>,
        first: Option<Bytes>,
        ctx: ApiContext,
        node: String,
        secret: Option<String>,
    }
    let st = St {
        rx,
        first,
        ctx,
        node,
        secret,
    };
    let stream = futures::stream::unfold(st, |mut st| async move {
        if let Some(line) = st.first.take() {
            return Some((Ok::<_, std::convert::Infallible>(line), st));
        }
        let line = tokio::select! {
            changed = st.rx.changed() => match changed {
                Ok(()) => st.rx.borrow_and_update().line.clone(),
                // The server is shutting down: the agent reconnects elsewhere.
                Err(_) => return None,
            },
            () = tokio::time::sleep(PROGRESS_EVERY) => progress_line(),
        };
        if join::authenticate(st.ctx.store.as_ref(), &st.node, st.secret.as_deref())
            .await
            .is_err()
        {
            return None;
        }
        Some((Ok(line), st))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// `POST /v1/agent/nodes/{node}/stats`: the resource use of the node's
/// running instances (see `berth_agent::remote_stats`), kept as the node's
/// latest report under [`keys::node_stats`] on the node's lease: the next
/// report replaces it, and it disappears with the node. Instances neither
/// assigned to the node nor last reported by it are left out.
pub(crate) async fn stats(
    State(ctx): State<ApiContext>,
    ApiPath(node): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(mut report): ApiJson<NodeStats>,
) -> Result<StatusCode, ApiError> {
    auth(&ctx, &node, &headers).await?;
    let lease = join::node_lease(ctx.store.as_ref(), &node).await?;
    let (assigned, _) = ctx.store.range(&keys::assignments_of(&node)).await?;
    let mine: std::collections::HashSet<String> = assigned.into_iter().map(|kv| kv.key).collect();
    let mut kept = Vec::with_capacity(report.instances.len());
    for i in std::mem::take(&mut report.instances) {
        if mine.contains(&keys::assignment(&node, &i.key))
            || owned_status(&ctx, &keys::status(&i.key), &node)
                .await?
                .is_some()
        {
            kept.push(i);
        }
    }
    report.instances = kept;
    let key = keys::node_stats(&node);
    ctx.store.put(&key, encode(&key, &report)?, lease).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(slot: u32, seq: u64, node: &str) -> InstanceStatus {
        InstanceStatus {
            seq,
            ..InstanceStatus::new(InstanceKey::new("d", "s", "web", slot), "u", node, 1, 0)
        }
    }

    #[test]
    fn a_batch_keeps_the_newest_status_of_each_instance_in_first_seen_order() {
        let out = latest_per_instance(vec![
            status(2, 5, "n1"),
            status(1, 9, "n1"),
            status(2, 3, "n1"),
            status(1, 9, "n2"),
        ]);
        let got: Vec<_> = out
            .iter()
            .map(|s| (s.key.slot, s.seq, s.node.as_str()))
            .collect();
        // slot 2: the higher seq wins although it came first; slot 1: a
        // tie goes to the later one, as if each were written in turn.
        assert_eq!(got, [(2, 5, "n1"), (1, 9, "n2")]);
    }

    #[test]
    fn only_an_older_ordered_status_of_the_same_node_is_replaced() {
        let old = status(1, 10, "n1");
        assert!(supersedes(&status(1, 11, "n1"), Some(&old)));
        assert!(!supersedes(&status(1, 10, "n1"), Some(&old)));
        assert!(!supersedes(&status(1, 9, "n1"), Some(&old)));
        // Not comparable: another node's status, or an unordered one.
        assert!(supersedes(&status(1, 9, "n2"), Some(&old)));
        assert!(supersedes(&status(1, 0, "n1"), Some(&old)));
        assert!(supersedes(&status(1, 9, "n1"), Some(&status(1, 0, "n1"))));
        assert!(supersedes(&status(1, 1, "n1"), None));
    }
}
