//! Nodes, as operators see them: `GET /v1/nodes` (live registrations and
//! joined nodes that are down), drain / activate / remove, and the join
//! token. These are admin routes (the admin token on non-loopback
//! listeners), unlike [`super::agent`]'s.

use std::collections::BTreeMap;

use axum::extract::State;
use berth_model::api::{JoinTokenResponse, NodeChangeResponse, NodeInfo, NodeState};
use berth_model::{Node, keys};
use berth_store::decode;

use super::{ApiContext, ApiError, ApiPath};
use crate::join::{self, NodeCredential};

/// `GET /v1/nodes`: every live node, then joined nodes that are down,
/// sorted by id.
pub(crate) async fn list(
    State(ctx): State<ApiContext>,
) -> Result<axum::Json<Vec<NodeInfo>>, ApiError> {
    let store = ctx.store.as_ref();
    let (live, _) = store.range(keys::NODES).await?;
    let (creds, _) = store.range(keys::NODE_CREDS).await?;
    let (assigned, _) = store.range(keys::ASSIGNMENTS).await?;
    let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
    for kv in &assigned {
        if let Some((node, _)) = kv
            .key
            .strip_prefix(keys::ASSIGNMENTS)
            .and_then(|r| r.split_once('/'))
        {
            *per_node.entry(node).or_default() += 1;
        }
    }
    let joined: BTreeMap<String, NodeCredential> = creds
        .iter()
        .filter_map(|kv| decode::<NodeCredential>(kv).ok())
        .map(|c| (c.node.clone(), c))
        .collect();
    let mut rows: BTreeMap<String, NodeInfo> = BTreeMap::new();
    for kv in &live {
        let node: Node = decode(kv)?;
        let state = if node.draining {
            NodeState::Draining
        } else {
            NodeState::Up
        };
        rows.insert(
            node.id.clone(),
            NodeInfo {
                instances: per_node.get(node.id.as_str()).copied().unwrap_or(0),
                joined: joined.contains_key(&node.id),
                state,
                node,
            },
        );
    }
    for (id, cred) in joined {
        if rows.contains_key(&id) {
            continue;
        }
        let node = cred.last.unwrap_or_else(|| Node {
            id: id.clone(),
            address: String::new(),
            labels: BTreeMap::new(),
            facts: BTreeMap::new(),
            draining: false,
            updated_at: cred.joined_at,
        });
        rows.insert(
            id.clone(),
            NodeInfo {
                instances: per_node.get(id.as_str()).copied().unwrap_or(0),
                joined: true,
                state: NodeState::Down,
                node,
            },
        );
    }
    Ok(axum::Json(rows.into_values().collect()))
}

/// `POST /v1/nodes/{node}/drain`.
pub(crate) async fn drain(
    State(ctx): State<ApiContext>,
    ApiPath(node): ApiPath<String>,
) -> Result<axum::Json<NodeChangeResponse>, ApiError> {
    Ok(axum::Json(
        join::set_draining(ctx.store.as_ref(), &node, true).await?,
    ))
}

/// `POST /v1/nodes/{node}/activate`.
pub(crate) async fn activate(
    State(ctx): State<ApiContext>,
    ApiPath(node): ApiPath<String>,
) -> Result<axum::Json<NodeChangeResponse>, ApiError> {
    Ok(axum::Json(
        join::set_draining(ctx.store.as_ref(), &node, false).await?,
    ))
}

/// `DELETE /v1/nodes/{node}`.
pub(crate) async fn remove(
    State(ctx): State<ApiContext>,
    ApiPath(node): ApiPath<String>,
) -> Result<axum::Json<NodeChangeResponse>, ApiError> {
    Ok(axum::Json(join::remove(ctx.store.as_ref(), &node).await?))
}

/// `GET /v1/join-token`.
pub(crate) async fn join_token(
    State(ctx): State<ApiContext>,
) -> Result<axum::Json<JoinTokenResponse>, ApiError> {
    Ok(axum::Json(JoinTokenResponse {
        token: join::ensure_join_token(ctx.store.as_ref()).await?,
    }))
}

/// `POST /v1/join-token/rotate`: a new join token; joined nodes keep their
/// credentials.
pub(crate) async fn rotate_join_token(
    State(ctx): State<ApiContext>,
) -> Result<axum::Json<JoinTokenResponse>, ApiError> {
    Ok(axum::Json(JoinTokenResponse {
        token: join::rotate_join_token(ctx.store.as_ref()).await?,
    }))
}
