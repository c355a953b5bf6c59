//! The one write path for desired state.
//!
//! Every change a user asks for (submit a stack, scale, stop/start, restart,
//! remove) is a typed [`Command`] applied by [`apply`], which reads the
//! current records, computes the new ones and commits them in one store
//! transaction guarded by the keys' `mod_revision` (compare-and-swap). When
//! another writer got there first the transaction fails and `apply` starts
//! again from a fresh read, so concurrent API calls never lose an update.
//!
//! This module writes only [`StackRecord`]s and [`Release`]s; placement
//! (assignments) is the controller's, actual state the agents'. It has no
//! clock: the caller passes `now`.

use std::collections::BTreeMap;

use berth_model::{
    ConfigVars, DEFAULT_NAMESPACE, Millis, Release, RollbackCause, RolloutState, RolloutStatus,
    ServiceDesired, StackRecord, keys,
};
use berth_spec::types::{DeployMode, Stack};
use berth_store::{Compare, KeyValue, Op, Store, StoreError, Txn, decode, encode};

/// How many times a command is retried after losing a compare-and-swap race
/// before giving up with [`DesiredError::Conflict`].
const MAX_ATTEMPTS: usize = 32;

/// A change to desired state.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Create release N+1 from `stack` and make it the stack's current one.
    SubmitStack {
        /// Namespace.
        namespace: String,
        /// The resolved stack; its `name` is the stack's name.
        stack: Stack,
        /// Who submits.
        author: String,
        /// Why.
        message: String,
    },
    /// Set the replica count of some services.
    Scale {
        /// Namespace.
        namespace: String,
        /// Stack name.
        stack: String,
        /// Service → replicas.
        replicas: BTreeMap<String, u32>,
    },
    /// Stop (or start again) some services; empty `services` means all.
    SetStopped {
        /// Namespace.
        namespace: String,
        /// Stack name.
        stack: String,
        /// Services; empty = all.
        services: Vec<String>,
        /// Stopped or not.
        stopped: bool,
    },
    /// Replace the instances of some services (bumps `restart_generation`);
    /// empty `services` means all.
    Restart {
        /// Namespace.
        namespace: String,
        /// Stack name.
        stack: String,
        /// Services; empty = all.
        services: Vec<String>,
    },
    /// Forget a stack: its record and every release.
    RemoveStack {
        /// Namespace.
        namespace: String,
        /// Stack name.
        stack: String,
    },
    /// Create release N+1 with the spec and config vars of an older release.
    Rollback {
        /// Namespace.
        namespace: String,
        /// Stack name.
        stack: String,
        /// The release to restore; `None` = the one before the current.
        to: Option<u64>,
        /// Who asks (`berth` for the controller).
        author: String,
        /// Only if this is still the current release (the controller's
        /// automatic rollback must not undo a deploy that came after).
        if_current: Option<u64>,
        /// Set by the controller's automatic rollback: what failed.
        cause: Option<RollbackCause>,
    },
    /// Set or unset config vars: a new release with the changed environment.
    SetEnv {
        /// Namespace.
        namespace: String,
        /// Stack name.
        stack: String,
        /// Only this service; `None` = every service.
        service: Option<String>,
        /// Variables to set.
        set: BTreeMap<String, String>,
        /// Variables to remove.
        unset: Vec<String>,
        /// Who asks.
        author: String,
    },
    /// The controller's report on a rollout (complete, paused). Applied only
    /// while the stack is still at that release and restart generation.
    SetRollout {
        /// Namespace.
        namespace: String,
        /// Stack name.
        stack: String,
        /// The release the report is about.
        release: u64,
        /// Sum of the services' restart generations the report is about.
        generation: u64,
        /// New state.
        state: RolloutState,
        /// Why.
        message: String,
    },
}

