//! `berth dashboard`: print the web dashboard's URL (and open it in a
//! browser when there is a display to show it on).
//!
//! The URL never carries the token: the dashboard asks for it in a login
//! form, so this command says where the token file is instead.

use std::process::{Command, Stdio};

use crate::args::DashboardArgs;
use crate::autostart;
use crate::client::Endpoint;
use crate::exit;
use crate::settings::Settings;

/// Run `berth dashboard`.
pub async fn run(settings: &Settings, args: &DashboardArgs) -> anyhow::Result<u8> {
    let client = autostart::ensure_server(settings).await?;
    let Some(url) = url(settings, client.endpoint()) else {
        anyhow::bail!(
            "the server has no TCP listener, so a browser cannot reach the dashboard \
             (start it without --no-tcp, or with --listen 127.0.0.1:PORT)"
        );
    };
    println!("{url}");
    if let Endpoint::Unix { data_dir, .. } = client.endpoint() {
        eprintln!(
            "sign in with the API token in {} (e.g. `cat {}`)",
            data_dir.join("token").display(),
            data_dir.join("token").display()
        );
    }
    if !args.no_open && has_display() {
        // Best effort: a missing xdg-open is not an error, the URL is printed.
        let opened = Command::new("xdg-open")
            .arg(&url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        if opened.is_ok() {
            eprintln!("opened in your browser");
        }
    }
    Ok(exit::OK)
}

/// The dashboard's URL for this endpoint: the first TCP address the local
/// server advertises in `server.json`, or the remote server's address.
pub fn url(settings: &Settings, endpoint: &Endpoint) -> Option<String> {
    match endpoint {
        Endpoint::Tcp { authority, .. } => {
            Some(format!("http://{authority}{}", berth_server::ui::PATH))
        }
        Endpoint::Unix { .. } => {
            let raw = std::fs::read(settings.data_dir.join("server.json")).ok()?;
            let info: berth_server::ServerInfo = serde_json::from_slice(&raw).ok()?;
            // Prefer a loopback address: it is the one a local browser reaches.
            let addr = info
                .tcp
                .iter()
                .find(|a| a.ip().is_loopback())
                .or(info.tcp.first())?;
            Some(berth_server::ui::url(addr))
        }
    }
}

fn has_display() -> bool {
    ["DISPLAY", "WAYLAND_DISPLAY"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}
