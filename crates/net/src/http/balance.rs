//! Load balancing, passive health (circuit breaker) and the bulkhead.
//!
//! Everything here is lock-free atomics: a request picks a backend, bumps
//! its in-flight counter, and reports the outcome, without taking a lock.
//! Per-backend and per-service counters live in `Arc`s that the router
//! carries over from one table to the next (keyed by service and address),
//! so a table change neither forgets an ejection nor resets the bulkhead
//! count of requests still running.
//!
//! Circuit breaker states per backend:
//!
//! ```text
//!   closed ──N consecutive failures──► open (ejected for cool-down)
//!     ▲                                   │ cool-down over
//!     │ success                           ▼
//!     └──────────────────────────── half-open (one trial request)
//!                                         │ failure: open again, cool-down doubled (capped)
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper::http::uri::Authority;

use crate::http::metrics::ServiceMetrics;
use crate::http::table::{Backend, LbPolicy, ServiceBackends, ServiceId};

/// Passive-health settings (from [`crate::http::RouterConfig`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct BreakerConfig {
    pub(crate) failure_threshold: u32,
    pub(crate) base_ejection: Duration,
    pub(crate) max_ejection: Duration,
}

/// One backend's live counters.
pub(crate) struct BackendState {
    pub(crate) addr: std::net::SocketAddr,
    pub(crate) id: String,
    /// `host:port` for the upstream URI, built once.
    pub(crate) authority: Authority,
    pub(crate) in_flight: AtomicU32,
    consecutive_failures: AtomicU32,
    /// Nanoseconds since the router's epoch until which the backend is out.
    ejected_until: AtomicU64,
    /// Ejections since the last success: the cool-down doubles with each.
    ejections: AtomicU32,
    /// A half-open trial request is running.
    probing: AtomicBool,
}

impl BackendState {
    pub(crate) fn new(b: &Backend) -> Self {
        let authority = Authority::try_from(b.addr.to_string().as_str())
            .unwrap_or_else(|_| Authority::from_static("127.0.0.1"));
        Self {
            addr: b.addr,
            id: b.id.clone(),
            authority,
            in_flight: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            probing: AtomicBool::new(false),
        }
    }

    /// May take a request now. In half-open state only one caller wins;
    /// `claimed_probe` tells it to release the probe flag when done.
    fn try_acquire(&self, clock: &Clock, threshold: u32) -> Option<bool> {
        if self.consecutive_failures.load(Ordering::Relaxed) < threshold {
            return Some(false);
        }
        if clock.now_nanos() < self.ejected_until.load(Ordering::Relaxed) {
            return None;
        }
        self.probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .ok()
            .map(|_| true)
    }

    /// Whether the breaker is open (for metrics and tests).
    pub(crate) fn is_ejected(&self, clock: &Clock) -> bool {
        clock.now_nanos() < self.ejected_until.load(Ordering::Relaxed)
    }
}

