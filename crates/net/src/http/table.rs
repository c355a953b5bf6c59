//! The route table: what the server hands the router, and how a request
//! finds its route.
//!
//! [`RouteTable`] is the plain, comparable description the server builds
//! from the catalog. The router compiles it into a [`Compiled`] lookup
//! structure (hosts lower-cased into a hash map, path prefixes sorted
//! longest first) once per table change, so a request pays for one hash
//! lookup and a few prefix comparisons, never for sorting or allocation.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::http::balance::ServiceState;
use crate::http::metrics::RequestCounters;

/// A service's identity across namespaces and stacks.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceId {
    /// Namespace (`default`, `staging`, …).
    pub namespace: String,
    /// Stack name.
    pub stack: String,
    /// Service name within the stack.
    pub service: String,
}

impl ServiceId {
    /// Shorthand constructor.
    pub fn new(
        namespace: impl Into<String>,
        stack: impl Into<String>,
        service: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            stack: stack.into(),
            service: service.into(),
        }
    }
}

impl fmt::Display for ServiceId {
    /// `service.stack.namespace`, the order of berth's DNS names.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.service, self.stack, self.namespace)
    }
}

/// One host/path rule pointing at a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// `api.example.com` (exact), `*.example.com` (any host ending in
    /// `.example.com`, one or more labels deep), or `*` / empty (any host).
    /// Compared case-insensitively, without the port.
    pub host: String,
    /// Path prefix matched on segment boundaries: `/api` matches `/api`,
    /// `/api/` and `/api/x`, not `/apix`. `/` matches everything.
    pub path_prefix: String,
    /// Where matching requests go.
    pub service: ServiceId,
    /// Remove `path_prefix` from the path before forwarding
    /// (`/api/x` → `/x`, `/api` → `/`).
    pub strip_prefix: bool,
}

impl Route {
    /// A route for `host` and every path, not stripping.
    pub fn host(host: impl Into<String>, service: ServiceId) -> Self {
        Self {
            host: host.into(),
            path_prefix: "/".into(),
            service,
            strip_prefix: false,
        }
    }
}

/// How a service's instances share its requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LbPolicy {
    /// Each instance in turn.
    #[default]
    RoundRobin,
    /// Power of two choices: of two instances picked at random, the one
    /// with fewer requests in flight.
    LeastRequests,
}

/// One instance of a service the router may send requests to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// Where the instance listens.
    pub addr: SocketAddr,
    /// The instance's id, for metrics and the access log.
    pub id: String,
}

/// A service's healthy instances and how to use them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceBackends {
    /// Healthy instances (the server's view; the router adds its own
    /// passive health on top).
    pub backends: Vec<Backend>,
    /// Load-balancing policy.
    pub policy: LbPolicy,
    /// Bulkhead: at most this many requests in flight to the service;
    /// more get a 503 at once instead of queueing.
    pub max_concurrent: Option<u32>,
    /// How many other instances to try when connecting fails (idempotent
    /// requests without a body only).
    pub retries: u32,
}

/// Everything the router serves: routes plus each routed service's
/// instances. Cheap to clone (the contents are behind an `Arc`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteTable {
    inner: Arc<TableData>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct TableData {
    routes: Vec<Route>,
    services: HashMap<ServiceId, ServiceBackends>,
}

impl RouteTable {
    /// A table from routes and per-service backends. Routes naming a service
    /// missing from `services` answer 503 (no healthy instance).
    pub fn new(routes: Vec<Route>, services: HashMap<ServiceId, ServiceBackends>) -> Self {
        Self {
            inner: Arc::new(TableData { routes, services }),
        }
    }

    /// The routes, in the order given.
    pub fn routes(&self) -> &[Route] {
        &self.inner.routes
    }

    /// The per-service backends.
    pub fn services(&self) -> &HashMap<ServiceId, ServiceBackends> {
        &self.inner.services
    }
}

/// One compiled route: a prefix, the service state it leads to, and the
/// route's request counters.
pub(crate) struct CompiledRoute {
    pub(crate) prefix: String,
    pub(crate) strip: bool,
    pub(crate) service: Arc<ServiceState>,
    pub(crate) counters: Arc<RequestCounters>,
}

/// The lookup structure requests read; rebuilt on every table change.
#[derive(Default)]
pub(crate) struct Compiled {
    /// Lower-cased host → routes, longest prefix first.
    pub(crate) exact: HashMap<String, Vec<CompiledRoute>>,
    /// (`.example.com`, routes), longest suffix first.
    pub(crate) wildcard: Vec<(String, Vec<CompiledRoute>)>,
    /// Routes for any host, longest prefix first.
    pub(crate) any: Vec<CompiledRoute>,
}

/// What a lookup found.
pub(crate) struct Match<'a> {
    pub(crate) route: &'a CompiledRoute,
}

