//! The `docker` driver: services with `image:` or `build:` run as
//! containers through the Docker Engine API (bollard), with the same
//! supervision, health checks, logs and restarts as processes.
//!
//! What it owns:
//! - **Containers**, one per start of an instance (a restart makes a new
//!   one, as a process restart makes a new process), named
//!   `berth-<ns>-<stack>-<service>-<slot>-<short uid>`, labelled with
//!   `berth.{namespace,stack,service,instance,uid,release,agent,restarts}`,
//!   created with restart policy `no` (the supervisor restarts) and removed
//!   once they have ended and their logs are drained.
//! - **The stack network** `berth_<ns>_<stack>` (a bridge, labelled
//!   `berth.managed`): created with the stack's first container, every
//!   container joins it with its service name and aliases as DNS names, and
//!   it is removed with the stack's last container.
//! - **Named volumes** `<stack>_<name>`, labelled, created on first use and
//!   kept until [`remove_stack_volumes`] (`berth down -v`).
//! - **Adoption**: at agent start, [`DockerDriver::collect_adoptable`] lists
//!   the running containers labelled with this agent's id; a supervisor
//!   whose assignment has the same slot and uid attaches to its container
//!   (logs from now on, wait, stats) instead of starting one, and
//!   [`DockerDriver::sweep`] removes those no assignment wants.
//! - **Stats**: a one-shot engine stats request per container every
//!   [`STATS_EVERY`], the latest sample per instance in a [`StatsMap`].
//!
//! Ports: a container listens on its target ports on its own IP. On one
//! machine (the agent's address is loopback) that IP is the instance's
//! address: every router, DNS server and proxy is on this host and reaches
//! the bridge, and nothing is host-published. When other nodes must reach
//! the instance (a joined agent, or `berth server --advertise IP`: an
//! address that is not loopback), each declared TCP port is published on
//! that address ([`Publish`]) at a host port the agent allocates as it does
//! processes' `PORT`s ([`PortAllocator`]: outside the kernel's ephemeral
//! range, claimed host-wide), and the instance's address and ports are that address and those
//! host ports ([`Started::host_ports`]), as Swarm and Nomad do. A user's
//! `published` TCP port is never bound by the engine: every node's TCP proxy
//! serves it (towards those host ports), and two listeners would collide.
//! A published UDP port is (no proxy carries UDP): the engine binds it on
//! the node that runs the container (see `spec::port_bindings`).
//!
//! Without an engine, starts fail with [`DriverError::EngineUnavailable`],
//! naming the service and how to point berth at an engine.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use berth_model::InstanceKey;
use berth_spec::types::Driver as DriverKind;
use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::models::{ContainerStatsResponse, NetworkCreateRequest, VolumeCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptions, KillContainerOptions, ListContainersOptions, ListNetworksOptions,
    ListVolumesOptions, LogsOptions, RemoveContainerOptions, StatsOptions, WaitContainerOptions,
};
use futures::StreamExt;
use nix::sys::signal::Signal;
use tokio::io::AsyncWriteExt;
use tokio::sync::RwLock;
use tokio::task::JoinHandle;

use super::{Capabilities, Driver, DriverError, Exit, Handle, LaunchSpec, Started};
use crate::logs::LogStore;
use crate::now_ms;
use crate::ports::{PortAllocator, PortLease};

pub mod dns;
mod image;
pub mod preflight;
mod probe;
pub mod spec;

pub use spec::{
    LABEL_AGENT, LABEL_INSTANCE, LABEL_MANAGED, LABEL_NAMESPACE, LABEL_RELEASE, LABEL_SERVICE,
    LABEL_STACK, LABEL_UID, container_name, network_name, volume_name,
};

/// How long a container's log stream may take to drain after it ended.
const DRAIN: Duration = Duration::from_secs(2);
/// How long connecting to the engine may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Container creates and starts in flight at once: the engine serialises
/// much of this work internally (names, network endpoints), so a burst of
/// 50 unbounded requests only queues there while health probes and log
/// streams of the containers already started wait behind them.
const START_CONCURRENCY: usize = 8;
/// Where the engine is when neither the agent nor `DOCKER_HOST` says.
const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";

/// The latest resource sample of one container.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerStats {
    /// The container.
    pub container_id: String,
    /// CPU use since the previous sample, in percent of one CPU (200 = two
    /// CPUs busy).
    pub cpu_percent: f64,
    /// Memory in use, page cache excluded (as `docker stats` shows it).
    pub memory_bytes: u64,
    /// The memory limit the engine reports (the host's memory when none).
    pub memory_limit_bytes: u64,
    /// When the sample was taken, ms since the Unix epoch.
    pub at_ms: u64,
}

/// The latest [`ContainerStats`] of every running container of an agent.
/// Cheap to clone; all clones share the map.
#[derive(Debug, Clone, Default)]
pub struct StatsMap {
    inner: Arc<Mutex<HashMap<InstanceKey, ContainerStats>>>,
}

