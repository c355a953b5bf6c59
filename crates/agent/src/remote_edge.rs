//! The edge of a joined node: its router, DNS server and TCP proxy
//! ([`crate::edge`]) fed from `GET /v1/agent/nodes/{node}/edge/watch`.
//!
//! The watch sends the whole [`EdgeTables`] whenever they change (and at
//! connect, unless the tag the agent already has is current) and a progress
//! line every few seconds. When the connection breaks or goes silent, the
//! agent reconnects with back-off and **keeps serving the last tables** in
//! the meantime: a node cut off from the servers still routes to the
//! instances it last knew healthy (its own are stopped by self-fencing, and
//! the router retries another instance when one refuses a connection).
//!
//! Runs independently of fencing: a fenced node stops its instances, not its
//! edge.

use std::sync::Arc;
use std::time::Duration;

use berth_model::edge::{EdgeLine, EdgeTables};
use http_body_util::BodyExt;
use hyper::Method;
use hyper::body::Incoming;
use tokio::sync::watch;

use crate::edge::{EdgeConfig, EdgeMeters, RunningEdge};
use crate::remote::ApiClient;

/// How long the watch may stay silent: the server sends a progress line
/// every 5 s, so two missed ones mean the connection is dead.
const SILENCE: Duration = Duration::from_secs(12);
/// Reconnection back-off bounds.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// A joined node's running edge and the task following the servers' tables.
/// Dropped without [`RemoteEdge::stop`] (the agent ending on an error), it
/// still tells the router's threads and the other parts to stop.
pub struct RemoteEdge {
    stop: watch::Sender<bool>,
    /// `None` once stopped.
    parts: Option<(RunningEdge, tokio::task::JoinHandle<()>)>,
}

impl Drop for RemoteEdge {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

impl RemoteEdge {
    /// Start what `cfg` asks for (`None` when it asks for nothing) and
    /// follow the tables through `client`.
    pub async fn start(cfg: &EdgeConfig, client: ApiClient) -> Option<Self> {
        if cfg.http.is_none() && cfg.dns.is_none() && !cfg.proxy {
            return None;
        }
        let (stop, stop_rx) = watch::channel(false);
        let (tx, rx) = watch::channel(Arc::new(EdgeTables::default()));
        let edge = crate::edge::start(cfg, rx, stop_rx.clone()).await;
        let follower = tokio::spawn(follow(client, tx, stop_rx));
        Some(Self {
            stop,
            parts: Some((edge, follower)),
        })
    }

    /// Handles on its router's and DNS server's counters.
    pub fn meters(&self) -> EdgeMeters {
        self.parts
            .as_ref()
            .map(|(edge, _)| edge.meters())
            .unwrap_or_default()
    }

    /// Stop the router, DNS and proxy (connections in flight get the
    /// router's shutdown grace) and the follower.
    pub async fn stop(mut self) {
        self.stop.send_replace(true);
        if let Some((edge, follower)) = self.parts.take() {
            if let Err(e) = edge.wait().await {
                tracing::error!(error = %e, "the node's edge failed while stopping");
            }
            let _ = follower.await;
        }
    }
}

/// Follow the edge watch into `tx` until `stop` turns true.
pub async fn follow(
    client: ApiClient,
    tx: watch::Sender<Arc<EdgeTables>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut have: Option<String> = None;
    let mut retry = RETRY_MIN;
    let mut failing = false;
    loop {
        let outcome = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            r = follow_once(&client, &tx, &mut have) => r,
        };
        let Err(e) = outcome;
        if e.connected {
            // It had been working: reconnect quickly, and say so once.
            retry = RETRY_MIN;
            failing = false;
        }
        if failing {
            tracing::debug!(error = %e, "edge tables watch still broken");
        } else {
            tracing::warn!(error = %e, "edge tables watch broke; serving the last tables while reconnecting");
            failing = true;
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(RETRY_MAX);
    }
}

/// Why one connection ended.
#[derive(Debug)]
struct Broken {
    /// Whether the server had answered 200 before it broke.
    connected: bool,
    message: String,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// One connection: connect, then apply lines until it breaks (never `Ok`).
async fn follow_once(
    client: &ApiClient,
    tx: &watch::Sender<Arc<EdgeTables>>,
    have: &mut Option<String>,
) -> Result<std::convert::Infallible, Broken> {
    let broken = |connected, message: String| Broken { connected, message };
    let path = match have {
        Some(tag) => client.node_path(&format!("/edge/watch?have={tag}")),
        None => client.node_path("/edge/watch"),
    };
    let crate::remote::Reply { server, resp } =
        tokio::time::timeout(SILENCE, client.send(Method::GET, &path, None))
            .await
            .map_err(|_| broken(false, "connecting timed out".into()))?
            .map_err(|e| broken(false, e))?;
    if !resp.status().is_success() {
        return Err(broken(false, crate::remote::failure(resp).await));
    }
    let mut body: Incoming = resp.into_body();
    let mut buf: Vec<u8> = Vec::new();
    loop {
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<EdgeLine>(&line) {
                Ok(EdgeLine::Tables { etag, tables }) => {
                    tracing::debug!(%etag, routes = tables.routes.len(), proxies = tables.proxies.len(), "edge tables updated");
                    tx.send_replace(Arc::new(*tables));
                    *have = Some(etag);
                }
                Ok(EdgeLine::Progress) => {}
                Err(e) => {
                    return Err(broken(
                        true,
                        format!("bad edge watch line from the server (version mismatch?): {e}"),
                    ));
                }
            }
        }
        let frame = tokio::select! {
            f = tokio::time::timeout(SILENCE, body.frame()) => f,
            // The agent's other calls found this server dead or hung.
            () = client.servers().left(&server) => {
                return Err(broken(true, format!("leaving {server} for {}", client.servers().current())));
            }
        };
        match frame {
            Err(_) => return Err(broken(true, "the edge watch went silent".into())),
            Ok(None) => return Err(broken(true, "the server ended the edge watch".into())),
            Ok(Some(Err(e))) => return Err(broken(true, e.to_string())),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
        }
    }
}
