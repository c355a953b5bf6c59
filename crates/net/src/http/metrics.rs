//! Router metrics: per-route request counters by status class and a
//! fixed-bucket latency histogram, per-service in-flight, ejection and
//! retry counts, and router-wide connection counts — plain atomics, read
//! as a [`RouterMetrics`] snapshot by whoever exports them (the metrics
//! issue).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::http::table::ServiceId;

/// Upper bounds of the latency buckets, in microseconds; a last implicit
/// bucket holds everything slower.
pub const LATENCY_BUCKETS_US: [u64; 14] = [
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 10_000_000,
];

/// Responses and latencies of one route: the counters a request bumps.
/// Each compiled route holds its own `Arc`, resolved when the table is
/// compiled, so recording costs no lookup.
#[derive(Default)]
pub(crate) struct RequestCounters {
    by_class: [AtomicU64; 5],
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    latency_sum_us: AtomicU64,
}

impl RequestCounters {
    pub(crate) fn record(&self, status: u16, elapsed: Duration) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn snapshot(&self, route: String) -> RouteSnapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RouteSnapshot {
            route,
            requests_by_class: self.by_class.each_ref().map(load),
            latency_buckets: self.buckets.each_ref().map(load),
            latency_sum_us: load(&self.latency_sum_us),
        }
    }
}

/// Live counters of one service.
pub(crate) struct ServiceMetrics {
    pub(crate) id: ServiceId,
    /// Per route label. A route removed from the table keeps its counters
    /// for as long as the service lives, so an exported counter never goes
    /// backwards while the series exists. Locked only when a table is
    /// compiled and when a snapshot is taken, never by a request.
    routes: Mutex<BTreeMap<String, Arc<RequestCounters>>>,
    pub(crate) ejections: AtomicU64,
    pub(crate) retries: AtomicU64,
}

impl ServiceMetrics {
    pub(crate) fn new(id: ServiceId) -> Self {
        Self {
            id,
            routes: Mutex::default(),
            ejections: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        }
    }

    /// The counters of the route labelled `route` (see
    /// [`RouteSnapshot::route`]), created on first use.
    pub(crate) fn route(&self, route: &str) -> Arc<RequestCounters> {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = routes.get(route) {
            return c.clone();
        }
        let c = Arc::new(RequestCounters::default());
        routes.insert(route.to_owned(), c.clone());
        c
    }

    pub(crate) fn snapshot(&self, in_flight: u64, instances_ejected: u64) -> ServiceSnapshot {
        let routes: Vec<RouteSnapshot> = self
            .routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(label, c)| c.snapshot(label.clone()))
            .collect();
        let mut requests_by_class = [0; 5];
        let mut latency_buckets = [0; LATENCY_BUCKETS_US.len() + 1];
        let mut latency_sum_us = 0u64;
        for r in &routes {
            for (sum, n) in requests_by_class.iter_mut().zip(r.requests_by_class) {
                *sum += n;
            }
            for (sum, n) in latency_buckets.iter_mut().zip(r.latency_buckets) {
                *sum += n;
            }
            latency_sum_us = latency_sum_us.saturating_add(r.latency_sum_us);
        }
        ServiceSnapshot {
            service: self.id.clone(),
            requests_by_class,
            latency_buckets,
            latency_sum_us,
            routes,
            in_flight,
            ejections: self.ejections.load(Ordering::Relaxed),
            instances_ejected,
            retries: self.retries.load(Ordering::Relaxed),
        }
    }
}

/// Router-wide counters.
#[derive(Default)]
pub(crate) struct GlobalMetrics {
    pub(crate) connections_accepted: AtomicU64,
    pub(crate) connections_active: AtomicU64,
    pub(crate) no_route: AtomicU64,
}

/// One service's counters at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSnapshot {
    /// The service.
    pub service: ServiceId,
    /// Responses sent, by status class: `[1xx, 2xx, 3xx, 4xx, 5xx]`
    /// (including the router's own 502/503/504 for this service).
    pub requests_by_class: [u64; 5],
    /// Request counts per latency bucket: index `i` counts requests taking
    /// at most [`LATENCY_BUCKETS_US`]`[i]` µs (and more than the previous
    /// bound); the last entry counts the slower ones.
    pub latency_buckets: [u64; LATENCY_BUCKETS_US.len() + 1],
    /// Sum of all latencies, in microseconds.
    pub latency_sum_us: u64,
    /// The same counters per route, sorted by route label; the fields
    /// above are their sums.
    pub routes: Vec<RouteSnapshot>,
    /// Requests in flight now.
    pub in_flight: u64,
    /// Times an instance of this service was ejected by the circuit breaker.
    pub ejections: u64,
    /// Instances ejected now.
    pub instances_ejected: u64,
    /// Requests re-sent to another instance after a connect failure.
    pub retries: u64,
}

impl ServiceSnapshot {
    /// Total responses.
    pub fn requests(&self) -> u64 {
        self.requests_by_class.iter().sum()
    }
}

/// One route's counters at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteSnapshot {
    /// The route as `host` followed by its path prefix, as the router
    /// matches them: `web.shop.localhost/`, `shop.localhost/api`,
    /// `*.example.com/` (wildcard host), `*/static` (any host).
    pub route: String,
    /// Responses sent for requests matching the route, by status class
    /// (as [`ServiceSnapshot::requests_by_class`]).
    pub requests_by_class: [u64; 5],
    /// Latency histogram (as [`ServiceSnapshot::latency_buckets`]).
    pub latency_buckets: [u64; LATENCY_BUCKETS_US.len() + 1],
    /// Sum of all latencies, in microseconds.
    pub latency_sum_us: u64,
}

impl RouteSnapshot {
    /// Total responses.
    pub fn requests(&self) -> u64 {
        self.requests_by_class.iter().sum()
    }
}

/// Everything the router counts, at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouterMetrics {
    /// Client connections accepted since start.
    pub connections_accepted: u64,
    /// Client connections open now.
    pub connections_active: u64,
    /// Requests answered 404 because no route matched.
    pub no_route: u64,
    /// Per service, for every service the router has seen, sorted by id.
    pub services: Vec<ServiceSnapshot>,
}

impl RouterMetrics {
    /// The snapshot of one service, if the router has seen it.
    pub fn service(&self, id: &ServiceId) -> Option<&ServiceSnapshot> {
        self.services.iter().find(|s| &s.service == id)
    }
}
