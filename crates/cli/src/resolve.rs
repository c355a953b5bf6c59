//! Which stack a command is about, and loading stack files.
//!
//! Files live on the client's machine, so the CLI resolves them itself and
//! sends the server a resolved stack. The stack name defaults to the one the
//! stack file in the current folder resolves to, else the only stack running
//! in the namespace, else it is an error listing the running stacks.

use std::collections::BTreeMap;

use berth_model::api::StackSummary;
use berth_spec::{Diagnostic, LoadOptions, Loaded};

use crate::args::StackArgs;
use crate::client::{Client, enc};
use crate::exit::{self, Failure};
use crate::settings::Settings;

/// Load the stack files named by `args` (or found in the current folder).
/// Errors → exit code 2 with every diagnostic; warnings are printed.
pub fn load(args: &StackArgs) -> anyhow::Result<Loaded> {
    let opts = LoadOptions {
        files: args.files.clone(),
        working_dir: std::env::current_dir()?,
        project_name: args.project.clone(),
        profiles: args.profiles.clone(),
        env: std::env::vars().collect::<BTreeMap<_, _>>(),
    };
    match berth_spec::load(&opts) {
        Ok(loaded) => {
            print_warnings(&loaded.warnings);
            Ok(loaded)
        }
        Err(e) => {
            let n = e.errors.len();
            let mut msg = String::new();
            for d in &e.errors {
                msg.push_str(&format!("error: {d}\n"));
            }
            msg.push_str(&format!(
                "{n} error{} in the stack file",
                if n == 1 { "" } else { "s" }
            ));
            Err(Failure::new(exit::BAD_INPUT, msg))
        }
    }
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
pub async fn stack_name(settings: &Settings, client: &Client, args: &StackArgs) -> anyhow::Result<String> {
    if let Some(p) = &args.project {
        return Ok(p.clone());
    }
    if has_stack_file(args) {
        match load(args) {
            Ok(loaded) => return Ok(loaded.stack.name),
            // An explicit -f must load; a file merely found here may be
            // broken while the user manages a running stack, so fall back.
            Err(e) if !args.files.is_empty() => return Err(e),
            Err(e) => eprintln!("warning: ignoring the stack file in this folder:\n{e}"),
        }
    }
    let stacks = list_stacks(client, &settings.namespace).await?;
    match stacks.as_slice() {
        [only] => Ok(only.name.clone()),
        [] => Err(Failure::new(
            exit::NOT_FOUND,
            format!(
                "no stack file here and no stack running in namespace {:?} (start one with `berth up`)",
                settings.namespace
            ),
        )),
        many => Err(Failure::new(
            exit::BAD_INPUT,
            format!(
                "several stacks run in namespace {:?}: {}; pick one with -p NAME",
                settings.namespace,
                many.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

/// The stacks of a namespace.
pub async fn list_stacks(client: &Client, ns: &str) -> anyhow::Result<Vec<StackSummary>> {
    client.get(&format!("/v1/stacks?namespace={}", enc(ns))).await
}

/// `/v1/stacks/{ns}/{stack}` with both segments encoded.
pub fn stack_path(ns: &str, stack: &str) -> String {
    format!("/v1/stacks/{}/{}", enc(ns), enc(stack))
}
