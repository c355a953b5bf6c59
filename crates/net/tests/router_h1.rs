//! The router's HTTP/1.1 handling byte by byte, over real sockets on
//! 127.0.0.1: a scripted instance that writes exact response bytes
//! (chunked, close-delimited, HEAD/204/304, connections it closes on
//! purpose) and raw clients that write exact request bytes (chunked
//! bodies, pipelining, `Expect: 100-continue`, broken heads).

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use berth_net::http::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

// ---------- a scripted instance ----------

/// How the scripted instance treats each connection.
#[derive(Clone, Copy)]
struct Script {
    /// After answering this many requests on a connection: close it.
    close_after: Option<usize>,
    /// Close right after the last answer (`true`), or only when the next
    /// request arrives, without answering it (`false`: the race of an
    /// instance closing a keep-alive connection as the router reuses it).
    close_at_once: bool,
}

struct Instance {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

async fn instance(script: Script) -> Instance {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let (c, r) = (conns.clone(), requests.clone());
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve_script(s, script, r.clone()));
        }
    });
    Instance {
        addr,
        conns,
        requests,
    }
}

async fn serve_script(mut s: TcpStream, script: Script, requests: Arc<AtomicUsize>) {
    let mut buf = Vec::new();
    let mut answered = 0;
    loop {
        let Some((head, body)) = read_request(&mut s, &mut buf).await else {
            return;
        };
        if script.close_after == Some(answered) {
            return; // closes without an answer
        }
        requests.fetch_add(1, Ordering::SeqCst);
        let first = head.lines().next().unwrap_or("").to_string();
        let path = first.split(' ').nth(1).unwrap_or("/").to_string();
        let resp: Vec<u8> = if first.starts_with("HEAD ") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n".to_vec()
        } else {
            match path.as_str() {
                "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n".to_vec(),
                "/close" => b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end".to_vec(),
                "/nocontent" => b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
                "/notmodified" => b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n".to_vec(),
                "/continue" => b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal".to_vec(),
                "/garbage" => b"SSH-2.0-not-http\r\n\r\n".to_vec(),
                "/slow" => {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow".to_vec()
                }
                _ => {
                    // Echo what arrived: the head's framing and the body.
                    let te = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
                    let answer = format!(
                        "chunked={te} {}",
                        String::from_utf8_lossy(&body)
                    );
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{answer}", answer.len())
                        .into_bytes()
                }
            }
        };
        if s.write_all(&resp).await.is_err() {
            return;
        }
        answered += 1;
        if path == "/close" || path == "/garbage" {
            return;
        }
        if script.close_at_once && script.close_after == Some(answered) {
            return;
        }
    }
}

/// Read one request (head as text, body decoded) from `s`; `None` at EOF.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let mut tmp = [0u8; 4096];
        let n = s.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end);
    let lower = head.to_ascii_lowercase();
    let body = if lower.contains("transfer-encoding: chunked") {
        read_chunked(s, buf).await?
    } else if let Some(len) = header(&lower, "content-length") {
        let len: usize = len.parse().ok()?;
        fill(s, buf, len).await?;
        buf.drain(..len).collect()
    } else {
        Vec::new()
    };
    Some((head, body))
}

fn header<'a>(lower_head: &'a str, name: &str) -> Option<&'a str> {
    lower_head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        (n.trim() == name).then(|| v.trim())
    })
}

async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, len: usize) -> Option<()> {
    while buf.len() < len {
        let mut tmp = [0u8; 4096];
        let n = s.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    Some(())
}

async fn read_line(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(p) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..p]).into_owned();
            buf.drain(..p + 2);
            return Some(line);
        }
        let have = buf.len();
        fill(s, buf, have + 1).await?;
    }
}

async fn read_chunked(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = read_line(s, buf).await?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            while !read_line(s, buf).await?.is_empty() {}
            return Some(body);
        }
        fill(s, buf, size + 2).await?;
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

// ---------- a raw client ----------

struct Reply {
    status: u16,
    /// The head, lower-cased.
    head: String,
    body: Vec<u8>,
}

