//! `/v1/catalog/services`, `/v1/catalog/service/<name>`,
//! `/v1/catalog/nodes`, `/v1/catalog/datacenters` and
//! `/v1/health/service/<name>`: berth's instances (from
//! [`crate::catalog::entries`]) and the services registered through
//! [`super::agent`], in Consul's JSON shapes.
//!
//! Blocking queries compare content: a query at index N returns when the
//! answer differs from what it was when the wait began, or when anything it
//! depends on changed between N and that moment — so instance heartbeats
//! that change nothing a client sees do not wake Prometheus.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::response::Response;
use berth_model::{CatalogEntry, keys};
use berth_store::{Revision, Store, StoreError, WatchEvent};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Blocking, DATACENTER, Params, blocking, json, namespace};
use crate::api::error::ConsulError;
use crate::api::{ApiContext, ApiPath};
use crate::mirror::Mirror;

/// A service registered from outside (`PUT /v1/agent/service/register`),
/// as stored under `/berth/external/<ns>/<id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct External {
    /// Service ID (unique in the namespace).
    pub id: String,
    /// Service name.
    pub name: String,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Address ("" means the node's).
    #[serde(default)]
    pub address: String,
    /// Port.
    #[serde(default)]
    pub port: u16,
    /// Metadata.
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
}

/// Everything the catalog routes answer from, read at one revision.
pub struct View {
    /// Berth's instances and the registered services of the namespace.
    pub entries: Vec<CatalogEntry>,
    /// The revision of the read.
    pub revision: Revision,
}

/// Read the catalog of namespace `ns` at one store revision.
pub async fn view(store: &dyn Store, ns: &str, node: &str) -> Result<View, ConsulError> {
    let (kvs, revision) = store.range(keys::ROOT).await?;
    let mut mirror = Mirror::default();
    let ext_prefix = keys::external_in(ns);
    let mut entries = Vec::new();
    for kv in kvs {
        if kv.key.starts_with(&ext_prefix) {
            let e: External = berth_store::decode(&kv)?;
            entries.push(external_entry(ns, node, e));
        } else {
            mirror.apply(&WatchEvent::Put(kv));
        }
    }
    let mut all: Vec<CatalogEntry> = crate::catalog::entries(&mirror)
        .into_iter()
        .filter(|e| e.namespace == ns)
        .map(|mut e| {
            e.meta.insert("berth_namespace".into(), e.namespace.clone());
            e.meta.insert("berth_stack".into(), e.stack.clone());
            e.meta.insert("berth_service".into(), e.service.clone());
            e.instance = format!("{}.{}", e.stack, e.instance);
            e.service = format!("{}.{}", e.service, e.stack);
            e
        })
        .collect();
    all.extend(entries);
    Ok(View {
        entries: all,
        revision,
    })
}

fn external_entry(ns: &str, node: &str, e: External) -> CatalogEntry {
    CatalogEntry {
        namespace: ns.to_owned(),
        stack: String::new(),
        service: e.name,
        instance: e.id,
        node: node.to_owned(),
        address: e.address,
        port: Some(e.port),
        tags: e.tags,
        meta: e.meta,
        healthy: true,
    }
}

/// Whether a store key is something the catalog of `ns` depends on.
fn relevant(ns: &str) -> impl Fn(&str) -> bool + Send + Sync + 'static {
    let prefixes = [
        format!("{}{ns}/", keys::STATUS),
        format!("{}{ns}/", keys::STACKS),
        keys::external_in(ns),
    ];
    move |k: &str| prefixes.iter().any(|p| k.starts_with(p.as_str()))
}

/// Answer `compute(view)`, blocking as asked (see the module docs).
async fn answer<T, F>(
    ctx: &ApiContext,
    ns: &str,
    block: Option<Blocking>,
    compute: F,
) -> Result<(T, Revision), ConsulError>
where
    T: PartialEq,
    F: Fn(&View) -> T,
{
    let store = &*ctx.store;
    let first = view(store, ns, &ctx.node_id).await?;
    let body = compute(&first);
    let Some(b) = block else {
        return Ok((body, first.revision));
    };
    let relevant = relevant(ns);
    let mut events = match store.watch(keys::ROOT, b.index + 1).await {
        Ok(w) => w,
        Err(StoreError::Compacted { .. }) => return Ok((body, first.revision)),
        Err(e) => return Err(e.into()),
    };
    let deadline = tokio::time::sleep(b.wait);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            batch = events.next() => match batch {
                Some(Ok(batch)) => {
                    let hits: Vec<Revision> = batch
                        .iter()
                        .filter(|e| relevant(e.key()))
                        .map(WatchEvent::revision)
                        .collect();
                    if hits.is_empty() {
                        continue;
                    }
                    // A change the client has not seen, from before our read.
                    if hits.iter().any(|r| *r <= first.revision) {
                        return Ok((body, first.revision));
                    }
                    let now = view(store, ns, &ctx.node_id).await?;
                    let next = compute(&now);
                    if next != body {
                        return Ok((next, now.revision));
                    }
                }
                Some(Err(StoreError::Compacted { .. })) => return Ok((body, first.revision)),
                Some(Err(e)) => return Err(e.into()),
                None => return Err(StoreError::Closed.into()),
            },
            _ = &mut deadline => return Ok((body, first.revision.max(b.index))),
        }
    }
}

