//! The resolved stack: what a stack file means once interpolation, env files,
//! `extends`, `include`, profiles and defaults have been applied.
//!
//! These types are the contract between the loader and everything downstream
//! (model, scheduler, agent, server). They are plain data: no paths are
//! relative (the loader makes them absolute against the project directory),
//! no variables remain, and every default is filled in, so a consumer never
//! re-implements Compose rules.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A resolved stack (Compose's "project").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stack {
    /// Stack name, by Compose's precedence: `-p`, else `COMPOSE_PROJECT_NAME`
    /// (environment or `.env`), else top-level `name:`, else the project
    /// folder's name (lower-cased, only `[a-z0-9_-]`, as Compose normalises it).
    pub name: String,
    /// The folder relative paths were resolved against.
    pub project_dir: PathBuf,
    /// Where this stack came from, for messages and for `berth config`.
    pub source: SourceKind,
    /// Services that are active (their profile is enabled, or they have none).
    pub services: BTreeMap<String, Service>,
    /// Top-level named volumes (kept across `down` unless `-v`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volumes: BTreeMap<String, Volume>,
    /// Top-level networks, kept as written (used by the Docker driver).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub networks: BTreeMap<String, serde_json::Value>,
    /// Top-level `x-*` fields, kept verbatim and otherwise ignored.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extensions: BTreeMap<String, serde_json::Value>,
}

/// What kind of file a stack was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// A Compose file (`compose.yaml`, `docker-compose.yml`, `berth.yml`…).
    Compose,
    /// A Heroku-style `Procfile`.
    Procfile,
}

/// One service: the template its instances are made from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Service {
    /// The service's name (its key under `services:`).
    pub name: String,
    /// `image:`; a service with an image (or `build`) runs on the Docker driver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// `build:`, resolved to an absolute context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<Build>,
    /// `pull_policy:` (`always`, `never`, `missing`, `build`), as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_policy: Option<String>,
    /// `entrypoint:`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Command>,
    /// `command:`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Command>,
    /// `working_dir:`, absolute. For processes, defaults to the project dir.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<PathBuf>,
    /// `user:`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Environment after `env_file` and `environment` (the latter wins).
    /// `None` is a variable listed without a value (`- FOO`) and not set in
    /// the loader's environment: Compose passes it through unset.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub environment: BTreeMap<String, Option<String>>,
    /// `ports:`, short and long syntax normalised to one form each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Port>,
    /// `depends_on:`, list and map syntax normalised.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub depends_on: BTreeMap<String, Dependency>,
    /// `links:` (service names, aliases dropped), for env injection.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<String>,
    /// The health check, if any. `disable: true` or `test: NONE` give `None`.
    /// An `x-berth.healthcheck` (HTTP/TCP) is merged here too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<Healthcheck>,
    /// `restart:`, or `deploy.restart_policy` translated (the latter wins, as
    /// in Compose v2).
    pub restart: RestartPolicy,
    /// `deploy:`.
    pub deploy: Deploy,
    /// `stop_signal:`, normalised to the `SIGTERM` form. Default `SIGTERM`.
    pub stop_signal: String,
    /// `stop_grace_period:` in milliseconds. Default 10 000.
    pub stop_grace_period_ms: u64,
    /// `labels:` (map and list syntax).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// `profiles:` the service belongs to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profiles: Vec<String>,
    /// `volumes:` (short and long syntax), host paths made absolute.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
    /// `tmpfs:` mount points.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tmpfs: Vec<String>,
    /// `networks:` the service joins, with aliases.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub networks: BTreeMap<String, ServiceNetwork>,
    /// `extra_hosts:` as `host:ip` strings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_hosts: Vec<String>,
    /// `init:`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<bool>,
    /// `read_only:`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// `cap_add:`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    /// `cap_drop:`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_drop: Vec<String>,
    /// The `x-berth:` block: what Compose lacks.
    #[serde(default)]
    pub berth: BerthExt,
    /// Other `x-*` fields of the service, kept verbatim and ignored.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extensions: BTreeMap<String, serde_json::Value>,
}

