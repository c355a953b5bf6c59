//! An agent on another machine: it talks to the servers' HTTP API only,
//! never to the store.
//!
//! - [`ApiControlPlane`] implements [`ControlPlane`] over
//!   `/v1/agent/nodes/{node}/…`: list assignments, follow them with an
//!   NDJSON watch that resumes from the last revision seen after a broken
//!   connection, and report or forget statuses.
//! - [`run_remote`] is `berth agent --join`: it exchanges the join token for
//!   a per-node secret (kept in the data dir, mode 0600), registers the node
//!   (address, labels, [`crate::facts`]), keeps the registration alive with
//!   heartbeats (the server holds a store lease per node, so a dead agent's
//!   node and statuses expire), refreshes facts, and runs [`crate::run`]
//!   with an [`ApiControlPlane`]. When the server says the credential is no
//!   longer valid (`berth node rm`), every instance is stopped and the agent
//!   exits: a removed node must not keep serving work that was moved away.
//!
//! `--join` takes several servers (comma-separated); every clone of the
//! client shares one [`Servers`] ring, so when the current server refuses
//! a connection the heartbeat, the assignment watch (resumed from its last
//! revision: the store is shared), status reports and log shipping all move
//! to the next server, and the instances keep running (the node's lease
//! lives in the store, not in a server). The ring also learns every live
//! server from `GET /v1/agent/nodes/{node}/servers`.
//!
//! Plain `http://` only: put a TLS-terminating proxy in front of the API
//! when agents cross an untrusted network.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use berth_model::api::{
    AssignmentList, ErrorBody, JoinRequest, JoinResponse, RegisterResponse, WatchLine,
};
use berth_model::{Assignment, InstanceKey, InstanceStatus, Node};
use berth_store::Revision;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::control::{AssignmentEvent, AssignmentStream, ControlError, ControlPlane};
use crate::logs::{LogConfig, LogStore};
use crate::{AgentConfig, AgentError};

/// Errors of a remote agent.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// `--join` is not an `http://host:port` URL.
    #[error("--join {url:?}: {reason} (expected http://HOST:PORT of a berth server's API)")]
    BadUrl {
        /// What was given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server cannot be reached.
    #[error("cannot reach the berth server at {authority}: {message}")]
    Unreachable {
        /// `host:port`.
        authority: String,
        /// The I/O or HTTP error.
        message: String,
    },
    /// The server refused a request.
    #[error("the server refused {what} ({status}): {message}")]
    Refused {
        /// What was asked.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The server's error (and hint).
        message: String,
    },
    /// No credential in the data dir and no join token to get one.
    #[error(
        "no credential for node {node} in {dir} and no join token: pass --token (shown by `berth token` on a server)"
    )]
    NoCredential {
        /// Node id.
        node: String,
        /// The data dir.
        dir: PathBuf,
    },
    /// The node's credential was revoked (`berth node rm`).
    #[error(
        "node {node} was removed from the cluster (its credential is no longer accepted); its instances were stopped. Join again with --token to come back"
    )]
    Revoked {
        /// Node id.
        node: String,
    },
    /// The credential file cannot be read or written.
    #[error("credential file {path}: {source}")]
    Credential {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Another agent already uses this data dir.
    #[error("another berth agent is running with data dir {0} (use another --data)")]
    Locked(PathBuf),
    /// The log store cannot be opened.
    #[error(transparent)]
    Logs(#[from] crate::logs::LogError),
    /// The agent itself failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The agent's task panicked.
    #[error("agent task failed: {0}")]
    AgentTask(String),
}

/// The servers an agent can reach (`host:port`) and the one it uses now.
///
/// Shared by every clone of an [`ApiClient`] (heartbeats, the assignment
/// watch, status reports, log shipping), so they all move on together:
/// when a connection to the current server fails, the next one in the list
/// becomes current. The list starts with the `--join` URLs and learns the
/// live servers from `GET /v1/agent/nodes/{node}/servers`.
#[derive(Debug)]
pub struct Servers {
    inner: std::sync::Mutex<ServerRing>,
    /// Bumped whenever the current server changes, so calls and watches
    /// still waiting on the old one give up on it at once (see
    /// [`Servers::left`]).
    switched: watch::Sender<u64>,
}

#[derive(Debug)]
struct ServerRing {
    /// The `--join` URLs: kept whatever the servers say, so an agent whose
    /// learned servers all died can still come back through them.
    seeds: Vec<String>,
    list: Vec<String>,
    current: usize,
}

impl Servers {
    /// Start with these (non-empty; the first is used first).
    pub fn new(seeds: Vec<String>) -> Self {
        Self {
            inner: std::sync::Mutex::new(ServerRing {
                list: seeds.clone(),
                seeds,
                current: 0,
            }),
            switched: watch::channel(0).0,
        }
    }

    /// Resolves once `authority` is no longer the current server.
    pub async fn left(&self, authority: &str) {
        // Subscribed before looking, so a switch in between is not missed.
        let mut rx = self.switched.subscribe();
        while self.current() == authority {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, ServerRing> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The server to use now.
    pub fn current(&self) -> String {
        let r = self.ring();
        r.list.get(r.current).cloned().unwrap_or_default()
    }

    /// How many servers are known.
    pub fn len(&self) -> usize {
        self.ring().list.len()
    }

    /// Whether none is (never: `new` is given at least one).
    pub fn is_empty(&self) -> bool {
        self.ring().list.is_empty()
    }

    /// A connection to `authority` failed: move to the next server, unless
    /// another call already did. True when the current server changed.
    pub fn failed(&self, authority: &str) -> bool {
        let mut r = self.ring();
        if r.list.len() < 2 || r.list.get(r.current).map(String::as_str) != Some(authority) {
            return false;
        }
        r.current = (r.current + 1) % r.list.len();
        tracing::warn!(from = authority, to = %r.list[r.current], "server unreachable or not answering; switching to the next one");
        drop(r);
        self.switched.send_modify(|n| *n += 1);
        true
    }

    /// The live servers as a server lists them: they and the seeds become
    /// the list, and the current server stays current if it is still in it.
    pub fn learn(&self, live: Vec<String>) {
        let mut r = self.ring();
        let current = r.list.get(r.current).cloned();
        // A server lists its loopback listeners too. They name this
        // machine only when the agent reached a server over loopback (same
        // host); otherwise they would send the node's secret to whatever
        // listens on that port here.
        let same_host = r.seeds.iter().any(|s| is_loopback(s));
        let mut list: Vec<String> = live
            .into_iter()
            .filter(|s| same_host || !is_loopback(s))
            .collect();
        for s in &r.seeds {
            if !list.contains(s) {
                list.push(s.clone());
            }
        }
        if list.is_empty() || list == r.list {
            return;
        }
        let kept = current
            .as_ref()
            .and_then(|c| list.iter().position(|s| s == c));
        r.current = kept.unwrap_or(0);
        tracing::info!(servers = ?list, "known servers");
        r.list = list;
        drop(r);
        if kept.is_none() {
            self.switched.send_modify(|n| *n += 1);
        }
    }
}

/// Whether `authority` (`host:port`) names a loopback address.
fn is_loopback(authority: &str) -> bool {
    if let Ok(a) = authority.parse::<std::net::SocketAddr>() {
        return a.ip().is_loopback();
    }
    authority
        .rsplit_once(':')
        .is_some_and(|(host, _)| host.eq_ignore_ascii_case("localhost"))
}

/// An HTTP client of the servers, authenticated as one node.
#[derive(Debug, Clone)]
pub struct ApiClient {
    servers: Arc<Servers>,
    node: String,
    secret: Option<String>,
}

/// How long connecting to a server may take. Short: a server that does
/// not accept a connection within it is as good as down for an agent,
/// which has others to try (and a fence to keep).
const CONNECT_WITHIN: Duration = Duration::from_secs(3);
/// How long a server may take to start answering a request (the headers;
/// watches stream their body after them). A server that accepts the
/// connection and then says nothing for this long (stopped, wedged) is
/// left for the next one.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// Bound of a whole call, answer body included.
const CALL_WITHIN: Duration = Duration::from_secs(30);

/// A server's response, and which server gave it.
pub(crate) struct Reply {
    /// The server (`host:port`).
    pub server: String,
    /// Its response.
    pub resp: Response<Incoming>,
}

/// A non-2xx answer, or a transport failure (`status` 0).
#[derive(Debug, Clone)]
struct Answer {
    status: StatusCode,
    body: Bytes,
}

/// `STATUS: error text` of a failed response, its body read to the end.
pub(crate) async fn failure(resp: hyper::Response<hyper::body::Incoming>) -> String {
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    format!("{status}: {}", error_text(&body))
}

pub(crate) fn error_text(body: &[u8]) -> String {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => match b.hint {
            Some(h) => format!("{} (hint: {h})", b.error),
            None => b.error,
        },
        Err(_) => String::from_utf8_lossy(body).trim().to_owned(),
    }
}

/// `http://h1:p1,http://h2:p2` (several servers for failover) → their
/// `host:port`s.
pub fn parse_join_urls(urls: &str) -> Result<Vec<String>, RemoteError> {
    let list: Vec<String> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(parse_join_url)
        .collect::<Result<_, _>>()?;
    if list.is_empty() {
        return Err(RemoteError::BadUrl {
            url: urls.to_owned(),
            reason: "no server given".to_owned(),
        });
    }
    Ok(list)
}

/// `http://host:port[/]` → `host:port`.
pub fn parse_join_url(url: &str) -> Result<String, RemoteError> {
    let bad = |reason: &str| RemoteError::BadUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    if url.starts_with("https://") {
        return Err(bad(
            "https is not supported by the agent; use http:// (behind a TLS tunnel or on a private network)",
        ));
    }
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad("it must start with http://"))?;
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        return Err(bad("give only the scheme, host and port"));
    }
    if authority
        .rsplit_once(':')
        .is_none_or(|(_, p)| p.parse::<u16>().is_err())
    {
        return Err(bad("the port is missing (e.g. http://10.0.0.1:7777)"));
    }
    Ok(authority.to_owned())
}