impl Command {
    /// Namespace and stack the command is about.
    pub fn target(&self) -> (&str, &str) {
        match self {
            Self::SubmitStack {
                namespace, stack, ..
            } => (namespace, &stack.name),
            Self::Scale {
                namespace, stack, ..
            }
            | Self::SetStopped {
                namespace, stack, ..
            }
            | Self::Restart {
                namespace, stack, ..
            }
            | Self::Rollback {
                namespace, stack, ..
            }
            | Self::SetEnv {
                namespace, stack, ..
            }
            | Self::SetRollout {
                namespace, stack, ..
            }
            | Self::RemoveStack { namespace, stack } => (namespace, stack),
        }
    }
}

/// The most replicas one service may ask for: a typo (`scale web=100000`)
/// must not fork a machine to death.
pub const MAX_REPLICAS: u32 = 10_000;

fn check_replicas(service: &str, replicas: u32) -> Result<(), DesiredError> {
    if replicas > MAX_REPLICAS {
        return Err(DesiredError::TooManyReplicas {
            service: service.to_owned(),
            replicas,
        });
    }
    Ok(())
}

/// Why a command was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    /// A namespace or stack name that cannot be used as a key segment.
    #[error("invalid {what} name {name:?}: {reason}")]
    InvalidName {
        /// `namespace`, `stack` or `service`.
        what: &'static str,
        /// The offending name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A stack with no services cannot be submitted.
    #[error("stack {stack:?} has no services (are all of them behind a profile?)")]
    EmptyStack {
        /// Stack name.
        stack: String,
    },
    /// The stack does not exist in that namespace.
    #[error("no stack {stack:?} in namespace {namespace:?}")]
    StackNotFound {
        /// Namespace.
        namespace: String,
        /// Stack name.
        stack: String,
    },
    /// A service named in the command is not part of the stack.
    #[error("stack {stack:?} has no service {service:?}")]
    UnknownService {
        /// Stack name.
        stack: String,
        /// The unknown name.
        service: String,
        /// The services the stack does have.
        known: Vec<String>,
    },
    /// More replicas than one stack's service may ask for.
    #[error("service {service:?}: {replicas} replicas is more than berth allows ({MAX_REPLICAS})")]
    TooManyReplicas {
        /// The service.
        service: String,
        /// What was asked.
        replicas: u32,
    },
    /// A `deploy.mode: global` service runs one instance per node.
    #[error("service {service:?} is global (one instance per node) and cannot be scaled")]
    GlobalService {
        /// The service.
        service: String,
    },
    /// The release asked for does not exist.
    #[error("stack {stack:?} has no release v{version}")]
    ReleaseNotFound {
        /// Stack name.
        stack: String,
        /// The missing version.
        version: u64,
        /// The newest release there is.
        latest: u64,
    },
    /// A rollback with nothing before the current release.
    #[error("stack {stack:?} is at its first release: there is nothing to roll back to")]
    NothingToRollBack {
        /// Stack name.
        stack: String,
    },
    /// A conditional command whose condition no longer holds (the stack
    /// moved on to another release or rollout meanwhile).
    #[error("stack {stack:?} is no longer at release v{expected}")]
    Superseded {
        /// Stack name.
        stack: String,
        /// The release the command was meant for.
        expected: u64,
    },
    /// `berth env` with nothing to set or unset, or a bad variable name.
    #[error("{0}")]
    BadEnv(String),
    /// Other writers kept winning the compare-and-swap race.
    #[error("the stack kept changing under this request ({attempts} attempts); try again")]
    Conflict {
        /// Attempts made.
        attempts: usize,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a successful command left behind.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The stack record after the change; `None` after `RemoveStack`.
    pub record: Option<StackRecord>,
}

/// Apply one command, retrying on compare-and-swap conflicts.
pub async fn apply(store: &dyn Store, cmd: &Command, now: Millis) -> Result<Outcome, DesiredError> {
    let (ns, stack) = cmd.target();
    check_name("namespace", ns)?;
    check_name("stack", stack)?;
    for _ in 0..MAX_ATTEMPTS {
        if let Some(outcome) = attempt(store, cmd, now).await? {
            return Ok(outcome);
        }
    }
    Err(DesiredError::Conflict {
        attempts: MAX_ATTEMPTS,
    })
}

/// One read-compute-commit round; `Ok(None)` when the commit lost a race.
async fn attempt(
    store: &dyn Store,
    cmd: &Command,
    now: Millis,
) -> Result<Option<Outcome>, DesiredError> {
    let (ns, name) = cmd.target();
    let key = keys::stack(ns, name);
    let kv = store.get(&key).await?;
    let read = Read {
        rev: kv.as_ref().map_or(0, |kv| kv.mod_revision),
        key,
        kv,
    };
    match cmd {
        Command::SubmitStack {
            namespace,
            stack,
            author,
            message,
        } => submit(store, &read, namespace, stack, (author, message), now).await,
        Command::RemoveStack { namespace, stack } => {
            if read.kv.is_none() {
                return Err(not_found(namespace, stack));
            }
            let txn = Txn {
                compare: vec![Compare::ModRevision(read.key.clone(), read.rev)],
                success: vec![
                    Op::Delete(read.key.clone()),
                    Op::DeletePrefix(keys::releases_of(namespace, stack)),
                ],
                failure: vec![],
            };
            commit(store, txn, None).await
        }
        Command::Scale {
            namespace,
            stack,
            replicas,
        } => {
            let mut record = scale(read.existing(namespace, stack)?, replicas)?;
            record.updated_at = now;
            read.update(store, record).await
        }
        Command::SetStopped {
            namespace,
            stack,
            services,
            stopped,
        } => {
            let mut record = read.existing(namespace, stack)?;
            for service in selected(&record, services)? {
                if let Some(d) = record.services.get_mut(&service) {
                    d.stopped = *stopped;
                }
            }
            record.updated_at = now;
            read.update(store, record).await
        }
        Command::Restart {
            namespace,
            stack,
            services,
        } => {
            let mut record = read.existing(namespace, stack)?;
            for service in selected(&record, services)? {
                if let Some(d) = record.services.get_mut(&service) {
                    d.restart_generation += 1;
                    // Restarting a stopped service means "run it again".
                    d.stopped = false;
                }
            }
            record.updated_at = now;
            record.rollout = Some(rollout_started(&record, now, None));
            read.update(store, record).await
        }
        Command::Rollback {
            namespace,
            stack,
            to,
            author,
            if_current,
            cause,
        } => {
            let old = read.existing(namespace, stack)?;
            let new = rollback(store, &old, *to, author, *if_current, cause.as_ref()).await?;
            new_release(store, &read, old, new, now).await
        }
        Command::SetEnv {
            namespace,
            stack,
            service,
            set,
            unset,
            author,
        } => {
            let old = read.existing(namespace, stack)?;
            let mut new = set_env(&old, service.as_deref(), set, unset, author)?;
            new.version = latest_release(store, namespace, stack).await? + 1;
            new_release(store, &read, old, new, now).await
        }
        Command::SetRollout {
            namespace,
            stack,
            release,
            generation,
            state,
            message,
        } => {
            let mut record = read.existing(namespace, stack)?;
            let still = record.release == *release
                && generation_of(&record) == *generation
                && record
                    .rollout
                    .as_ref()
                    .is_some_and(|r| r.state == RolloutState::InProgress);
            if !still {
                return Err(DesiredError::Superseded {
                    stack: stack.clone(),
                    expected: *release,
                });
            }
            if let Some(r) = record.rollout.as_mut() {
                r.state = *state;
                r.message = message.clone();
                r.updated_at = now;
            }
            read.update(store, record).await
        }
    }
}

/// The stack record as one attempt read it: every write of the attempt is
/// compared against `rev`, so a concurrent writer makes it start again.
struct Read {
    key: String,
    kv: Option<KeyValue>,
    rev: i64,
}

impl Read {
    /// The record, or "no such stack".
    fn existing(&self, ns: &str, stack: &str) -> Result<StackRecord, DesiredError> {
        match &self.kv {
            Some(kv) => Ok(decode(kv)?),
            None => Err(not_found(ns, stack)),
        }
    }

    /// Write `record` back (same release).
    async fn update(
        &self,
        store: &dyn Store,
        record: StackRecord,
    ) -> Result<Option<Outcome>, DesiredError> {
        let txn = Txn {
            compare: vec![Compare::ModRevision(self.key.clone(), self.rev)],
            success: vec![Op::put(self.key.clone(), encode(&self.key, &record)?)],
            failure: vec![],
        };
        commit(store, txn, Some(record)).await
    }
}

/// A stack file submitted: the next release, with the stack's config vars
/// applied, its scale taken from the file and its restart generations kept.
async fn submit(
    store: &dyn Store,
    read: &Read,
    namespace: &str,
    stack: &Stack,
    (author, message): (&str, &str),
    now: Millis,
) -> Result<Option<Outcome>, DesiredError> {
    if stack.services.is_empty() {
        return Err(DesiredError::EmptyStack {
            stack: stack.name.clone(),
        });
    }
    for (name, service) in &stack.services {
        check_name("service", name)?;
        check_replicas(name, service.deploy.replicas)?;
    }
    let old: Option<StackRecord> = read.kv.as_ref().map(decode).transpose()?;
    let version = latest_release(store, namespace, &stack.name).await? + 1;
    let config = old.as_ref().map(|o| o.config.clone()).unwrap_or_default();
    let stack = config.apply(stack.clone());
    let services = stack
        .services
        .iter()
        .map(|(svc_name, svc)| {
            let generation = old
                .as_ref()
                .and_then(|o| o.services.get(svc_name))
                .map_or(0, |d| d.restart_generation);
            let desired = ServiceDesired {
                replicas: svc.deploy.replicas,
                stopped: false,
                restart_generation: generation,
            };
            (svc_name.clone(), desired)
        })
        .collect();
    let new = NewRelease {
        version,
        spec: stack,
        config,
        author: author.to_owned(),
        message: message.to_owned(),
        cause: None,
    };
    let name = new.spec.name.clone();
    commit_release(store, read, (namespace, &name), new, services, now).await
}

/// `record` with the replica counts of `replicas` (each checked).
fn scale(
    mut record: StackRecord,
    replicas: &BTreeMap<String, u32>,
) -> Result<StackRecord, DesiredError> {
    for (service, &n) in replicas {
        check_replicas(service, n)?;
        let spec = record
            .spec
            .services
            .get(service)
            .ok_or_else(|| unknown_service(&record, service))?;
        if spec.deploy.mode == DeployMode::Global {
            return Err(DesiredError::GlobalService {
                service: service.clone(),
            });
        }
        record
            .services
            .entry(service.clone())
            .or_insert(ServiceDesired {
                replicas: 0,
                stopped: false,
                restart_generation: 0,
            })
            .replicas = n;
    }
    Ok(record)
}

/// The release a rollback makes: the spec and config vars of release `to`
/// (default: the one before the current) as the next version.
async fn rollback(
    store: &dyn Store,
    old: &StackRecord,
    to: Option<u64>,
    author: &str,
    if_current: Option<u64>,
    cause: Option<&RollbackCause>,
) -> Result<NewRelease, DesiredError> {
    let stack = &old.name;
    if let Some(expected) = if_current
        && old.release != expected
    {
        return Err(DesiredError::Superseded {
            stack: stack.clone(),
            expected,
        });
    }
    let target = match to {
        Some(v) => v,
        None if old.release > 1 => old.release - 1,
        None => {
            return Err(DesiredError::NothingToRollBack {
                stack: stack.clone(),
            });
        }
    };
    let latest = latest_release(store, &old.namespace, stack).await?;
    let Some(kv) = store
        .get(&keys::release(&old.namespace, stack, target))
        .await?
    else {
        return Err(DesiredError::ReleaseNotFound {
            stack: stack.clone(),
            version: target,
            latest,
        });
    };
    let source: Release = decode(&kv)?;
    let message = match cause {
        Some(c) => format!("automatic rollback of v{}: {}", c.from, c.reason),
        None => format!("rollback to v{target}"),
    };
    Ok(NewRelease {
        version: latest + 1,
        spec: source.spec,
        config: source.config,
        author: author.to_owned(),
        message,
        cause: cause.cloned(),
    })
}

/// The release `berth env set|unset` makes (its `version` is the caller's
/// to fill in): the stack's spec with the changed config vars.
fn set_env(
    old: &StackRecord,
    service: Option<&str>,
    set: &BTreeMap<String, String>,
    unset: &[String],
    author: &str,
) -> Result<NewRelease, DesiredError> {
    if set.is_empty() && unset.is_empty() {
        return Err(DesiredError::BadEnv(
            "nothing to change: give KEY=VALUE to set, or KEY to unset".into(),
        ));
    }
    for k in set.keys().chain(unset) {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(DesiredError::BadEnv(format!(
                "{k:?} is not a variable name"
            )));
        }
    }
    if let Some(s) = service
        && !old.spec.services.contains_key(s)
    {
        return Err(unknown_service(old, s));
    }
    let mut delta = ConfigVars::default();
    let vars = match service {
        Some(s) => delta.services.entry(s.to_owned()).or_default(),
        None => &mut delta.all,
    };
    for (k, v) in set {
        vars.insert(k.clone(), Some(v.clone()));
    }
    for k in unset {
        vars.insert(k.clone(), None);
    }
    let mut config = old.config.clone();
    merge_config(&mut config, &delta);
    let spec = delta.apply(old.spec.clone());
    let mut words: Vec<String> = set.keys().cloned().collect();
    words.extend(unset.iter().map(|k| format!("-{k}")));
    let scope = service.map_or(String::new(), |s| format!(" on {s}"));
    Ok(NewRelease {
        version: 0,
        spec,
        config,
        author: author.to_owned(),
        message: format!("env {}{scope}", words.join(" ")),
        cause: None,
    })
}