impl StatsMap {
    /// The latest sample of one instance.
    pub fn get(&self, key: &InstanceKey) -> Option<ContainerStats> {
        self.inner.lock().ok()?.get(key).cloned()
    }

    /// Every instance's latest sample.
    pub fn snapshot(&self) -> HashMap<InstanceKey, ContainerStats> {
        self.inner.lock().map(|m| m.clone()).unwrap_or_default()
    }

    fn put(&self, key: &InstanceKey, s: ContainerStats) {
        if let Ok(mut m) = self.inner.lock() {
            m.insert(key.clone(), s);
        }
    }

    fn remove(&self, key: &InstanceKey, container_id: &str) {
        if let Ok(mut m) = self.inner.lock()
            && m.get(key).is_some_and(|s| s.container_id == container_id)
        {
            m.remove(key);
        }
    }
}

pub(crate) fn is_not_found(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

fn is_status(e: &BollardError, code: u16) -> bool {
    matches!(e, BollardError::DockerResponseServerError { status_code, .. } if *status_code == code)
}

pub(crate) fn engine_error(doing: &str, e: BollardError) -> DriverError {
    DriverError::Engine(format!("docker engine: {doing}: {e}"))
}

/// A lazily made, re-made-on-failure connection to the engine.
struct Engine {
    host: Option<String>,
    client: tokio::sync::Mutex<Option<Docker>>,
}

impl Engine {
    fn describe(&self) -> String {
        self.host
            .clone()
            .or_else(|| std::env::var("DOCKER_HOST").ok())
            .unwrap_or_else(|| DEFAULT_HOST.to_owned())
    }

    async fn connect(&self) -> Result<Docker, String> {
        let host = self.describe();
        let docker = Docker::connect_with_host(&host).map_err(|e| e.to_string())?;
        // The engine may be older than bollard's API version (Debian's 20.10
        // speaks 1.41): agree on the highest both know.
        match tokio::time::timeout(CONNECT_TIMEOUT, docker.negotiate_version()).await {
            Ok(Ok(d)) => Ok(d),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
        }
    }

    /// A working client, or why there is none (naming `service`).
    async fn client(&self, service: &str) -> Result<Docker, DriverError> {
        let mut slot = self.client.lock().await;
        if let Some(d) = slot.as_ref() {
            return Ok(d.clone());
        }
        match self.connect().await {
            Ok(d) => {
                *slot = Some(d.clone());
                Ok(d)
            }
            Err(e) => Err(DriverError::EngineUnavailable(format!(
                "service `{service}` runs as a container (`image:`/`build:`) but no Docker \
                 engine answers at {} ({e}): start one (`dockerd`, or `scripts/docker-up`) or \
                 point berth at one with DOCKER_HOST",
                self.describe()
            ))),
        }
    }

    /// Forget the client after a transport failure (the engine restarted).
    async fn reset(&self) {
        *self.client.lock().await = None;
    }
}

/// Publishing containers' ports on the node's address, for an agent whose
/// instances other nodes reach (see the module docs).
#[derive(Debug, Clone)]
pub struct Publish {
    /// The node's advertised address: host ports are bound on it only.
    pub ip: IpAddr,
    /// The agent's allocator (shared with processes' `PORT`s).
    pub ports: PortAllocator,
}

/// A running container found at start, waiting for its supervisor.
#[derive(Debug, Clone)]
struct Adoptable {
    id: String,
    key: InstanceKey,
    uid: String,
    restarts: u32,
}

struct Inner {
    engine: Engine,
    agent_id: String,
    logs: LogStore,
    stats: StatsMap,
    adoptable: Mutex<HashMap<InstanceKey, Adoptable>>,
    /// Container creation holds it shared, network removal exclusively, so
    /// a network is never removed between its check and a container
    /// joining it.
    network_lock: RwLock<()>,
    /// Held while checking for and creating a network: the engine does not
    /// keep network names unique, so two concurrent creates make two.
    network_create: tokio::sync::Mutex<()>,
    networks: Mutex<HashSet<String>>,
    builds: image::Builds,
    /// Bounds concurrent creates, starts and exec health checks
    /// ([`START_CONCURRENCY`]).
    starts: Arc<tokio::sync::Semaphore>,
    /// Set when containers' ports are published on the node's address.
    publish: Option<Publish>,
    /// Whether the log already said that containers get no berth DNS.
    dns_said: std::sync::atomic::AtomicBool,
}

/// Runs instances as Docker containers. Cheap to clone.
#[derive(Clone)]
pub struct DockerDriver {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DockerDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerDriver")
            .field("host", &self.inner.engine.describe())
            .field("agent_id", &self.inner.agent_id)
            .finish_non_exhaustive()
    }
}

