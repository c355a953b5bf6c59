//! The API client: HTTP/1.1 over the data dir's Unix socket, or over TCP to
//! `BERTH_ADDR`, with hyper's connection API (one connection per request —
//! the CLI makes few).
//!
//! Non-2xx answers carry `{ "error", "hint" }`; they become [`Failure`]s
//! with the exit code their status means (400 → 2, 404 → 4, else 1), and a
//! connection failure becomes exit code 3.

use std::path::PathBuf;

use anyhow::Context;
use berth_model::api::ErrorBody;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::exit::{self, Failure};

/// Where the server is.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// The data dir's socket.
    Unix {
        /// Socket path.
        socket: PathBuf,
        /// Data dir (for messages).
        data_dir: PathBuf,
    },
    /// A TCP address (`BERTH_ADDR`).
    Tcp {
        /// `host:port`.
        authority: String,
        /// Bearer token.
        token: Option<String>,
    },
}

/// A client of one server.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: Endpoint,
}

impl Client {
    /// A client for `endpoint`.
    pub fn new(endpoint: Endpoint) -> Self {
        Self { endpoint }
    }

    /// Where it talks to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    fn no_server(&self, cause: &dyn std::fmt::Display) -> anyhow::Error {
        let message = match &self.endpoint {
            Endpoint::Unix { data_dir, .. } => format!(
                "no berth server running for data dir {} (start one with `berth up` or `berth server`)",
                data_dir.display()
            ),
            Endpoint::Tcp { authority, .. } => {
                format!("cannot connect to the berth server at {authority}: {cause}")
            }
        };
        Failure::with_code(exit::NO_SERVER, message)
    }

    /// Send a request; the response body is left to the caller (streaming).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<Response<Incoming>> {
        let mut builder = Request::builder().method(method).uri(path);
        let io = match &self.endpoint {
            Endpoint::Unix { socket, .. } => {
                builder = builder.header(header::HOST, "localhost");
                let stream = tokio::net::UnixStream::connect(socket)
                    .await
                    .map_err(|e| self.no_server(&e))?;
                Io::Unix(TokioIo::new(stream))
            }
            Endpoint::Tcp { authority, token } => {
                builder = builder.header(header::HOST, authority.as_str());
                if let Some(t) = token {
                    builder = builder.header(header::AUTHORIZATION, format!("Bearer {t}"));
                }
                let stream = tokio::net::TcpStream::connect(authority.as_str())
                    .await
                    .map_err(|e| self.no_server(&e))?;
                Io::Tcp(TokioIo::new(stream))
            }
        };
        let req = match body {
            Some(b) => builder
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(b))),
            None => builder.body(Full::new(Bytes::new())),
        }
        .context("building the request")?;
        let resp = match io {
            Io::Unix(io) => handshake_and_send(io, req).await,
            Io::Tcp(io) => handshake_and_send(io, req).await,
        }
        .map_err(|e| self.no_server(&e))?;
        Ok(resp)
    }

    /// Send and decode a JSON answer, turning error answers into failures.
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<T> {
        let body = body.map(serde_json::to_vec).transpose()?;
        let resp = self.send(method, path, body).await?;
        let resp = check(resp).await?;
        let bytes = resp
            .into_body()
            .collect()
            .await
            .context("reading the server's answer")?
            .to_bytes();
        serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "the server's answer to {path} is not what this berth expects (version mismatch?)"
            )
        })
    }

    /// GET and decode JSON.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call::<(), T>(Method::GET, path, None).await
    }

    /// POST JSON and decode JSON.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// Whether a server answers `/v1/health`.
    pub async fn is_up(&self) -> bool {
        self.get::<berth_model::api::HealthResponse>("/v1/health")
            .await
            .is_ok()
    }
}

enum Io {
    Unix(TokioIo<tokio::net::UnixStream>),
    Tcp(TokioIo<tokio::net::TcpStream>),
}

async fn handshake_and_send<T>(
    io: T,
    req: Request<Full<Bytes>>,
) -> Result<Response<Incoming>, hyper::Error>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    // The connection future drives the socket until the response body is
    // read; its errors also surface on the response or body, so they are
    // seen by whoever reads them.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(req).await
}

/// Turn a non-2xx answer into a [`Failure`] carrying the server's message.
pub async fn check(resp: Response<Incoming>) -> anyhow::Result<Response<Incoming>> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let (error, hint) = match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(b) => (b.error, b.hint),
        Err(_) => (String::from_utf8_lossy(&bytes).trim().to_owned(), None),
    };
    let code = match status {
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => exit::BAD_INPUT,
        StatusCode::NOT_FOUND => exit::NOT_FOUND,
        _ => exit::GENERIC,
    };
    let mut message = if error.is_empty() {
        format!("server answered {status}")
    } else {
        error
    };
    if let Some(hint) = hint {
        message.push_str(&format!("\n  hint: {hint}"));
    }
    Err(Failure::with_code(code, message))
}

/// Percent-encode a query value or path segment.
pub fn enc(s: &str) -> String {
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
