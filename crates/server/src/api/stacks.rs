//! Stack routes: list, submit, detail, remove, and the scale / stop / start /
//! restart actions. Each write is one [`Command`] through
//! [`desired::apply`](crate::desired::apply).

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use berth_model::api::{
    RemoveStackResponse, ScaleRequest, ServiceSummary, ServicesRequest, StackChangeResponse,
    StackDetail, StackSummary, SubmitStackRequest, SubmitStackResponse,
};
use berth_model::{Health, InstanceState, StackRecord, keys};
use berth_store::decode;
use bytes::Bytes;
use serde::Deserialize;

use super::instances::{InstanceFilter, instances};
use super::{ApiContext, ApiError, ApiJson, ApiPath, ApiQuery, now_ms};
use crate::desired::{self, Command, DesiredError};

/// Query of `GET /v1/stacks`.
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    /// Only this namespace; every namespace when absent.
    pub namespace: Option<String>,
}

pub(crate) async fn list(
    State(ctx): State<ApiContext>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Vec<StackSummary>>, ApiError> {
    let prefix = match &q.namespace {
        Some(ns) => keys::stacks_in(ns),
        None => keys::STACKS.to_owned(),
    };
    let (kvs, _) = ctx.store.range(&prefix).await?;
    let filter = InstanceFilter {
        namespace: q.namespace.clone(),
        ..Default::default()
    };
    let rows = instances(&*ctx.store, &filter, now_ms()).await?;
    let mut out = Vec::with_capacity(kvs.len());
    for kv in &kvs {
        let record: StackRecord = decode(kv)?;
        let mut services: BTreeMap<String, ServiceSummary> = record
            .services
            .iter()
            .map(|(name, d)| {
                let summary = ServiceSummary {
                    replicas: d.replicas,
                    stopped: d.stopped,
                    running: 0,
                    healthy: 0,
                };
                (name.clone(), summary)
            })
            .collect();
        for row in rows
            .iter()
            .filter(|r| r.namespace == record.namespace && r.stack == record.name)
        {
            if let Some(s) = services.get_mut(&row.service)
                && row.state == InstanceState::Running
            {
                s.running += 1;
                if matches!(row.health, Health::Healthy | Health::None) {
                    s.healthy += 1;
                }
            }
        }
        out.push(StackSummary {
            namespace: record.namespace,
            name: record.name,
            release: record.release,
            services,
            updated_at: record.updated_at,
        });
    }
    Ok(Json(out))
}

pub(crate) async fn submit(
    State(ctx): State<ApiContext>,
    ApiJson(req): ApiJson<SubmitStackRequest>,
) -> Result<(StatusCode, Json<SubmitStackResponse>), ApiError> {
    let namespace = desired::namespace_or_default(Some(&req.namespace)).to_owned();
    let cmd = Command::SubmitStack {
        namespace: namespace.clone(),
        stack: req.stack,
        author: req.author.unwrap_or_else(|| "berth".into()),
        message: req.message.unwrap_or_else(|| "up".into()),
    };
    let outcome = desired::apply(&*ctx.store, &cmd, now_ms()).await?;
    let record = outcome
        .record
        .ok_or_else(|| ApiError::Internal("submit wrote no stack record".into()))?;
    Ok((
        StatusCode::CREATED,
        Json(SubmitStackResponse {
            namespace,
            stack: record.name,
            release: record.release,
        }),
    ))
}

pub(crate) async fn detail(
    State(ctx): State<ApiContext>,
    ApiPath((ns, stack)): ApiPath<(String, String)>,
) -> Result<Json<StackDetail>, ApiError> {
    let kv =
        ctx.store
            .get(&keys::stack(&ns, &stack))
            .await?
            .ok_or(DesiredError::StackNotFound {
                namespace: ns.clone(),
                stack: stack.clone(),
            })?;
    let record: StackRecord = decode(&kv)?;
    let filter = InstanceFilter {
        namespace: Some(ns),
        stack: Some(stack),
        service: None,
    };
    let instances = instances(&*ctx.store, &filter, now_ms()).await?;
    Ok(Json(StackDetail { record, instances }))
}

/// Query of `DELETE /v1/stacks/{ns}/{stack}`.
#[derive(Debug, Deserialize)]
pub struct RemoveQuery {
    /// Also delete the stack's named volume directories.
    #[serde(default)]
    pub volumes: bool,
    /// Also delete the stack's captured logs (default true).
    #[serde(default = "yes")]
    pub logs: bool,
}

fn yes() -> bool {
    true
}

pub(crate) async fn remove(
    State(ctx): State<ApiContext>,
    peers: Option<axum::Extension<crate::peers::Peers>>,
    ApiPath((ns, stack)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<RemoveQuery>,
) -> Result<Json<RemoveStackResponse>, ApiError> {
    let cmd = Command::RemoveStack {
        namespace: ns.clone(),
        stack: stack.clone(),
    };
    desired::apply(&*ctx.store, &cmd, now_ms()).await?;
    if q.logs {
        ctx.logs
            .remove_stack(&ns, &stack)
            .await
            .map_err(|e| ApiError::Internal(format!("removing the stack's logs: {e}")))?;
        // Other servers hold lines of it too (their agents', those shipped
        // to them); the merged logs of a stack made again under this name
        // must not show them.
        if let Some(axum::Extension(peers)) = peers {
            for (server, why) in super::logs::remove_on_peers(&peers, &ns, &stack).await {
                tracing::warn!(%server, error = %why, namespace = %ns, %stack, "could not remove a removed stack's logs on another server; they stay on its disk");
            }
        }
    }
    let volumes_removed = if q.volumes {
        remove_volumes(&ns, &stack).await?
    } else {
        Vec::new()
    };
    Ok(Json(RemoveStackResponse {
        namespace: ns,
        stack,
        logs_removed: q.logs,
        volumes_removed,
    }))
}

/// Named volumes belong to the Docker driver (process services have none:
/// the loader warns about `volumes:` on them). The engine call waits for the
/// stack's containers to be gone first, since a volume in use cannot be
/// removed. No engine means no volumes to remove.
async fn remove_volumes(ns: &str, stack: &str) -> Result<Vec<String>, ApiError> {
    use berth_agent::driver::DriverError;
    let wait = std::time::Duration::from_secs(30);
    match berth_agent::driver::docker::remove_stack_volumes(None, ns, stack, wait).await {
        Ok(mut removed) => {
            removed.sort();
            Ok(removed)
        }
        Err(DriverError::EngineUnavailable(_)) => Ok(Vec::new()),
        Err(e) => Err(ApiError::Internal(format!(
            "removing the stack's named volumes: {e}"
        ))),
    }
}

/// Apply `cmd` and answer with the stack record it left.
pub(crate) async fn change(
    ctx: &ApiContext,
    cmd: Command,
) -> Result<Json<StackChangeResponse>, ApiError> {
    let outcome = desired::apply(&*ctx.store, &cmd, now_ms()).await?;
    let record = outcome
        .record
        .ok_or_else(|| ApiError::Internal("command wrote no stack record".into()))?;
    Ok(Json(StackChangeResponse {
        namespace: record.namespace,
        stack: record.name,
        release: record.release,
        services: record.services,
    }))
}

pub(crate) async fn scale(
    State(ctx): State<ApiContext>,
    ApiPath((namespace, stack)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<ScaleRequest>,
) -> Result<Json<StackChangeResponse>, ApiError> {
    if req.replicas.is_empty() {
        return Err(ApiError::bad_request(
            "nothing to scale",
            r#"send {"replicas": {"web": 3}}"#,
        ));
    }
    let cmd = Command::Scale {
        namespace,
        stack,
        replicas: req.replicas,
    };
    change(&ctx, cmd).await
}

pub(crate) async fn stop(
    State(ctx): State<ApiContext>,
    ApiPath((namespace, stack)): ApiPath<(String, String)>,
    body: Bytes,
) -> Result<Json<StackChangeResponse>, ApiError> {
    set_stopped(&ctx, namespace, stack, &body, true).await
}

pub(crate) async fn start(
    State(ctx): State<ApiContext>,
    ApiPath((namespace, stack)): ApiPath<(String, String)>,
    body: Bytes,
) -> Result<Json<StackChangeResponse>, ApiError> {
    set_stopped(&ctx, namespace, stack, &body, false).await
}

/// `stop` and `start` are one command with the flag flipped.
async fn set_stopped(
    ctx: &ApiContext,
    namespace: String,
    stack: String,
    body: &Bytes,
    stopped: bool,
) -> Result<Json<StackChangeResponse>, ApiError> {
    let services = services_of(body)?;
    let cmd = Command::SetStopped {
        namespace,
        stack,
        services,
        stopped,
    };
    change(ctx, cmd).await
}

pub(crate) async fn restart(
    State(ctx): State<ApiContext>,
    ApiPath((namespace, stack)): ApiPath<(String, String)>,
    body: Bytes,
) -> Result<Json<StackChangeResponse>, ApiError> {
    let services = services_of(&body)?;
    let cmd = Command::Restart {
        namespace,
        stack,
        services,
    };
    change(&ctx, cmd).await
}

/// The body of stop/start/restart is optional: none (or `{}`) means every
/// service.
fn services_of(body: &[u8]) -> Result<Vec<String>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let req: ServicesRequest = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(
            format!("bad request body: {e}"),
            r#"send {"services": ["web"]}, or nothing for every service"#,
        )
    })?;
    Ok(req.services)
}