impl DockerDriver {
    /// A driver for the engine at `host` (`None`: `DOCKER_HOST`, else the
    /// default socket), labelling containers with `agent_id`, writing build
    /// output to `logs` and samples to `stats`, publishing containers' ports
    /// as `publish` says (`None`: reached at their bridge IP). Connects on
    /// first use.
    pub fn new(
        host: Option<String>,
        agent_id: String,
        logs: LogStore,
        stats: StatsMap,
        publish: Option<Publish>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                engine: Engine {
                    host,
                    client: tokio::sync::Mutex::new(None),
                },
                agent_id,
                logs,
                stats,
                adoptable: Mutex::new(HashMap::new()),
                network_lock: RwLock::new(()),
                network_create: tokio::sync::Mutex::new(()),
                networks: Mutex::new(HashSet::new()),
                builds: image::Builds::default(),
                starts: Arc::new(tokio::sync::Semaphore::new(START_CONCURRENCY)),
                publish,
                dns_said: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Find the containers a previous run of this agent left: running ones
    /// are kept for adoption, ended ones removed. Returns how many wait for
    /// adoption (0 when no engine answers: nothing to adopt then).
    pub async fn collect_adoptable(&self) -> usize {
        let Ok(docker) = self.inner.engine.client("(adoption)").await else {
            return 0;
        };
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![format!("{LABEL_AGENT}={}", self.inner.agent_id)],
        )]);
        let list = docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await;
        let list = match list {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list containers left by a previous run");
                return 0;
            }
        };
        let mut found = HashMap::new();
        let mut dead = Vec::new();
        for c in list {
            let Some(id) = c.id else { continue };
            let labels = c.labels.unwrap_or_default();
            let running = c.state == Some(bollard::models::ContainerSummaryStateEnum::RUNNING);
            let parsed = (|| {
                Some(Adoptable {
                    id: id.clone(),
                    key: InstanceKey {
                        namespace: labels.get(LABEL_NAMESPACE)?.clone(),
                        stack: labels.get(LABEL_STACK)?.clone(),
                        service: labels.get(LABEL_SERVICE)?.clone(),
                        slot: labels.get(LABEL_INSTANCE)?.parse().ok()?,
                    },
                    uid: labels.get(LABEL_UID)?.clone(),
                    restarts: labels
                        .get(spec::LABEL_RESTARTS)
                        .and_then(|r| r.parse().ok())
                        .unwrap_or(0),
                })
            })();
            match parsed {
                Some(a) if running && !found.contains_key(&a.key) => {
                    found.insert(a.key.clone(), a);
                }
                Some(a) => dead.push((id, Some(a.key))),
                None => dead.push((id, None)),
            }
        }
        for (id, key) in dead {
            self.inner
                .remove_container(&docker, &id, key.as_ref())
                .await;
        }
        let n = found.len();
        if let Ok(mut m) = self.inner.adoptable.lock() {
            *m = found;
        }
        n
    }

    /// Remove the containers waiting for adoption whose slot and uid are not
    /// in `keep` (no assignment wants them). Runs in the background.
    pub fn sweep(&self, keep: HashMap<InstanceKey, String>) {
        let gone: Vec<Adoptable> = match self.inner.adoptable.lock() {
            Ok(mut m) => {
                let gone = m
                    .values()
                    .filter(|a| keep.get(&a.key) != Some(&a.uid))
                    .cloned()
                    .collect();
                m.retain(|k, a| keep.get(k) == Some(&a.uid));
                gone
            }
            Err(_) => return,
        };
        if gone.is_empty() {
            return;
        }
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let Ok(docker) = inner.engine.client("(cleanup)").await else {
                return;
            };
            for a in gone {
                tracing::info!(instance = %a.key, container = %a.id, "removing a container no assignment wants");
                let _ = docker
                    .kill_container(
                        &a.id,
                        Some(KillContainerOptions {
                            signal: "SIGKILL".into(),
                        }),
                    )
                    .await;
                inner.remove_container(&docker, &a.id, Some(&a.key)).await;
            }
        });
    }

    /// The stats map samples go to.
    pub fn stats(&self) -> &StatsMap {
        &self.inner.stats
    }
}

impl Inner {
    fn take_adoptable(&self, key: &InstanceKey, uid: &str) -> Option<Adoptable> {
        let mut m = self.adoptable.lock().ok()?;
        if m.get(key).is_some_and(|a| a.uid == uid) {
            m.remove(key)
        } else {
            None
        }
    }

    async fn ensure_network(
        &self,
        docker: &Docker,
        key: &InstanceKey,
        name: &str,
    ) -> Result<(), DriverError> {
        if self
            .networks
            .lock()
            .map(|n| n.contains(name))
            .unwrap_or(false)
        {
            return Ok(());
        }
        let _one = self.network_create.lock().await;
        if self
            .networks
            .lock()
            .map(|n| n.contains(name))
            .unwrap_or(false)
        {
            return Ok(());
        }
        let ids = network_ids(docker, name)
            .await
            .map_err(|e| engine_error(&format!("listing networks named {name}"), e))?;
        if ids.is_empty() {
            let req = NetworkCreateRequest {
                name: name.to_owned(),
                driver: Some("bridge".into()),
                labels: Some(spec::stack_labels(key)),
                ..Default::default()
            };
            docker
                .create_network(req)
                .await
                .map_err(|e| engine_error(&format!("creating network {name}"), e))?;
        } else {
            // Duplicates (made by another agent racing this one) make the
            // name ambiguous for the engine: keep the first only.
            for id in ids.iter().skip(1) {
                let _ = docker.remove_network(id).await;
            }
        }
        if let Ok(mut n) = self.networks.lock() {
            n.insert(name.to_owned());
        }
        Ok(())
    }

