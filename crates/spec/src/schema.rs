//! The Compose key vocabulary (from the Compose Specification's JSON Schema,
//! `compose-spec.json`) and which of those keys berth acts on. A key in the
//! vocabulary that berth ignores produces a warning; a key outside it (and
//! not `x-*`) is an error with a "did you mean" hint.

use crate::diagnostics::{Diagnostic, Diags};
use crate::yaml::Node;

pub const TOP: &[&str] = &[
    "version", "name", "include", "services", "models", "networks", "volumes", "secrets", "configs",
];
pub const SERVICE: &[&str] = &[
    "develop",
    "deploy",
    "annotations",
    "attach",
    "build",
    "blkio_config",
    "cap_add",
    "cap_drop",
    "cgroup",
    "cgroup_parent",
    "command",
    "configs",
    "container_name",
    "cpu_count",
    "cpu_percent",
    "cpu_shares",
    "cpu_quota",
    "cpu_period",
    "cpu_rt_period",
    "cpu_rt_runtime",
    "cpus",
    "cpuset",
    "credential_spec",
    "depends_on",
    "device_cgroup_rules",
    "devices",
    "dns",
    "dns_opt",
    "dns_search",
    "domainname",
    "entrypoint",
    "env_file",
    "label_file",
    "environment",
    "expose",
    "extends",
    "provider",
    "external_links",
    "extra_hosts",
    "gpus",
    "group_add",
    "healthcheck",
    "hostname",
    "image",
    "init",
    "ipc",
    "isolation",
    "labels",
    "links",
    "logging",
    "mac_address",
    "mem_limit",
    "mem_reservation",
    "mem_swappiness",
    "memswap_limit",
    "network_mode",
    "models",
    "networks",
    "oom_kill_disable",
    "oom_score_adj",
    "pid",
    "pids_limit",
    "platform",
    "ports",
    "post_start",
    "pre_stop",
    "privileged",
    "profiles",
    "pull_policy",
    "pull_refresh_after",
    "read_only",
    "restart",
    "runtime",
    "scale",
    "security_opt",
    "shm_size",
    "secrets",
    "sysctls",
    "stdin_open",
    "stop_grace_period",
    "stop_signal",
    "storage_opt",
    "tmpfs",
    "tty",
    "ulimits",
    "use_api_socket",
    "user",
    "uts",
    "userns_mode",
    "volumes",
    "volumes_from",
    "working_dir",
];
pub const BUILD: &[&str] = &[
    "context",
    "dockerfile",
    "dockerfile_inline",
    "entitlements",
    "args",
    "ssh",
    "labels",
    "cache_from",
    "cache_to",
    "no_cache",
    "additional_contexts",
    "network",
    "provenance",
    "sbom",
    "pull",
    "target",
    "shm_size",
    "extra_hosts",
    "isolation",
    "privileged",
    "secrets",
    "tags",
    "ulimits",
    "platforms",
];
pub const SERVICE_VOLUME: &[&str] = &[
    "type",
    "source",
    "target",
    "read_only",
    "consistency",
    "bind",
    "volume",
    "tmpfs",
    "image",
];
pub const SERVICE_NETWORK: &[&str] = &[
    "aliases",
    "interface_name",
    "ipv4_address",
    "ipv6_address",
    "link_local_ips",
    "mac_address",
    "driver_opts",
    "priority",
    "gw_priority",
];
pub const VOLUME: &[&str] = &["name", "driver", "driver_opts", "external", "labels"];

