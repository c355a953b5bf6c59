//! Health checks: the probes (exec, shell, HTTP GET, TCP connect) and the
//! Compose state machine that turns probe results into [`Health`].
//!
//! Compose semantics: the first `start_period` is a grace period in which
//! failures do not count and a success makes the instance healthy; probes run
//! every `start_interval` during it and every `interval` after; `retries`
//! consecutive counted failures make it unhealthy; each probe is bounded by
//! `timeout`.
//!
//! One berth addition, so that `up -d` does not wait a whole interval for a
//! service that is ready in 50 ms: while the health is still `starting`,
//! extra probes run on a fast ramp (25 ms doubling up to 1 s). Their successes
//! count, their failures never do, so when an instance turns `unhealthy` is
//! exactly as in Compose.
//!
//! What to do about an unhealthy instance is not decided here: like Compose,
//! berth only reports it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use berth_model::Health;
use berth_spec::types::{HealthTest, Healthcheck};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

/// Kept of a probe's output (bytes), as Docker keeps the start of it.
pub const MAX_OUTPUT: usize = 1024;
const RAMP_START: Duration = Duration::from_millis(25);
const RAMP_MAX: Duration = Duration::from_secs(1);

/// Result of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    /// Whether it passed.
    pub ok: bool,
    /// What it said (trimmed to [`MAX_OUTPUT`]).
    pub output: String,
}

/// Where a probe runs: the instance's port, environment and directory
/// (exec checks see what the instance sees, as inside a container).
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    /// The instance's port, used when the check names none.
    pub port: Option<u16>,
    /// The instance's environment.
    pub env: BTreeMap<String, String>,
    /// The instance's working directory.
    pub working_dir: PathBuf,
}

fn trim_output(s: &str) -> String {
    let s = s.trim();
    if s.len() <= MAX_OUTPUT {
        return s.to_owned();
    }
    let mut cut = MAX_OUTPUT;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &s[..cut])
}

fn fail(output: impl Into<String>) -> ProbeResult {
    ProbeResult {
        ok: false,
        output: trim_output(&output.into()),
    }
}

/// Runs probes somewhere other than this host's process table and
/// loopback (a container: exec through the engine, HTTP/TCP to its IP).
#[async_trait]
pub trait Prober: Send + Sync + 'static {
    /// Run one probe, unbounded (the caller applies the timeout).
    async fn probe(&self, test: &HealthTest, target: &ProbeTarget) -> ProbeResult;

    /// Wait for the right to run a probe, before its timeout starts: an
    /// engine that bounds its concurrent work queues checks behind starts,
    /// and time spent queued must not count as a slow check. The returned
    /// value is held until the probe ends.
    async fn admit(&self, _test: &HealthTest) -> Option<Box<dyn std::any::Any + Send>> {
        None
    }
}

/// The HTTP/TCP part of a probe against `host`; `None` for exec checks.
pub async fn probe_network(
    test: &HealthTest,
    host: &str,
    target: &ProbeTarget,
) -> Option<ProbeResult> {
    let port = |p: &Option<u16>| p.or(target.port);
    Some(match test {
        HealthTest::Exec { .. } | HealthTest::Shell { .. } => return None,
        HealthTest::Http { port: p, path } => match port(p) {
            Some(p) => http_get(host, p, path).await,
            None => fail("HTTP check: the instance has no port and the check names none"),
        },
        HealthTest::Tcp { port: p } => match port(p) {
            Some(p) => match TcpStream::connect((host, p)).await {
                Ok(_) => ProbeResult {
                    ok: true,
                    output: format!("connected to {host}:{p}"),
                },
                Err(e) => fail(format!("connect {host}:{p}: {e}")),
            },
            None => fail("TCP check: the instance has no port and the check names none"),
        },
    })
}

/// Run one probe, bounded by `timeout`.
pub async fn probe(test: &HealthTest, target: &ProbeTarget, timeout: Duration) -> ProbeResult {
    let fut = async {
        match test {
            HealthTest::Exec { argv } => exec(argv.clone(), target).await,
            HealthTest::Shell { command } => {
                exec(vec!["sh".into(), "-c".into(), command.clone()], target).await
            }
            _ => probe_network(test, "127.0.0.1", target)
                .await
                .unwrap_or_else(|| fail("not a network check")),
        }
    };
    bounded(fut, timeout).await
}

async fn bounded(
    fut: impl std::future::Future<Output = ProbeResult>,
    timeout: Duration,
) -> ProbeResult {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => fail(format!("health check timed out after {timeout:?}")),
    }
}

/// A failed probe result with this output (trimmed).
pub fn failed(output: impl Into<String>) -> ProbeResult {
    fail(output)
}

/// Trim a probe's output as the local probes do.
pub fn trimmed(output: &str) -> String {
    trim_output(output)
}