/// Sum of the services' restart generations: changes when `berth restart`
/// starts a rollout without a new release.
pub fn generation_of(record: &StackRecord) -> u64 {
    record.services.values().map(|d| d.restart_generation).sum()
}

fn rollout_started(
    record: &StackRecord,
    now: Millis,
    cause: Option<RollbackCause>,
) -> RolloutStatus {
    RolloutStatus {
        release: record.release,
        generation: generation_of(record),
        state: RolloutState::InProgress,
        message: String::new(),
        rolled_back: cause,
        started_at: now,
        updated_at: now,
    }
}

/// `delta` merged into `config`: later values win, per variable.
fn merge_config(config: &mut ConfigVars, delta: &ConfigVars) {
    for (k, v) in &delta.all {
        config.all.insert(k.clone(), v.clone());
        // A stack-wide change overrides earlier per-service values of the
        // same variable, as `berth env set K=V` (no --service) promises.
        for vars in config.services.values_mut() {
            vars.remove(k);
        }
    }
    for (service, vars) in &delta.services {
        let into = config.services.entry(service.clone()).or_default();
        for (k, v) in vars {
            into.insert(k.clone(), v.clone());
        }
    }
}

/// What a rollback or env change makes.
struct NewRelease {
    version: u64,
    spec: berth_spec::types::Stack,
    config: ConfigVars,
    author: String,
    message: String,
    cause: Option<RollbackCause>,
}

