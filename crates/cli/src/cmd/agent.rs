//! `berth agent --join URL[,URL…]`: this machine becomes a node of a fleet.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::exit::{self, Failure};
use crate::settings::Settings;

/// `berth agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// API of a berth server (`http://HOST:PORT`, as given to `berth server
    /// --listen`), or several comma-separated: the agent switches to another
    /// when its server stops answering (its instances keep running), and
    /// learns the other live servers from the one it reaches.
    #[arg(long, value_name = "URL", env = "BERTH_JOIN")]
    pub join: String,
    /// The join token (`berth token` on a server). Needed the first time
    /// only: the node's own credential is then kept in the data dir.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "BERTH_JOIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// A node label for placement constraints (`node.labels.K == V`); repeatable.
    #[arg(long = "label", value_name = "K=V", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Where this agent keeps its credential, logs and working files
    /// (default: `<data-dir>/agent-<node-id>`).
    #[arg(long = "data", value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// This node's id (default: the host name).
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,
    /// The IP other nodes reach this node's instances on (default: the local
    /// address of the route to the server).
    #[arg(long, value_name = "IP")]
    pub advertise: Option<std::net::IpAddr>,
    /// Address of this node's HTTP router, which forwards to healthy
    /// instances on every node (use `0.0.0.0:80` behind a load balancer).
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:8080",
        value_parser = crate::args::parse_addr
    )]
    pub http: std::net::SocketAddr,
    /// No HTTP router on this node.
    #[arg(long)]
    pub no_http: bool,
    /// Address of this node's DNS server for `<service>.<stack>.<namespace>.berth`.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:8600",
        value_parser = crate::args::parse_addr
    )]
    pub dns: std::net::SocketAddr,
    /// No DNS server on this node.
    #[arg(long)]
    pub no_dns: bool,
    /// No TCP proxy on this node: published ports and services' stable
    /// addresses (`<NAME>_HOST`) then do not answer here, nor berth's DNS
    /// for containers (198.18.0.53).
    #[arg(long)]
    pub no_proxy: bool,
    /// How often facts (load, memory, disk…) are refreshed.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = crate::args::parse_duration)]
    pub facts_every: Duration,
    /// How often this node's instance CPU/memory figures are sent to the
    /// server (for `/metrics`, `berth top` and the dashboard).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = crate::args::parse_duration)]
    pub stats_every: Duration,
}

/// `zone=east` → (`zone`, `east`).
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE (e.g. zone=east)"))?;
    let ok = |x: &str| {
        !x.is_empty()
            && x.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
    };
    if !ok(k) || !(v.is_empty() || ok(v)) {
        return Err(format!(
            "{s:?}: label keys and values may hold letters, digits, '.', '_', '-' and '/' (e.g. zone=east)"
        ));
    }
    Ok((k.to_owned(), v.to_owned()))
}

/// Run until SIGINT or SIGTERM (then stop every instance), or until the
/// node is removed from the cluster.
pub async fn run(settings: &Settings, args: &AgentArgs) -> anyhow::Result<u8> {
    // Buffered: the node's router logs a line per request (see logbuf).
    let _flush = crate::logbuf::init_tracing();
    let node_id = args
        .node_id
        .clone()
        .unwrap_or_else(berth_server::default_node_id);
    if !berth_server::join::valid_node_id(&node_id) {
        return Err(Failure::with_code(
            exit::BAD_INPUT,
            format!(
                "--node-id {node_id:?}: node ids are 1–63 letters, digits, '.', '_' or '-', starting with a letter or digit"
            ),
        ));
    }
    // The whole list: `--join` takes several comma-separated servers.
    berth_agent::remote::parse_join_urls(&args.join)
        .map_err(|e| Failure::with_code(exit::BAD_INPUT, e.to_string()))?;
    let data_dir = args
        .data
        .clone()
        .unwrap_or_else(|| settings.data_dir.join(format!("agent-{node_id}")));
    let data_dir = std::path::absolute(&data_dir).unwrap_or(data_dir);
    let cfg = berth_agent::remote::RemoteConfig {
        join: args.join.clone(),
        token: args.token.clone(),
        node_id,
        labels: args.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
        advertise: args.advertise.map(|a| a.to_string()),
        data_dir,
        logs: berth_agent::LogConfig::default(),
        facts_every: args.facts_every,
        edge: berth_agent::edge::EdgeConfig {
            http: (!args.no_http).then_some(args.http),
            dns: (!args.no_dns).then_some(args.dns),
            proxy: !args.no_proxy,
        },
        stats_every: args.stats_every,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down: stopping instances");
        stop_tx.send_replace(true);
    });
    match berth_agent::remote::run_remote(cfg, stop_rx).await {
        Ok(()) => Ok(exit::OK),
        Err(e @ berth_agent::remote::RemoteError::BadUrl { .. }) => {
            Err(Failure::with_code(exit::BAD_INPUT, e.to_string()))
        }
        Err(e @ berth_agent::remote::RemoteError::Unreachable { .. }) => {
            Err(Failure::with_code(exit::NO_SERVER, e.to_string()))
        }
        Err(e) => Err(Failure::with_code(exit::GENERIC, e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(
            parse_label("zone=east").unwrap(),
            ("zone".into(), "east".into())
        );
        assert_eq!(parse_label("gpu=").unwrap(), ("gpu".into(), String::new()));
        assert!(parse_label("zone").is_err());
        assert!(parse_label("=east").is_err());
        assert!(parse_label("zone=a b").is_err());
    }
}