async fn exec(argv: Vec<String>, target: &ProbeTarget) -> ProbeResult {
    let Some((program, args)) = argv.split_first() else {
        return fail("empty health check command");
    };
    let child = tokio::process::Command::new(program)
        .args(args)
        .env_clear()
        .envs(&target.env)
        .current_dir(&target.working_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        // The probe future is dropped on timeout; the check must die with it.
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot run {program:?}: {e}")),
    };
    let pid = child.id();
    let guard = GroupGuard(pid);
    let out = child.wait_with_output().await;
    drop(guard);
    match out {
        Ok(out) => {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            let code = out.status.code();
            ProbeResult {
                ok: out.status.success(),
                output: if text.trim().is_empty() && !out.status.success() {
                    format!(
                        "exited with {}",
                        code.map_or("a signal".into(), |c| c.to_string())
                    )
                } else {
                    trim_output(&text)
                },
            }
        }
        Err(e) => fail(format!("health check failed to run: {e}")),
    }
}

/// Kills the probe's whole process group when the probe ends or is dropped
/// (a timed-out `sh -c` leaves its children otherwise).
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// A minimal HTTP/1.1 GET: 2xx and 3xx pass.
async fn http_get(host: &str, port: u16, path: &str) -> ProbeResult {
    let mut stream = match TcpStream::connect((host, port)).await {
        Ok(s) => s,
        Err(e) => return fail(format!("GET http://{host}:{port}{path}: {e}")),
    };
    let path = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: berth-health\r\nConnection: close\r\n\r\n"
    );
    if let Err(e) = stream.write_all(req.as_bytes()).await {
        return fail(format!("GET http://{host}:{port}{path}: {e}"));
    }
    let mut buf = vec![0u8; 1024];
    let mut n = 0;
    while n < buf.len() && !buf[..n].windows(2).any(|w| w == b"\r\n") {
        match stream.read(&mut buf[n..]).await {
            Ok(0) => break,
            Ok(m) => n += m,
            Err(e) => return fail(format!("GET http://{host}:{port}{path}: {e}")),
        }
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let status_line = head.lines().next().unwrap_or("").trim().to_owned();
    let code: Option<u16> = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok());
    match code {
        Some(c) if (200..400).contains(&c) => ProbeResult {
            ok: true,
            output: format!("GET {path}: {status_line}"),
        },
        Some(_) => fail(format!("GET {path}: {status_line}")),
        None => fail(format!("GET {path}: not an HTTP response: {status_line:?}")),
    }
}

/// The Compose health state machine, fed with probe results.
#[derive(Debug, Clone)]
pub struct Tracker {
    check: Healthcheck,
    started: Instant,
    health: Health,
    ever_healthy: bool,
    failures: u32,
    next_regular: Instant,
    ramp: Duration,
    next_ramp: Instant,
}

impl Tracker {
    /// A tracker for a process started at `started`.
    pub fn new(check: Healthcheck, started: Instant) -> Self {
        let mut t = Self {
            started,
            health: Health::Starting,
            ever_healthy: false,
            failures: 0,
            next_regular: started,
            ramp: RAMP_START,
            next_ramp: started + RAMP_START,
            check,
        };
        t.next_regular = started + t.regular_interval(started);
        t
    }

    fn in_start_period(&self, now: Instant) -> bool {
        !self.ever_healthy && now < self.started + Duration::from_millis(self.check.start_period_ms)
    }

    fn regular_interval(&self, now: Instant) -> Duration {
        let ms = if self.in_start_period(now) {
            self.check.start_interval_ms
        } else {
            self.check.interval_ms
        };
        Duration::from_millis(ms.max(1))
    }

    /// Current health.
    pub fn health(&self) -> Health {
        self.health
    }

    /// The probe timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.check.timeout_ms.max(1))
    }

    /// When the next probe is due.
    pub fn next_probe(&self) -> Instant {
        if self.health == Health::Starting && self.next_ramp < self.next_regular {
            self.next_ramp
        } else {
            self.next_regular
        }
    }

    /// Record a probe that was started at `at` (when it was due).
    pub fn record(&mut self, at: Instant, result: &ProbeResult) {
        let regular = at >= self.next_regular;
        let counted = regular && !self.in_start_period(at);
        if result.ok {
            self.health = Health::Healthy;
            self.ever_healthy = true;
            self.failures = 0;
        } else if counted {
            self.failures += 1;
            if self.failures >= self.check.retries.max(1) {
                self.health = Health::Unhealthy;
            }
        }
        let now = Instant::now().max(at);
        if regular {
            self.next_regular = now + self.regular_interval(now);
        }
        self.ramp = (self.ramp * 2).min(RAMP_MAX);
        self.next_ramp = now + self.ramp;
    }
}

/// What the monitor publishes after each probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    /// The health after the probe.
    pub health: Health,
    /// The probe's output.
    pub output: String,
    /// Whether the probe passed.
    pub ok: bool,
    /// How long the probe took.
    pub took: Duration,
}

/// Health-check figures of one instance, for the metrics API (shipped by
/// joined agents, hence defined with the API types).
pub use berth_model::api::HealthStats;

