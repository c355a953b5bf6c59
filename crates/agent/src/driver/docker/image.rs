//! Getting the image an instance runs: use the local one, pull it, or
//! build it, as `pull_policy` and `build:` say.
//!
//! No registry may be reachable (air-gapped machines, CI): every failure
//! names the image and says how to provide it locally.
//!
//! A `build:` service is built once per release and image on this agent
//! (its replicas and restarts share that build), with the build's output in
//! the instance's logs as system lines.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use berth_model::InstanceKey;
use berth_spec::types::Build;
use bollard::Docker;
use bollard::query_parameters::{BuildImageOptions, CreateImageOptions};
use futures::StreamExt;
use tokio::sync::Mutex;

use super::spec::{image_name, stack_labels};
use super::{engine_error, is_not_found};
use crate::driver::{DriverError, LaunchSpec};
use crate::logs::LogStore;

/// Whether the build of one (image, release) is done; its lock is held
/// while it runs.
type BuildSlot = Arc<Mutex<bool>>;

/// Builds done by this agent, so replicas and restarts share one; and the
/// images already found present for a release, so 50 replicas make one
/// inspect, not 50 (each is a round trip through a busy engine). An image
/// removed in the middle of a release then fails its next create with the
/// engine's "no such image", which names it.
#[derive(Default)]
pub(super) struct Builds {
    done: Mutex<HashMap<(String, u64), BuildSlot>>,
    present: std::sync::Mutex<std::collections::HashSet<(String, u64)>>,
}

impl Builds {
    fn known_present(&self, image: &str, release: u64) -> bool {
        self.present
            .lock()
            .is_ok_and(|p| p.contains(&(image.to_owned(), release)))
    }

    fn mark_present(&self, image: &str, release: u64) {
        if let Ok(mut p) = self.present.lock() {
            p.insert((image.to_owned(), release));
        }
    }
}

async fn exists(docker: &Docker, image: &str) -> Result<bool, DriverError> {
    match docker.inspect_image(image).await {
        Ok(_) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(engine_error(&format!("inspecting image `{image}`"), e)),
    }
}

fn how_to_provide(image: &str) -> String {
    format!(
        "build it here (`docker build -t {image} <dir>`, or give the service a `build:`) or \
         load it (`docker load -i <file>.tar`)"
    )
}

async fn pull(docker: &Docker, service: &str, image: &str) -> Result<(), DriverError> {
    let opts = CreateImageOptions {
        from_image: Some(image.to_owned()),
        ..Default::default()
    };
    let mut stream = docker.create_image(Some(opts), None, None);
    while let Some(item) = stream.next().await {
        if let Err(e) = item {
            return Err(DriverError::Image(format!(
                "service `{service}`: cannot pull image `{image}`: {e}. No registry was \
                 reachable for it; {}",
                how_to_provide(image)
            )));
        }
    }
    Ok(())
}

/// Make sure the instance's image is present; returns its name.
pub(super) async fn ensure(
    docker: &Docker,
    spec: &LaunchSpec,
    logs: &LogStore,
    builds: &Builds,
) -> Result<String, DriverError> {
    let svc = &spec.service;
    let image = image_name(&spec.key, svc);
    let policy = svc.pull_policy.as_deref().unwrap_or("missing");
    if let Some(build) = &svc.build
        && policy != "never"
    {
        let slot = {
            let mut done = builds.done.lock().await;
            done.entry((image.clone(), spec.release))
                .or_default()
                .clone()
        };
        // Replicas of one release wait for the first one's build.
        let mut built = slot.lock().await;
        if !*built {
            // `pull_policy: build` and a new release always build; otherwise
            // an image that is already there is used, as Compose does.
            let fresh = policy != "build" && exists(docker, &image).await? && spec.restarts > 0;
            if !fresh {
                run_build(docker, spec, build, &image, logs).await?;
            }
            *built = true;
        }
        return Ok(image);
    }
    if policy != "always" && builds.known_present(&image, spec.release) {
        return Ok(image);
    }
    let found = match policy {
        "never" => {
            if exists(docker, &image).await? {
                Ok(image)
            } else {
                Err(DriverError::Image(format!(
                    "service `{}`: image `{image}` is not on this machine and its pull_policy \
                     is `never`; {}",
                    spec.key.service,
                    how_to_provide(&image)
                )))
            }
        }
        "always" => {
            pull(docker, &spec.key.service, &image).await?;
            Ok(image)
        }
        _ => {
            if !exists(docker, &image).await? {
                logs.system(&spec.key, &format!("pulling image {image}"))
                    .await;
                pull(docker, &spec.key.service, &image).await?;
            }
            Ok(image)
        }
    }?;
    builds.mark_present(&found, spec.release);
    Ok(found)
}

/// The build context as an uncompressed tar (blocking: reads the tree).
fn context_tar(dir: &Path) -> std::io::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    tar.follow_symlinks(false);
    tar.append_dir_all(".", dir)?;
    tar.into_inner()
}

async fn run_build(
    docker: &Docker,
    spec: &LaunchSpec,
    build: &Build,
    image: &str,
    logs: &LogStore,
) -> Result<(), DriverError> {
    let key: &InstanceKey = &spec.key;
    let service = &key.service;
    logs.system(
        key,
        &format!(
            "building image {image} from {} ({})",
            build.context.display(),
            build.dockerfile
        ),
    )
    .await;
    if build.is_remote() {
        return Err(DriverError::Image(format!(
            "service `{service}`: build context `{}` is remote, and berth builds only from a \
             local folder: clone it and point `build.context` at the clone",
            build.context.display()
        )));
    }
    let dir = build.context.clone();
    let tar = tokio::task::spawn_blocking(move || context_tar(&dir))
        .await
        .map_err(|e| DriverError::Image(format!("service `{service}`: build context: {e}")))?
        .map_err(|e| {
            DriverError::Image(format!(
                "service `{service}`: cannot read the build context {}: {e}",
                build.context.display()
            ))
        })?;
    let opts = BuildImageOptions {
        dockerfile: build.dockerfile.clone(),
        t: Some(image.to_owned()),
        buildargs: (!build.args.is_empty()).then(|| build.args.clone().into_iter().collect()),
        target: build.target.clone().unwrap_or_default(),
        labels: Some(stack_labels(key)),
        rm: true,
        forcerm: true,
        ..Default::default()
    };
    let mut stream = docker.build_image(opts, None, Some(bollard::body_full(tar.into())));
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(text) = info.stream.as_deref().or(info.status.as_deref()) {
                    let text = text.trim_end();
                    if !text.is_empty() {
                        logs.system(key, &format!("build: {text}")).await;
                    }
                }
            }
            Err(e) => {
                let msg = format!("service `{service}`: building image `{image}` failed: {e}");
                logs.system(key, &msg).await;
                return Err(DriverError::Image(msg));
            }
        }
    }
    logs.system(key, &format!("built image {image}")).await;
    Ok(())
}
