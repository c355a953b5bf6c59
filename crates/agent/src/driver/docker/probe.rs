//! Health probes of a container, run by berth (the one source of truth: no
//! Docker `HEALTHCHECK` is set): exec and shell checks run inside the
//! container through the engine's exec API, HTTP and TCP checks go to the
//! container's IP.

use std::sync::Arc;

use async_trait::async_trait;
use berth_spec::types::HealthTest;
use bollard::Docker;
use bollard::exec::{CreateExecOptions, StartExecResults};
use futures::StreamExt;
use tokio::sync::Semaphore;

use crate::health::{ProbeResult, ProbeTarget, Prober, failed, probe_network, trimmed};

/// Probes one container.
pub(super) struct ContainerProber {
    pub(super) docker: Docker,
    pub(super) id: String,
    /// The container's IP (127.0.0.1 when it has none on a network).
    pub(super) host: String,
    /// The engine's work slots (shared with creates and starts): a check
    /// is an exec, and 50 containers' checks every second compete with
    /// the creates still queued.
    pub(super) slots: Arc<Semaphore>,
}

#[async_trait]
impl Prober for ContainerProber {
    async fn probe(&self, test: &HealthTest, target: &ProbeTarget) -> ProbeResult {
        let argv = match test {
            HealthTest::Exec { argv } => argv.clone(),
            HealthTest::Shell { command } => {
                vec!["/bin/sh".into(), "-c".into(), command.clone()]
            }
            _ => {
                return probe_network(test, &self.host, target)
                    .await
                    .unwrap_or_else(|| failed("not a network check"));
            }
        };
        self.exec(argv).await
    }

    async fn admit(&self, test: &HealthTest) -> Option<Box<dyn std::any::Any + Send>> {
        // HTTP and TCP checks do not go through the engine; exec checks
        // wait for a slot. (The semaphore is never closed.)
        if !matches!(test, HealthTest::Exec { .. } | HealthTest::Shell { .. }) {
            return None;
        }
        let permit = self.slots.clone().acquire_owned().await.ok()?;
        Some(Box::new(permit))
    }
}

impl ContainerProber {
    async fn exec(&self, argv: Vec<String>) -> ProbeResult {
        let created = self
            .docker
            .create_exec(
                &self.id,
                CreateExecOptions {
                    cmd: Some(argv),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..Default::default()
                },
            )
            .await;
        let exec_id = match created {
            Ok(c) => c.id,
            Err(e) => return failed(format!("cannot exec the check in the container: {e}")),
        };
        let mut text = String::new();
        match self.docker.start_exec(&exec_id, None).await {
            Ok(StartExecResults::Attached { mut output, .. }) => {
                while let Some(chunk) = output.next().await {
                    match chunk {
                        Ok(out) => {
                            if text.len() < 4 * crate::health::MAX_OUTPUT {
                                text.push_str(&String::from_utf8_lossy(out.as_ref()));
                            }
                        }
                        Err(e) => return failed(format!("health check output: {e}")),
                    }
                }
            }
            Ok(StartExecResults::Detached) => {}
            Err(e) => return failed(format!("cannot start the check in the container: {e}")),
        }
        let code = match self.docker.inspect_exec(&exec_id).await {
            Ok(i) => i.exit_code,
            Err(e) => return failed(format!("cannot read the check's exit code: {e}")),
        };
        let ok = code == Some(0);
        ProbeResult {
            ok,
            output: if text.trim().is_empty() && !ok {
                format!(
                    "exited with {}",
                    code.map_or("an unknown status".into(), |c| c.to_string())
                )
            } else {
                trimmed(&text)
            },
        }
    }
}