/// Read one response; `bodiless`: the request was HEAD (or the status
/// has no body).
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>, bodiless: bool) -> Reply {
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let mut tmp = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut tmp))
            .await
            .expect("response within 5 s")
            .unwrap();
        assert!(
            n > 0,
            "closed before a response head: {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    buf.drain(..end);
    let status: u16 = head[9..12].parse().unwrap();
    let body = if bodiless || status == 204 || status == 304 || status < 200 {
        Vec::new()
    } else if head.contains("transfer-encoding: chunked") {
        read_chunked(s, buf).await.unwrap()
    } else if let Some(len) = header(&head, "content-length") {
        let len: usize = len.parse().unwrap();
        fill(s, buf, len).await.unwrap();
        buf.drain(..len).collect()
    } else {
        // Close-delimited.
        let mut rest = std::mem::take(buf);
        s.read_to_end(&mut rest).await.unwrap();
        rest
    };
    Reply { status, head, body }
}

async fn exchange(s: &mut TcpStream, buf: &mut Vec<u8>, request: &str) -> Reply {
    s.write_all(request.as_bytes()).await.unwrap();
    read_response(s, buf, request.starts_with("HEAD ")).await
}

// ---------- the router ----------

struct TestRouter {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
    _table: watch::Sender<RouteTable>,
}

async fn router_to(instances: &[SocketAddr], retries: u32) -> TestRouter {
    let web = ServiceId::new("default", "s", "web");
    let table = RouteTable::new(
        vec![Route::host("web.test", web.clone())],
        HashMap::from([(
            web,
            ServiceBackends {
                backends: instances
                    .iter()
                    .enumerate()
                    .map(|(i, a)| Backend {
                        addr: *a,
                        id: format!("i{i}"),
                    })
                    .collect(),
                retries,
                ..Default::default()
            },
        )]),
    );
    let (tx, rx) = watch::channel(table);
    let router = Router::new(rx, RouterConfig::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        router
            .serve(listener, async {
                let _ = stopped.await;
            })
            .await
    });
    TestRouter {
        addr,
        _stop: stop,
        _table: tx,
    }
}

const KEEP: Script = Script {
    close_after: None,
    close_at_once: false,
};

#[tokio::test]
async fn response_framings_reach_the_client_intact_on_one_connection() {
    let inst = instance(KEEP).await;
    let r = router_to(&[inst.addr], 1).await;
    let mut c = TcpStream::connect(r.addr).await.unwrap();
    let mut buf = Vec::new();
    let req = |m: &str, p: &str| format!("{m} {p} HTTP/1.1\r\nHost: web.test\r\n\r\n");

    let a = exchange(&mut c, &mut buf, &req("GET", "/chunked")).await;
    assert_eq!((a.status, a.body.as_slice()), (200, &b"hello world"[..]));
    assert!(!a.head.contains("x-trailer"), "{}", a.head);

    let a = exchange(&mut c, &mut buf, &req("HEAD", "/")).await;
    assert_eq!(a.status, 200);
    assert!(a.head.contains("content-length: 10"), "{}", a.head);
    let a = exchange(&mut c, &mut buf, &req("GET", "/nocontent")).await;
    assert_eq!(a.status, 204);
    let a = exchange(&mut c, &mut buf, &req("GET", "/notmodified")).await;
    assert_eq!(a.status, 304);
    // An interim 100 from the instance is not passed on as the answer.
    let a = exchange(&mut c, &mut buf, &req("GET", "/continue")).await;
    assert_eq!((a.status, a.body.as_slice()), (200, &b"final"[..]));

    // The connection is still in step after every bodiless answer.
    let a = exchange(&mut c, &mut buf, &req("GET", "/plain")).await;
    assert_eq!((a.status, a.body.as_slice()), (200, &b"chunked=false "[..]));

    // Close-delimited from the instance: the client still gets all of it.
    let a = exchange(&mut c, &mut buf, &req("GET", "/close")).await;
    assert_eq!((a.status, a.body.as_slice()), (200, &b"until the end"[..]));
    // All on one client connection, and instance connections were reused.
    assert!(inst.conns.load(Ordering::SeqCst) <= 2);
}