    async fn ensure_volumes(&self, docker: &Docker, spec: &LaunchSpec) -> Result<(), DriverError> {
        for v in &spec.service.volumes {
            let Some(src) = v.source.as_deref().filter(|_| v.kind == "volume") else {
                continue;
            };
            let name = volume_name(&spec.key.stack, src);
            let req = VolumeCreateRequest {
                name: Some(name.clone()),
                labels: Some(spec::stack_labels(&spec.key)),
                ..Default::default()
            };
            // Creating an existing volume returns it unchanged.
            docker
                .create_volume(req)
                .await
                .map_err(|e| engine_error(&format!("creating volume {name}"), e))?;
        }
        Ok(())
    }

    /// Remove a container (and its anonymous volumes); when it was the
    /// stack's last, remove the stack's network too.
    async fn remove_container(&self, docker: &Docker, id: &str, key: Option<&InstanceKey>) {
        let opts = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        match docker.remove_container(id, Some(opts)).await {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            // Already being removed (e.g. by a concurrent sweep).
            Err(e) if is_status(&e, 409) => {}
            Err(e) => tracing::warn!(container = %id, error = %e, "cannot remove container"),
        }
        if let Some(key) = key {
            self.stats.remove(key, id);
            self.remove_network_if_unused(docker, &key.namespace, &key.stack)
                .await;
        }
    }

    async fn remove_network_if_unused(&self, docker: &Docker, namespace: &str, stack: &str) {
        let name = network_name(namespace, stack);
        let _excl = self.network_lock.write().await;
        match stack_containers(docker, namespace, stack).await {
            Ok(0) => {}
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(error = %e, "cannot list the stack's containers");
                return;
            }
        }
        if let Ok(mut n) = self.networks.lock() {
            n.remove(&name);
        }
        if let Err(e) = remove_networks(docker, &name).await {
            tracing::warn!(network = %name, error = %e, "cannot remove the stack network");
        }
    }

    /// Host ports for the container's declared TCP ports, when they are
    /// published: what to bind, and the leases that keep them while the
    /// container lives.
    fn host_ports(
        &self,
        spec: &LaunchSpec,
    ) -> Result<(Option<spec::Published>, Vec<PortLease>), DriverError> {
        let Some(publish) = &self.publish else {
            return Ok((None, Vec::new()));
        };
        let mut ports = BTreeMap::new();
        let mut leases = Vec::new();
        for target in spec.service.tcp_ports() {
            // Free on every address of the host, the advertised one
            // included, IPv4 or IPv6 (the allocator checks with binds on
            // 0.0.0.0 and [::]).
            let lease = publish.ports.allocate().map_err(|e| {
                DriverError::Engine(format!(
                    "service `{}`: no host port to publish container port {target} on {}: {e}",
                    spec.key.service, publish.ip
                ))
            })?;
            ports.insert(target, lease.port());
            leases.push(lease);
        }
        let published = spec::Published {
            ip: publish.ip,
            ports,
        };
        Ok((Some(published), leases))
    }

    /// berth's DNS settings for a container of `key`'s stack when this host
    /// serves berth's DNS for containers (see [`dns`]); otherwise the
    /// engine's defaults, and the log says once what that means.
    fn container_dns(&self, key: &InstanceKey) -> Option<dns::ContainerDns> {
        // A remote engine's containers are on another host: this one's
        // addresses say nothing about what they reach.
        let host = self.engine.describe();
        let local = host.starts_with("unix://") || host.starts_with('/');
        if local && dns::served_here() {
            return Some(dns::container_dns(
                &key.namespace,
                &key.stack,
                &dns::host_upstream(),
            ));
        }
        if !self
            .dns_said
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                engine = %host,
                dns = %berth_model::vip::CONTAINER_DNS,
                "containers find other services by name only when those have containers on \
                 this node (the stack network's aliases): berth's DNS for containers is not \
                 an address of this host (the node's edge adds it to lo when it runs its TCP \
                 proxy as root, next to a local engine)"
            );
        }
        None
    }

    async fn create(
        &self,
        docker: &Docker,
        spec: &LaunchSpec,
        image: &str,
    ) -> Result<(String, Vec<PortLease>), DriverError> {
        let network = network_name(&spec.key.namespace, &spec.key.stack);
        let name = container_name(&spec.key, &spec.uid);
        let (published, leases) = self.host_ports(spec)?;
        let dns = self.container_dns(&spec.key);
        let body = spec::container_body(
            spec,
            image,
            &self.agent_id,
            &network,
            published.as_ref(),
            dns.as_ref(),
        );
        let _slot = self
            .starts
            .acquire()
            .await
            .map_err(|e| DriverError::Engine(format!("creating container {name}: {e}")))?;
        let _shared = self.network_lock.read().await;
        self.ensure_network(docker, &spec.key, &network).await?;
        self.ensure_volumes(docker, spec).await?;
        let mut retried = false;
        loop {
            let opts = CreateContainerOptions {
                name: Some(name.clone()),
                ..Default::default()
            };
            match docker.create_container(Some(opts), body.clone()).await {
                Ok(r) => {
                    if let Err(e) = docker.start_container(&r.id, None).await {
                        let _ = docker
                            .remove_container(
                                &r.id,
                                Some(RemoveContainerOptions {
                                    force: true,
                                    v: true,
                                    ..Default::default()
                                }),
                            )
                            .await;
                        if let Some(p) = &self.publish
                            && e.to_string().contains("cannot assign requested address")
                        {
                            return Err(DriverError::NodeConfig(format!(
                                "service `{}`: the engine cannot publish the container's \
                                 ports on {}, this node's advertise address ({e}): it must be \
                                 an address of the host (network namespace) dockerd runs in \
                                 that other nodes reach; give the agent one with `--advertise`",
                                spec.key.service, p.ip
                            )));
                        }
                        return Err(engine_error(&format!("starting container {name}"), e));
                    }
                    return Ok((r.id, leases));
                }
                // A container of this incarnation whose removal was missed
                // (the agent died between its end and its removal).
                Err(e) if is_status(&e, 409) && !retried => {
                    retried = true;
                    let _ = docker
                        .remove_container(
                            &name,
                            Some(RemoveContainerOptions {
                                force: true,
                                v: true,
                                ..Default::default()
                            }),
                        )
                        .await;
                }
                // The network vanished behind our back: make it again.
                Err(e) if is_not_found(&e) && !retried && e.to_string().contains("network") => {
                    retried = true;
                    if let Ok(mut n) = self.networks.lock() {
                        n.remove(&network);
                    }
                    self.ensure_network(docker, &spec.key, &network).await?;
                }
                Err(e) if is_not_found(&e) => {
                    return Err(DriverError::Image(format!(
                        "service `{}`: creating container {name}: {e}",
                        spec.key.service
                    )));
                }
                Err(e) => return Err(engine_error(&format!("creating container {name}"), e)),
            }
        }
    }
}

