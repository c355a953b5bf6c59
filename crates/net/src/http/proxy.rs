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
    CONNECTION, CONTENT_LENGTH, HOST, HeaderMap, HeaderName, HeaderValue, UPGRADE,
};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;

use crate::http::Inner;
use crate::http::balance::{Outcome, Picked, ServiceState};
use crate::http::body::{ProxiedBody, RespBody};
use crate::http::codec;
use crate::http::error::ProxyError;
use crate::http::metrics::RequestCounters;
use crate::http::table::{normalize_host, strip_path};
use crate::http::upstream::{self, HyperBody, RequestBody, UpBody, Upstream, UpstreamError};

/// What the router knows about a client connection, computed once.
pub(crate) struct ConnInfo {
    /// The peer address as an `X-Forwarded-For` element.
    pub(crate) peer: String,
    pub(crate) proto: &'static str,
    /// `for=…` of the `Forwarded` element for this peer.
    pub(crate) forwarded_for: String,
    /// The serving runtime's pool of connections to instances.
    pub(crate) upstream: Arc<Upstream>,
}

impl ConnInfo {
    pub(crate) fn new(peer: SocketAddr, tls: bool, upstream: Arc<Upstream>) -> Self {
        let ip = peer.ip().to_canonical();
        let peer = ip.to_string();
        let forwarded_for = match ip {
            IpAddr::V4(ip) => format!("for={ip}"),
            IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
        };
        Self {
            peer,
            proto: if tls { "https" } else { "http" },
            forwarded_for,
            upstream,
        }
    }
}

/// The route a request takes, resolved once.
pub(crate) struct Routed {
    pub(crate) service: Arc<ServiceState>,
    pub(crate) counters: Arc<RequestCounters>,
    /// The target after stripping the route's prefix (with the query), if
    /// the route strips.
    pub(crate) stripped: Option<String>,
}

/// Find the route for `host` (normalized) and `path`; `None` counts a
/// request without a route.
pub(crate) fn route(inner: &Inner, host: &str, path: &str, query: Option<&str>) -> Option<Routed> {
    let table = inner.table.load();
    match table.lookup(host, path) {
        Some(m) => {
            let stripped = (m.route.strip && m.route.prefix != "/").then(|| {
                let rest = strip_path(&m.route.prefix, path);
                match query {
                    Some(q) => format!("{rest}?{q}"),
                    None => rest.to_string(),
                }
            });
            Some(Routed {
                service: m.route.service.clone(),
                counters: m.route.counters.clone(),
                stripped,
            })
        }
        None => {
            inner
                .global
                .no_route
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            None
        }
    }
}

/// A request head for instances, written once per request and completed
/// per attempt (a request without any host names the instance).
pub(crate) struct UpstreamHead {
    pub(crate) buf: Vec<u8>,
    /// Length before the per-attempt part.
    pub(crate) base: usize,
    pub(crate) needs_host: bool,
}

impl UpstreamHead {
    pub(crate) fn new() -> Self {
        Self {
            buf: Vec::with_capacity(1024),
            base: 0,
            needs_host: false,
        }
    }

    fn complete(&mut self, authority: &str) -> &[u8] {
        self.buf.truncate(self.base);
        if self.needs_host {
            self.buf.extend_from_slice(b"host: ");
            self.buf.extend_from_slice(authority.as_bytes());
            self.buf.extend_from_slice(b"\r\n");
        }
        self.buf.extend_from_slice(b"\r\n");
        &self.buf
    }
}

/// How the request body travels on the hop to the instance.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum BodyLen {
    /// No body; `had_length`: the client sent `Content-Length: 0`.
    Empty {
        had_length: bool,
    },
    Length(u64),
    Chunked,
}

/// What the rewritten head needs to know besides the client's headers.
pub(crate) struct HeadParts<'a> {
    pub(crate) method: &'a [u8],
    /// Origin-form target.
    pub(crate) target: &'a [u8],
    /// The host the client named (URI authority, else `Host`).
    pub(crate) raw_host: Option<&'a [u8]>,
    /// The `Upgrade` value when the client asks to switch protocols.
    pub(crate) upgrade: Option<&'a [u8]>,
    pub(crate) body: BodyLen,
}