/// Path segment encoding for node ids (which berth keeps to `[A-Za-z0-9._-]`).
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl ApiClient {
    /// A client of the server at `authority` (`host:port`) acting as `node`.
    pub fn new(authority: String, node: String, secret: Option<String>) -> Self {
        Self::with_servers(Arc::new(Servers::new(vec![authority])), node, secret)
    }

    /// A client of whichever of `servers` answers, acting as `node`.
    pub fn with_servers(servers: Arc<Servers>, node: String, secret: Option<String>) -> Self {
        Self {
            servers,
            node,
            secret,
        }
    }

    /// The servers this client uses.
    pub fn servers(&self) -> &Arc<Servers> {
        &self.servers
    }

    pub(crate) fn node_path(&self, rest: &str) -> String {
        format!("/v1/agent/nodes/{}{rest}", seg(&self.node))
    }

    /// Send one request to the current server. A server that refuses the
    /// connection, does not accept it within [`CONNECT_WITHIN`] or does not
    /// answer within [`ANSWER_WITHIN`] makes the ring move on; a request
    /// still waiting when the ring moves on (another call found the server
    /// dead or hung) is abandoned at once.
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Reply, String> {
        let authority = self.servers.current();
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, authority.as_str());
        if let Some(s) = &self.secret {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {s}"));
        }
        let req = match body {
            Some(b) => builder
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(b))),
            None => builder.body(Full::new(Bytes::new())),
        }
        .map_err(|e| e.to_string())?;
        let connected = tokio::time::timeout(
            CONNECT_WITHIN,
            tokio::net::TcpStream::connect(authority.as_str()),
        )
        .await
        .map_err(|_| format!("not connected within {CONNECT_WITHIN:?}"))
        .and_then(|r| r.map_err(|e| e.to_string()));
        let stream = match connected {
            Ok(s) => s,
            Err(e) => {
                // The next call (a retry, or any other) goes to the next server.
                self.servers.failed(&authority);
                return Err(format!("{authority}: {e}"));
            }
        };
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let resp = tokio::select! {
            r = sender.send_request(req) => r.map_err(|e| format!("{authority}: {e}"))?,
            () = self.servers.left(&authority) => {
                return Err(format!("{authority}: abandoned, the agent moved to {}", self.servers.current()));
            }
            () = tokio::time::sleep(ANSWER_WITHIN) => {
                self.servers.failed(&authority);
                return Err(format!("{authority}: no answer within {ANSWER_WITHIN:?}"));
            }
        };
        Ok(Reply {
            server: authority,
            resp,
        })
    }

    /// One request with a JSON body; the whole answer, within
    /// [`CALL_WITHIN`].
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, String> {
        let fut = async {
            let Reply { server, resp } = self.send(method, path, body).await?;
            let status = resp.status();
            let body = tokio::select! {
                b = resp.into_body().collect() => b.map_err(|e| e.to_string())?.to_bytes(),
                () = self.servers.left(&server) => {
                    return Err(format!("{server}: abandoned, the agent moved to {}", self.servers.current()));
                }
            };
            Ok(Answer { status, body })
        };
        let began = self.servers.current();
        tokio::time::timeout(CALL_WITHIN, fut).await.map_err(|_| {
            self.servers.failed(&began);
            format!("the server did not answer within {CALL_WITHIN:?}")
        })?
    }

    async fn call_json<T: for<'de> Deserialize<'de>>(
        &self,
        what: &str,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, RemoteError> {
        let a =
            self.call(method, path, body)
                .await
                .map_err(|message| RemoteError::Unreachable {
                    authority: self.servers.current(),
                    message,
                })?;
        if !a.status.is_success() {
            if a.status == StatusCode::UNAUTHORIZED && self.secret.is_some() {
                return Err(RemoteError::Revoked {
                    node: self.node.clone(),
                });
            }
            return Err(RemoteError::Refused {
                what: what.to_owned(),
                status: a.status.as_u16(),
                message: error_text(&a.body),
            });
        }
        serde_json::from_slice(&a.body).map_err(|e| RemoteError::Refused {
            what: what.to_owned(),
            status: a.status.as_u16(),
            message: format!("unexpected answer (version mismatch?): {e}"),
        })
    }

    /// Exchange the join token for this node's secret.
    pub async fn join(&self, token: &str) -> Result<JoinResponse, RemoteError> {
        let body = serde_json::to_vec(&JoinRequest {
            node: self.node.clone(),
            token: token.to_owned(),
        })
        .map_err(|e| RemoteError::Refused {
            what: "join".into(),
            status: 0,
            message: e.to_string(),
        })?;
        let anonymous = Self::with_servers(self.servers.clone(), self.node.clone(), None);
        anonymous
            .call_json("the join token", Method::POST, "/v1/agent/join", Some(body))
            .await
    }

    /// Register (or refresh) the node record.
    pub async fn register(&self, node: &Node) -> Result<RegisterResponse, RemoteError> {
        let body = serde_json::to_vec(node).map_err(|e| RemoteError::Refused {
            what: "registration".into(),
            status: 0,
            message: e.to_string(),
        })?;
        self.call_json(
            "the node registration",
            Method::PUT,
            &self.node_path(""),
            Some(body),
        )
        .await
    }

    /// Ship a batch of log lines (see [`crate::remote_logs`]).
    pub async fn ship_logs(
        &self,
        batch: &berth_model::api::LogBatch,
    ) -> Result<berth_model::api::LogBatchResponse, RemoteError> {
        let body = serde_json::to_vec(batch).map_err(|e| RemoteError::Refused {
            what: "log lines".into(),
            status: 0,
            message: e.to_string(),
        })?;
        self.call_json(
            "the log lines",
            Method::POST,
            &self.node_path("/logs"),
            Some(body),
        )
        .await
    }

    /// Send the node's instance stats (see [`crate::remote_stats`]).
    pub async fn ship_stats(&self, stats: &berth_model::api::NodeStats) -> Result<(), RemoteError> {
        let body = serde_json::to_vec(stats).map_err(|e| RemoteError::Refused {
            what: "instance stats".into(),
            status: 0,
            message: e.to_string(),
        })?;
        let a = self
            .call(Method::POST, &self.node_path("/stats"), Some(body))
            .await
            .map_err(|message| RemoteError::Unreachable {
                authority: self.servers.current(),
                message,
            })?;
        if a.status.is_success() {
            return Ok(());
        }
        Err(RemoteError::Refused {
            what: "instance stats".into(),
            status: a.status.as_u16(),
            message: error_text(&a.body),
        })
    }

    /// The live servers' `host:port`s, as this server knows them.
    pub async fn list_servers(&self) -> Result<Vec<String>, RemoteError> {
        let l: berth_model::api::ServerList = self
            .call_json(
                "the server list",
                Method::GET,
                &self.node_path("/servers"),
                None,
            )
            .await?;
        Ok(l.servers)
    }

    /// [`ApiClient::heartbeat`] on each known server in turn until one
    /// answers, all within `budget`: a dead server costs one refused
    /// connection, a hung one (it accepts connections and never answers:
    /// stopped, wedged) half the budget when there is another to try, so
    /// the next one still renews the lease before the node would fence.
    pub async fn heartbeat_any(&self, budget: Duration) -> Result<bool, RemoteError> {
        let mut tries = self.servers.len().max(1);
        let per_try = if tries > 1 { budget / 2 } else { budget };
        let deadline = tokio::time::Instant::now() + budget;
        loop {
            let before = self.servers.current();
            let bound =
                per_try.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            let r = match tokio::time::timeout(bound, self.heartbeat()).await {
                Ok(r) => r,
                Err(_) => {
                    self.servers.failed(&before);
                    Err(RemoteError::Unreachable {
                        authority: before.clone(),
                        message: format!("no answer to the heartbeat within {bound:?}"),
                    })
                }
            };
            match r {
                // The next server, if the budget has time left for it (a
                // try with none would count a server it never asked as
                // failed).
                Err(RemoteError::Unreachable { .. })
                    if tries > 1
                        && self.servers.current() != before
                        && tokio::time::Instant::now() < deadline =>
                {
                    tries -= 1;
                }
                r => return r,
            }
        }
    }

    /// Keep the registration alive. `Ok(false)`: the server no longer has
    /// it (expired): register again.
    pub async fn heartbeat(&self) -> Result<bool, RemoteError> {
        let a = self
            .call(Method::POST, &self.node_path("/heartbeat"), None)
            .await
            .map_err(|message| RemoteError::Unreachable {
                authority: self.servers.current(),
                message,
            })?;
        match a.status {
            s if s.is_success() => Ok(true),
            StatusCode::CONFLICT => Ok(false),
            StatusCode::UNAUTHORIZED => Err(RemoteError::Revoked {
                node: self.node.clone(),
            }),
            s => Err(RemoteError::Refused {
                what: "the heartbeat".into(),
                status: s.as_u16(),
                message: error_text(&a.body),
            }),
        }
    }
}