/// Commit a release that keeps the stack's scale and run flags (a rollback
/// or config change is not a redeploy of the file: `berth scale` stays).
async fn new_release(
    store: &dyn Store,
    read: &Read,
    old: StackRecord,
    new: NewRelease,
    now: Millis,
) -> Result<Option<Outcome>, DesiredError> {
    let services = new
        .spec
        .services
        .iter()
        .map(|(name, svc)| {
            let desired = old.services.get(name).cloned().unwrap_or(ServiceDesired {
                replicas: svc.deploy.replicas,
                stopped: false,
                restart_generation: 0,
            });
            (name.clone(), desired)
        })
        .collect();
    commit_release(store, read, (&old.namespace, &old.name), new, services, now).await
}

/// Write release `new` (create-only) and make it the current one of stack
/// `(namespace, name)`, with `services` as its scale and run flags and a
/// rollout started.
async fn commit_release(
    store: &dyn Store,
    read: &Read,
    (namespace, name): (&str, &str),
    new: NewRelease,
    services: BTreeMap<String, ServiceDesired>,
    now: Millis,
) -> Result<Option<Outcome>, DesiredError> {
    let release = Release {
        version: new.version,
        spec: new.spec.clone(),
        created_at: now,
        author: new.author,
        message: new.message,
        config: new.config.clone(),
    };
    let mut record = StackRecord {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        release: new.version,
        spec: new.spec,
        services,
        updated_at: now,
        config: new.config,
        rollout: None,
    };
    record.rollout = Some(rollout_started(&record, now, new.cause));
    let release_key = keys::release(namespace, name, new.version);
    let txn = Txn {
        compare: vec![
            Compare::ModRevision(read.key.clone(), read.rev),
            Compare::ModRevision(release_key.clone(), 0),
        ],
        success: vec![
            Op::put(release_key.clone(), encode(&release_key, &release)?),
            Op::put(read.key.clone(), encode(&read.key, &record)?),
        ],
        failure: vec![],
    };
    commit(store, txn, Some(record)).await
}

