//! Starting a background server when `berth up` finds none.
//!
//! The server is this same binary (`berth server --data-dir D`), started in
//! its own process group (so a Ctrl-C in the terminal does not reach it),
//! with stdin closed and its output appended to `<data_dir>/server.log`.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::{Client, Endpoint};
use crate::exit::{self, Failure};
use crate::settings::Settings;

/// How long to wait for a started server to answer.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Make sure a server answers; start one for a local data dir if none does.
pub async fn ensure_server(settings: &Settings) -> anyhow::Result<Client> {
    let client = settings.client();
    if client.is_up().await {
        return Ok(client);
    }
    let Endpoint::Unix { .. } = client.endpoint() else {
        // A remote server is somebody else's to start.
        client.get::<serde_json::Value>("/v1/health").await?;
        return Ok(client);
    };
    std::fs::create_dir_all(&settings.data_dir)?;
    let log_path = settings.data_dir.join("server.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .arg("server")
        .arg("--data-dir")
        .arg(&settings.data_dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(|e| {
            Failure::with_code(exit::NO_SERVER, format!("cannot start a berth server: {e}"))
        })?;
    eprintln!(
        "started a berth server (pid {}, data dir {}, log {})",
        child.id(),
        settings.data_dir.display(),
        log_path.display()
    );
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if client.is_up().await {
            return Ok(client);
        }
        // A server that exits at once (bad data dir, another server holding
        // the lock) will not come up: say so now instead of after 10 s.
        if let Ok(Some(status)) = child.try_wait() {
            if client.is_up().await {
                return Ok(client);
            }
            return Err(Failure::with_code(
                exit::NO_SERVER,
                format!(
                    "the berth server exited at start ({status}); see {}",
                    log_path.display()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(Failure::with_code(
        exit::NO_SERVER,
        format!(
            "the berth server did not answer within {}s; see {}",
            START_TIMEOUT.as_secs(),
            log_path.display()
        ),
    ))
}
