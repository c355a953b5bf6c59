//! A short in-memory history of per-instance CPU, memory, state and
//! restarts and per-service request rates: the last hour at 10 s
//! resolution, so the dashboard's charts and `berth top` show trends
//! without a Prometheus server.
//!
//! Bounded twice: each series keeps at most [`POINTS`] samples, and a
//! series whose instance has been gone longer than the retention is
//! dropped. At 50 instances that is about 50 × 360 × 40 bytes ≈ 0.7 MB.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use berth_model::history::{
    InstanceHistory, InstancePoint, ServiceHistory, ServicePoint, StackHistory,
};
use berth_model::{InstanceKey, Millis};

use crate::metrics::Usage;

/// Time between samples.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// Samples kept per series (one hour).
pub const POINTS: usize = 360;

/// `(namespace, stack, service)`.
pub type ServiceKey = (String, String, String);

struct InstanceSeries {
    node: String,
    points: VecDeque<InstancePoint>,
    /// `(uid, measured at ms, cpu seconds)` of the previous measurement of
    /// this run, for the CPU rate of processes.
    last_cpu: Option<(String, Millis, f64)>,
    /// The rate computed at that measurement, repeated while no newer
    /// measurement comes (a joined node reports less often than sampled).
    last_rate: Option<f64>,
}

struct ServiceSeries {
    points: VecDeque<ServicePoint>,
    /// `(at ms, responses, 5xx)` at the previous sample.
    last: Option<(Millis, u64, u64)>,
}

/// The history of every instance and routed service on this server.
pub struct History {
    interval: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    instances: BTreeMap<InstanceKey, InstanceSeries>,
    services: BTreeMap<ServiceKey, ServiceSeries>,
}

/// One instance as the sampler sees it.
pub struct InstanceSample<'a> {
    /// Its status.
    pub status: &'a berth_model::InstanceStatus,
    /// Its resource use, when measurable.
    pub usage: Option<Usage>,
    /// When `usage` was measured (ms since the epoch; a joined node's
    /// report may be older than the sample): CPU rates of processes are
    /// computed between measurements, not samples.
    pub measured_at: Millis,
}

fn push<T>(q: &mut VecDeque<T>, v: T) {
    if q.len() == POINTS {
        q.pop_front();
    }
    q.push_back(v);
}

