//! `berth up`: load the stack file, submit it, then either follow its logs
//! until Ctrl-C (which stops the stack) or, with `-d`, wait for it to be
//! healthy.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use berth_model::api::{Instance, StackDetail, SubmitStackRequest, SubmitStackResponse};
use berth_model::{InstanceState, LogLine};
use berth_spec::types::RestartPolicy;
use tokio::signal::unix::{SignalKind, signal};

use crate::args::UpArgs;
use crate::autostart;
use crate::client::{Client, check, enc};
use crate::cmd::{LineReader, is_down, stack_detail, stack_instances};
use crate::exit::{self, Failure};
use crate::output::{LogPrinter, instance_table};
use crate::resolve::{self, stack_path};
use crate::settings::Settings;

/// Restarts after which a backing-off instance counts as crash-looping.
const CRASH_LOOP_RESTARTS: u32 = 3;
/// How long Ctrl-C waits for the stack to stop before giving up.
const STOP_TIMEOUT: Duration = Duration::from_secs(120);

/// Run `berth up`.
pub async fn run(settings: &Settings, args: &UpArgs) -> anyhow::Result<u8> {
    let loaded = resolve::load(&args.stack)?;
    let stack = loaded.stack;
    let client = autostart::ensure_server(settings).await?;
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let width = stack
        .services
        .iter()
        .map(|(n, s)| n.len() + 1 + s.deploy.replicas.max(1).to_string().len())
        .max()
        .unwrap_or(0);
    let author = std::env::var("USER").unwrap_or_else(|_| "berth".into());
    let req = SubmitStackRequest {
        namespace: settings.namespace.clone(),
        stack,
        author: Some(author),
        message: Some("up".into()),
    };
    let resp: SubmitStackResponse = client.post("/v1/stacks", &req).await?;
    eprintln!(
        "stack {} (namespace {}): release v{}",
        resp.stack, resp.namespace, resp.release
    );
    if args.detach {
        wait_ready(settings, &client, &resp.stack, args.wait_timeout).await
    } else {
        attached(settings, &client, &resp.stack, started, width).await
    }
}

/// Follow the logs; on Ctrl-C stop the stack and wait until it is down.
async fn attached(
    settings: &Settings,
    client: &Client,
    stack: &str,
    since_s: u64,
    width: usize,
) -> anyhow::Result<u8> {
    let ns = &settings.namespace;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let path = format!("{}/logs?follow=true&since={since_s}", stack_path(ns, stack));
    let resp = check(client.send(hyper::Method::GET, &path, None).await?).await?;
    let mut reader = LineReader::new(resp.into_body());
    let mut printer = LogPrinter::new(settings.color, true, width);

    loop {
        tokio::select! {
            line = reader.next() => match line? {
                Some(line) => { printer.print(&line); }
                None => return Err(Failure::with_code(exit::NO_SERVER, "the berth server closed the log stream (did it stop?)")),
            },
            _ = interrupt.recv() => break,
        }
    }

    eprintln!("\nstopping stack {stack} (press Ctrl-C again to exit now)");
    let body = berth_model::api::ServicesRequest::default();
    let _: berth_model::api::StackChangeResponse = client
        .post(&format!("{}/stop", stack_path(ns, stack)), &body)
        .await?;
    let deadline = Instant::now() + STOP_TIMEOUT;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut stream_open = true;
    loop {
        tokio::select! {
            line = reader.next(), if stream_open => match line {
                Ok(Some(line)) => { printer.print(&line); }
                // The stopped instances' last lines are best effort.
                _ => stream_open = false,
            },
            _ = interrupt.recv() => return Ok(exit::INTERRUPTED),
            _ = tick.tick() => {
                let rows = stack_instances(client, ns, stack).await?;
                if rows.iter().all(is_down) {
                    eprintln!("stack {stack} stopped");
                    return Ok(exit::OK);
                }
                if Instant::now() >= deadline {
                    let names: Vec<_> = rows.iter().filter(|i| !is_down(i)).map(|i| i.instance.clone()).collect();
                    return Err(Failure::with_code(exit::GENERIC, format!(
                        "still stopping after {}s: {}", STOP_TIMEOUT.as_secs(), names.join(", "))));
                }
            }
        }
    }
}

/// What the wait found for one service.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Ready,
    Waiting,
    Failed(String),
}

/// Judge one service from its desired replicas and instance rows.
fn judge(replicas: u32, restart: RestartPolicy, rows: &[&Instance]) -> Verdict {
    for i in rows {
        let crash_loop = matches!(i.state, InstanceState::Backoff | InstanceState::Exited)
            && i.restarts >= CRASH_LOOP_RESTARTS;
        if i.current && (i.state == InstanceState::Failed || crash_loop) {
            return Verdict::Failed(format!(
                "{} is {} after {} restart{}",
                i.instance,
                i.state,
                i.restarts,
                if i.restarts == 1 { "" } else { "s" }
            ));
        }
    }
    // A run-once service (restart: no / on-failure) that exited 0 is done.
    let done = |i: &Instance| {
        i.current
            && i.state == InstanceState::Exited
            && !matches!(
                restart,
                RestartPolicy::Always | RestartPolicy::UnlessStopped
            )
            && i.last_exit.as_ref().is_some_and(|e| e.code == Some(0))
    };
    let ok = rows.iter().filter(|i| i.is_ready() || done(i)).count();
    if ok as u32 >= replicas {
        Verdict::Ready
    } else {
        Verdict::Waiting
    }
}