/// [`ControlPlane`] over the servers' HTTP API.
#[derive(Debug, Clone)]
pub struct ApiControlPlane {
    client: ApiClient,
    logs_shipped: Option<crate::remote_logs::ShipBarrier>,
}

/// How long an instance's `forget` waits for the lines captured up to its
/// end (`stopping …`, what the program printed as it exited, `stopped …`)
/// to be shipped: the servers take lines only of instances the node is
/// assigned or still reports, so lines arriving after the forget are
/// refused. Normally the wait is one batch linger plus a round trip. When
/// the servers do not take lines, the forget goes anyway after this long:
/// a removed instance's status must not linger in `berth ps` and the
/// catalog (nor hold up the node's other reports, sent by the same task)
/// for an outage of unknown length; the lines stay in the agent's files.
/// Three seconds covers a shipper retrying after a failover (first back-off
/// 0.5 s) on a loaded machine, like the shipper's last flush on exit.
pub const FORGET_HOLD: Duration = Duration::from_secs(3);

impl ApiControlPlane {
    /// Use this authenticated client.
    pub fn new(client: ApiClient) -> Self {
        Self {
            client,
            logs_shipped: None,
        }
    }

    /// Hold each `forget` until the log lines captured before it were
    /// shipped through `barrier` (for at most [`FORGET_HOLD`]).
    pub fn with_log_barrier(mut self, barrier: crate::remote_logs::ShipBarrier) -> Self {
        self.logs_shipped = Some(barrier);
        self
    }
}