impl Service {
    /// A service with Compose's defaults and nothing else: restart `no`,
    /// 1 replica, SIGTERM with a 10 s grace period. The one place those
    /// defaults live; both the Compose and the Procfile loader start here.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            image: None,
            build: None,
            pull_policy: None,
            entrypoint: None,
            command: None,
            working_dir: None,
            user: None,
            environment: BTreeMap::new(),
            ports: Vec::new(),
            depends_on: BTreeMap::new(),
            links: Vec::new(),
            healthcheck: None,
            restart: RestartPolicy::No,
            deploy: Deploy {
                mode: DeployMode::Replicated,
                replicas: 1,
                resources: Resources::default(),
                update_config: None,
                rollback_config: None,
                placement: Placement::default(),
                labels: BTreeMap::new(),
            },
            stop_signal: "SIGTERM".into(),
            stop_grace_period_ms: 10_000,
            labels: BTreeMap::new(),
            profiles: Vec::new(),
            volumes: Vec::new(),
            tmpfs: Vec::new(),
            networks: BTreeMap::new(),
            extra_hosts: Vec::new(),
            init: None,
            read_only: false,
            cap_add: Vec::new(),
            cap_drop: Vec::new(),
            berth: BerthExt::default(),
            extensions: BTreeMap::new(),
        }
    }

    /// The TCP ports it declares, in order, each once: its `ports` targets
    /// (which include `expose`). What its stable address forwards, and
    /// what a container is published on when other nodes must reach it.
    pub fn tcp_ports(&self) -> Vec<u16> {
        let mut out = Vec::new();
        for p in &self.ports {
            if p.protocol == "tcp" && !out.contains(&p.target) {
                out.push(p.target);
            }
        }
        out
    }

    /// The driver this service runs on.
    pub fn driver(&self) -> Driver {
        if self.image.is_some() || self.build.is_some() {
            Driver::Docker
        } else {
            Driver::Process
        }
    }
}

/// How a service's instances are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    /// A plain child process (the default: any language, no engine needed).
    Process,
    /// A Docker container (`image:` or `build:`).
    Docker,
}

/// `command`/`entrypoint`: a string runs through `sh -c` (as Compose does for
/// the shell form), a list is exec'd directly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Command {
    /// Shell form, run as `sh -c STRING`.
    Shell(String),
    /// Exec form, `argv[0]` looked up in `PATH`.
    Exec(Vec<String>),
}

/// `build:`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Build {
    /// Absolute build context, or a URL kept as written (see
    /// [`Build::is_remote`]).
    pub context: PathBuf,
    /// Dockerfile path relative to the context (default `Dockerfile`).
    pub dockerfile: String,
    /// Build args.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub args: BTreeMap<String, String>,
    /// Build target stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl Build {
    /// Whether the context is a URL (`https://…`, `git@…`), which the
    /// loader keeps as written instead of resolving it as a path.
    pub fn is_remote(&self) -> bool {
        self.context.to_str().is_some_and(crate::loader::is_remote)
    }
}

/// One published or exposed port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    /// Container-side port. For processes: the port the service listens on
    /// in the stack file's terms; berth gives each instance its own `PORT`.
    pub target: u16,
    /// Host-side port, if published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<u16>,
    /// Host IP to publish on (default all interfaces for Docker; berth's
    /// proxy binds 127.0.0.1 unless one is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// Long syntax `app_protocol` (e.g. `http`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    /// Long syntax `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Long syntax `mode`: `host` or `ingress`, as written (Swarm's
    /// publishing modes; `None` when not given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// One `depends_on` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dependency {
    /// What must hold before the dependent starts.
    pub condition: DependencyCondition,
    /// Restart the dependent when this dependency is updated.
    #[serde(default)]
    pub restart: bool,
    /// When false, a missing/failed dependency only warns.
    pub required: bool,
}

/// `depends_on.<svc>.condition`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DependencyCondition {
    /// The dependency has been started.
    ServiceStarted,
    /// The dependency's health check passes.
    ServiceHealthy,
    /// The dependency ran to completion with exit code 0.
    ServiceCompletedSuccessfully,
}

/// A health check, normalised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Healthcheck {
    /// What to run or probe.
    pub test: HealthTest,
    /// Default 30 000 ms (Compose's default).
    pub interval_ms: u64,
    /// Default 30 000 ms.
    pub timeout_ms: u64,
    /// Consecutive failures before `unhealthy`. Default 3.
    pub retries: u32,
    /// Failures during this period do not count. Default 0.
    pub start_period_ms: u64,
    /// Probe interval during the start period. Default 5 000 ms.
    pub start_interval_ms: u64,
}

/// The probe of a health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum HealthTest {
    /// `["CMD", argv...]`: exec'd directly.
    Exec {
        /// Program and arguments.
        argv: Vec<String>,
    },
    /// `["CMD-SHELL", "..."]` or a plain string: run through `sh -c`.
    Shell {
        /// Shell command line.
        command: String,
    },
    /// berth extension: HTTP GET must answer 2xx/3xx.
    Http {
        /// Port to probe; `None` means the instance's `PORT`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
        /// Request path, default `/`.
        path: String,
    },
    /// berth extension: a TCP connect must succeed.
    Tcp {
        /// Port to probe; `None` means the instance's `PORT`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
    },
}

