//! One supervisor per instance: a task that owns the instance's whole
//! lifecycle — start, health checks, log capture, exit, restart policy with
//! back-off, graceful stop — and reports every change of its
//! [`InstanceStatus`] to a [`StatusSink`] (on change, never periodically).
//!
//! ```text
//!  pending ──► starting ──► running ──(exit)──► policy says restart? ──yes──► backoff ──► starting
//!                 │            │                        │ no
//!          (spawn failed)      │ stop                   ▼
//!                 └──► policy  ▼                 exited / failed ──(stop)──► stopped
//!                           stopping ──► stopped
//! ```
//!
//! Back-off starts at [`Backoff::initial`], doubles on each restart up to
//! [`Backoff::max`], and is reset once an instance has run for
//! [`Backoff::reset_after`], so a crash loop sleeps instead of spinning and a
//! long-lived instance that crashes once comes back fast. The health state
//! is reset to `starting` on every start. The supervisor ends only when told
//! to stop (an exited instance waits, so its status stays visible).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use berth_model::{Assignment, ExitInfo, Health, InstanceState, InstanceStatus, LogStream};
use berth_spec::types::{Driver as DriverKind, HealthTest, RestartPolicy};
use nix::sys::signal::Signal;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::driver::command::{LaunchContext, launch_spec};
use crate::driver::{Driver, DriverError, Exit, LaunchSpec, Started, parse_signal};
use crate::health::{self, HealthReport, ProbeTarget};
use crate::logs::LogStore;
use crate::now_ms;
use crate::ports::{PortAllocator, PortLease};

/// Where supervisors send their status updates.
pub trait StatusSink: Send + Sync + 'static {
    /// The instance's status changed; this is the whole new status.
    fn update(&self, status: InstanceStatus);
}

impl StatusSink for mpsc::UnboundedSender<InstanceStatus> {
    fn update(&self, status: InstanceStatus) {
        // A closed receiver means nobody is interested any more.
        let _ = self.send(status);
    }
}

/// Restart back-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// First delay. Default 100 ms.
    pub initial: Duration,
    /// Cap. Default 30 s.
    pub max: Duration,
    /// An instance that ran this long restarts with the initial delay again.
    /// Default 10 s.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(10),
        }
    }
}

/// What every supervisor of a node shares.
pub struct Context {
    /// The driver instances run on.
    pub driver: Arc<dyn Driver>,
    /// The node's log store.
    pub logs: LogStore,
    /// The node's port allocator.
    pub ports: PortAllocator,
    /// Where status updates go.
    pub sink: Arc<dyn StatusSink>,
    /// This node's id.
    pub node: String,
    /// The address instances are reached on.
    pub address: String,
    /// This agent's id (the orphan marker).
    pub agent_id: String,
    /// Working directory when neither the service nor the stack gives one.
    pub fallback_dir: PathBuf,
    /// The agent's environment (only the basics are passed on).
    pub inherited_env: BTreeMap<String, String>,
    /// Restart back-off.
    pub backoff: Backoff,
    /// Health-check figures per instance (for the metrics API).
    pub health_stats: health::HealthStatsMap,
}

/// A running supervisor, for callers that do not manage the task themselves.
pub struct Supervisor {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Supervisor {
    /// Start supervising `assignment`.
    pub fn spawn(ctx: Arc<Context>, assignment: Assignment) -> Self {
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(run(ctx, assignment, rx));
        Self {
            stop,
            task: Some(task),
        }
    }

    /// Stop the instance gracefully and wait until it is stopped.
    pub async fn stop(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
        {
            tracing::error!(error = %e, "supervisor task failed");
        }
    }
}

/// Resolves once a stop is asked for (or nobody can ask any more).
pub(crate) async fn stop_requested(rx: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send: drop it here.
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // Dropped without `stop`: the task still stops the instance
        // gracefully instead of running it forever without an owner.
        self.stop.send_replace(true);
    }
}

/// How long the log pumps may take to drain the pipes of a finished
/// instance.
const PUMP_DRAIN: Duration = Duration::from_millis(250);

fn needs_port(a: &Assignment) -> bool {
    !a.service.ports.is_empty()
        || matches!(
            a.service.healthcheck.as_ref().map(|h| &h.test),
            Some(HealthTest::Http { port: None, .. } | HealthTest::Tcp { port: None })
        )
}

