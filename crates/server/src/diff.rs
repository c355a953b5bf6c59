//! What a deploy would change (`berth deploy --dry-run`), like `terraform
//! plan`: a pure function of the stack's current desired state and the
//! submitted stack, service by service and field by field.
//!
//! It predicts what the controller will do with the new release: a service
//! whose template differs (as [`same_template`] judges it) is replaced by a
//! rolling update, one whose replica count alone differs is scaled, and so
//! on. The field paths are those of the resolved stack's JSON form
//! (`command`, `environment.FOO`, `deploy.replicas`).

use std::collections::BTreeSet;

use berth_model::api::{DeployPlan, FieldChange, PlanAction, ServicePlan};
use berth_model::{Release, StackRecord};
use berth_spec::types::{Service, Stack};
use serde_json::Value;

use crate::controller::rollout::{FailureAction, policy, same_template};

/// The plan of submitting `new` (config vars already applied) over
/// `current` (`None` when the stack does not exist yet).
pub fn deploy_plan(
    namespace: &str,
    current: Option<&StackRecord>,
    latest_release: u64,
    new: &Stack,
) -> DeployPlan {
    let mut services = Vec::new();
    let names: BTreeSet<&String> = new
        .services
        .keys()
        .chain(current.into_iter().flat_map(|c| c.spec.services.keys()))
        .collect();
    for name in names {
        let old = current.and_then(|c| c.spec.services.get(name));
        let replicas_now = current
            .and_then(|c| c.services.get(name))
            .map(|d| d.replicas);
        let plan = match (old, new.services.get(name)) {
            (None, Some(n)) => ServicePlan {
                service: name.clone(),
                action: PlanAction::Add,
                changes: Vec::new(),
                reason: format!(
                    "new service: {} instance{} will be started",
                    n.deploy.replicas,
                    plural(n.deploy.replicas)
                ),
            },
            (Some(_), None) => {
                let r = replicas_now.unwrap_or(0);
                ServicePlan {
                    service: name.clone(),
                    action: PlanAction::Remove,
                    changes: Vec::new(),
                    reason: format!(
                        "no longer in the stack: its {r} instance{} will be stopped",
                        plural(r)
                    ),
                }
            }
            (Some(o), Some(n)) => service_plan(name, o, n, replicas_now),
            (None, None) => continue,
        };
        services.push(plan);
    }
    DeployPlan {
        namespace: namespace.to_owned(),
        stack: new.name.clone(),
        current_release: current.map_or(0, |c| c.release),
        next_release: latest_release + 1,
        services,
    }
}

fn service_plan(
    name: &str,
    old: &Service,
    new: &Service,
    replicas_now: Option<u32>,
) -> ServicePlan {
    let mut changes = Vec::new();
    field_diff(
        "",
        &serde_json::to_value(old).unwrap_or(Value::Null),
        &serde_json::to_value(new).unwrap_or(Value::Null),
        &mut changes,
    );
    // A deploy resets the scale to the file's: show it against what runs now
    // (which `berth scale` may have changed), not against the old file.
    changes.retain(|c| c.field != "deploy.replicas");
    let now = replicas_now.unwrap_or(old.deploy.replicas);
    if now != new.deploy.replicas {
        changes.push(FieldChange {
            field: "deploy.replicas".into(),
            old: Some(now.into()),
            new: Some(new.deploy.replicas.into()),
        });
    }
    let (action, reason) = if !same_template(old, new) {
        let p = policy(new);
        let order = if p.start_first {
            "start-first: each new instance must be healthy before an old one is drained and stopped"
        } else {
            "stop-first: each old instance is drained and stopped before its replacement starts"
        };
        let on_failure = match p.failure_action {
            FailureAction::Rollback => "automatic rollback",
            FailureAction::Pause => "pause",
            FailureAction::Continue => "continue",
        };
        let fields: Vec<&str> = changes
            .iter()
            .map(|c| c.field.as_str())
            .filter(|f| *f != "deploy.replicas")
            .collect();
        (
            PlanAction::Replace,
            format!(
                "{} changed: rolling update, {} at a time, {order}; on failure: {on_failure}",
                fields.join(", "),
                p.parallelism
            ),
        )
    } else if now != new.deploy.replicas {
        (
            PlanAction::Scale,
            format!(
                "scaled from {now} to {}; running instances are kept",
                new.deploy.replicas
            ),
        )
    } else if changes.is_empty() {
        (PlanAction::Unchanged, "no change".to_owned())
    } else {
        (
            PlanAction::Unchanged,
            "only update settings changed: instances are kept".to_owned(),
        )
    };
    ServicePlan {
        service: name.to_owned(),
        action,
        changes,
        reason,
    }
}