/// Top-level keys berth acts on.
pub const TOP_SUPPORTED: &[&str] = &["name", "include", "services", "networks", "volumes"];
/// Service keys berth acts on.
pub const SERVICE_SUPPORTED: &[&str] = &[
    "build",
    "cap_add",
    "cap_drop",
    "command",
    "depends_on",
    "deploy",
    "entrypoint",
    "env_file",
    "environment",
    "expose",
    "extends",
    "extra_hosts",
    "healthcheck",
    "image",
    "init",
    "labels",
    "links",
    "networks",
    "ports",
    "profiles",
    "pull_policy",
    "read_only",
    "restart",
    "scale",
    "stop_grace_period",
    "stop_signal",
    "tmpfs",
    "user",
    "volumes",
    "working_dir",
];
/// Service keys that only mean something to a container (the Docker
/// driver): on a process service (no `image`/`build`) they warn.
pub const DOCKER_ONLY: &[&str] = &[
    "cap_add",
    "cap_drop",
    "extra_hosts",
    "init",
    "networks",
    "pull_policy",
    "read_only",
    "tmpfs",
    "user",
    "volumes",
];
/// `healthcheck` keys (all supported).
pub const HEALTHCHECK: &[&str] = &[
    "disable",
    "interval",
    "retries",
    "test",
    "timeout",
    "start_period",
    "start_interval",
];
/// `deploy` keys.
pub const DEPLOY: &[&str] = &[
    "mode",
    "endpoint_mode",
    "replicas",
    "labels",
    "rollback_config",
    "update_config",
    "resources",
    "restart_policy",
    "placement",
];
/// `deploy` keys berth acts on.
pub const DEPLOY_SUPPORTED: &[&str] = &[
    "mode",
    "replicas",
    "labels",
    "rollback_config",
    "update_config",
    "resources",
    "restart_policy",
    "placement",
];
/// `deploy.resources` keys.
pub const RESOURCES: &[&str] = &["limits", "reservations"];
/// `deploy.resources.limits` / `reservations` keys.
pub const RESOURCE_SPEC: &[&str] = &["cpus", "memory", "pids", "generic_resources", "devices"];
/// Of those, the ones berth acts on.
pub const RESOURCE_SPEC_SUPPORTED: &[&str] = &["cpus", "memory", "pids"];
/// `deploy.restart_policy` keys.
pub const RESTART_POLICY: &[&str] = &["condition", "delay", "max_attempts", "window"];
/// Of those, the ones berth acts on.
pub const RESTART_POLICY_SUPPORTED: &[&str] = &["condition", "max_attempts"];
/// `deploy.update_config` / `rollback_config` keys (all supported).
pub const UPDATE_CONFIG: &[&str] = &[
    "parallelism",
    "delay",
    "failure_action",
    "monitor",
    "max_failure_ratio",
    "order",
];
/// `deploy.placement` keys (all supported).
pub const PLACEMENT: &[&str] = &["constraints", "preferences", "max_replicas_per_node"];
/// Long-syntax port keys (all supported).
pub const PORT: &[&str] = &[
    "name",
    "mode",
    "host_ip",
    "target",
    "published",
    "protocol",
    "app_protocol",
];
/// `depends_on` long-syntax keys.
pub const DEPENDS_ON: &[&str] = &["condition", "restart", "required"];
/// `extends` keys.
pub const EXTENDS: &[&str] = &["service", "file"];
/// `include` entry keys.
pub const INCLUDE: &[&str] = &["path", "env_file", "project_directory"];
/// `env_file` long-syntax keys.
pub const ENV_FILE: &[&str] = &["path", "required", "format"];
/// Of those, the ones berth acts on (`format` alternatives are not read).
pub const ENV_FILE_SUPPORTED: &[&str] = &["path", "required"];
/// `build` keys berth acts on.
pub const BUILD_SUPPORTED: &[&str] = &["context", "dockerfile", "args", "target"];
/// Long-syntax volume keys berth acts on.
pub const SERVICE_VOLUME_SUPPORTED: &[&str] = &["type", "source", "target", "read_only"];
/// Service network keys berth acts on.
pub const SERVICE_NETWORK_SUPPORTED: &[&str] = &["aliases"];
/// Top-level volume keys berth acts on.
pub const VOLUME_SUPPORTED: &[&str] = &["name", "external"];
/// `x-berth` keys.
pub const BERTH: &[&str] = &["routes", "port_env", "healthcheck", "placement"];
/// `x-berth.placement` keys.
pub const BERTH_PLACEMENT: &[&str] = &["strategy", "affinity", "anti_affinity"];
/// `x-berth.healthcheck` keys.
pub const BERTH_HEALTHCHECK: &[&str] = &[
    "http",
    "tcp",
    "port",
    "interval",
    "timeout",
    "retries",
    "start_period",
    "start_interval",
];

/// What berth supports in place of an unsupported service key, when
/// something does the same job.
fn instead(key: &str) -> Option<&'static str> {
    Some(match key {
        "mem_limit" => "use `deploy.resources.limits.memory`, which berth applies",
        "mem_reservation" => {
            "use `deploy.resources.reservations.memory`, which the scheduler counts"
        }
        "cpus" => "use `deploy.resources.limits.cpus`, which berth applies",
        "pids_limit" => "use `deploy.resources.limits.pids`, which berth applies",
        "container_name" => "berth names every instance itself (`web.1`); remove it",
        _ => return None,
    })
}

/// Checks the keys of mapping `node` (at dotted `path`): `x-*` keys are left
/// to the caller; keys in `known` but not `supported` warn; others are errors.
pub fn check_keys(
    node: &Node,
    path: &str,
    service: Option<&str>,
    known: &[&str],
    supported: &[&str],
    diags: &mut Diags,
) {
    let Some(entries) = node.as_map() else {
        return;
    };
    for (k, _) in entries {
        let key = k.as_str().unwrap_or_default();
        if key.starts_with("x-") || supported.contains(&key) {
            continue;
        }
        let field = if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        };
        let mut d = Diagnostic::at(&k.pos, "").field(field);
        if let Some(s) = service {
            d = d.service(s);
        }
        if known.contains(&key) {
            d.message = format!("`{key}` is not supported by berth and is ignored");
            // Only keys of the service itself (`services.<name>.<key>`).
            if service.is_some_and(|s| path.strip_prefix("services.") == Some(s)) {
                d.hint = instead(key).map(str::to_owned);
            }
            diags.warn(d);
        } else {
            d.message = format!("unknown key `{key}`");
            d.hint = Some(match did_you_mean(key, known) {
                Some(s) => format!("did you mean `{s}`?"),
                None => "remove it, or prefix it with `x-` to keep it as an extension field".into(),
            });
            diags.error(d);
        }
    }
}

/// The closest of `candidates` to `word`, if close enough to be a typo.
pub fn did_you_mean<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).clamp(1, 3);
    candidates
        .iter()
        .map(|c| (levenshtein(word, c), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}