/// Highest release number of a stack, 0 when it has none.
pub async fn latest_release(store: &dyn Store, ns: &str, stack: &str) -> Result<u64, DesiredError> {
    let (kvs, _) = store.range(&keys::releases_of(ns, stack)).await?;
    let mut latest = 0;
    for kv in &kvs {
        let release: Release = decode(kv)?;
        latest = latest.max(release.version);
    }
    Ok(latest)
}

/// The services a command names, checked against the stack; all when empty.
fn selected(record: &StackRecord, services: &[String]) -> Result<Vec<String>, DesiredError> {
    if services.is_empty() {
        return Ok(record.services.keys().cloned().collect());
    }
    for service in services {
        if !record.services.contains_key(service) {
            return Err(unknown_service(record, service));
        }
    }
    Ok(services.to_vec())
}

async fn commit(
    store: &dyn Store,
    txn: Txn,
    record: Option<StackRecord>,
) -> Result<Option<Outcome>, DesiredError> {
    if store.txn(txn).await?.succeeded {
        Ok(Some(Outcome { record }))
    } else {
        Ok(None)
    }
}

fn not_found(ns: &str, stack: &str) -> DesiredError {
    DesiredError::StackNotFound {
        namespace: ns.to_owned(),
        stack: stack.to_owned(),
    }
}

