//! The driver interface: how an instance is started, signalled, stopped and
//! waited for. The supervisor only talks to these traits, so a Docker driver
//! can be added without touching supervision, health checks or logs.
//!
//! A [`Driver`] turns a [`LaunchSpec`] into a [`Started`] instance: a
//! [`Handle`] plus the instance's output streams. Operations a driver cannot
//! do are answered with [`DriverError::Unsupported`], never faked.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use berth_model::InstanceKey;
use berth_spec::types::{Driver as DriverKind, ResourceSpec, Service};
use nix::sys::signal::Signal;
use tokio::io::AsyncRead;

use crate::health::Prober;

pub mod cgroup;
pub mod command;
pub mod docker;
pub mod hosts;
pub mod process;

/// Everything a driver needs to start one instance.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// Which slot this is (names cgroups, containers…).
    pub key: InstanceKey,
    /// The assignment incarnation.
    pub uid: String,
    /// Program and arguments, already resolved from `entrypoint`/`command`.
    pub argv: Vec<String>,
    /// The complete environment of the instance (nothing else is inherited).
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub working_dir: PathBuf,
    /// `deploy.resources.limits`.
    pub limits: ResourceSpec,
    /// The whole service template (the Docker driver needs image, mounts,
    /// networks…; the process driver only the fields above).
    pub service: Service,
    /// The release the assignment comes from.
    pub release: u64,
    /// Restarts of this incarnation so far (set by the supervisor before
    /// each start; the Docker driver labels containers with it so an
    /// adopted container keeps its count).
    pub restarts: u32,
}

/// An output stream of an instance.
pub type Output = Pin<Box<dyn AsyncRead + Send>>;

/// A freshly started instance.
pub struct Started {
    /// Control over the running instance.
    pub handle: Box<dyn Handle>,
    /// Its stdout, if the driver captures it.
    pub stdout: Option<Output>,
    /// Its stderr, if the driver captures it.
    pub stderr: Option<Output>,
    /// Why resource limits could not be applied, if they could not.
    pub limits_warning: Option<String>,
    /// The address the instance is reached on, when it is not the node's
    /// (a container's IP on its bridge network, when it is not published).
    pub address: Option<String>,
    /// How health checks reach the instance, when not as a local process
    /// (containers: exec through the engine, HTTP/TCP to the container IP).
    pub prober: Option<Arc<dyn Prober>>,
    /// Set when the driver re-attached to an instance a previous agent
    /// started (an adopted container): its restart count so far.
    pub adopted_restarts: Option<u32>,
    /// What was started, for the `started …` log line (default `pid N`).
    pub detail: Option<String>,
    /// Declared port → the port on `address` that reaches it, for a
    /// container published on its node's address (empty: reached on its
    /// declared ports).
    pub host_ports: BTreeMap<u16, u16>,
}

/// How an instance ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(Signal),
}

impl Exit {
    /// Whether this counts as success for `on-failure`.
    pub fn success(&self) -> bool {
        matches!(self, Self::Code(0))
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Code(c) => write!(f, "exited with code {c}"),
            Self::Signal(s) => write!(f, "killed by {}", s.as_str()),
        }
    }
}

/// What a driver can do, so callers can ask before they try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Can send arbitrary signals to the instance.
    pub signals: bool,
    /// Can apply `deploy.resources.limits` on this machine.
    pub resource_limits: bool,
}