/// Write the request head for an instance into `out.buf` (everything but
/// the optional `host` line and the blank line, see
/// [`UpstreamHead::complete`]): the client's headers minus hop-by-hop ones
/// (RFC 9110 §7.6.1, including those `Connection` names), minus the framing
/// (this hop has its own), with `X-Forwarded-For`/`-Proto`/`-Host` and
/// `Forwarded` set or appended to.
pub(crate) fn write_upstream_head<'h, I>(
    out: &mut UpstreamHead,
    conn: &ConnInfo,
    p: &HeadParts<'_>,
    headers: impl Fn() -> I,
) where
    I: Iterator<Item = (&'h [u8], &'h [u8])>,
{
    let b = &mut out.buf;
    b.clear();
    b.extend_from_slice(p.method);
    b.push(b' ');
    b.extend_from_slice(p.target);
    b.extend_from_slice(b" HTTP/1.1\r\n");
    // Header names `Connection` lists: usually none.
    let mut named: Vec<&[u8]> = Vec::new();
    for (n, v) in headers() {
        if n.eq_ignore_ascii_case(b"connection") {
            named.extend(v.split(|&c| c == b',').map(<[u8]>::trim_ascii));
        }
    }
    let mut has_host = false;
    let mut xff: Option<Vec<u8>> = None;
    let mut fwd: Option<Vec<u8>> = None;
    for (n, v) in headers() {
        if n.eq_ignore_ascii_case(b"host") {
            has_host = true;
        } else if n.eq_ignore_ascii_case(b"x-forwarded-for") {
            append_item(&mut xff, v);
            continue;
        } else if n.eq_ignore_ascii_case(b"forwarded") {
            append_item(&mut fwd, v);
            continue;
        } else if codec::is_hop_by_hop(n)
            || n.eq_ignore_ascii_case(b"content-length")
            // The body is sent at once: `Expect: 100-continue` has
            // nothing to wait for on this hop.
            || n.eq_ignore_ascii_case(b"expect")
            || n.eq_ignore_ascii_case(b"x-forwarded-proto")
            || n.eq_ignore_ascii_case(b"x-forwarded-host")
            || named.iter().any(|t| t.eq_ignore_ascii_case(n))
        {
            continue;
        }
        b.extend_from_slice(n);
        b.extend_from_slice(b": ");
        b.extend_from_slice(v);
        b.extend_from_slice(b"\r\n");
    }
    if let Some(v) = p.upgrade {
        b.extend_from_slice(b"connection: upgrade\r\nupgrade: ");
        b.extend_from_slice(v);
        b.extend_from_slice(b"\r\n");
    }
    if let Some(host) = p.raw_host {
        if !has_host {
            b.extend_from_slice(b"host: ");
            b.extend_from_slice(host);
            b.extend_from_slice(b"\r\n");
            has_host = true;
        }
        b.extend_from_slice(b"x-forwarded-host: ");
        b.extend_from_slice(host);
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(b"x-forwarded-proto: ");
    b.extend_from_slice(conn.proto.as_bytes());
    b.extend_from_slice(b"\r\nx-forwarded-for: ");
    if let Some(x) = &xff {
        b.extend_from_slice(x);
        b.extend_from_slice(b", ");
    }
    b.extend_from_slice(conn.peer.as_bytes());
    b.extend_from_slice(b"\r\nforwarded: ");
    if let Some(f) = &fwd {
        b.extend_from_slice(f);
        b.extend_from_slice(b", ");
    }
    b.extend_from_slice(conn.forwarded_for.as_bytes());
    if let Some(host) = p.raw_host {
        // Quoted: a host with a port is not a token.
        b.extend_from_slice(b";host=\"");
        b.extend_from_slice(host);
        b.push(b'"');
    }
    b.extend_from_slice(b";proto=");
    b.extend_from_slice(conn.proto.as_bytes());
    b.extend_from_slice(b"\r\n");
    match p.body {
        BodyLen::Empty { had_length } => {
            if had_length || matches!(p.method, b"POST" | b"PUT" | b"PATCH") {
                b.extend_from_slice(b"content-length: 0\r\n");
            }
        }
        BodyLen::Length(n) => {
            use std::io::Write;
            let _ = write!(b, "content-length: {n}\r\n");
        }
        BodyLen::Chunked => b.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.base = b.len();
    out.needs_host = !has_host;
}

fn append_item(list: &mut Option<Vec<u8>>, v: &[u8]) {
    let l = list.get_or_insert_with(Vec::new);
    if !l.is_empty() {
        l.extend_from_slice(b", ");
    }
    l.extend_from_slice(v);
}

/// What to send, and how it may be retried.
pub(crate) struct Attempt<'a, B> {
    pub(crate) body: Option<&'a mut B>,
    pub(crate) request_was_head: bool,
    /// Bodiless and idempotent: may be sent to another instance when
    /// connecting fails (up to the service's retries).
    pub(crate) retryable: bool,
    /// May be sent again on a new connection when a reused one turns out
    /// closed before any response byte.
    pub(crate) repeatable: bool,
}

/// Pick instances and send until one answers with a head, or the request
/// fails: the one place of retries, breaker reports and the upstream
/// timeout.
pub(crate) async fn forward<B: RequestBody>(
    inner: &Inner,
    up: &Upstream,
    service: &ServiceState,
    head: &mut UpstreamHead,
    mut a: Attempt<'_, B>,
) -> Result<(upstream::Response, Picked), ProxyError> {
    let mut tried = 0u64;
    let mut attempt = 0u32;
    let breaker = &inner.breaker;
    let clock = &inner.clock;
    loop {
        let Some(picked) = service.pick(tried, clock, breaker) else {
            return Err(ProxyError::NoHealthyInstance(service.id.clone()));
        };
        if picked.index < 64 {
            tried |= 1 << picked.index;
        }
        let bytes = head.complete(picked.backend.authority.as_str());
        let sent = tokio::time::timeout(
            inner.config.upstream_timeout,
            up.send(
                picked.backend.addr,
                bytes,
                a.body.as_deref_mut(),
                a.request_was_head,
                a.repeatable,
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
                report(service, &picked, o, inner);
                return Ok((resp, picked));
            }
            Ok(Err(e @ UpstreamError::Connect(_))) => {
                report(service, &picked, Outcome::Failure, inner);
                tracing::debug!(service = %service.id, backend = %picked.backend.addr, error = %e, "connect failed");
                if a.retryable && attempt < service.retries {
                    attempt += 1;
                    service
                        .shared
                        .metrics
                        .retries
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                return Err(ProxyError::Upstream {
                    service: service.id.clone(),
                    reason: "cannot connect to an instance",
                });
            }
            Ok(Err(UpstreamError::ClientGone)) => {
                // Not the instance's fault either, and nobody to answer.
                return Err(ProxyError::ClientGone(service.id.clone()));
            }
            Ok(Err(UpstreamError::ClientBody(e))) => {
                // A client whose body broke off is not the instance's fault.
                tracing::debug!(service = %service.id, error = %e, "request body not forwarded");
                return Err(ProxyError::BadRequest("the request body could not be read"));
            }
            Ok(Err(e)) => {
                report(service, &picked, Outcome::Failure, inner);
                tracing::debug!(service = %service.id, backend = %picked.backend.addr, error = %e, "upstream request failed");
                return Err(ProxyError::Upstream {
                    service: service.id.clone(),
                    reason: "the instance closed the connection or sent an invalid response",
                });
            }
            Err(_elapsed) => {
                report(service, &picked, Outcome::Failure, inner);
                return Err(ProxyError::Timeout(service.id.clone()));
            }
        }
    }
}

/// Bodiless, idempotent, not an upgrade, and another instance to try.
pub(crate) fn retryable(
    service: &ServiceState,
    method: &[u8],
    bodiless: bool,
    upgrade: bool,
) -> bool {
    !upgrade && bodiless && service.retries > 0 && service.backends.len() > 1 && idempotent(method)
}

pub(crate) fn idempotent(m: &[u8]) -> bool {
    matches!(m, b"GET" | b"HEAD" | b"OPTIONS" | b"PUT" | b"DELETE")
}

/// Handle one request from hyper (HTTP/2); never fails (errors
/// become responses).
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

    let Some(routed) = route(inner, &host, req.uri().path(), req.uri().query()) else {
        let err = ProxyError::NoRoute {
            host: clip(&host),
            path: clip(req.uri().path()),
        };
        access_log(
            req.method(),
            &host,
            req.uri().path(),
            err.status(),
            start,
            "-",
        );
        return err.into_response();
    };
    let Routed {
        service,
        counters,
        stripped,
    } = routed;

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

    let (parts, mut body) = req.into_parts();
    let target = stripped.unwrap_or_else(|| {
        parts
            .uri
            .path_and_query()
            .map_or_else(|| "/".to_string(), |pq| pq.as_str().to_string())
    });
    // A body of known length keeps it; one of unknown length (a chunked
    // HTTP/1.1 body, an HTTP/2 body without content-length) is re-encoded
    // as chunks.
    let body_len = if body.is_end_stream() {
        BodyLen::Empty {
            had_length: parts.headers.contains_key(CONTENT_LENGTH),
        }
    } else {
        match body.size_hint().exact() {
            Some(n) => BodyLen::Length(n),
            None => BodyLen::Chunked,
        }
    };
    let bodiless = matches!(body_len, BodyLen::Empty { .. });
    let method = parts.method.as_str().as_bytes();
    let mut head = UpstreamHead::new();
    write_upstream_head(
        &mut head,
        conn,
        &HeadParts {
            method,
            target: target.as_bytes(),
            raw_host: raw_host.as_ref().map(HeaderValue::as_bytes),
            upgrade: if upgrade {
                parts.headers.get(UPGRADE).map(HeaderValue::as_bytes)
            } else {
                None
            },
            body: body_len,
        },
        || {
            parts
                .headers
                .iter()
                .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()))
        },
    );
    let mut hyper_body = HyperBody {
        body: &mut body,
        chunked: body_len == BodyLen::Chunked,
    };
    let outcome = forward(
        inner,
        &conn.upstream,
        &service,
        &mut head,
        Attempt {
            body: (!bodiless).then_some(&mut hyper_body),
            request_was_head: parts.method == Method::HEAD,
            retryable: retryable(&service, method, bodiless, upgrade),
            repeatable: bodiless && idempotent(method),
        },
    )
    .await;

    let (resp, picked) = match outcome {
        Ok(r) => r,
        Err(err) => {
            return respond_err(
                &counters,
                err,
                &parts.method,
                &host,
                parts.uri.path(),
                start,
            );
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
        parts.uri.path(),
        status,
        start,
        &backend.id,
    );
    let mut out = Response::new(body);
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
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

pub(crate) fn report(service: &ServiceState, picked: &Picked, o: Outcome, inner: &Inner) {
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

pub(crate) fn access_log(
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

/// Cut client-supplied text before echoing it in an error body.
pub(crate) fn clip(s: &str) -> String {
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