/// Ids of the networks called exactly `name`, oldest first.
async fn network_ids(docker: &Docker, name: &str) -> Result<Vec<String>, BollardError> {
    let filters = HashMap::from([("name".to_owned(), vec![name.to_owned()])]);
    let mut list: Vec<_> = docker
        .list_networks(Some(ListNetworksOptions {
            filters: Some(filters),
        }))
        .await?
        .into_iter()
        // The engine's name filter matches substrings.
        .filter(|n| n.name.as_deref() == Some(name))
        .collect();
    list.sort_by(|a, b| a.created.cmp(&b.created));
    Ok(list.into_iter().filter_map(|n| n.id).collect())
}

/// Remove every network called `name`.
async fn remove_networks(docker: &Docker, name: &str) -> Result<(), BollardError> {
    for id in network_ids(docker, name).await? {
        match docker.remove_network(&id).await {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How many containers (any state, any agent) belong to the stack.
async fn stack_containers(
    docker: &Docker,
    namespace: &str,
    stack: &str,
) -> Result<usize, BollardError> {
    let filters = HashMap::from([(
        "label".to_owned(),
        vec![
            format!("{LABEL_NAMESPACE}={namespace}"),
            format!("{LABEL_STACK}={stack}"),
        ],
    )]);
    let list = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await?;
    Ok(list.len())
}

#[async_trait]
impl Driver for DockerDriver {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            signals: true,
            resource_limits: true,
        }
    }

    fn runs(&self, kind: DriverKind) -> bool {
        kind == DriverKind::Docker
    }

    async fn start(&self, spec: &LaunchSpec) -> Result<Started, DriverError> {
        let inner = &self.inner;
        let docker = inner.engine.client(&spec.key.service).await?;
        if let Some(a) = inner.take_adoptable(&spec.key, &spec.uid) {
            let adopted = attach(
                inner.clone(),
                docker.clone(),
                spec,
                &a.id,
                Some(a.restarts),
                Vec::new(),
            )
            .await;
            match adopted {
                Ok(s) => return Ok(s),
                // It ended between the listing and now: start afresh.
                Err(e) => {
                    tracing::info!(instance = %spec.key, error = %e, "could not adopt container");
                    inner.remove_container(&docker, &a.id, Some(&a.key)).await;
                }
            }
        }
        let result = async {
            let image = image::ensure(&docker, spec, &inner.logs, &inner.builds).await?;
            let (id, leases) = inner.create(&docker, spec, &image).await?;
            attach(inner.clone(), docker.clone(), spec, &id, None, leases).await
        }
        .await;
        if let Err(DriverError::Engine(_)) = &result {
            // The engine may have restarted under another API version.
            inner.engine.reset().await;
        }
        result
    }
}

/// Attach to a started (or adopted) container: its logs, its stats, its
/// end. `leases` hold the host ports it was created with; an adopted one's
/// are read from the engine and claimed here.
async fn attach(
    inner: Arc<Inner>,
    docker: Docker,
    spec: &LaunchSpec,
    id: &str,
    adopted: Option<u32>,
    mut leases: Vec<PortLease>,
) -> Result<Started, DriverError> {
    let info = docker
        .inspect_container(id, None)
        .await
        .map_err(|e| engine_error(&format!("inspecting container {id}"), e))?;
    let state = info.state.unwrap_or_default();
    if adopted.is_some() && state.running != Some(true) {
        return Err(DriverError::Engine(format!(
            "container {id} is not running"
        )));
    }
    let pid = state.pid.filter(|p| *p > 0).map(|p| p as u32);
    let network = network_name(&spec.key.namespace, &spec.key.stack);
    let settings = info.network_settings.unwrap_or_default();
    let container_ip = settings
        .networks
        .and_then(|mut n| n.remove(&network))
        .and_then(|e| e.ip_address)
        .filter(|ip| !ip.is_empty());
    // Published: the engine's bindings are the truth (an adopted container
    // keeps the host ports it was created with).
    let host_ports = match &inner.publish {
        None => BTreeMap::new(),
        Some(p) => {
            let targets = spec.service.tcp_ports();
            let bound = settings
                .ports
                .as_ref()
                .and_then(|ports| spec::bound_ports(ports, p.ip, &targets));
            let Some(bound) = bound else {
                return Err(DriverError::Engine(format!(
                    "container {id} has no host port on {} for each of its ports {targets:?}",
                    p.ip
                )));
            };
            if adopted.is_some() {
                for port in bound.values() {
                    match p.ports.claim(*port) {
                        Some(l) => leases.push(l),
                        None => {
                            tracing::warn!(container = %id, port, "an adopted container's host port is held by another lease")
                        }
                    }
                }
            }
            bound
        }
    };
    let publish_ip = inner.publish.as_ref().map(|p| p.ip);
    let address = match publish_ip {
        Some(ip) => Some(ip.to_string()),
        None => container_ip.clone(),
    };
    let short: String = id.chars().take(12).collect();

    let (out_w, out_r) = tokio::io::duplex(64 * 1024);
    let (err_w, err_r) = tokio::io::duplex(64 * 1024);
    let since = if adopted.is_some() {
        // Earlier output was captured by the previous agent.
        (now_ms() / 1000) as i32
    } else {
        0
    };
    let logs_task = tokio::spawn(pump_logs(
        docker.clone(),
        id.to_owned(),
        since,
        out_w,
        err_w,
    ));
    let stats_task = tokio::spawn(pump_stats(
        docker.clone(),
        id.to_owned(),
        spec.key.clone(),
        inner.stats.clone(),
    ));
    let prober = probe::ContainerProber {
        docker: docker.clone(),
        id: id.to_owned(),
        // Checks run on this node: straight to the container, on its
        // declared ports.
        host: container_ip
            .clone()
            .unwrap_or_else(|| "127.0.0.1".to_owned()),
        slots: inner.starts.clone(),
    };
    Ok(Started {
        handle: Box::new(ContainerHandle {
            inner,
            docker,
            id: id.to_owned(),
            key: spec.key.clone(),
            pid,
            logs_task: Some(logs_task),
            stats_task,
            exit: None,
            _host_ports: leases,
        }),
        stdout: Some(Box::pin(out_r)),
        stderr: Some(Box::pin(err_r)),
        limits_warning: None,
        address,
        prober: Some(Arc::new(prober)),
        adopted_restarts: adopted,
        detail: Some(format!(
            "container {short}{}{}{}",
            container_ip.map(|a| format!(" at {a}")).unwrap_or_default(),
            published_detail(publish_ip, &host_ports),
            if adopted.is_some() { " (adopted)" } else { "" }
        )),
        host_ports,
    })
}

/// `, published on IP:PORT[, IP:PORT…]` for the `started …` log line.
fn published_detail(ip: Option<IpAddr>, ports: &BTreeMap<u16, u16>) -> String {
    match ip {
        Some(ip) if !ports.is_empty() => {
            let list: Vec<String> = ports
                .iter()
                .map(|(target, host)| format!("{}->{target}", std::net::SocketAddr::new(ip, *host)))
                .collect();
            format!(", published on {}", list.join(", "))
        }
        _ => String::new(),
    }
}

async fn pump_logs(
    docker: Docker,
    id: String,
    since: i32,
    mut out: tokio::io::DuplexStream,
    mut err: tokio::io::DuplexStream,
) {
    let opts = LogsOptions {
        follow: true,
        stdout: true,
        stderr: true,
        since,
        tail: "all".into(),
        ..Default::default()
    };
    let mut stream = docker.logs(&id, Some(opts));
    while let Some(item) = stream.next().await {
        let res = match item {
            Ok(bollard::container::LogOutput::StdErr { message }) => err.write_all(&message).await,
            Ok(
                bollard::container::LogOutput::StdOut { message }
                | bollard::container::LogOutput::Console { message },
            ) => out.write_all(&message).await,
            Ok(bollard::container::LogOutput::StdIn { .. }) => Ok(()),
            Err(e) => {
                tracing::debug!(container = %id, error = %e, "log stream ended");
                break;
            }
        };
        if res.is_err() {
            break;
        }
    }
}

fn sample(id: &str, s: &ContainerStatsResponse) -> Option<ContainerStats> {
    let cpu = s.cpu_stats.as_ref()?;
    let pre = s.precpu_stats.as_ref();
    let total = cpu.cpu_usage.as_ref()?.total_usage?;
    let pre_total = pre
        .and_then(|p| p.cpu_usage.as_ref())
        .and_then(|u| u.total_usage)
        .unwrap_or(0);
    let system = cpu.system_cpu_usage.unwrap_or(0);
    let pre_system = pre.and_then(|p| p.system_cpu_usage).unwrap_or(0);
    let cpus = cpu.online_cpus.unwrap_or(1).max(1) as f64;
    let cpu_percent = if system > pre_system && total >= pre_total && pre_total > 0 {
        (total - pre_total) as f64 / (system - pre_system) as f64 * cpus * 100.0
    } else {
        0.0
    };
    let mem = s.memory_stats.as_ref();
    let usage = mem.and_then(|m| m.usage).unwrap_or(0);
    // cgroup v2 calls the page cache `inactive_file`, v1 `cache`.
    let cache = mem
        .and_then(|m| m.stats.as_ref())
        .and_then(|st| {
            st.get("inactive_file")
                .or_else(|| st.get("total_inactive_file"))
        })
        .copied()
        .unwrap_or(0);
    Some(ContainerStats {
        container_id: id.to_owned(),
        cpu_percent,
        memory_bytes: usage.saturating_sub(cache),
        memory_limit_bytes: mem.and_then(|m| m.limit).unwrap_or(0),
        at_ms: now_ms(),
    })
}

/// How often a container's resources are sampled. The engine's streaming
/// stats collect every second for every streaming container (cgroup reads
/// and a network-namespace walk each): with 50 containers that was a
/// steady load on dockerd that slowed the creates of the next ones.
const STATS_EVERY: Duration = Duration::from_secs(5);

/// Sample a container's resources every [`STATS_EVERY`] with one-shot
/// requests (no pre-sample wait in the engine), the CPU rate computed from
/// this task's previous sample.
async fn pump_stats(docker: Docker, id: String, key: InstanceKey, stats: StatsMap) {
    let opts = StatsOptions {
        stream: false,
        one_shot: true,
    };
    let mut prev: Option<ContainerStatsResponse> = None;
    // Spread the first samples of a burst of starts over the period.
    let jitter = Duration::from_millis(u64::from(key.slot) * 97 % 5000);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + jitter, STATS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut stream = docker.stats(&id, Some(opts.clone()));
        let Some(Ok(mut s)) = stream.next().await else {
            // Gone, or the engine is away: the end of the container ends
            // this task (aborted by its handle); keep trying until then.
            continue;
        };
        if let Some(p) = prev.take() {
            s.precpu_stats = p.cpu_stats;
        }
        if let Some(sample) = sample(&id, &s) {
            stats.put(&key, sample);
        }
        prev = Some(s);
    }
}

