//! From a launch spec to the engine's container configuration: names,
//! labels, mounts, limits, networking. Pure functions: no I/O, no clock.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use berth_model::InstanceKey;
use berth_spec::types::{Command, Service};
use bollard::models::{
    ContainerCreateBody, EndpointSettings, HostConfig, Mount, MountType, MountVolumeOptions,
    NetworkingConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum,
};

use super::dns::ContainerDns;
use crate::driver::LaunchSpec;

/// Label: the stack's namespace.
pub const LABEL_NAMESPACE: &str = "berth.namespace";
/// Label: the stack.
pub const LABEL_STACK: &str = "berth.stack";
/// Label: the service.
pub const LABEL_SERVICE: &str = "berth.service";
/// Label: the instance slot.
pub const LABEL_INSTANCE: &str = "berth.instance";
/// Label: the assignment uid (the incarnation).
pub const LABEL_UID: &str = "berth.uid";
/// Label: the release.
pub const LABEL_RELEASE: &str = "berth.release";
/// Label: the agent that runs it (see [`crate::orphans::agent_id`]).
pub const LABEL_AGENT: &str = "berth.agent";
/// Label: restarts of the incarnation before this container started.
pub const LABEL_RESTARTS: &str = "berth.restarts";
/// Label on networks and volumes berth created.
pub const LABEL_MANAGED: &str = "berth.managed";

/// Keep `[A-Za-z0-9_.-]`, replace the rest with `_` (Docker's name rule).
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `berth-<ns>-<stack>-<service>-<slot>-<short uid>`.
pub fn container_name(key: &InstanceKey, uid: &str) -> String {
    let short: String = uid
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect();
    clean(&format!(
        "berth-{}-{}-{}-{}-{short}",
        key.namespace, key.stack, key.service, key.slot
    ))
}

/// The stack's network: `berth_<ns>_<stack>`.
pub fn network_name(namespace: &str, stack: &str) -> String {
    clean(&format!("berth_{namespace}_{stack}"))
}

/// A named volume of a stack: `<stack>_<name>` (Compose's naming).
pub fn volume_name(stack: &str, name: &str) -> String {
    clean(&format!("{stack}_{name}"))
}

/// The image a service runs: its `image:`, or `<stack>-<service>` for a
/// `build:` without one (Compose's default tag), lower-cased as image
/// names must be.
pub fn image_name(key: &InstanceKey, service: &Service) -> String {
    service_image(&key.stack, service)
}

/// [`image_name`] from the stack's name alone.
pub fn service_image(stack: &str, service: &Service) -> String {
    match &service.image {
        Some(i) => i.clone(),
        None => clean(&format!("{stack}-{}", service.name)).to_ascii_lowercase(),
    }
}

/// Labels on networks and volumes of a stack.
pub fn stack_labels(key: &InstanceKey) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_MANAGED.to_owned(), "true".to_owned()),
        (LABEL_NAMESPACE.to_owned(), key.namespace.clone()),
        (LABEL_STACK.to_owned(), key.stack.clone()),
    ])
}

fn argv_of(c: &Command) -> Vec<String> {
    match c {
        Command::Shell(s) => vec!["/bin/sh".to_owned(), "-c".to_owned(), s.clone()],
        Command::Exec(v) => v.clone(),
    }
}

/// Compose's `extra_hosts` accept `host:ip` and `host=ip`; the engine
/// wants `host:ip` (an IPv6 address keeps its colons after the first).
fn extra_host(h: &str) -> String {
    match h.split_once('=') {
        Some((host, ip)) => format!("{host}:{ip}"),
        None => h.to_owned(),
    }
}

/// Where a container's declared ports are published on its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The node's advertised address (the host IP of every binding).
    pub ip: IpAddr,
    /// Declared port → host port.
    pub ports: BTreeMap<u16, u16>,
}

/// The host ports a running container's declared TCP ports are bound to on
/// `ip`, from the engine's `NetworkSettings.Ports`; `None` when one of
/// `targets` has no binding there (the container was not created to be
/// reached from other nodes).
pub fn bound_ports(
    ports: &bollard::models::PortMap,
    ip: IpAddr,
    targets: &[u16],
) -> Option<BTreeMap<u16, u16>> {
    let mut out = BTreeMap::new();
    for t in targets {
        let bindings = ports.get(&format!("{t}/tcp"))?.as_ref()?;
        let host = bindings.iter().find_map(|b| {
            let bip: IpAddr = b.host_ip.as_deref()?.parse().ok()?;
            (bip == ip).then_some(())?;
            b.host_port.as_deref()?.parse::<u16>().ok()
        })?;
        out.insert(*t, host);
    }
    Some(out)
}

