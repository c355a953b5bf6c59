//! The commands. Each takes validated [`Settings`] and its own arguments and
//! returns the process exit code (errors carry theirs, see [`crate::exit`]).

use std::time::{Duration, Instant};

use berth_model::api::{Instance, StackDetail};
use berth_model::{DesiredState, InstanceState, LogLine};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::client::{Client, enc};
use crate::exit::{self, Failure};
use crate::resolve::stack_path;

pub mod actions;
pub mod agent;
pub mod config;
pub mod dashboard;
pub mod deploy;
pub mod events;
pub mod kv;
pub mod logs;
pub mod node;
pub mod nodes;
pub mod ps;
pub mod server;
pub mod services;
pub mod top;
pub mod up;
pub mod version;

/// Append the next frame of a streamed response to `buf`; `false` at the
/// end of the stream. A broken stream is the server gone (exit code 3).
pub(crate) async fn read_frame(body: &mut Incoming, buf: &mut Vec<u8>) -> anyhow::Result<bool> {
    match body.frame().await {
        None => Ok(false),
        Some(Err(e)) => Err(Failure::with_code(
            exit::NO_SERVER,
            format!("lost the connection to the berth server: {e}"),
        )),
        Some(Ok(frame)) => {
            if let Ok(data) = frame.into_data() {
                buf.extend_from_slice(&data);
            }
            Ok(true)
        }
    }
}

/// Say on stderr which servers' lines a logs answer lacks: with several
/// servers, the one asked merges every other's, and names in
/// `Berth-Missing-Server` (`<node>: <why>`) each that did not answer.
pub(crate) fn warn_missing_servers(headers: &hyper::HeaderMap) {
    for v in headers.get_all("berth-missing-server") {
        let text = String::from_utf8_lossy(v.as_bytes());
        let (node, why) = text.split_once(": ").unwrap_or((&text, "no reason given"));
        eprintln!(
            "warning: server {node} did not answer ({why}): the log lines stored there are missing"
        );
    }
}

/// Reads NDJSON log lines off a streaming response body.
pub struct LineReader {
    body: Incoming,
    buf: Vec<u8>,
}

impl LineReader {
    /// Wrap a response body.
    pub fn new(body: Incoming) -> Self {
        Self {
            body,
            buf: Vec::new(),
        }
    }

    /// The next line, `None` at the end of the stream. Cancel-safe: partial
    /// data stays buffered in `self`.
    pub async fn next(&mut self) -> anyhow::Result<Option<LogLine>> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let parsed = serde_json::from_slice(&line)
                    .map_err(|e| anyhow::anyhow!("bad log line from the server: {e}"))?;
                return Ok(Some(parsed));
            }
            if !read_frame(&mut self.body, &mut self.buf).await? {
                return Ok(None);
            }
        }
    }
}

/// The instances of one stack.
pub async fn stack_instances(
    client: &Client,
    ns: &str,
    stack: &str,
) -> anyhow::Result<Vec<Instance>> {
    client
        .get(&format!(
            "/v1/instances?namespace={}&stack={}",
            enc(ns),
            enc(stack)
        ))
        .await
}

/// The desired state and instances of one stack.
pub async fn stack_detail(client: &Client, ns: &str, stack: &str) -> anyhow::Result<StackDetail> {
    client.get(&stack_path(ns, stack)).await
}

/// An instance that is down for good: not wanted running, and not running.
pub fn is_down(i: &Instance) -> bool {
    i.desired != Some(DesiredState::Running)
        && matches!(
            i.state,
            InstanceState::Stopped
                | InstanceState::Exited
                | InstanceState::Failed
                | InstanceState::Pending
        )
}

/// Poll until every instance of the listed services (all when empty) is
/// down; returns the ones still up at the timeout.
pub async fn wait_down(
    client: &Client,
    ns: &str,
    stack: &str,
    services: &[String],
    timeout: Duration,
) -> anyhow::Result<Vec<Instance>> {
    let deadline = Instant::now() + timeout;
    loop {
        let up: Vec<Instance> = stack_instances(client, ns, stack)
            .await?
            .into_iter()
            .filter(|i| services.is_empty() || services.contains(&i.service))
            .filter(|i| !is_down(i))
            .collect();
        if up.is_empty() || Instant::now() >= deadline {
            return Ok(up);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
