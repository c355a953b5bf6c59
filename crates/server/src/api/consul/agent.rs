//! `/v1/agent/*` and `/v1/status/*`: berth answers as a one-node Consul
//! server that is its own leader. Services registered here (as
//! registrator or an app would) are stored under `/berth/external/<ns>/`
//! and listed by [`super::catalog`] next to berth's own instances; they
//! stay until deregistered and count as passing (their `Check`s are
//! accepted and not run).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::response::Response;
use berth_model::keys;
use serde_json::{Map, Value, json};

use super::catalog::External;
use super::{DATACENTER, Params, json, namespace};
use crate::api::error::{ApiError, ConsulError};
use crate::api::{ApiContext, ApiPath};

/// The elected berth server's API address, as Consul gives its Raft
/// leader's (`""` while there is none, as Consul does).
async fn leader_addr(ctx: &ApiContext) -> Result<String, ConsulError> {
    let leader = match ctx.store.get(crate::leader::KEY).await? {
        Some(kv) => Some(berth_store::decode::<crate::leader::LeaderRecord>(&kv)?),
        None => None,
    };
    Ok(leader
        .and_then(|l| l.api.first().map(ToString::to_string))
        .unwrap_or_default())
}

/// `GET /v1/agent/self`: the minimum Consul clients read (Prometheus
/// reads `Config.Datacenter`).
pub async fn self_(State(ctx): State<ApiContext>) -> Result<Response, ConsulError> {
    let rev = ctx.store.revision().await?;
    json(
        rev,
        &json!({
            "Config": {
                "Datacenter": DATACENTER,
                "NodeName": ctx.node_id,
                "NodeID": "",
                "Server": true,
                "Revision": "berth",
                "Version": format!("1.17.0+berth.{}", env!("CARGO_PKG_VERSION")),
            },
            "Member": {
                "Name": ctx.node_id,
                "Addr": "127.0.0.1",
                "Port": 8301,
                "Tags": { "dc": DATACENTER, "role": "consul", "build": "berth" },
                "Status": 1,
            },
            "Meta": { "berth": "true" },
        }),
    )
}

/// `GET /v1/status/leader`: the leading server's API address.
pub async fn leader(State(ctx): State<ApiContext>) -> Result<Response, ConsulError> {
    let addr = leader_addr(&ctx).await?;
    json(ctx.store.revision().await?, &addr)
}

/// `GET /v1/status/peers`: the leader (berth's servers are peers through
/// etcd, which has its own membership).
pub async fn peers(State(ctx): State<ApiContext>) -> Result<Response, ConsulError> {
    let addr = leader_addr(&ctx).await?;
    let peers: Vec<String> = std::iter::once(addr).filter(|a| !a.is_empty()).collect();
    json(ctx.store.revision().await?, &peers)
}

/// A field of a JSON object, matched without regard to case (Go's
/// decoder, which Consul uses, does the same: clients send `name` or `Name`).
fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

fn bad(message: String) -> ConsulError {
    ConsulError(ApiError::BadRequest {
        message,
        hint: None,
    })
}

/// Read a registration body into an [`External`].
pub fn parse_registration(body: &[u8]) -> Result<External, ConsulError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("Request decode failed: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("Request decode failed: expected a JSON object".into()))?;
    let name = field(obj, "Name")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad("Missing service name".into()))?
        .to_owned();
    let id = field(obj, "ID")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or(&name)
        .to_owned();
    if id.contains('/') {
        return Err(bad(format!(
            "Invalid service ID {id:?}: '/' is not allowed"
        )));
    }
    let tags = match field(obj, "Tags") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| t.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("Tags must be strings".into()))?,
        Some(_) => return Err(bad("Tags must be a list of strings".into())),
    };
    let port = match field(obj, "Port") {
        None | Some(Value::Null) => 0,
        Some(p) => p
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| bad(format!("Invalid port {p}")))?,
    };
    let address = field(obj, "Address")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let meta = match field(obj, "Meta") {
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("Meta values must be strings".into()))?,
        _ => Default::default(),
    };
    Ok(External {
        id,
        name,
        tags,
        address,
        port,
        meta,
    })
}

/// `PUT /v1/agent/service/register`.
pub async fn register(
    State(ctx): State<ApiContext>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ConsulError> {
    let params = Params::from_uri(&uri)?;
    let ns = namespace(&params, &headers)?;
    let ext = parse_registration(&body)?;
    let key = keys::external(&ns, &ext.id);
    let rev = berth_store::put_json(&*ctx.store, &key, &ext).await?;
    json(rev, &Value::Null)
}

/// `PUT /v1/agent/service/deregister/<id>`.
pub async fn deregister(
    State(ctx): State<ApiContext>,
    ApiPath(id): ApiPath<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ConsulError> {
    let params = Params::from_uri(&uri)?;
    let ns = namespace(&params, &headers)?;
    let key = keys::external(&ns, &id);
    if ctx.store.get(&key).await?.is_none() {
        return Err(ConsulError(ApiError::NotFound(format!(
            "Unknown service ID {id:?}. Ensure that the service ID is passed, not the service name."
        ))));
    }
    let rev = ctx.store.delete(&key).await?;
    json(rev, &Value::Null)
}

/// `GET /v1/agent/services`: the registered services, by ID.
pub async fn services(
    State(ctx): State<ApiContext>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ConsulError> {
    let params = Params::from_uri(&uri)?;
    let ns = namespace(&params, &headers)?;
    let (kvs, rev) = ctx.store.range(&keys::external_in(&ns)).await?;
    let mut out = Map::new();
    for kv in kvs {
        let e: External = berth_store::decode(&kv)?;
        out.insert(
            e.id.clone(),
            json!({
                "ID": e.id, "Service": e.name, "Tags": e.tags, "Address": e.address,
                "Port": e.port, "Meta": e.meta, "Datacenter": DATACENTER,
                "Weights": { "Passing": 1, "Warning": 1 }, "EnableTagOverride": false,
            }),
        );
    }
    json(rev, &Value::Object(out))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn registrations_are_read_case_insensitively_with_defaults() {
        let e = parse_registration(
            br#"{"name":"ext","tags":["a"],"port":9100,"address":"127.0.0.2","meta":{"k":"v"}}"#,
        )
        .unwrap();
        assert_eq!(
            (e.id.as_str(), e.name.as_str(), e.port),
            ("ext", "ext", 9100)
        );
        assert_eq!(e.meta["k"], "v");
        let e = parse_registration(br#"{"ID":"x1","Name":"ext","Port":1}"#).unwrap();
        assert_eq!(e.id, "x1");
        assert!(parse_registration(br#"{"Port":1}"#).is_err());
        assert!(parse_registration(br#"{"Name":"a","Port":70000}"#).is_err());
        assert!(parse_registration(b"nope").is_err());
    }
}
