//! Fuzz target: any bytes, as a Compose file and as a Procfile, must give a
//! stack or diagnostics, never a panic or a hang; and a loaded stack must
//! render with `to_yaml`.
#![no_main]

use std::path::Path;

use berth_spec::{LoadOptions, load_str, to_yaml};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A directory that does not exist: includes/extends/env files in the
    // input fail cleanly instead of reading the fuzzing machine's files.
    let opts = LoadOptions {
        working_dir: "/nonexistent/berth-fuzz".into(),
        ..Default::default()
    };
    if let Ok(loaded) = load_str(Path::new("compose.yaml"), text, &opts) {
        let _ = to_yaml(&loaded.stack);
    }
    let _ = load_str(Path::new("Procfile"), text, &opts);
});
