//! `GET /metrics` (Prometheus/OpenMetrics text) and
//! `GET /v1/stacks/{ns}/{stack}/history` (the built-in history of the
//! stack's instances and services, as JSON).
//!
//! Both read the server's [`Telemetry`], which the server attaches to its
//! routers as an extension; a router built without it (a test harness)
//! answers 500 saying so.

use axum::Extension;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use berth_model::history::StackHistory;
use serde::Deserialize;

use super::{ApiContext, ApiError, ApiPath, ApiQuery};
use crate::desired::DesiredError;
use crate::metrics::{CONTENT_TYPE, Telemetry};

/// The telemetry of this server, or an error saying it is not there.
pub(crate) fn telemetry(ext: Option<Extension<Telemetry>>) -> Result<Telemetry, ApiError> {
    ext.map(|Extension(t)| t).ok_or_else(|| {
        ApiError::Internal("metrics, history and events are not enabled on this API router".into())
    })
}

pub(crate) async fn scrape(ext: Option<Extension<Telemetry>>) -> Result<Response, ApiError> {
    let t = telemetry(ext)?;
    let text = t
        .encode()
        .map_err(|e| ApiError::Internal(format!("encoding metrics: {e}")))?;
    Ok(([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response())
}

/// Query of the history route.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryParams {
    /// Only samples taken after this time (ms since the epoch).
    #[serde(default)]
    pub since: u64,
}

pub(crate) async fn history(
    State(ctx): State<ApiContext>,
    ext: Option<Extension<Telemetry>>,
    ApiPath((ns, stack)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<HistoryParams>,
) -> Result<axum::Json<StackHistory>, ApiError> {
    let t = telemetry(ext)?;
    if ctx
        .store
        .get(&berth_model::keys::stack(&ns, &stack))
        .await?
        .is_none()
    {
        return Err(DesiredError::StackNotFound {
            namespace: ns,
            stack,
        }
        .into());
    }
    Ok(axum::Json(t.history().stack(&ns, &stack, q.since)))
}
