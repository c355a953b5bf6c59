//! Connections to instances: the router's own HTTP/1.1 client, with
//! keep-alive connections pooled per serving runtime.
//!
//! Each `serve` call (one per router thread) owns one [`Upstream`], so a
//! pooled connection is only ever used by the thread that opened it. A
//! request takes an idle connection to its instance (the most recently
//! used one, whose buffers are warm) or opens one, writes its head (built
//! by the caller, already rewritten) and body, and reads the response head
//! with [`codec::parse_response`]. The body is then read by whoever
//! forwards it ([`UpBody`]); the connection goes back to the pool when the
//! body has ended and the instance allows reuse. A body that ends early
//! (the client went away) drops the connection instead: its state is
//! unknown.
//!
//! Everything runs in the request's own task: there is no connection task,
//! channel or per-request allocation beyond the head buffer, which is what
//! made this faster than hyper's client (whose connection task and
//! channels cost a wake-up per request and per body frame).
//!
//! A pooled connection the instance has closed is noticed before use when
//! its FIN has already arrived (a readiness check, no system call when
//! nothing arrived), and otherwise when the first read after sending finds
//! the connection closed without a byte of response: then a request that is
//! safe to repeat is sent again on a new connection.

use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::http::codec::{self, ChunkedDecoder, CodecError, Framing, ResponseHead, Step};

/// Idle connections kept per instance; more are closed when returned.
const MAX_IDLE_PER_INSTANCE: usize = 1024;
/// A connection's read buffer; it grows up to [`codec::MAX_HEAD`] only for
/// a head that does not fit.
const READ_BUF: usize = 16 * 1024;

/// Why a request did not get a response from an instance.
#[derive(Debug)]
pub(crate) enum UpstreamError {
    /// No connection could be opened (refused, unreachable, timed out):
    /// the request never reached the instance.
    Connect(io::Error),
    /// The connection broke while sending or before the head was read.
    Io(io::Error),
    /// The instance answered something that is not HTTP/1.x.
    Invalid(CodecError),
    /// The client's request body failed while being forwarded.
    ClientBody(String),
    /// The client went away after its body was forwarded, before the
    /// instance answered: the request is dropped (and the instance's
    /// connection closed).
    ClientGone,
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Connect(e) => write!(f, "connect: {e}"),
            UpstreamError::Io(e) => write!(f, "{e}"),
            UpstreamError::Invalid(e) => write!(f, "{e}"),
            UpstreamError::ClientBody(e) => write!(f, "request body: {e}"),
            UpstreamError::ClientGone => write!(f, "the client went away"),
        }
    }
}

/// A pool of connections to instances, for one serving runtime.
pub(crate) struct Upstream {
    pool: Arc<Pool>,
    reaper: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.reaper.abort();
    }
}

pub(crate) struct Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// A read buffer: bytes received and not consumed yet are
/// `buf[start..end]`. Zero-filled once, reused for every message on its
/// connection.
pub(crate) struct Buffer {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Buffer {
    pub(crate) fn new() -> Self {
        Self {
            buf: vec![0; READ_BUF],
            start: 0,
            end: 0,
        }
    }

    /// Bytes received and not consumed yet.
    pub(crate) fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub(crate) fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Take the unconsumed bytes (for a tunnel after `101`).
    pub(crate) fn take_data(&mut self) -> Vec<u8> {
        let v = self.data().to_vec();
        self.consume(v.len());
        v
    }

    /// Read more bytes from `io`; `Ok(0)` is end of stream. The buffer
    /// grows (up to [`codec::MAX_HEAD`]) only while a head does not fit:
    /// bodies are consumed as they arrive.
    pub(crate) fn poll_fill<R: AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.buf.len() < codec::MAX_HEAD + 1 {
                let len = (self.buf.len() * 2).min(codec::MAX_HEAD + 1);
                self.buf.resize(len, 0);
            } else {
                return Poll::Ready(Err(io::Error::other("read buffer full")));
            }
        }
        let mut rb = ReadBuf::new(&mut self.buf[self.end..]);
        match Pin::new(io).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                self.end += n;
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    pub(crate) async fn fill<R: AsyncRead + Unpin>(&mut self, io: &mut R) -> io::Result<usize> {
        poll_fn(|cx| self.poll_fill(io, cx)).await
    }
}

/// One TCP connection to an instance and its read buffer.
pub(crate) struct Conn {
    pub(crate) stream: TcpStream,
    pub(crate) buf: Buffer,
    addr: SocketAddr,
}

