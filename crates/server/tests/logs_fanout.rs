//! The logs route merged across servers, over real HTTP: servers on one
//! store, each with its own log store and the peers extension (as
//! `berth server --store etcd://…` has), asked through any one of them.

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_agent::logs::LogStore;
use berth_model::{InstanceKey, LogLine, LogStream, keys};
use berth_server::api::{self, ApiContext};
use berth_server::leader::LeaderRecord;
use berth_server::peers::Peers;
use berth_server::{join, servers};
use berth_store::embedded::EmbeddedStore;
use berth_store::{Store, put_json};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

const COMPOSE: &str =
    "services:\n  web:\n    command: [sleep, '1000']\n    deploy: { replicas: 2 }\n";

struct Fleet {
    dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    token: String,
    servers: Vec<(SocketAddr, LogStore)>,
}

impl Fleet {
    /// A store with stack `shop` and `n` servers `s0`…, each listed under
    /// `/berth/servers/`.
    async fn start(n: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap());
        let token = join::ensure_peer_token(store.as_ref()).await.unwrap();
        let mut fleet = Fleet {
            dir,
            store,
            token,
            servers: Vec::new(),
        };
        for _ in 0..n {
            fleet.add_server().await;
        }
        let opts = berth_spec::LoadOptions {
            working_dir: fleet.dir.path().to_owned(),
            project_name: Some("shop".into()),
            ..Default::default()
        };
        let stack = berth_spec::load_str(Path::new("compose.yaml"), COMPOSE, &opts)
            .unwrap()
            .stack;
        let body = serde_json::json!({ "namespace": "default", "stack": stack }).to_string();
        let (status, _, text) = fleet
            .call(0, Method::POST, "/v1/stacks", Some(body), None)
            .await;
        assert_eq!(status, StatusCode::CREATED, "{text}");
        fleet
    }

    /// Start server `s<next>` and list it.
    async fn add_server(&mut self) -> usize {
        let i = self.servers.len();
        let node = format!("s{i}");
        let logs =
            LogStore::open(self.dir.path().join(format!("logs{i}")), Default::default()).unwrap();
        let ctx = ApiContext {
            store: self.store.clone(),
            logs: logs.clone(),
            data_dir: self.dir.path().to_owned(),
            node_id: node.clone(),
            token: None,
        };
        let peers = Peers::new(self.store.clone(), node.clone(), self.token.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(api::serve_tcp(
            listener,
            api::router(ctx).layer(axum::Extension(peers)),
            std::future::pending(),
        ));
        self.list(&node, vec![addr]).await;
        self.servers.push((addr, logs));
        i
    }

    /// Write a server record, as `servers::advertise` does.
    async fn list(&self, node: &str, api: Vec<SocketAddr>) {
        let record = LeaderRecord {
            node: node.into(),
            api,
            pid: 1,
            since: 0,
        };
        put_json(self.store.as_ref(), &keys::server(node), &record)
            .await
            .unwrap();
    }

    /// Store lines on server `i` as if an agent had shipped them there.
    async fn store_on(&self, i: usize, lines: &[(u32, u64, &str)]) {
        let lines = lines
            .iter()
            .map(|&(slot, ts_us, text)| line(slot, ts_us, text))
            .collect();
        self.servers[i].1.ingest(lines).await.unwrap();
        self.servers[i].1.flush().await.unwrap();
    }

    async fn open(
        &self,
        i: usize,
        method: Method,
        path: &str,
        body: Option<String>,
        bearer: Option<&str>,
    ) -> hyper::Response<Incoming> {
        let stream = tokio::net::TcpStream::connect(self.servers[i].0)
            .await
            .unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "x");
        if let Some(t) = bearer {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let body = Full::new(Bytes::from(body.unwrap_or_default()));
        sender.send_request(req.body(body).unwrap()).await.unwrap()
    }

    /// A whole answer: status, headers, body.
    async fn call(
        &self,
        i: usize,
        method: Method,
        path: &str,
        body: Option<String>,
        bearer: Option<&str>,
    ) -> (StatusCode, HeaderMap, String) {
        let resp = self.open(i, method, path, body, bearer).await;
        let (status, headers) = (resp.status(), resp.headers().clone());
        let bytes = tokio::time::timeout(Duration::from_secs(30), resp.into_body().collect())
            .await
            .expect("the answer ends within 30 s")
            .unwrap()
            .to_bytes();
        (
            status,
            headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }

    /// The lines of a logs answer from server `i` (`query` after `?`).
    async fn logs(&self, i: usize, query: &str) -> (Vec<LogLine>, Vec<String>) {
        let path = format!("/v1/stacks/default/shop/logs?{query}");
        let (status, headers, body) = self.call(i, Method::GET, &path, None, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        (parse(&body), missing(&headers))
    }
}

fn line(slot: u32, ts_us: u64, text: &str) -> LogLine {
    LogLine {
        key: InstanceKey::new("default", "shop", "web", slot),
        ts_us,
        stream: LogStream::Stdout,
        line: text.into(),
    }
}

fn parse(body: &str) -> Vec<LogLine> {
    body.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn texts(lines: &[LogLine]) -> Vec<&str> {
    lines.iter().map(|l| l.line.as_str()).collect()
}

fn missing(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all("berth-missing-server")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

/// Two servers' lines, interleaved in time, one stored on both.
async fn two_servers() -> Fleet {
    let fleet = Fleet::start(2).await;
    fleet
        .store_on(0, &[(1, 10, "x10"), (1, 30, "x30"), (1, 50, "x50")])
        .await;
    fleet
        .store_on(
            1,
            &[
                (2, 20, "x20"),
                (1, 30, "x30"),
                (2, 40, "x40"),
                (2, 60, "x60"),
            ],
        )
        .await;
    fleet
}

#[tokio::test]
async fn past_lines_of_every_server_merge_in_time_order_each_once() {
    let fleet = two_servers().await;
    for i in 0..2 {
        let (lines, missing) = fleet.logs(i, "").await;
        assert_eq!(
            texts(&lines),
            ["x10", "x20", "x30", "x40", "x50", "x60"],
            "asked of s{i}"
        );
        assert!(missing.is_empty(), "{missing:?}");
    }
}

#[tokio::test]
async fn tail_cursor_search_and_since_hold_over_the_merge() {
    let fleet = two_servers().await;
    // The last 2 are one from each server.
    assert_eq!(texts(&fleet.logs(0, "tail=2").await.0), ["x50", "x60"]);
    // The page before the oldest shown, then the one before that.
    assert_eq!(
        texts(&fleet.logs(0, "tail=2&before=50").await.0),
        ["x30", "x40"]
    );
    assert_eq!(
        texts(&fleet.logs(1, "tail=2&before=30").await.0),
        ["x10", "x20"]
    );
    // `tail` counts matches of the whole merge.
    assert_eq!(
        texts(&fleet.logs(0, "grep=x%5B2-5%5D0&tail=3").await.0),
        ["x30", "x40", "x50"]
    );
    // `since` (Unix seconds) is resolved once and holds on every server.
    assert!(fleet.logs(0, "since=1").await.0.is_empty());
    assert_eq!(fleet.logs(0, "since=0").await.0.len(), 6);
}

#[tokio::test]
async fn a_server_that_does_not_answer_is_named_and_the_others_still_answer() {
    let fleet = two_servers().await;
    // A listed server nobody listens for, and an address that reaches
    // another server than its record names.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    fleet.list("s8", vec![fleet.servers[1].0]).await;
    fleet.list("s9", vec![closed]).await;
    let (lines, missing) = fleet.logs(0, "tail=100").await;
    assert_eq!(texts(&lines).len(), 6);
    assert_eq!(missing.len(), 2, "{missing:?}");
    assert!(
        missing[0].starts_with("s8: ") && missing[0].contains("\"s1\", not \"s8\""),
        "{missing:?}"
    );
    assert!(
        missing[1].starts_with(&format!("s9: {closed}: ")),
        "{missing:?}"
    );
}

#[tokio::test]
async fn the_peer_route_takes_the_peer_token_and_answers_with_its_own_lines() {
    let fleet = two_servers().await;
    let path = "/v1/peer/stacks/default/shop/logs";
    for bearer in [None, Some("berth-peer-wrong"), Some("")] {
        let (status, _, body) = fleet.call(1, Method::GET, path, None, bearer).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{bearer:?}: {body}");
    }
    let token = fleet.token.clone();
    let (status, headers, body) = fleet.call(1, Method::GET, path, None, Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers["berth-node"], "s1");
    assert_eq!(texts(&parse(&body)), ["x20", "x30", "x40", "x60"]);
    // The servers' token opens nothing else.
    let (status, _, _) = fleet
        .call(
            0,
            Method::GET,
            "/v1/agent/nodes/s1/servers",
            None,
            Some(&token),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

/// Reads a followed answer into text as it comes.
struct Follow {
    body: Incoming,
    text: String,
}

impl Follow {
    /// Read until the text contains `want`, within 20 s.
    async fn until(&mut self, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.text.contains(want) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.text.push_str(&String::from_utf8_lossy(&data));
                    }
                }
                other => panic!(
                    "waiting for {want:?}: {}; so far:\n{}",
                    match other {
                        Err(_) => "timed out".to_owned(),
                        Ok(None) => "the answer ended".to_owned(),
                        Ok(Some(Err(e))) => e.to_string(),
                        Ok(Some(Ok(_))) => unreachable!(),
                    },
                    self.text
                ),
            }
        }
    }
}

#[tokio::test]
async fn a_followed_answer_streams_every_servers_new_lines_and_servers_that_join() {
    let mut fleet = two_servers().await;
    let resp = fleet
        .open(
            0,
            Method::GET,
            "/v1/stacks/default/shop/logs?tail=1&follow=true",
            None,
            None,
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut follow = Follow {
        body: resp.into_body(),
        text: String::new(),
    };
    follow.until("x60").await;
    // A new line on the other server, and one stored on both (sent once).
    fleet.store_on(1, &[(2, 70, "x70"), (1, 80, "x80")]).await;
    fleet.store_on(0, &[(1, 80, "x80"), (1, 90, "x90")]).await;
    follow.until("x90").await;
    follow.until("x70").await;
    // A server that joins later is followed, and said to have joined.
    let s2 = fleet.add_server().await;
    follow.until("server s2 joined").await;
    fleet.store_on(s2, &[(2, 100, "x100")]).await;
    follow.until("x100").await;
    let got = parse(&follow.text);
    let seen = texts(&got);
    assert_eq!(seen.iter().filter(|t| **t == "x80").count(), 1, "{seen:?}");
    assert_eq!(seen[0], "x60", "{seen:?}");
    // The servers' records are what the fan-out asked.
    assert_eq!(servers::list(fleet.store.as_ref()).await.unwrap().len(), 3);
}

#[tokio::test]
async fn removing_a_stack_removes_its_logs_on_every_server() {
    let fleet = two_servers().await;
    let (status, _, body) = fleet
        .call(0, Method::DELETE, "/v1/stacks/default/shop", None, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Both servers' stores are empty for it: a stack made again under the
    // name does not show the old lines.
    for (i, (_, logs)) in fleet.servers.iter().enumerate() {
        let q = berth_agent::logs::LogQuery {
            namespace: "default".into(),
            stack: "shop".into(),
            ..Default::default()
        };
        assert_eq!(logs.read(&q).await.unwrap(), [], "s{i}");
    }
    // The route takes the peer token like the other peer route.
    let path = "/v1/peer/stacks/default/shop/logs";
    let (status, _, _) = fleet.call(1, Method::DELETE, path, None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}
