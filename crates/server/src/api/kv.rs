//! `/v1/kv/<key>`: the KV store over HTTP, in Consul's shape (so consul
//! clients and `berth kv` use the same routes), over [`crate::kv`].
//!
//! - `GET`: `[pair]` (404 when absent), `?recurse` (every key under the
//!   prefix), `?keys[&separator=/]` (names only), `?raw` (the bare value);
//!   blocking with `?index=N&wait=5s` (returns once the key, or any key
//!   under the prefix with `?recurse`/`?keys`, changes after N).
//! - `GET` with `Accept: text/event-stream`: server-sent events, one per
//!   change (`event: put|delete`, `id: <index>`, `data: <pair JSON>`), after
//!   the current values; resumes after `Last-Event-ID` or `?index=`.
//! - `PUT`: body = value; `?flags=`, `?cas=` (0: create only),
//!   `?acquire=<session>` / `?release=<session>`; answers `true`/`false`.
//! - `DELETE`: `?recurse`, `?cas=`; answers `true`/`false`.
//!
//! Every answer carries `X-Consul-Index` (the store revision it reflects).

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use berth_model::keys;
use berth_store::{Revision, StoreError, WatchEvent};
use futures::{Stream, StreamExt};
use serde_json::{Value, json};

use super::consul::{Params, blocking, index_headers, json, namespace};
use super::error::ConsulError;
use super::{ApiContext, ApiPath};
use crate::kv::{self, Pair, PutOptions};

/// A pair as Consul prints it.
pub fn pair_json(p: &Pair) -> Value {
    json!({
        "Key": p.key,
        "Value": if p.value.is_empty() { Value::Null } else { Value::String(B64.encode(&p.value)) },
        "Flags": p.flags,
        "CreateIndex": p.create_index,
        "ModifyIndex": p.modify_index,
        "LockIndex": p.lock_index,
        "Session": p.session,
    })
}

