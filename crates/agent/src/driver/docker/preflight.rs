//! What of a stack's container services cannot run on this machine, said
//! before anything starts (`berth config`, `berth up`).
//!
//! Per service: the engine answers at all; a `build:` context (and its
//! Dockerfile) exists; an `image:` is present locally, or else its registry
//! answers for it (the engine's distribution endpoint: a manifest lookup,
//! nothing is downloaded); a bind-mounted host path exists (Docker would
//! create it empty). One image inspect per distinct image, and one registry
//! lookup per distinct missing image, so the check stays cheap.
//!
//! The driver does the same when it starts an instance (see `image.rs`),
//! so these findings are an early, complete explanation, not a second
//! source of truth.

use std::collections::BTreeMap;
use std::path::Path;

use berth_spec::types::{Driver as DriverKind, Service, Stack};
use bollard::Docker;

use super::spec::service_image;
use super::{Engine, is_not_found};

/// How bad a [`Finding`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The service cannot start here as the file stands.
    Error,
    /// It starts, but probably not as intended.
    Warning,
}

/// One thing a service needs that this machine does not provide.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    /// The service.
    pub service: String,
    /// Error or warning.
    pub severity: Severity,
    /// What is wrong and how to fix it, naming the image or path.
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.severity {
            Severity::Error => "cannot run here",
            Severity::Warning => "warning",
        };
        write!(f, "service `{}`: {what}: {}", self.service, self.message)
    }
}

/// What is known of one image.
enum ImageState {
    Local,
    /// Not local; the registry answered for it.
    Pullable,
    /// Not local, and the registry lookup failed with this.
    Unpullable(String),
    /// Not local and not looked up (`pull_policy: never`).
    Missing,
}

/// Check the container services of `stack` against the engine at `host`
/// (`None`: `DOCKER_HOST`, else the default socket). Process services are
/// not looked at; without container services the engine is not contacted.
pub async fn check_stack(host: Option<String>, stack: &Stack) -> Vec<Finding> {
    let services: Vec<&Service> = stack
        .services
        .values()
        .filter(|s| s.driver() == DriverKind::Docker)
        .collect();
    if services.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let engine = Engine {
        host,
        client: tokio::sync::Mutex::new(None),
    };
    // `connect`, not `client`: the driver's error names the services and
    // says how to fix it, which each finding below does already.
    let docker = match engine.connect().await {
        Ok(d) => Some(d),
        Err(e) => {
            // Every container service gets a finding (`berth up` counts
            // them), but the reason and the fix are said once.
            let first = services.first().map_or("", |s| s.name.as_str());
            for (i, s) in services.iter().enumerate() {
                let message = if i == 0 {
                    format!(
                        "no Docker engine answers at {} ({e}): start one (`dockerd`, or \
                         `scripts/docker-up`) or point berth at one with DOCKER_HOST",
                        engine.describe()
                    )
                } else {
                    format!(
                        "no Docker engine answers at {} (see service `{first}`)",
                        engine.describe()
                    )
                };
                out.push(Finding {
                    service: s.name.clone(),
                    severity: Severity::Error,
                    message,
                });
            }
            None
        }
    };
    // Per image and whether it is pulled even when present.
    let mut images: BTreeMap<(String, bool), ImageState> = BTreeMap::new();
    for s in &services {
        let policy = s.pull_policy.as_deref().unwrap_or("missing");
        for v in s.volumes.iter().filter(|v| v.kind == "bind") {
            if let Some(src) = v.source.as_deref()
                && !Path::new(src).exists()
            {
                out.push(Finding {
                    service: s.name.clone(),
                    severity: Severity::Warning,
                    message: format!(
                        "bind mount {src} -> {}: the host path does not exist; Docker will \
                         create it as an empty folder (create it, or fix the path)",
                        v.target
                    ),
                });
            }
        }
        let image = service_image(&stack.name, s);
        if let Some(build) = &s.build
            && policy != "never"
        {
            if build.is_remote() {
                out.push(Finding {
                    service: s.name.clone(),
                    severity: Severity::Error,
                    message: format!(
                        "build context `{}` is remote, and berth builds only from a \
                         local folder: clone it and point `build.context` at the clone, or \
                         build the image elsewhere, load it here and set `pull_policy: never`",
                        build.context.display()
                    ),
                });
            } else if !build.context.is_dir() {
                out.push(Finding {
                    service: s.name.clone(),
                    severity: Severity::Error,
                    message: format!(
                        "build context {} does not exist: create it with a {} (or fix \
                         `build.context`), or build the image elsewhere, load it here \
                         (`docker build -t {image} <dir>` or `docker load -i <file>.tar`) and \
                         set `pull_policy: never` so berth uses it as is",
                        build.context.display(),
                        build.dockerfile
                    ),
                });
            } else if !build.context.join(&build.dockerfile).is_file() {
                out.push(Finding {
                    service: s.name.clone(),
                    severity: Severity::Error,
                    message: format!(
                        "build context {} has no {}: add it, or point `build.dockerfile` at \
                         the right file",
                        build.context.display(),
                        build.dockerfile
                    ),
                });
            }
            continue;
        }
        let Some(docker) = &docker else { continue };
        let always = policy == "always";
        let slot = (image.clone(), always);
        if !images.contains_key(&slot) {
            let state = image_state(docker, &image, policy).await;
            images.insert(slot.clone(), state);
        }
        let how = format!(
            "build it here (`docker build -t {image} <dir>`) or load it (`docker load -i \
             <file>.tar`), then set `pull_policy: never` so berth never tries a registry"
        );
        let message = match images.get(&slot) {
            Some(ImageState::Local | ImageState::Pullable) | None => continue,
            Some(ImageState::Missing) => format!(
                "image `{image}` is not on this machine and its pull_policy is `never`; {how}"
            ),
            Some(ImageState::Unpullable(e)) if always => format!(
                "image `{image}` must be pulled (pull_policy `always`) but its registry cannot \
                 be reached ({e}); {}",
                how.replace(
                    "set `pull_policy: never`",
                    "set `pull_policy: missing` or `never`"
                )
            ),
            Some(ImageState::Unpullable(e)) => format!(
                "image `{image}` is not on this machine and cannot be pulled: no registry is \
                 reachable for it ({e}); {how}"
            ),
        };
        out.push(Finding {
            service: s.name.clone(),
            severity: Severity::Error,
            message,
        });
    }
    out
}

