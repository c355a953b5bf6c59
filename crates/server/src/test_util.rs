//! Fixtures shared by the server's unit tests.

use berth_spec::types::Stack;

/// Stack `shop` resolved from Compose `yaml` (relative paths resolve in the
/// temp dir). Panics on a fixture that does not load: that is a bad test.
pub(crate) fn stack(yaml: &str) -> Stack {
    let opts = berth_spec::LoadOptions {
        working_dir: std::env::temp_dir(),
        project_name: Some("shop".into()),
        ..Default::default()
    };
    match berth_spec::load_str(std::path::Path::new("compose.yaml"), yaml, &opts) {
        Ok(loaded) => loaded.stack,
        Err(e) => panic!("test stack does not load: {e}"),
    }
}
