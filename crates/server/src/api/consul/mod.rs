//! The Consul-compatible HTTP API subset, served on berth's own listeners,
//! so tools that speak Consul (Prometheus's `consul_sd_configs`, consul
//! client libraries, registrator-style self-registration) work unchanged.
//!
//! # Layout
//! - this module: what every Consul route shares — query parameters, the
//!   namespace (`?ns=`, `X-Berth-Namespace` or `X-Consul-Namespace`;
//!   `default` otherwise), the `X-Consul-*` headers, blocking-query
//!   parameters (`?index=&wait=`), and `dc` (accepted, ignored: one
//!   datacenter, [`DATACENTER`]).
//! - [`catalog`]: `/v1/catalog/*` and `/v1/health/service/*`, built from
//!   [`crate::catalog::entries`] plus the services registered from outside.
//! - [`agent`]: `/v1/agent/self`, `/v1/agent/services`, service
//!   register/deregister, and `/v1/status/*`.
//! - [`session`]: `/v1/session/*` over [`crate::kv`].
//! - The KV routes (`/v1/kv/*`) are [`super::kv`]: they are berth's KV API
//!   too.
//!
//! Errors go through [`super::error::ConsulError`]: plain text, as Consul.
//!
//! # Naming
//! berth's instance of service `web` of stack `shop` is the Consul service
//! `web.shop` (as in DNS, `web.shop.<ns>.berth`), with service ID
//! `shop.web.<slot>`, tags from the service's labels (`key=value`) and
//! `ServiceMeta` `berth_namespace`, `berth_stack`, `berth_service`,
//! `release`, `uid`. A registered service keeps its own name and ID.

pub mod agent;
pub mod catalog;
pub mod session;

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Uri, header};
use axum::response::{IntoResponse, Response};
use berth_store::Revision;

use super::error::{ApiError, ConsulError};
use crate::desired;

/// Register the KV and Consul routes on berth's router.
pub(super) fn add_routes(r: super::Routes) -> super::Routes {
    use super::kv as k;
    use axum::http::Method;
    r.add(Method::GET, "/v1/kv/", k::get_root)
        .add(Method::DELETE, "/v1/kv/", k::delete_root)
        .add(Method::GET, "/v1/kv/{*key}", k::get)
        .add(Method::PUT, "/v1/kv/{*key}", k::put)
        .add(Method::DELETE, "/v1/kv/{*key}", k::delete)
        .add(Method::GET, "/v1/catalog/services", catalog::services)
        .add(Method::GET, "/v1/catalog/service/{name}", catalog::service)
        .add(Method::GET, "/v1/catalog/nodes", catalog::nodes)
        .add(Method::GET, "/v1/catalog/datacenters", catalog::datacenters)
        .add(
            Method::GET,
            "/v1/health/service/{name}",
            catalog::health_service,
        )
        .add(Method::PUT, "/v1/session/create", session::create)
        .add(Method::PUT, "/v1/session/destroy/{id}", session::destroy)
        .add(Method::GET, "/v1/session/info/{id}", session::info)
        .add(Method::PUT, "/v1/session/renew/{id}", session::renew)
        .add(Method::GET, "/v1/session/list", session::list)
        .add(Method::GET, "/v1/session/node/{node}", session::node)
        .add(Method::GET, "/v1/agent/self", agent::self_)
        .add(Method::GET, "/v1/agent/services", agent::services)
        .add(Method::PUT, "/v1/agent/service/register", agent::register)
        .add(
            Method::PUT,
            "/v1/agent/service/deregister/{id}",
            agent::deregister,
        )
        .add(Method::GET, "/v1/status/leader", agent::leader)
        .add(Method::GET, "/v1/status/peers", agent::peers)
}

/// The one datacenter berth reports.
pub const DATACENTER: &str = "berth";

/// Default and longest wait of a blocking query (Consul's).
pub const WAIT_DEFAULT: Duration = Duration::from_secs(300);
/// Longest wait of a blocking query.
pub const WAIT_MAX: Duration = Duration::from_secs(600);

/// Query parameters as Consul reads them: `?recurse` and `?recurse=true`
/// both set a flag.
#[derive(Debug, Default)]
pub struct Params(Vec<(String, String)>);

impl Params {
    /// Parse the request's query string.
    pub fn from_uri(uri: &Uri) -> Result<Self, ConsulError> {
        let query = uri.query().unwrap_or("");
        let pairs = axum::extract::Query::<Vec<(String, String)>>::try_from_uri(uri)
            .map_err(|_| {
                ConsulError(ApiError::bad_request(
                    format!("bad query string: {query}"),
                    "see Consul's HTTP API",
                ))
            })?
            .0;
        Ok(Self(pairs))
    }

    /// A parameter's value.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether a flag is set (present, and not `false`/`0`).
    pub fn flag(&self, name: &str) -> bool {
        self.get(name).is_some_and(|v| !matches!(v, "false" | "0"))
    }

