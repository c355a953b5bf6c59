//! Interpolation, durations, sizes, signals and port syntax.
#![allow(clippy::unwrap_used)] // tests unwrap what they control

use berth_spec::interpolate::{InterpError, interpolate};
use berth_spec::parse_port_spec;
use berth_spec::units::{normalize_signal, parse_duration_ms, parse_size};

fn interp(s: &str) -> Result<String, InterpError> {
    let lookup = |k: &str| match k {
        "A" => Some("a".to_string()),
        "EMPTY" => Some(String::new()),
        "PORT" => Some("8000".to_string()),
        _ => None,
    };
    interpolate(s, &lookup, &mut Vec::new())
}

#[test]
fn interpolation_forms() {
    assert_eq!(interp("x${A}y$A.").unwrap(), "xaya.");
    assert_eq!(interp("$$A $${A}").unwrap(), "$A ${A}");
    assert_eq!(interp("${UNSET:-def}").unwrap(), "def");
    assert_eq!(interp("${EMPTY:-def}").unwrap(), "def");
    assert_eq!(interp("${EMPTY-def}").unwrap(), "");
    assert_eq!(interp("${UNSET-def}").unwrap(), "def");
    assert_eq!(
        interp("${A:+alt}|${EMPTY:+alt}|${EMPTY+alt}|${UNSET+alt}").unwrap(),
        "alt||alt|"
    );
    assert_eq!(interp("${UNSET:-${ALSO:-${PORT}}}").unwrap(), "8000");
    assert_eq!(interp("${UNSET:-a}}").unwrap(), "a}");
    assert_eq!(interp("${A:?must}").unwrap(), "a");
}

#[test]
fn interpolation_errors() {
    assert_eq!(
        interp("${DB:?set the database URL}"),
        Err(InterpError::Required {
            var: "DB".into(),
            message: "set the database URL".into()
        })
    );
    assert!(matches!(
        interp("${EMPTY:?x}"),
        Err(InterpError::Required { .. })
    ));
    assert_eq!(interp("${EMPTY?x}").unwrap(), "");
    assert!(matches!(interp("${A"), Err(InterpError::Invalid { .. })));
    assert!(matches!(
        interp("cost: $5"),
        Err(InterpError::Invalid { .. })
    ));
    assert!(matches!(interp("${A/x}"), Err(InterpError::Invalid { .. })));
    assert!(matches!(interp("${}"), Err(InterpError::Invalid { .. })));
}

#[test]
fn unset_variables_are_recorded() {
    let mut unset = Vec::new();
    let out = interpolate("${X}-$Y-${Z:-d}", &|_: &str| None, &mut unset).unwrap();
    assert_eq!(out, "--d");
    assert_eq!(unset, ["X", "Y"]);
}

#[test]
fn durations() {
    assert_eq!(parse_duration_ms("1m30s"), Some(90_000));
    assert_eq!(parse_duration_ms("10s"), Some(10_000));
    assert_eq!(parse_duration_ms("500ms"), Some(500));
    assert_eq!(parse_duration_ms("1h"), Some(3_600_000));
    assert_eq!(parse_duration_ms("1.5s"), Some(1_500));
    assert_eq!(parse_duration_ms("2us"), Some(0));
    assert_eq!(parse_duration_ms("0"), Some(0));
    for bad in ["5x", "", "s", "10", "1m30", "-1s", "1..5s"] {
        assert_eq!(parse_duration_ms(bad), None, "{bad}");
    }
}

#[test]
fn sizes() {
    assert_eq!(parse_size("512M"), Some(512 << 20));
    assert_eq!(parse_size("1g"), Some(1 << 30));
    assert_eq!(parse_size("100k"), Some(100 << 10));
    assert_eq!(parse_size("1024"), Some(1024));
    assert_eq!(parse_size("1.5gb"), Some(3 << 29));
    assert_eq!(parse_size("12q"), None);
    assert_eq!(parse_size("M"), None);
}

#[test]
fn signals() {
    assert_eq!(normalize_signal("TERM").as_deref(), Some("SIGTERM"));
    assert_eq!(normalize_signal("SIGTERM").as_deref(), Some("SIGTERM"));
    assert_eq!(normalize_signal("sigint").as_deref(), Some("SIGINT"));
    assert_eq!(normalize_signal("9").as_deref(), Some("SIGKILL"));
    assert_eq!(normalize_signal("SIGNOPE"), None);
    assert_eq!(normalize_signal("99"), None);
}

#[test]
fn short_ports() {
    let p = parse_port_spec("8000").unwrap();
    assert_eq!((p[0].target, p[0].published), (8000, None));
    let p = parse_port_spec("8000:5000").unwrap();
    assert_eq!((p[0].target, p[0].published), (5000, Some(8000)));
    let p = parse_port_spec("127.0.0.1:8000:5000").unwrap();
    assert_eq!(p[0].host_ip.as_deref(), Some("127.0.0.1"));
    let p = parse_port_spec("[::1]:8000:5000").unwrap();
    assert_eq!(p[0].host_ip.as_deref(), Some("::1"));
    let p = parse_port_spec("5000/udp").unwrap();
    assert_eq!(p[0].protocol, "udp");
    let p = parse_port_spec("9000-9001:9000-9001").unwrap();
    assert_eq!(
        p.iter()
            .map(|p| (p.published, p.target))
            .collect::<Vec<_>>(),
        [(Some(9000), 9000), (Some(9001), 9001)]
    );
    let p = parse_port_spec("127.0.0.1::5000").unwrap();
    assert_eq!(
        (p[0].published, p[0].host_ip.as_deref()),
        (None, Some("127.0.0.1"))
    );
    for bad in [
        "",
        "x",
        "80:x",
        "70000",
        "9000-9002:9000-9001",
        "80/icmp",
        "a:b:c:d",
        "0",
    ] {
        assert!(parse_port_spec(bad).is_err(), "{bad}");
    }
    // One published port for a target range starts the published range.
    let p = parse_port_spec("8000:80-82").unwrap();
    assert_eq!(
        p.iter().map(|p| p.published).collect::<Vec<_>>(),
        [Some(8000), Some(8001), Some(8002)]
    );
}

/// Regression: `65535:1-100` overflowed the published port (a panic in
/// debug builds, a silent wrap to port 0.. in release).
#[test]
fn a_published_range_past_65535_is_an_error_not_an_overflow() {
    let e = parse_port_spec("65535:1-100").unwrap_err();
    assert!(
        e.contains("65535-65634") && e.contains("run past 65535"),
        "{e}"
    );
    assert_eq!(parse_port_spec("65435:1-100").unwrap().len(), 100);
}
