//! `berth deploy | releases | rollback | env`: releases and their rollouts.
//!
//! Every command that makes a release (deploy, rollback, env set/unset)
//! then follows the rollout until it completes, pauses or is rolled back,
//! printing progress; a failed rollout exits with [`exit::UP_FAILED`] and the
//! reason the server recorded (the failing check's output or last exit, and
//! the instance's last log lines).

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use berth_model::api::{
    DeployPlan, EnvRequest, PlanAction, ReleasesResponse, RollbackRequest, StackChangeResponse,
    StackDetail, SubmitStackRequest, SubmitStackResponse,
};
use berth_model::{InstanceState, RolloutState};

use crate::args::{DeployArgs, EnvAction, EnvArgs, ReleasesArgs, RollbackArgs};
use crate::autostart;
use crate::client::Client;
use crate::cmd::stack_detail;
use crate::exit::{self, Failure};
use crate::output::{self, Table, paint};
use crate::resolve::{self, stack_path};
use crate::settings::Settings;

fn author() -> String {
    std::env::var("USER").unwrap_or_else(|_| "berth".into())
}

/// `berth deploy [--dry-run] [-m MSG]`.
pub async fn deploy(settings: &Settings, args: &DeployArgs) -> anyhow::Result<u8> {
    let loaded = resolve::load(&args.stack)?;
    let client = if args.dry_run {
        settings.client()
    } else {
        autostart::ensure_server(settings).await?
    };
    let req = SubmitStackRequest {
        namespace: settings.namespace.clone(),
        stack: loaded.stack,
        author: Some(author()),
        message: Some(args.message.clone().unwrap_or_else(|| "deploy".into())),
    };
    let plan: DeployPlan = client.post("/v1/stacks/plan", &req).await?;
    if args.dry_run {
        if settings.json {
            output::print_json(&plan)?;
        } else {
            print_plan(&plan, settings.color)?;
        }
        return Ok(exit::OK);
    }
    if !settings.json {
        print_plan(&plan, settings.color)?;
    }
    let resp: SubmitStackResponse = client.post("/v1/stacks", &req).await?;
    eprintln!(
        "stack {} (namespace {}): release v{} created",
        resp.stack, resp.namespace, resp.release
    );
    if args.detach {
        return print_release(settings, &client, &resp.stack, resp.release).await;
    }
    follow_rollout(
        settings,
        &client,
        &resp.stack,
        resp.release,
        args.wait_timeout,
    )
    .await
}

fn print_plan(plan: &DeployPlan, color: bool) -> anyhow::Result<()> {
    let from = if plan.current_release == 0 {
        "new stack".to_owned()
    } else {
        format!("v{}", plan.current_release)
    };
    output::print_line(format_args!(
        "stack {} (namespace {}): {from} → v{}",
        plan.stack, plan.namespace, plan.next_release
    ))?;
    if plan.is_noop() {
        output::print_line(format_args!("  no changes"))?;
    }
    for s in &plan.services {
        let (sign, code) = match s.action {
            PlanAction::Add => ("+", "32"),
            PlanAction::Replace => ("~", "33"),
            PlanAction::Scale => ("~", "36"),
            PlanAction::Remove => ("-", "31"),
            PlanAction::Unchanged => ("=", "2"),
        };
        let action = format!("{:?}", s.action).to_lowercase();
        output::print_line(format_args!(
            "  {} {} ({action}): {}",
            paint(sign, code, color),
            s.service,
            s.reason
        ))?;
        for c in &s.changes {
            let show = |v: &Option<serde_json::Value>| {
                v.as_ref().map_or("(none)".to_owned(), |v| {
                    let t = v.to_string();
                    if t.chars().count() > 80 {
                        format!("{}…", t.chars().take(80).collect::<String>())
                    } else {
                        t
                    }
                })
            };
            output::print_line(format_args!(
                "      {}: {} → {}",
                c.field,
                show(&c.old),
                show(&c.new)
            ))?;
        }
    }
    Ok(())
}