/// Errors of a driver.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The driver cannot do this at all (e.g. the process driver asked to run
    /// an image).
    #[error("the {driver} driver does not support {what}")]
    Unsupported {
        /// Driver name.
        driver: &'static str,
        /// What was asked.
        what: String,
    },
    /// The launch spec is unusable (empty command…).
    #[error("invalid launch spec: {0}")]
    Invalid(String),
    /// The OS refused to start the instance.
    #[error("could not start {program:?}: {source}")]
    Spawn {
        /// argv[0].
        program: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Waiting for or signalling the instance failed.
    #[error("instance control failed: {0}")]
    Io(#[from] std::io::Error),
    /// No container engine answers: retrying will not help until one is
    /// started or configured.
    #[error("{0}")]
    EngineUnavailable(String),
    /// The container engine refused or failed a request.
    #[error("{0}")]
    Engine(String),
    /// The image cannot be had (missing with `pull_policy: never`, failed
    /// pull or build): retrying the same incarnation will not help.
    #[error("{0}")]
    Image(String),
    /// This node cannot run it as configured (a container's ports cannot
    /// be published on the node's advertise address): retrying will not
    /// help until the agent is restarted with another configuration.
    #[error("{0}")]
    NodeConfig(String),
}

impl DriverError {
    /// Whether restarting the same incarnation cannot succeed, so the
    /// instance should fail instead of entering a restart loop.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Self::Unsupported { .. }
                | Self::EngineUnavailable(_)
                | Self::Image(_)
                | Self::NodeConfig(_)
        )
    }
}

/// Starts instances.
#[async_trait]
pub trait Driver: Send + Sync + 'static {
    /// Short name (`process`, `docker`).
    fn name(&self) -> &'static str;
    /// What this driver can do here.
    fn capabilities(&self) -> Capabilities;
    /// Whether this driver runs services of this kind.
    fn runs(&self, kind: DriverKind) -> bool {
        kind == DriverKind::Process
    }
    /// Start one instance.
    async fn start(&self, spec: &LaunchSpec) -> Result<Started, DriverError>;
}

/// Control over one running instance.
///
/// `wait` is cancel-safe: the supervisor selects on it together with its
/// commands and calls `stop` on the same handle afterwards.
#[async_trait]
pub trait Handle: Send {
    /// OS pid of the main process, if there is one.
    fn pid(&self) -> Option<u32>;
    /// Send a signal to the whole instance (all its processes).
    fn signal(&self, signal: Signal) -> Result<(), DriverError>;
    /// Whether the main process has already ended, asked without waiting
    /// for it. A passing HTTP or TCP check proves nothing about an instance
    /// that is gone: whatever else listens on its port answered it. Errors
    /// count as "not ended" (the wait reports them).
    async fn ended(&mut self) -> bool;
    /// Wait for the main process to end, then make sure nothing of the
    /// instance remains (left-over processes are killed).
    async fn wait(&mut self) -> Result<Exit, DriverError>;
    /// Send `signal`, wait up to `grace`, then kill everything of the instance.
    async fn stop(&mut self, signal: Signal, grace: Duration) -> Result<Exit, DriverError>;
}

/// Dispatches each instance to the driver of its service's kind
/// ([`Service::driver`]): the agent's single [`Driver`].
pub struct ByKind {
    /// Runs `Driver::Process` services.
    pub process: Arc<dyn Driver>,
    /// Runs `Driver::Docker` services.
    pub docker: Arc<dyn Driver>,
}

#[async_trait]
impl Driver for ByKind {
    fn name(&self) -> &'static str {
        "process+docker"
    }

    fn capabilities(&self) -> Capabilities {
        self.process.capabilities()
    }

    fn runs(&self, kind: DriverKind) -> bool {
        self.process.runs(kind) || self.docker.runs(kind)
    }

    async fn start(&self, spec: &LaunchSpec) -> Result<Started, DriverError> {
        match spec.service.driver() {
            DriverKind::Docker => self.docker.start(spec).await,
            DriverKind::Process => self.process.start(spec).await,
        }
    }
}

/// Parse a signal name as normalised by the spec (`SIGTERM`), also accepting
/// `TERM` and numbers.
pub fn parse_signal(name: &str) -> Option<Signal> {
    let upper = name.trim().to_ascii_uppercase();
    if let Ok(n) = upper.parse::<i32>() {
        return Signal::try_from(n).ok();
    }
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_in_every_spelling() {
        assert_eq!(parse_signal("SIGTERM"), Some(Signal::SIGTERM));
        assert_eq!(parse_signal("int"), Some(Signal::SIGINT));
        assert_eq!(parse_signal("9"), Some(Signal::SIGKILL));
        assert_eq!(parse_signal("SIGNOPE"), None);
    }
}