fn unavailable(e: impl std::fmt::Display) -> ControlError {
    ControlError::Unavailable(e.to_string())
}

async fn expect_ok(a: Result<Answer, String>) -> Result<Answer, ControlError> {
    let a = a.map_err(unavailable)?;
    if a.status.is_success() {
        Ok(a)
    } else {
        Err(ControlError::Unavailable(format!(
            "{}: {}",
            a.status,
            error_text(&a.body)
        )))
    }
}

/// How long a watch may stay silent: the server sends a progress line every
/// few seconds, so silence means the connection is dead.
const WATCH_SILENCE: Duration = Duration::from_secs(20);
/// How long a broken watch keeps reconnecting before the agent is told
/// (it then re-lists, which is also what it does after a compaction).
const WATCH_RECONNECT_FOR: Duration = Duration::from_secs(15);

/// A watch connection and what it has delivered.
struct WatchState {
    client: ApiClient,
    /// The server the current connection is to.
    server: String,
    /// Revision to resume from: the last one delivered (its events are
    /// sent again after a reconnect — the agent applies them idempotently —
    /// so a connection that broke in the middle of one transaction's events
    /// loses none of them).
    from: Revision,
    body: Option<Incoming>,
    buf: Vec<u8>,
    broken_since: Option<tokio::time::Instant>,
    /// Failed connects in a row since the last pause.
    failures: usize,
    ended: bool,
}

enum Next {
    Line(WatchLine),
    Broken(String),
}

impl WatchState {
    async fn connect(&mut self) -> Result<(), String> {
        let path = self
            .client
            .node_path(&format!("/assignments/watch?from={}", self.from));
        let Reply { server, resp } = self.client.send(Method::GET, &path, None).await?;
        if !resp.status().is_success() {
            return Err(failure(resp).await);
        }
        self.server = server;
        self.body = Some(resp.into_body());
        self.buf.clear();
        Ok(())
    }

    async fn next_line(&mut self) -> Next {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return match serde_json::from_slice::<WatchLine>(&line) {
                    Ok(l) => Next::Line(l),
                    Err(e) => Next::Broken(format!("bad watch line from the server: {e}")),
                };
            }
            let Some(body) = self.body.as_mut() else {
                return Next::Broken("not connected".into());
            };
            let servers = self.client.servers.clone();
            let frame = tokio::select! {
                f = tokio::time::timeout(WATCH_SILENCE, body.frame()) => f,
                // The others found this server dead or hung: follow them.
                () = servers.left(&self.server) => {
                    return Next::Broken(format!("leaving {} for {}", self.server, servers.current()));
                }
            };
            match frame {
                Err(_) => return Next::Broken("the watch went silent".into()),
                Ok(None) => return Next::Broken("the server ended the watch".into()),
                Ok(Some(Err(e))) => return Next::Broken(e.to_string()),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// The next event, reconnecting from `self.from` while the server is
    /// briefly unreachable.
    async fn next_event(&mut self) -> Option<Result<AssignmentEvent, ControlError>> {
        if self.ended {
            return None;
        }
        loop {
            if self.body.is_none() {
                match self.connect().await {
                    Ok(()) => {
                        self.broken_since = None;
                        self.failures = 0;
                    }
                    Err(e) => {
                        let since = *self
                            .broken_since
                            .get_or_insert_with(tokio::time::Instant::now);
                        if since.elapsed() > WATCH_RECONNECT_FOR {
                            self.ended = true;
                            return Some(Err(ControlError::Unavailable(format!(
                                "assignment watch: {e}"
                            ))));
                        }
                        // Each other known server is tried at once (the
                        // failed connect moved to the next); then back off.
                        self.failures += 1;
                        let pause = if self.failures < self.client.servers.len() {
                            10
                        } else {
                            self.failures = 0;
                            500
                        };
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                        continue;
                    }
                }
            }
            match self.next_line().await {
                Next::Line(WatchLine::Upsert {
                    revision,
                    assignment,
                }) => {
                    self.from = revision;
                    return Some(Ok(AssignmentEvent::Upsert(assignment)));
                }
                Next::Line(WatchLine::Removed { revision, key }) => {
                    self.from = revision;
                    return Some(Ok(AssignmentEvent::Removed(key)));
                }
                Next::Line(WatchLine::Resync) => {
                    self.ended = true;
                    return Some(Ok(AssignmentEvent::Resync));
                }
                Next::Line(WatchLine::Progress) => {}
                Next::Broken(e) => {
                    tracing::info!(error = %e, from = self.from, "assignment watch broke; resuming");
                    self.body = None;
                    self.broken_since
                        .get_or_insert_with(tokio::time::Instant::now);
                }
            }
        }
    }
}

#[async_trait]
impl ControlPlane for ApiControlPlane {
    async fn list_assignments(
        &self,
        node: &str,
    ) -> Result<(Vec<Assignment>, Revision), ControlError> {
        if node != self.client.node {
            return Err(unavailable(format!(
                "this agent is node {}, not {node}",
                self.client.node
            )));
        }
        let a = expect_ok(
            self.client
                .call(Method::GET, &self.client.node_path("/assignments"), None)
                .await,
        )
        .await?;
        let list: AssignmentList = serde_json::from_slice(&a.body).map_err(unavailable)?;
        Ok((list.assignments, list.revision))
    }