#[tokio::test]
async fn request_bodies_are_forwarded_chunked_or_by_length() {
    let inst = instance(KEEP).await;
    let r = router_to(&[inst.addr], 1).await;
    let mut c = TcpStream::connect(r.addr).await.unwrap();
    let mut buf = Vec::new();
    let a = exchange(
        &mut c,
        &mut buf,
        "POST /echo HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki\r\n5;ext\r\npedia\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(String::from_utf8_lossy(&a.body), "chunked=true Wikipedia");
    let a = exchange(
        &mut c,
        &mut buf,
        "PUT /echo HTTP/1.1\r\nHost: web.test\r\nContent-Length: 7\r\n\r\npayload",
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&a.body), "chunked=false payload");
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let inst = instance(KEEP).await;
    let r = router_to(&[inst.addr], 1).await;
    let mut c = TcpStream::connect(r.addr).await.unwrap();
    let mut all = String::new();
    for i in 0..3 {
        all.push_str(&format!(
            "POST /echo HTTP/1.1\r\nHost: web.test\r\nContent-Length: 2\r\n\r\nr{i}"
        ));
    }
    c.write_all(all.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    for i in 0..3 {
        let a = read_response(&mut c, &mut buf, false).await;
        assert_eq!(
            String::from_utf8_lossy(&a.body),
            format!("chunked=false r{i}")
        );
    }
}

#[tokio::test]
async fn expect_100_continue_gets_its_interim_answer_before_the_body() {
    let inst = instance(KEEP).await;
    let r = router_to(&[inst.addr], 1).await;
    let mut c = TcpStream::connect(r.addr).await.unwrap();
    c.write_all(
        b"POST /echo HTTP/1.1\r\nHost: web.test\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let interim = read_response(&mut c, &mut buf, true).await;
    assert_eq!(interim.status, 100);
    c.write_all(b"body").await.unwrap();
    let a = read_response(&mut c, &mut buf, false).await;
    assert_eq!(
        (a.status, String::from_utf8_lossy(&a.body).as_ref()),
        (200, "chunked=false body")
    );
}

#[tokio::test]
async fn oversized_and_malformed_heads_are_refused_with_4xx() {
    let inst = instance(KEEP).await;
    let r = router_to(&[inst.addr], 1).await;

    let mut c = TcpStream::connect(r.addr).await.unwrap();
    let mut buf = Vec::new();
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: web.test\r\nX-Big: {}\r\n\r\n",
        "x".repeat(512 * 1024)
    );
    // The router may answer and close before taking all of it.
    let _ = c.write_all(huge.as_bytes()).await;
    let a = read_response(&mut c, &mut buf, false).await;
    assert_eq!(a.status, 431);

    let mut c = TcpStream::connect(r.addr).await.unwrap();
    let mut buf = Vec::new();
    let a = exchange(&mut c, &mut buf, "GET / HTTP/1.1\r\nHost web.test\r\n\r\n").await;
    assert_eq!(a.status, 400);

    let mut c = TcpStream::connect(r.addr).await.unwrap();
    let mut buf = Vec::new();
    let a = exchange(
        &mut c,
        &mut buf,
        "POST / HTTP/1.1\r\nHost: web.test\r\nContent-Length: 12x\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, 400);
    assert_eq!(inst.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_instance_answering_garbage_is_a_502() {
    let inst = instance(KEEP).await;
    let r = router_to(&[inst.addr], 1).await;
    let mut c = TcpStream::connect(r.addr).await.unwrap();
    let mut buf = Vec::new();
    let a = exchange(
        &mut c,
        &mut buf,
        "GET /garbage HTTP/1.1\r\nHost: web.test\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, 502);
}

#[tokio::test]
async fn a_pooled_connection_closed_as_it_is_reused_is_retried_for_idempotent_requests() {
    // Each connection answers one request; the next request on it is
    // read and the connection closed without an answer.
    let inst = instance(Script {
        close_after: Some(1),
        close_at_once: false,
    })
    .await;
    let r = router_to(&[inst.addr], 1).await;
    let mut c = TcpStream::connect(r.addr).await.unwrap();
    let mut buf = Vec::new();
    let get = "GET /a HTTP/1.1\r\nHost: web.test\r\n\r\n";
    for _ in 0..3 {
        let a = exchange(&mut c, &mut buf, get).await;
        assert_eq!(a.status, 200, "{}", a.head);
    }
    assert_eq!(inst.requests.load(Ordering::SeqCst), 3);
    // Not repeatable: a POST that may have reached the instance is a 502.
    let a = exchange(
        &mut c,
        &mut buf,
        "POST /a HTTP/1.1\r\nHost: web.test\r\nContent-Length: 1\r\n\r\nx",
    )
    .await;
    assert_eq!(a.status, 502);
}

#[tokio::test]
async fn a_pooled_connection_the_instance_closed_while_idle_is_not_used() {
    // Each connection answers one request and closes at once.
    let inst = instance(Script {
        close_after: Some(1),
        close_at_once: true,
    })
    .await;
    let r = router_to(&[inst.addr], 1).await;
    let mut c = TcpStream::connect(r.addr).await.unwrap();
    let mut buf = Vec::new();
    for i in 0..3 {
        // Give the FIN time to arrive.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let a = exchange(
            &mut c,
            &mut buf,
            &format!("POST /echo HTTP/1.1\r\nHost: web.test\r\nContent-Length: 2\r\n\r\np{i}"),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.head);
        assert_eq!(
            String::from_utf8_lossy(&a.body),
            format!("chunked=false p{i}")
        );
    }
    assert_eq!(inst.conns.load(Ordering::SeqCst), 3);
}

static PANICKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[tokio::test]
async fn mangled_requests_get_an_answer_or_a_close_never_a_panic() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICKED.store(true, Ordering::SeqCst);
        default_hook(info);
    }));
    let inst = instance(KEEP).await;
    let r = router_to(&[inst.addr], 1).await;
    let valid: &[&[u8]] = &[
        b"POST /echo HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki\r\n0\r\n\r\n",
        b"GET /chunked HTTP/1.1\r\nHost: web.test\r\nConnection: keep-alive, Upgrade\r\nUpgrade: x\r\n\r\n",
        b"PUT /echo HTTP/1.0\r\nHost: web.test\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nabc",
        b"GET http://web.test/close?q=1 HTTP/1.1\r\n\r\n",
    ];
    // Deterministic: the same mutations on every run.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for case in 0..200 {
        let mut req = valid[case % valid.len()].to_vec();
        for _ in 0..1 + next() % 4 {
            let at = (next() as usize) % req.len();
            match next() % 3 {
                0 => req[at] = next() as u8,
                1 => req.insert(at, b"\r\n:;, \x00\x7f0"[(next() % 9) as usize]),
                _ => {
                    req.remove(at);
                }
            }
        }
        let mut c = TcpStream::connect(r.addr).await.unwrap();
        let _ = c.write_all(&req).await;
        let _ = c.shutdown().await;
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await;
        assert!(
            read.is_ok(),
            "case {case}: no answer and no close for {:?}",
            String::from_utf8_lossy(&req)
        );
        if !out.is_empty() {
            assert!(
                out.starts_with(b"HTTP/1.1 "),
                "case {case}: {:?}",
                String::from_utf8_lossy(&out)
            );
        }
    }
    assert!(
        !PANICKED.load(Ordering::SeqCst),
        "a connection task panicked"
    );
    // Still serving.
    let mut c = TcpStream::connect(r.addr).await.unwrap();
    let mut buf = Vec::new();
    let a = exchange(
        &mut c,
        &mut buf,
        "GET /ok HTTP/1.1\r\nHost: web.test\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, 200);
}