/// How the instance ended, or code -1 when the driver cannot say.
fn exit_or_unknown(r: Result<Exit, DriverError>, key: &berth_model::InstanceKey) -> Exit {
    r.unwrap_or_else(|e| {
        tracing::warn!(instance = %key, error = %e, "wait failed");
        Exit::Code(-1)
    })
}

/// The status a supervisor starts from.
pub fn initial_status(a: &Assignment, node: &str, address: &str) -> InstanceStatus {
    InstanceStatus {
        health: initial_health(a),
        address: Some(address.to_owned()),
        ..InstanceStatus::new(a.key.clone(), a.uid.clone(), node, a.release, now_ms())
    }
}

fn initial_health(a: &Assignment) -> Health {
    if a.service.healthcheck.is_some() {
        Health::Starting
    } else {
        Health::None
    }
}

enum Outcome {
    /// The process ended by itself (or could not start).
    Exited { exit: Exit, ran_for: Duration },
    /// We stopped it.
    Stopped,
}

struct Run {
    ctx: Arc<Context>,
    a: Assignment,
    st: InstanceStatus,
    stop: watch::Receiver<bool>,
    /// The port the instance itself listens on (its `PORT`; a container's
    /// first declared port), which health checks use: `st.port` is where
    /// others reach it, a host port when the container is published.
    listen_port: Option<u16>,
}

impl Run {
    fn emit(&mut self) {
        self.st.updated_at = now_ms();
        self.ctx.sink.update(self.st.clone());
    }

    async fn log(&self, text: &str) {
        self.ctx.logs.system(&self.a.key, text).await;
    }

    fn stop_requested(&self) -> bool {
        *self.stop.borrow()
    }

    async fn wait_for_stop(&mut self) {
        stop_requested(&mut self.stop).await;
    }

    /// Give up: the instance cannot run; wait to be told to stop.
    async fn fail_permanently(&mut self, message: String) {
        self.log(&message).await;
        self.st.state = InstanceState::Failed;
        self.st.message = Some(message);
        self.emit();
        self.wait_for_stop().await;
    }

