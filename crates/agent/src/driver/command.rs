//! Turning an assignment into a [`LaunchSpec`]: the argv (Compose/Docker
//! rules for `entrypoint` + `command`), the working directory and the
//! instance's environment. Pure functions: no I/O, no clock.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use berth_model::Assignment;
use berth_spec::types::{Command, Driver as DriverKind};

use super::{DriverError, LaunchSpec};

/// Variables copied from the agent's own environment: enough for programs
/// to find their tools and locale, nothing that leaks the agent's secrets.
pub const INHERITED_VARS: &[&str] = &["PATH", "HOME", "LANG", "TERM", "USER", "SHELL", "TZ"];

/// Used when the agent itself has no `PATH`.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Assignment env key through which the controller can pass the stack's
/// project directory (the default working directory of processes).
pub const PROJECT_DIR_VAR: &str = "BERTH_PROJECT_DIR";

/// Name of the variable that marks every process of an agent, used to find
/// orphans after the agent was killed.
pub const AGENT_ID_VAR: &str = "BERTH_AGENT_ID";

/// Assignment env key through which the controller passes the stack's
/// service names and the addresses this instance reaches them on
/// (`name=address`, space-separated). Processes get them as their
/// `/etc/hosts` (see [`super::hosts`]), containers as `extra_hosts`.
pub const HOSTS_VAR: &str = "BERTH_HOSTS";

/// The `(name, address)` pairs of a `BERTH_HOSTS` value; malformed entries
/// (no `=`, an address that is not an IP) are skipped.
pub fn parse_hosts(value: &str) -> Vec<(String, std::net::IpAddr)> {
    value
        .split_whitespace()
        .filter_map(|pair| {
            let (name, addr) = pair.split_once('=')?;
            let addr = addr.parse().ok()?;
            (!name.is_empty()).then(|| (name.to_owned(), addr))
        })
        .collect()
}

/// What the agent adds to every launch.
#[derive(Debug, Clone)]
pub struct LaunchContext<'a> {
    /// This agent's id (see [`crate::orphans::agent_id`]).
    pub agent_id: &'a str,
    /// Fallback working directory when neither the service nor the stack
    /// names one.
    pub fallback_dir: &'a Path,
    /// The agent's own environment (only [`INHERITED_VARS`] are taken).
    pub inherited: &'a BTreeMap<String, String>,
}

fn argv_of(command: &Command) -> Vec<String> {
    match command {
        Command::Shell(s) => vec!["sh".to_owned(), "-c".to_owned(), s.clone()],
        Command::Exec(v) => v.clone(),
    }
}

/// The argv of a service, as Docker builds it: `entrypoint ++ command`,
/// each through `sh -c` only when written as a string.
pub fn argv(
    entrypoint: Option<&Command>,
    command: Option<&Command>,
) -> Result<Vec<String>, DriverError> {
    let mut argv = entrypoint.map(argv_of).unwrap_or_default();
    argv.extend(command.map(argv_of).unwrap_or_default());
    match argv.first() {
        None => Err(DriverError::Invalid(
            "the service has neither `command` nor `entrypoint`: give it a `command:`".into(),
        )),
        Some(p) if p.is_empty() => Err(DriverError::Invalid(
            "the command's program name is empty".into(),
        )),
        Some(_) => Ok(argv),
    }
}