/// Recursive JSON diff: objects by key (dotted paths), anything else whole.
fn field_diff(path: &str, old: &Value, new: &Value, out: &mut Vec<FieldChange>) {
    if old == new {
        return;
    }
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => field_diff(&p, x, y, out),
                    (x, y) => out.push(FieldChange {
                        field: p,
                        old: x.cloned(),
                        new: y.cloned(),
                    }),
                }
            }
        }
        _ => out.push(FieldChange {
            field: path.to_owned(),
            old: Some(old.clone()),
            new: Some(new.clone()),
        }),
    }
}

/// Services whose template differs between two releases (all of them when
/// there is no previous one).
pub fn services_changed(previous: Option<&Release>, release: &Release) -> Vec<String> {
    let mut names: BTreeSet<String> = BTreeSet::new();
    for (name, svc) in &release.spec.services {
        match previous.and_then(|p| p.spec.services.get(name)) {
            Some(old) if same_template(old, svc) => {}
            _ => {
                names.insert(name.clone());
            }
        }
    }
    if let Some(p) = previous {
        for name in p.spec.services.keys() {
            if !release.spec.services.contains_key(name) {
                names.insert(name.clone());
            }
        }
    }
    names.into_iter().collect()
}

fn plural(n: u32) -> &'static str {
    if n == 1 { "" } else { "s" }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use crate::test_util::stack as load;

    fn record(stack: Stack) -> StackRecord {
        let services = stack
            .services
            .iter()
            .map(|(n, s)| {
                (
                    n.clone(),
                    berth_model::ServiceDesired {
                        replicas: s.deploy.replicas,
                        stopped: false,
                        restart_generation: 0,
                    },
                )
            })
            .collect();
        StackRecord {
            namespace: "default".into(),
            name: "shop".into(),
            release: 3,
            spec: stack,
            services,
            updated_at: 0,
            config: Default::default(),
            rollout: None,
        }
    }

    #[test]
    fn names_fields_and_actions() {
        let old = record(load(
            "services:\n  web:\n    command: sleep 1\n    environment: {A: '1', B: '2'}\n    ports: ['8080:80']\n  db:\n    command: sleep 1\n  gone:\n    command: sleep 1\n",
        ));
        let new = load(
            "services:\n  web:\n    command: sleep 2\n    environment: {A: '1', C: '3'}\n    ports: ['8080:80']\n  db:\n    command: sleep 1\n    deploy: {replicas: 4}\n  fresh:\n    command: sleep 1\n",
        );
        let plan = deploy_plan("default", Some(&old), 3, &new);
        assert_eq!(plan.next_release, 4);
        let by: BTreeMap<&str, &ServicePlan> = plan
            .services
            .iter()
            .map(|s| (s.service.as_str(), s))
            .collect();
        assert_eq!(by["gone"].action, PlanAction::Remove);
        assert_eq!(by["fresh"].action, PlanAction::Add);
        assert_eq!(by["db"].action, PlanAction::Scale, "{:?}", by["db"]);
        let web = by["web"];
        assert_eq!(web.action, PlanAction::Replace);
        let fields: Vec<&str> = web.changes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            vec!["command", "environment.B", "environment.C"],
            "{web:?}"
        );
        assert!(web.reason.contains("start-first"), "{}", web.reason);
        let b = &web.changes[1];
        assert_eq!((b.old.clone(), b.new.clone()), (Some("2".into()), None));
        assert!(!plan.is_noop());
        let same = deploy_plan("default", Some(&record(new.clone())), 4, &new);
        assert!(same.is_noop(), "{same:?}");
    }
}
