//! berth's HTTP API (`/v1/...`, JSON), its listeners and its auth.
//!
//! # Layout
//! - [`router`] builds the axum router over an [`ApiContext`]; the route
//!   table it is built from is also returned by [`routes`], which a test
//!   checks against the OpenAPI description served at `GET /v1/openapi.json`.
//! - [`stacks`]: stack summaries, submit, detail, remove, and the
//!   scale/stop/start/restart actions. Every write goes through
//!   [`crate::desired::apply`]: the API writes only desired state.
//! - [`releases`]: the deploy plan (dry run), release history, rollback
//!   and config vars.
//! - [`instances`]: the join of assignments (desired placement) with
//!   instance statuses (actual state) that `berth ps` shows.
//! - [`logs`]: past and followed logs as an NDJSON stream, merged across
//!   servers (`/v1/peer/…`, the peer token: see [`crate::peers`]).
//! - [`metrics`]: `GET /metrics` (Prometheus) and the built-in history;
//!   [`events`]: the event log as JSON pages or SSE.
//! - [`services`]: the catalog per service (`berth services`) and the
//!   Prometheus HTTP service-discovery endpoint.
//! - [`watch`]: a stack's state as Server-Sent Events (the dashboard's live
//!   views); the dashboard's other read routes are in [`crate::ui::api`].
//! - [`kv`] and [`consul`]: the KV store (`/v1/kv/*`) and the
//!   Consul-compatible subset (catalog, health, sessions, agent, status).
//! - [`nodes`]: `berth nodes`, drain / activate / remove, the join token.
//! - [`agent`]: the agents' routes (`/v1/agent/…`), which take the join
//!   token or a node's own credential instead of the admin token.
//! - [`error`]: the one place errors become HTTP statuses.
//! - [`serve_unix`], [`serve_tcp`]: listeners with graceful shutdown;
//!   [`load_or_create_token`] and the bearer-token check for listeners that
//!   are reachable from other machines.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::handler::Handler;
use axum::http::{Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, on};
use berth_store::Store;

pub mod agent;
pub mod consul;
pub mod error;
pub mod events;
pub mod instances;
pub mod kv;
pub mod logs;
pub mod metrics;
pub mod nodes;
pub mod releases;
pub mod services;
pub mod stacks;
pub mod time;
pub mod watch;

pub use error::ApiError;

/// The OpenAPI 3 description of every route, served at `GET /v1/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct ApiContext {
    /// The store (desired and actual state).
    pub store: Arc<dyn Store>,
    /// Captured logs of this node's instances.
    pub logs: berth_agent::logs::LogStore,
    /// The server's data dir (token, volumes).
    pub data_dir: PathBuf,
    /// The local node's id.
    pub node_id: String,
    /// When `Some`, every request on this router must carry
    /// `Authorization: Bearer <token>`.
    pub token: Option<String>,
}

