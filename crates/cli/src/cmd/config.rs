//! `berth config`: the resolved stack, local only (no server).

use crate::args::ConfigArgs;
use crate::exit;
use crate::resolve;
use crate::settings::Settings;

/// Print the resolved stack as YAML (or JSON), or its service names.
pub fn run(settings: &Settings, args: &ConfigArgs) -> anyhow::Result<u8> {
    let loaded = resolve::load(&args.stack)?;
    if args.services {
        if settings.json {
            let names: Vec<&String> = loaded.stack.services.keys().collect();
            println!("{}", serde_json::to_string_pretty(&names)?);
        } else {
            for name in loaded.stack.services.keys() {
                println!("{name}");
            }
        }
    } else if settings.json {
        println!("{}", serde_json::to_string_pretty(&loaded.stack)?);
    } else {
        print!("{}", berth_spec::to_yaml(&loaded.stack));
    }
    Ok(exit::OK)
}
