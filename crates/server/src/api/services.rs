//! `GET /v1/services` (what `berth services` shows) and
//! `GET /v1/sd/prometheus` (Prometheus `http_sd_configs`): the catalog
//! ([`crate::catalog::entries`]) seen per service, with the router routes,
//! DNS names and published ports discovery gives each one.
//!
//! Both read the whole state at one store revision, so an answer never
//! mixes two moments. Neither holds state of its own: the router and DNS
//! tables ([`crate::traffic`]) are built by the same functions from the
//! same mirror, so what is listed here is what they serve.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use berth_model::CatalogEntry;
use berth_model::api::{PrometheusTargetGroup, ServiceCatalog};
use berth_store::{Store, WatchEvent};
use serde::Deserialize;

use super::{ApiContext, ApiError, ApiQuery};
use crate::mirror::Mirror;

/// Filters of `GET /v1/services` and `GET /v1/sd/prometheus`; each narrows
/// the result when given.
#[derive(Debug, Default, Deserialize)]
pub struct ServiceFilter {
    /// Namespace (every namespace when absent).
    pub namespace: Option<String>,
    /// Stack.
    pub stack: Option<String>,
    /// Service.
    pub service: Option<String>,
}

impl ServiceFilter {
    fn matches(&self, ns: &str, stack: &str, service: &str) -> bool {
        self.namespace.as_deref().is_none_or(|n| n == ns)
            && self.stack.as_deref().is_none_or(|s| s == stack)
            && self.service.as_deref().is_none_or(|s| s == service)
    }
}

pub(crate) async fn list(
    State(ctx): State<ApiContext>,
    ApiQuery(filter): ApiQuery<ServiceFilter>,
) -> Result<Json<Vec<ServiceCatalog>>, ApiError> {
    let mirror = read(&*ctx.store).await?;
    Ok(Json(services(&mirror, &filter)))
}

pub(crate) async fn prometheus(
    State(ctx): State<ApiContext>,
    ApiQuery(filter): ApiQuery<ServiceFilter>,
) -> Result<Json<Vec<PrometheusTargetGroup>>, ApiError> {
    let mirror = read(&*ctx.store).await?;
    Ok(Json(prometheus_targets(&mirror, &filter)))
}

async fn read(store: &dyn Store) -> Result<Mirror, ApiError> {
    let (kvs, _) = store.range(berth_model::keys::ROOT).await?;
    let mut mirror = Mirror::default();
    for kv in kvs {
        mirror.apply(&WatchEvent::Put(kv));
    }
    Ok(mirror)
}

/// Every service of every stack matching `filter`, sorted by namespace,
/// stack and service, with its instances (healthy or not), routes, DNS names
/// and published ports.
pub fn services(mirror: &Mirror, filter: &ServiceFilter) -> Vec<ServiceCatalog> {
    let mut by_service: BTreeMap<(String, String, String), Vec<CatalogEntry>> = BTreeMap::new();
    for e in crate::catalog::entries(mirror) {
        if filter.matches(&e.namespace, &e.stack, &e.service) {
            by_service
                .entry((e.namespace.clone(), e.stack.clone(), e.service.clone()))
                .or_default()
                .push(e);
        }
    }
    let mut out = Vec::new();
    for (record, _) in mirror.stacks.values() {
        for (name, service) in &record.spec.services {
            if !filter.matches(&record.namespace, &record.name, name) {
                continue;
            }
            let key = (record.namespace.clone(), record.name.clone(), name.clone());
            let instances = by_service.remove(&key).unwrap_or_default();
            let routes = if service.ports.is_empty() && instances.iter().all(|i| i.port.is_none()) {
                // The router only sends traffic to an instance's port.
                Vec::new()
            } else {
                crate::traffic::service_routes(record, name, service)
                    .into_iter()
                    .map(|(host, path)| format!("{host}{path}"))
                    .collect()
            };
            let published = service
                .ports
                .iter()
                .filter(|p| p.protocol == "tcp")
                .filter_map(|p| {
                    let port = p.published?;
                    let ip = p.host_ip.as_deref().unwrap_or("127.0.0.1");
                    Some(if ip.contains(':') {
                        format!("[{ip}]:{port}")
                    } else {
                        format!("{ip}:{port}")
                    })
                })
                .collect();
            out.push(ServiceCatalog {
                namespace: record.namespace.clone(),
                stack: record.name.clone(),
                service: name.clone(),
                instances,
                routes,
                dns: dns_names(&record.namespace, &record.name, name),
                published,
            });
        }
    }
    out.sort_by(|a, b| {
        (&a.namespace, &a.stack, &a.service).cmp(&(&b.namespace, &b.stack, &b.service))
    });
    out
}

