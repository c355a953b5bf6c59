//! `berth up`: load the stack file, submit it, then either follow its logs
//! until Ctrl-C (which stops the stack) or, with `-d`, wait for it to be
//! healthy.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use berth_model::api::{Instance, StackDetail, SubmitStackRequest, SubmitStackResponse};
use berth_model::{Health, InstanceState, LogLine};
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
    preflight(settings, &stack).await?;
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
    if let Some(url) = crate::cmd::dashboard::url(settings, client.endpoint()) {
        eprintln!(
            "dashboard: {url}#/stack/{}/{}",
            enc(&resp.namespace),
            enc(&resp.stack)
        );
    }
    if args.detach {
        wait_ready(
            settings,
            &client,
            &resp.stack,
            resp.release,
            args.wait_timeout,
        )
        .await
    } else {
        attached(settings, &client, &resp.stack, started, width).await
    }
}

/// Refuse to submit a stack whose container services cannot run on this
/// machine (missing image, no registry, missing build context), naming
/// each, when the server is the local one (its engine is ours); warnings
/// are printed and the stack goes ahead.
async fn preflight(settings: &Settings, stack: &berth_spec::types::Stack) -> anyhow::Result<()> {
    if !matches!(settings.endpoint, crate::client::Endpoint::Unix { .. })
        || !stack
            .services
            .values()
            .any(|s| s.driver() == berth_spec::types::Driver::Docker)
    {
        return Ok(());
    }
    let findings = berth_agent::driver::docker::preflight::check_stack(None, stack).await;
    let mut errors = Vec::new();
    for f in findings {
        if f.severity == berth_agent::driver::docker::preflight::Severity::Error {
            errors.push(format!("  {f}"));
        } else {
            eprintln!("{f}");
        }
    }
    if errors.is_empty() {
        return Ok(());
    }
    Err(Failure::with_code(
        exit::UP_FAILED,
        format!(
            "stack {}: {} problem{} with its container services; nothing was started:\n{}",
            stack.name,
            errors.len(),
            if errors.len() == 1 { "" } else { "s" },
            errors.join("\n")
        ),
    ))
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
    super::warn_missing_servers(resp.headers());
    let mut reader = LineReader::new(resp.into_body());
    let mut printer = LogPrinter::new(settings.color, true, width);

    loop {
        tokio::select! {
            line = reader.next() => match line? {
                Some(line) => printer.print(&line)?,
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
                Ok(Some(line)) => printer.print(&line)?,
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
    /// Not ready yet, and why (what it is waiting for).
    Waiting(String),
    Failed(String),
}

/// Why an instance of the submitted release has failed for good, if it has:
/// `up -d` says so at once instead of waiting for its timeout.
fn failure(i: &Instance, restart: RestartPolicy) -> Option<String> {
    let exit = i.last_exit.as_ref().map(|e| match (&e.code, &e.signal) {
        (_, Some(sig)) => format!("killed by {sig}"),
        (Some(code), None) => format!("exited with code {code}"),
        (None, None) => "exited".to_owned(),
    });
    let failed_exit = i
        .last_exit
        .as_ref()
        .is_some_and(|e| e.code != Some(0) || e.signal.is_some());
    match i.state {
        InstanceState::Failed => Some(
            i.message
                .clone()
                .or(exit)
                .unwrap_or_else(|| "failed".to_owned()),
        ),
        // Nothing restarts it: the exit is final.
        InstanceState::Exited if failed_exit && restart == RestartPolicy::No => {
            Some(exit.unwrap_or_else(|| "exited".to_owned()))
        }
        InstanceState::Backoff | InstanceState::Exited if i.restarts >= CRASH_LOOP_RESTARTS => {
            Some(format!(
                "crash-looping: {} after {} restart{}",
                exit.unwrap_or_else(|| "exited".to_owned()),
                i.restarts,
                if i.restarts == 1 { "" } else { "s" }
            ))
        }
        InstanceState::Running if i.health == Health::Unhealthy => Some(format!(
            "unhealthy: {}",
            i.health_output.as_deref().map_or("", str::trim)
        )),
        _ => None,
    }
}

/// What a not-yet-ready instance is waiting for.
fn waiting_for(i: &Instance) -> String {
    match (i.state, &i.message) {
        // The API names the unmet dependency of a held-back service.
        (InstanceState::Pending, Some(m)) => m.clone(),
        (InstanceState::Running, _) if i.health == Health::Starting => {
            format!("{}: health check still starting", i.instance)
        }
        (InstanceState::Running, _) if i.health == Health::None => {
            format!("{}: just started (no health check)", i.instance)
        }
        (state, Some(m)) => format!("{} is {state} ({m})", i.instance),
        (state, None) => format!("{} is {state}", i.instance),
    }
}

/// Judge one service of release `release` from its desired replicas and
/// instance rows. Rows of older releases (still running while the new ones
/// start) count for nothing: `up -d` reports on what was submitted.
fn judge(replicas: u32, restart: RestartPolicy, release: u64, rows: &[&Instance]) -> Verdict {
    let new: Vec<&Instance> = rows
        .iter()
        .copied()
        .filter(|i| i.current && i.release >= release)
        .collect();
    for i in &new {
        if let Some(why) = failure(i, restart) {
            return Verdict::Failed(format!("{}: {why}", i.instance));
        }
    }
    // A run-once service (restart: no / on-failure) that exited 0 is done.
    let done = |i: &Instance| {
        i.state == InstanceState::Exited
            && !matches!(
                restart,
                RestartPolicy::Always | RestartPolicy::UnlessStopped
            )
            && i.last_exit.as_ref().is_some_and(|e| e.code == Some(0))
    };
    // Without a health check, "running" is only believable once the process
    // has survived a moment: a command that exits at once is briefly running.
    let settled = |i: &Instance| i.health != Health::None || i.uptime_s.unwrap_or(0) >= 1;
    let ready = |i: &Instance| (i.is_ready() && settled(i)) || done(i);
    let ok = new.iter().filter(|i| ready(i)).count();
    if ok as u32 >= replicas {
        return Verdict::Ready;
    }
    let why = new
        .iter()
        .chain(rows.iter().filter(|i| i.state == InstanceState::Pending))
        .find(|i| !ready(i))
        .map(|i| waiting_for(i))
        .unwrap_or_else(|| format!("no instance of release v{release} started yet"));
    Verdict::Waiting(why)
}

/// `up -d`: poll until every wanted instance of release `release` is ready,
/// or fail with reasons as soon as one has failed.
async fn wait_ready(
    settings: &Settings,
    client: &Client,
    stack: &str,
    release: u64,
    timeout: Duration,
) -> anyhow::Result<u8> {
    let ns = &settings.namespace;
    let deadline = Instant::now() + timeout;
    loop {
        let detail: StackDetail = stack_detail(client, ns, stack).await?;
        let mut failed: BTreeMap<String, String> = BTreeMap::new();
        let mut waiting: BTreeMap<String, String> = BTreeMap::new();
        if detail.record.release > release {
            // Read loosely: servers that roll back automatically say why in
            // the record's rollout; older ones do not have that field.
            let raw: serde_json::Value = client.get(&stack_path(ns, stack)).await?;
            let cause = &raw["record"]["rollout"]["rolled_back"];
            let why = match (cause["from"].as_u64(), cause["reason"].as_str()) {
                (Some(from), Some(reason)) if from == release => {
                    format!("it was rolled back: {}", reason.trim())
                }
                _ => "see `berth ps`".to_owned(),
            };
            return Err(Failure::with_code(
                exit::UP_FAILED,
                format!(
                    "stack {stack}: release v{release} was replaced by v{} before it was ready; {why}",
                    detail.record.release
                ),
            ));
        }
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
            match judge(desired.replicas, spec.restart, release, &rows) {
                Verdict::Ready => {}
                Verdict::Waiting(why) => {
                    waiting.insert(name.clone(), why);
                }
                Verdict::Failed(why) => {
                    failed.insert(name.clone(), why);
                }
            }
        }
        if failed.is_empty() && waiting.is_empty() {
            let rows: Vec<&Instance> = detail
                .instances
                .iter()
                .filter(|i| i.current && i.release >= release)
                .collect();
            if settings.json {
                crate::output::print_json(&rows)?;
            } else {
                let rows: Vec<Instance> = rows.into_iter().cloned().collect();
                crate::output::print_out(&instance_table(&rows, settings.color))?;
            }
            return Ok(exit::OK);
        }
        let timed_out = Instant::now() >= deadline;
        if !failed.is_empty() || timed_out {
            if timed_out {
                for (name, why) in waiting {
                    failed.insert(
                        name,
                        format!("not ready after {}s: {why}", timeout.as_secs()),
                    );
                }
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
            host_ports: Default::default(),
            restarts,
            last_exit: None,
            started_at: None,
            uptime_s: None,
            health_output: None,
            limits_warning: None,
            message: None,
        }
    }

    fn waiting(v: Verdict) -> bool {
        matches!(v, Verdict::Waiting(_))
    }

    #[test]
    fn verdicts() {
        let ready = inst(InstanceState::Running, Health::Healthy, 0);
        let starting = inst(InstanceState::Running, Health::Starting, 0);
        let looping = inst(InstanceState::Backoff, Health::None, 3);
        let always = RestartPolicy::Always;
        assert_eq!(judge(1, always, 1, &[&ready]), Verdict::Ready);
        assert!(waiting(judge(2, always, 1, &[&ready])));
        assert!(waiting(judge(1, always, 1, &[&starting])));
        assert!(matches!(
            judge(1, always, 1, &[&looping]),
            Verdict::Failed(_)
        ));
        let mut once = inst(InstanceState::Exited, Health::None, 0);
        once.last_exit = Some(ExitInfo {
            code: Some(0),
            signal: None,
            at: 1,
        });
        assert_eq!(judge(1, RestartPolicy::No, 1, &[&once]), Verdict::Ready);
        assert!(waiting(judge(1, always, 1, &[&once])));
    }

    #[test]
    fn up_d_ignores_ready_instances_of_an_older_release() {
        let old = inst(InstanceState::Running, Health::Healthy, 0);
        assert_eq!(
            judge(1, RestartPolicy::Always, 2, &[&old]),
            Verdict::Waiting("no instance of release v2 started yet".into())
        );
    }

    #[test]
    fn up_d_fails_fast_on_an_exit_with_restart_no_and_on_unhealthy() {
        let mut exited = inst(InstanceState::Exited, Health::None, 0);
        exited.last_exit = Some(ExitInfo {
            code: Some(1),
            signal: None,
            at: 1,
        });
        assert_eq!(
            judge(1, RestartPolicy::No, 1, &[&exited]),
            Verdict::Failed("web.1: exited with code 1".into())
        );
        let mut sick = inst(InstanceState::Running, Health::Unhealthy, 0);
        sick.health_output = Some("curl: connection refused\n".into());
        assert_eq!(
            judge(1, RestartPolicy::Always, 1, &[&sick]),
            Verdict::Failed("web.1: unhealthy: curl: connection refused".into())
        );
    }

    #[test]
    fn up_d_names_the_dependency_a_held_back_service_waits_for() {
        let mut held = inst(InstanceState::Pending, Health::None, 0);
        held.current = false;
        held.message = Some("waiting for db: service_healthy".into());
        assert_eq!(
            judge(1, RestartPolicy::Always, 1, &[&held]),
            Verdict::Waiting("waiting for db: service_healthy".into())
        );
    }
}
