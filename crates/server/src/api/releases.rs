//! Release routes: the deploy plan (`berth deploy --dry-run`), the release
//! history, rollback and config vars. Writes go through
//! [`desired::apply`](crate::desired::apply) like every other route.

use axum::Json;
use axum::extract::State;
use berth_model::api::{
    DeployPlan, EnvRequest, ReleaseSummary, ReleasesResponse, RollbackRequest, StackChangeResponse,
    SubmitStackRequest,
};
use berth_model::{Release, StackRecord, keys};
use berth_store::decode;

use super::stacks::change;
use super::{ApiContext, ApiError, ApiJson, ApiPath};
use crate::desired::{self, Command, DesiredError};
use crate::diff;

/// `POST /v1/stacks/plan`: what submitting this stack would change.
pub(crate) async fn plan(
    State(ctx): State<ApiContext>,
    ApiJson(req): ApiJson<SubmitStackRequest>,
) -> Result<Json<DeployPlan>, ApiError> {
    let namespace = desired::namespace_or_default(Some(&req.namespace)).to_owned();
    desired::check_name("namespace", &namespace)?;
    desired::check_name("stack", &req.stack.name)?;
    let current: Option<StackRecord> = ctx
        .store
        .get(&keys::stack(&namespace, &req.stack.name))
        .await?
        .map(|kv| decode(&kv))
        .transpose()?;
    let latest = desired::latest_release(&*ctx.store, &namespace, &req.stack.name).await?;
    let config = current
        .as_ref()
        .map(|c| c.config.clone())
        .unwrap_or_default();
    let stack = config.apply(req.stack);
    Ok(Json(diff::deploy_plan(
        &namespace,
        current.as_ref(),
        latest,
        &stack,
    )))
}

/// `GET /v1/stacks/{ns}/{stack}/releases`.
pub(crate) async fn list(
    State(ctx): State<ApiContext>,
    ApiPath((ns, stack)): ApiPath<(String, String)>,
) -> Result<Json<ReleasesResponse>, ApiError> {
    let kv = ctx
        .store
        .get(&keys::stack(&ns, &stack))
        .await?
        .ok_or_else(|| DesiredError::StackNotFound {
            namespace: ns.clone(),
            stack: stack.clone(),
        })?;
    let record: StackRecord = decode(&kv)?;
    let (kvs, _) = ctx.store.range(&keys::releases_of(&ns, &stack)).await?;
    let mut all: Vec<Release> = kvs.iter().map(decode).collect::<Result<_, _>>()?;
    all.sort_by_key(|r| r.version);
    let mut releases = Vec::with_capacity(all.len());
    for (i, r) in all.iter().enumerate() {
        let previous = i.checked_sub(1).and_then(|p| all.get(p));
        releases.push(ReleaseSummary {
            version: r.version,
            created_at: r.created_at,
            author: r.author.clone(),
            message: r.message.clone(),
            current: r.version == record.release,
            services_changed: diff::services_changed(previous, r),
        });
    }
    Ok(Json(ReleasesResponse {
        namespace: ns,
        stack,
        current: record.release,
        rollout: record.rollout,
        releases,
    }))
}

/// `POST /v1/stacks/{ns}/{stack}/rollback`.
pub(crate) async fn rollback(
    State(ctx): State<ApiContext>,
    ApiPath((namespace, stack)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<RollbackRequest>,
) -> Result<Json<StackChangeResponse>, ApiError> {
    let cmd = Command::Rollback {
        namespace,
        stack,
        to: req.to,
        author: req.author.unwrap_or_else(|| "berth".into()),
        if_current: None,
        cause: None,
    };
    change(&ctx, cmd).await
}

/// `POST /v1/stacks/{ns}/{stack}/env`.
pub(crate) async fn env(
    State(ctx): State<ApiContext>,
    ApiPath((namespace, stack)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<EnvRequest>,
) -> Result<Json<StackChangeResponse>, ApiError> {
    let cmd = Command::SetEnv {
        namespace,
        stack,
        service: req.service,
        set: req.set,
        unset: req.unset,
        author: req.author.unwrap_or_else(|| "berth".into()),
    };
    change(&ctx, cmd).await
}