/// The names the DNS server answers for a service (see
/// `berth_net::dns::zone`): the full name, the SRV form, and in namespace
/// `default` the shorter spellings.
fn dns_names(ns: &str, stack: &str, service: &str) -> Vec<String> {
    let apex = berth_net::dns::zone::APEX;
    let (ns, stack, service) = (
        ns.to_ascii_lowercase(),
        stack.to_ascii_lowercase(),
        service.to_ascii_lowercase(),
    );
    let mut names = vec![
        format!("{service}.{stack}.{ns}.{apex}."),
        format!("_{service}._tcp.{stack}.{ns}.{apex}."),
    ];
    if ns == berth_model::DEFAULT_NAMESPACE {
        names.push(format!("{service}.{stack}.{apex}."));
        names.push(format!("{service}.{apex}."));
    }
    names
}

/// One target group per healthy instance with a port, in Prometheus's
/// `http_sd` shape. Target labels `berth_namespace`, `berth_stack`,
/// `berth_service`, `berth_instance` and `berth_node` are kept on every
/// scraped series; `__meta_berth_tags` (`,a=b,c=d,`, as Consul SD's
/// `__meta_consul_tags`) and `__meta_berth_meta_<key>` are there for
/// relabelling and dropped after it.
pub fn prometheus_targets(mirror: &Mirror, filter: &ServiceFilter) -> Vec<PrometheusTargetGroup> {
    crate::catalog::entries(mirror)
        .into_iter()
        .filter(|e| e.healthy && filter.matches(&e.namespace, &e.stack, &e.service))
        .filter_map(|e| {
            let port = e.port?;
            let target = if e.address.contains(':') {
                format!("[{}]:{port}", e.address)
            } else {
                format!("{}:{port}", e.address)
            };
            let mut labels = BTreeMap::new();
            labels.insert("berth_namespace".to_owned(), e.namespace);
            labels.insert("berth_stack".to_owned(), e.stack);
            labels.insert("berth_service".to_owned(), e.service);
            labels.insert("berth_instance".to_owned(), e.instance);
            labels.insert("berth_node".to_owned(), e.node);
            labels.insert(
                "__meta_berth_tags".to_owned(),
                if e.tags.is_empty() {
                    String::new()
                } else {
                    format!(",{},", e.tags.join(","))
                },
            );
            for (k, v) in e.meta {
                labels.insert(format!("__meta_berth_meta_{}", label_name(&k)), v);
            }
            Some(PrometheusTargetGroup {
                targets: vec![target],
                labels,
            })
        })
        .collect()
}

/// A Prometheus label name: `[a-zA-Z0-9_]`, anything else becomes `_`.
fn label_name(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_names_are_sanitised() {
        assert_eq!(label_name("release"), "release");
        assert_eq!(label_name("com.example/x-y"), "com_example_x_y");
    }

    #[test]
    fn dns_names_follow_the_zone() {
        assert_eq!(
            dns_names("default", "Shop", "web"),
            [
                "web.shop.default.berth.",
                "_web._tcp.shop.default.berth.",
                "web.shop.berth.",
                "web.berth."
            ]
        );
        assert_eq!(dns_names("staging", "shop", "web").len(), 2);
    }
}