/// A monotonic clock in nanoseconds since the router started, so deadlines
/// fit in an `AtomicU64`.
#[derive(Clone, Copy)]
pub(crate) struct Clock {
    epoch: Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Self {
            epoch: Instant::now(),
        }
    }
    fn now_nanos(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// State shared by every table generation for one service.
pub(crate) struct ServiceShared {
    pub(crate) in_flight: AtomicU32,
    pub(crate) rr: AtomicUsize,
    pub(crate) metrics: Arc<ServiceMetrics>,
}

impl ServiceShared {
    pub(crate) fn new(id: &ServiceId) -> Self {
        Self {
            in_flight: AtomicU32::new(0),
            rr: AtomicUsize::new(0),
            metrics: Arc::new(ServiceMetrics::new(id.clone())),
        }
    }
}

/// A service as one table generation sees it.
pub(crate) struct ServiceState {
    pub(crate) id: ServiceId,
    pub(crate) backends: Vec<Arc<BackendState>>,
    pub(crate) policy: LbPolicy,
    pub(crate) max_concurrent: Option<u32>,
    pub(crate) retries: u32,
    pub(crate) shared: Arc<ServiceShared>,
}

impl ServiceState {
    pub(crate) fn new(
        id: ServiceId,
        cfg: Option<&ServiceBackends>,
        shared: Arc<ServiceShared>,
        backends: Vec<Arc<BackendState>>,
    ) -> Self {
        let (policy, max_concurrent, retries) = cfg
            .map(|c| (c.policy, c.max_concurrent, c.retries))
            .unwrap_or_default();
        Self {
            id,
            backends,
            policy,
            max_concurrent,
            retries,
            shared,
        }
    }

    /// Take a bulkhead slot, or `None` when the service is at its limit.
    pub(crate) fn enter(self: &Arc<Self>) -> Option<ServiceSlot> {
        let prev = self.shared.in_flight.fetch_add(1, Ordering::AcqRel);
        if let Some(limit) = self.max_concurrent
            && prev >= limit
        {
            self.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ServiceSlot {
            shared: self.shared.clone(),
        })
    }

    /// Pick a backend not in `tried` (a bitmask of indices), honouring the
    /// breaker. `None` when every candidate is tried or ejected.
    pub(crate) fn pick(&self, tried: u64, clock: &Clock, cfg: &BreakerConfig) -> Option<Picked> {
        let n = self.backends.len();
        if n == 0 {
            return None;
        }
        let untried = |i: usize| i >= 64 || tried & (1 << i) == 0;
        let acquire = |i: usize| -> Option<Picked> {
            let b = &self.backends[i];
            let probe = b.try_acquire(clock, cfg.failure_threshold)?;
            b.in_flight.fetch_add(1, Ordering::AcqRel);
            Some(Picked {
                index: i,
                backend: b.clone(),
                probe,
            })
        };
        if self.policy == LbPolicy::LeastRequests && n > 1 {
            let r = fast_random();
            let a = (r as usize) % n;
            let mut b = ((r >> 32) as usize) % (n - 1);
            if b >= a {
                b += 1;
            }
            let load = |i: usize| self.backends[i].in_flight.load(Ordering::Relaxed);
            let (first, second) = if load(b) < load(a) { (b, a) } else { (a, b) };
            for i in [first, second] {
                if untried(i)
                    && let Some(p) = acquire(i)
                {
                    return Some(p);
                }
            }
            // Both choices unusable: fall back to a scan from a random start.
            return (0..n)
                .map(|k| (a + k) % n)
                .filter(|&i| untried(i))
                .find_map(acquire);
        }
        // A retry does not advance the rotation, so that a dead instance
        // does not shift every later request onto the same neighbour.
        let start = if tried == 0 {
            self.shared.rr.fetch_add(1, Ordering::Relaxed)
        } else {
            self.shared.rr.load(Ordering::Relaxed)
        };
        (0..n)
            .map(|k| (start + k) % n)
            .filter(|&i| untried(i))
            .find_map(acquire)
    }
}

/// A bulkhead slot, released on drop.
pub(crate) struct ServiceSlot {
    shared: Arc<ServiceShared>,
}

impl Drop for ServiceSlot {
    fn drop(&mut self) {
        self.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A chosen backend, counted in flight until dropped; report the outcome
/// with [`Picked::finish`] (not finishing counts as neither success nor
/// failure).
pub(crate) struct Picked {
    pub(crate) index: usize,
    pub(crate) backend: Arc<BackendState>,
    probe: bool,
}

/// What became of a request to one backend, as the breaker sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    Failure,
}

impl Picked {
    /// Record the outcome; returns true when this failure ejected the backend.
    pub(crate) fn finish(&self, outcome: Outcome, clock: &Clock, cfg: &BreakerConfig) -> bool {
        let b = &self.backend;
        match outcome {
            Outcome::Success => {
                if b.consecutive_failures.load(Ordering::Relaxed) != 0 {
                    b.consecutive_failures.store(0, Ordering::Relaxed);
                    b.ejections.store(0, Ordering::Relaxed);
                }
                false
            }
            Outcome::Failure => {
                let failures = b.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
                if failures < cfg.failure_threshold {
                    return false;
                }
                let now = clock.now_nanos();
                if !self.probe && now < b.ejected_until.load(Ordering::Relaxed) {
                    // Already ejected by a concurrent failure.
                    return false;
                }
                let n = b.ejections.fetch_add(1, Ordering::AcqRel).min(16);
                let cool = cfg
                    .base_ejection
                    .saturating_mul(1u32 << n)
                    .min(cfg.max_ejection);
                let until = now.saturating_add(u64::try_from(cool.as_nanos()).unwrap_or(u64::MAX));
                b.ejected_until.store(until, Ordering::Release);
                true
            }
        }
    }
}

impl Drop for Picked {
    fn drop(&mut self) {
        self.backend.in_flight.fetch_sub(1, Ordering::AcqRel);
        if self.probe {
            self.backend.probing.store(false, Ordering::Release);
        }
    }
}

/// xorshift64* per thread: P2C needs cheap, not good, randomness.
fn fast_random() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let addr = &STATE as *const _ as u64;
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x9E37_79B9_7F4A_7C15);
            (addr ^ t) | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(n: usize, policy: LbPolicy) -> Arc<ServiceState> {
        let id = ServiceId::new("default", "s", "web");
        let backends = (0..n)
            .map(|i| {
                Arc::new(BackendState::new(&Backend {
                    addr: format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
                    id: format!("web-{i}"),
                }))
            })
            .collect();
        let cfg = ServiceBackends {
            policy,
            ..Default::default()
        };
        Arc::new(ServiceState::new(
            id.clone(),
            Some(&cfg),
            Arc::new(ServiceShared::new(&id)),
            backends,
        ))
    }

    // Cool-downs of half a second and more: the test checks "still ejected"
    // on the real clock, which a loaded machine may pause for a while.
    const CFG: BreakerConfig = BreakerConfig {
        failure_threshold: 2,
        base_ejection: Duration::from_millis(500),
        max_ejection: Duration::from_secs(4),
    };

    #[test]
    fn breaker_opens_after_threshold_and_half_opens_once() {
        let clock = Clock::new();
        let s = service(1, LbPolicy::RoundRobin);
        for _ in 0..2 {
            let p = s.pick(0, &clock, &CFG).expect("closed breaker");
            p.finish(Outcome::Failure, &clock, &CFG);
        }
        assert!(s.backends[0].is_ejected(&clock));
        assert!(s.pick(0, &clock, &CFG).is_none());
        std::thread::sleep(Duration::from_millis(600));
        let probe = s.pick(0, &clock, &CFG).expect("half-open trial");
        assert!(s.pick(0, &clock, &CFG).is_none(), "one trial at a time");
        // A failed trial re-ejects for twice as long (1 s).
        assert!(probe.finish(Outcome::Failure, &clock, &CFG));
        drop(probe);
        std::thread::sleep(Duration::from_millis(600));
        assert!(s.pick(0, &clock, &CFG).is_none());
        std::thread::sleep(Duration::from_millis(500));
        let probe = s.pick(0, &clock, &CFG).unwrap();
        probe.finish(Outcome::Success, &clock, &CFG);
        drop(probe);
        assert!(s.pick(0, &clock, &CFG).is_some());
        assert!(s.pick(0, &clock, &CFG).is_some(), "closed again");
    }

    #[test]
    fn pick_skips_tried_backends() {
        let clock = Clock::new();
        let s = service(3, LbPolicy::LeastRequests);
        for _ in 0..50 {
            let p = s.pick(0b101, &clock, &CFG).unwrap();
            assert_eq!(p.index, 1);
        }
        assert!(s.pick(0b111, &clock, &CFG).is_none());
    }
}