/// One container of an instance.
struct ContainerHandle {
    inner: Arc<Inner>,
    docker: Docker,
    id: String,
    key: InstanceKey,
    pid: Option<u32>,
    logs_task: Option<JoinHandle<()>>,
    stats_task: JoinHandle<()>,
    exit: Option<Exit>,
    /// The host ports it is published on, held until it is gone.
    _host_ports: Vec<PortLease>,
}

impl ContainerHandle {
    async fn wait_exit(&self) -> Result<Exit, DriverError> {
        let opts = WaitContainerOptions {
            condition: "not-running".into(),
        };
        let mut stream = self.docker.wait_container(&self.id, Some(opts));
        match stream.next().await {
            Some(Ok(r)) => Ok(Exit::Code(r.status_code as i32)),
            Some(Err(BollardError::DockerContainerWaitError { code, .. })) => {
                Ok(Exit::Code(code as i32))
            }
            Some(Err(e)) if is_not_found(&e) => Ok(Exit::Code(-1)),
            Some(Err(e)) => Err(DriverError::Engine(format!(
                "waiting for container {}: {e}",
                self.id
            ))),
            None => Err(DriverError::Engine(format!(
                "waiting for container {}: the engine closed the stream",
                self.id
            ))),
        }
    }

    /// The container has ended: drain its logs, then remove it.
    async fn finish(&mut self, exit: Exit) -> Exit {
        if let Some(t) = self.logs_task.take() {
            let abort = t.abort_handle();
            if tokio::time::timeout(DRAIN, t).await.is_err() {
                abort.abort();
            }
        }
        self.stats_task.abort();
        self.inner
            .remove_container(&self.docker, &self.id, Some(&self.key))
            .await;
        self.exit = Some(exit.clone());
        exit
    }