/// What the engine binds on the host for a container:
/// - its declared TCP ports at the agent's host ports on the advertise
///   address when `published` (a node other nodes reach); never the user's
///   `published` TCP port: the edge's TCP proxy serves that on every node,
///   so a host port here would collide with it;
/// - its published UDP ports (`"5353:53/udp"`) at `host_ip:published`
///   (127.0.0.1 without `host_ip`, as for TCP), on whatever node it runs:
///   the edge proxies no UDP, so the engine is what makes the port reach
///   the container, as with `docker compose`. One instance per node can
///   hold such a port.
fn port_bindings(svc: &Service, published: Option<&Published>) -> Option<bollard::models::PortMap> {
    let mut map = bollard::models::PortMap::new();
    if let Some(p) = published {
        for (target, host) in &p.ports {
            map.insert(
                format!("{target}/tcp"),
                Some(vec![PortBinding {
                    host_ip: Some(p.ip.to_string()),
                    host_port: Some(host.to_string()),
                }]),
            );
        }
    }
    for port in svc.ports.iter().filter(|p| p.protocol == "udp") {
        let Some(host) = port.published else {
            continue;
        };
        let binding = PortBinding {
            host_ip: Some(port.host_ip.clone().unwrap_or_else(|| "127.0.0.1".into())),
            host_port: Some(host.to_string()),
        };
        match map.entry(format!("{}/udp", port.target)) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                e.get_mut().get_or_insert_with(Vec::new).push(binding);
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(Some(vec![binding]));
            }
        }
    }
    (!map.is_empty() || published.is_some()).then_some(map)
}

