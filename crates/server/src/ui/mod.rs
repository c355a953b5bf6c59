//! The web dashboard at `/ui`: a static front end embedded in the binary,
//! and the guard that decides which browser requests may reach the API.
//!
//! # Choice
//! The front end is three hand-written files (`assets/`: HTML, CSS, vanilla
//! JavaScript) compiled into the binary with `include_str!`. There is no
//! build step and no npm: the page is a small single-page app that renders
//! from the same JSON API the CLI uses, and follows state over SSE
//! (`GET /v1/stacks/{ns}/{stack}/watch`, and `GET /v1/events` when the
//! server has it). Serving static files keeps every byte of state behind the
//! API's one auth check instead of a second, server-rendered path.
//!
//! # Auth
//! The page itself holds no data and is served to anyone. The API token is
//! typed into a login form and kept in `sessionStorage`; every API call
//! sends it as `Authorization: Bearer`, never in a URL. Because credentials
//! are never ambient (no cookie), a cross-site page cannot make the browser
//! send them. [`protect`] adds what the listener's own token check does not
//! cover:
//! - a request a browser made (it carries `Sec-Fetch-Site` or `Origin`) to
//!   a loopback listener must carry the token too, unless the server runs
//!   with the dashboard's auth explicitly off ([`DashboardAuth::Off`],
//!   loopback only). This defeats DNS rebinding and pages on other origins
//!   that probe `127.0.0.1`. Non-browser clients (the CLI, curl) are not
//!   affected: loopback stays open to them as before;
//! - a state-changing request from another site (`Sec-Fetch-Site:
//!   cross-site`/`same-site`, or an `Origin` that is not this host) is
//!   refused whatever credentials it has;
//! - with auth off, a browser request's `Host` must be a loopback name, so a
//!   rebound DNS name cannot reach the API.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

pub mod api;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// Whether browsers must present the API token on loopback listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DashboardAuth {
    /// The token is needed (the default).
    #[default]
    Required,
    /// Loopback listeners serve browsers without the token (`berth server
    /// --dashboard-no-auth`); refused by the server when any listener is not
    /// loopback.
    Off,
}

/// The path the dashboard is served under.
pub const PATH: &str = "/ui/";

/// The dashboard's URL on an API address.
pub fn url(addr: &std::net::SocketAddr) -> String {
    format!("http://{addr}{PATH}")
}

