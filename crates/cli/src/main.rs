//! The `berth` binary: parse, run, print the error, exit with its code.

use std::process::ExitCode;

use clap::Parser;

// The router proxies every request through many small allocations
// (headers, buffers, futures); mimalloc's per-thread free lists cost less
// CPU per request than glibc's malloc (BENCHMARKS.md, router).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // clap exits with 2 on a usage error and 0 for --help/--version.
    let cli = berth_cli::args::Cli::parse();
    match berth_cli::run(cli) {
        Ok(code) => ExitCode::from(code),
        // The reader of our stdout went away (`| head`): it has what it wanted.
        Err(err) if berth_cli::output::is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            match err.downcast_ref::<berth_cli::exit::Failure>() {
                Some(f) => eprintln!("error: {f}"),
                None => eprintln!("error: {err:#}"),
            }
            ExitCode::from(berth_cli::exit::code_of(&err))
        }
    }
}
