//! Which stack a command is about, and loading stack files.
//!
//! Files live on the client's machine, so the CLI resolves them itself and
//! sends the server a resolved stack. The stack name defaults to the one the
//! stack file in the current folder resolves to, else the only stack running
//! in the namespace, else it is an error listing the running stacks.

use std::collections::BTreeMap;

use berth_model::api::StackSummary;
use berth_spec::{Diagnostic, LoadError, LoadOptions, Loaded};

use crate::args::StackArgs;
use crate::client::{Client, enc};
use crate::exit::{self, Failure};
use crate::settings::Settings;

/// Load the stack files named by `args` (or found in the current folder).
/// Errors → exit code 2 with every diagnostic; warnings are printed.
pub fn load(args: &StackArgs) -> anyhow::Result<Loaded> {
    match load_quiet(args)? {
        Ok(loaded) => {
            print_warnings(&loaded.warnings);
            Ok(loaded)
        }
        Err(e) => {
            // Each diagnostic on its own line, starting with file:line:col,
            // so editors and grep can jump to it.
            for d in &e.errors {
                eprintln!("error: {d}");
            }
            let n = e.errors.len();
            let msg = format!(
                "the stack file has {n} error{}",
                if n == 1 { "" } else { "s" }
            );
            Err(Failure::with_code(exit::BAD_INPUT, msg))
        }
    }
}

/// Load without printing anything.
pub fn load_quiet(args: &StackArgs) -> anyhow::Result<Result<Loaded, LoadError>> {
    let opts = LoadOptions {
        files: args.files.clone(),
        working_dir: std::env::current_dir()?,
        project_name: args.project.clone(),
        profiles: args.profiles.clone(),
        env: std::env::vars().collect::<BTreeMap<_, _>>(),
    };
    Ok(berth_spec::load(&opts))
}

fn print_warnings(warnings: &[Diagnostic]) {
    for w in warnings {
        eprintln!("warning: {w}");
    }
}

/// Whether there is a stack file to use (given with -f or in this folder).
pub fn has_stack_file(args: &StackArgs) -> bool {
    !args.files.is_empty()
        || std::env::current_dir()
            .ok()
            .and_then(|d| berth_spec::find_stack_file(&d))
            .is_some()
}

/// The name of the stack a command (other than `up`) acts on.
pub async fn stack_name(
    settings: &Settings,
    client: &Client,
    args: &StackArgs,
) -> anyhow::Result<String> {
    if let Some(p) = &args.project {
        return Ok(p.clone());
    }
    if !args.files.is_empty() {
        return Ok(load(args)?.stack.name);
    }
    if has_stack_file(args) {
        // A file merely found here may be broken while the user manages a
        // running stack: fall back to the running stacks, but say so.
        match load_quiet(args)? {
            Ok(loaded) => return Ok(loaded.stack.name),
            Err(_) => eprintln!(
                "warning: the stack file in this folder has errors (see `berth config`); ignoring it"
            ),
        }
    }
    let stacks = list_stacks(client, &settings.namespace).await?;
    match stacks.as_slice() {
        [only] => Ok(only.name.clone()),
        [] => Err(Failure::with_code(
            exit::NOT_FOUND,
            format!(
                "no stack file here and no stack running in namespace {:?} (start one with `berth up`)",
                settings.namespace
            ),
        )),
        many => Err(Failure::with_code(
            exit::BAD_INPUT,
            format!(
                "several stacks run in namespace {:?}: {}; pick one with -p NAME",
                settings.namespace,
                many.iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// The stacks of a namespace.
pub async fn list_stacks(client: &Client, ns: &str) -> anyhow::Result<Vec<StackSummary>> {
    client
        .get(&format!("/v1/stacks?namespace={}", enc(ns)))
        .await
}

/// `/v1/stacks/{ns}/{stack}` with both segments encoded.
pub fn stack_path(ns: &str, stack: &str) -> String {
    format!("/v1/stacks/{}/{}", enc(ns), enc(stack))
}