/// Routes serving the front end. They carry no state, so they need no token.
pub fn router() -> Router {
    Router::new()
        .route("/ui", get(|| async { redirect_to_ui() }))
        .route(
            "/ui/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/ui/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
}

fn redirect_to_ui() -> Response {
    (StatusCode::PERMANENT_REDIRECT, [(header::LOCATION, PATH)]).into_response()
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Scripts only from this origin and never inline: an injected
            // string cannot run and read the token from sessionStorage.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                 connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// What [`protect`] checks against.
#[derive(Debug, Clone)]
pub struct Guard {
    /// The server's API token.
    pub token: String,
    /// Whether the listener is loopback (remote listeners already require
    /// the token on every request).
    pub loopback: bool,
    /// The dashboard's auth setting.
    pub auth: DashboardAuth,
}

/// `router` (the API, maybe already token-checked) plus the dashboard, behind
/// the browser guard described in the module docs.
pub fn with_dashboard(api: Router, guard: Guard) -> Router {
    router()
        .merge(api)
        .layer(middleware::from_fn_with_state(Arc::new(guard), protect))
}

/// Why a browser request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A state-changing request from another site.
    CrossSite,
    /// A browser request without the token.
    NoToken,
    /// A browser request with auth off whose `Host` is not loopback.
    ForeignHost,
}

/// The decision of [`protect`], pure so it can be tested header by header.
pub fn check(
    guard: &Guard,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Result<(), Refusal> {
    let fetch_site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let browser = fetch_site.is_some() || origin.is_some();
    if !browser {
        return Ok(());
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let safe = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe {
        let cross = matches!(fetch_site, Some("cross-site" | "same-site"))
            || origin.is_some_and(|o| origin_host(o) != Some(host));
        if cross {
            return Err(Refusal::CrossSite);
        }
    }
    // The front end's own files hold no data.
    if path == "/ui" || path.starts_with(PATH) {
        return Ok(());
    }
    if !guard.loopback {
        // The API router below checks the token on every request.
        return Ok(());
    }
    match guard.auth {
        DashboardAuth::Off => {
            if loopback_host(host) {
                Ok(())
            } else {
                Err(Refusal::ForeignHost)
            }
        }
        DashboardAuth::Required => {
            let presented = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim_start().split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, t)| t.trim());
            match presented {
                Some(p) if constant_time_eq(p.as_bytes(), guard.token.as_bytes()) => Ok(()),
                _ => Err(Refusal::NoToken),
            }
        }
    }
}

async fn protect(State(guard): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    match check(&guard, req.method(), req.uri().path(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(Refusal::NoToken) => crate::api::ApiError::Unauthorized.into_response(),
        Err(r) => {
            let msg = match r {
                Refusal::CrossSite => {
                    "cross-site request refused: state-changing requests must come from the dashboard's own origin"
                }
                _ => {
                    "request refused: with the dashboard's auth off, use http://127.0.0.1:<port>/ui/ or http://localhost:<port>/ui/"
                }
            };
            let mut resp = (
                StatusCode::FORBIDDEN,
                axum::Json(berth_model::api::ErrorBody {
                    error: msg.to_owned(),
                    hint: None,
                }),
            )
                .into_response();
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }
    }
}

/// `host[:port]` of an `Origin` value (`scheme://host[:port]`).
fn origin_host(origin: &str) -> Option<&str> {
    origin
        .split_once("://")
        .map(|(_, rest)| rest.trim_end_matches('/'))
}

fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(auth: DashboardAuth) -> Guard {
        Guard {
            token: "s3cret".into(),
            loopback: true,
            auth,
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn cli_requests_pass_on_loopback() {
        let g = guard(DashboardAuth::Required);
        let h = headers(&[("host", "127.0.0.1:4000")]);
        assert_eq!(check(&g, &Method::POST, "/v1/stacks/d/s/scale", &h), Ok(()));
    }

    #[test]
    fn browser_requests_need_the_token_on_loopback() {
        let g = guard(DashboardAuth::Required);
        let h = headers(&[
            ("host", "127.0.0.1:4000"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert_eq!(
            check(&g, &Method::GET, "/v1/stacks", &h),
            Err(Refusal::NoToken)
        );
        assert_eq!(check(&g, &Method::GET, "/ui/app.js", &h), Ok(()));
        let h = headers(&[
            ("host", "127.0.0.1:4000"),
            ("sec-fetch-site", "same-origin"),
            ("authorization", "Bearer s3cret"),
        ]);
        assert_eq!(check(&g, &Method::GET, "/v1/stacks", &h), Ok(()));
        let h = headers(&[
            ("host", "127.0.0.1:4000"),
            ("authorization", "Bearer nope"),
            ("origin", "http://127.0.0.1:4000"),
        ]);
        assert_eq!(
            check(&g, &Method::POST, "/v1/stacks/d/s/scale", &h),
            Err(Refusal::NoToken)
        );
    }

    #[test]
    fn cross_site_writes_are_refused_even_with_the_token() {
        let g = guard(DashboardAuth::Required);
        let h = headers(&[
            ("host", "127.0.0.1:4000"),
            ("origin", "http://evil.example"),
            ("authorization", "Bearer s3cret"),
        ]);
        assert_eq!(
            check(&g, &Method::POST, "/v1/stacks/d/s/scale", &h),
            Err(Refusal::CrossSite)
        );
        let h = headers(&[
            ("host", "127.0.0.1:4000"),
            ("sec-fetch-site", "cross-site"),
            ("authorization", "Bearer s3cret"),
        ]);
        assert_eq!(
            check(&g, &Method::DELETE, "/v1/kv/a", &h),
            Err(Refusal::CrossSite)
        );
        let remote = Guard {
            loopback: false,
            ..g
        };
        assert_eq!(
            check(&remote, &Method::DELETE, "/v1/kv/a", &h),
            Err(Refusal::CrossSite)
        );
    }

    #[test]
    fn auth_off_still_refuses_foreign_hosts() {
        let g = guard(DashboardAuth::Off);
        let h = headers(&[
            ("host", "localhost:4000"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert_eq!(check(&g, &Method::GET, "/v1/stacks", &h), Ok(()));
        let h = headers(&[("host", "[::1]:4000"), ("sec-fetch-site", "same-origin")]);
        assert_eq!(check(&g, &Method::GET, "/v1/stacks", &h), Ok(()));
        let h = headers(&[
            ("host", "rebound.example:4000"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert_eq!(
            check(&g, &Method::GET, "/v1/stacks", &h),
            Err(Refusal::ForeignHost)
        );
    }
}