fn unknown_service(record: &StackRecord, service: &str) -> DesiredError {
    DesiredError::UnknownService {
        stack: record.name.clone(),
        service: service.to_owned(),
        known: record.spec.services.keys().cloned().collect(),
    }
}

/// Names become store key segments and DNS labels later: keep them to
/// Compose's alphabet so no `/` or empty segment can reach a key.
pub fn check_name(what: &'static str, name: &str) -> Result<(), DesiredError> {
    let invalid = |reason| DesiredError::InvalidName {
        what,
        name: name.to_owned(),
        reason,
    };
    // Compose allows upper-case service names, but not project names.
    let letter = |c: char| {
        c.is_ascii_lowercase()
            || c.is_ascii_digit()
            || (what == "service" && c.is_ascii_uppercase())
    };
    let mut chars = name.chars();
    match chars.next() {
        None => return Err(invalid("it is empty")),
        Some(c) if !letter(c) => {
            return Err(invalid("it must start with a lower-case letter or a digit"));
        }
        Some(_) => {}
    }
    if !chars.all(|c| letter(c) || matches!(c, '_' | '.' | '-')) {
        return Err(invalid(
            "only lower-case letters, digits, '_', '.' and '-' are allowed",
        ));
    }
    if name.len() > 63 {
        return Err(invalid("it is longer than 63 characters"));
    }
    Ok(())
}