/// `up -d`: poll until every wanted instance is ready, or fail with reasons.
async fn wait_ready(
    settings: &Settings,
    client: &Client,
    stack: &str,
    timeout: Duration,
) -> anyhow::Result<u8> {
    let ns = &settings.namespace;
    let deadline = Instant::now() + timeout;
    loop {
        let detail: StackDetail = stack_detail(client, ns, stack).await?;
        let mut failed: BTreeMap<String, String> = BTreeMap::new();
        let mut waiting: Vec<String> = Vec::new();
        for (name, desired) in &detail.record.services {
            if desired.stopped {
                continue;
            }
            let Some(spec) = detail.record.spec.services.get(name) else {
                continue;
            };
            let rows: Vec<&Instance> = detail
                .instances
                .iter()
                .filter(|i| &i.service == name)
                .collect();
            match judge(desired.replicas, spec.restart, &rows) {
                Verdict::Ready => {}
                Verdict::Waiting => waiting.push(name.clone()),
                Verdict::Failed(why) => {
                    failed.insert(name.clone(), why);
                }
            }
        }
        if failed.is_empty() && waiting.is_empty() {
            if settings.json {
                println!("{}", serde_json::to_string_pretty(&detail.instances)?);
            } else {
                print!("{}", instance_table(&detail.instances, settings.color));
            }
            return Ok(exit::OK);
        }
        let timed_out = Instant::now() >= deadline;
        if !failed.is_empty() || timed_out {
            for name in &waiting {
                failed.entry(name.clone()).or_insert_with(|| {
                    format!("not running and healthy after {}s", timeout.as_secs())
                });
            }
            let report = failure_report(client, ns, stack, &detail, &failed, settings.color).await;
            eprint!("{report}");
            return Err(Failure::with_code(
                exit::UP_FAILED,
                format!(
                    "stack {stack} is not healthy: {}",
                    failed.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Each failing service's reason, its instances' details, and last 10 lines.
async fn failure_report(
    client: &Client,
    ns: &str,
    stack: &str,
    detail: &StackDetail,
    failed: &BTreeMap<String, String>,
    color: bool,
) -> String {
    let mut out = String::new();
    for (service, why) in failed {
        out.push_str(&format!("\nservice {service}: {why}\n"));
        for i in detail.instances.iter().filter(|i| &i.service == service) {
            out.push_str(&format!(
                "  {}: state {}, health {}",
                i.instance, i.state, i.health
            ));
            if let Some(e) = &i.last_exit {
                match (&e.code, &e.signal) {
                    (_, Some(sig)) => out.push_str(&format!(", last exit: killed by {sig}")),
                    (Some(code), None) => out.push_str(&format!(", last exit: code {code}")),
                    (None, None) => {}
                }
            }
            out.push('\n');
            if let Some(m) = &i.message {
                out.push_str(&format!("    message: {m}\n"));
            }
            if let Some(h) = &i.health_output {
                out.push_str(&format!("    last health check: {}\n", h.trim()));
            }
        }
        let path = format!(
            "{}/logs?service={}&tail=10",
            stack_path(ns, stack),
            enc(service)
        );
        let lines = last_lines(client, &path).await;
        if lines.is_empty() {
            out.push_str("  (no log lines)\n");
        } else {
            out.push_str("  last log lines:\n");
            let mut printer = LogPrinter::new(color, true, 0);
            for l in &lines {
                out.push_str(&format!("    {}\n", printer.format(l)));
            }
        }
    }
    out
}

async fn last_lines(client: &Client, path: &str) -> Vec<LogLine> {
    let Ok(resp) = client.send(hyper::Method::GET, path, None).await else {
        return Vec::new();
    };
    let Ok(resp) = check(resp).await else {
        return Vec::new();
    };
    let mut reader = LineReader::new(resp.into_body());
    let mut lines = Vec::new();
    while let Ok(Some(l)) = reader.next().await {
        lines.push(l);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_model::{ExitInfo, Health};

    fn inst(state: InstanceState, health: Health, restarts: u32) -> Instance {
        Instance {
            namespace: "default".into(),
            stack: "s".into(),
            service: "web".into(),
            instance: "web.1".into(),
            slot: 1,
            uid: "u".into(),
            node: "n".into(),
            release: 1,
            desired: Some(berth_model::DesiredState::Running),
            state,
            health,
            current: true,
            pid: None,
            address: None,
            port: None,
            restarts,
            last_exit: None,
            started_at: None,
            uptime_s: None,
            health_output: None,
            limits_warning: None,
            message: None,
        }
    }

    #[test]
    fn verdicts() {
        let ready = inst(InstanceState::Running, Health::Healthy, 0);
        let starting = inst(InstanceState::Running, Health::Starting, 0);
        let looping = inst(InstanceState::Backoff, Health::None, 3);
        let always = RestartPolicy::Always;
        assert_eq!(judge(1, always, &[&ready]), Verdict::Ready);
        assert_eq!(judge(2, always, &[&ready]), Verdict::Waiting);
        assert_eq!(judge(1, always, &[&starting]), Verdict::Waiting);
        assert!(matches!(judge(1, always, &[&looping]), Verdict::Failed(_)));
        let mut once = inst(InstanceState::Exited, Health::None, 0);
        once.last_exit = Some(ExitInfo {
            code: Some(0),
            signal: None,
            at: 1,
        });
        assert_eq!(judge(1, RestartPolicy::No, &[&once]), Verdict::Ready);
        assert_eq!(judge(1, always, &[&once]), Verdict::Waiting);
    }
}
