//! Prints the resolved stack for a folder or file, or its errors:
//! `cargo run -p berth-spec --example berth-config -- [-f FILE]... [DIR]`.
use std::path::PathBuf;

fn main() {
    let mut opts = berth_spec::LoadOptions {
        working_dir: PathBuf::from("."),
        env: std::env::vars().collect(),
        ..Default::default()
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "-f" {
            opts.files.extend(args.next().map(PathBuf::from));
        } else if a == "--profile" {
            opts.profiles.extend(args.next());
        } else {
            opts.working_dir = PathBuf::from(a);
        }
    }
    match berth_spec::load(&opts) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            print!("{}", berth_spec::to_yaml(&loaded.stack));
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