/// When to restart an instance that exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "policy", rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never restart.
    No,
    /// Always restart, whatever the exit status.
    Always,
    /// Restart on non-zero exit, at most `max_attempts` times if given.
    OnFailure {
        /// Give up after this many restarts.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_attempts: Option<u32>,
    },
    /// Like `always`, but not after an explicit `berth stop`.
    UnlessStopped,
}

/// `deploy:`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deploy {
    /// `replicated` (default) or `global`.
    pub mode: DeployMode,
    /// Default 1.
    pub replicas: u32,
    /// `deploy.resources`.
    #[serde(default)]
    pub resources: Resources,
    /// `deploy.update_config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_config: Option<UpdateConfig>,
    /// `deploy.rollback_config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_config: Option<UpdateConfig>,
    /// `deploy.placement`.
    #[serde(default)]
    pub placement: Placement,
    /// `deploy.labels`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// `deploy.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeployMode {
    /// `replicas` copies, placed by the scheduler.
    Replicated,
    /// One copy per eligible node.
    Global,
}

/// `deploy.resources`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    /// Hard limits.
    #[serde(default)]
    pub limits: ResourceSpec,
    /// Reservations (used by the scheduler).
    #[serde(default)]
    pub reservations: ResourceSpec,
}

/// cpus / memory / pids.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourceSpec {
    /// CPUs, e.g. 0.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Memory in bytes (`512M`, `1g` parsed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Max number of processes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
}

/// `deploy.update_config` / `rollback_config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateConfig {
    /// Instances updated at once. Default 1.
    pub parallelism: u32,
    /// Pause between batches, ms.
    pub delay_ms: u64,
    /// `pause`, `continue` or `rollback`. Default `rollback` for berth.
    pub failure_action: String,
    /// How long a new instance is watched after start, ms.
    pub monitor_ms: u64,
    /// Tolerated failure ratio.
    pub max_failure_ratio: f64,
    /// `stop-first` or `start-first`; `None` = berth decides (start-first
    /// for services with routes or published ports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<String>,
}

/// `deploy.placement`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    /// Swarm-syntax constraints, as written (`node.labels.zone == east`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<String>,
    /// `spread: node.labels.X` preferences (the label expression).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preferences: Vec<String>,
    /// `max_replicas_per_node`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_replicas_per_node: Option<u32>,
}

/// A `volumes:` entry of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    /// `bind`, `volume` or `tmpfs`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Absolute host path (bind) or volume name (volume); empty for anonymous.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Path inside the container.
    pub target: String,
    /// Mounted read-only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

/// A top-level volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// `external: true`: not created or removed by berth.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub external: bool,
    /// Explicit `name:`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A service's attachment to a network.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceNetwork {
    /// Extra DNS names on that network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
}

/// The `x-berth:` block of a service: what Compose has no words for.
///
/// ```yaml
/// x-berth:
///   healthcheck: { http: /healthz }        # or { tcp: true }, port optional
///   routes: ["api.example.com/v1"]         # host[/path-prefix], for the router
///   port_env: PORT                          # name of the port variable
/// ```
///
/// An `x-berth.healthcheck` takes the same `interval`/`timeout`/`retries`/
/// `start_period`/`start_interval` keys as Compose's, with faster defaults
/// suited to HTTP/TCP probes: 2s, 2s, 3, 0, 500ms (the Procfile `web` check
/// uses the same). It becomes `Service::healthcheck`; a service may not have
/// both it and a Compose `healthcheck`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BerthExt {
    /// Router rules `host[/path]` for this service (the router issue).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<String>,
    /// Name of the env var carrying the instance's port. Default `PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_env: Option<String>,
    /// `x-berth.placement`: what `deploy.placement` cannot say.
    #[serde(default, skip_serializing_if = "BerthPlacement::is_default")]
    pub placement: BerthPlacement,
}

/// `x-berth.placement`: scheduling strategy and service (anti-)affinity.
///
/// ```yaml
/// x-berth:
///   placement:
///     strategy: binpack         # or spread (the default)
///     affinity: [cache]         # only on nodes running an instance of `cache`
///     anti_affinity: [db]       # never on a node running an instance of `db`
/// ```
///
/// Services are named as in the same stack file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BerthPlacement {
    /// How a node is chosen among the feasible ones.
    #[serde(default)]
    pub strategy: Strategy,
    /// Services of the same stack an instance must share a node with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub affinity: Vec<String>,
    /// Services of the same stack an instance must not share a node with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anti_affinity: Vec<String>,
}

impl BerthPlacement {
    /// Nothing set (for `skip_serializing_if`).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// Placement strategy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Fewest instances of the service, then fewest overall (Swarm's).
    #[default]
    Spread,
    /// The fullest node that still fits (by reserved cpus and memory, then
    /// instance count): keeps whole nodes free for big instances.
    Binpack,
}
