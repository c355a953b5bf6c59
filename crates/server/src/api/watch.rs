//! `GET /v1/stacks/{ns}/{stack}/watch`: the stack's state as Server-Sent
//! Events, for the dashboard's live views.
//!
//! Each event (`event: state`) carries a whole [`StackDetail`] (the record
//! and the same instance rows `GET /v1/stacks/{ns}/{stack}` returns), sent
//! once at connect and again whenever a store change touches the stack's
//! record, assignments, statuses or unplaced instances. Whole snapshots instead of deltas make
//! a missed event harmless (the next one is complete) and keep the client a
//! pure renderer. A burst of changes is coalesced (the watch is drained for
//! [`COALESCE`] after the first event) and a snapshot equal to the last one
//! sent is skipped. When the stack is removed a `removed` event ends the
//! stream. A broken or compacted store watch is re-opened from the current
//! revision and followed by a fresh snapshot, so nothing is silently missed.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use berth_model::api::StackDetail;
use berth_model::{StackRecord, keys};
use berth_store::{Store, WatchEvent, WatchStream, decode};
use futures::FutureExt;
use futures::stream::{self, Stream, StreamExt};

use super::instances::{InstanceFilter, instances};
use super::{ApiContext, ApiError, ApiPath, now_ms};
use crate::desired::DesiredError;

/// How long a burst of store events is gathered into one snapshot.
pub const COALESCE: Duration = Duration::from_millis(100);

struct Follow {
    store: Arc<dyn Store>,
    namespace: String,
    stack: String,
    events: Option<WatchStream>,
    last: Option<String>,
    done: bool,
}

pub(crate) async fn stack(
    State(ctx): State<ApiContext>,
    ApiPath((namespace, stack)): ApiPath<(String, String)>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    if ctx
        .store
        .get(&keys::stack(&namespace, &stack))
        .await?
        .is_none()
    {
        return Err(DesiredError::StackNotFound { namespace, stack }.into());
    }
    let state = Follow {
        store: ctx.store.clone(),
        namespace,
        stack,
        events: None,
        last: None,
        done: false,
    };
    let events = stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let event = next_event(&mut s).await;
        Some((Ok(event), s))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// Waits until the stack's state differs from what was sent last, and
/// returns the event to send.
async fn next_event(s: &mut Follow) -> Event {
    loop {
        if s.events.is_none() {
            match open(s.store.clone()).await {
                Ok(w) => s.events = Some(w),
                Err(e) => return error_event(s, &e),
            }
        } else if !wait_for_change(s).await {
            // The watch broke or was compacted: re-open and resend.
            s.events = None;
            s.last = None;
            continue;
        }
        match snapshot(s.store.clone(), s.namespace.clone(), s.stack.clone()).await {
            Ok(Some(json)) => {
                if s.last.as_deref() == Some(json.as_str()) {
                    continue;
                }
                s.last = Some(json.clone());
                return Event::default().event("state").data(json);
            }
            Ok(None) => {
                s.done = true;
                return Event::default().event("removed").data("{}");
            }
            Err(e) => return error_event(s, &e),
        }
    }
}

fn error_event(s: &mut Follow, e: &ApiError) -> Event {
    s.done = true;
    let body = serde_json::json!({ "error": e.to_string() });
    Event::default().event("error").data(body.to_string())
}

async fn open(store: Arc<dyn Store>) -> Result<WatchStream, ApiError> {
    let rev = store.revision().await?;
    Ok(store.watch(keys::ROOT, rev + 1).await?)
}

/// True after a change to this stack (and a short coalescing pause); false
/// when the watch ended or failed.
async fn wait_for_change(s: &mut Follow) -> bool {
    let Some(events) = s.events.as_mut() else {
        return false;
    };
    loop {
        match events.next().await {
            Some(Ok(batch)) => {
                if batch.iter().any(|e| touches(e, &s.namespace, &s.stack)) {
                    break;
                }
            }
            _ => return false,
        }
    }
    tokio::time::sleep(COALESCE).await;
    // Drop what queued meanwhile: the snapshot below reads it all anyway.
    while let Some(b) = events.next().now_or_never() {
        match b {
            Some(Ok(_)) => {}
            _ => return false,
        }
    }
    true
}

/// Whether a store event concerns `ns/stack`.
fn touches(event: &WatchEvent, ns: &str, stack: &str) -> bool {
    let key = event.key();
    if key == keys::stack(ns, stack) || key == keys::unplaced(ns, stack) {
        return true;
    }
    if !(key.starts_with(keys::STATUS) || key.starts_with(keys::ASSIGNMENTS)) {
        return false;
    }
    keys::parse_instance(key).is_some_and(|k| k.namespace == ns && k.stack == stack)
}

/// The stack's detail as JSON, or `None` when the stack is gone.
async fn snapshot(
    store: Arc<dyn Store>,
    namespace: String,
    stack: String,
) -> Result<Option<String>, ApiError> {
    let Some(kv) = store.get(&keys::stack(&namespace, &stack)).await? else {
        return Ok(None);
    };
    let record: StackRecord = decode(&kv)?;
    let filter = InstanceFilter {
        namespace: Some(namespace),
        stack: Some(stack),
        service: None,
    };
    let mut rows = instances(&*store, &filter, now_ms()).await?;
    // Uptime changes every second; the client computes it from
    // `started_at`, so it must not make every snapshot look new.
    for r in &mut rows {
        r.uptime_s = None;
    }
    let detail = StackDetail {
        record,
        instances: rows,
    };
    serde_json::to_string(&detail)
        .map(Some)
        .map_err(|e| ApiError::Internal(format!("encoding the stack state: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_store::KeyValue;

    fn put(key: &str) -> WatchEvent {
        WatchEvent::Put(KeyValue {
            key: key.into(),
            value: Default::default(),
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            lease: 0,
        })
    }

    #[test]
    fn only_the_stacks_own_keys_count() {
        assert!(touches(
            &put(&keys::stack("default", "shop")),
            "default",
            "shop"
        ));
        assert!(touches(
            &put("/berth/status/default/shop/web/000001"),
            "default",
            "shop"
        ));
        assert!(touches(
            &put("/berth/assign/n1/default/shop/web/000003"),
            "default",
            "shop"
        ));
        assert!(!touches(
            &put("/berth/status/default/shop2/web/000001"),
            "default",
            "shop"
        ));
        assert!(!touches(
            &put("/berth/assign/n1/other/shop/web/000001"),
            "default",
            "shop"
        ));
        assert!(touches(
            &put(&keys::unplaced("default", "shop")),
            "default",
            "shop"
        ));
        assert!(!touches(
            &put(&keys::unplaced("default", "shop2")),
            "default",
            "shop"
        ));
        assert!(!touches(&put("/berth/kv/default/shop"), "default", "shop"));
        assert!(!touches(
            &put(&keys::stack("default", "shopping")),
            "default",
            "shop"
        ));
    }
}
