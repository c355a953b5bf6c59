//! `GET /v1/events`: the event log, as a JSON page or a live SSE stream.
//!
//! - JSON (default): `{"events": [...], "cursor": N}`, oldest first, the
//!   last `limit` events after `since`; pass `cursor` back as `since` to
//!   get only newer ones.
//! - SSE (`Accept: text/event-stream` or `follow=true`): the same backlog,
//!   then every new event as it is recorded, each as one `message` whose
//!   `id:` is the event id and whose `data:` is the event's JSON. A
//!   reconnecting `EventSource` sends `Last-Event-ID`, which is honoured
//!   like `since`, so no event is lost or repeated across reconnects.
//!
//! Live events come from a store watch of the ring, so every server of a
//! fleet streams every server's events.

use std::convert::Infallible;
use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use berth_model::{Event, EventKind, keys};
use berth_store::{Store, StoreError, WatchEvent, decode};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::metrics::telemetry;
use super::{ApiContext, ApiError, ApiQuery};
use crate::events::{EventFilter, list};
use crate::metrics::Telemetry;

/// Default and maximum page size.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 5_000;

/// Query of `GET /v1/events`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsParams {
    /// Only events with a greater id (the `cursor` of a previous page).
    #[serde(default)]
    pub since: Option<u64>,
    /// At most this many (the newest) of the backlog; default 100.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Only this namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Only this stack.
    #[serde(default)]
    pub stack: Option<String>,
    /// Only this service.
    #[serde(default)]
    pub service: Option<String>,
    /// Only these kinds, comma-separated (`instance_exited,rolled_back`).
    #[serde(default)]
    pub kind: Option<String>,
    /// Stream as SSE.
    #[serde(default)]
    pub follow: bool,
}

/// The JSON page.
#[derive(Debug, Serialize, Deserialize)]
pub struct EventsPage {
    /// Oldest first.
    pub events: Vec<Event>,
    /// The id of the last event returned (or `since` when none): pass it as
    /// `since` next time.
    pub cursor: u64,
}

fn parse_kinds(s: &str) -> Result<Vec<EventKind>, ApiError> {
    s.split(',')
        .filter(|k| !k.trim().is_empty())
        .map(|k| {
            serde_json::from_value(serde_json::Value::String(k.trim().to_owned())).map_err(|_| {
                ApiError::bad_request(
                    format!("kind={k:?} is not an event kind"),
                    "kinds: deploy_started, deploy_finished, deploy_paused, rolled_back, stack_removed, scaled, service_stopped, service_started, restarted, config_changed, instance_started, instance_healthy, instance_unhealthy, instance_exited, instance_failed, instance_stopped, instance_removed, node_joined, node_left",
                )
            })
        })
        .collect()
}

pub(crate) async fn events(
    State(ctx): State<ApiContext>,
    ext: Option<Extension<Telemetry>>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<EventsParams>,
) -> Result<Response, ApiError> {
    telemetry(ext)?;
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let filter = EventFilter {
        since: last_event_id.or(q.since).unwrap_or(0),
        namespace: q.namespace,
        stack: q.stack,
        service: q.service,
        kinds: q
            .kind
            .as_deref()
            .map(parse_kinds)
            .transpose()?
            .unwrap_or_default(),
    };
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let sse = q.follow
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/event-stream"));
    let (backlog, rev) = list(ctx.store.as_ref(), &filter, limit)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    if !sse {
        let cursor = backlog.last().map_or(filter.since, |e| e.id);
        return Ok(axum::Json(EventsPage {
            events: backlog,
            cursor,
        })
        .into_response());
    }
    let (tx, rx) = mpsc::channel::<Event>(256);
    tokio::spawn(forward(ctx.store.clone(), filter, backlog, rev, tx));
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(|e| {
        Ok::<_, Infallible>(
            SseEvent::default()
                .id(e.id.to_string())
                .json_data(&e)
                .unwrap_or_else(|_| SseEvent::default().comment("unencodable event")),
        )
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// Send the backlog, then follow the ring until the client goes away.
/// After a compaction or a broken watch it re-lists from the last id sent,
/// so nothing is skipped or repeated.
async fn forward(
    store: std::sync::Arc<dyn Store>,
    mut filter: EventFilter,
    backlog: Vec<Event>,
    mut rev: berth_store::Revision,
    tx: mpsc::Sender<Event>,
) {
    for e in backlog {
        filter.since = e.id;
        if tx.send(e).await.is_err() {
            return;
        }
    }
    loop {
        let mut watch = match store.watch(keys::EVENTS, rev + 1).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "event stream: watch failed");
                return;
            }
        };
        loop {
            let batch = tokio::select! {
                b = watch.next() => b,
                _ = tx.closed() => return,
            };
            match batch {
                Some(Ok(batch)) => {
                    for ev in batch {
                        let WatchEvent::Put(kv) = ev else { continue };
                        rev = rev.max(kv.mod_revision);
                        let Ok(e) = decode::<Event>(&kv) else {
                            continue;
                        };
                        if !filter.matches(&e) {
                            continue;
                        }
                        filter.since = e.id;
                        if tx.send(e).await.is_err() {
                            return;
                        }
                    }
                }
                Some(Err(StoreError::Compacted { .. })) | None => break,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "event stream: watch ended");
                    return;
                }
            }
        }
        // Re-list what was missed, then watch again from there.
        match list(store.as_ref(), &filter, MAX_LIMIT).await {
            Ok((missed, r)) => {
                rev = r;
                for e in missed {
                    filter.since = e.id;
                    if tx.send(e).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "event stream: re-listing failed");
                return;
            }
        }
    }
}
