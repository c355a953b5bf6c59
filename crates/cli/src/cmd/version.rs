//! `berth version`.

use berth_model::api::HealthResponse;
use serde_json::json;

use crate::exit;
use crate::settings::Settings;

/// The CLI's version and, when a server answers, the server's.
pub async fn run(settings: &Settings) -> anyhow::Result<u8> {
    let cli = env!("CARGO_PKG_VERSION");
    let server: Option<HealthResponse> = settings.client().get("/v1/health").await.ok();
    if settings.json {
        println!("{}", json!({ "cli": cli, "server": server }));
    } else {
        println!("berth {cli}");
        match server {
            Some(h) => println!("server {} (pid {}, node {})", h.version, h.pid, h.node),
            None => println!("server: none running"),
        }
    }
    Ok(exit::OK)
}