#[tokio::test]
async fn a_slow_head_is_cut_off_but_a_busy_connection_is_not() {
    let inst = instance(KEEP).await;
    let web = ServiceId::new("default", "s", "web");
    let table = RouteTable::new(
        vec![Route::host("web.test", web.clone())],
        HashMap::from([(
            web,
            ServiceBackends {
                backends: vec![Backend {
                    addr: inst.addr,
                    id: "i0".into(),
                }],
                ..Default::default()
            },
        )]),
    );
    let (_tx, rx) = watch::channel(table);
    // Long enough that a loaded machine's pauses between the requests below
    // do not reach it.
    let timeout = Duration::from_millis(700);
    let router = Router::new(
        rx,
        RouterConfig {
            header_read_timeout: timeout,
            ..Default::default()
        },
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        router
            .serve(listener, async {
                let _ = stopped.await;
            })
            .await
    });

    // Requests every 100 ms for over three timeouts on one connection:
    // the deadline moves with each request.
    let mut c = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    for _ in 0..25 {
        let a = exchange(
            &mut c,
            &mut buf,
            "GET /a HTTP/1.1\r\nHost: web.test\r\n\r\n",
        )
        .await;
        assert_eq!(a.status, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Then half a head and nothing more: closed after about the timeout.
    c.write_all(b"GET /a HTTP/1.1\r\nHost: web").await.unwrap();
    let t0 = std::time::Instant::now();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut rest))
        .await
        .expect("closed within 10 s");
    assert!(n.is_err() || rest.is_empty(), "{rest:?}");
    let waited = t0.elapsed();
    assert!(
        waited >= timeout / 2 && waited < Duration::from_secs(8),
        "{waited:?}"
    );
}

