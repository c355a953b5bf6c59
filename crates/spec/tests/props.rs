//! Property tests: the loader, interpolation and port specs never panic, `$$` escapes
//! round-trip, and `to_yaml` output reads back to the same stack.
#![allow(clippy::unwrap_used)] // tests unwrap what they control

use std::path::Path;

use berth_spec::interpolate::interpolate;
use berth_spec::types::Stack;
use berth_spec::{LoadOptions, load_str, to_yaml, yaml_to_json};
use proptest::prelude::*;

fn opts() -> LoadOptions {
    LoadOptions {
        working_dir: "/nonexistent/berth-proptest".into(),
        ..Default::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn interpolation_never_panics(s in ".{0,64}") {
        let _ = interpolate(&s, &|k: &str| k.len().is_multiple_of(2).then(|| k.to_string()), &mut Vec::new());
    }

    #[test]
    fn doubled_dollars_round_trip(s in "[^$]{0,20}(\\$[^$]{0,8}){0,4}") {
        let escaped = s.replace('$', "$$");
        let out = interpolate(&escaped, &|_: &str| Some("X".into()), &mut Vec::new()).unwrap();
        prop_assert_eq!(out, s);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = load_str(Path::new("compose.yaml"), &text, &opts());
        let _ = load_str(Path::new("Procfile"), &text, &opts());
    }

    /// Port specs near the top of the port numbers (where a range's end
    /// can overflow `u16`) are either refused or give ports in range.
    #[test]
    fn port_ranges_never_overflow(
        p0 in 60000u32..70000, p1 in 60000u32..70000,
        t0 in 1u32..2000, len in 0u32..2000, published_range in any::<bool>(),
    ) {
        let spec = if published_range {
            format!("{p0}-{p1}:{t0}-{}", t0 + len)
        } else {
            format!("{p0}:{t0}-{}", t0 + len)
        };
        if let Ok(ports) = berth_spec::parse_port_spec(&spec) {
            prop_assert_eq!(ports.len() as u32, len + 1);
            for (i, p) in ports.iter().enumerate() {
                prop_assert_eq!(p.published.map(u32::from), Some(p0 + i as u32));
            }
        }
    }

    #[test]
    fn yamlish_text_never_panics(text in "(services:\n  [a-z]{1,3}:\n    (command|ports|environment|depends_on|healthcheck|deploy|x-berth|extends|<<): [\\[\\]{}a-z0-9:$&*!, \"'-]{0,20}\n){0,4}") {
        let _ = load_str(Path::new("compose.yaml"), &text, &opts());
    }

    #[test]
    fn to_yaml_reads_back(
        names in proptest::collection::btree_set("[a-z][a-z0-9-]{0,6}", 1..4),
        cmd in "[ -#%-~é日本]{0,30}",
        env_val in "[ -#%-~é]{0,12}",
        port in 1u16..,
        replicas in 0u32..50,
    ) {
        let mut yaml = String::from("services:\n");
        for n in &names {
            let cmd_json = serde_json::to_string(&cmd).unwrap();
            let env_json = serde_json::to_string(&env_val).unwrap();
            yaml.push_str(&format!(
                "  {n}:\n    command: {cmd_json}\n    environment: {{V: {env_json}, T: \"true\", N: \"007\"}}\n    ports: [\"{port}\"]\n    deploy: {{replicas: {replicas}}}\n    labels: [a=1]\n"
            ));
        }
        let loaded = load_str(Path::new("/p/compose.yaml"), &yaml, &opts())
            .map_err(|e| TestCaseError::fail(format!("{e}\n{yaml}")))?;
        {
            let out = to_yaml(&loaded.stack);
            let json = yaml_to_json(Path::new("config.yaml"), &out).map_err(|e| TestCaseError::fail(format!("{e}\n{out}")))?;
            let back: Stack = serde_json::from_value(json).map_err(|e| TestCaseError::fail(format!("{e}\n{out}")))?;
            prop_assert_eq!(back, loaded.stack);
        }
    }
}
