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
    CONNECTION, CONTENT_LENGTH, EXPECT, FORWARDED, HOST, HeaderMap, HeaderName, HeaderValue,
    PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use hyper::http::uri::PathAndQuery;
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;

use crate::http::Inner;
use crate::http::balance::{Outcome, Picked, ServiceState};
use crate::http::body::{ProxiedBody, RespBody};
use crate::http::codec;
use crate::http::error::ProxyError;
use crate::http::metrics::RequestCounters;
use crate::http::table::{normalize_host, strip_path};
use crate::http::upstream::{self, SendBody, UpBody, Upstream, UpstreamError};

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
    // A body of known length keeps it; one of unknown length (a chunked
    // HTTP/1.1 body, an HTTP/2 body without content-length) is re-encoded
    // as chunks.
    let body_len = if body.is_end_stream() {
        Some(0)
    } else {
        body.size_hint().exact()
    };
    let mut body = body;
    let request_was_head = parts.method == Method::HEAD;
    let mut head = Vec::with_capacity(512);
    let mut tried = 0u64;
    let mut attempt = 0u32;
    let breaker = &inner.breaker;
    let clock = &inner.clock;
    let outcome: Result<(upstream::Response, Picked), ProxyError> = loop {
        let Some(picked) = service.pick(tried, clock, breaker) else {
            break Err(ProxyError::NoHealthyInstance(service.id.clone()));
        };
        if picked.index < 64 {
            tried |= 1 << picked.index;
        }
        head.clear();
        encode_request_head(
            &mut head,
            &parts.method,
            pq.as_str(),
            &parts.headers,
            body_len,
            &picked.backend.authority,
        );
        // Sent once only: a body is consumed by the first attempt.
        let send_body = if body_len == Some(0) || retryable {
            SendBody::Empty
        } else {
            SendBody::Hyper {
                body: &mut body,
                chunked: body_len.is_none(),
            }
        };
        let sent = tokio::time::timeout(
            inner.config.upstream_timeout,
            conn.upstream.send(
                picked.backend.addr,
                &head,
                send_body,
                request_was_head,
                retryable || (body_len == Some(0) && idempotent(&parts.method)),
            ),
        )
        .await;
        match sent {
            Ok(Ok(resp)) => {
                let failed = inner.config.eject_on_5xx && resp.head.status >= 500;
                let o = if failed {
                    Outcome::Failure
                } else {
                    Outcome::Success
                };
                report(&service, &picked, o, inner);
                break Ok((resp, picked));
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
                // A client whose body broke off is not the instance's fault.
                if !matches!(e, UpstreamError::ClientBody(_)) {
                    report(&service, &picked, Outcome::Failure, inner);
                }
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

    let (resp, picked) = match outcome {
        Ok(r) => r,
        Err(err) => {
            return respond_err(&counters, err, &parts.method, &host, orig_uri.path(), start);
        }
    };
    let status = StatusCode::from_u16(resp.head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    let headers = response_headers(&resp, switching && client_upgrade.is_some());
    let backend = picked.backend.clone();
    let body = if switching {
        // An upgraded connection belongs to the tunnel, never to the pool.
        if let Some(client) = client_upgrade
            && headers.contains_key(UPGRADE)
        {
            let mut instance = resp.conn;
            instance.consume(resp.head.len);
            tokio::spawn(tunnel(client, instance));
        }
        RespBody::Local(http_body_util::Full::default())
    } else {
        RespBody::Proxied(ProxiedBody {
            inner: UpBody::new(resp, conn.upstream.pool().clone()),
            _slot: Some(slot),
            _picked: Some(picked),
        })
    };
    counters.record(status.as_u16(), start.elapsed());
    access_log(
        &parts.method,
        &host,
        orig_uri.path(),
        status,
        start,
        &backend.id,
    );
    let mut out = Response::new(body);
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    )
}

/// The request head sent to an instance: origin-form target, the client's
/// headers (already rewritten) minus framing, then this hop's framing.
fn encode_request_head(
    out: &mut Vec<u8>,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    body_len: Option<u64>,
    authority: &hyper::http::uri::Authority,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !headers.contains_key(HOST) {
        // HTTP/1.0 without a Host header: name the instance.
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(authority.as_str().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut had_length = false;
    for (name, value) in headers {
        // The body is sent at once, so `Expect: 100-continue` has nothing
        // to wait for on this hop.
        if name == CONTENT_LENGTH || name == EXPECT {
            had_length |= name == CONTENT_LENGTH;
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match body_len {
        Some(0) => {
            if had_length || matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
                out.extend_from_slice(b"content-length: 0\r\n");
            }
        }
        Some(n) => {
            use std::io::Write;
            let _ = write!(out, "content-length: {n}\r\n");
        }
        None => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// The instance's response headers minus hop-by-hop ones; for a `101`
/// passed on to the client, `Connection: upgrade` and its `Upgrade`.
fn response_headers(resp: &upstream::Response, upgrade: bool) -> HeaderMap {
    let raw = resp.head_bytes();
    let fields = &resp.head.headers;
    let named: Vec<&[u8]> = fields
        .iter()
        .filter(|(n, _)| raw[n.clone()].eq_ignore_ascii_case(b"connection"))
        .flat_map(|(_, v)| raw[v.clone()].split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .collect();
    let mut h = HeaderMap::with_capacity(fields.len());
    for (n, v) in fields {
        let (name, value) = (&raw[n.clone()], &raw[v.clone()]);
        let keep_upgrade = upgrade && name.eq_ignore_ascii_case(b"upgrade");
        if !keep_upgrade
            && (codec::is_hop_by_hop(name) || named.iter().any(|t| t.eq_ignore_ascii_case(name)))
        {
            continue;
        }
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            h.append(name, value);
        }
    }
    if upgrade && h.contains_key(UPGRADE) {
        h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
    h
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

/// Both sides switched protocols: copy bytes until either closes. Bytes
/// the instance sent right after its `101` go to the client first.
async fn tunnel(client: hyper::upgrade::OnUpgrade, mut instance: upstream::Conn) {
    let upgraded = match client.await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(error = %e, "protocol upgrade failed");
            return;
        }
    };
    let mut c = TokioIo::new(upgraded);
    let early = instance.take_data();
    let copied = async {
        if !early.is_empty() {
            tokio::io::AsyncWriteExt::write_all(&mut c, &early).await?;
        }
        tokio::io::copy_bidirectional(&mut c, &mut instance.stream).await
    };
    if let Err(e) = copied.await {
        tracing::debug!(error = %e, "upgraded connection ended with an error");
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