/// After one exchange: whether the router closed the connection.
async fn closed_after(c: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), c.read(&mut b)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn connection_close_and_http_1_0_are_honoured() {
    let inst = instance(KEEP).await;
    let r = router_to(&[inst.addr], 1).await;

    // HTTP/1.1 asking to close.
    let mut c = TcpStream::connect(r.addr).await.unwrap();
    let mut buf = Vec::new();
    let a = exchange(
        &mut c,
        &mut buf,
        "GET /a HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(a.head.contains("connection: close"), "{}", a.head);
    assert!(closed_after(&mut c).await);

    // HTTP/1.0 without keep-alive: closed after the answer.
    let mut c = TcpStream::connect(r.addr).await.unwrap();
    let mut buf = Vec::new();
    let a = exchange(
        &mut c,
        &mut buf,
        "GET /a HTTP/1.0\r\nHost: web.test\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(closed_after(&mut c).await);

    // HTTP/1.0 keep-alive: kept for a body of known length …
    let mut c = TcpStream::connect(r.addr).await.unwrap();
    let mut buf = Vec::new();
    let ka = "GET /a HTTP/1.0\r\nHost: web.test\r\nConnection: keep-alive\r\n\r\n";
    let a = exchange(&mut c, &mut buf, ka).await;
    assert!(a.head.contains("connection: keep-alive"), "{}", a.head);
    let a = exchange(&mut c, &mut buf, ka).await;
    assert_eq!(a.status, 200);
    // … but a chunked one cannot be chunked for HTTP/1.0: it ends with the
    // connection.
    let a = exchange(
        &mut c,
        &mut buf,
        "GET /chunked HTTP/1.0\r\nHost: web.test\r\nConnection: keep-alive\r\n\r\n",
    )
    .await;
    assert!(!a.head.contains("transfer-encoding"), "{}", a.head);
    assert_eq!(a.body, b"hello world");
}

/// The router's own error pages carry a `Date` of now: an IMF-fixdate of
/// a second between `before` and the check.
fn assert_dated(reply: &Reply, before: std::time::SystemTime) {
    let date =
        header(&reply.head, "date").unwrap_or_else(|| panic!("no date header in {:?}", reply.head));
    let secs =
        |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let now = secs(std::time::SystemTime::now());
    // `head` is lower-cased: compare with every second's date, likewise.
    let ok = (secs(before)..=now).any(|t| {
        let at = std::time::UNIX_EPOCH + Duration::from_secs(t);
        httpdate::fmt_http_date(at).to_ascii_lowercase() == date
    });
    assert!(ok, "date {date:?} is not an IMF-fixdate of now");
}

#[tokio::test]
async fn the_routers_own_error_pages_carry_a_date() {
    let before = std::time::SystemTime::now();
    let inst = instance(KEEP).await;
    let r = router_to(&[inst.addr], 1).await;
    let mut c = TcpStream::connect(r.addr).await.unwrap();
    let mut buf = Vec::new();
    // 404: no route (keep-alive), then 502 on the same connection.
    let a = exchange(
        &mut c,
        &mut buf,
        "GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, 404);
    assert_dated(&a, before);
    let a = exchange(
        &mut c,
        &mut buf,
        "GET /garbage HTTP/1.1\r\nHost: web.test\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, 502);
    assert_dated(&a, before);
    // 400 (and the connection closes).
    let mut c = TcpStream::connect(r.addr).await.unwrap();
    let a = exchange(
        &mut c,
        &mut Vec::new(),
        "GET / HTTP/1.1\r\nHost web.test\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, 400);
    assert_dated(&a, before);
    // 503: a service with no instance.
    let none = router_to(&[], 1).await;
    let mut c = TcpStream::connect(none.addr).await.unwrap();
    let a = exchange(
        &mut c,
        &mut Vec::new(),
        "GET / HTTP/1.1\r\nHost: web.test\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, 503);
    assert_dated(&a, before);
}

/// An instance that, for `/hold`, reads the request (its body too), says
/// so on `got`, never answers, and says on `closed` when the router
/// closes that connection; any other request gets `200 ok`.
async fn holding_instance() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<()>,
    tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (got_tx, got) = tokio::sync::mpsc::unbounded_channel();
    let (closed_tx, closed) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (got_tx, closed_tx) = (got_tx.clone(), closed_tx.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some((head, _body)) = read_request(&mut s, &mut buf).await {
                    if head.starts_with("GET /hold ") || head.starts_with("POST /hold ") {
                        let _ = got_tx.send(());
                        let mut sink = [0u8; 1024];
                        while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
                        let _ = closed_tx.send(());
                        return;
                    }
                    let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                    if s.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, got, closed)
}

async fn next_event(rx: &mut tokio::sync::mpsc::UnboundedReceiver<()>, what: &str) {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("{what} within 10 s"))
        .expect("the instance runs");
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_its_request_with_or_without_a_body() {
    // The router's upstream timeout is 60 s: only a cancellation closes
    // the instance's connection within the 10 s waited for.
    let (inst, mut got, mut closed) = holding_instance().await;
    let web = ServiceId::new("default", "s", "web");
    let table = RouteTable::new(
        vec![Route::host("web.test", web.clone())],
        HashMap::from([(
            web,
            ServiceBackends {
                backends: vec![Backend {
                    addr: inst,
                    id: "i0".into(),
                }],
                max_concurrent: Some(1),
                ..Default::default()
            },
        )]),
    );
    let (_tx, rx) = watch::channel(table);
    let router = Router::new(rx, RouterConfig::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        router
            .serve(listener, async {
                let _ = stopped.await;
            })
            .await
    });
    let mut b = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    let get_a = "GET /a HTTP/1.1\r\nHost: web.test\r\n\r\n";
    assert_eq!(exchange(&mut b, &mut buf, get_a).await.status, 200);
    for (what, request) in [
        ("no body", "GET /hold HTTP/1.1\r\nHost: web.test\r\n\r\n"),
        (
            "a Content-Length body",
            "POST /hold HTTP/1.1\r\nHost: web.test\r\nContent-Length: 5\r\n\r\nhello",
        ),
        (
            "a chunked body",
            "POST /hold HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
    ] {
        let mut a = TcpStream::connect(addr).await.unwrap();
        a.write_all(request.as_bytes()).await.unwrap();
        // The instance has the whole request: the one bulkhead slot is
        // taken …
        next_event(
            &mut got,
            &format!("the held request ({what}) reaches the instance"),
        )
        .await;
        assert_eq!(
            exchange(&mut b, &mut buf, get_a).await.status,
            503,
            "{what}"
        );
        // … and the request is cancelled as soon as its client goes away:
        // the instance's connection is closed and the slot freed.
        drop(a);
        next_event(
            &mut closed,
            &format!("the router closes the instance's connection ({what})"),
        )
        .await;
        assert_eq!(
            exchange(&mut b, &mut buf, get_a).await.status,
            200,
            "{what}"
        );
    }
}
