//! Servers asking each other: the client side of the `/v1/peer/…` routes.
//!
//! Each server stores the log lines of its own local agent and of the
//! agents that shipped to it, so a logs request on one server asks every
//! other live server (`/berth/servers/<node>`, see [`crate::servers`]) for
//! its own part and merges the answers ([`crate::api::logs`]).
//!
//! # Trust
//! A peer request carries `Authorization: Bearer <peer token>`: a random
//! secret at [`berth_model::keys::PEER_TOKEN`], created by the first server
//! ([`crate::join::ensure_peer_token`]) like the join token. Only readers
//! of the store know it (servers; agents never see the store), and it
//! opens only the peer routes, which read this server's own logs. The
//! answering server names itself in [`NODE_HEADER`], so an address that
//! reaches another server than the record says (a loopback address of a
//! server on another machine) is not mistaken for it.
//!
//! # Bounds
//! A peer that is down or hung costs a request at most
//! [`CONNECT_WITHIN`] per address plus [`HEAD_WITHIN`], and then
//! [`IDLE_WITHIN`] of silence: the request is answered without that
//! peer's lines and says so.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use berth_store::{Store, StoreError};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Method, Request, header};
use hyper_util::rt::TokioIo;

use crate::leader::LeaderRecord;

/// The answering server's node id, on every peer answer.
pub const NODE_HEADER: &str = "berth-node";

/// How long connecting to one of a peer's addresses may take.
pub const CONNECT_WITHIN: Duration = Duration::from_secs(1);
/// How long a peer may take to answer (it reads its past lines first).
pub const HEAD_WITHIN: Duration = Duration::from_secs(5);
/// How long a peer's answer may go without a byte. Followed peer streams
/// send a keep-alive every [`KEEPALIVE`], so a silent one is hung.
pub const IDLE_WITHIN: Duration = Duration::from_secs(10);
/// How often a followed peer stream sends a keep-alive (a blank line).
pub const KEEPALIVE: Duration = Duration::from_secs(2);

/// This server's view of its peers. Cheap to clone; added to the API
/// router as an extension by servers on a shared store (etcd).
#[derive(Clone)]
pub struct Peers {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    node: String,
    token: String,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("node", &self.inner.node)
            .finish_non_exhaustive()
    }
}

impl Peers {
    /// Peers of server `node` on `store`, which present `token` (the peer
    /// token) to each other.
    pub fn new(store: Arc<dyn Store>, node: String, token: String) -> Self {
        Self {
            inner: Arc::new(Inner { store, node, token }),
        }
    }

    /// This server's node id.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// Whether the request carries the peer token.
    pub fn authorized(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::api::bearer_token)
            .is_some_and(|t| {
                crate::api::constant_time_eq(t.as_bytes(), self.inner.token.as_bytes())
            })
    }

    /// Every other live server, by node id.
    pub async fn others(&self) -> Result<Vec<LeaderRecord>, StoreError> {
        let mut all = crate::servers::list(self.inner.store.as_ref()).await?;
        all.retain(|s| s.node != self.inner.node);
        Ok(all)
    }

    /// `GET path` (with its query) from `peer`: its addresses in turn
    /// ([`addresses`]), until one answers 200 as that server. The error
    /// says why none did.
    pub async fn get(&self, peer: &LeaderRecord, path: &str) -> Result<PeerBody, String> {
        self.request(Method::GET, peer, path).await
    }

    /// [`Peers::get`] with another method.
    pub async fn request(
        &self,
        method: Method,
        peer: &LeaderRecord,
        path: &str,
    ) -> Result<PeerBody, String> {
        let addrs = addresses(peer);
        if addrs.is_empty() {
            return Err("it listens on no TCP address".into());
        }
        let mut why = Vec::new();
        for addr in addrs {
            match self.send(method.clone(), addr, &peer.node, path).await {
                Ok(body) => return Ok(body),
                Err(e) => why.push(format!("{addr}: {e}")),
            }
        }
        Err(why.join("; "))
    }

    async fn send(
        &self,
        method: Method,
        addr: SocketAddr,
        node: &str,
        path: &str,
    ) -> Result<PeerBody, String> {
        let stream = tokio::time::timeout(CONNECT_WITHIN, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| format!("not connected within {CONNECT_WITHIN:?}"))?
            .map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        // The connection ends when the answer's body and the sender are
        // dropped (the request is over, or its reader went away).
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, addr.to_string())
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", self.inner.token),
            )
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(HEAD_WITHIN, sender.send_request(req))
            .await
            .map_err(|_| format!("no answer within {HEAD_WITHIN:?}"))?
            .map_err(|e| e.to_string())?;
        let answered_as = resp
            .headers()
            .get(NODE_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let status = resp.status();
        let mut body = PeerBody {
            body: resp.into_body(),
            buf: Vec::new(),
        };
        if !status.is_success() {
            // The error's own JSON says why (bad token, unknown stack…).
            let text = body.rest(IDLE_WITHIN).await.unwrap_or_default();
            return Err(format!(
                "answered {status}: {}",
                String::from_utf8_lossy(&text).trim()
            ));
        }
        if answered_as != node {
            return Err(format!(
                "the server there is {answered_as:?}, not {node:?} (an address of another machine's loopback?)"
            ));
        }
        Ok(body)
    }
}

