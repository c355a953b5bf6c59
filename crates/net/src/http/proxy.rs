//! One request's way through the router: find the route, take a bulkhead
//! slot, pick an instance, rewrite headers, forward (retrying bodiless
//! idempotent requests on another instance when connecting fails), report
//! the outcome to the breaker, and stream the answer back — or tunnel the
//! connection after a `101 Switching Protocols`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use hyper::body::{Body, Incoming};
use hyper::header::{
    CONNECTION, FORWARDED, HOST, HeaderMap, HeaderName, HeaderValue, PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use hyper::http::uri::PathAndQuery;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;

use crate::http::balance::{Outcome, Picked, ServiceState};
use crate::http::body::{ProxiedBody, RespBody};
use crate::http::error::ProxyError;
use crate::http::metrics::RequestCounters;
use crate::http::table::{normalize_host, strip_path};
use crate::http::upstream::{Upstream, UpstreamError};
use crate::http::{Inner, UpstreamBody};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// What the router knows about a client connection, computed once.
pub(crate) struct ConnInfo {
    /// The peer address as an `X-Forwarded-For` element.
    peer_value: HeaderValue,
    proto: &'static str,
    /// `for=…` of the `Forwarded` element for this peer.
    forwarded_for: String,
    /// The serving runtime's pool of connections to instances.
    upstream: Arc<Upstream>,
}

impl ConnInfo {
    pub(crate) fn new(peer: SocketAddr, tls: bool, upstream: Arc<Upstream>) -> Self {
        let ip = peer.ip().to_canonical();
        let peer_value = HeaderValue::from_str(&ip.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        let forwarded_for = match ip {
            IpAddr::V4(ip) => format!("for={ip}"),
            IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
        };
        Self {
            peer_value,
            proto: if tls { "https" } else { "http" },
            forwarded_for,
            upstream,
        }
    }
}

/// Handle one request; never fails (errors become responses).
pub(crate) async fn handle(
    inner: &Inner,
    conn: &ConnInfo,
    mut req: Request<Incoming>,
) -> Response<RespBody> {
    let start = Instant::now();
    // HTTP/2 and absolute-form requests carry the host in the URI; that
    // wins over a Host header (RFC 9112 §3.2.2).
    let raw_host: Option<HeaderValue> = match req.uri().authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => req.headers().get(HOST).cloned(),
    };
    let host_str = raw_host
        .as_ref()
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let host = normalize_host(host_str);

    let (service, counters, stripped) = {
        let table = inner.table.load();
        let path = req.uri().path();
        match table.lookup(&host, path) {
            Some(m) => {
                let stripped = (m.route.strip && m.route.prefix != "/").then(|| {
                    let rest = strip_path(&m.route.prefix, path);
                    let pq = match req.uri().query() {
                        Some(q) => format!("{rest}?{q}"),
                        None => rest.to_string(),
                    };
                    PathAndQuery::try_from(pq).ok()
                });
                (
                    m.route.service.clone(),
                    m.route.counters.clone(),
                    stripped.flatten(),
                )
            }
            None => {
                inner
                    .global
                    .no_route
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let err = ProxyError::NoRoute {
                    host: clip(&host),
                    path: clip(path),
                };
                access_log(req.method(), &host, path, err.status(), start, "-");
                return err.into_response();
            }
        }
    };

    let Some(slot) = service.enter() else {
        let err = ProxyError::AtConcurrencyLimit {
            service: service.id.clone(),
            limit: service.max_concurrent.unwrap_or(0),
        };
        return respond_err(&counters, err, req.method(), &host, req.uri().path(), start);
    };

    let upgrade = req.version() == Version::HTTP_11
        && req.headers().contains_key(UPGRADE)
        && has_token(req.headers(), "upgrade");
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    let (mut parts, body) = req.into_parts();
    let pq = stripped
        .or_else(|| parts.uri.path_and_query().cloned())
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    rewrite_request_headers(&mut parts.headers, conn, raw_host.as_ref(), upgrade);
    parts.version = Version::HTTP_11;
    let retryable = !upgrade
        && body.is_end_stream()
        && service.retries > 0
        && service.backends.len() > 1
        && matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
        );
    let orig_uri = std::mem::take(&mut parts.uri);
    let mut body = Some(body);
    let mut tried = 0u64;
    let mut attempt = 0u32;
    let breaker = &inner.breaker;
    let clock = &inner.clock;
    let outcome: Result<(Response<Incoming>, _, Picked), ProxyError> = loop {
        let Some(picked) = service.pick(tried, clock, breaker) else {
            break Err(ProxyError::NoHealthyInstance(service.id.clone()));
        };
        if picked.index < 64 {
            tried |= 1 << picked.index;
        }
        // Origin-form: the connection already says which instance.
        let up = Uri::from(pq.clone());
        if !parts.headers.contains_key(HOST) {
            // HTTP/1.0 without a Host header: name the instance.
            if let Ok(v) = HeaderValue::from_str(picked.backend.authority.as_str()) {
                parts.headers.insert(HOST, v);
            }
        }
        let upstream_req = if retryable {
            let mut r = Request::new(UpstreamBody::Right(http_body_util::Empty::new()));
            *r.method_mut() = parts.method.clone();
            *r.uri_mut() = up;
            *r.version_mut() = Version::HTTP_11;
            *r.headers_mut() = parts.headers.clone();
            r
        } else {
            let b = body
                .take()
                .map(UpstreamBody::Left)
                .unwrap_or_else(|| UpstreamBody::Right(http_body_util::Empty::new()));
            let mut r = Request::new(b);
            *r.method_mut() = parts.method.clone();
            *r.uri_mut() = up;
            *r.version_mut() = Version::HTTP_11;
            *r.headers_mut() = std::mem::take(&mut parts.headers);
            r
        };
        let sent = tokio::time::timeout(
            inner.config.upstream_timeout,
            conn.upstream.send(picked.backend.addr, upstream_req),
        )
        .await;
        match sent {
            Ok(Ok((resp, lease))) => {
                let failed = inner.config.eject_on_5xx && resp.status().is_server_error();
                let o = if failed {
                    Outcome::Failure
                } else {
                    Outcome::Success
                };
                report(&service, &picked, o, inner);
                break Ok((resp, lease, picked));
            }
            Ok(Err(e @ UpstreamError::Connect(_))) => {
                report(&service, &picked, Outcome::Failure, inner);
                tracing::debug!(service = %service.id, backend = %picked.backend.addr, error = %e, "connect failed");
                if retryable && attempt < service.retries {
                    attempt += 1;
                    service
                        .shared
                        .metrics
                        .retries
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                break Err(ProxyError::Upstream {
                    service: service.id.clone(),
                    reason: "cannot connect to an instance",
                });
            }
            Ok(Err(e)) => {
                report(&service, &picked, Outcome::Failure, inner);
                tracing::debug!(service = %service.id, backend = %picked.backend.addr, error = %e, "upstream request failed");
                break Err(ProxyError::Upstream {
                    service: service.id.clone(),
                    reason: "the instance closed the connection or sent an invalid response",
                });
            }
            Err(_elapsed) => {
                report(&service, &picked, Outcome::Failure, inner);
                break Err(ProxyError::Timeout(service.id.clone()));
            }
        }
    };

    let (mut resp, lease, picked) = match outcome {
        Ok(r) => r,
        Err(err) => {
            return respond_err(&counters, err, &parts.method, &host, orig_uri.path(), start);
        }
    };
    let status = resp.status();
    // An upgraded connection belongs to the tunnel, never to the pool.
    let mut lease = Some(lease);
    if status == StatusCode::SWITCHING_PROTOCOLS {
        lease = None;
        let upgrade_value = resp.headers().get(UPGRADE).cloned();
        remove_hop_by_hop(resp.headers_mut());
        if let (Some(client), Some(v)) = (client_upgrade, upgrade_value) {
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("upgrade"));
            resp.headers_mut().insert(UPGRADE, v);
            let upstream = hyper::upgrade::on(&mut resp);
            tokio::spawn(tunnel(client, upstream));
        }
    } else {
        remove_hop_by_hop(resp.headers_mut());
    }
    counters.record(status.as_u16(), start.elapsed());
    access_log(
        &parts.method,
        &host,
        orig_uri.path(),
        status,
        start,
        &picked.backend.id,
    );
    let (rparts, rbody) = resp.into_parts();
    Response::from_parts(
        rparts,
        RespBody::Proxied(ProxiedBody {
            inner: rbody,
            _slot: Some(slot),
            _picked: Some(picked),
            lease,
            ended: false,
        }),
    )
}