    async fn watch_assignments(
        &self,
        node: &str,
        from: Revision,
    ) -> Result<AssignmentStream, ControlError> {
        if node != self.client.node {
            return Err(unavailable(format!(
                "this agent is node {}, not {node}",
                self.client.node
            )));
        }
        let mut state = WatchState {
            client: self.client.clone(),
            server: String::new(),
            from,
            body: None,
            buf: Vec::new(),
            broken_since: None,
            failures: 0,
            ended: false,
        };
        // The first connection is made here so a refused watch is an error
        // of this call, as with the store.
        state.connect().await.map_err(unavailable)?;
        let stream = futures::stream::unfold(state, |mut st| async move {
            st.next_event().await.map(|ev| (ev, st))
        });
        Ok(stream.boxed())
    }

    async fn report(&self, status: &InstanceStatus) -> Result<(), ControlError> {
        self.report_many(std::slice::from_ref(status)).await
    }

    async fn report_many(&self, statuses: &[InstanceStatus]) -> Result<(), ControlError> {
        if statuses.is_empty() {
            return Ok(());
        }
        let body = serde_json::to_vec(statuses).map_err(unavailable)?;
        expect_ok(
            self.client
                .call(
                    Method::POST,
                    &self.client.node_path("/statuses"),
                    Some(body),
                )
                .await,
        )
        .await?;
        Ok(())
    }

    async fn forget(&self, key: &InstanceKey, seq: u64) -> Result<(), ControlError> {
        // The instance's supervisor has ended, so its last lines are in
        // the log store: they must reach a server while it still takes
        // them, i.e. before this forget.
        if let Some(barrier) = &self.logs_shipped
            && !barrier.shipped(FORGET_HOLD).await
        {
            tracing::debug!(instance = %key, "forgetting an instance before its last log lines were shipped (they stay in the local files)");
        }
        let body = serde_json::to_vec(&berth_model::api::ForgetRequest {
            key: key.clone(),
            seq,
        })
        .map_err(unavailable)?;
        expect_ok(
            self.client
                .call(Method::POST, &self.client.node_path("/forget"), Some(body))
                .await,
        )
        .await?;
        Ok(())
    }
}

/// What the agent keeps in its data dir after joining (`credential.json`,
/// mode 0600).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credential {
    /// The server it joined (`host:port`).
    pub server: String,
    /// The node id it joined as.
    pub node: String,
    /// The node's secret.
    pub secret: String,
}

/// Name of the credential file in the agent's data dir.
pub const CREDENTIAL_FILE: &str = "credential.json";

fn load_credential(dir: &Path, node: &str) -> Result<Option<Credential>, RemoteError> {
    let path = dir.join(CREDENTIAL_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice::<Credential>(&bytes) {
            Ok(c) if c.node == node => Ok(Some(c)),
            // Another node id, or a damaged file: join afresh.
            _ => Ok(None),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(RemoteError::Credential { path, source }),
    }
}

fn save_credential(dir: &Path, c: &Credential) -> Result<(), RemoteError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(CREDENTIAL_FILE);
    let tmp = dir.join("credential.json.tmp");
    let err = |source| RemoteError::Credential {
        path: path.clone(),
        source,
    };
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    let bytes = serde_json::to_vec_pretty(c).map_err(|e| err(std::io::Error::other(e)))?;
    f.write_all(&bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)
}

/// How `berth agent --join` runs.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// `http://host:port` of one server or several, comma-separated (the
    /// agent fails over between them, and learns the others).
    pub join: String,
    /// The join token (needed the first time, or after `berth node rm`).
    pub token: Option<String>,
    /// Node id.
    pub node_id: String,
    /// Static labels.
    pub labels: BTreeMap<String, String>,
    /// Address other nodes reach this node's instances on; `None`: the
    /// local address of the route to the server.
    pub advertise: Option<String>,
    /// Data dir (credential, logs, working files).
    pub data_dir: PathBuf,
    /// Log file limits.
    pub logs: LogConfig,
    /// How often facts are refreshed.
    pub facts_every: Duration,
    /// This node's router, DNS and TCP proxy ([`crate::remote_edge`]).
    pub edge: crate::edge::EdgeConfig,
    /// How often instance CPU/memory figures are sent to the server.
    pub stats_every: Duration,
}

/// The local address packets to `authority` leave from: what other nodes
/// most likely reach this one on. No packet is sent (UDP connect only).
pub async fn route_address(authority: &str) -> Option<String> {
    let target = tokio::net::lookup_host(authority).await.ok()?.next()?;
    let bind = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let sock = std::net::UdpSocket::bind(bind).ok()?;
    sock.connect(target).ok()?;
    Some(sock.local_addr().ok()?.ip().to_string())
}

fn lock_dir(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, RemoteError> {
    let path = dir.join("agent.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| RemoteError::Credential {
            path: path.clone(),
            source,
        })?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| RemoteError::Locked(dir.to_path_buf()))
}

/// The credential for this node: the stored one, or a new one from the
/// join token.
async fn credential(cfg: &RemoteConfig, servers: &Arc<Servers>) -> Result<Credential, RemoteError> {
    if let Some(c) = load_credential(&cfg.data_dir, &cfg.node_id)? {
        return Ok(c);
    }
    let Some(token) = &cfg.token else {
        return Err(RemoteError::NoCredential {
            node: cfg.node_id.clone(),
            dir: cfg.data_dir.clone(),
        });
    };
    let client = ApiClient::with_servers(servers.clone(), cfg.node_id.clone(), None);
    // Each given server in turn until one answers.
    let mut tries = servers.len();
    let joined = loop {
        match client.join(token).await {
            Err(RemoteError::Unreachable { .. }) if tries > 1 => tries -= 1,
            r => break r?,
        }
    };
    let authority = servers.current();
    let c = Credential {
        server: authority.clone(),
        node: joined.node,
        secret: joined.secret,
    };
    save_credential(&cfg.data_dir, &c)?;
    tracing::info!(node = %c.node, server = %authority, "joined the cluster");
    Ok(c)
}