    async fn kill(&self, signal: Signal) -> Result<(), DriverError> {
        let opts = KillContainerOptions {
            signal: signal.as_str().to_owned(),
        };
        match self.docker.kill_container(&self.id, Some(opts)).await {
            Ok(()) => Ok(()),
            // Not running (409) or gone (404): nothing to signal.
            Err(e) if is_not_found(&e) || is_status(&e, 409) => Ok(()),
            Err(e) => Err(engine_error(
                &format!("signalling container {}", self.id),
                e,
            )),
        }
    }
}

#[async_trait]
impl Handle for ContainerHandle {
    fn pid(&self) -> Option<u32> {
        self.pid
    }

    fn signal(&self, signal: Signal) -> Result<(), DriverError> {
        let docker = self.docker.clone();
        let id = self.id.clone();
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|e| DriverError::Engine(format!("signalling container {id}: {e}")))?;
        rt.spawn(async move {
            let opts = KillContainerOptions {
                signal: signal.as_str().to_owned(),
            };
            if let Err(e) = docker.kill_container(&id, Some(opts)).await {
                tracing::debug!(container = %id, error = %e, "signal not delivered");
            }
        });
        Ok(())
    }

    async fn ended(&mut self) -> bool {
        if self.exit.is_some() {
            return true;
        }
        match self.docker.inspect_container(&self.id, None).await {
            Ok(info) => info.state.and_then(|s| s.running) == Some(false),
            Err(e) => is_not_found(&e),
        }
    }

    async fn wait(&mut self) -> Result<Exit, DriverError> {
        if let Some(e) = &self.exit {
            return Ok(e.clone());
        }
        let exit = self.wait_exit().await?;
        Ok(self.finish(exit).await)
    }

    async fn stop(&mut self, signal: Signal, grace: Duration) -> Result<Exit, DriverError> {
        if let Some(e) = &self.exit {
            return Ok(e.clone());
        }
        self.kill(signal).await?;
        let exit = match tokio::time::timeout(grace, self.wait_exit()).await {
            Ok(r) => r?,
            Err(_) => {
                self.kill(Signal::SIGKILL).await?;
                self.wait_exit().await?
            }
        };
        Ok(self.finish(exit).await)
    }
}

