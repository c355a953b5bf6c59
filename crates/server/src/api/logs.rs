//! `GET /v1/stacks/{ns}/{stack}/logs`: past and live log lines as NDJSON.
//!
//! With `follow`, the live subscription is taken *before* the past is read,
//! so no line written in between is lost; live lines at or before the last
//! past line of the same instance are dropped, so none is sent twice. A
//! subscriber that falls behind the broadcast buffer is told how many lines
//! it missed with a `system` line instead of losing them silently. Blank
//! lines are keep-alives; clients skip them.
//!
//! Paging and search: `before=<ts_us>` keeps only older lines (with `tail`,
//! the page before a cursor: the oldest `ts_us` a reader has), and
//! `grep=<regex>` keeps only matching lines, past and live, before `tail`
//! counts.
//!
//! # Several servers
//! On a shared store (etcd) each server holds only the lines of its own
//! node's instances and of the agents that shipped to it. So the route asks
//! every other live server for its part, at the servers-only
//! `GET /v1/peer/stacks/{ns}/{stack}/logs` (the same query, its own lines
//! only, the peer token: see [`crate::peers`]), while it reads its own:
//! - the past: every part merged in time order, lines held by two servers
//!   once, then cut to `tail` (each server's last `tail` hold the merged
//!   last `tail`; `since` is resolved here and sent as `since_us`);
//! - `follow`: each peer sends [`PAST_END`] after its past and then its
//!   live lines, which go out as they arrive (recently sent lines are not
//!   sent again); every [`REFRESH`] the live servers are listed, and one
//!   that joined, or stopped answering and came back, is followed (from
//!   where it left off) with a `system` line saying so;
//! - a server that does not answer within [`crate::peers`]' bounds is left
//!   out: named in a [`MISSING_HEADER`] header (`<node>: <why>`, one per
//!   server), or, once following, in a `system` line.
//!
//! With one server (an embedded store, or no other server listed) nothing
//! of this runs.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::time::Duration;

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

use berth_agent::logs::{LineFilter, LogQuery};
use berth_model::{InstanceKey, LogLine, LogStream, StackRecord, keys};
use berth_store::decode;
use bytes::Bytes;
use futures::stream::{self, Stream, StreamExt};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinSet;

use super::time::parse_since;
use super::{ApiContext, ApiError, ApiPath, now_ms};
use crate::desired::DesiredError;
use crate::leader::LeaderRecord;
use crate::peers::{self, IDLE_WITHIN, PeerBody, Peers};

/// Response header naming a server whose lines are missing from the
/// answer (`<node>: <why>`), once per such server.
pub const MISSING_HEADER: &str = "berth-missing-server";

/// The line a peer's followed answer sends between its past and its live
/// lines.
pub const PAST_END: &[u8] = b"{\"past_end\":true}";

/// How often a followed fan-out lists the servers, to follow those that
/// joined or came back.
const REFRESH: Duration = Duration::from_secs(2);

/// Query of the logs route. `service` may repeat.
#[derive(Debug, Default)]
pub struct LogsParams {
    /// Services to include; all when empty.
    pub service: Vec<String>,
    /// Last N lines (per the whole selection) of the past.
    pub tail: Option<usize>,
    /// RFC 3339 time, duration before now (`10m`), or Unix seconds.
    pub since: Option<String>,
    /// Keep streaming live lines.
    pub follow: bool,
    /// Only past lines strictly older than this (µs since the epoch).
    pub before: Option<u64>,
    /// Only lines whose text matches this regex.
    pub grep: Option<regex::Regex>,
    /// The peer route's `since`, already resolved by the asking server
    /// (µs since the epoch), so every server cuts at the same instant.
    pub since_us: Option<u64>,
}

/// A checked logs request.
struct LogsRequest {
    query: LogQuery,
    follow: bool,
    before: Option<u64>,
    grep: Option<regex::Regex>,
}

impl LogsRequest {
    /// Whether the answer has a live part (a page back in time has none).
    fn live(&self) -> bool {
        self.follow && self.before.is_none()
    }
}

