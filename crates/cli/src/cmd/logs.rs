//! `berth logs`: past and live lines, optionally searched (`--grep`, done
//! by the server so only matches cross the wire) or printed as NDJSON
//! (`--json`).

use crate::args::LogsArgs;
use crate::client::{check, enc};
use crate::cmd::{LineReader, warn_missing_servers};
use crate::exit;
use crate::output::{LogPrinter, print_line};
use crate::resolve::{self, stack_path};
use crate::settings::Settings;

/// Print past (and with -f, live) lines of a stack's services.
pub async fn run(settings: &Settings, args: &LogsArgs) -> anyhow::Result<u8> {
    let client = settings.client();
    let stack = resolve::stack_name(settings, &client, &args.stack()).await?;
    let mut query = Vec::new();
    for s in &args.services {
        query.push(format!("service={}", enc(s)));
    }
    if let Some(t) = args.tail {
        query.push(format!("tail={t}"));
    }
    if let Some(s) = &args.since {
        query.push(format!("since={}", enc(s)));
    }
    if args.follow {
        query.push("follow=true".into());
    }
    if let Some(g) = &args.grep {
        query.push(format!("grep={}", enc(g)));
    }
    let path = format!(
        "{}/logs?{}",
        stack_path(&settings.namespace, &stack),
        query.join("&")
    );
    let resp = check(client.send(hyper::Method::GET, &path, None).await?).await?;
    warn_missing_servers(resp.headers());
    let mut reader = LineReader::new(resp.into_body());
    let mut printer = LogPrinter::new(settings.color, !args.no_prefix, 0);
    while let Some(line) = reader.next().await? {
        if settings.json {
            print_line(serde_json::to_string(&line)?)?;
        } else {
            printer.print(&line)?;
        }
    }
    Ok(exit::OK)
}