/// Follow the rollout of `release` until it settles; prints progress lines
/// as the counts change.
async fn follow_rollout(
    settings: &Settings,
    client: &Client,
    stack: &str,
    release: u64,
    timeout: Duration,
) -> anyhow::Result<u8> {
    let ns = &settings.namespace;
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let detail: StackDetail = stack_detail(client, ns, stack).await?;
        let record = &detail.record;
        let rollout = record.rollout.as_ref();
        if record.release != release {
            if let Some(cause) = rollout
                .and_then(|r| r.rolled_back.as_ref())
                .filter(|c| c.from == release)
            {
                let msg = format!(
                    "release v{release} failed and was rolled back (now v{}): {}",
                    record.release, cause.reason
                );
                if settings.json {
                    output::print_json(record)?;
                }
                return Err(Failure::with_code(exit::UP_FAILED, msg));
            }
            return Err(Failure::with_code(
                exit::GENERIC,
                format!(
                    "release v{release} was superseded by v{} before its rollout finished",
                    record.release
                ),
            ));
        }
        match rollout.map(|r| r.state) {
            Some(RolloutState::Complete) | None => {
                if !settings.json {
                    eprintln!("rollout of v{release} complete");
                }
                return print_release(settings, client, stack, release).await;
            }
            Some(RolloutState::Paused) => {
                let why = rollout.map_or("", |r| r.message.as_str());
                return Err(Failure::with_code(
                    exit::UP_FAILED,
                    format!("rollout of v{release} {why}; fix it and deploy again"),
                ));
            }
            Some(RolloutState::InProgress) => {}
        }
        let line = progress(&detail, release);
        if line != last && !settings.json {
            eprintln!("  {line}");
            last = line;
        }
        if Instant::now() >= deadline {
            return Err(Failure::with_code(
                exit::UP_FAILED,
                format!(
                    "the rollout of v{release} is still in progress after {}s ({last}); `berth releases` shows where it stands",
                    timeout.as_secs()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `web 2/3 new, 1 old · worker 1/1 new`.
fn progress(detail: &StackDetail, release: u64) -> String {
    let mut parts = Vec::new();
    for (name, d) in &detail.record.services {
        if d.stopped {
            continue;
        }
        let rows: Vec<_> = detail
            .instances
            .iter()
            .filter(|i| &i.service == name && i.desired.is_some())
            .collect();
        let new = rows
            .iter()
            .filter(|i| i.release == release && i.is_ready())
            .count();
        let old = rows
            .iter()
            .filter(|i| i.release != release && i.state == InstanceState::Running)
            .count();
        let mut s = format!("{name} {new}/{} ready on v{release}", d.replicas);
        if old > 0 {
            s.push_str(&format!(", {old} old"));
        }
        parts.push(s);
    }
    parts.join(" · ")
}

async fn print_release(
    settings: &Settings,
    client: &Client,
    stack: &str,
    release: u64,
) -> anyhow::Result<u8> {
    if settings.json {
        let resp: ReleasesResponse = client
            .get(&format!(
                "{}/releases",
                stack_path(&settings.namespace, stack)
            ))
            .await?;
        output::print_json(&resp)?;
    } else {
        output::print_line(format_args!("{stack}: v{release}"))?;
    }
    Ok(exit::OK)
}

/// `berth releases [SERVICE]`.
pub async fn releases(settings: &Settings, args: &ReleasesArgs) -> anyhow::Result<u8> {
    let client = settings.client();
    let stack = resolve::stack_name(settings, &client, &args.stack).await?;
    let mut resp: ReleasesResponse = client
        .get(&format!(
            "{}/releases",
            stack_path(&settings.namespace, &stack)
        ))
        .await?;
    if let Some(service) = &args.service {
        resp.releases
            .retain(|r| r.services_changed.iter().any(|s| s == service));
    }
    if settings.json {
        output::print_json(&resp)?;
        return Ok(exit::OK);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut table = Table::new(&["", "RELEASE", "CREATED", "AUTHOR", "CHANGED", "MESSAGE"]);
    for r in resp.releases.iter().rev() {
        let ago = crate::output::human_duration(now.saturating_sub(r.created_at) / 1000);
        table.row(vec![
            if r.current { "*".into() } else { String::new() },
            format!("v{}", r.version),
            format!("{ago} ago"),
            r.author.clone(),
            r.services_changed.join(","),
            r.message.clone(),
        ]);
    }
    output::print_out(&table.render())?;
    if let Some(r) = &resp.rollout {
        let mut line = format!("rollout of v{}: {}", r.release, r.state);
        if !r.message.is_empty() {
            line.push_str(&format!(" ({})", r.message));
        }
        output::print_line(format_args!("{line}"))?;
        if let Some(c) = &r.rolled_back {
            output::print_line(format_args!(
                "v{} was rolled back automatically: {}",
                c.from, c.reason
            ))?;
        }
    }
    Ok(exit::OK)
}

/// `berth rollback [vN]`.
pub async fn rollback(settings: &Settings, args: &RollbackArgs) -> anyhow::Result<u8> {
    let client = settings.client();
    let stack = resolve::stack_name(settings, &client, &args.stack).await?;
    let req = RollbackRequest {
        to: args.version,
        author: Some(author()),
    };
    let resp: StackChangeResponse = client
        .post(
            &format!("{}/rollback", stack_path(&settings.namespace, &stack)),
            &req,
        )
        .await?;
    eprintln!("{stack}: release v{} created (rollback)", resp.release);
    if args.detach {
        return print_release(settings, &client, &stack, resp.release).await;
    }
    follow_rollout(settings, &client, &stack, resp.release, args.wait_timeout).await
}

/// `berth env [set|unset ...] [--service S]`.
pub async fn env(settings: &Settings, args: &EnvArgs) -> anyhow::Result<u8> {
    let client = settings.client();
    let stack = resolve::stack_name(settings, &client, &args.stack).await?;
    let base = stack_path(&settings.namespace, &stack);
    let req = match &args.action {
        None => return list_env(settings, &client, &stack, args.service.as_deref()).await,
        Some(EnvAction::Set { vars }) => EnvRequest {
            service: args.service.clone(),
            set: vars.iter().cloned().collect(),
            unset: Vec::new(),
            author: Some(author()),
        },
        Some(EnvAction::Unset { keys }) => EnvRequest {
            service: args.service.clone(),
            set: BTreeMap::new(),
            unset: keys.clone(),
            author: Some(author()),
        },
    };
    let resp: StackChangeResponse = client.post(&format!("{base}/env"), &req).await?;
    eprintln!("{stack}: release v{} created", resp.release);
    if args.detach {
        return print_release(settings, &client, &stack, resp.release).await;
    }
    follow_rollout(
        settings,
        &client,
        &stack,
        resp.release,
        Duration::from_secs(300),
    )
    .await
}

async fn list_env(
    settings: &Settings,
    client: &Client,
    stack: &str,
    service: Option<&str>,
) -> anyhow::Result<u8> {
    let detail: StackDetail = stack_detail(client, &settings.namespace, stack).await?;
    let record = &detail.record;
    if let Some(s) = service
        && !record.spec.services.contains_key(s)
    {
        return Err(Failure::with_code(
            exit::NOT_FOUND,
            format!(
                "stack {stack:?} has no service {s:?} (it has: {})",
                record
                    .spec
                    .services
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let envs: BTreeMap<&String, BTreeMap<&String, &Option<String>>> = record
        .spec
        .services
        .iter()
        .filter(|(n, _)| service.is_none_or(|s| s == n.as_str()))
        .map(|(n, s)| (n, s.environment.iter().collect()))
        .collect();
    if settings.json {
        output::print_json(&envs)?;
        return Ok(exit::OK);
    }
    for (name, vars) in envs {
        output::print_line(format_args!("{name}:"))?;
        for (k, v) in vars {
            let from_env = record.config.all.contains_key(k)
                || record
                    .config
                    .services
                    .get(name)
                    .is_some_and(|c| c.contains_key(k));
            let mark = if from_env { "  (berth env)" } else { "" };
            match v {
                Some(v) => output::print_line(format_args!("  {k}={v}{mark}"))?,
                None => output::print_line(format_args!("  {k} (passed through, unset){mark}"))?,
            }
        }
    }
    Ok(exit::OK)
}
