//! `berth services`: the discovery catalog — each service's instances with
//! their health, and the router routes, DNS names and published ports that
//! lead to the healthy ones.

use berth_model::api::ServiceCatalog;

use crate::args::CatalogArgs;
use crate::client::enc;
use crate::exit::{self, Failure};
use crate::output::{Table, paint, print_json, print_out};
use crate::resolve;
use crate::settings::Settings;

/// Show the catalog of the stack (or, with `-a`, of every stack).
pub async fn run(settings: &Settings, args: &CatalogArgs) -> anyhow::Result<u8> {
    let client = settings.client();
    let ns = &settings.namespace;
    // As `ps`: without -p or a stack file, every stack of the namespace.
    let all = args.all || (args.stack.project.is_none() && !resolve::has_stack_file(&args.stack));
    let mut path = format!("/v1/services?namespace={}", enc(ns));
    if !all {
        let stack = resolve::stack_name(settings, &client, &args.stack).await?;
        path.push_str(&format!("&stack={}", enc(&stack)));
    }
    if let Some(service) = &args.service {
        path.push_str(&format!("&service={}", enc(service)));
    }
    let services: Vec<ServiceCatalog> = client.get(&path).await?;
    if let (Some(service), true) = (&args.service, services.is_empty()) {
        return Err(Failure::with_code(
            exit::NOT_FOUND,
            format!("no service {service:?} in namespace {ns:?} (list them with `berth services`)"),
        ));
    }
    if settings.json {
        print_json(&services)?;
    } else if services.is_empty() {
        eprintln!("no services (start a stack with `berth up`)");
    } else {
        print_out(&render(&services, settings.color))?;
    }
    Ok(exit::OK)
}

/// One block per service: a heading with the healthy count, its routes,
/// DNS names and published ports, then a table of its instances.
fn render(services: &[ServiceCatalog], color: bool) -> String {
    let mut out = String::new();
    for (i, s) in services.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let healthy = s.instances.iter().filter(|e| e.healthy).count();
        let count = format!("{healthy}/{} healthy", s.instances.len());
        let code = if healthy == 0 { "31" } else { "32" };
        out.push_str(&format!(
            "{} (stack {}): {}\n",
            paint(&s.service, "1", color),
            s.stack,
            paint(&count, code, color)
        ));
        let line = |label: &str, items: &[String]| {
            if items.is_empty() {
                String::new()
            } else {
                format!("  {label:<10}{}\n", items.join("  "))
            }
        };
        let routes: Vec<String> = s.routes.iter().map(|r| format!("http://{r}")).collect();
        out.push_str(&line("routes", &routes));
        out.push_str(&line("dns", &s.dns));
        out.push_str(&line("published", &s.published));
        if s.instances.is_empty() {
            out.push_str("  no instances\n");
            continue;
        }
        let mut t = Table::new(&["INSTANCE", "NODE", "ADDRESS", "HEALTHY", "TAGS", "META"]);
        for e in &s.instances {
            let addr = match e.port {
                Some(p) if e.address.contains(':') => format!("[{}]:{p}", e.address),
                Some(p) => format!("{}:{p}", e.address),
                None => e.address.clone(),
            };
            let meta: Vec<String> = e.meta.iter().map(|(k, v)| format!("{k}={v}")).collect();
            t.row(vec![
                e.instance.clone(),
                e.node.clone(),
                addr,
                if e.healthy { "yes" } else { "no" }.to_owned(),
                e.tags.join(","),
                meta.join(","),
            ]);
        }
        t.drop_empty_columns(&[4]);
        for l in t.render().lines() {
            out.push_str("  ");
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_model::CatalogEntry;

    #[test]
    fn renders_counts_routes_and_instances() {
        let e = |slot: u32, healthy| CatalogEntry {
            namespace: "default".into(),
            stack: "shop".into(),
            service: "web".into(),
            instance: format!("web.{slot}"),
            node: "n1".into(),
            address: "127.0.0.1".into(),
            port: Some(4000 + slot as u16),
            tags: vec![],
            meta: [("release".to_owned(), "2".to_owned())].into(),
            healthy,
        };
        let s = ServiceCatalog {
            namespace: "default".into(),
            stack: "shop".into(),
            service: "web".into(),
            instances: vec![e(1, true), e(2, false)],
            routes: vec!["web.shop.localhost/".into()],
            dns: vec!["web.shop.default.berth.".into()],
            published: vec![],
        };
        let text = render(&[s], false);
        assert!(
            text.starts_with("web (stack shop): 1/2 healthy\n"),
            "{text}"
        );
        assert!(
            text.contains("routes    http://web.shop.localhost/"),
            "{text}"
        );
        assert!(!text.contains("published"), "{text}");
        assert!(
            text.contains("web.2     n1    127.0.0.1:4002  no       release=2"),
            "{text}"
        );
        assert!(!text.contains("TAGS"), "{text}");
    }
}