impl Compiled {
    /// Build from `table`, resolving each service through `service`
    /// (which keeps per-service state alive across table changes).
    pub(crate) fn build(
        table: &RouteTable,
        mut service: impl FnMut(&ServiceId, Option<&ServiceBackends>) -> Arc<ServiceState>,
    ) -> Self {
        let mut out = Compiled::default();
        let mut states: HashMap<&ServiceId, Arc<ServiceState>> = HashMap::new();
        let mut wildcard: HashMap<String, Vec<CompiledRoute>> = HashMap::new();
        for r in table.routes() {
            let state = states
                .entry(&r.service)
                .or_insert_with(|| service(&r.service, table.services().get(&r.service)))
                .clone();
            let prefix = normalize_prefix(&r.path_prefix);
            let host = r.host.trim().to_ascii_lowercase();
            let host = host.strip_suffix('.').unwrap_or(&host).to_string();
            let any_host = host.is_empty() || host == "*";
            let label = format!("{}{prefix}", if any_host { "*" } else { &host });
            let compiled = CompiledRoute {
                counters: state.shared.metrics.route(&label),
                prefix,
                strip: r.strip_prefix,
                service: state,
            };
            if any_host {
                out.any.push(compiled);
            } else if let Some(suffix) = host.strip_prefix('*') {
                wildcard
                    .entry(suffix.to_string())
                    .or_default()
                    .push(compiled);
            } else {
                out.exact.entry(host).or_default().push(compiled);
            }
        }
        let by_prefix_len = |v: &mut Vec<CompiledRoute>| {
            v.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        };
        for v in out.exact.values_mut() {
            by_prefix_len(v);
        }
        by_prefix_len(&mut out.any);
        let mut wildcard: Vec<_> = wildcard.into_iter().collect();
        for (_, v) in wildcard.iter_mut() {
            by_prefix_len(v);
        }
        wildcard.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        out.wildcard = wildcard;
        out
    }

    /// The route for `host` (already lower-cased, without port) and `path`:
    /// exact host first, then the longest matching wildcard, then any-host
    /// routes; within each, the longest matching path prefix. A host whose
    /// own routes match no path falls through to the next kind.
    pub(crate) fn lookup(&self, host: &str, path: &str) -> Option<Match<'_>> {
        if let Some(routes) = self.exact.get(host)
            && let Some(m) = match_path(routes, path)
        {
            return Some(m);
        }
        for (suffix, routes) in &self.wildcard {
            // `*.example.com` needs at least one label before the suffix.
            if host.len() > suffix.len()
                && host.ends_with(suffix.as_str())
                && let Some(m) = match_path(routes, path)
            {
                return Some(m);
            }
        }
        match_path(&self.any, path)
    }
}

fn match_path<'a>(routes: &'a [CompiledRoute], path: &str) -> Option<Match<'a>> {
    routes
        .iter()
        .find(|r| prefix_matches(&r.prefix, path))
        .map(|route| Match { route })
}

/// `/api` and `/api/` both become `/api`; the root stays `/`.
fn normalize_prefix(p: &str) -> String {
    let p = p.trim();
    let p = if p.starts_with('/') {
        p.to_string()
    } else {
        format!("/{p}")
    };
    let trimmed = p.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".to_string()
    } else {
        trimmed.to_string()
    }
}

/// Segment-boundary prefix match (`prefix` is normalized).
pub(crate) fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The path to forward once `prefix` is stripped (never empty).
pub(crate) fn strip_path<'a>(prefix: &str, path: &'a str) -> &'a str {
    if prefix == "/" {
        return path;
    }
    match path.strip_prefix(prefix) {
        Some("") | None => "/",
        Some(rest) => rest,
    }
}

/// `Host: Example.COM:8080` → `example.com`; `[::1]:80` → `[::1]`.
/// Borrows when the host is already lower-case (the common case).
pub(crate) fn normalize_host(raw: &str) -> std::borrow::Cow<'_, str> {
    let raw = raw.trim();
    let host = if raw.starts_with('[') {
        match raw.find(']') {
            Some(end) => &raw[..=end],
            None => raw,
        }
    } else {
        match raw.rfind(':') {
            Some(i) => &raw[..i],
            None => raw,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/"));
        assert!(prefix_matches("/api", "/api/x"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(prefix_matches("/", "/anything"));
        assert_eq!(normalize_prefix("api/"), "/api");
        assert_eq!(normalize_prefix("/"), "/");
        assert_eq!(normalize_prefix(""), "/");
    }

    #[test]
    fn stripping_never_leaves_an_empty_path() {
        assert_eq!(strip_path("/api", "/api"), "/");
        assert_eq!(strip_path("/api", "/api/x?y"), "/x?y");
        assert_eq!(strip_path("/", "/x"), "/x");
    }

    #[test]
    fn hosts_lose_port_case_and_trailing_dot() {
        assert_eq!(normalize_host("Example.COM:8080"), "example.com");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert_eq!(normalize_host("web"), "web");
    }
}
