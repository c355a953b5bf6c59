//! `berth server`: the server in the foreground.

use crate::args::ServerArgs;
use crate::exit;
use crate::settings::Settings;

/// Run until SIGINT or SIGTERM, then stop every instance and exit.
pub async fn run(settings: &Settings, args: &ServerArgs) -> anyhow::Result<u8> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let cfg = berth_server::ServerConfig {
        data_dir: settings.data_dir.clone(),
        listen: if args.no_tcp {
            Vec::new()
        } else {
            args.listen.clone()
        },
        node_id: args
            .node_id
            .clone()
            .unwrap_or_else(berth_server::default_node_id),
    };
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
