//! The one place where errors become HTTP answers.
//!
//! Handlers return [`ApiError`]; its [`IntoResponse`] picks the status and
//! writes the JSON body `{ "error": "...", "hint": "..." }` every client
//! (the CLI first) relies on. No handler builds an error response itself.
//!
//! The Consul-compatible routes ([`super::consul`], [`super::kv`]) answer
//! errors as Consul does — the same statuses, a plain-text body — through
//! [`ConsulError`], a wrapper over the same [`ApiError`] classification.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use berth_model::api::ErrorBody;
use berth_store::StoreError;

use crate::desired::DesiredError;
use crate::kv::KvError;

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A desired-state command was refused or failed.
    #[error(transparent)]
    Desired(#[from] DesiredError),
    /// Reading actual state failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A KV or session operation failed.
    #[error(transparent)]
    Kv(#[from] KvError),
    /// The request itself is malformed (bad query parameter, bad body).
    #[error("{message}")]
    BadRequest {
        /// What is wrong.
        message: String,
        /// How to fix it.
        hint: Option<String>,
    },
    /// Something the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The listener requires a token and the request had none or a wrong one.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// The server could not do its own work (file system, …).
    #[error("{0}")]
    Internal(String),
    /// A node's join, credential or registration was refused.
    #[error(transparent)]
    Node(#[from] crate::join::NodeAuthError),
}

impl ApiError {
    /// A 400 with a hint.
    pub fn bad_request(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            hint: Some(hint.into()),
        }
    }

    /// HTTP status and hint of this error.
    fn classify(&self) -> (StatusCode, Option<String>) {
        use DesiredError as D;
        match self {
            Self::Desired(D::InvalidName { .. }) => (
                StatusCode::BAD_REQUEST,
                Some("names may hold lower-case letters, digits, '_', '.' and '-'".into()),
            ),
            Self::Desired(D::EmptyStack { .. }) => (
                StatusCode::BAD_REQUEST,
                Some("enable a profile with --profile, or add a service".into()),
            ),
            Self::Desired(D::TooManyReplicas { .. }) => (
                StatusCode::BAD_REQUEST,
                Some(format!(
                    "ask for at most {} replicas of one service",
                    crate::desired::MAX_REPLICAS
                )),
            ),
            Self::Desired(D::GlobalService { .. }) => (
                StatusCode::BAD_REQUEST,
                Some("global services get one instance per eligible node".into()),
            ),
            Self::Desired(D::StackNotFound { namespace, .. }) => (
                StatusCode::NOT_FOUND,
                Some(format!(
                    "list the stacks with `berth ps -a -n {namespace}`, or start it with `berth up`"
                )),
            ),
            Self::Desired(D::UnknownService { known, .. }) => (
                StatusCode::NOT_FOUND,
                Some(format!("the stack's services are: {}", known.join(", "))),
            ),
            Self::Desired(D::Conflict { .. }) => (StatusCode::CONFLICT, None),
            Self::Desired(D::ReleaseNotFound { latest, .. }) => (
                StatusCode::NOT_FOUND,
                Some(format!(
                    "releases go from v1 to v{latest}; list them with `berth releases`"
                )),
            ),
            Self::Desired(D::NothingToRollBack { .. }) => (
                StatusCode::CONFLICT,
                Some("deploy a change first; `berth releases` lists the history".into()),
            ),
            Self::Desired(D::Superseded { .. }) => (
                StatusCode::CONFLICT,
                Some("look at `berth releases` and try again".into()),
            ),
            Self::Desired(D::BadEnv(_)) => (
                StatusCode::BAD_REQUEST,
                Some("e.g. `berth env set FOO=bar` or `berth env unset FOO`".into()),
            ),
            Self::Desired(D::Store(_)) | Self::Store(_) | Self::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, None)
            }
            Self::Kv(KvError::BadKey { .. } | KvError::BadSession(_)) => {
                (StatusCode::BAD_REQUEST, None)
            }
            Self::Kv(KvError::TooLarge { .. }) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                Some(
                    "keep values small; store large blobs elsewhere and put their address in KV"
                        .into(),
                ),
            ),
            Self::Kv(KvError::SessionNotFound(_)) => (
                StatusCode::NOT_FOUND,
                Some(
                    "create a session with PUT /v1/session/create, and renew it within its TTL"
                        .into(),
                ),
            ),
            Self::Kv(KvError::Conflict(_)) => (StatusCode::CONFLICT, None),
            Self::Kv(KvError::Store(_)) => (StatusCode::INTERNAL_SERVER_ERROR, None),
            Self::BadRequest { hint, .. } => (StatusCode::BAD_REQUEST, hint.clone()),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, None),
            Self::Node(e) => e.classify(),
            Self::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                Some(
                    "send `Authorization: Bearer <token>`; the token is in the server's data dir \
                     (file `token`); the CLI reads BERTH_TOKEN"
                        .into(),
                ),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, hint) = self.classify();
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self, "API request failed");
        }
        let body = ErrorBody {
            error: self.to_string(),
            hint,
        };
        (status, Json(body)).into_response()
    }
}

/// An error answered the way Consul answers: its status, and the message as
/// a plain-text body (Consul's clients show the body as the error).
#[derive(Debug)]
pub struct ConsulError(pub ApiError);

impl From<ApiError> for ConsulError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<KvError> for ConsulError {
    fn from(e: KvError) -> Self {
        Self(ApiError::Kv(e))
    }
}

impl From<StoreError> for ConsulError {
    fn from(e: StoreError) -> Self {
        Self(ApiError::Store(e))
    }
}

impl From<DesiredError> for ConsulError {
    fn from(e: DesiredError) -> Self {
        Self(ApiError::Desired(e))
    }
}

impl IntoResponse for ConsulError {
    fn into_response(self) -> Response {
        let (status, _) = self.0.classify();
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self.0, "Consul API request failed");
        }
        (
            status,
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; charset=utf-8",
            )],
            self.0.to_string(),
        )
            .into_response()
    }
}