    /// A numeric parameter.
    pub fn u64(&self, name: &str) -> Result<Option<u64>, ConsulError> {
        match self.get(name) {
            None | Some("") => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                ConsulError(ApiError::BadRequest {
                    message: format!("Invalid {name}: {v:?} is not an unsigned integer"),
                    hint: None,
                })
            }),
        }
    }

    /// Every value of a repeated parameter (`?tag=a&tag=b`).
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// The namespace of a request: `?ns=`, else the `X-Berth-Namespace` or
/// `X-Consul-Namespace` header, else `default`.
pub fn namespace(params: &Params, headers: &HeaderMap) -> Result<String, ConsulError> {
    let ns = params
        .get("ns")
        .filter(|s| !s.is_empty())
        .or_else(|| {
            ["x-berth-namespace", "x-consul-namespace"]
                .iter()
                .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
        })
        .unwrap_or(berth_model::DEFAULT_NAMESPACE);
    desired::check_name("namespace", ns)?;
    Ok(ns.to_owned())
}

/// A blocking query's parameters: wait until the data's index passes
/// `index`, for at most `wait`.
#[derive(Debug, Clone, Copy)]
pub struct Blocking {
    /// The index the client has seen.
    pub index: Revision,
    /// How long to wait at most.
    pub wait: Duration,
}

/// `?index=&wait=`: `None` when the query does not block (no index, or 0).
pub fn blocking(params: &Params) -> Result<Option<Blocking>, ConsulError> {
    let index = params.u64("index")?.unwrap_or(0);
    if index == 0 {
        return Ok(None);
    }
    let wait = match params.get("wait") {
        None | Some("") => WAIT_DEFAULT,
        Some(w) => parse_wait(w).ok_or_else(|| {
            ConsulError(ApiError::BadRequest {
                message: format!("Invalid wait time: {w:?} (use a duration like 30s, 5m, 500ms)"),
                hint: None,
            })
        })?,
    };
    Ok(Some(Blocking {
        index: index.min(i64::MAX as u64) as Revision,
        wait: wait.min(WAIT_MAX),
    }))
}

/// A Go-style duration (`10s`, `1m30s`, `250ms`).
fn parse_wait(s: &str) -> Option<Duration> {
    super::time::parse_duration_us(s.trim()).map(Duration::from_micros)
}

/// The headers every Consul answer carries: the index of the result, and
/// that there is a known leader (berth is its own).
pub fn index_headers(index: Revision) -> [(HeaderName, HeaderValue); 3] {
    [
        (
            HeaderName::from_static("x-consul-index"),
            HeaderValue::from(index.max(1)),
        ),
        (
            HeaderName::from_static("x-consul-knownleader"),
            HeaderValue::from_static("true"),
        ),
        (
            HeaderName::from_static("x-consul-lastcontact"),
            HeaderValue::from_static("0"),
        ),
    ]
}

/// A JSON answer with the Consul headers.
pub fn json<T: serde::Serialize>(index: Revision, body: &T) -> Result<Response, ConsulError> {
    let bytes = serde_json::to_vec(body)
        .map_err(|e| ConsulError(ApiError::Internal(format!("encoding the answer: {e}"))))?;
    Ok((
        index_headers(index),
        [(header::CONTENT_TYPE, "application/json")],
        bytes,
    )
        .into_response())
}

/// Go's duration text for a whole number of seconds (`15s`), as Consul
/// prints session TTLs.
pub fn go_secs(secs: u64) -> String {
    if secs == 0 {
        String::new()
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_read_flags_numbers_and_waits_as_consul_does() {
        let uri: Uri = "/v1/kv/a?recurse&raw=false&index=42&wait=1m30s&tag=a&tag=b"
            .parse()
            .unwrap_or_default();
        let p = Params::from_uri(&uri).unwrap_or_default();
        assert!(p.flag("recurse"));
        assert!(!p.flag("raw"));
        assert!(!p.flag("keys"));
        assert_eq!(p.all("tag"), ["a", "b"]);
        let b = blocking(&p).ok().flatten().map(|b| (b.index, b.wait));
        assert_eq!(b, Some((42, Duration::from_secs(90))));
        let long: Uri = "/x?index=1&wait=1h".parse().unwrap_or_default();
        let b = blocking(&Params::from_uri(&long).unwrap_or_default())
            .ok()
            .flatten();
        assert_eq!(b.map(|b| b.wait), Some(WAIT_MAX));
        let bad: Uri = "/x?index=1&wait=soon".parse().unwrap_or_default();
        assert!(blocking(&Params::from_uri(&bad).unwrap_or_default()).is_err());
        let none: Uri = "/x?index=0".parse().unwrap_or_default();
        assert!(matches!(
            blocking(&Params::from_uri(&none).unwrap_or_default()),
            Ok(None)
        ));
    }
}
