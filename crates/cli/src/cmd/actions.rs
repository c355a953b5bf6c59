//! `berth stop|start|restart|scale|down`: one API call each (down: two, with
//! a wait between).

use std::collections::BTreeMap;
use std::time::Duration;

use berth_model::api::{RemoveStackResponse, ScaleRequest, ServicesRequest, StackChangeResponse};

use crate::args::{DownArgs, ScaleArgs, ServicesArgs};
use crate::cmd::wait_down;
use crate::exit::{self, Failure};
use crate::output::{print_json, print_line};
use crate::resolve::{self, stack_path};
use crate::settings::Settings;

/// Which of stop / start / restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `berth stop`.
    Stop,
    /// `berth start`.
    Start,
    /// `berth restart`.
    Restart,
}

impl Action {
    fn verb(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Start => "start",
            Self::Restart => "restart",
        }
    }
}

/// How long `berth stop` waits for instances to be down before it returns.
const STOP_WAIT: Duration = Duration::from_secs(60);

/// stop / start / restart.
pub async fn services(
    settings: &Settings,
    args: &ServicesArgs,
    action: Action,
) -> anyhow::Result<u8> {
    let client = settings.client();
    let stack = resolve::stack_name(settings, &client, &args.stack).await?;
    let path = format!(
        "{}/{}",
        stack_path(&settings.namespace, &stack),
        action.verb()
    );
    let body = ServicesRequest {
        services: args.services.clone(),
    };
    let resp: StackChangeResponse = client.post(&path, &body).await?;
    if action == Action::Stop {
        let left = wait_down(
            &client,
            &settings.namespace,
            &stack,
            &args.services,
            STOP_WAIT,
        )
        .await?;
        if !left.is_empty() {
            let names: Vec<_> = left.iter().map(|i| i.instance.as_str()).collect();
            return Err(Failure::with_code(
                exit::GENERIC,
                format!(
                    "still stopping after {}s: {}",
                    STOP_WAIT.as_secs(),
                    names.join(", ")
                ),
            ));
        }
    }
    print_change(settings, &resp, action.verb(), &args.services)?;
    Ok(exit::OK)
}

fn print_change(
    settings: &Settings,
    resp: &StackChangeResponse,
    verb: &str,
    services: &[String],
) -> anyhow::Result<()> {
    if settings.json {
        print_json(resp)?;
        return Ok(());
    }
    let names = if services.is_empty() {
        resp.services.keys().cloned().collect::<Vec<_>>()
    } else {
        services.to_vec()
    };
    let past = match verb {
        "stop" => "stopped",
        "start" => "started",
        "restart" => "restarting",
        other => other,
    };
    print_line(format_args!("{}: {past} {}", resp.stack, names.join(", ")))?;
    Ok(())
}

/// `berth scale web=3 worker=0`.
pub async fn scale(settings: &Settings, args: &ScaleArgs) -> anyhow::Result<u8> {
    let client = settings.client();
    let stack = resolve::stack_name(settings, &client, &args.stack).await?;
    let mut replicas = BTreeMap::new();
    for (service, n) in &args.replicas {
        if replicas.insert(service.clone(), *n).is_some() {
            return Err(Failure::with_code(
                exit::BAD_INPUT,
                format!("service {service:?} is given twice"),
            ));
        }
    }
    let path = format!("{}/scale", stack_path(&settings.namespace, &stack));
    let resp: StackChangeResponse = client
        .post(
            &path,
            &ScaleRequest {
                replicas: replicas.clone(),
            },
        )
        .await?;
    if settings.json {
        print_json(&resp)?;
    } else {
        let parts: Vec<String> = replicas.iter().map(|(s, n)| format!("{s}={n}")).collect();
        print_line(format_args!("{}: scaled {}", resp.stack, parts.join(" ")))?;
    }
    Ok(exit::OK)
}

/// `berth down`: stop everything, wait until it is down, then forget the stack.
pub async fn down(settings: &Settings, args: &DownArgs) -> anyhow::Result<u8> {
    let client = settings.client();
    let ns = &settings.namespace;
    let stack = resolve::stack_name(settings, &client, &args.stack).await?;
    let base = stack_path(ns, &stack);
    let _: StackChangeResponse = client
        .post(&format!("{base}/stop"), &ServicesRequest::default())
        .await?;
    let left = wait_down(&client, ns, &stack, &[], args.timeout).await?;
    if !left.is_empty() {
        let names: Vec<_> = left.iter().map(|i| i.instance.as_str()).collect();
        eprintln!(
            "warning: still stopping after {}s: {}; removing the stack anyway (the server keeps stopping them)",
            args.timeout.as_secs(),
            names.join(", ")
        );
    }
    let resp: RemoveStackResponse = client
        .call::<(), _>(
            hyper::Method::DELETE,
            &format!("{base}?volumes={}", args.volumes),
            None,
        )
        .await?;
    // The controller now deletes the stopped assignments and agents their
    // statuses; wait briefly so a `down` followed by `ps` shows nothing.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if super::stack_instances(&client, ns, &stack)
            .await?
            .is_empty()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if settings.json {
        print_json(&resp)?;
    } else {
        print_line(format_args!("{stack}: removed"))?;
        if !resp.volumes_removed.is_empty() {
            print_line(format_args!(
                "volumes removed: {}",
                resp.volumes_removed.join(", ")
            ))?;
        }
    }
    Ok(exit::OK)
}
