//! The `berth` binary as a user runs it: help texts, flag validation,
//! `berth config` on good and bad stack files, and exit codes. Commands that
//! need a server are covered against a data dir with none running (exit 3);
//! running stacks end to end is the lead's test suite.

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use clap::CommandFactory;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn berth(dir: &Path, args: &[&str]) -> Output {
    let data = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(args)
        .current_dir(dir)
        .env("BERTH_DATA_DIR", data.path())
        .env_remove("BERTH_ADDR")
        .env_remove("BERTH_TOKEN")
        .env_remove("REQUIRED_FOR_TEST")
        .env_remove("GREETING")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn the_command_definition_is_consistent() {
    // clap's own checks (duplicate short flags, conflicting names…) run here
    // rather than at a user's first `berth logs -f`.
    berth_cli::args::Cli::command().debug_assert();
}

#[test]
fn every_subcommand_help_has_an_example() {
    let cmd = berth_cli::args::Cli::command();
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .filter(|n| n != "help")
        .collect();
    assert!(names.len() >= 11, "{names:?}");
    for name in &names {
        let out = berth(&fixtures(), &[name, "--help"]);
        assert!(out.status.success(), "{name} --help failed");
        assert!(
            stdout(&out).contains("Example"),
            "`berth {name} --help` has no example:\n{}",
            stdout(&out)
        );
    }
    let top = berth(&fixtures(), &["--help"]);
    let text = stdout(&top);
    assert!(text.contains("Example"));
    for code in [
        "0  success",
        "2  bad input",
        "3  no server",
        "4  not found",
        "5  `up -d` or a rollout",
    ] {
        assert!(
            text.contains(code),
            "exit code line {code:?} missing from --help"
        );
    }
}

#[test]
fn config_prints_the_resolved_stack() {
    let out = berth(&fixtures().join("good"), &["config"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let yaml = stdout(&out);
    assert!(yaml.contains("name: shop"), "{yaml}");
    assert!(yaml.contains("GREETING: hello"), "{yaml}");

    let out = berth(&fixtures().join("good"), &["config", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["name"], "shop");
    assert_eq!(v["services"]["web"]["deploy"]["replicas"], 2);

    let out = berth(&fixtures().join("good"), &["config", "--services"]);
    assert_eq!(stdout(&out), "web\nworker\n");

    // -f from elsewhere, -p overrides nothing when the file has `name:`.
    let out = berth(
        &fixtures(),
        &["config", "-f", "procfile/Procfile", "--services"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "web\nworker\n");
}

#[test]
fn config_errors_name_file_line_and_column_and_exit_2() {
    for (fixture, line_col, words) in [
        ("unknown_key", "compose.yaml:4:5", "comand"),
        ("bad_indent", "compose.yaml:4:", "indentation"),
        ("cycle", "compose.yaml:", "cycle"),
        ("missing_var", "compose.yaml:3:", "REQUIRED_FOR_TEST"),
    ] {
        let out = berth(&fixtures().join(fixture), &["config"]);
        assert_eq!(out.status.code(), Some(2), "{fixture}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(line_col),
            "{fixture}: no {line_col} in:\n{err}"
        );
        assert!(err.contains(words), "{fixture}: no {words} in:\n{err}");
        assert!(out.stdout.is_empty(), "{fixture}: printed a stack anyway");
    }
}

#[test]
fn no_stack_file_is_bad_input() {
    let empty = tempfile::tempdir().unwrap();
    let out = berth(empty.path(), &["config"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no stack file"), "{}", stderr(&out));
}

#[test]
fn scale_syntax_is_checked_before_any_server_is_asked() {
    let out = berth(&fixtures().join("good"), &["scale", "web=x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("whole number"), "{}", stderr(&out));
    let out = berth(&fixtures().join("good"), &["scale", "web"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("SERVICE=N"), "{}", stderr(&out));
}

#[test]
fn listener_addresses_are_checked_with_an_example() {
    for args in [
        &["server", "--listen", "localhost:7777"][..],
        &["server", "--http", "1.2.3.4:99999"],
        &["agent", "--join", "http://127.0.0.1:1", "--dns", "8600"],
    ] {
        let out = berth(&fixtures().join("good"), args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            stderr(&out).contains("is not IP:PORT (e.g. 127.0.0.1:7777"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

/// `--join` takes several comma-separated servers (docs/cli.md): the list
/// is accepted and each server tried, so nothing answering is exit 3 (no
/// server), not exit 2 (bad input) as when only one URL was accepted.
#[test]
fn agent_join_takes_a_list_of_servers() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("agent");
    let out = berth(
        &fixtures().join("good"),
        &[
            "agent",
            "--join",
            "http://127.0.0.1:1,http://127.0.0.1:2",
            "--token",
            "t",
            "--node-id",
            "n1",
            "--data",
            dir.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot reach the berth server"),
        "{}",
        stderr(&out)
    );
    let out = berth(
        &fixtures().join("good"),
        &["agent", "--join", "http://127.0.0.1:1,https://x:2"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("https://x:2"), "{}", stderr(&out));
}

/// A `--store` URL that does not parse is bad input (exit 2) naming the
/// problem, like every other flag.
#[test]
fn server_store_url_errors_are_bad_input() {
    for (store, says) in [
        ("etcd://h1", "must be host:port"),
        ("http://127.0.0.1:2379", "is not an etcd URL"),
        ("etcd://127.0.0.1:2379?user=berth", "no password"),
        (
            "etcd://127.0.0.1:2379?colour=blue",
            "unknown etcd URL option",
        ),
    ] {
        let out = berth(
            &fixtures().join("good"),
            &["server", "--no-agent", "--store", store],
        );
        assert_eq!(out.status.code(), Some(2), "{store}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{store}: {}", stderr(&out));
    }
}

#[test]
fn commands_without_a_server_say_so_and_exit_3() {
    for args in [
        &["ps"][..],
        &["logs"],
        &["stop"],
        &["scale", "web=2"],
        &["down"],
    ] {
        let out = berth(&fixtures().join("good"), args);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("no berth server running for data dir"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let out = berth(
        &fixtures().join("good"),
        &["--addr", "http://127.0.0.1:1", "ps"],
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let out = berth(
        &fixtures().join("good"),
        &["--addr", "https://example:1", "ps"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn up_with_a_broken_stack_file_exits_2_before_starting_a_server() {
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["up", "-d"])
        .current_dir(fixtures().join("unknown_key"))
        .env("BERTH_DATA_DIR", data.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("compose.yaml:4:5"));
    assert!(!data.path().join("berth.sock").exists());
}

#[test]
fn version_works_without_a_server() {
    let out = berth(&fixtures(), &["version", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cli"], env!("CARGO_PKG_VERSION"));
    assert!(v["server"].is_null());
}