impl Conn {
    fn new(stream: TcpStream, addr: SocketAddr) -> Self {
        Self {
            stream,
            buf: Buffer::new(),
            addr,
        }
    }

    /// Bytes received and not consumed yet.
    pub(crate) fn data(&self) -> &[u8] {
        self.buf.data()
    }

    pub(crate) fn consume(&mut self, n: usize) {
        self.buf.consume(n);
    }

    /// Take the unconsumed bytes (for a tunnel after `101`).
    pub(crate) fn take_data(&mut self) -> Vec<u8> {
        self.buf.take_data()
    }

    /// Read more bytes; `Ok(0)` is end of stream.
    pub(crate) fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.buf.poll_fill(&mut self.stream, cx)
    }

    pub(crate) async fn fill(&mut self) -> io::Result<usize> {
        self.buf.fill(&mut self.stream).await
    }

    /// Whether the instance closed the connection (or sent something
    /// unasked) while it was idle. Costs a system call only when the
    /// socket has become readable since the last read.
    fn is_stale(&mut self) -> bool {
        if !self.buf.is_empty() {
            return true;
        }
        let mut cx = Context::from_waker(Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => false,
            Poll::Ready(Err(_)) => true,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                !matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }
}

/// A request body the router forwards after the head. The future is
/// `Send` so that the hyper path (whose tasks may move) can use it.
pub(crate) trait RequestBody {
    /// Write the whole body to the instance.
    fn forward(
        &mut self,
        to: &mut TcpStream,
        scratch: &mut Vec<u8>,
    ) -> impl std::future::Future<Output = Result<(), UpstreamError>> + Send;

    /// Completes when the client has gone away; polled, once the whole
    /// body is forwarded, while the instance's answer is awaited, so a
    /// client that leaves cancels the request. Never, where the server
    /// side cancels by dropping the request itself (hyper).
    fn client_gone(&mut self) -> impl std::future::Future<Output = ()> + Send {
        std::future::pending()
    }
}

/// A body from hyper, forwarded as it is framed on this hop: with
/// `Content-Length` (`chunked: false`, the head says the length) or
/// re-encoded as chunks.
pub(crate) struct HyperBody<'a> {
    pub(crate) body: &'a mut hyper::body::Incoming,
    pub(crate) chunked: bool,
}

impl RequestBody for HyperBody<'_> {
    async fn forward(
        &mut self,
        to: &mut TcpStream,
        scratch: &mut Vec<u8>,
    ) -> Result<(), UpstreamError> {
        use http_body_util::BodyExt;
        while let Some(frame) = self.body.frame().await {
            let frame = frame.map_err(|e| UpstreamError::ClientBody(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers are not forwarded
            };
            if data.is_empty() {
                continue;
            }
            if self.chunked {
                scratch.clear();
                codec::chunk_header(scratch, data.len());
                scratch.extend_from_slice(&data);
                scratch.extend_from_slice(b"\r\n");
                to.write_all(scratch).await
            } else {
                to.write_all(&data).await
            }
            .map_err(UpstreamError::Io)?;
        }
        if self.chunked {
            to.write_all(codec::LAST_CHUNK)
                .await
                .map_err(UpstreamError::Io)?;
        }
        Ok(())
    }
}

/// A response head from an instance, with the connection its body (if any)
/// arrives on.
pub(crate) struct Response {
    pub(crate) head: ResponseHead,
    pub(crate) conn: Conn,
}

impl Response {
    /// The head's bytes (names and values are ranges into them).
    pub(crate) fn head_bytes(&self) -> &[u8] {
        &self.conn.data()[..self.head.len]
    }
}