fn node_json(node: &str) -> Value {
    json!({
        "ID": "",
        "Node": node,
        "Address": "127.0.0.1",
        "Datacenter": DATACENTER,
        "TaggedAddresses": { "lan": "127.0.0.1", "wan": "127.0.0.1" },
        "Meta": { "berth": "true" },
    })
}

fn address(e: &CatalogEntry) -> String {
    if e.address.is_empty() {
        "127.0.0.1".to_owned()
    } else {
        e.address.clone()
    }
}

fn matches_tags(e: &CatalogEntry, tags: &[&str]) -> bool {
    tags.iter().all(|t| e.tags.iter().any(|have| have == t))
}

/// `GET /v1/catalog/services`: service name → tags.
pub async fn services(
    State(ctx): State<ApiContext>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ConsulError> {
    let params = Params::from_uri(&uri)?;
    let ns = namespace(&params, &headers)?;
    let (body, index) = answer(&ctx, &ns, blocking(&params)?, |v| {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for e in &v.entries {
            let tags = out.entry(e.service.clone()).or_default();
            for t in &e.tags {
                if !tags.contains(t) {
                    tags.push(t.clone());
                }
            }
        }
        out
    })
    .await?;
    json(index, &body)
}

/// `GET /v1/catalog/service/<name>`: its instances, healthy or not.
pub async fn service(
    State(ctx): State<ApiContext>,
    ApiPath(name): ApiPath<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ConsulError> {
    let params = Params::from_uri(&uri)?;
    let ns = namespace(&params, &headers)?;
    let tags: Vec<String> = params.all("tag").into_iter().map(str::to_owned).collect();
    let node = ctx.node_id.clone();
    let (body, index) = answer(&ctx, &ns, blocking(&params)?, |v| {
        let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
        v.entries
            .iter()
            .filter(|e| e.service == name && matches_tags(e, &tags))
            .map(|e| {
                json!({
                    "ID": "",
                    "Node": node,
                    "Address": "127.0.0.1",
                    "Datacenter": DATACENTER,
                    "TaggedAddresses": { "lan": "127.0.0.1", "wan": "127.0.0.1" },
                    "NodeMeta": { "berth": "true" },
                    "ServiceKind": "",
                    "ServiceID": e.instance,
                    "ServiceName": e.service,
                    "ServiceTags": e.tags,
                    "ServiceAddress": address(e),
                    "ServicePort": e.port.unwrap_or(0),
                    "ServiceMeta": e.meta,
                    "ServiceWeights": { "Passing": 1, "Warning": 1 },
                    "ServiceEnableTagOverride": false,
                    "Namespace": e.namespace,
                })
            })
            .collect::<Vec<_>>()
    })
    .await?;
    json(index, &body)
}

/// `GET /v1/health/service/<name>` (`?passing` keeps healthy ones only).
pub async fn health_service(
    State(ctx): State<ApiContext>,
    ApiPath(name): ApiPath<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ConsulError> {
    let params = Params::from_uri(&uri)?;
    let ns = namespace(&params, &headers)?;
    let passing = params.flag("passing");
    let tags: Vec<String> = params.all("tag").into_iter().map(str::to_owned).collect();
    let node = ctx.node_id.clone();
    let (body, index) = answer(&ctx, &ns, blocking(&params)?, |v| {
        let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
        v.entries
            .iter()
            .filter(|e| e.service == name && matches_tags(e, &tags))
            .filter(|e| !passing || e.healthy)
            .map(|e| {
                let status = if e.healthy { "passing" } else { "critical" };
                json!({
                    "Node": node_json(&node),
                    "Service": {
                        "ID": e.instance,
                        "Service": e.service,
                        "Tags": e.tags,
                        "Address": address(e),
                        "Port": e.port.unwrap_or(0),
                        "Meta": e.meta,
                        "Weights": { "Passing": 1, "Warning": 1 },
                        "EnableTagOverride": false,
                        "Namespace": e.namespace,
                    },
                    "Checks": [
                        {
                            "Node": node, "CheckID": "serfHealth", "Name": "Serf Health Status",
                            "Status": "passing", "Notes": "", "Output": "berth server is up",
                            "ServiceID": "", "ServiceName": "", "ServiceTags": [],
                        },
                        {
                            "Node": node, "CheckID": format!("service:{}", e.instance),
                            "Name": format!("Service '{}' check", e.service),
                            "Status": status, "Notes": "", "Output": "",
                            "ServiceID": e.instance, "ServiceName": e.service,
                            "ServiceTags": e.tags,
                        },
                    ],
                })
            })
            .collect::<Vec<_>>()
    })
    .await?;
    json(index, &body)
}

/// `GET /v1/catalog/nodes`: the one node.
pub async fn nodes(State(ctx): State<ApiContext>) -> Result<Response, ConsulError> {
    let rev = ctx.store.revision().await?;
    json(rev, &[node_json(&ctx.node_id)])
}

/// `GET /v1/catalog/datacenters`.
pub async fn datacenters(State(ctx): State<ApiContext>) -> Result<Response, ConsulError> {
    let rev = ctx.store.revision().await?;
    json(rev, &[DATACENTER])
}
