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
    let stack_key = keys::stack(ns, name);
    let current = store.get(&stack_key).await?;
    let current_rev = current.as_ref().map_or(0, |kv| kv.mod_revision);

    match cmd {
        Command::SubmitStack {
            namespace,
            stack,
            author,
            message,
        } => {
            if stack.services.is_empty() {
                return Err(DesiredError::EmptyStack {
                    stack: stack.name.clone(),
                });
            }
            for (name, service) in &stack.services {
                check_name("service", name)?;
                check_replicas(name, service.deploy.replicas)?;
            }
            let old: Option<StackRecord> = current.as_ref().map(decode).transpose()?;
            let version = latest_release(store, namespace, &stack.name).await? + 1;
            let config = old.as_ref().map(|o| o.config.clone()).unwrap_or_default();
            let stack = &config.apply(stack.clone());
            let release = Release {
                version,
                spec: stack.clone(),
                created_at: now,
                author: author.clone(),
                message: message.clone(),
                config: config.clone(),
            };
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
            let mut record = StackRecord {
                namespace: namespace.clone(),
                name: stack.name.clone(),
                release: version,
                spec: stack.clone(),
                services,
                updated_at: now,
                config,
                rollout: None,
            };
            record.rollout = Some(rollout_started(&record, now, None));
            let release_key = keys::release(namespace, &stack.name, version);
            let txn = Txn {
                compare: vec![
                    Compare::ModRevision(stack_key.clone(), current_rev),
                    Compare::ModRevision(release_key.clone(), 0),
                ],
                success: vec![
                    Op::put(release_key.clone(), encode(&release_key, &release)?),
                    Op::put(stack_key.clone(), encode(&stack_key, &record)?),
                ],
                failure: vec![],
            };
            commit(store, txn, Some(record)).await
        }
        Command::RemoveStack { namespace, stack } => {
            if current.is_none() {
                return Err(not_found(namespace, stack));
            }
            let txn = Txn {
                compare: vec![Compare::ModRevision(stack_key.clone(), current_rev)],
                success: vec![
                    Op::Delete(stack_key.clone()),
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
            let mut record = existing(current.as_ref(), namespace, stack)?;
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
            record.updated_at = now;
            update(store, &stack_key, current_rev, record).await
        }
        Command::SetStopped {
            namespace,
            stack,
            services,
            stopped,
        } => {
            let mut record = existing(current.as_ref(), namespace, stack)?;
            for service in selected(&record, services)? {
                if let Some(d) = record.services.get_mut(&service) {
                    d.stopped = *stopped;
                }
            }
            record.updated_at = now;
            update(store, &stack_key, current_rev, record).await
        }
        Command::Restart {
            namespace,
            stack,
            services,
        } => {
            let mut record = existing(current.as_ref(), namespace, stack)?;
            for service in selected(&record, services)? {
                if let Some(d) = record.services.get_mut(&service) {
                    d.restart_generation += 1;
                    // Restarting a stopped service means "run it again".
                    d.stopped = false;
                }
            }
            record.updated_at = now;
            record.rollout = Some(rollout_started(&record, now, None));
            update(store, &stack_key, current_rev, record).await
        }
        Command::Rollback {
            namespace,
            stack,
            to,
            author,
            if_current,
            cause,
        } => {
            let old = existing(current.as_ref(), namespace, stack)?;
            if let Some(expected) = *if_current
                && old.release != expected
            {
                return Err(DesiredError::Superseded {
                    stack: stack.clone(),
                    expected,
                });
            }
            let target = match to {
                Some(v) => *v,
                None if old.release > 1 => old.release - 1,
                None => {
                    return Err(DesiredError::NothingToRollBack {
                        stack: stack.clone(),
                    });
                }
            };
            let latest = latest_release(store, namespace, stack).await?;
            let Some(kv) = store.get(&keys::release(namespace, stack, target)).await? else {
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
            let cause = cause.clone();
            new_release(
                store,
                &stack_key,
                current_rev,
                old,
                NewRelease {
                    version: latest + 1,
                    spec: source.spec,
                    config: source.config,
                    author: author.clone(),
                    message,
                    cause,
                },
                now,
            )
            .await
        }
        Command::SetEnv {
            namespace,
            stack,
            service,
            set,
            unset,
            author,
        } => {
            let old = existing(current.as_ref(), namespace, stack)?;
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
                return Err(unknown_service(&old, s));
            }
            let mut delta = ConfigVars::default();
            let vars = match service {
                Some(s) => delta.services.entry(s.clone()).or_default(),
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
            let scope = service
                .as_ref()
                .map_or(String::new(), |s| format!(" on {s}"));
            let message = format!("env {}{scope}", words.join(" "));
            let version = latest_release(store, namespace, stack).await? + 1;
            new_release(
                store,
                &stack_key,
                current_rev,
                old,
                NewRelease {
                    version,
                    spec,
                    config,
                    author: author.clone(),
                    message,
                    cause: None,
                },
                now,
            )
            .await
        }
        Command::SetRollout {
            namespace,
            stack,
            release,
            generation,
            state,
            message,
        } => {
            let mut record = existing(current.as_ref(), namespace, stack)?;
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
            update(store, &stack_key, current_rev, record).await
        }
    }
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
    stack_key: &str,
    current_rev: i64,
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
    let release = Release {
        version: new.version,
        spec: new.spec.clone(),
        created_at: now,
        author: new.author,
        message: new.message,
        config: new.config.clone(),
    };
    let mut record = StackRecord {
        namespace: old.namespace.clone(),
        name: old.name.clone(),
        release: new.version,
        spec: new.spec,
        services,
        updated_at: now,
        config: new.config,
        rollout: None,
    };
    record.rollout = Some(rollout_started(&record, now, new.cause));
    let release_key = keys::release(&old.namespace, &old.name, new.version);
    let txn = Txn {
        compare: vec![
            Compare::ModRevision(stack_key.to_owned(), current_rev),
            Compare::ModRevision(release_key.clone(), 0),
        ],
        success: vec![
            Op::put(release_key.clone(), encode(&release_key, &release)?),
            Op::put(stack_key.to_owned(), encode(stack_key, &record)?),
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

fn existing(kv: Option<&KeyValue>, ns: &str, stack: &str) -> Result<StackRecord, DesiredError> {
    match kv {
        Some(kv) => Ok(decode(kv)?),
        None => Err(not_found(ns, stack)),
    }
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

async fn update(
    store: &dyn Store,
    stack_key: &str,
    rev: i64,
    record: StackRecord,
) -> Result<Option<Outcome>, DesiredError> {
    let txn = Txn {
        compare: vec![Compare::ModRevision(stack_key.to_owned(), rev)],
        success: vec![Op::put(stack_key.to_owned(), encode(stack_key, &record)?)],
        failure: vec![],
    };
    commit(store, txn, Some(record)).await
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
