//! `berth version`.

use berth_model::api::HealthResponse;
use serde_json::json;

use crate::exit;
use crate::output::print_line;
use crate::settings::Settings;

/// The CLI's version and, when a server answers, the server's.
pub async fn run(settings: &Settings) -> anyhow::Result<u8> {
    let cli = env!("CARGO_PKG_VERSION");
    let server: Option<HealthResponse> = settings.client().get("/v1/health").await.ok();
    if settings.json {
        print_line(json!({ "cli": cli, "server": server }))?;
    } else {
        print_line(format_args!("berth {cli}"))?;
        match server {
            Some(h) => print_line(format_args!(
                "server {} (pid {}, node {})",
                h.version, h.pid, h.node
            ))?,
            None => print_line("server: none running")?,
        }
    }
    Ok(exit::OK)
}