/// Who an answer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reader {
    /// A client: keep-alives every [`KEEPALIVE`].
    Client,
    /// Another server: [`PAST_END`] after the past, keep-alives every
    /// [`peers::KEEPALIVE`] so a hung server is told from a quiet one.
    Peer,
}

pub(crate) async fn stream(
    State(ctx): State<ApiContext>,
    peers: Option<Extension<Peers>>,
    ApiPath((ns, stack)): ApiPath<(String, String)>,
    raw_query: axum::extract::RawQuery,
) -> Result<Response, ApiError> {
    let params = parse_params(raw_query.0.as_deref().unwrap_or(""), false)?;
    let req = checked(&ctx, ns, stack, params).await?;
    if let Some(Extension(peers)) = peers {
        let others = peers.others().await?;
        if !others.is_empty() {
            return fan_out(&ctx, peers, others, req).await;
        }
    }
    local(&ctx, req, Reader::Client).await
}

/// `GET /v1/peer/stacks/{ns}/{stack}/logs`: this server's own lines, for
/// another server's fan-out. Takes the peer token on every listener.
pub(crate) async fn peer_stream(
    State(ctx): State<ApiContext>,
    peers: Option<Extension<Peers>>,
    headers: HeaderMap,
    ApiPath((ns, stack)): ApiPath<(String, String)>,
    raw_query: axum::extract::RawQuery,
) -> Result<Response, ApiError> {
    let Some(Extension(peers)) = peers else {
        return Err(ApiError::NotFound(
            "this server has no peers (it runs on its own embedded store)".into(),
        ));
    };
    if !peers.authorized(&headers) {
        return Err(ApiError::Unauthorized);
    }
    let params = parse_params(raw_query.0.as_deref().unwrap_or(""), true)?;
    let req = checked(&ctx, ns, stack, params).await?;
    let mut resp = local(&ctx, req, Reader::Peer).await?;
    if let Ok(v) = HeaderValue::from_str(peers.node()) {
        resp.headers_mut().insert(peers::NODE_HEADER, v);
    }
    Ok(resp)
}

