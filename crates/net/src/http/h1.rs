//! The router's own HTTP/1.1 server side, for plain TCP connections (the
//! common case: browsers behind TLS terminated elsewhere, load generators,
//! other services) and TLS connections whose ALPN did not choose h2.
//!
//! A connection task reads a request head into one reused buffer, parses
//! it with `httparse`, routes it, writes the rewritten head for the
//! instance straight into another reused buffer, forwards the body (by
//! `Content-Length` or chunks, answering `Expect: 100-continue` first),
//! and copies the response back: head and a body already in the buffer go
//! out in one write. Nothing is allocated per request on this path
//! besides what routing itself needs, and there is no `HeaderMap`, no
//! service future and no channel.
//!
//! Hyper still serves what it is good at: a connection whose first bytes
//! are the HTTP/2 preface (h2c prior knowledge) is handed to hyper with
//! those bytes replayed, and TLS connections whose ALPN chose h2 never
//! come here.
//!
//! Timers: the header-read timeout (against clients that send a head
//! slowly or never) is one `Sleep` per connection, re-armed only when it
//! fires before the current deadline, so a busy connection touches the
//! timer wheel about once per timeout period instead of once per request.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Sleep;

use crate::http::Inner;
use crate::http::codec::{self, ChunkedDecoder, Framing, Step};
use crate::http::error::ProxyError;
use crate::http::proxy::{
    self, Attempt, BodyLen, ConnInfo, HeadParts, Routed, UpstreamHead, access_log, clip,
};
use crate::http::table::normalize_host;
use crate::http::upstream::{self, Buffer, RequestBody, Upstream, UpstreamError};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Bytes gathered before a write to the client.
const WRITE_CHUNK: usize = 64 * 1024;
/// How much of a pipelined next request is read while a request is
/// forwarded (reading is how a closed client is noticed).
const PIPELINE_READ_AHEAD: usize = 8 * 1024;

/// What the connection task needs from the router.
pub(crate) struct Serve {
    pub(crate) inner: Arc<Inner>,
    pub(crate) upstream: Arc<Upstream>,
    pub(crate) builder: Arc<auto::Builder<TokioExecutor>>,
    pub(crate) watcher: hyper_util::server::graceful::Watcher,
    /// Turns true when the router shuts down: finish the request at hand,
    /// then close.
    pub(crate) stop: watch::Receiver<bool>,
}

/// Serve one plain TCP connection until it closes.
/// `tls`: the connection was TLS (its ALPN chose HTTP/1.1 or nothing).
pub(crate) async fn serve<S>(s: Serve, stream: S, peer: SocketAddr, tls: bool)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Serve {
        inner,
        upstream,
        builder,
        watcher,
        mut stop,
    } = s;
    if *stop.borrow_and_update() {
        return;
    }
    let conn = ConnInfo::new(peer, tls, upstream.clone());
    let mut c = Client {
        stream,
        rb: Buffer::new(),
        wb: Vec::with_capacity(4096),
    };
    let mut st = Scratch {
        head: UpstreamHead::new(),
        host: String::new(),
        path: String::new(),
    };
    let mut timer = Deadline::new();
    let stop_changed = stop.changed();
    tokio::pin!(stop_changed);
    let mut stopped = false;
    let mut first = true;
    loop {
        // ---- read and parse a head ----
        let deadline = tokio::time::Instant::now() + inner.config.header_read_timeout;
        let prepared = loop {
            if !c.rb.is_empty() {
                let data = c.rb.data();
                if first && H2_PREFACE.starts_with(&data[..data.len().min(H2_PREFACE.len())]) {
                    if data.len() >= H2_PREFACE.len() {
                        let rewind = Rewind {
                            pre: c.rb.take_data(),
                            pos: 0,
                            io: c.stream,
                        };
                        crate::http::serve_connection(
                            inner, upstream, &builder, watcher, rewind, peer, tls,
                        )
                        .await;
                        return;
                    }
                } else {
                    first = false;
                    match prepare(&inner, &conn, data, &mut st) {
                        Ok(Some(p)) => break p,
                        Ok(None) => {}
                        Err(e) => {
                            let start = Instant::now();
                            access_log_err(&e, &st, start);
                            c.wb.clear();
                            e.write_h1(&mut c.wb, true);
                            c.close_after_error().await;
                            return;
                        }
                    }
                }
            } else if stopped {
                return;
            }
            tokio::select! {
                biased;
                r = c.rb.fill(&mut c.stream) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
                () = timer.until(deadline) => {
                    tracing::debug!(%peer, "no complete request head in time; closing");
                    return;
                }
                _ = &mut stop_changed, if !stopped => {
                    stopped = true;
                }
            }
        };
        c.rb.consume(prepared.head_len);
        match one(&inner, &conn, &mut c, &mut st, prepared, stopped).await {
            Flow::KeepAlive => {}
            Flow::Close => {
                let _ = c.stream.shutdown().await;
                return;
            }
            Flow::Abort => return,
            Flow::Tunnel(up) => {
                // Detached, as hyper's upgrades are: a shutdown does not
                // wait for long-lived tunnels (WebSockets).
                tokio::spawn(tunnel(c, up));
                return;
            }
        }
    }
}