/// Run a remote agent until `shutdown` turns true, or its node is removed.
pub async fn run_remote(
    cfg: RemoteConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), RemoteError> {
    let servers = Arc::new(Servers::new(parse_join_urls(&cfg.join)?));
    let authority = servers.current();
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| {
        RemoteError::Agent(AgentError::DataDir {
            path: cfg.data_dir.clone(),
            source,
        })
    })?;
    let _lock = lock_dir(&cfg.data_dir)?;
    let address = match &cfg.advertise {
        Some(a) => a.clone(),
        None => route_address(&authority)
            .await
            .unwrap_or_else(|| "127.0.0.1".to_owned()),
    };

    // Join (or reuse the stored credential), then register; a stored
    // credential the server refuses is replaced once if a token was given.
    let mut cred = credential(&cfg, &servers).await?;
    // Owns what it needs: the renewal and facts calls run as futures of
    // their own (see the loop below).
    let node_record = {
        let (id, address, labels) = (cfg.node_id.clone(), address.clone(), cfg.labels.clone());
        move |facts| Node {
            id: id.clone(),
            address: address.clone(),
            labels: labels.clone(),
            facts,
            draining: false,
            updated_at: crate::now_ms(),
        }
    };
    let mut client = ApiClient::with_servers(
        servers.clone(),
        cred.node.clone(),
        Some(cred.secret.clone()),
    );
    let mut rejoined = false;
    let (registered, registered_at) = loop {
        // The lease was granted after this instant: the fence counts from it.
        let sent = tokio::time::Instant::now();
        match client
            .register(&node_record(crate::facts::collect(&cfg.data_dir)))
            .await
        {
            Ok(r) => break (r, sent),
            Err(RemoteError::Revoked { .. }) if cfg.token.is_some() && !rejoined => {
                let _ = std::fs::remove_file(cfg.data_dir.join(CREDENTIAL_FILE));
                cred = credential(&cfg, &servers).await?;
                rejoined = true;
                client = ApiClient::with_servers(
                    servers.clone(),
                    cred.node.clone(),
                    Some(cred.secret.clone()),
                );
            }
            Err(e @ RemoteError::Unreachable { .. }) => {
                tracing::warn!(error = %e, "cannot register; retrying");
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return Ok(()),
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            Err(e) => return Err(e),
        }
    };
    tracing::info!(node = %cfg.node_id, %address, server = %servers.current(), "node registered");
    learn_servers(&client).await;
    // Serves whatever happens to the instances (fencing included).
    let edge = crate::remote_edge::RemoteEdge::start(&cfg.edge, client.clone()).await;

    let logs = LogStore::open(cfg.data_dir.join("logs"), cfg.logs.clone())?;
    let agent_cfg = AgentConfig {
        node_id: cfg.node_id.clone(),
        data_dir: cfg.data_dir.clone(),
        address: address.clone(),
        logs: cfg.logs.clone(),
    };
    // Before the agent starts anything, so the first lines are shipped too.
    let mut shipper = crate::remote_logs::LogShipper::start(
        client.clone(),
        &logs,
        crate::remote_logs::ShipConfig::default(),
    );
    // The statuses reported through it tell the stats reporter what runs.
    let reported = crate::remote_stats::ReportedStatuses::default();
    let container_stats = crate::driver::docker::StatsMap::default();
    let health_stats = crate::health::HealthStatsMap::default();
    let control = Arc::new(crate::remote_stats::Tapped::new(
        Arc::new(ApiControlPlane::new(client.clone()).with_log_barrier(shipper.barrier())),
        reported.clone(),
    ));
    let stats = crate::remote_stats::StatsShipper::start(
        client.clone(),
        reported,
        (
            (container_stats.clone(), health_stats.clone()),
            edge.as_ref()
                .map(crate::remote_edge::RemoteEdge::meters)
                .unwrap_or_default(),
        ),
        cfg.stats_every,
    );
    let start_agent = || {
        let (stop, rx) = watch::channel(false);
        let options = crate::AgentOptions {
            container_stats: container_stats.clone(),
            health_stats: health_stats.clone(),
            ..Default::default()
        };
        let task = tokio::spawn(crate::run_with(
            agent_cfg.clone(),
            control.clone(),
            logs.clone(),
            rx,
            options,
        ));
        RunningAgent { stop, task }
    };
    let mut agent = Some(start_agent());

    let ttl = Duration::from_millis(registered.ttl_ms);
    let beat_every = Duration::from_millis((registered.ttl_ms / 4).clamp(500, 5_000));
    let fence = Fence::new(ttl, beat_every);
    // Measured from when the last successful renewal was *sent*: the
    // server renewed the lease after that instant, so the agent's deadline
    // is never later than the server's expiry.
    let mut last_renewal = registered_at;
    let mut beat = tokio::time::interval(beat_every);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut facts = tokio::time::interval(cfg.facts_every);
    facts.tick().await;
    // The calls to the servers run beside the loop, never in a branch's
    // body: the fence deadline is polled all the while, so a slow or
    // hung call (a dropped network, a loaded machine) cannot hold the
    // fence back past the TTL, whatever the calls' own bounds add up to.
    let mut renewing: Option<InFlight<(tokio::time::Instant, Renewal)>> = None;
    let mut refreshing: Option<InFlight<Result<(), RemoteError>>> = None;
    let mut outcome: Result<(), RemoteError> = Ok(());
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            res = agent_done(&mut agent) => {
                // The agent only returns on shutdown or a fatal error.
                return match res {
                    Ok(r) => r.map_err(RemoteError::from),
                    Err(e) => Err(RemoteError::AgentTask(e.to_string())),
                };
            }
            () = tokio::time::sleep_until(last_renewal + fence.after), if agent.is_some() => {
                tracing::error!(
                    node = %cfg.node_id,
                    silent_for = ?last_renewal.elapsed(),
                    ttl = ?ttl,
                    "no server has renewed this node's registration: fencing (stopping every instance) before the servers reschedule them elsewhere"
                );
                if let Some(a) = agent.take() {
                    a.stop().await;
                }
                tracing::warn!(node = %cfg.node_id, "fenced; instances start again once a server accepts this node's heartbeat");
            }
            _ = beat.tick(), if renewing.is_none() => {
                let sent = tokio::time::Instant::now();
                let (client, node_record, dir) = (client.clone(), node_record.clone(), cfg.data_dir.clone());
                let call_timeout = fence.call_timeout;
                renewing = Some(Box::pin(async move {
                    (sent, renew(&client, call_timeout, node_record, dir).await)
                }));
            }
            (sent, renewal) = in_flight(&mut renewing) => {
                renewing = None;
                match renewal {
                    Renewal::Renewed => {
                        last_renewal = last_renewal.max(sent);
                        if agent.is_none() {
                            tracing::info!(node = %cfg.node_id, "the servers accept this node again: unfencing (running its assignments)");
                            agent = Some(start_agent());
                        }
                    }
                    Renewal::Failed => {}
                    Renewal::Revoked(e) => {
                        outcome = Err(e);
                        break;
                    }
                }
            }
            res = shipper.failed() => {
                if let Err(e) = res {
                    outcome = Err(e);
                    break;
                }
            }
            _ = facts.tick(), if refreshing.is_none() => {
                let (client, node_record, dir) = (client.clone(), node_record.clone(), cfg.data_dir.clone());
                let call_timeout = fence.call_timeout;
                refreshing = Some(Box::pin(async move {
                    let f = tokio::task::spawn_blocking(move || crate::facts::collect(&dir)).await.unwrap_or_default();
                    match tokio::time::timeout(call_timeout, client.register(&node_record(f))).await {
                        Ok(Ok(_)) => learn_servers(&client).await,
                        Ok(Err(e @ RemoteError::Revoked { .. })) => return Err(e),
                        Ok(Err(e)) => tracing::warn!(error = %e, "cannot refresh facts; retrying"),
                        Err(_) => tracing::warn!("refreshing facts timed out; retrying"),
                    }
                    Ok(())
                }));
            }
            res = in_flight(&mut refreshing) => {
                refreshing = None;
                if let Err(e) = res {
                    outcome = Err(e);
                    break;
                }
            }
        }
    }
    if let Err(RemoteError::Revoked { .. }) = &outcome {
        // The credential is worthless now: the next start must join again.
        let _ = std::fs::remove_file(cfg.data_dir.join(CREDENTIAL_FILE));
        tracing::error!(node = %cfg.node_id, "node removed from the cluster: stopping its instances");
    }
    if let Some(a) = agent {
        a.stop().await;
    }
    if let Some(e) = edge {
        e.stop().await;
    }
    stats.stop().await;
    // The instances' last lines (stopping, exit codes); the local files
    // have them anyway if the server does not answer in time.
    shipper.finish(Duration::from_secs(3)).await;
    outcome
}