/// `DELETE /v1/peer/stacks/{ns}/{stack}/logs`: remove this server's logs
/// of a stack another server removed (`DELETE /v1/stacks/…`), so a stack
/// made again under that name does not show them. Takes the peer token.
pub(crate) async fn peer_remove(
    State(ctx): State<ApiContext>,
    peers: Option<Extension<Peers>>,
    headers: HeaderMap,
    ApiPath((ns, stack)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let Some(Extension(peers)) = peers else {
        return Err(ApiError::NotFound(
            "this server has no peers (it runs on its own embedded store)".into(),
        ));
    };
    if !peers.authorized(&headers) {
        return Err(ApiError::Unauthorized);
    }
    ctx.logs
        .remove_stack(&ns, &stack)
        .await
        .map_err(|e| ApiError::Internal(format!("removing the stack's logs: {e}")))?;
    let mut resp = axum::http::StatusCode::NO_CONTENT.into_response();
    if let Ok(v) = HeaderValue::from_str(peers.node()) {
        resp.headers_mut().insert(peers::NODE_HEADER, v);
    }
    Ok(resp)
}

/// Remove the stack's logs on every other live server (this one removed
/// its own). Each server that did not is named with why, for the log.
pub(crate) async fn remove_on_peers(peers: &Peers, ns: &str, stack: &str) -> Vec<(String, String)> {
    let others = match peers.others().await {
        Ok(o) => o,
        Err(e) => return vec![("(the other servers)".into(), e.to_string())],
    };
    let path = format!("/v1/peer/stacks/{}/{}/logs", enc(ns), enc(stack));
    let asks = others.iter().map(|p| async {
        let resp = peers.request(hyper::Method::DELETE, p, &path).await;
        resp.err().map(|why| (p.node.clone(), why))
    });
    futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// The request's stack and services exist, and its `since` reads.
async fn checked(
    ctx: &ApiContext,
    ns: String,
    stack: String,
    params: LogsParams,
) -> Result<LogsRequest, ApiError> {
    // Logs outlive instances but not the stack: an unknown stack is a 404 so
    // a typo does not look like a silent, empty log.
    let Some(kv) = ctx.store.get(&keys::stack(&ns, &stack)).await? else {
        return Err(DesiredError::StackNotFound {
            namespace: ns,
            stack,
        }
        .into());
    };
    // Likewise a service name with a typo.
    let record: StackRecord = decode(&kv)?;
    if let Some(unknown) = params
        .service
        .iter()
        .find(|s| !record.spec.services.contains_key(*s))
    {
        return Err(DesiredError::UnknownService {
            stack,
            service: unknown.clone(),
            known: record.spec.services.keys().cloned().collect(),
        }
        .into());
    }
    let since_us = match (&params.since, params.since_us) {
        (_, Some(us)) => Some(us),
        (Some(s), None) => Some(parse_since(s, now_ms() * 1000).map_err(|e| {
            ApiError::bad_request(e.to_string(), "e.g. since=10m, since=2024-05-01T12:00:00Z")
        })?),
        (None, None) => None,
    };
    Ok(LogsRequest {
        query: LogQuery {
            namespace: ns,
            stack,
            services: params.service,
            since_us,
            tail: params.tail,
        },
        follow: params.follow,
        before: params.before,
        grep: params.grep,
    })
}

/// This server's own lines.
async fn local(ctx: &ApiContext, req: LogsRequest, reader: Reader) -> Result<Response, ApiError> {
    let live = req.live().then(|| ctx.logs.subscribe());
    let keep = line_filter(req.before, req.grep.clone());
    let past = ctx
        .logs
        .read_filtered(&req.query, keep)
        .await
        .map_err(|e| ApiError::Internal(format!("reading logs: {e}")))?;
    let body = lines(past, live, None, req.query, req.grep, reader);
    Ok(ndjson(body, &[]))
}

/// Every live server's lines: this one's and each peer's (module docs).
async fn fan_out(
    ctx: &ApiContext,
    peers: Peers,
    others: Vec<LeaderRecord>,
    req: LogsRequest,
) -> Result<Response, ApiError> {
    let follow = req.live();
    let live = follow.then(|| ctx.logs.subscribe());
    let started_us = now_ms() * 1000;
    let ask = Ask::new(&req);
    let path = ask.path(req.query.since_us, req.query.tail);
    let keep = line_filter(req.before, req.grep.clone());
    let asks = others.iter().map(|p| ask_past(&peers, p, &path, follow));
    let (own, answers) = tokio::join!(
        ctx.logs.read_filtered(&req.query, keep),
        futures::future::join_all(asks)
    );
    let own = own.map_err(|e| ApiError::Internal(format!("reading logs: {e}")))?;
    let mut parts = vec![own];
    let mut missing = Vec::new();
    let mut followed = Vec::new();
    for (peer, answer) in others.into_iter().zip(answers) {
        match answer {
            Ok((past, body)) => {
                parts.push(past);
                followed.extend(body.map(|b| (peer.node, b)));
            }
            Err(why) => {
                tracing::warn!(server = %peer.node, error = %why, "a server did not answer for its logs; answering without them");
                missing.push((peer.node, why));
            }
        }
    }
    let past = merge_past(parts, req.query.tail);
    let remote = follow.then(|| {
        let gone = missing.iter().map(|(n, _)| n.clone()).collect();
        Remote::start(peers, ask, followed, gone, started_us)
    });
    let body = lines(past, live, remote, req.query, req.grep, Reader::Client);
    Ok(ndjson(body, &missing))
}

/// An NDJSON answer naming the servers whose lines it lacks.
fn ndjson(
    body: impl Stream<Item = Bytes> + Send + 'static,
    missing: &[(String, String)],
) -> Response {
    let mut resp = Body::from_stream(body.map(Ok::<_, std::convert::Infallible>)).into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    for (node, why) in missing {
        if let Ok(v) = HeaderValue::from_str(&header_text(&format!("{node}: {why}"))) {
            headers.append(MISSING_HEADER, v);
        }
    }
    resp
}

/// `s` as a header value: visible ASCII only, at most 300 bytes.
fn header_text(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .take(300)
        .collect()
}

/// Past lines of several servers: in time order, each line once, the last
/// `tail`.
fn merge_past(parts: Vec<Vec<LogLine>>, tail: Option<usize>) -> Vec<LogLine> {
    let mut all: Vec<LogLine> = parts.into_iter().flatten().collect();
    all.sort_by(|a, b| {
        (a.ts_us, &a.key, a.stream, &a.line).cmp(&(b.ts_us, &b.key, b.stream, &b.line))
    });
    all.dedup();
    if let Some(t) = tail
        && all.len() > t
    {
        all.drain(..all.len() - t);
    }
    all
}

/// What to ask peers (the request, but for `since` and `tail`).
#[derive(Clone)]
struct Ask {
    base: String,
    filters: Vec<String>,
    follow: bool,
}

impl Ask {
    fn new(req: &LogsRequest) -> Self {
        let q = &req.query;
        let mut filters: Vec<String> = q
            .services
            .iter()
            .map(|s| format!("service={}", enc(s)))
            .collect();
        if let Some(b) = req.before {
            filters.push(format!("before={b}"));
        }
        if let Some(g) = &req.grep {
            filters.push(format!("grep={}", enc(g.as_str())));
        }
        Self {
            base: format!(
                "/v1/peer/stacks/{}/{}/logs",
                enc(&q.namespace),
                enc(&q.stack)
            ),
            filters,
            follow: req.live(),
        }
    }

    fn path(&self, since_us: Option<u64>, tail: Option<usize>) -> String {
        let mut q = self.filters.clone();
        if let Some(s) = since_us {
            q.push(format!("since_us={s}"));
        }
        if let Some(t) = tail {
            q.push(format!("tail={t}"));
        }
        if self.follow {
            q.push("follow=true".into());
        }
        format!("{}?{}", self.base, q.join("&"))
    }
}

/// Percent-encode all but RFC 3986's unreserved characters.
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A peer's past lines and, when following, its answer to read the live
/// lines from.
async fn ask_past(
    peers: &Peers,
    peer: &LeaderRecord,
    path: &str,
    follow: bool,
) -> Result<(Vec<LogLine>, Option<PeerBody>), String> {
    let mut body = peers.get(peer, path).await?;
    let mut past = Vec::new();
    loop {
        match body.next_line(IDLE_WITHIN).await? {
            None if follow => return Err("its answer ended before its past lines did".into()),
            None => return Ok((past, None)),
            Some(l) if l == PAST_END => return Ok((past, Some(body))),
            Some(l) if l.iter().all(u8::is_ascii_whitespace) => {}
            Some(l) => past.push(
                serde_json::from_slice(&l)
                    .map_err(|e| format!("it sent a line that is not a log line: {e}"))?,
            ),
        }
    }
}

/// What the peers' followers tell the answer.
enum Heard {
    Line(LogLine),
    Note(String),
}

/// How a follower of one peer ended.
enum Ended {
    /// It was answering and stopped (or sent garbage): noted.
    Lost { from_us: u64, why: String },
    /// It did not answer this time (retried without a note).
    NoAnswer { from_us: u64 },
    /// The answer's reader went away.
    Closed,
}

/// The peers' live lines for one followed answer. Dropping it stops its
/// tasks (the supervisor owns the followers).
struct Remote {
    rx: mpsc::Receiver<Heard>,
    _tasks: JoinSet<()>,
}

impl Remote {
    fn start(
        peers: Peers,
        ask: Ask,
        followed: Vec<(String, PeerBody)>,
        missing: Vec<String>,
        started_us: u64,
    ) -> Self {
        let (tx, rx) = mpsc::channel(1024);
        let mut tasks = JoinSet::new();
        tasks.spawn(supervise(peers, ask, followed, missing, started_us, tx));
        Self { rx, _tasks: tasks }
    }
}

/// Follow the peers that answered, and every [`REFRESH`] those that
/// joined or came back since.
async fn supervise(
    peers: Peers,
    ask: Ask,
    followed: Vec<(String, PeerBody)>,
    missing: Vec<String>,
    started_us: u64,
    tx: mpsc::Sender<Heard>,
) {
    let mut followers: JoinSet<(String, Ended)> = JoinSet::new();
    // Servers being followed or asked.
    let mut asked: HashSet<String> = HashSet::new();
    // Servers not followed now, and from when to ask them.
    let mut resume: HashMap<String, u64> = HashMap::new();
    // Servers the reader was told are missing.
    let mut reported: HashSet<String> = missing.iter().cloned().collect();
    for node in missing {
        resume.insert(node, started_us);
    }
    for (node, body) in followed {
        asked.insert(node.clone());
        followers.spawn(follow_peer(node, body, started_us, tx.clone()));
    }
    let mut tick = tokio::time::interval(REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = tx.closed() => return,
            Some(done) = followers.join_next() => {
                let Ok((node, ended)) = done else { continue };
                asked.remove(&node);
                match ended {
                    Ended::Lost { from_us, why } => {
                        tracing::warn!(server = %node, error = %why, "a followed server stopped answering for its logs");
                        let note = format!("server {node} stopped answering ({why}): its lines are missing until it answers again");
                        resume.insert(node.clone(), from_us);
                        reported.insert(node);
                        if tx.send(Heard::Note(note)).await.is_err() {
                            return;
                        }
                    }
                    Ended::NoAnswer { from_us } => {
                        resume.insert(node, from_us);
                    }
                    Ended::Closed => return,
                }
            }
            _ = tick.tick() => {
                let Ok(list) = peers.others().await else { continue };
                for peer in list {
                    if asked.contains(&peer.node) {
                        continue;
                    }
                    let from_us = resume.remove(&peer.node).unwrap_or(started_us);
                    let hello = if reported.remove(&peer.node) {
                        format!("server {} answers again: its lines follow", peer.node)
                    } else {
                        format!("server {} joined: its lines follow", peer.node)
                    };
                    asked.insert(peer.node.clone());
                    let path = ask.path(Some(from_us), None);
                    let (peers, tx) = (peers.clone(), tx.clone());
                    followers.spawn(async move {
                        match ask_past(&peers, &peer, &path, true).await {
                            // (A followed answer always has its body.)
                            Err(_) | Ok((_, None)) => (peer.node, Ended::NoAnswer { from_us }),
                            Ok((past, Some(body))) => {
                                let mut last = from_us;
                                let mut out = vec![Heard::Note(hello)];
                                for l in past {
                                    last = last.max(l.ts_us);
                                    out.push(Heard::Line(l));
                                }
                                for h in out {
                                    if tx.send(h).await.is_err() {
                                        return (peer.node, Ended::Closed);
                                    }
                                }
                                follow_peer(peer.node, body, last, tx).await
                            }
                        }
                    });
                }
            }
        }
    }
}

/// Pass one peer's live lines on until it stops answering.
async fn follow_peer(
    node: String,
    mut body: PeerBody,
    mut last_us: u64,
    tx: mpsc::Sender<Heard>,
) -> (String, Ended) {
    loop {
        let line = tokio::select! {
            () = tx.closed() => return (node, Ended::Closed),
            line = body.next_line(IDLE_WITHIN) => line,
        };
        let ended = |why: String| Ended::Lost {
            from_us: last_us,
            why,
        };
        let raw = match line {
            Ok(Some(raw)) => raw,
            Ok(None) => return (node, ended("its answer ended".into())),
            Err(why) => return (node, ended(why)),
        };
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let line: LogLine = match serde_json::from_slice(&raw) {
            Ok(l) => l,
            Err(e) => {
                return (
                    node,
                    ended(format!("it sent a line that is not a log line: {e}")),
                );
            }
        };
        last_us = last_us.max(line.ts_us);
        if tx.send(Heard::Line(line)).await.is_err() {
            return (node, Ended::Closed);
        }
    }
}

/// `service` repeats (`?service=a&service=b`), which serde's urlencoded
/// deserializer into a `Vec` does not accept; collect it by hand.
/// `peer`: the peer route's query, which also takes `since_us`.
fn parse_params(raw: &str, peer: bool) -> Result<LogsParams, ApiError> {
    let mut p = LogsParams::default();
    for (k, v) in form_pairs(raw) {
        match k.as_str() {
            "service" => p.service.push(v),
            "since_us" if peer => {
                p.since_us = Some(v.parse().map_err(|_| {
                    ApiError::bad_request(
                        format!("since_us={v:?} is not a timestamp in µs"),
                        "e.g. since_us=1714564800000000",
                    )
                })?)
            }
            "tail" => {
                p.tail = Some(v.parse().map_err(|_| {
                    ApiError::bad_request(format!("tail={v:?} is not a number"), "e.g. tail=100")
                })?)
            }
            "since" => p.since = Some(v),
            "before" => {
                p.before = Some(v.parse().map_err(|_| {
                    ApiError::bad_request(
                        format!("before={v:?} is not a timestamp in µs"),
                        "pass the ts_us of the oldest line you have, e.g. before=1714564800000000",
                    )
                })?)
            }
            "grep" => {
                p.grep = Some(regex::Regex::new(&v).map_err(|e| {
                    ApiError::bad_request(
                        format!("grep={v:?} is not a valid regex: {e}"),
                        "use Rust regex syntax, e.g. grep=ERROR|WARN or grep=(?i)timeout",
                    )
                })?)
            }
            "follow" => {
                p.follow = match v.as_str() {
                    "" | "true" | "1" => true,
                    "false" | "0" => false,
                    _ => {
                        return Err(ApiError::bad_request(
                            format!("follow={v:?} is not a boolean"),
                            "use follow=true or follow=false",
                        ));
                    }
                }
            }
            other => {
                return Err(ApiError::bad_request(
                    format!("unknown query parameter {other:?}"),
                    "parameters: service (repeatable), tail, since, follow, before, grep",
                ));
            }
        }
    }
    Ok(p)
}

/// Split and percent-decode `a=1&b=x%20y`.
fn form_pairs(raw: &str) -> Vec<(String, String)> {
    raw.split('&')
        .filter(|s| !s.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn line_filter(before: Option<u64>, grep: Option<regex::Regex>) -> LineFilter {
    Arc::new(move |l: &LogLine| {
        before.is_none_or(|b| l.ts_us < b) && grep.as_ref().is_none_or(|g| g.is_match(&l.line))
    })
}

/// Silence after which a followed stream sends a keep-alive blank line.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(15);

enum Phase {
    Past(std::vec::IntoIter<LogLine>),
    /// A peer's answer: [`PAST_END`] goes next.
    PastEnd,
    Live,
    Done,
}

struct LogsState {
    phase: Phase,
    live: Option<broadcast::Receiver<LogLine>>,
    /// Other servers' live lines (a followed fan-out).
    remote: Option<Remote>,
    query: LogQuery,
    grep: Option<regex::Regex>,
    last_past: HashMap<InstanceKey, u64>,
    /// Lines sent live lately, when two servers may send the same one.
    recent: Recent,
    reader: Reader,
}

/// The next live event: a local line, or what the peers' followers heard.
enum Next {
    Local(Result<LogLine, broadcast::error::RecvError>),
    Remote(Option<Heard>),
}

async fn next_live(live: &mut broadcast::Receiver<LogLine>, remote: Option<&mut Remote>) -> Next {
    match remote {
        None => Next::Local(live.recv().await),
        Some(r) => tokio::select! {
            l = live.recv() => Next::Local(l),
            h = r.rx.recv() => Next::Remote(h),
        },
    }
}

/// The NDJSON body: the past, then (when following) the filtered live
/// lines, this server's and (`remote`) its peers'.
fn lines(
    past: Vec<LogLine>,
    live: Option<broadcast::Receiver<LogLine>>,
    remote: Option<Remote>,
    query: LogQuery,
    grep: Option<regex::Regex>,
    reader: Reader,
) -> impl Stream<Item = Bytes> + Send + 'static {
    let mut last_past = HashMap::new();
    for line in &past {
        let ts = last_past.entry(line.key.clone()).or_insert(0);
        *ts = line.ts_us.max(*ts);
    }
    let state = LogsState {
        phase: Phase::Past(past.into_iter()),
        live,
        remote,
        query,
        grep,
        last_past,
        recent: Recent::default(),
        reader,
    };
    let keepalive = match reader {
        Reader::Client => KEEPALIVE,
        Reader::Peer => peers::KEEPALIVE,
    };
    stream::unfold(state, move |mut st| async move {
        loop {
            match &mut st.phase {
                Phase::Past(it) => match it.next() {
                    Some(line) => return Some((encode_line(&line), st)),
                    None => {
                        st.phase = match (&st.live, st.reader) {
                            (None, _) => Phase::Done,
                            (Some(_), Reader::Peer) => Phase::PastEnd,
                            (Some(_), Reader::Client) => Phase::Live,
                        }
                    }
                },
                Phase::PastEnd => {
                    st.phase = Phase::Live;
                    let mut end = PAST_END.to_vec();
                    end.push(b'\n');
                    return Some((Bytes::from(end), st));
                }
                Phase::Live => {
                    let rx = st.live.as_mut()?;
                    // A blank line now and then lets a quiet stream notice a
                    // client that went away (the write fails) instead of
                    // holding its subscription until the next log line.
                    let Ok(next) =
                        tokio::time::timeout(keepalive, next_live(rx, st.remote.as_mut())).await
                    else {
                        return Some((Bytes::from_static(b"\n"), st));
                    };
                    let line = match next {
                        Next::Local(Ok(line)) | Next::Remote(Some(Heard::Line(line))) => line,
                        Next::Local(Err(broadcast::error::RecvError::Lagged(n))) => {
                            let note = note(
                                &st.query,
                                format!("up to {n} lines skipped (reader too slow)"),
                            );
                            return Some((encode_line(&note), st));
                        }
                        Next::Local(Err(broadcast::error::RecvError::Closed)) => {
                            st.phase = Phase::Done;
                            continue;
                        }
                        Next::Remote(Some(Heard::Note(text))) => {
                            return Some((encode_line(&note(&st.query, text)), st));
                        }
                        // The supervisor is gone (it ends only with its
                        // reader): carry on with this server's lines.
                        Next::Remote(None) => {
                            st.remote = None;
                            continue;
                        }
                    };
                    if !wanted(&st.query, &line)
                        || st.grep.as_ref().is_some_and(|g| !g.is_match(&line.line))
                    {
                        continue;
                    }
                    if st
                        .last_past
                        .get(&line.key)
                        .is_some_and(|&ts| line.ts_us <= ts)
                    {
                        continue;
                    }
                    if st.remote.is_some() && !st.recent.first_time(&line) {
                        continue;
                    }
                    return Some((encode_line(&line), st));
                }
                Phase::Done => return None,
            }
        }
    })
}

/// The last [`Recent::CAP`] live lines sent (by hash), so a line two
/// servers both send (stored on both, or sent again by a peer followed
/// anew from where it left off) goes out once.
#[derive(Default)]
struct Recent {
    seen: HashSet<u64>,
    order: VecDeque<u64>,
}

impl Recent {
    const CAP: usize = 16_384;

    fn first_time(&mut self, line: &LogLine) -> bool {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        line.hash(&mut h);
        let h = h.finish();
        if !self.seen.insert(h) {
            return false;
        }
        self.order.push_back(h);
        if self.order.len() > Self::CAP
            && let Some(old) = self.order.pop_front()
        {
            self.seen.remove(&old);
        }
        true
    }
}

fn wanted(q: &LogQuery, line: &LogLine) -> bool {
    line.key.namespace == q.namespace
        && line.key.stack == q.stack
        && (q.services.is_empty() || q.services.contains(&line.key.service))
}

/// A line from berth itself about the stream (instance `berth.0`): the
/// reader fell behind (the count covers every stack on the node, as the
/// broadcast is shared, so it is an upper bound), or a server stopped or
/// started answering.
fn note(q: &LogQuery, text: String) -> LogLine {
    LogLine {
        key: InstanceKey::new(q.namespace.clone(), q.stack.clone(), "berth", 0),
        ts_us: now_ms() * 1000,
        stream: LogStream::System,
        line: text,
    }
}

fn encode_line(line: &LogLine) -> Bytes {
    let mut v = serde_json::to_vec(line).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}