/// Where to reach `peer`: its specific addresses (others before loopback,
/// which names the peer's machine only when it is this one), then, for a
/// listener on an unspecified address (`0.0.0.0:P`), loopback port P on
/// the chance that it runs here. [`NODE_HEADER`] tells a wrong guess.
pub fn addresses(peer: &LeaderRecord) -> Vec<SocketAddr> {
    let mut specific: Vec<SocketAddr> = peer
        .api
        .iter()
        .filter(|a| !a.ip().is_unspecified())
        .copied()
        .collect();
    specific.sort_by_key(|a| a.ip().is_loopback());
    let guesses = peer
        .api
        .iter()
        .filter(|a| a.ip().is_unspecified())
        .map(|a| {
            let ip: std::net::IpAddr = if a.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            };
            SocketAddr::new(ip, a.port())
        });
    let mut out = specific;
    for g in guesses {
        if !out.contains(&g) {
            out.push(g);
        }
    }
    out
}

/// A peer's answer, read line by line.
pub struct PeerBody {
    body: Incoming,
    buf: Vec<u8>,
}

impl PeerBody {
    /// The next line (without its `\n`; blank keep-alive lines included),
    /// `None` at the end. An error when `idle` passes without a byte, or
    /// the connection breaks. Cancel-safe: what was read stays buffered.
    pub async fn next_line(&mut self, idle: Duration) -> Result<Option<Vec<u8>>, String> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                line.pop();
                return Ok(Some(line));
            }
            match tokio::time::timeout(idle, self.body.frame()).await {
                Err(_) => return Err(format!("silent for {idle:?}")),
                Ok(None) => {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(std::mem::take(&mut self.buf)));
                }
                Ok(Some(Err(e))) => return Err(e.to_string()),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// The rest of the body (an error answer's text).
    async fn rest(&mut self, idle: Duration) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        while let Some(mut line) = self.next_line(idle).await? {
            line.push(b'\n');
            out.extend_from_slice(&line);
            if out.len() > 64 * 1024 {
                break;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(api: &[&str]) -> LeaderRecord {
        LeaderRecord {
            node: "s2".into(),
            api: api
                .iter()
                .map(|a| a.parse().unwrap_or_else(|e| panic!("{a}: {e}")))
                .collect(),
            pid: 1,
            since: 0,
        }
    }

    #[test]
    fn addresses_try_other_hosts_before_loopback_and_guess_loopback_for_unspecified() {
        let r = record(&["127.0.0.1:7001", "10.0.0.2:7002", "0.0.0.0:7003"]);
        let got: Vec<String> = addresses(&r).iter().map(ToString::to_string).collect();
        assert_eq!(got, ["10.0.0.2:7002", "127.0.0.1:7001", "127.0.0.1:7003"]);
        assert!(addresses(&record(&[])).is_empty());
    }
}