/// JSON body extractor whose rejections go through [`ApiError`], so a bad body
/// gets the same JSON error shape as everything else.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// Query extractor whose rejections go through [`ApiError`].
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// Path extractor whose rejections go through [`ApiError`] (a
/// `releases/v3` where a number belongs, or a segment that is not UTF-8).
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(e: axum::extract::rejection::PathRejection) -> Self {
        ApiError::bad_request(
            format!("bad path: {}", e.body_text()),
            "see GET /v1/openapi.json for the routes and their parameters",
        )
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(e: axum::extract::rejection::JsonRejection) -> Self {
        ApiError::bad_request(
            format!("bad request body: {}", e.body_text()),
            "see GET /v1/openapi.json for the expected shape",
        )
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(e: axum::extract::rejection::QueryRejection) -> Self {
        ApiError::bad_request(
            format!("bad query string: {}", e.body_text()),
            "see GET /v1/openapi.json for the parameters",
        )
    }
}

/// Builds the router while recording each (method, path) it registers, so the
/// route table cannot drift from the router.
struct Routes {
    router: Router<ApiContext>,
    table: Vec<(Method, &'static str)>,
}

impl Routes {
    fn add<H, T>(mut self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, ApiContext>,
        T: 'static,
    {
        let filter = match MethodFilter::try_from(method.clone()) {
            Ok(f) => f,
            // Only the constant methods below are ever passed.
            Err(_) => MethodFilter::GET,
        };
        self.router = self.router.route(path, on(filter, handler));
        self.table.push((method, path));
        self
    }
}

impl Routes {
    fn then(self, f: impl FnOnce(Self) -> Self) -> Self {
        f(self)
    }
}

fn build() -> Routes {
    let r = Routes {
        router: Router::new(),
        table: Vec::new(),
    };
    r.add(Method::GET, "/v1/health", health)
        .add(Method::GET, "/v1/leader", crate::leader::status)
        .add(Method::GET, "/v1/servers", crate::servers::handler)
        .add(Method::GET, "/v1/openapi.json", openapi)
        .add(Method::GET, "/v1/stacks", stacks::list)
        .add(Method::POST, "/v1/stacks", stacks::submit)
        .add(Method::GET, "/v1/stacks/{ns}/{stack}", stacks::detail)
        .add(Method::DELETE, "/v1/stacks/{ns}/{stack}", stacks::remove)
        .add(Method::POST, "/v1/stacks/{ns}/{stack}/scale", stacks::scale)
        .add(Method::POST, "/v1/stacks/{ns}/{stack}/stop", stacks::stop)
        .add(Method::POST, "/v1/stacks/{ns}/{stack}/start", stacks::start)
        .add(
            Method::POST,
            "/v1/stacks/{ns}/{stack}/restart",
            stacks::restart,
        )
        .add(Method::GET, "/v1/stacks/{ns}/{stack}/logs", logs::stream)
        .add(Method::POST, "/v1/stacks/plan", releases::plan)
        .add(
            Method::GET,
            "/v1/stacks/{ns}/{stack}/releases",
            releases::list,
        )
        .add(
            Method::POST,
            "/v1/stacks/{ns}/{stack}/rollback",
            releases::rollback,
        )
        .add(Method::POST, "/v1/stacks/{ns}/{stack}/env", releases::env)
        .add(Method::GET, "/v1/instances", instances::list)
        .add(Method::GET, "/metrics", metrics::scrape)
        .add(Method::GET, "/v1/events", events::events)
        .add(
            Method::GET,
            "/v1/stacks/{ns}/{stack}/history",
            metrics::history,
        )
        .add(Method::GET, "/v1/services", services::list)
        .add(Method::GET, "/v1/sd/prometheus", services::prometheus)
        .add(Method::GET, "/v1/nodes", nodes::list)
        .add(Method::POST, "/v1/nodes/{node}/drain", nodes::drain)
        .add(Method::POST, "/v1/nodes/{node}/activate", nodes::activate)
        .add(Method::DELETE, "/v1/nodes/{node}", nodes::remove)
        .add(Method::GET, "/v1/join-token", nodes::join_token)
        .add(
            Method::POST,
            "/v1/join-token/rotate",
            nodes::rotate_join_token,
        )
        .add(Method::GET, "/v1/stacks/{ns}/{stack}/watch", watch::stack)
        .add(
            Method::GET,
            "/v1/stacks/{ns}/{stack}/releases/{version}",
            crate::ui::api::release,
        )
        .add(Method::GET, "/v1/network", crate::ui::api::network)
        .then(consul::add_routes)
}

/// The agents' and servers' routes: never behind the admin token (they
/// check the join token, the node's credential or the peer token
/// themselves, on every listener).
fn build_agent() -> Routes {
    let r = Routes {
        router: Router::new(),
        table: Vec::new(),
    };
    r.add(Method::POST, "/v1/agent/join", agent::join_cluster)
        .add(Method::PUT, "/v1/agent/nodes/{node}", agent::register)
        .add(
            Method::POST,
            "/v1/agent/nodes/{node}/heartbeat",
            agent::heartbeat,
        )
        .add(
            Method::GET,
            "/v1/agent/nodes/{node}/assignments",
            agent::assignments,
        )
        .add(
            Method::GET,
            "/v1/agent/nodes/{node}/assignments/watch",
            agent::watch,
        )
        .add(
            Method::POST,
            "/v1/agent/nodes/{node}/statuses",
            agent::statuses,
        )
        .add(Method::POST, "/v1/agent/nodes/{node}/forget", agent::forget)
        .add(
            Method::GET,
            "/v1/agent/nodes/{node}/servers",
            agent::servers,
        )
        .add(Method::POST, "/v1/agent/nodes/{node}/logs", agent::logs)
        .add(
            Method::GET,
            "/v1/agent/nodes/{node}/edge/watch",
            agent::edge_watch,
        )
        .add(Method::POST, "/v1/agent/nodes/{node}/stats", agent::stats)
        // Servers asking each other: the peer token, checked by the route.
        .add(
            Method::GET,
            "/v1/peer/stacks/{ns}/{stack}/logs",
            logs::peer_stream,
        )
        .add(
            Method::DELETE,
            "/v1/peer/stacks/{ns}/{stack}/logs",
            logs::peer_remove,
        )
}

/// Every (method, path) the router serves, in axum's path syntax.
pub fn routes() -> Vec<(Method, &'static str)> {
    let mut table = build().table;
    table.extend(build_agent().table);
    table
}

/// The API router. When `ctx.token` is set, every request needs the token.
pub fn router(ctx: ApiContext) -> Router {
    // Agents' routes take the join token or a node credential, not the
    // admin token, so they sit outside the admin auth layer.
    let agent_routes = build_agent().router.with_state(ctx.clone());
    agent_routes.merge(with_auth(build().router, ctx))
}

/// Only the Consul-compatible subset (KV, catalog, health, sessions, agent,
/// status), for the optional listener on Consul's own port
/// (`berth server --consul-listen`), where Consul clients look by default.
/// When `ctx.token` is set, requests need it as a bearer token or as
/// `X-Consul-Token`, the header Consul clients send.
pub fn consul_router(ctx: ApiContext) -> Router {
    let r = Routes {
        router: Router::new(),
        table: Vec::new(),
    };
    with_auth(consul::add_routes(r).router, ctx)
}

fn with_auth(router: Router<ApiContext>, ctx: ApiContext) -> Router {
    let token = ctx.token.clone();
    let router = router
        .fallback(|| async {
            ApiError::NotFound("no such API route (see GET /v1/openapi.json)".into())
        })
        .with_state(ctx);
    match token {
        Some(token) => router.layer(middleware::from_fn_with_state(
            Arc::new(token),
            require_token,
        )),
        None => router,
    }
}

async fn require_token(State(token): State<Arc<String>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .or_else(|| {
            req.headers()
                .get("x-consul-token")
                .and_then(|v| v.to_str().ok())
        });
    match presented {
        Some(p) if constant_time_eq(p.as_bytes(), token.as_bytes()) => next.run(req).await,
        _ => ApiError::Unauthorized.into_response(),
    }
}

/// The credentials of an `Authorization: Bearer <token>` value. The scheme
/// is case-insensitive (RFC 7235 §2.1), so `bearer` and `BEARER` work too.
pub(crate) fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Compares in time that depends only on the lengths, so a remote client
/// cannot find the token byte by byte from response times.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether a TCP listener on this address must require the token: anything
/// but loopback is reachable from other machines.
pub fn token_required(addr: &SocketAddr) -> bool {
    !addr.ip().is_loopback()
}

async fn health(State(ctx): State<ApiContext>) -> axum::Json<berth_model::api::HealthResponse> {
    axum::Json(berth_model::api::HealthResponse {
        ok: true,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
        node: ctx.node_id.clone(),
    })
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON)
}

/// The server's one clock, for `updated_at` and uptimes.
pub use crate::now_ms;

/// Serve the API on a Unix socket (mode 0600) until `shutdown` resolves.
/// A stale socket file left by a killed server is removed first.
pub async fn serve_unix(
    path: &Path,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serve the API on a bound TCP listener until `shutdown` resolves.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// The API token: read from `<data_dir>/token`, or created there (32 random
/// bytes, hex, mode 0600) at first start.
pub fn load_or_create_token(data_dir: &Path) -> io::Result<String> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;

    let path = data_dir.join("token");
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::create_dir_all(data_dir)?;
    // Write to a private temp file then rename, so a crash never leaves a
    // half-written token and the file is never readable by others.
    let tmp = data_dir.join("token.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(token.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(token)
}
