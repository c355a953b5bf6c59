//! `berth config`: the resolved stack, local only (no server), and what of
//! it cannot run on this machine (container services whose image or build
//! context is missing: see [`berth_agent::driver::docker::preflight`]).

use berth_agent::driver::docker::preflight::{self, Finding};

use crate::args::ConfigArgs;
use crate::exit;
use crate::output::{print_json, print_line, print_out};
use crate::resolve;
use crate::settings::Settings;

/// Print the resolved stack as YAML (or JSON), or its service names.
pub fn run(settings: &Settings, args: &ConfigArgs) -> anyhow::Result<u8> {
    let loaded = resolve::load(&args.stack)?;
    if args.services {
        if settings.json {
            let names: Vec<&String> = loaded.stack.services.keys().collect();
            print_json(&names)?;
        } else {
            for name in loaded.stack.services.keys() {
                print_line(name)?;
            }
        }
    } else if settings.json {
        print_json(&loaded.stack)?;
    } else {
        print_out(&berth_spec::to_yaml(&loaded.stack))?;
    }
    if !args.services {
        for finding in container_findings(&loaded.stack)? {
            eprintln!("{finding}");
        }
    }
    Ok(exit::OK)
}

/// What of the stack's container services cannot run here. Asks the
/// engine only when there are container services.
pub fn container_findings(stack: &berth_spec::types::Stack) -> anyhow::Result<Vec<Finding>> {
    if !stack
        .services
        .values()
        .any(|s| s.driver() == berth_spec::types::Driver::Docker)
    {
        return Ok(Vec::new());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(runtime.block_on(preflight::check_stack(None, stack)))
}
