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

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

use berth_agent::logs::{LineFilter, LogQuery};
use berth_model::{InstanceKey, LogLine, LogStream, StackRecord, keys};
use berth_store::decode;
use bytes::Bytes;
use futures::stream::{self, Stream, StreamExt};
use tokio::sync::broadcast;

use super::time::parse_since;
use super::{ApiContext, ApiError, ApiPath, now_ms};
use crate::desired::DesiredError;

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
}

pub(crate) async fn stream(
    State(ctx): State<ApiContext>,
    ApiPath((ns, stack)): ApiPath<(String, String)>,
    raw_query: axum::extract::RawQuery,
) -> Result<Response, ApiError> {
    let params = parse_params(raw_query.0.as_deref().unwrap_or(""))?;
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
    let since_us = match &params.since {
        Some(s) => Some(parse_since(s, now_ms() * 1000).map_err(|e| {
            ApiError::bad_request(e.to_string(), "e.g. since=10m, since=2024-05-01T12:00:00Z")
        })?),
        None => None,
    };
    let query = LogQuery {
        namespace: ns,
        stack,
        services: params.service,
        since_us,
        tail: params.tail,
    };
    // A page back in time has no live part.
    let live = (params.follow && params.before.is_none()).then(|| ctx.logs.subscribe());
    let keep = line_filter(params.before, params.grep.clone());
    let past = ctx
        .logs
        .read_filtered(&query, keep)
        .await
        .map_err(|e| ApiError::Internal(format!("reading logs: {e}")))?;
    let body = Body::from_stream(
        lines(past, live, query, params.grep).map(Ok::<_, std::convert::Infallible>),
    );
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

/// `service` repeats (`?service=a&service=b`), which serde's urlencoded
/// deserializer into a `Vec` does not accept; collect it by hand.
fn parse_params(raw: &str) -> Result<LogsParams, ApiError> {
    let mut p = LogsParams::default();
    for (k, v) in form_pairs(raw) {
        match k.as_str() {
            "service" => p.service.push(v),
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
    Live,
    Done,
}

struct LogsState {
    phase: Phase,
    live: Option<broadcast::Receiver<LogLine>>,
    query: LogQuery,
    grep: Option<regex::Regex>,
    last_past: HashMap<InstanceKey, u64>,
}

/// The NDJSON body: the past, then (when following) the filtered live lines.
fn lines(
    past: Vec<LogLine>,
    live: Option<broadcast::Receiver<LogLine>>,
    query: LogQuery,
    grep: Option<regex::Regex>,
) -> impl Stream<Item = Bytes> + Send + 'static {
    let mut last_past = HashMap::new();
    for line in &past {
        let ts = last_past.entry(line.key.clone()).or_insert(0);
        *ts = line.ts_us.max(*ts);
    }
    let state = LogsState {
        phase: Phase::Past(past.into_iter()),
        live,
        query,
        grep,
        last_past,
    };
    stream::unfold(state, |mut st| async move {
        loop {
            match &mut st.phase {
                Phase::Past(it) => match it.next() {
                    Some(line) => return Some((encode_line(&line), st)),
                    None => {
                        st.phase = if st.live.is_some() {
                            Phase::Live
                        } else {
                            Phase::Done
                        }
                    }
                },
                Phase::Live => {
                    let rx = st.live.as_mut()?;
                    // A blank line now and then lets a quiet stream notice a
                    // client that went away (the write fails) instead of
                    // holding its subscription until the next log line.
                    let Ok(next) = tokio::time::timeout(KEEPALIVE, rx.recv()).await else {
                        return Some((Bytes::from_static(b"\n"), st));
                    };
                    match next {
                        Ok(line) => {
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
                            return Some((encode_line(&line), st));
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            let note = skipped_note(&st.query, n);
                            return Some((encode_line(&note), st));
                        }
                        Err(broadcast::error::RecvError::Closed) => st.phase = Phase::Done,
                    }
                }
                Phase::Done => return None,
            }
        }
    })
}

fn wanted(q: &LogQuery, line: &LogLine) -> bool {
    line.key.namespace == q.namespace
        && line.key.stack == q.stack
        && (q.services.is_empty() || q.services.contains(&line.key.service))
}

/// The note sent when the reader fell behind. The count covers every stack
/// on the node (the broadcast is shared), so it is an upper bound.
fn skipped_note(q: &LogQuery, n: u64) -> LogLine {
    LogLine {
        key: InstanceKey::new(q.namespace.clone(), q.stack.clone(), "berth", 0),
        ts_us: now_ms() * 1000,
        stream: LogStream::System,
        line: format!("up to {n} lines skipped (reader too slow)"),
    }
}

fn encode_line(line: &LogLine) -> Bytes {
    let mut v = serde_json::to_vec(line).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}