/// Every supervised instance's [`HealthStats`], shared with the server's
/// metrics. Kept in memory beside the statuses rather than in them: a
/// probe's duration changes every probe, and writing it to the store each
/// time would cost a store write per check per instance.
#[derive(Debug, Clone, Default)]
pub struct HealthStatsMap {
    inner: Arc<std::sync::Mutex<std::collections::HashMap<berth_model::InstanceKey, HealthStats>>>,
}

impl HealthStatsMap {
    /// Count one probe of `key`.
    pub fn record(&self, key: &berth_model::InstanceKey, ok: bool, took: Duration) {
        if let Ok(mut m) = self.inner.lock() {
            let s = m.entry(key.clone()).or_default();
            s.checks += 1;
            s.failures += u64::from(!ok);
            s.last_seconds = took.as_secs_f64();
        }
    }

    /// Forget `key` (its supervisor ended).
    pub fn remove(&self, key: &berth_model::InstanceKey) {
        if let Ok(mut m) = self.inner.lock() {
            m.remove(key);
        }
    }

    /// Every instance's figures.
    pub fn snapshot(&self) -> std::collections::HashMap<berth_model::InstanceKey, HealthStats> {
        self.inner.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// Probe forever, publishing every result. Runs as long as the instance's
/// process does: the supervisor drops this future when the process ends.
pub async fn monitor(
    check: Healthcheck,
    target: ProbeTarget,
    out: watch::Sender<Option<HealthReport>>,
) {
    monitor_with(check, target, None, out, None).await;
}

/// [`monitor`], probing through `prober` when given.
pub async fn monitor_with(
    check: Healthcheck,
    target: ProbeTarget,
    prober: Option<Arc<dyn Prober>>,
    out: watch::Sender<Option<HealthReport>>,
    stats: Option<(HealthStatsMap, berth_model::InstanceKey)>,
) {
    let mut tracker = Tracker::new(check.clone(), Instant::now());
    loop {
        let due = tracker.next_probe();
        tokio::time::sleep_until(due).await;
        let admitted = match &prober {
            Some(p) => p.admit(&check.test).await,
            None => None,
        };
        let began = Instant::now();
        let result = match &prober {
            Some(p) => bounded(p.probe(&check.test, &target), tracker.timeout()).await,
            None => probe(&check.test, &target, tracker.timeout()).await,
        };
        drop(admitted);
        tracker.record(due, &result);
        let report = HealthReport {
            health: tracker.health(),
            output: result.output,
            ok: result.ok,
            took: began.elapsed(),
        };
        // Counted here, not by the receiver: a watch keeps only the latest
        // report, so a reader would miss probes that ran between its polls.
        if let Some((stats, key)) = &stats {
            stats.record(key, report.ok, report.took);
        }
        out.send_replace(Some(report));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(retries: u32, start_period_ms: u64) -> Healthcheck {
        Healthcheck {
            test: HealthTest::Tcp { port: None },
            interval_ms: 1000,
            timeout_ms: 100,
            retries,
            start_period_ms,
            start_interval_ms: 500,
        }
    }

    fn res(ok: bool) -> ProbeResult {
        ProbeResult {
            ok,
            output: String::new(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failures_count_only_on_the_regular_schedule_after_the_start_period() {
        let t0 = Instant::now();
        let mut t = Tracker::new(check(2, 2000), t0);
        // Ramp probes and start-period probes fail without counting.
        for _ in 0..20 {
            let due = t.next_probe();
            tokio::time::sleep_until(due).await;
            t.record(due, &res(false));
            if due > t0 + Duration::from_millis(2000) {
                break;
            }
        }
        // Past the start period now: two more regular failures → unhealthy.
        let mut regular_failures = 0;
        while t.health() != Health::Unhealthy {
            let due = t.next_probe();
            tokio::time::sleep_until(due).await;
            let regular = due >= t.next_regular;
            t.record(due, &res(false));
            if regular {
                regular_failures += 1;
            }
            assert!(regular_failures <= 2, "unhealthy too late");
        }
        assert!(Instant::now() >= t0 + Duration::from_millis(2000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_during_start_makes_it_healthy_quickly_and_success_resets() {
        let t0 = Instant::now();
        let mut t = Tracker::new(check(1, 0), t0);
        assert_eq!(t.health(), Health::Starting);
        let due = t.next_probe();
        assert!(due - t0 < Duration::from_millis(100), "ramp probes early");
        t.record(due, &res(true));
        assert_eq!(t.health(), Health::Healthy);
        // Healthy: only regular probes now, one failure (retries 1) flips it.
        let due = t.next_probe();
        assert!(due - t0 >= Duration::from_millis(1000));
        tokio::time::sleep_until(due).await;
        t.record(due, &res(false));
        assert_eq!(t.health(), Health::Unhealthy);
        let due = t.next_probe();
        tokio::time::sleep_until(due).await;
        t.record(due, &res(true));
        assert_eq!(t.health(), Health::Healthy);
    }

    #[test]
    fn output_is_trimmed() {
        let long = "x".repeat(5000);
        assert!(trim_output(&long).len() <= MAX_OUTPUT + 3);
        assert_eq!(trim_output("  ok \n"), "ok");
    }
}
