//! The two read-only routes the dashboard needs beyond the CLI's:
//! - `GET /v1/stacks/{ns}/{stack}/releases/{version}`: one release with its
//!   full resolved spec, so the stack page can diff any two releases;
//! - `GET /v1/network`: for every service, the router rules (host, path
//!   prefix) that reach it, its DNS names and its catalog instances, the
//!   same functions the router and DNS tables are built from.

use axum::Json;
use axum::extract::State;
use berth_model::{Release, keys};
use berth_store::{WatchEvent, decode};
use serde::Serialize;

use crate::api::{ApiContext, ApiError, ApiPath};
use crate::desired::DesiredError;
use crate::mirror::Mirror;
use crate::{catalog, traffic};

/// `GET /v1/stacks/{ns}/{stack}/releases/{version}`.
pub(crate) async fn release(
    State(ctx): State<ApiContext>,
    ApiPath((namespace, stack, version)): ApiPath<(String, String, u64)>,
) -> Result<Json<Release>, ApiError> {
    let Some(kv) = ctx
        .store
        .get(&keys::release(&namespace, &stack, version))
        .await?
    else {
        let latest = crate::desired::latest_release(&*ctx.store, &namespace, &stack).await?;
        return Err(DesiredError::ReleaseNotFound {
            stack,
            version,
            latest,
        }
        .into());
    };
    Ok(Json(decode(&kv)?))
}

/// One service's place in the network.
#[derive(Debug, Serialize)]
pub struct NetworkService {
    /// Namespace.
    pub namespace: String,
    /// Stack.
    pub stack: String,
    /// Service.
    pub service: String,
    /// Router rules reaching it: `host` and `path` prefix.
    pub routes: Vec<NetworkRoute>,
    /// DNS names answering with its healthy instances.
    pub dns: Vec<String>,
    /// Published host ports (`ports:`).
    pub published: Vec<u16>,
    /// Its instances with an address.
    pub instances: Vec<NetworkInstance>,
}

/// A router rule.
#[derive(Debug, Serialize)]
pub struct NetworkRoute {
    /// Host name matched.
    pub host: String,
    /// Path prefix matched.
    pub path: String,
}

/// An instance as the catalog sees it.
#[derive(Debug, Serialize)]
pub struct NetworkInstance {
    /// `web.3`.
    pub instance: String,
    /// Node.
    pub node: String,
    /// Address.
    pub address: String,
    /// Port, when it has one.
    pub port: Option<u16>,
    /// Routable: in the router, DNS and the health API.
    pub healthy: bool,
}

/// `GET /v1/network`.
pub(crate) async fn network(
    State(ctx): State<ApiContext>,
) -> Result<Json<Vec<NetworkService>>, ApiError> {
    let (kvs, _) = ctx.store.range(keys::ROOT).await?;
    let mut mirror = Mirror::default();
    for kv in kvs {
        mirror.apply(&WatchEvent::Put(kv));
    }
    let entries = catalog::entries(&mirror);
    let mut out = Vec::new();
    for (record, _) in mirror.stacks.values() {
        for (name, service) in &record.spec.services {
            let routes = traffic::service_routes(record, name, service)
                .into_iter()
                .map(|(host, path)| NetworkRoute { host, path })
                .collect();
            let mut dns = vec![format!("{name}.{}.{}.berth", record.name, record.namespace)];
            if record.namespace == berth_model::DEFAULT_NAMESPACE {
                dns.push(format!("{name}.{}.berth", record.name));
            }
            let published = service.ports.iter().filter_map(|p| p.published).collect();
            let instances = entries
                .iter()
                .filter(|e| {
                    e.namespace == record.namespace && e.stack == record.name && e.service == *name
                })
                .map(|e| NetworkInstance {
                    instance: e.instance.clone(),
                    node: e.node.clone(),
                    address: e.address.clone(),
                    port: e.port,
                    healthy: e.healthy,
                })
                .collect();
            out.push(NetworkService {
                namespace: record.namespace.clone(),
                stack: record.name.clone(),
                service: name.clone(),
                routes,
                dns,
                published,
                instances,
            });
        }
    }
    Ok(Json(out))
}
