//! `/v1/session/create|destroy|info|renew|list|node`: sessions over
//! [`crate::kv`], in Consul's JSON shape. A TTL must be within Consul's
//! 10s–24h; without a TTL a session lives until destroyed.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::Response;
use serde_json::{Map, Value, json};

use super::{go_secs, json};
use crate::api::error::{ApiError, ConsulError};
use crate::api::{ApiContext, ApiPath};
use crate::kv::{self, Behavior, KvError, SessionInfo, SessionRequest, TTL_RANGE};

/// A session as Consul prints it.
pub fn session_json(info: &SessionInfo) -> Value {
    let s = &info.session;
    json!({
        "ID": s.id,
        "Name": s.name,
        "Node": s.node,
        "LockDelay": s.lock_delay_ns,
        "Behavior": match s.behavior { Behavior::Release => "release", Behavior::Delete => "delete" },
        "TTL": go_secs(s.ttl_secs),
        "NodeChecks": ["serfHealth"],
        "ServiceChecks": null,
        "CreateIndex": info.create_index,
        "ModifyIndex": info.modify_index,
    })
}

fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

fn bad(message: String) -> KvError {
    KvError::BadSession(message)
}

/// A duration given as Go text (`"15s"`) or as nanoseconds (a number).
fn duration(v: &Value, what: &str) -> Result<Duration, KvError> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .map(Duration::from_nanos)
            .ok_or_else(|| bad(format!("invalid {what} {n}"))),
        Value::String(s) if s.is_empty() => Ok(Duration::ZERO),
        Value::String(s) => crate::api::time::parse_duration_us(s)
            .map(Duration::from_micros)
            .ok_or_else(|| bad(format!("invalid {what} {s:?} (use e.g. 15s)"))),
        _ => Err(bad(format!("invalid {what}"))),
    }
}

/// Read a create body (empty means defaults).
pub fn parse_request(body: &[u8]) -> Result<SessionRequest, KvError> {
    let mut req = SessionRequest {
        lock_delay: Duration::from_secs(15),
        ..Default::default()
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(req);
    }
    let v: Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("Request decode failed: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("Request decode failed: expected a JSON object".into()))?;
    if let Some(n) = field(obj, "Name").and_then(Value::as_str) {
        req.name = n.to_owned();
    }
    if let Some(b) = field(obj, "Behavior").and_then(Value::as_str) {
        req.behavior = match b {
            "" | "release" => Behavior::Release,
            "delete" => Behavior::Delete,
            other => return Err(bad(format!("Invalid Behavior setting {other:?}"))),
        };
    }
    if let Some(d) = field(obj, "LockDelay") {
        req.lock_delay = duration(d, "LockDelay")?;
    }
    if let Some(t) = field(obj, "TTL") {
        let ttl = duration(t, "TTL")?;
        if !ttl.is_zero() {
            if ttl < TTL_RANGE.0 || ttl > TTL_RANGE.1 {
                return Err(bad(format!(
                    "Invalid Session TTL '{}', must be between [10s=24h0m0s]",
                    ttl.as_secs()
                )));
            }
            req.ttl = Some(ttl);
        }
    }
    Ok(req)
}

/// `PUT /v1/session/create` → `{"ID": "..."}`.
pub async fn create(State(ctx): State<ApiContext>, body: Bytes) -> Result<Response, ConsulError> {
    let req = parse_request(&body)?;
    let info = kv::create_session(&*ctx.store, &ctx.node_id, req).await?;
    json(info.modify_index, &json!({ "ID": info.session.id }))
}

/// `PUT /v1/session/destroy/<id>` → `true`.
pub async fn destroy(
    State(ctx): State<ApiContext>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ConsulError> {
    kv::destroy_session(&*ctx.store, &id).await?;
    json(ctx.store.revision().await?, &true)
}

/// `GET /v1/session/info/<id>` → `[session]`, or `[]` when unknown.
pub async fn info(
    State(ctx): State<ApiContext>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ConsulError> {
    let (info, rev) = kv::session(&*ctx.store, &id).await?;
    let body: Vec<Value> = info.iter().map(session_json).collect();
    json(rev, &body)
}

/// `PUT /v1/session/renew/<id>` → `[session]`; 404 once it is gone.
pub async fn renew(
    State(ctx): State<ApiContext>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ConsulError> {
    match kv::renew_session(&*ctx.store, &id).await {
        Ok(info) => json(ctx.store.revision().await?, &[session_json(&info)]),
        Err(KvError::SessionNotFound(_)) => Err(ConsulError(ApiError::NotFound(format!(
            "Session id '{id}' not found"
        )))),
        Err(e) => Err(e.into()),
    }
}

/// `GET /v1/session/list`.
pub async fn list(State(ctx): State<ApiContext>) -> Result<Response, ConsulError> {
    let (all, rev) = kv::sessions(&*ctx.store).await?;
    json(rev, &all.iter().map(session_json).collect::<Vec<_>>())
}

/// `GET /v1/session/node/<node>`.
pub async fn node(
    State(ctx): State<ApiContext>,
    ApiPath(node): ApiPath<String>,
) -> Result<Response, ConsulError> {
    let (all, rev) = kv::sessions(&*ctx.store).await?;
    let mine: Vec<Value> = all
        .iter()
        .filter(|s| s.session.node == node)
        .map(session_json)
        .collect();
    json(rev, &mine)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn create_bodies_are_read_as_consul_reads_them() {
        let r = parse_request(b"").unwrap();
        assert_eq!(
            (r.ttl, r.behavior, r.lock_delay),
            (None, Behavior::Release, Duration::from_secs(15))
        );
        let r = parse_request(br#"{"name":"n","ttl":"10s","behavior":"delete","lockdelay":"0s"}"#)
            .unwrap();
        assert_eq!(
            (r.name.as_str(), r.ttl, r.behavior),
            ("n", Some(Duration::from_secs(10)), Behavior::Delete)
        );
        assert_eq!(r.lock_delay, Duration::ZERO);
        let r = parse_request(br#"{"LockDelay": 1000000000}"#).unwrap();
        assert_eq!(r.lock_delay, Duration::from_secs(1));
        assert!(
            parse_request(br#"{"TTL":"5s"}"#).is_err(),
            "below Consul's 10s"
        );
        assert!(parse_request(br#"{"Behavior":"explode"}"#).is_err());
    }
}