/// `GET /v1/kv/` (the root, for `?recurse` and `?keys`).
pub async fn get_root(
    ctx: State<ApiContext>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ConsulError> {
    get(ctx, ApiPath(String::new()), uri, headers).await
}

/// `GET /v1/kv/<key>`.
pub async fn get(
    State(ctx): State<ApiContext>,
    ApiPath(key): ApiPath<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ConsulError> {
    let params = Params::from_uri(&uri)?;
    let ns = namespace(&params, &headers)?;
    let list_names = params.flag("keys");
    let recurse = params.flag("recurse") || list_names;
    kv::check_key(&key, recurse)?;
    let wants_events = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if wants_events {
        let from = headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Revision>().ok())
            .or(params.u64("index")?.map(|i| i as Revision));
        return Ok(events(ctx, ns, key, recurse, from).await?.into_response());
    }
    if let Some(b) = blocking(&params)? {
        let full = keys::kv(&ns, &key);
        let exact = full.clone();
        kv::wait_for_change(
            &*ctx.store,
            &full,
            move |k| if recurse { true } else { k == exact },
            b.index,
            b.wait,
        )
        .await?;
    }
    let (pairs, rev) = if recurse {
        kv::list(&*ctx.store, &ns, &key).await?
    } else {
        let (p, rev) = kv::get(&*ctx.store, &ns, &key).await?;
        (p.into_iter().collect(), rev)
    };
    if pairs.is_empty() {
        return Ok((StatusCode::NOT_FOUND, index_headers(rev)).into_response());
    }
    if list_names {
        let sep = params.get("separator");
        return json(rev, &kv::key_names(&pairs, &key, sep));
    }
    if params.flag("raw") && !recurse {
        let value = pairs[0].value.clone();
        return Ok((
            index_headers(rev),
            [(header::CONTENT_TYPE, "application/octet-stream")],
            value,
        )
            .into_response());
    }
    json(rev, &pairs.iter().map(pair_json).collect::<Vec<_>>())
}

/// `PUT /v1/kv/<key>`.
pub async fn put(
    State(ctx): State<ApiContext>,
    ApiPath(key): ApiPath<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ConsulError> {
    let params = Params::from_uri(&uri)?;
    let ns = namespace(&params, &headers)?;
    let flags = params.u64("flags")?;
    let store = &*ctx.store;
    let done = if let Some(s) = params.get("acquire") {
        kv::acquire(store, &ns, &key, &body, flags, s).await?
    } else if let Some(s) = params.get("release") {
        kv::release(store, &ns, &key, &body, flags, s).await?
    } else {
        let cas = params.u64("cas")?.map(|c| c as Revision);
        kv::put(store, &ns, &key, &body, PutOptions { flags, cas }).await?
    };
    json(store.revision().await?, &done)
}

/// `DELETE /v1/kv/<key>`.
pub async fn delete(
    State(ctx): State<ApiContext>,
    ApiPath(key): ApiPath<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ConsulError> {
    let params = Params::from_uri(&uri)?;
    let ns = namespace(&params, &headers)?;
    let cas = params.u64("cas")?.map(|c| c as Revision);
    let done = kv::delete(&*ctx.store, &ns, &key, params.flag("recurse"), cas).await?;
    json(ctx.store.revision().await?, &done)
}

/// `DELETE /v1/kv/` (with `?recurse`: everything in the namespace).
pub async fn delete_root(
    ctx: State<ApiContext>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ConsulError> {
    delete(ctx, ApiPath(String::new()), uri, headers).await
}

fn event_of(ns: &str, e: &WatchEvent) -> Option<Event> {
    let prefix = keys::kv_in(ns);
    match e {
        WatchEvent::Put(kv) => {
            let p = kv::pair_of(ns, kv).ok()?;
            Some(
                Event::default()
                    .event("put")
                    .id(kv.mod_revision.to_string())
                    .data(pair_json(&p).to_string()),
            )
        }
        WatchEvent::Delete { key, mod_revision } => {
            let k = key.strip_prefix(&prefix)?;
            Some(
                Event::default()
                    .event("delete")
                    .id(mod_revision.to_string())
                    .data(json!({ "Key": k, "ModifyIndex": mod_revision }).to_string()),
            )
        }
    }
}

/// The event stream of a key (or prefix): the current values first (unless
/// resuming from an index), then every change, without gap.
async fn events(
    ctx: ApiContext,
    ns: String,
    key: String,
    recurse: bool,
    from: Option<Revision>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ConsulError> {
    let full = keys::kv(&ns, &key);
    let (initial, start) = match from {
        Some(rev) => (Vec::new(), rev + 1),
        None => {
            let (pairs, rev) = if recurse {
                kv::list(&*ctx.store, &ns, &key).await?
            } else {
                let (p, rev) = kv::get(&*ctx.store, &ns, &key).await?;
                (p.into_iter().collect(), rev)
            };
            let evs: Vec<Event> = pairs
                .iter()
                .map(|p| {
                    Event::default()
                        .event("put")
                        .id(rev.to_string())
                        .data(pair_json(p).to_string())
                })
                .collect();
            (evs, rev + 1)
        }
    };
    let watch = ctx.store.watch(&full, start).await?;
    let ns2 = ns.clone();
    let changes = watch
        .take_while(|b| {
            let ok = !matches!(b, Err(StoreError::Closed));
            async move { ok }
        })
        .flat_map(move |batch| {
            let evs: Vec<Result<Event, Infallible>> = match batch {
                Ok(batch) => batch
                    .iter()
                    .filter(|e| recurse || e.key() == full)
                    .filter_map(|e| event_of(&ns2, e))
                    .map(Ok)
                    .collect(),
                // The history needed is gone: tell the client to re-read.
                Err(e) => vec![Ok(Event::default().event("error").data(e.to_string()))],
            };
            futures::stream::iter(evs)
        });
    let stream = futures::stream::iter(initial.into_iter().map(Ok)).chain(changes);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