fn report(service: &ServiceState, picked: &Picked, o: Outcome, inner: &Inner) {
    if picked.finish(o, &inner.clock, &inner.breaker) {
        service
            .shared
            .metrics
            .ejections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(
            service = %service.id,
            instance = %picked.backend.id,
            "instance ejected after consecutive failures"
        );
    }
}

fn respond_err(
    counters: &RequestCounters,
    err: ProxyError,
    method: &Method,
    host: &str,
    path: &str,
    start: Instant,
) -> Response<RespBody> {
    let status = err.status();
    counters.record(status.as_u16(), start.elapsed());
    access_log(method, host, path, status, start, "-");
    err.into_response()
}

fn access_log(
    method: &Method,
    host: &str,
    path: &str,
    status: StatusCode,
    start: Instant,
    backend: &str,
) {
    tracing::info!(
        target: "berth::access",
        method = %method,
        host,
        path,
        status = status.as_u16(),
        duration_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX),
        backend,
    );
}

/// Both sides switched protocols: copy bytes until either closes.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    match tokio::try_join!(client, upstream) {
        Ok((c, u)) => {
            let mut c = TokioIo::new(c);
            let mut u = TokioIo::new(u);
            if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                tracing::debug!(error = %e, "upgraded connection ended with an error");
            }
        }
        Err(e) => tracing::debug!(error = %e, "protocol upgrade failed"),
    }
}