fn access_log_err(e: &ProxyError, st: &Scratch, start: Instant) {
    access_log(&Method::GET, &st.host, &st.path, e.status(), start, "-");
}

struct Client<S> {
    stream: S,
    rb: Buffer,
    wb: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.wb.is_empty() {
            self.stream.write_all(&self.wb).await?;
            self.wb.clear();
        }
        Ok(())
    }

    /// Send an error response that ends the connection, then read (and
    /// drop) what the client still sends for a moment, so that closing
    /// with unread bytes does not reset the connection before the client
    /// has read the answer (nginx's lingering close).
    async fn close_after_error(&mut self) {
        if self.flush().await.is_err() {
            return;
        }
        let _ = self.stream.shutdown().await;
        let linger = async {
            let mut sink = [0u8; 16 * 1024];
            let mut total = 0usize;
            loop {
                match tokio::io::AsyncReadExt::read(&mut self.stream, &mut sink).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        total += n;
                        if total > 1024 * 1024 {
                            return;
                        }
                    }
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), linger).await;
    }
}

/// Per-connection buffers reused by every request.
struct Scratch {
    head: UpstreamHead,
    /// The request's host, normalized (for routing and the access log).
    host: String,
    path: String,
}

enum Flow {
    /// Ready for the next request.
    KeepAlive,
    /// Done: close after what was written.
    Close,
    /// Broken: close at once.
    Abort,
    /// The instance switched protocols (its `101` is in the write
    /// buffer): splice the two connections.
    Tunnel(upstream::Conn),
}

/// How the client's request body is framed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ReqBody {
    None,
    Length(u64),
    Chunked,
}

/// A parsed request head: what forwarding it needs, owned, so the read
/// buffer is free for the body.
struct Prepared {
    head_len: usize,
    method: Method,
    minor: u8,
    keep_alive: bool,
    body: ReqBody,
    expect_continue: bool,
    upgrade: bool,
    routed: Option<Routed>,
}