/// Ask the current server which servers are alive, so a later failover can
/// reach servers that were not given to `--join`. Best effort: an older
/// server (404) or a failure leaves the list as it is.
async fn learn_servers(client: &ApiClient) {
    match tokio::time::timeout(Duration::from_secs(5), client.list_servers()).await {
        Ok(Ok(live)) if !live.is_empty() => client.servers().learn(live),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "cannot list the servers"),
        Err(_) => tracing::debug!("listing the servers timed out"),
    }
}

/// The agent proper ([`crate::run`]) while this node is not fenced.
struct RunningAgent {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), AgentError>>,
}

impl RunningAgent {
    /// Stop every instance and wait for the agent to end.
    async fn stop(self) {
        self.stop.send_replace(true);
        match self.task.await {
            Ok(Err(e)) => tracing::error!(error = %e, "agent failed while stopping"),
            Err(e) => tracing::error!(error = %e, "agent task failed while stopping"),
            Ok(Ok(())) => {}
        }
    }
}

/// A call to the servers running beside the agent's main loop.
type InFlight<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// The result of `call` once it ends, or never when there is none (a
/// `select!` branch that waits on it stays quiet meanwhile).
async fn in_flight<T>(call: &mut Option<InFlight<T>>) -> T {
    match call {
        Some(c) => c.await,
        None => std::future::pending().await,
    }
}

/// What one heartbeat (and, when the lease had expired, registering again)
/// did.
enum Renewal {
    /// A server renewed (or re-created) the node's lease.
    Renewed,
    /// No server did; the next beat tries again.
    Failed,
    /// The node was removed from the cluster.
    Revoked(RemoteError),
}

/// One heartbeat, each call bounded by `call_timeout`; registers again
/// when the server no longer has the registration (it expired).
async fn renew(
    client: &ApiClient,
    call_timeout: Duration,
    node_record: impl FnOnce(BTreeMap<String, serde_json::Value>) -> Node,
    data_dir: PathBuf,
) -> Renewal {
    match tokio::time::timeout(call_timeout, client.heartbeat_any(call_timeout)).await {
        Err(_) => {
            tracing::warn!("heartbeat timed out; retrying");
            Renewal::Failed
        }
        Ok(Ok(true)) => Renewal::Renewed,
        Ok(Ok(false)) => {
            tracing::warn!("registration expired on the server; registering again");
            let facts = tokio::task::spawn_blocking(move || crate::facts::collect(&data_dir))
                .await
                .unwrap_or_default();
            match tokio::time::timeout(call_timeout, client.register(&node_record(facts))).await {
                Ok(Ok(_)) => Renewal::Renewed,
                Ok(Err(e @ RemoteError::Revoked { .. })) => Renewal::Revoked(e),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot register again; retrying");
                    Renewal::Failed
                }
                Err(_) => {
                    tracing::warn!("registering again timed out; retrying");
                    Renewal::Failed
                }
            }
        }
        Ok(Err(e @ RemoteError::Revoked { .. })) => Renewal::Revoked(e),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "heartbeat failed; retrying");
            Renewal::Failed
        }
    }
}

/// The end of the agent task, or never while fenced.
async fn agent_done(
    agent: &mut Option<RunningAgent>,
) -> Result<Result<(), AgentError>, tokio::task::JoinError> {
    match agent {
        Some(a) => (&mut a.task).await,
        None => std::future::pending().await,
    }
}

/// When a node cut off from the servers stops its own instances.
///
/// The servers reschedule a node's instances `--reschedule-after` after its
/// registration lease (TTL) expired. The agent stops its instances once
/// no renewal succeeded for `after` = TTL − one heartbeat interval, a
/// deadline on the monotonic clock from when the last successful renewal
/// was sent, polled while the calls to the servers are in flight (they
/// never hold it back, however slow). The heartbeat interval is left as
/// slack for a loaded machine: the stop begins before the lease can
/// expire, hence before any replacement exists.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Fence {
    /// Silence after which the node fences itself.
    after: Duration,
    /// Bound of one heartbeat or registration call.
    call_timeout: Duration,
}

