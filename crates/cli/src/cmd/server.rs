//! `berth server`: the server in the foreground.

use crate::args::ServerArgs;
use crate::exit::{self, Failure};
use crate::settings::Settings;

/// Run until SIGINT or SIGTERM, then stop every instance and exit.
pub async fn run(settings: &Settings, args: &ServerArgs) -> anyhow::Result<u8> {
    // Buffered: the router logs a line per request (see logbuf).
    let _flush = crate::logbuf::init_tracing();
    let node_id = args
        .node_id
        .clone()
        .unwrap_or_else(berth_server::default_node_id);
    let mut cfg = berth_server::ServerConfig::new(settings.data_dir.clone(), node_id);
    cfg.listen = if args.no_tcp {
        Vec::new()
    } else {
        args.listen.clone()
    };
    cfg.http = (!args.no_http).then_some(args.http);
    cfg.dns = (!args.no_dns).then_some(args.dns);
    cfg.consul = args.consul_listen;
    cfg.store = berth_server::StoreLocation::parse(&args.store)
        .map_err(|e| Failure::with_code(exit::BAD_INPUT, e.to_string()))?;
    cfg.run_agent = !args.no_agent;
    if let Some(ip) = args.advertise {
        cfg.advertise = ip;
    }
    cfg.logs.max_file_bytes = args.log_max_file_size;
    cfg.logs.max_files = args.log_max_files;
    cfg.history_interval = args
        .history_interval
        .max(std::time::Duration::from_millis(100));
    cfg.reschedule_after = args.reschedule_after;
    cfg.facts_every = args.facts_every.max(std::time::Duration::from_millis(100));
    if args.dashboard_no_auth {
        cfg.dashboard_auth = berth_server::ui::DashboardAuth::Off;
    }
    // A small cap splits long lines sooner rather than being refused.
    let half = usize::try_from(args.log_max_file_size / 2).unwrap_or(usize::MAX);
    cfg.logs.max_line_bytes = cfg.logs.max_line_bytes.min(half);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down: stopping instances");
    };
    berth_server::run(cfg, shutdown).await?;
    Ok(exit::OK)
}