/// Parse a request head from `data`; `Ok(None)`: incomplete. On success
/// the instance's head is in `st.head` (if routed), the host and path in
/// `st`.
fn prepare(
    inner: &Inner,
    conn: &ConnInfo,
    data: &[u8],
    st: &mut Scratch,
) -> Result<Option<Prepared>, ProxyError> {
    st.host.clear();
    st.path.clear();
    let mut slots = [httparse::EMPTY_HEADER; codec::MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let head_len = match req.parse(data) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if data.len() >= codec::MAX_HEAD {
                Err(ProxyError::HeadTooLarge(codec::MAX_HEAD))
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ProxyError::HeadTooLarge(codec::MAX_HEAD));
        }
        Err(_) => return Err(ProxyError::BadRequest("malformed request head")),
    };
    if head_len > codec::MAX_HEAD {
        return Err(ProxyError::HeadTooLarge(codec::MAX_HEAD));
    }
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(ProxyError::BadRequest("malformed request line"));
    };
    let method_bytes = method.as_bytes();
    let method =
        Method::from_bytes(method_bytes).map_err(|_| ProxyError::BadRequest("invalid method"))?;

    let mut host_header: Option<&[u8]> = None;
    let mut content_length: Option<u64> = None;
    let mut te: Option<&[u8]> = None;
    let mut close = false;
    let mut keep_alive_token = false;
    let mut upgrade_token = false;
    let mut upgrade_value: Option<&[u8]> = None;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let n = h.name.as_bytes();
        if n.eq_ignore_ascii_case(b"host") {
            if host_header.is_some() {
                return Err(ProxyError::BadRequest("more than one Host header"));
            }
            host_header = Some(h.value);
        } else if n.eq_ignore_ascii_case(b"content-length") {
            let v = codec::parse_content_length(h.value)
                .ok_or(ProxyError::BadRequest("invalid Content-Length"))?;
            if content_length.is_some_and(|c| c != v) {
                return Err(ProxyError::BadRequest("conflicting Content-Length headers"));
            }
            content_length = Some(v);
        } else if n.eq_ignore_ascii_case(b"transfer-encoding") {
            te = Some(h.value);
        } else if n.eq_ignore_ascii_case(b"connection") {
            close |= codec::has_token(h.value, b"close");
            keep_alive_token |= codec::has_token(h.value, b"keep-alive");
            upgrade_token |= codec::has_token(h.value, b"upgrade");
        } else if n.eq_ignore_ascii_case(b"upgrade") {
            upgrade_value = Some(h.value);
        } else if n.eq_ignore_ascii_case(b"expect") {
            expect_continue = h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        }
    }
    let body = match (te, content_length) {
        (Some(_), Some(_)) => {
            // RFC 9112 §6.1: a request smuggling vector; refuse it.
            return Err(ProxyError::BadRequest(
                "both Transfer-Encoding and Content-Length",
            ));
        }
        (Some(te), None) => {
            if !codec::has_token(te, b"chunked") || !last_is_chunked(te) {
                return Err(ProxyError::BadRequest(
                    "Transfer-Encoding must end with chunked",
                ));
            }
            ReqBody::Chunked
        }
        (None, Some(0)) | (None, None) => ReqBody::None,
        (None, Some(n)) => ReqBody::Length(n),
    };

    // Origin form, or absolute form whose authority wins over Host
    // (RFC 9112 §3.2.2).
    let (raw_host, target) = if target.starts_with('/') || target == "*" {
        (host_header, target)
    } else if let Some(rest) = strip_scheme(target) {
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let path = &rest[end..];
        (
            Some(&rest.as_bytes()[..end]),
            if path.is_empty() { "/" } else { path },
        )
    } else {
        return Err(ProxyError::BadRequest(
            "the request target must be a path or an absolute http(s) URL",
        ));
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let path = if path.is_empty() { "/" } else { path };
    let host_text = raw_host
        .and_then(|h| std::str::from_utf8(h).ok())
        .unwrap_or("");
    st.host.push_str(&normalize_host(host_text));
    st.path.push_str(path);
    let routed = proxy::route(inner, &st.host, path, query);
    let upgrade = minor == 1 && upgrade_token && upgrade_value.is_some();
    let keep_alive = !close && (minor == 1 || keep_alive_token);
    if let Some(r) = &routed {
        let target = r.stripped.as_deref().unwrap_or(target);
        proxy::write_upstream_head(
            &mut st.head,
            conn,
            &HeadParts {
                method: method_bytes,
                target: target.as_bytes(),
                raw_host,
                upgrade: if upgrade { upgrade_value } else { None },
                body: match body {
                    ReqBody::None => BodyLen::Empty {
                        had_length: content_length.is_some(),
                    },
                    ReqBody::Length(n) => BodyLen::Length(n),
                    ReqBody::Chunked => BodyLen::Chunked,
                },
            },
            || req.headers.iter().map(|h| (h.name.as_bytes(), h.value)),
        );
    }
    Ok(Some(Prepared {
        head_len,
        method,
        minor,
        keep_alive,
        body,
        expect_continue: expect_continue && minor == 1 && body != ReqBody::None,
        upgrade,
        routed,
    }))
}

