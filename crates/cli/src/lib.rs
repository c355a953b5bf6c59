//! The `berth` command-line tool: argument parsing, the API client, the
//! commands and their output. It never touches the store: every command
//! goes through the server's HTTP API, so the same commands work against a
//! laptop's embedded server and a fleet.
//!
//! # Layout
//! - [`args`]: clap definitions (what was typed; no I/O) — the "low" phase.
//! - [`settings`]: global flags and environment → data dir, endpoint,
//!   colour — the "high" phase.
//! - [`client`]: HTTP/1.1 over the Unix socket or TCP (hyper).
//! - [`autostart`]: starting a background server for `berth up`.
//! - [`resolve`]: loading stack files and picking the stack a command is about.
//! - [`cmd`]: one module per command; [`output`]: tables, colours, log prefixes.
//! - [`exit`]: the fixed exit codes.
//! - [`logbuf`]: `berth server`'s buffered stderr log writer.

pub mod args;
pub mod autostart;
pub mod client;
pub mod cmd;
pub mod exit;
pub mod logbuf;
pub mod output;
pub mod resolve;
pub mod settings;

use args::{Cli, Command};
use cmd::actions::Action;
use settings::Settings;

/// Run a parsed command line; returns the exit code.
pub fn run(cli: Cli) -> anyhow::Result<u8> {
    let settings = Settings::from_args(&cli.global)?;
    // `config` is pure and local: no runtime, no server.
    if let Command::Config(a) = &cli.command {
        return cmd::config::run(&settings, a);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match &cli.command {
            Command::Up(a) => cmd::up::run(&settings, a).await,
            Command::Ps(a) => cmd::ps::run(&settings, a).await,
            Command::Services(a) => cmd::services::run(&settings, a).await,
            Command::Logs(a) => cmd::logs::run(&settings, a).await,
            Command::Stop(a) => cmd::actions::services(&settings, a, Action::Stop).await,
            Command::Start(a) => cmd::actions::services(&settings, a, Action::Start).await,
            Command::Restart(a) => cmd::actions::services(&settings, a, Action::Restart).await,
            Command::Down(a) => cmd::actions::down(&settings, a).await,
            Command::Scale(a) => cmd::actions::scale(&settings, a).await,
            Command::Kv(a) => cmd::kv::run(&settings, a).await,
            Command::Events(a) => cmd::events::run(&settings, a).await,
            Command::Top(a) => cmd::top::run(&settings, a).await,
            Command::Deploy(a) => cmd::deploy::deploy(&settings, a).await,
            Command::Releases(a) => cmd::deploy::releases(&settings, a).await,
            Command::Rollback(a) => cmd::deploy::rollback(&settings, a).await,
            Command::Env(a) => cmd::deploy::env(&settings, a).await,
            Command::Server(a) => cmd::server::run(&settings, a).await,
            Command::Agent(a) => cmd::agent::run(&settings, a).await,
            Command::Nodes(a) => cmd::nodes::run(&settings, a).await,
            Command::Node(a) => cmd::node::run(&settings, a).await,
            Command::Token(a) => cmd::node::token(&settings, a).await,
            Command::Version => cmd::version::run(&settings).await,
            Command::Dashboard(a) => cmd::dashboard::run(&settings, a).await,
            Command::Config(a) => cmd::config::run(&settings, a),
        }
    })
}