impl Fence {
    fn new(ttl: Duration, beat_every: Duration) -> Self {
        // A TTL shorter than two heartbeats (never configured so) still
        // fences at half the TTL rather than at once.
        let call_timeout = beat_every.min(ttl / 2);
        Self {
            after: ttl.saturating_sub(call_timeout),
            call_timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fencing_starts_before_the_lease_can_expire() {
        let f = Fence::new(Duration::from_secs(10), Duration::from_millis(2_500));
        assert_eq!(f.after, Duration::from_millis(7_500));
        assert_eq!(f.call_timeout, Duration::from_millis(2_500));
        // One heartbeat interval of slack before the lease can expire.
        assert!(f.after + f.call_timeout <= Duration::from_secs(10));
        let tiny = Fence::new(Duration::from_millis(600), Duration::from_millis(500));
        assert_eq!(tiny.after, Duration::from_millis(300));
    }

    #[test]
    fn several_join_urls_and_failing_over_between_them() {
        assert_eq!(
            parse_join_urls("http://a:1, http://b:2/").unwrap(),
            ["a:1", "b:2"]
        );
        assert!(parse_join_urls(" , ").is_err());
        assert!(parse_join_urls("http://a:1,b:2").is_err());

        let s = Servers::new(vec!["a:1".into(), "b:2".into()]);
        assert_eq!(s.current(), "a:1");
        assert!(s.failed("a:1"));
        assert_eq!(s.current(), "b:2");
        // A late failure report about the old server changes nothing.
        assert!(!s.failed("a:1"));
        assert_eq!(s.current(), "b:2");
        // Learned servers join the seeds; the current one stays current.
        s.learn(vec!["b:2".into(), "c:3".into()]);
        assert_eq!(s.current(), "b:2");
        assert_eq!(s.len(), 3);
        assert!(s.failed("b:2"));
        assert_eq!(s.current(), "c:3");
        assert!(s.failed("c:3"));
        assert_eq!(s.current(), "a:1", "the seeds stay in the ring");
        let one = Servers::new(vec!["a:1".into()]);
        assert!(!one.failed("a:1"));

        // An agent on another machine does not take the servers' loopback
        // listeners; one that joined over loopback (same host) does.
        let remote = Servers::new(vec!["10.0.0.1:7777".into()]);
        remote.learn(vec![
            "10.0.0.1:7777".into(),
            "127.0.0.1:7777".into(),
            "[::1]:7777".into(),
            "localhost:7778".into(),
            "10.0.0.2:7777".into(),
        ]);
        assert_eq!(remote.len(), 2);
        assert!(remote.failed("10.0.0.1:7777"));
        assert_eq!(remote.current(), "10.0.0.2:7777");
        let local = Servers::new(vec!["127.0.0.1:7777".into()]);
        local.learn(vec!["127.0.0.1:7777".into(), "127.0.0.1:7778".into()]);
        assert_eq!(local.len(), 2);
    }

    /// A server that accepts connections (the kernel does, into the
    /// backlog) and never answers: a stopped or wedged process.
    fn hung_server() -> (std::net::TcpListener, String) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap().to_string();
        (l, a)
    }

    /// A server that answers every request with 200 and `body`.
    async fn live_server(body: &'static str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        a
    }

    #[tokio::test]
    async fn a_heartbeat_leaves_a_hung_server_within_its_budget() {
        let (_hung, hung) = hung_server();
        let live = live_server("{}").await;
        let servers = Arc::new(Servers::new(vec![hung.clone(), live.clone()]));
        let client = ApiClient::with_servers(servers.clone(), "n1".into(), Some("s".into()));
        // A budget of seconds: the live server must answer within what is
        // left of it, which a loaded machine may make slow.
        let t = tokio::time::Instant::now();
        let renewed = client.heartbeat_any(Duration::from_secs(4)).await;
        assert!(matches!(renewed, Ok(true)), "{renewed:?}");
        assert_eq!(servers.current(), live);
        // Half the budget on the hung one, then the live one answers.
        assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
        // Two hung servers use up a beat's budget; the third is not
        // counted as failed for it, and answers the next beat.
        let (_hung2, hung2) = hung_server();
        let three = Arc::new(Servers::new(vec![hung.clone(), hung2, live.clone()]));
        let client3 = ApiClient::with_servers(three.clone(), "n1".into(), Some("s".into()));
        let r = client3.heartbeat_any(Duration::from_millis(400)).await;
        assert!(matches!(r, Err(RemoteError::Unreachable { .. })), "{r:?}");
        assert_eq!(three.current(), live);
        let r = client3.heartbeat_any(Duration::from_secs(4)).await;
        assert!(matches!(r, Ok(true)), "{r:?}");
        // With only the hung server, the whole budget is its, and it fails.
        let alone = ApiClient::with_servers(Arc::new(Servers::new(vec![hung])), "n1".into(), None);
        let t = tokio::time::Instant::now();
        let r = alone.heartbeat_any(Duration::from_millis(300)).await;
        assert!(matches!(r, Err(RemoteError::Unreachable { .. })), "{r:?}");
        assert!(t.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    async fn calls_waiting_on_a_server_the_ring_left_give_up_at_once() {
        let (_hung, hung) = hung_server();
        let live = live_server(r#"{"servers":[]}"#).await;
        let servers = Arc::new(Servers::new(vec![hung.clone(), live.clone()]));
        let client = ApiClient::with_servers(servers.clone(), "n1".into(), Some("s".into()));
        let waiting = tokio::spawn({
            let client = client.clone();
            async move { client.list_servers().await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "the hung server answered?");
        // Another call (the heartbeat) found it hung.
        let t = tokio::time::Instant::now();
        assert!(servers.failed(&hung));
        let r = waiting.await.unwrap();
        // At once: not after the call's own 10 s answer bound (with room for
        // a loaded machine to schedule it).
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        match r {
            Err(RemoteError::Unreachable { message, .. }) => {
                assert!(message.contains("abandoned"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // The retry goes to the live one.
        assert_eq!(client.list_servers().await.unwrap(), Vec::<String>::new());
    }

    #[test]
    fn join_urls() {
        assert_eq!(
            parse_join_url("http://10.0.0.1:7777").unwrap(),
            "10.0.0.1:7777"
        );
        assert_eq!(parse_join_url("http://h:1/").unwrap(), "h:1");
        assert!(parse_join_url("https://h:1").is_err());
        assert!(parse_join_url("h:1").is_err());
        assert!(parse_join_url("http://h").is_err());
        assert!(parse_join_url("http://h:1/v1").is_err());
    }

    #[test]
    fn watch_lines_round_trip() {
        let l = WatchLine::Removed {
            revision: 7,
            key: InstanceKey {
                namespace: "default".into(),
                stack: "s".into(),
                service: "web".into(),
                slot: 2,
            },
        };
        let text = serde_json::to_string(&l).unwrap();
        assert!(text.contains("\"type\":\"removed\""), "{text}");
        assert_eq!(serde_json::from_str::<WatchLine>(&text).unwrap(), l);
    }
}
