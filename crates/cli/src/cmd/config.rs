//! `berth config`: the resolved stack, local only (no server).

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
    Ok(exit::OK)
}