/// The namespace to use when a request leaves it empty.
pub fn namespace_or_default(ns: Option<&str>) -> &str {
    match ns {
        Some(ns) if !ns.is_empty() => ns,
        _ => DEFAULT_NAMESPACE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_store::embedded::EmbeddedStore;

    use crate::test_util::stack;

    const V1: &str =
        "services:\n  web: {command: v1, deploy: {replicas: 2}}\n  db: {command: db}\n";
    const V2: &str =
        "services:\n  web: {command: v2, deploy: {replicas: 2}}\n  db: {command: db}\n";

    fn submit(yaml: &str) -> Command {
        Command::SubmitStack {
            namespace: "default".into(),
            stack: stack(yaml),
            author: "me".into(),
            message: "deploy".into(),
        }
    }

    fn target() -> (String, String) {
        ("default".into(), "shop".into())
    }

    async fn run(store: &dyn Store, cmd: Command, now: Millis) -> StackRecord {
        apply(store, &cmd, now).await.unwrap().record.unwrap()
    }

    fn open() -> (tempfile::TempDir, EmbeddedStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        (dir, store)
    }

    /// The release-making commands (submit, env, rollback) number releases
    /// in order and keep what they promise to keep: `berth scale` survives
    /// an env change and a rollback, a restart generation survives a
    /// redeploy, and a rollback restores the old spec with the old vars.
    #[tokio::test]
    async fn releases_keep_scale_restarts_and_config_as_promised() {
        let (_dir, store) = open();
        let (namespace, stack) = target();
        let r = run(&store, submit(V1), 1).await;
        assert_eq!((r.release, r.services["web"].replicas), (1, 2));
        let r = run(
            &store,
            Command::Restart {
                namespace: namespace.clone(),
                stack: stack.clone(),
                services: vec!["web".into()],
            },
            2,
        )
        .await;
        assert_eq!(r.services["web"].restart_generation, 1);
        assert_eq!(r.services["db"].restart_generation, 0);

        let r = run(&store, submit(V2), 3).await;
        assert_eq!(r.release, 2);
        assert_eq!(r.services["web"].restart_generation, 1, "kept by a deploy");
        let r = run(
            &store,
            Command::Scale {
                namespace: namespace.clone(),
                stack: stack.clone(),
                replicas: BTreeMap::from([("web".into(), 5)]),
            },
            4,
        )
        .await;
        assert_eq!(
            (r.release, r.services["web"].replicas, r.updated_at),
            (2, 5, 4)
        );

        let r = run(
            &store,
            Command::SetEnv {
                namespace: namespace.clone(),
                stack: stack.clone(),
                service: Some("web".into()),
                set: BTreeMap::from([("K".into(), "v".into())]),
                unset: vec![],
                author: "me".into(),
            },
            5,
        )
        .await;
        assert_eq!(r.release, 3);
        assert_eq!(
            r.services["web"].replicas, 5,
            "an env change keeps the scale"
        );
        assert_eq!(r.spec.services["web"].environment["K"], Some("v".into()));
        assert!(!r.spec.services["db"].environment.contains_key("K"));

        let r = run(
            &store,
            Command::Rollback {
                namespace: namespace.clone(),
                stack: stack.clone(),
                to: Some(1),
                author: "me".into(),
                if_current: None,
                cause: None,
            },
            6,
        )
        .await;
        assert_eq!(r.release, 4, "a rollback is a new release");
        assert_eq!(r.services["web"].replicas, 5, "a rollback keeps the scale");
        assert!(
            matches!(&r.spec.services["web"].command, Some(berth_spec::types::Command::Shell(c)) if c == "v1")
        );
        assert!(r.config.services.is_empty(), "v1's config vars come back");
        assert_eq!(r.rollout.unwrap().release, 4);
        let release: Release = decode(
            &store
                .get(&keys::release(&namespace, &stack, 4))
                .await
                .unwrap()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(release.message, "rollback to v1");
        assert_eq!(latest_release(&store, &namespace, &stack).await.unwrap(), 4);
    }

    #[tokio::test]
    async fn refusals_say_which_stack_service_or_release() {
        let (_dir, store) = open();
        let (namespace, stack) = target();
        let scale = |service: &str, n: u32| Command::Scale {
            namespace: namespace.clone(),
            stack: stack.clone(),
            replicas: BTreeMap::from([(service.into(), n)]),
        };
        assert!(matches!(
            apply(&store, &scale("web", 1), 1).await,
            Err(DesiredError::StackNotFound { .. })
        ));
        run(&store, submit(V1), 1).await;
        assert!(matches!(
            apply(&store, &scale("nope", 1), 2).await,
            Err(DesiredError::UnknownService { service, known, .. })
                if service == "nope" && known == ["db", "web"]
        ));
        assert!(matches!(
            apply(&store, &scale("web", MAX_REPLICAS + 1), 2).await,
            Err(DesiredError::TooManyReplicas { .. })
        ));
        let rollback = |to, if_current| Command::Rollback {
            namespace: namespace.clone(),
            stack: stack.clone(),
            to,
            author: "me".into(),
            if_current,
            cause: None,
        };
        assert!(matches!(
            apply(&store, &rollback(None, None), 2).await,
            Err(DesiredError::NothingToRollBack { .. })
        ));
        assert!(matches!(
            apply(&store, &rollback(Some(7), None), 2).await,
            Err(DesiredError::ReleaseNotFound {
                version: 7,
                latest: 1,
                ..
            })
        ));
        run(&store, submit(V2), 3).await;
        // The controller's automatic rollback of v1 must not undo v2.
        assert!(matches!(
            apply(&store, &rollback(None, Some(1)), 4).await,
            Err(DesiredError::Superseded { expected: 1, .. })
        ));
        let env = |k: &str| Command::SetEnv {
            namespace: namespace.clone(),
            stack: stack.clone(),
            service: None,
            set: BTreeMap::from([(k.into(), "v".into())]),
            unset: vec![],
            author: "me".into(),
        };
        assert!(matches!(
            apply(&store, &env("A=B"), 5).await,
            Err(DesiredError::BadEnv(_))
        ));
        assert!(matches!(
            apply(&store, &env(""), 5).await,
            Err(DesiredError::BadEnv(_))
        ));
        // Nothing refused above wrote anything.
        assert_eq!(latest_release(&store, &namespace, &stack).await.unwrap(), 2);
    }

    /// Concurrent writers never lose an update: each attempt compares the
    /// record's revision and starts again from a fresh read when it lost.
    #[tokio::test]
    async fn concurrent_commands_all_apply() {
        let (_dir, store) = open();
        let (namespace, stack) = target();
        run(&store, submit(V1), 1).await;
        let restart = Command::Restart {
            namespace: namespace.clone(),
            stack: stack.clone(),
            services: vec!["db".into()],
        };
        let results =
            futures::future::join_all((0..8).map(|i| apply(&store, &restart, 10 + i))).await;
        assert!(results.iter().all(Result::is_ok));
        let kv = store.get(&keys::stack(&namespace, &stack)).await.unwrap();
        let record: StackRecord = decode(&kv.unwrap()).unwrap();
        assert_eq!(record.services["db"].restart_generation, 8);
        let removed = apply(
            &store,
            &Command::RemoveStack {
                namespace: namespace.clone(),
                stack: stack.clone(),
            },
            20,
        )
        .await
        .unwrap();
        assert!(removed.record.is_none());
        assert_eq!(latest_release(&store, &namespace, &stack).await.unwrap(), 0);
    }
}