fn last_is_chunked(te: &[u8]) -> bool {
    te.rsplit(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .find(|t| !t.is_empty())
        .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"))
}

fn strip_scheme(target: &str) -> Option<&str> {
    let lower = target
        .get(..8)
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    if lower.starts_with("http://") {
        Some(&target[7..])
    } else if lower.starts_with("https://") {
        Some(&target[8..])
    } else {
        None
    }
}

/// The client's body, read from the connection as it is forwarded.
struct ClientBody<'a, S> {
    stream: &'a mut S,
    rb: &'a mut Buffer,
    framing: ReqBody,
    expect_continue: bool,
    /// The whole body was read: the connection is in step for the next
    /// request.
    done: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> RequestBody for ClientBody<'_, S> {
    async fn forward(
        &mut self,
        to: &mut TcpStream,
        scratch: &mut Vec<u8>,
    ) -> Result<(), UpstreamError> {
        let client_err = |what: &str| UpstreamError::ClientBody(what.to_string());
        if self.expect_continue && self.rb.is_empty() {
            self.stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .map_err(|e| client_err(&e.to_string()))?;
        }
        match self.framing {
            ReqBody::None => {}
            ReqBody::Length(mut left) => {
                while left > 0 {
                    if self.rb.is_empty() {
                        match self.rb.fill(self.stream).await {
                            Ok(0) => return Err(client_err("the client closed mid-body")),
                            Ok(_) => {}
                            Err(e) => return Err(client_err(&e.to_string())),
                        }
                    }
                    let d = self.rb.data();
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(d.len());
                    to.write_all(&d[..n]).await.map_err(UpstreamError::Io)?;
                    self.rb.consume(n);
                    left -= n as u64;
                }
            }
            ReqBody::Chunked => {
                let mut dec = ChunkedDecoder::default();
                loop {
                    match dec.step(self.rb.data()) {
                        Ok(Step::Data(n)) => {
                            scratch.clear();
                            codec::chunk_header(scratch, n);
                            scratch.extend_from_slice(&self.rb.data()[..n]);
                            scratch.extend_from_slice(b"\r\n");
                            self.rb.consume(n);
                            to.write_all(scratch).await.map_err(UpstreamError::Io)?;
                        }
                        Ok(Step::Skip(n)) => self.rb.consume(n),
                        Ok(Step::Done(n)) => {
                            self.rb.consume(n);
                            to.write_all(codec::LAST_CHUNK)
                                .await
                                .map_err(UpstreamError::Io)?;
                            break;
                        }
                        Ok(Step::NeedMore) => match self.rb.fill(self.stream).await {
                            Ok(0) => return Err(client_err("the client closed mid-body")),
                            Ok(_) => {}
                            Err(e) => return Err(client_err(&e.to_string())),
                        },
                        Err(e) => return Err(client_err(&e.to_string())),
                    }
                }
            }
        }
        self.done = true;
        Ok(())
    }

    /// As the body-less path does: read ahead (bytes of a pipelined next
    /// request are kept) until the connection ends. No system call while
    /// nothing arrives.
    async fn client_gone(&mut self) {
        loop {
            if self.rb.data().len() >= PIPELINE_READ_AHEAD {
                return std::future::pending().await;
            }
            match self.rb.fill(self.stream).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}

/// Forward one parsed request and copy the answer back.
async fn one<S: AsyncRead + AsyncWrite + Unpin + Send>(
    inner: &Inner,
    conn: &ConnInfo,
    c: &mut Client<S>,
    st: &mut Scratch,
    p: Prepared,
    stopped: bool,
) -> Flow {
    let start = Instant::now();
    let has_body = p.body != ReqBody::None;
    let Some(routed) = p.routed else {
        let err = ProxyError::NoRoute {
            host: clip(&st.host),
            path: clip(&st.path),
        };
        access_log(&p.method, &st.host, &st.path, err.status(), start, "-");
        // An unread body would be taken for the next request.
        return error_response(c, &err, !p.keep_alive || has_body).await;
    };
    let Routed {
        service, counters, ..
    } = routed;
    let Some(slot) = service.enter() else {
        let err = ProxyError::AtConcurrencyLimit {
            service: service.id.clone(),
            limit: service.max_concurrent.unwrap_or(0),
        };
        counters.record(err.status().as_u16(), start.elapsed());
        access_log(&p.method, &st.host, &st.path, err.status(), start, "-");
        return error_response(c, &err, !p.keep_alive || has_body).await;
    };
    let method = p.method.as_str().as_bytes();
    let attempt = |body| Attempt {
        body,
        request_was_head: p.method == Method::HEAD,
        retryable: proxy::retryable(&service, method, !has_body, p.upgrade),
        repeatable: !has_body && proxy::idempotent(method),
    };
    let (outcome, body_done) = if has_body {
        let mut body = ClientBody {
            stream: &mut c.stream,
            rb: &mut c.rb,
            framing: p.body,
            expect_continue: p.expect_continue,
            done: false,
        };
        let outcome = proxy::forward(
            inner,
            &conn.upstream,
            &service,
            &mut st.head,
            attempt(Some(&mut body)),
        )
        .await;
        (outcome, body.done)
    } else {
        // Watch the client while the instance works: a client that goes
        // away cancels the request (the instance's connection is closed,
        // the bulkhead slot freed), as hyper does. Bytes of a pipelined
        // next request are kept. No system call while nothing arrives.
        let forwarding = proxy::forward(
            inner,
            &conn.upstream,
            &service,
            &mut st.head,
            attempt(None::<&mut ClientBody<'_, S>>),
        );
        tokio::pin!(forwarding);
        let outcome = loop {
            tokio::select! {
                biased;
                o = &mut forwarding => break o,
                r = c.rb.fill(&mut c.stream), if c.rb.data().len() < PIPELINE_READ_AHEAD => {
                    if matches!(r, Ok(0) | Err(_)) {
                        tracing::debug!(service = %service.id, "client went away; request cancelled");
                        return Flow::Abort;
                    }
                }
            }
        };
        (outcome, true)
    };
    let (mut resp, picked) = match outcome {
        Ok(r) => r,
        Err(ProxyError::ClientGone(service)) => {
            tracing::debug!(%service, "client went away; request cancelled");
            return Flow::Abort;
        }
        Err(err) => {
            counters.record(err.status().as_u16(), start.elapsed());
            access_log(&p.method, &st.host, &st.path, err.status(), start, "-");
            return error_response(c, &err, !p.keep_alive || !body_done).await;
        }
    };
    let status = resp.head.status;
    let status_code = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    counters.record(status, start.elapsed());
    access_log(
        &p.method,
        &st.host,
        &st.path,
        status_code,
        start,
        &picked.backend.id,
    );

    if status == 101 {
        if !p.upgrade {
            let err = ProxyError::Upstream {
                service: service.id.clone(),
                reason: "the instance switched protocols unasked",
            };
            return error_response(c, &err, true).await;
        }
        c.wb.clear();
        write_response_head(&mut c.wb, &resp, p.minor, true, true);
        resp.conn.consume(resp.head.len);
        drop(picked);
        drop(slot);
        return Flow::Tunnel(resp.conn);
    }

    let keep_alive = p.keep_alive && body_done && !stopped;
    c.wb.clear();
    let (chunk_out, close) = write_response_head(&mut c.wb, &resp, p.minor, keep_alive, false);
    let framing = resp.head.framing;
    let reusable = resp.head.keep_alive;
    resp.conn.consume(resp.head.len);
    let mut up = resp.conn;
    let copied = copy_body(&mut up, framing, chunk_out, c).await;
    drop(picked);
    drop(slot);
    match copied {
        Ok(clean) => {
            if clean && reusable && up.buf.is_empty() {
                conn.upstream.pool().put(up);
            }
            if close { Flow::Close } else { Flow::KeepAlive }
        }
        Err(e) => {
            tracing::debug!(service = %service.id, error = %e, "response body not passed on completely");
            Flow::Abort
        }
    }
}

async fn error_response<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    err: &ProxyError,
    close: bool,
) -> Flow {
    c.wb.clear();
    err.write_h1(&mut c.wb, close);
    if close {
        c.close_after_error().await;
        return Flow::Abort;
    }
    match c.flush().await {
        Ok(()) => Flow::KeepAlive,
        Err(_) => Flow::Abort,
    }
}

/// Write the response head for the client; returns (body re-encoded as
/// chunks, connection closes after the body).
fn write_response_head(
    out: &mut Vec<u8>,
    resp: &upstream::Response,
    client_minor: u8,
    keep_alive: bool,
    upgrade: bool,
) -> (bool, bool) {
    let raw = resp.head_bytes();
    let fields = &resp.head.headers;
    let status = resp.head.status;
    out.extend_from_slice(b"HTTP/1.1 ");
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    out.extend_from_slice(code.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(code.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut named: Vec<&[u8]> = Vec::new();
    let mut has_te = false;
    for (n, v) in fields {
        let n = &raw[n.clone()];
        if n.eq_ignore_ascii_case(b"connection") {
            named.extend(raw[v.clone()].split(|&b| b == b',').map(<[u8]>::trim_ascii));
        } else if n.eq_ignore_ascii_case(b"transfer-encoding") {
            has_te = true;
        }
    }
    for (n, v) in fields {
        let (name, value) = (&raw[n.clone()], &raw[v.clone()]);
        let keep_upgrade = upgrade && name.eq_ignore_ascii_case(b"upgrade");
        if !keep_upgrade
            && (codec::is_hop_by_hop(name)
                || (has_te && name.eq_ignore_ascii_case(b"content-length"))
                || named.iter().any(|t| t.eq_ignore_ascii_case(name)))
        {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    let unknown_length = matches!(resp.head.framing, Framing::Chunked | Framing::Close);
    let chunk_out = unknown_length && client_minor >= 1;
    // An HTTP/1.0 client learns where such a body ends only by the close.
    let close = !keep_alive || (unknown_length && !chunk_out);
    if chunk_out {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
    } else if close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if client_minor == 0 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (chunk_out, close)
}

#[derive(Debug, thiserror::Error)]
enum CopyError {
    #[error("client: {0}")]
    Client(std::io::Error),
    #[error("instance: {0}")]
    Instance(std::io::Error),
    #[error("instance: {0}")]
    Invalid(codec::CodecError),
}

/// Copy the response body from the instance to the client (the head is
/// already in `c.wb`). Returns whether the instance's connection ended the
/// body cleanly (reusable).
async fn copy_body<S: AsyncRead + AsyncWrite + Unpin>(
    up: &mut upstream::Conn,
    framing: Framing,
    chunk_out: bool,
    c: &mut Client<S>,
) -> Result<bool, CopyError> {
    let truncated = || {
        CopyError::Instance(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before the end of the body",
        ))
    };
    match framing {
        Framing::Empty => {
            c.flush().await.map_err(CopyError::Client)?;
            Ok(true)
        }
        Framing::Length(mut left) => loop {
            let d = up.data();
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(d.len());
            if n > 0 {
                if c.wb.len() + n <= WRITE_CHUNK {
                    c.wb.extend_from_slice(&d[..n]);
                } else {
                    c.flush().await.map_err(CopyError::Client)?;
                    c.stream
                        .write_all(&up.data()[..n])
                        .await
                        .map_err(CopyError::Client)?;
                }
                up.consume(n);
                left -= n as u64;
            }
            c.flush().await.map_err(CopyError::Client)?;
            if left == 0 {
                return Ok(true);
            }
            match up.fill().await {
                Ok(0) => return Err(truncated()),
                Ok(_) => {}
                Err(e) => return Err(CopyError::Instance(e)),
            }
        },
        Framing::Chunked => {
            let mut dec = ChunkedDecoder::default();
            loop {
                match dec.step(up.data()).map_err(CopyError::Invalid)? {
                    Step::Data(n) => {
                        if chunk_out {
                            codec::chunk_header(&mut c.wb, n);
                        }
                        c.wb.extend_from_slice(&up.data()[..n]);
                        if chunk_out {
                            c.wb.extend_from_slice(b"\r\n");
                        }
                        up.consume(n);
                        if c.wb.len() >= WRITE_CHUNK {
                            c.flush().await.map_err(CopyError::Client)?;
                        }
                    }
                    Step::Skip(n) => up.consume(n),
                    Step::Done(n) => {
                        up.consume(n);
                        if chunk_out {
                            c.wb.extend_from_slice(codec::LAST_CHUNK);
                        }
                        c.flush().await.map_err(CopyError::Client)?;
                        return Ok(true);
                    }
                    Step::NeedMore => {
                        c.flush().await.map_err(CopyError::Client)?;
                        match up.fill().await {
                            Ok(0) => return Err(truncated()),
                            Ok(_) => {}
                            Err(e) => return Err(CopyError::Instance(e)),
                        }
                    }
                }
            }
        }
        Framing::Close => loop {
            let n = up.data().len();
            if n > 0 {
                if chunk_out {
                    codec::chunk_header(&mut c.wb, n);
                }
                c.wb.extend_from_slice(up.data());
                if chunk_out {
                    c.wb.extend_from_slice(b"\r\n");
                }
                up.consume(n);
            }
            c.flush().await.map_err(CopyError::Client)?;
            match up.fill().await {
                Ok(0) => {
                    if chunk_out {
                        c.wb.extend_from_slice(codec::LAST_CHUNK);
                        c.flush().await.map_err(CopyError::Client)?;
                    }
                    return Ok(false);
                }
                Ok(_) => {}
                Err(e) => return Err(CopyError::Instance(e)),
            }
        },
    }
}

/// After a `101`: pass on the head and whatever either side sent early,
/// then copy bytes both ways until either closes.
async fn tunnel<S: AsyncRead + AsyncWrite + Unpin>(mut c: Client<S>, mut up: upstream::Conn) {
    let early_up = up.take_data();
    c.wb.extend_from_slice(&early_up);
    let early_client = c.rb.take_data();
    let run = async {
        c.flush().await?;
        if !early_client.is_empty() {
            up.stream.write_all(&early_client).await?;
        }
        tokio::io::copy_bidirectional(&mut c.stream, &mut up.stream).await
    };
    if let Err(e) = run.await {
        tracing::debug!(error = %e, "upgraded connection ended with an error");
    }
}

/// One `Sleep` per connection for a deadline that moves forward with every
/// request: re-armed only when it fires early.
struct Deadline {
    sleep: Pin<Box<Sleep>>,
}

impl Deadline {
    fn new() -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep(Duration::from_secs(24 * 3600))),
        }
    }

    /// Completes once `deadline` has passed.
    async fn until(&mut self, deadline: tokio::time::Instant) {
        if self.sleep.deadline() > deadline {
            self.sleep.as_mut().reset(deadline);
        }
        loop {
            (&mut self.sleep).await;
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            self.sleep.as_mut().reset(deadline);
        }
    }
}

/// A stream whose first bytes were already read: they are read again
/// first (for handing an h2c connection to hyper).
struct Rewind<S> {
    pre: Vec<u8>,
    pos: usize,
    io: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.pos < self.pre.len() {
            let n = (self.pre.len() - self.pos).min(buf.remaining());
            let from = self.pos;
            buf.put_slice(&self.pre[from..from + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