/// Whether the `Connection` header lists `token`.
fn has_token(h: &HeaderMap, token: &str) -> bool {
    h.get_all(CONNECTION).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// Drop hop-by-hop headers (RFC 9110 §7.6.1): the fixed ones and any the
/// `Connection` header names.
fn remove_hop_by_hop(h: &mut HeaderMap) {
    if h.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
        h.remove(CONNECTION);
    }
    for n in [
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &TE,
        &TRAILER,
        &TRANSFER_ENCODING,
        &UPGRADE,
        &PROXY_AUTHENTICATE,
        &PROXY_AUTHORIZATION,
    ] {
        if h.contains_key(n) {
            h.remove(n);
        }
    }
}

fn rewrite_request_headers(
    h: &mut HeaderMap,
    conn: &ConnInfo,
    raw_host: Option<&HeaderValue>,
    upgrade: bool,
) {
    let upgrade_value = if upgrade {
        h.get(UPGRADE).cloned()
    } else {
        None
    };
    remove_hop_by_hop(h);
    if let Some(v) = upgrade_value {
        h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(UPGRADE, v);
    }
    if let Some(host) = raw_host {
        if !h.contains_key(HOST) {
            h.insert(HOST, host.clone());
        }
        h.insert(X_FORWARDED_HOST.clone(), host.clone());
    }
    h.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(conn.proto),
    );
    let xff = append_list(h, &X_FORWARDED_FOR, conn.peer_value.to_str().unwrap_or(""))
        .unwrap_or_else(|| conn.peer_value.clone());
    h.insert(X_FORWARDED_FOR.clone(), xff);

    let host = raw_host.and_then(|v| v.to_str().ok());
    let mut element =
        String::with_capacity(conn.forwarded_for.len() + host.map_or(0, |h| h.len() + 8) + 12);
    element.push_str(&conn.forwarded_for);
    if let Some(host) = host {
        // Quoted: a host with a port is not a token.
        element.push_str(";host=\"");
        element.push_str(host);
        element.push('"');
    }
    element.push_str(";proto=");
    element.push_str(conn.proto);
    let fwd = append_list(h, &FORWARDED, &element).or_else(|| HeaderValue::from_str(&element).ok());
    if let Some(v) = fwd {
        h.insert(FORWARDED, v);
    }
}

/// `existing, …, item` when the header is already present.
fn append_list(h: &HeaderMap, name: &HeaderName, item: &str) -> Option<HeaderValue> {
    let mut joined = String::new();
    for v in h.get_all(name) {
        if let Ok(s) = v.to_str() {
            joined.push_str(s);
            joined.push_str(", ");
        }
    }
    if joined.is_empty() {
        return None;
    }
    joined.push_str(item);
    HeaderValue::from_str(&joined).ok()
}

/// Cut client-supplied text before echoing it in an error body.
fn clip(s: &str) -> String {
    const MAX: usize = 200;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