/// Build the launch spec of one instance.
///
/// Environment, later layers winning: inherited basics, the service's
/// `environment` (a `None` value unsets), the assignment's `env` (the
/// controller leaves out discovery variables the service sets itself), then
/// the port variable and the `BERTH_*` variables. A container also gets the
/// `BERTH_HOSTS` names as `extra_hosts`.
///
/// Containers differ: the image supplies `PATH` and the rest, so nothing is
/// inherited from the agent; `entrypoint`/`command` may both be absent (the
/// image's own run), so `argv` is left empty (the Docker driver reads them
/// from the service); and the agent-id marker is left out, because
/// container processes are visible in the host's `/proc`, where the orphan
/// killer would find and kill containers that are meant to be adopted.
pub fn launch_spec(
    a: &Assignment,
    port: Option<u16>,
    ctx: &LaunchContext<'_>,
) -> Result<LaunchSpec, DriverError> {
    let svc = &a.service;
    let container = svc.driver() == DriverKind::Docker;
    let argv = if container {
        Vec::new()
    } else {
        argv(svc.entrypoint.as_ref(), svc.command.as_ref())?
    };

    let mut env = BTreeMap::new();
    if !container {
        for var in INHERITED_VARS {
            if let Some(v) = ctx.inherited.get(*var) {
                env.insert((*var).to_owned(), v.clone());
            }
        }
        env.entry("PATH".to_owned())
            .or_insert_with(|| DEFAULT_PATH.to_owned());
    }
    for (k, v) in &svc.environment {
        match v {
            Some(v) => env.insert(k.clone(), v.clone()),
            None => env.remove(k),
        };
    }
    for (k, v) in &a.env {
        env.insert(k.clone(), v.clone());
    }
    if let Some(port) = port {
        let name = svc
            .berth
            .port_env
            .clone()
            .unwrap_or_else(|| "PORT".to_owned());
        env.insert(name, port.to_string());
    }
    env.insert("BERTH_SERVICE".into(), a.key.service.clone());
    env.insert("BERTH_INSTANCE".into(), a.key.short());
    env.insert("BERTH_STACK".into(), a.key.stack.clone());
    env.insert("BERTH_NAMESPACE".into(), a.key.namespace.clone());
    if !container {
        env.insert(AGENT_ID_VAR.into(), ctx.agent_id.to_owned());
    }

    let working_dir = svc
        .working_dir
        .clone()
        .or_else(|| a.env.get(PROJECT_DIR_VAR).map(PathBuf::from))
        .unwrap_or_else(|| ctx.fallback_dir.to_path_buf());

    let mut service = svc.clone();
    if container && let Some(hosts) = env.get(HOSTS_VAR) {
        // Names the stack network's DNS cannot answer (process services),
        // unless the stack file maps the name itself.
        for (name, addr) in parse_hosts(hosts) {
            let taken = service
                .extra_hosts
                .iter()
                .any(|h| h.split([':', '=']).next() == Some(name.as_str()));
            if !taken {
                service.extra_hosts.push(format!("{name}:{addr}"));
            }
        }
    }

    Ok(LaunchSpec {
        key: a.key.clone(),
        uid: a.uid.clone(),
        argv,
        env,
        working_dir,
        limits: svc.deploy.resources.limits.clone(),
        service,
        release: a.release,
        restarts: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(s: &str) -> Command {
        Command::Shell(s.into())
    }
    fn exec(v: &[&str]) -> Command {
        Command::Exec(v.iter().map(|s| (*s).to_owned()).collect())
    }

    #[test]
    fn shell_form_goes_through_sh() {
        assert_eq!(
            argv(None, Some(&sh("echo hi"))).unwrap(),
            ["sh", "-c", "echo hi"]
        );
    }

    #[test]
    fn exec_form_is_exec_d() {
        assert_eq!(
            argv(None, Some(&exec(&["python3", "-V"]))).unwrap(),
            ["python3", "-V"]
        );
    }

    #[test]
    fn entrypoint_and_command_concatenate_like_docker() {
        assert_eq!(
            argv(Some(&exec(&["tini", "--"])), Some(&exec(&["app", "x"]))).unwrap(),
            ["tini", "--", "app", "x"]
        );
        assert_eq!(
            argv(Some(&sh("exec \"$0\" \"$@\"")), Some(&exec(&["app"]))).unwrap(),
            ["sh", "-c", "exec \"$0\" \"$@\"", "app"]
        );
    }

    #[test]
    fn containers_get_the_stack_names_as_extra_hosts_unless_mapped() {
        let mut service = berth_spec::types::Service::new("box");
        service.image = Some("busybox".into());
        service.extra_hosts = vec!["db=10.0.0.9".into()];
        let a = Assignment {
            key: berth_model::InstanceKey::new("default", "shop", "box", 1),
            uid: "u".into(),
            node: "n".into(),
            release: 1,
            restart_generation: 0,
            service,
            env: BTreeMap::from([(
                HOSTS_VAR.to_owned(),
                "api=198.19.0.7 api.shop=198.19.0.7 db=198.19.0.8".to_owned(),
            )]),
            desired: berth_model::DesiredState::Running,
            created_at: 0,
            retire_at: None,
        };
        let inherited = BTreeMap::new();
        let ctx = LaunchContext {
            agent_id: "agent",
            fallback_dir: Path::new("/"),
            inherited: &inherited,
        };
        let spec = launch_spec(&a, None, &ctx).unwrap();
        assert_eq!(
            spec.service.extra_hosts,
            ["db=10.0.0.9", "api:198.19.0.7", "api.shop:198.19.0.7"]
        );
        assert_eq!(spec.env[HOSTS_VAR], a.env[HOSTS_VAR]);
    }

    #[test]
    fn nothing_to_run_is_an_error() {
        assert!(argv(None, None).is_err());
        assert!(argv(None, Some(&exec(&[]))).is_err());
    }
}