impl Drop for ContainerHandle {
    fn drop(&mut self) {
        // Dropped without wait/stop (the agent's task was aborted, as in a
        // crash): the container is left running, like after `kill -9`; the
        // next agent adopts or sweeps it, and a restarted supervisor of the
        // same incarnation replaces it (its name is taken: see `create`).
        self.stats_task.abort();
        if let Some(t) = self.logs_task.take() {
            t.abort();
        }
    }
}

/// Remove the named volumes berth created for a stack (`berth down -v`),
/// after waiting up to `wait` for the stack's containers to be gone (the
/// agent stops them asynchronously once their assignments are removed).
/// Also removes the stack's network if it is left. Returns the removed
/// volume names. `host` as for [`DockerDriver::new`].
pub async fn remove_stack_volumes(
    host: Option<String>,
    namespace: &str,
    stack: &str,
    wait: Duration,
) -> Result<Vec<String>, DriverError> {
    let engine = Engine {
        host,
        client: tokio::sync::Mutex::new(None),
    };
    let docker = engine.client(stack).await?;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let n = stack_containers(&docker, namespace, stack)
            .await
            .map_err(|e| engine_error("listing the stack's containers", e))?;
        if n == 0 {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(DriverError::Engine(format!(
                "stack {namespace}/{stack} still has {n} container(s) after {wait:?}; its \
                 volumes are kept"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let network = network_name(namespace, stack);
    remove_networks(&docker, &network)
        .await
        .map_err(|e| engine_error(&format!("removing network {network}"), e))?;
    let filters = HashMap::from([(
        "label".to_owned(),
        vec![
            format!("{LABEL_MANAGED}=true"),
            format!("{LABEL_NAMESPACE}={namespace}"),
            format!("{LABEL_STACK}={stack}"),
        ],
    )]);
    let volumes = docker
        .list_volumes(Some(ListVolumesOptions {
            filters: Some(filters),
        }))
        .await
        .map_err(|e| engine_error("listing volumes", e))?
        .volumes
        .unwrap_or_default();
    let mut removed = Vec::new();
    for v in volumes {
        match docker
            .remove_volume(
                &v.name,
                None::<bollard::query_parameters::RemoveVolumeOptions>,
            )
            .await
        {
            Ok(()) => removed.push(v.name),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(engine_error(&format!("removing volume {}", v.name), e)),
        }
    }
    removed.sort();
    Ok(removed)
}