impl Upstream {
    /// A pool whose idle connections close after `idle_timeout`. Must be
    /// called inside the runtime that will use it (it starts the task that
    /// closes idle connections).
    pub(crate) fn new(connect_timeout: Duration, idle_timeout: Duration) -> Self {
        let pool = Arc::new(Pool {
            idle: Mutex::new(HashMap::new()),
            connect_timeout,
            idle_timeout,
        });
        let weak: Weak<Pool> = Arc::downgrade(&pool);
        let every = (idle_timeout / 2).max(Duration::from_millis(100));
        let reaper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { return };
                pool.sweep();
            }
        });
        Self { pool, reaper }
    }

    pub(crate) fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Send a request (`head`: origin-form, rewritten, ending in the blank
    /// line) to the instance at `addr` and read the response head.
    /// `repeatable`: the request may be sent again if a reused connection
    /// turns out closed before any response byte (idempotent methods).
    /// Interim `1xx` responses other than `101` are skipped.
    pub(crate) async fn send<B: RequestBody>(
        &self,
        addr: SocketAddr,
        head: &[u8],
        mut body: Option<&mut B>,
        request_was_head: bool,
        repeatable: bool,
    ) -> Result<Response, UpstreamError> {
        let mut chunk_buf = Vec::new();
        loop {
            let (mut conn, reused) = match self.pool.checkout(addr) {
                Some(c) => (c, true),
                None => (self.connect(addr).await?, false),
            };
            let mut body_started = false;
            let sent = async {
                conn.stream
                    .write_all(head)
                    .await
                    .map_err(UpstreamError::Io)?;
                if let Some(body) = body.as_mut() {
                    body_started = true;
                    body.forward(&mut conn.stream, &mut chunk_buf).await?;
                }
                Ok::<_, UpstreamError>(())
            }
            .await;
            let retry = reused && !body_started && repeatable;
            if let Err(e) = sent {
                if retry && matches!(e, UpstreamError::Io(_)) {
                    continue;
                }
                return Err(e);
            }
            let head = match body.as_mut() {
                Some(body) => tokio::select! {
                    biased;
                    h = read_head(&mut conn, request_was_head) => h,
                    // Dropping `conn` closes the instance's connection.
                    () = body.client_gone() => return Err(UpstreamError::ClientGone),
                },
                None => read_head(&mut conn, request_was_head).await,
            };
            match head {
                Ok(head) => return Ok(Response { head, conn }),
                Err(ReadHeadError::ClosedEmpty(_)) if retry => continue,
                Err(ReadHeadError::ClosedEmpty(e) | ReadHeadError::Io(e)) => {
                    return Err(UpstreamError::Io(e));
                }
                Err(ReadHeadError::Invalid(e)) => return Err(UpstreamError::Invalid(e)),
            }
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Conn, UpstreamError> {
        let stream =
            match tokio::time::timeout(self.pool.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(UpstreamError::Connect(e)),
                Err(_) => {
                    return Err(UpstreamError::Connect(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no connection within {:?}", self.pool.connect_timeout),
                    )));
                }
            };
        // Requests and responses are small and written whole: never wait
        // for an ACK before sending.
        let _ = stream.set_nodelay(true);
        Ok(Conn::new(stream, addr))
    }
}

enum ReadHeadError {
    /// Closed or reset before a single byte of response arrived.
    ClosedEmpty(io::Error),
    Io(io::Error),
    Invalid(CodecError),
}

async fn read_head(conn: &mut Conn, request_was_head: bool) -> Result<ResponseHead, ReadHeadError> {
    let mut got_any = !conn.buf.is_empty();
    loop {
        if !conn.buf.is_empty() {
            match codec::parse_response(conn.data(), request_was_head) {
                Ok(Some(h)) if (100..200).contains(&h.status) && h.status != 101 => {
                    conn.consume(h.len);
                    continue;
                }
                Ok(Some(h)) => return Ok(h),
                Ok(None) => {}
                Err(e) => return Err(ReadHeadError::Invalid(e)),
            }
        }
        match conn.fill().await {
            Ok(0) => {
                let e = io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the instance closed the connection before a complete response head",
                );
                return Err(if got_any {
                    ReadHeadError::Io(e)
                } else {
                    ReadHeadError::ClosedEmpty(e)
                });
            }
            Ok(_) => got_any = true,
            Err(e) if !got_any && e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(ReadHeadError::ClosedEmpty(e));
            }
            Err(e) => return Err(ReadHeadError::Io(e)),
        }
    }
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Vec<Idle>>> {
        // Only plain pushes and pops happen under the lock.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn checkout(&self, addr: SocketAddr) -> Option<Conn> {
        let mut idle = self.lock();
        let list = idle.get_mut(&addr)?;
        while let Some(mut c) = list.pop() {
            if !c.conn.is_stale() {
                return Some(c.conn);
            }
        }
        None
    }

    /// Return a connection whose last response has been read completely.
    pub(crate) fn put(&self, conn: Conn) {
        let mut idle = self.lock();
        let list = idle.entry(conn.addr).or_default();
        if list.len() < MAX_IDLE_PER_INSTANCE {
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// Close connections idle for longer than the timeout or closed by the
    /// instance; forget instances without any.
    fn sweep(&self) {
        let mut idle = self.lock();
        let timeout = self.idle_timeout;
        idle.retain(|_, list| {
            list.retain_mut(|c| !c.conn.is_stale() && c.since.elapsed() < timeout);
            !list.is_empty()
        });
    }
}

/// A response body read from an instance's connection, for hyper to send
/// on. The connection goes back to the pool when the body has ended (and
/// the instance allows reuse); dropped early, it is closed.
pub(crate) struct UpBody {
    conn: Option<Conn>,
    pool: Arc<Pool>,
    state: BodyState,
    keep_alive: bool,
}

enum BodyState {
    Length(u64),
    Chunked(ChunkedDecoder),
    Close,
    Done,
}

impl UpBody {
    /// The body after `resp`'s head.
    pub(crate) fn new(resp: Response, pool: Arc<Pool>) -> Self {
        let Response { head, mut conn } = resp;
        conn.consume(head.len);
        let state = match head.framing {
            Framing::Empty => BodyState::Done,
            Framing::Length(n) => BodyState::Length(n),
            Framing::Chunked => BodyState::Chunked(ChunkedDecoder::default()),
            Framing::Close => BodyState::Close,
        };
        let mut b = Self {
            conn: Some(conn),
            pool,
            state,
            keep_alive: head.keep_alive,
        };
        if matches!(b.state, BodyState::Done) {
            b.finish();
        }
        b
    }

    fn finish(&mut self) {
        self.state = BodyState::Done;
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && conn.buf.is_empty()
        {
            self.pool.put(conn);
        }
    }

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut self.state {
                BodyState::Done => {
                    self.finish();
                    return Poll::Ready(None);
                }
                BodyState::Length(left) => {
                    if *left == 0 {
                        self.finish();
                        return Poll::Ready(None);
                    }
                    let have = conn.data();
                    if !have.is_empty() {
                        let n = usize::try_from(*left).unwrap_or(usize::MAX).min(have.len());
                        let out = Bytes::copy_from_slice(&have[..n]);
                        conn.consume(n);
                        *left -= n as u64;
                        if *left == 0 {
                            self.finish();
                        }
                        return Poll::Ready(Some(Ok(out)));
                    }
                    match std::task::ready!(conn.poll_fill(cx)) {
                        Ok(0) => return Poll::Ready(Some(Err(truncated()))),
                        Ok(_) => {}
                        Err(e) => return Poll::Ready(Some(Err(e))),
                    }
                }
                BodyState::Chunked(dec) => match dec.step(conn.data()) {
                    Ok(Step::Data(n)) => {
                        let out = Bytes::copy_from_slice(&conn.data()[..n]);
                        conn.consume(n);
                        return Poll::Ready(Some(Ok(out)));
                    }
                    Ok(Step::Skip(n)) => conn.consume(n),
                    Ok(Step::Done(n)) => {
                        conn.consume(n);
                        self.finish();
                        return Poll::Ready(None);
                    }
                    Ok(Step::NeedMore) => match std::task::ready!(conn.poll_fill(cx)) {
                        Ok(0) => return Poll::Ready(Some(Err(truncated()))),
                        Ok(_) => {}
                        Err(e) => return Poll::Ready(Some(Err(e))),
                    },
                    Err(e) => {
                        self.conn = None;
                        return Poll::Ready(Some(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            e,
                        ))));
                    }
                },
                BodyState::Close => {
                    if !conn.buf.is_empty() {
                        let out = Bytes::copy_from_slice(conn.data());
                        conn.consume(out.len());
                        return Poll::Ready(Some(Ok(out)));
                    }
                    match std::task::ready!(conn.poll_fill(cx)) {
                        Ok(0) => {
                            self.conn = None;
                            self.state = BodyState::Done;
                            return Poll::Ready(None);
                        }
                        Ok(_) => {}
                        Err(e) => return Poll::Ready(Some(Err(e))),
                    }
                }
            }
        }
    }
}

fn truncated() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the instance closed the connection before the end of the body",
    )
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        match this.poll_data(cx) {
            Poll::Ready(Some(Ok(b))) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(Some(Err(e))) => {
                // The connection's state is unknown now: never pool it.
                this.conn = None;
                this.state = BodyState::Done;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, BodyState::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            BodyState::Length(n) => SizeHint::with_exact(n),
            BodyState::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}