impl History {
    /// An empty history sampled every `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Time between samples.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    fn retention_ms(&self) -> u64 {
        self.interval.as_millis() as u64 * POINTS as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record one sample of every instance and of the router's per-service
    /// response counters `(responses, 5xx)`.
    pub fn record(
        &self,
        at: Millis,
        instances: &[InstanceSample<'_>],
        requests: &HashMap<ServiceKey, (u64, u64)>,
    ) {
        let mut inner = self.lock();
        for s in instances {
            let st = s.status;
            let series = inner
                .instances
                .entry(st.key.clone())
                .or_insert_with(|| InstanceSeries {
                    node: st.node.clone(),
                    points: VecDeque::new(),
                    last_cpu: None,
                    last_rate: None,
                });
            series.node.clone_from(&st.node);
            let (cpu_percent, memory_bytes) = match s.usage {
                Some(Usage::Container {
                    cpu_percent,
                    memory_bytes,
                }) => (Some(cpu_percent), Some(memory_bytes)),
                Some(Usage::Process {
                    cpu_seconds,
                    rss_bytes,
                }) => {
                    let m = s.measured_at;
                    let rate = match &series.last_cpu {
                        Some((uid, t, _)) if *uid == st.uid && m == *t => series.last_rate,
                        Some((uid, t, c)) if *uid == st.uid && m > *t && cpu_seconds >= *c => {
                            Some((cpu_seconds - c) * 100_000.0 / (m - t) as f64)
                        }
                        _ => None,
                    };
                    series.last_cpu = Some((st.uid.clone(), m, cpu_seconds));
                    series.last_rate = rate;
                    (rate, Some(rss_bytes))
                }
                None => {
                    series.last_cpu = None;
                    series.last_rate = None;
                    (None, None)
                }
            };
            push(
                &mut series.points,
                InstancePoint {
                    t: at,
                    state: st.state,
                    cpu_percent,
                    memory_bytes,
                    restarts: st.restarts,
                },
            );
        }
        for (key, &(total, errors)) in requests {
            let series = inner
                .services
                .entry(key.clone())
                .or_insert_with(|| ServiceSeries {
                    points: VecDeque::new(),
                    last: None,
                });
            if let Some((t, t0, e0)) = series.last
                && at > t
                && total >= t0
            {
                let secs = (at - t) as f64 / 1000.0;
                push(
                    &mut series.points,
                    ServicePoint {
                        t: at,
                        requests_per_second: (total - t0) as f64 / secs,
                        errors_per_second: errors.saturating_sub(e0) as f64 / secs,
                    },
                );
            }
            series.last = Some((at, total, errors));
        }
        // Forget series with no sample within the retention.
        let horizon = at.saturating_sub(self.retention_ms());
        inner
            .instances
            .retain(|_, s| s.points.back().is_some_and(|p| p.t >= horizon));
        inner
            .services
            .retain(|_, s| s.last.is_some_and(|(t, _, _)| t >= horizon));
    }

    /// The samples of one stack taken after `since` (ms; 0 for all).
    pub fn stack(&self, namespace: &str, stack: &str, since: Millis) -> StackHistory {
        let inner = self.lock();
        let instances = inner
            .instances
            .iter()
            .filter(|(k, _)| k.namespace == namespace && k.stack == stack)
            .map(|(k, s)| InstanceHistory {
                instance: k.short(),
                service: k.service.clone(),
                slot: k.slot,
                node: s.node.clone(),
                points: s.points.iter().filter(|p| p.t > since).cloned().collect(),
            })
            .collect();
        let services = inner
            .services
            .iter()
            .filter(|((ns, st, _), _)| ns == namespace && st == stack)
            .map(|((_, _, svc), s)| ServiceHistory {
                service: svc.clone(),
                points: s.points.iter().filter(|p| p.t > since).cloned().collect(),
            })
            .collect();
        StackHistory {
            interval_ms: self.interval.as_millis() as u64,
            retention_ms: self.retention_ms(),
            instances,
            services,
        }
    }

    /// Series and samples held (for the memory bound's test).
    pub fn size(&self) -> (usize, usize) {
        let inner = self.lock();
        let points = inner
            .instances
            .values()
            .map(|s| s.points.len())
            .sum::<usize>()
            + inner
                .services
                .values()
                .map(|s| s.points.len())
                .sum::<usize>();
        (inner.instances.len() + inner.services.len(), points)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_model::{InstanceState, InstanceStatus};

    fn status(slot: u32, uid: &str) -> InstanceStatus {
        InstanceStatus {
            state: InstanceState::Running,
            pid: Some(1),
            restarts: 2,
            started_at: Some(1),
            ..InstanceStatus::new(
                InstanceKey::new("default", "shop", "web", slot),
                uid,
                "n1",
                1,
                1,
            )
        }
    }

    fn proc_usage(cpu_seconds: f64) -> Option<Usage> {
        Some(Usage::Process {
            cpu_seconds,
            rss_bytes: 1 << 20,
        })
    }

    #[test]
    fn cpu_rate_is_per_run_and_series_are_bounded() {
        let h = History::new(INTERVAL);
        let s = status(1, "a");
        let no_requests = HashMap::new();
        h.record(
            10_000,
            &[InstanceSample {
                status: &s,
                usage: proc_usage(1.0),
                measured_at: 10_000,
            }],
            &no_requests,
        );
        h.record(
            20_000,
            &[InstanceSample {
                status: &s,
                usage: proc_usage(6.0),
                measured_at: 20_000,
            }],
            &no_requests,
        );
        let other_run = status(1, "b");
        h.record(
            30_000,
            &[InstanceSample {
                status: &other_run,
                usage: proc_usage(0.5),
                measured_at: 30_000,
            }],
            &no_requests,
        );
        let got = h.stack("default", "shop", 0);
        let p = &got.instances[0].points;
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].cpu_percent, None);
        // 5 CPU seconds in 10 s: half a core.
        assert_eq!(p[1].cpu_percent, Some(50.0));
        // A new run starts over.
        assert_eq!(p[2].cpu_percent, None);
        assert_eq!(p[2].restarts, 2);
        assert_eq!(
            h.stack("default", "shop", 20_000).instances[0].points.len(),
            1
        );
        assert!(h.stack("default", "blog", 0).instances.is_empty());

        for i in 0..(POINTS as u64 + 50) {
            h.record(
                40_000 + i * 10_000,
                &[InstanceSample {
                    status: &s,
                    usage: None,
                    measured_at: 40_000 + i * 10_000,
                }],
                &no_requests,
            );
        }
        assert_eq!(h.size(), (1, POINTS));
        // Gone for longer than the retention: forgotten.
        h.record(10_000_000_000, &[], &no_requests);
        assert_eq!(h.size(), (0, 0));
    }

    #[test]
    fn a_joined_nodes_report_gives_its_rate_between_reports() {
        let h = History::new(INTERVAL);
        let s = status(1, "a");
        let none = HashMap::new();
        let sample = |at, cpu, measured_at| {
            h.record(
                at,
                &[InstanceSample {
                    status: &s,
                    usage: proc_usage(cpu),
                    measured_at,
                }],
                &none,
            );
        };
        sample(10_000, 1.0, 9_000);
        // The same report seen again: no rate yet, no false 0%.
        sample(20_000, 1.0, 9_000);
        // The next report, 20 s after the first: 4 CPU seconds = 20%.
        sample(30_000, 5.0, 29_000);
        // Seen again: the rate stays.
        sample(40_000, 5.0, 29_000);
        let p = &h.stack("default", "shop", 0).instances[0].points;
        let rates: Vec<Option<f64>> = p.iter().map(|p| p.cpu_percent).collect();
        assert_eq!(rates, [None, None, Some(20.0), Some(20.0)]);
    }

    #[test]
    fn request_rates_come_from_counter_deltas() {
        let h = History::new(INTERVAL);
        let key = ("default".to_owned(), "shop".to_owned(), "web".to_owned());
        h.record(10_000, &[], &HashMap::from([(key.clone(), (100, 1))]));
        h.record(20_000, &[], &HashMap::from([(key.clone(), (300, 11))]));
        let got = h.stack("default", "shop", 0);
        assert_eq!(
            got.services[0].points,
            [ServicePoint {
                t: 20_000,
                requests_per_second: 20.0,
                errors_per_second: 1.0
            }]
        );
    }
}
