//! `berth ps`.

use berth_model::api::Instance;

use crate::args::PsArgs;
use crate::client::enc;
use crate::exit::{self, Failure};
use crate::output::{instance_table, print_json, print_out};
use crate::resolve;
use crate::settings::Settings;

/// List instances of the stack (or, with `-a`, of every stack).
pub async fn run(settings: &Settings, args: &PsArgs) -> anyhow::Result<u8> {
    let client = settings.client();
    let ns = &settings.namespace;
    // Without -p or a stack file, every stack of the namespace is shown:
    // that is "the only stack running" when there is one, and more useful
    // than an error when there are several.
    let all = args.all || (args.stack.project.is_none() && !resolve::has_stack_file(&args.stack));
    let path = if all {
        format!("/v1/instances?namespace={}", enc(ns))
    } else {
        let stack = resolve::stack_name(settings, &client, &args.stack).await?;
        // An unknown stack has no instances either: say it is unknown
        // instead of printing an empty list.
        let stacks = resolve::list_stacks(&client, ns).await?;
        if !stacks.iter().any(|s| s.name == stack) {
            let names: Vec<&str> = stacks.iter().map(|s| s.name.as_str()).collect();
            return Err(Failure::with_code(
                exit::NOT_FOUND,
                format!(
                    "no stack {stack:?} in namespace {ns:?}; {}",
                    if names.is_empty() {
                        "it has no stacks (start one with `berth up`)".to_owned()
                    } else {
                        format!("its stacks are: {}", names.join(", "))
                    }
                ),
            ));
        }
        format!("/v1/instances?namespace={}&stack={}", enc(ns), enc(&stack))
    };
    let rows: Vec<Instance> = client.get(&path).await?;
    if settings.json {
        print_json(&rows)?;
    } else if rows.is_empty() {
        eprintln!("no instances");
    } else {
        print_out(&instance_table(&rows, settings.color))?;
    }
    Ok(exit::OK)
}