/// The container configuration of one instance; `published`: bind its
/// declared ports there (a node whose instances other nodes reach); `dns`:
/// berth's DNS settings (see [`super::dns`]; `None`: the engine's).
pub fn container_body(
    spec: &LaunchSpec,
    image: &str,
    agent_id: &str,
    network: &str,
    published: Option<&Published>,
    dns: Option<&ContainerDns>,
) -> ContainerCreateBody {
    let svc = &spec.service;
    let key = &spec.key;
    let mut labels: HashMap<String, String> = svc.labels.clone().into_iter().collect();
    labels.extend([
        (LABEL_NAMESPACE.to_owned(), key.namespace.clone()),
        (LABEL_STACK.to_owned(), key.stack.clone()),
        (LABEL_SERVICE.to_owned(), key.service.clone()),
        (LABEL_INSTANCE.to_owned(), key.slot.to_string()),
        (LABEL_UID.to_owned(), spec.uid.clone()),
        (LABEL_RELEASE.to_owned(), spec.release.to_string()),
        (LABEL_AGENT.to_owned(), agent_id.to_owned()),
        (LABEL_RESTARTS.to_owned(), spec.restarts.to_string()),
    ]);

    let mut binds = Vec::new();
    let mut mounts = Vec::new();
    for v in &svc.volumes {
        match v.kind.as_str() {
            // `Binds` (not `Mounts`) so a missing host folder is created,
            // as Compose does.
            "bind" => {
                if let Some(src) = &v.source {
                    let ro = if v.read_only { ":ro" } else { "" };
                    binds.push(format!("{src}:{}{ro}", v.target));
                }
            }
            "tmpfs" => mounts.push(Mount {
                target: Some(v.target.clone()),
                typ: Some(MountType::TMPFS),
                ..Default::default()
            }),
            _ => mounts.push(Mount {
                target: Some(v.target.clone()),
                source: v.source.as_deref().map(|s| volume_name(&key.stack, s)),
                typ: Some(MountType::VOLUME),
                read_only: Some(v.read_only),
                volume_options: v.source.as_ref().map(|_| MountVolumeOptions {
                    labels: Some(stack_labels(key)),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    }
    let tmpfs: HashMap<String, String> = svc
        .tmpfs
        .iter()
        .map(|t| match t.split_once(':') {
            Some((path, opts)) => (path.to_owned(), opts.to_owned()),
            None => (t.clone(), String::new()),
        })
        .collect();

    let limits = &svc.deploy.resources.limits;
    let reservations = &svc.deploy.resources.reservations;
    let mut aliases = vec![key.service.clone()];
    for n in svc.networks.values() {
        for a in &n.aliases {
            if !aliases.contains(a) {
                aliases.push(a.clone());
            }
        }
    }
    let host_config = HostConfig {
        binds: (!binds.is_empty()).then_some(binds),
        mounts: (!mounts.is_empty()).then_some(mounts),
        tmpfs: (!tmpfs.is_empty()).then_some(tmpfs),
        nano_cpus: limits.cpus.map(|c| (c * 1e9).round() as i64),
        memory: limits.memory_bytes.map(|m| m as i64),
        pids_limit: limits.pids.map(|p| p as i64),
        memory_reservation: reservations.memory_bytes.map(|m| m as i64),
        init: svc.init,
        readonly_rootfs: svc.read_only.then_some(true),
        cap_add: (!svc.cap_add.is_empty()).then(|| svc.cap_add.clone()),
        cap_drop: (!svc.cap_drop.is_empty()).then(|| svc.cap_drop.clone()),
        extra_hosts: (!svc.extra_hosts.is_empty())
            .then(|| svc.extra_hosts.iter().map(|h| extra_host(h)).collect()),
        // berth's supervisor restarts instances; two restarters would fight.
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::NO),
            maximum_retry_count: None,
        }),
        network_mode: Some(network.to_owned()),
        dns: dns.map(|d| d.servers.clone()),
        dns_search: dns.map(|d| d.search.clone()),
        port_bindings: port_bindings(svc, published),
        ..Default::default()
    };
    let exposed: Vec<String> = svc
        .ports
        .iter()
        .map(|p| format!("{}/{}", p.target, p.protocol))
        .collect();

    ContainerCreateBody {
        image: Some(image.to_owned()),
        entrypoint: svc.entrypoint.as_ref().map(argv_of),
        cmd: svc.command.as_ref().map(argv_of),
        env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        working_dir: svc
            .working_dir
            .as_ref()
            .map(|d| d.to_string_lossy().into_owned()),
        user: svc.user.clone(),
        labels: Some(labels),
        stop_signal: Some(svc.stop_signal.clone()),
        stop_timeout: Some((svc.stop_grace_period_ms / 1000) as i64),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        host_config: Some(host_config),
        networking_config: Some(NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                network.to_owned(),
                EndpointSettings {
                    aliases: Some(aliases),
                    ..Default::default()
                },
            )])),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> InstanceKey {
        InstanceKey::new("default", "shop", "Web", 2)
    }

    #[test]
    fn names_follow_the_documented_scheme_and_docker_rules() {
        assert_eq!(
            container_name(&key(), "0a1b-2c3d-4e5f"),
            "berth-default-shop-Web-2-0a1b2c3d"
        );
        assert_eq!(
            network_name("default", "my stack"),
            "berth_default_my_stack"
        );
        assert_eq!(volume_name("shop", "data"), "shop_data");
        assert_eq!(extra_host("db=10.0.0.2"), "db:10.0.0.2");
        assert_eq!(extra_host("db:10.0.0.2"), "db:10.0.0.2");
    }

    fn launch(ports: serde_json::Value) -> LaunchSpec {
        let service: Service = serde_json::from_value(serde_json::json!({
            "name": "Web",
            "image": "img",
            "restart": {"policy": "always"},
            "deploy": {"mode": "replicated", "replicas": 1},
            "stop_signal": "SIGTERM",
            "stop_grace_period_ms": 1000,
            "ports": ports,
        }))
        .expect("a service");
        LaunchSpec {
            key: key(),
            uid: "u".into(),
            argv: vec![],
            env: Default::default(),
            working_dir: "/".into(),
            limits: Default::default(),
            service,
            release: 1,
            restarts: 0,
        }
    }

    #[test]
    fn published_containers_bind_their_tcp_ports_on_the_node_address_only() {
        // "8080:80" and a second port: the engine binds host ports the
        // agent chose, on the advertise address; never the user's 8080
        // (the edge's TCP proxy listens there) and never UDP.
        let spec = launch(serde_json::json!([
            {"target": 80, "published": 8080, "protocol": "tcp"},
            {"target": 9000, "protocol": "tcp"},
            {"target": 80, "protocol": "tcp"},
            {"target": 53, "protocol": "udp"},
        ]));
        assert_eq!(spec.service.tcp_ports(), vec![80, 9000]);
        let ip: IpAddr = "10.213.1.1".parse().unwrap();
        let published = Published {
            ip,
            ports: BTreeMap::from([(80, 41001), (9000, 41002)]),
        };
        let body = container_body(&spec, "img", "agent", "net", Some(&published), None);
        let bindings = body.host_config.unwrap().port_bindings.unwrap();
        assert_eq!(bindings.len(), 2);
        let b80 = bindings["80/tcp"].as_ref().unwrap();
        assert_eq!(b80[0].host_ip.as_deref(), Some("10.213.1.1"));
        assert_eq!(b80[0].host_port.as_deref(), Some("41001"));
        assert_eq!(
            bindings["9000/tcp"].as_ref().unwrap()[0]
                .host_port
                .as_deref(),
            Some("41002")
        );
        // What the engine reports back reads as the same map; a binding on
        // another address, or a missing one, is not a publication there.
        assert_eq!(
            bound_ports(&bindings, ip, &[80, 9000]),
            Some(published.ports)
        );
        assert_eq!(
            bound_ports(&bindings, "10.0.0.9".parse().unwrap(), &[80]),
            None
        );
        assert_eq!(bound_ports(&bindings, ip, &[80, 7000]), None);

        // One machine: nothing is host-published.
        let body = container_body(&spec, "img", "agent", "net", None, None);
        let host = body.host_config.unwrap();
        assert!(host.port_bindings.is_none());
        // Without berth's DNS, the engine's own settings.
        assert_eq!((host.dns, host.dns_search), (None, None));
    }

    #[test]
    fn berths_dns_settings_go_to_the_engine() {
        let spec = launch(serde_json::json!([]));
        let dns = ContainerDns {
            servers: vec!["198.18.0.53".into(), "10.0.0.2".into()],
            search: vec!["shop.default.berth".into()],
        };
        let host = container_body(&spec, "img", "agent", "net", None, Some(&dns))
            .host_config
            .unwrap();
        assert_eq!(host.dns, Some(dns.servers));
        assert_eq!(host.dns_search, Some(dns.search));
    }

    #[test]
    fn published_udp_ports_are_bound_by_the_engine_on_any_node() {
        // No proxy carries UDP: "5353:53/udp" is the engine's to bind, at
        // host_ip (127.0.0.1 by default) and the published port, whether
        // or not the node publishes its TCP ports.
        let spec = launch(serde_json::json!([
            {"target": 80, "published": 8080, "protocol": "tcp"},
            {"target": 53, "published": 5353, "protocol": "udp"},
            {"target": 53, "published": 5354, "protocol": "udp", "host_ip": "0.0.0.0"},
            {"target": 9999, "protocol": "udp"},
        ]));
        let udp53 = |body: ContainerCreateBody| {
            let bindings = body.host_config.unwrap().port_bindings.unwrap();
            assert!(!bindings.contains_key("9999/udp"), "{bindings:?}");
            assert!(!bindings.contains_key("8080/tcp"), "{bindings:?}");
            bindings["53/udp"]
                .as_ref()
                .unwrap()
                .iter()
                .map(|b| {
                    format!(
                        "{}:{}",
                        b.host_ip.as_deref().unwrap(),
                        b.host_port.as_deref().unwrap()
                    )
                })
                .collect::<Vec<_>>()
        };
        let want = vec!["127.0.0.1:5353".to_owned(), "0.0.0.0:5354".to_owned()];
        assert_eq!(
            udp53(container_body(&spec, "img", "agent", "net", None, None)),
            want
        );
        let published = Published {
            ip: "10.213.1.1".parse().unwrap(),
            ports: BTreeMap::from([(80, 41001)]),
        };
        let body = container_body(&spec, "img", "agent", "net", Some(&published), None);
        let tcp = body
            .host_config
            .as_ref()
            .unwrap()
            .port_bindings
            .as_ref()
            .unwrap()["80/tcp"]
            .clone()
            .unwrap();
        assert_eq!(tcp[0].host_port.as_deref(), Some("41001"));
        assert_eq!(udp53(body), want);
    }
}
