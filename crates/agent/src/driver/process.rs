//! The `process` driver: every instance is a plain child process in its own
//! process group (so signals reach its whole tree), with stdin on
//! `/dev/null`, stdout and stderr piped to the agent, a clean environment,
//! and (when cgroups are writable) its own cgroup, joined before exec, which
//! carries the service's limits if it has any.
//!
//! No process of an instance outlives it: when the main process exits, or
//! after a stop, whatever is left in its process group and its cgroup is
//! SIGKILLed. (A grandchild that `setsid`s away escapes the group; only the
//! cgroup catches it, so that guarantee needs cgroups.)
//!
//! An instance of a stack whose services have stable addresses starts in its
//! own mount namespace with the stack's hosts file as `/etc/hosts`
//! ([`super::hosts`]), so service names resolve; when the kernel refuses
//! that, the instance is started again without it and name injection is
//! turned off for this agent (said once in the log).

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use super::cgroup::{Cgroups, InstanceCgroup};
use super::hosts::{HostsFiles, HostsMount, enter_before_exec};
use super::{Capabilities, Driver, DriverError, Exit, Handle, LaunchSpec, Started};

/// How long to wait for a killed process group to disappear.
const REAP_WAIT: Duration = Duration::from_millis(500);

/// Runs instances as child processes.
#[derive(Debug, Clone)]
pub struct ProcessDriver {
    cgroups: Arc<Cgroups>,
    hosts: Option<Arc<HostsFiles>>,
}

impl ProcessDriver {
    /// A driver using this machine's cgroups (when an instance has limits).
    pub fn new(cgroups: Arc<Cgroups>) -> Self {
        Self {
            cgroups,
            hosts: None,
        }
    }

    /// Map service names to their addresses in each instance's
    /// `/etc/hosts`, with the per-stack hosts files kept under `dir`.
    pub fn with_hosts_dir(mut self, dir: std::path::PathBuf) -> Self {
        self.hosts = Some(Arc::new(HostsFiles::new(dir)));
        self
    }
}

/// The child's command, without its cgroup and namespace set-up.
fn command(program: &str, args: &[String], spec: &LaunchSpec) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(&spec.env)
        .current_dir(&spec.working_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    cmd
}

fn cgroup_name(spec: &LaunchSpec) -> String {
    let uid: String = spec
        .uid
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(16)
        .collect();
    format!(
        "{}.{}.{}.{}-{uid}",
        spec.key.namespace, spec.key.stack, spec.key.service, spec.key.slot
    )
}

fn has_limits(spec: &LaunchSpec) -> bool {
    let l = &spec.limits;
    l.cpus.is_some() || l.memory_bytes.is_some() || l.pids.is_some()
}