async fn image_state(docker: &Docker, image: &str, policy: &str) -> ImageState {
    // `always` pulls even a present image: only the registry matters.
    if policy != "always" {
        match docker.inspect_image(image).await {
            Ok(_) => return ImageState::Local,
            Err(e) if is_not_found(&e) => {}
            Err(e) => return ImageState::Unpullable(format!("inspecting it failed: {e}")),
        }
        if policy == "never" {
            return ImageState::Missing;
        }
    }
    match docker.inspect_registry_image(image, None).await {
        Ok(_) => ImageState::Pullable,
        Err(e) => ImageState::Unpullable(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stack(yaml: &str, dir: &Path) -> Stack {
        let opts = berth_spec::LoadOptions {
            working_dir: dir.to_owned(),
            ..Default::default()
        };
        berth_spec::load_str(Path::new("compose.yaml"), yaml, &opts)
            .unwrap()
            .stack
    }

    /// Regression: without an engine, each finding said "no Docker engine
    /// answers" and how to start one twice (the driver's own error, which
    /// already named the services and the fix, was quoted inside it).
    #[tokio::test]
    async fn without_an_engine_each_service_is_told_once_how_to_get_one() {
        let dir = tempfile::tempdir().unwrap();
        let s = stack("services:\n  a: {image: x}\n  b: {image: y}\n", dir.path());
        let sock = format!("unix://{}/none.sock", dir.path().display());
        let findings = check_stack(Some(sock.clone()), &s).await;
        assert_eq!(findings.len(), 2, "{findings:?}");
        for f in &findings {
            let text = f.to_string();
            assert_eq!(f.severity, Severity::Error);
            assert_eq!(
                text.matches("no Docker engine answers").count(),
                1,
                "{text}"
            );
            assert!(text.contains(&sock), "{text}");
        }
        // How to get an engine is said once, not once per service.
        let text: Vec<String> = findings.iter().map(ToString::to_string).collect();
        assert_eq!(
            text.join("\n").matches("DOCKER_HOST").count(),
            1,
            "{text:?}"
        );
        assert!(text[1].ends_with("(see service `a`)"), "{text:?}");
    }

    #[tokio::test]
    async fn a_remote_build_context_is_named_as_remote_not_as_a_missing_folder() {
        let dir = tempfile::tempdir().unwrap();
        let s = stack(
            "services:\n  web:\n    build: https://github.com/docker/compose.git\n",
            dir.path(),
        );
        let sock = format!("unix://{}/none.sock", dir.path().display());
        let findings = check_stack(Some(sock), &s).await;
        let remote: Vec<String> = findings
            .iter()
            .map(ToString::to_string)
            .filter(|t| t.contains("build context"))
            .collect();
        assert_eq!(remote.len(), 1, "{findings:?}");
        assert!(
            remote[0].contains("`https://github.com/docker/compose.git` is remote")
                && remote[0].contains("clone it"),
            "{}",
            remote[0]
        );
    }
}
