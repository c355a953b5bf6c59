//! Heroku-style `Procfile`: `name: command` lines. Every process becomes a
//! service run through `sh -c`; `web` also gets a port (target 5000, the
//! instance is told its real port in `$PORT`) and an HTTP readiness check on
//! `/`, as on Heroku where only `web` receives traffic.

use std::collections::BTreeMap;
use std::path::Path;

use crate::diagnostics::{Diagnostic, Diags};
use crate::types::*;
use crate::validate::valid_service_name;

/// Parses a Procfile into services (errors are collected in `diags`).
pub fn parse(
    file: &Path,
    content: &str,
    project_dir: &Path,
    diags: &mut Diags,
) -> BTreeMap<String, Service> {
    let mut out = BTreeMap::new();
    for (i, raw) in content.lines().enumerate() {
        let line_no = i + 1;
        let at = |col: usize, msg: String| Diagnostic {
            file: file.to_path_buf(),
            line: line_no,
            column: col,
            service: None,
            field: None,
            message: msg,
            hint: None,
        };
        let trimmed = raw.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = raw.len() - trimmed.len();
        let Some((name, cmd)) = trimmed.split_once(':') else {
            diags.error(
                at(indent + 1, "expected `name: command`".into())
                    .hint("each Procfile line is a process name, a colon and the command, e.g. `web: python app.py`"),
            );
            continue;
        };
        let name = name.trim_end();
        if !valid_service_name(name) {
            diags.error(
                at(indent + 1, format!("invalid process name `{name}`"))
                    .service(name)
                    .hint("use at most 63 letters, digits, `_`, `.` and `-`, starting with a letter or digit"),
            );
            continue;
        }
        let cmd_col = indent + name.len() + 2 + (cmd.len() - cmd.trim_start().len());
        let cmd = cmd.trim();
        if cmd.is_empty() {
            diags.error(at(cmd_col, format!("process `{name}` has no command")).service(name));
            continue;
        }
        if out.contains_key(name) {
            diags.error(
                at(indent + 1, format!("process `{name}` is defined twice"))
                    .service(name)
                    .hint("keep one line per process name"),
            );
            continue;
        }
        let web = name == "web";
        out.insert(
            name.to_string(),
            Service {
                command: Some(Command::Shell(cmd.to_string())),
                working_dir: Some(project_dir.to_path_buf()),
                ports: if web {
                    vec![Port {
                        target: 5000,
                        published: None,
                        host_ip: None,
                        protocol: "tcp".into(),
                        app_protocol: Some("http".into()),
                        name: None,
                        mode: None,
                    }]
                } else {
                    Vec::new()
                },
                healthcheck: web.then(|| Healthcheck {
                    test: HealthTest::Http {
                        port: None,
                        path: "/".into(),
                    },
                    interval_ms: 2_000,
                    timeout_ms: 2_000,
                    retries: 3,
                    start_period_ms: 0,
                    start_interval_ms: 500,
                }),
                // Heroku restarts crashed dynos.
                restart: RestartPolicy::OnFailure { max_attempts: None },
                ..Service::new(name)
            },
        );
    }
    if out.is_empty() && diags.errors.is_empty() {
        diags.error(
            Diagnostic::file(file, "the Procfile defines no processes")
                .hint("add a line such as `web: python app.py`"),
        );
    }
    out
}