    async fn supervise(&mut self, mut spec: LaunchSpec) {
        let policy = self.a.service.restart;
        let signal = parse_signal(&self.a.service.stop_signal).unwrap_or(Signal::SIGTERM);
        let grace = Duration::from_millis(self.a.service.stop_grace_period_ms);
        let backoff = self.ctx.backoff;
        let mut delay = backoff.initial;
        loop {
            if self.stop_requested() {
                return;
            }
            self.st.state = InstanceState::Starting;
            self.st.health = initial_health(&self.a);
            self.st.health_output = None;
            self.st.pid = None;
            self.emit();
            spec.restarts = self.st.restarts;
            let outcome = match self.ctx.driver.start(&spec).await {
                Ok(started) => self.run_once(started, &spec, signal, grace).await,
                Err(e) if e.is_permanent() => {
                    self.fail_permanently(e.to_string()).await;
                    return;
                }
                Err(e) => {
                    let msg = format!("failed to start: {e}");
                    self.log(&msg).await;
                    self.st.message = Some(msg);
                    Outcome::Exited {
                        // What a shell says for "command not found".
                        exit: Exit::Code(127),
                        ran_for: Duration::ZERO,
                    }
                }
            };
            let Outcome::Exited { exit, ran_for } = outcome else {
                return;
            };
            // Nothing listens any more: `ps` must not offer an address.
            self.st.pid = None;
            self.st.address = None;
            self.st.port = self.listen_port;
            self.st.host_ports.clear();
            // Nor call it healthy: its last check passed while it ran.
            if self.st.health == Health::Healthy {
                self.st.health = Health::Unhealthy;
                self.st.health_output = Some(format!("not running: {exit}"));
            }
            self.st.last_exit = Some(ExitInfo {
                code: match exit {
                    Exit::Code(c) => Some(c),
                    Exit::Signal(_) => None,
                },
                signal: match exit {
                    Exit::Signal(s) => Some(s.as_str().to_owned()),
                    Exit::Code(_) => None,
                },
                at: now_ms(),
            });
            if ran_for >= backoff.reset_after {
                delay = backoff.initial;
            }
            let restart = match policy {
                RestartPolicy::No => false,
                RestartPolicy::Always | RestartPolicy::UnlessStopped => true,
                RestartPolicy::OnFailure { max_attempts } => {
                    !exit.success() && max_attempts.is_none_or(|m| self.st.restarts < m)
                }
            };
            if !restart {
                let gave_up = matches!(policy, RestartPolicy::OnFailure { .. }) && !exit.success();
                if gave_up {
                    self.st.state = InstanceState::Failed;
                    self.st.message = Some(format!(
                        "{exit}; gave up after {} restart{}",
                        self.st.restarts,
                        if self.st.restarts == 1 { "" } else { "s" }
                    ));
                } else {
                    self.st.state = InstanceState::Exited;
                    self.st.message = Some(exit.to_string());
                }
                if gave_up {
                    self.log(self.st.message.as_deref().unwrap_or_default())
                        .await;
                }
                self.emit();
                self.wait_for_stop().await;
                return;
            }
            let msg = format!("restarting in {}ms", delay.as_millis());
            self.log(&msg).await;
            self.st.state = InstanceState::Backoff;
            self.st.message = Some(format!("{exit}; {msg}"));
            self.emit();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                () = stop_requested(&mut self.stop) => return,
            }
            delay = (delay * 2).min(backoff.max);
            self.st.restarts += 1;
        }
    }

    async fn run_once(
        &mut self,
        started: Started,
        spec: &LaunchSpec,
        signal: Signal,
        grace: Duration,
    ) -> Outcome {
        let Started {
            mut handle,
            stdout,
            stderr,
            limits_warning,
            address,
            prober,
            adopted_restarts,
            detail,
            host_ports,
        } = started;
        let began = tokio::time::Instant::now();
        self.st.state = InstanceState::Running;
        self.st.pid = handle.pid();
        self.st.started_at = Some(now_ms());
        self.st.limits_warning = limits_warning;
        self.st.message = None;
        self.st.address = Some(address.unwrap_or_else(|| self.ctx.address.clone()));
        self.st.host_ports = host_ports;
        self.st.port = self.listen_port.map(|p| self.st.port_of(p));
        if let Some(r) = adopted_restarts {
            self.st.restarts = r;
        }
        self.emit();
        let what = detail.unwrap_or_else(|| {
            format!(
                "pid {}",
                handle.pid().map_or("?".to_owned(), |p| p.to_string())
            )
        });
        self.log(&format!("started {what}")).await;
        if let Some(w) = &self.st.limits_warning {
            self.log(w).await;
        }

        let mut pumps = Vec::new();
        for (stream, out) in [(LogStream::Stdout, stdout), (LogStream::Stderr, stderr)] {
            if let Some(out) = out {
                let logs = self.ctx.logs.clone();
                let key = self.a.key.clone();
                pumps.push(tokio::spawn(async move {
                    logs.capture(&key, stream, out).await
                }));
            }
        }

        let (health_tx, mut health_rx) = watch::channel(None::<HealthReport>);
        let check = self.a.service.healthcheck.clone();
        let target = ProbeTarget {
            port: self.listen_port,
            env: spec.env.clone(),
            working_dir: spec.working_dir.clone(),
        };
        let stats = Some((self.ctx.health_stats.clone(), self.a.key.clone()));
        let monitor = async move {
            match check {
                Some(check) => health::monitor_with(check, target, prober, health_tx, stats).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(monitor);

        let mut stop = self.stop.clone();
        let outcome = loop {
            tokio::select! {
                r = handle.wait() => {
                    let exit = exit_or_unknown(r, &self.a.key);
                    break Outcome::Exited { exit, ran_for: began.elapsed() };
                }
                () = stop_requested(&mut stop) => {
                    self.st.state = InstanceState::Stopping;
                    self.emit();
                    self.log(&format!("stopping ({}, grace {}ms)", signal.as_str(), grace.as_millis())).await;
                    match handle.stop(signal, grace).await {
                        Ok(exit) => self.log(&format!("stopped: {exit}")).await,
                        Err(e) => self.log(&format!("stop failed: {e}")).await,
                    }
                    break Outcome::Stopped;
                }
                () = &mut monitor => {}
                Ok(()) = health_rx.changed() => {
                    let report = health_rx.borrow_and_update().clone();
                    let Some(r) = report else { continue };
                    // A check can pass after the process is gone, answered
                    // by whatever else listens on its port (seen: an
                    // instance that failed to bind, reported healthy). Its
                    // exit may not have been seen yet: ask the driver, and
                    // never turn a dead instance healthy.
                    if r.health == Health::Healthy
                        && self.st.health != Health::Healthy
                        && handle.ended().await
                    {
                        let exit = exit_or_unknown(handle.wait().await, &self.a.key);
                        break Outcome::Exited { exit, ran_for: began.elapsed() };
                    }
                    self.on_health(r).await;
                }
            }
        };
        drop(handle);
        if let Outcome::Exited { exit, .. } = &outcome {
            self.log(&exit.to_string()).await;
        }
        // The instance's processes are dead (group and cgroup), so the pipes
        // close and the pumps end as soon as they drained what was buffered.
        // Without cgroups a grandchild that escaped with setsid could hold
        // them open: waiting longer would not help, only delay every stop.
        let deadline = tokio::time::Instant::now() + PUMP_DRAIN;
        for p in pumps {
            let abort = p.abort_handle();
            if tokio::time::timeout_at(deadline, p).await.is_err() {
                abort.abort();
            }
        }
        outcome
    }

    async fn on_health(&mut self, r: HealthReport) {
        let changed = r.health != self.st.health;
        let output_changed = self.st.health_output.as_deref() != Some(r.output.as_str());
        if !changed && !output_changed {
            return;
        }
        self.st.health = r.health;
        self.st.health_output = Some(r.output.clone());
        if changed {
            tracing::debug!(target: "berth_hops", hop = "probe", instance = %self.a.key, health = %r.health, at_us = crate::now_us());
        }
        self.emit();
        if changed {
            let line = match r.health {
                Health::Unhealthy => format!("health: unhealthy: {}", r.output),
                h => format!("health: {h}"),
            };
            self.log(&line).await;
        }
    }
}

/// Supervise one assignment until `stop` turns true; the last status sent
/// is `stopped`. This is the body of a supervisor task.
pub async fn run(ctx: Arc<Context>, a: Assignment, stop: watch::Receiver<bool>) {
    let st = initial_status(&a, &ctx.node, &ctx.address);
    let mut run = Run {
        ctx: ctx.clone(),
        a,
        st,
        stop,
        listen_port: None,
    };
    run.emit();

    let mut lease: Option<PortLease> = None;
    let setup: Result<LaunchSpec, String> = (|| {
        let kind = run.a.service.driver();
        if !ctx.driver.runs(kind) {
            return Err(DriverError::Unsupported {
                driver: ctx.driver.name(),
                what: "images (`image:`/`build:`); give the service a `command:` to run it as a process"
                    .into(),
            }
            .to_string());
        }
        if kind == DriverKind::Docker {
            // A container listens on its own IP at its target port; the
            // driver publishes it on a host port when other nodes must
            // reach it (one per container, so none is taken here).
            run.st.port = run.a.service.ports.first().map(|p| p.target);
        } else if needs_port(&run.a) {
            let l = ctx
                .ports
                .allocate()
                .map_err(|e| format!("cannot allocate a port: {e}"))?;
            run.st.port = Some(l.port());
            lease = Some(l);
        }
        let lctx = LaunchContext {
            agent_id: &ctx.agent_id,
            fallback_dir: &ctx.fallback_dir,
            inherited: &ctx.inherited_env,
        };
        launch_spec(&run.a, run.st.port, &lctx).map_err(|e| e.to_string())
    })();
    run.listen_port = run.st.port;
    match setup {
        Ok(spec) => run.supervise(spec).await,
        Err(message) => run.fail_permanently(message).await,
    }
    drop(lease);
    ctx.health_stats.remove(&run.a.key);
    run.st.state = InstanceState::Stopped;
    run.st.pid = None;
    run.st.port = None;
    run.st.host_ports.clear();
    run.st.address = None;
    // Whatever it said before ("restarting in 30000ms") is over.
    run.st.message = None;
    run.emit();
}