/// Make the child join its cgroups between fork and exec.
///
/// This is the crate's only `unsafe`: `pre_exec` runs in the forked child,
/// where only async-signal-safe calls are allowed. The closure only calls
/// `write(2)` on descriptors opened by the parent (captured as plain
/// integers, no allocation), writing `0`, which the kernel reads as "the
/// writing process". The descriptors are close-on-exec, so the program never
/// sees them.
#[allow(unsafe_code)]
fn join_cgroup_before_exec(cmd: &mut Command, fds: Vec<std::os::fd::RawFd>) {
    let closure = move || -> std::io::Result<()> {
        for fd in &fds {
            // SAFETY: write(2) is async-signal-safe; `fd` stays open in the
            // child until exec because the parent keeps it open until spawn
            // returns.
            let n = unsafe { libc::write(*fd, b"0".as_ptr().cast(), 1) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: see the function's documentation.
    unsafe {
        cmd.pre_exec(closure);
    }
}

#[async_trait]
impl Driver for ProcessDriver {
    fn name(&self) -> &'static str {
        "process"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            signals: true,
            resource_limits: self.cgroups.available(),
        }
    }

    async fn start(&self, spec: &LaunchSpec) -> Result<Started, DriverError> {
        let Some((program, args)) = spec.argv.split_first() else {
            return Err(DriverError::Invalid("empty argv".into()));
        };
        if !spec.working_dir.is_dir() {
            return Err(DriverError::Invalid(format!(
                "working directory {} does not exist",
                spec.working_dir.display()
            )));
        }
        let mut limits_warning = None;
        let mut cgroup = None;
        // Every instance gets a cgroup when they are writable, limits or
        // not: it is what finds the grandchildren that `setsid` away from
        // the process group when the instance stops.
        if self.cgroups.available() || has_limits(spec) {
            match self.cgroups.create(&cgroup_name(spec), &spec.limits) {
                Ok(cg) => cgroup = Some(cg),
                Err(e) if has_limits(spec) => {
                    limits_warning = Some(format!("resource limits not applied: {e}"));
                }
                Err(e) => {
                    tracing::debug!(instance = %spec.key, error = %e, "no cgroup; processes that leave the group may outlive a stop");
                }
            }
        }

        let build = |mount: Option<HostsMount>| {
            let mut cmd = command(program, args, spec);
            if let Some(cg) = &cgroup {
                join_cgroup_before_exec(&mut cmd, cg.procs_fds());
            }
            if let Some(m) = mount {
                enter_before_exec(&mut cmd, m);
            }
            cmd
        };
        let mount = self.hosts.as_ref().and_then(|h| h.prepare(spec));
        let with_names = mount.is_some();
        let mut spawned = build(mount).spawn();
        if with_names && let Err(e) = &spawned {
            // Either the namespace or the program failed: if the program
            // starts without the namespace, it was the namespace.
            let first = e.to_string();
            spawned = build(None).spawn();
            if spawned.is_ok()
                && let Some(h) = &self.hosts
            {
                h.disable(format!(
                    "the kernel refused a private mount namespace with the stack's /etc/hosts ({first})"
                ));
            }
        }
        let mut child = match spawned {
            Ok(c) => c,
            Err(source) => {
                if let Some(cg) = cgroup {
                    tokio::task::spawn_blocking(move || cg.remove()).await.ok();
                }
                return Err(DriverError::Spawn {
                    program: program.clone(),
                    source,
                });
            }
        };
        let pid = child.id();
        let stdout = child.stdout.take().map(|s| Box::pin(s) as super::Output);
        let stderr = child.stderr.take().map(|s| Box::pin(s) as super::Output);
        Ok(Started {
            handle: Box::new(ProcessHandle {
                child,
                pgid: pid.map(|p| Pid::from_raw(p as i32)),
                cgroup: cgroup.map(Arc::new),
                exit: None,
            }),
            stdout,
            stderr,
            limits_warning,
            address: None,
            prober: None,
            adopted_restarts: None,
            detail: None,
            host_ports: Default::default(),
        })
    }
}

/// A running child process (the leader of its process group).
struct ProcessHandle {
    child: Child,
    pgid: Option<Pid>,
    cgroup: Option<Arc<InstanceCgroup>>,
    exit: Option<Exit>,
}

fn exit_of(status: ExitStatus) -> Exit {
    match (status.code(), status.signal()) {
        (Some(c), _) => Exit::Code(c),
        (None, Some(s)) => Signal::try_from(s).map_or(Exit::Code(128 + s), Exit::Signal),
        (None, None) => Exit::Code(-1),
    }
}

impl ProcessHandle {
    /// SIGKILL whatever is left of the instance and wait until it is gone.
    async fn kill_rest(&mut self) {
        if let Some(pgid) = self.pgid {
            let _ = killpg(pgid, Signal::SIGKILL);
            let deadline = Instant::now() + REAP_WAIT;
            // Signal 0 probes whether any member of the group is left.
            while kill(Pid::from_raw(-pgid.as_raw()), None).is_ok() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        if let Some(cg) = self.cgroup.take() {
            let _ = tokio::task::spawn_blocking(move || {
                cg.kill_all();
                cg.remove();
            })
            .await;
        }
    }

    async fn finish(&mut self, status: ExitStatus) -> Exit {
        let exit = exit_of(status);
        self.exit = Some(exit.clone());
        self.kill_rest().await;
        exit
    }
}

#[async_trait]
impl Handle for ProcessHandle {
    fn pid(&self) -> Option<u32> {
        self.pgid.map(|p| p.as_raw() as u32)
    }

    fn signal(&self, signal: Signal) -> Result<(), DriverError> {
        let Some(pgid) = self.pgid else {
            return Ok(());
        };
        match killpg(pgid, signal) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(e) => Err(DriverError::Io(e.into())),
        }
    }

    async fn ended(&mut self) -> bool {
        // `try_wait` reaps an ended child; `wait` then returns its status.
        self.exit.is_some() || matches!(self.child.try_wait(), Ok(Some(_)))
    }

    async fn wait(&mut self) -> Result<Exit, DriverError> {
        if let Some(e) = &self.exit {
            return Ok(e.clone());
        }
        let status = self.child.wait().await?;
        Ok(self.finish(status).await)
    }

    async fn stop(&mut self, signal: Signal, grace: Duration) -> Result<Exit, DriverError> {
        if let Some(e) = &self.exit {
            return Ok(e.clone());
        }
        self.signal(signal)?;
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status?,
            Err(_) => {
                self.signal(Signal::SIGKILL)?;
                if let Some(cg) = self.cgroup.clone() {
                    let _ = tokio::task::spawn_blocking(move || cg.kill_all()).await;
                }
                self.child.wait().await?
            }
        };
        Ok(self.finish(status).await)
    }
}

impl Drop for ProcessHandle {
    fn drop(&mut self) {
        // A handle dropped without stop/wait (a panicking supervisor, an
        // aborted task) must not leave the instance running.
        if self.exit.is_none()
            && let Some(pgid) = self.pgid
        {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        if let Some(cg) = self.cgroup.take() {
            cg.kill_all();
            cg.remove();
        }
    }
}
