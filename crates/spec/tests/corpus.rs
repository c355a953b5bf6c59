//! Compatibility: the loader over every Compose file of the shared corpus
//! (compose-go's fixtures and the example voting app). Each file has an
//! expectation written from the Compose Specification: the resolved result,
//! or the specific error. A corpus file without an expectation fails the
//! test, so new fixtures get looked at.
#![allow(clippy::unwrap_used)] // tests unwrap what they control

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use berth_spec::types::*;
use berth_spec::{LoadOptions, Loaded, load};

type Check = fn(&Loaded, &Path);

enum Expect {
    Ok(Check),
    Err(&'static str),
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/compose-corpus")
}

fn names(l: &Loaded) -> Vec<&str> {
    l.stack.services.keys().map(String::as_str).collect()
}

fn svc<'a>(l: &'a Loaded, name: &str) -> &'a Service {
    &l.stack.services[name]
}

fn port(target: u16, published: Option<u16>) -> Port {
    Port {
        target,
        published,
        host_ip: None,
        protocol: "tcp".into(),
        app_protocol: None,
        name: None,
        mode: None,
    }
}

fn warned(l: &Loaded, needle: &str) -> bool {
    l.warnings.iter().any(|w| w.to_string().contains(needle))
}

fn expectations() -> BTreeMap<&'static str, Expect> {
    use Expect::*;
    let mut m: BTreeMap<&'static str, Expect> = BTreeMap::new();
    m.insert(
        "compose-go/cli/testdata/env-file/compose-with-env-file.yaml",
        Ok(|l, _| {
            // COMPOSE_PROJECT_NAME comes from the .env next to the file.
            assert_eq!(l.stack.name, "my_project_from_dot_env");
            assert_eq!(names(l), ["simple"]);
            let s = svc(l, "simple");
            assert_eq!(s.image.as_deref(), Some("nginx"));
            assert_eq!(
                s.environment.get("DEFAULT_PORT"),
                Some(&Some("8080".into()))
            );
            assert_eq!(s.ports, [port(80, Some(8000))]);
            assert!(warned(l, "`version` is obsolete"));
        }),
    );
    m.insert(
        "compose-go/cli/testdata/env-file/compose-with-env-files.yaml",
        Ok(|l, _| {
            let s = svc(l, "simple");
            // Later env files win; ${PORT} is interpolated from .env.
            assert_eq!(
                s.environment.get("DEFAULT_PORT"),
                Some(&Some("9090".into()))
            );
            assert_eq!(s.ports, [port(80, Some(8000))]);
        }),
    );
    m.insert(
        "compose-go/cli/testdata/simple/compose-name.yaml",
        Ok(|l, _| {
            // TEST is unset: an empty string, with a warning (as Compose).
            assert_eq!(l.stack.name, "test--test");
            assert!(warned(l, "variable `TEST` is not set"));
        }),
    );
    m.insert(
        "compose-go/cli/testdata/simple/compose-with-overrides.yaml",
        Ok(|l, _| {
            assert_eq!(l.stack.name, "simple");
            assert_eq!(svc(l, "simple").image.as_deref(), Some("haproxy"));
        }),
    );
    m.insert(
        "compose-go/cli/testdata/simple/compose-with-paths.yaml",
        Ok(|l, dir| {
            let v = &svc(l, "test").volumes;
            assert_eq!(v.len(), 3);
            assert_eq!(v[0].kind, "bind");
            assert_eq!(
                v[1].source.as_deref(),
                Some(dir.join("relative").to_str().unwrap())
            );
            assert_eq!(
                v[2].source.as_deref(),
                Some(dir.join("relative2").to_str().unwrap())
            );
            assert_eq!(v[2].target, "/test-relative2");
        }),
    );
    m.insert(
        "compose-go/cli/testdata/simple/compose-with-variables.yaml",
        Ok(|l, _| {
            assert_eq!(svc(l, "simple").ports, [port(80, Some(8000))]);
        }),
    );
    m.insert(
        "compose-go/cli/testdata/simple/compose.yaml",
        Ok(|l, _| {
            assert_eq!(names(l), ["simple"]);
            assert_eq!(svc(l, "simple").driver(), Driver::Docker);
            assert_eq!(svc(l, "simple").restart, RestartPolicy::No);
            assert_eq!(svc(l, "simple").stop_signal, "SIGTERM");
            assert_eq!(svc(l, "simple").stop_grace_period_ms, 10_000);
            assert_eq!(svc(l, "simple").deploy.replicas, 1);
        }),
    );
    m.insert(
        "compose-go/loader/testdata/combined/compose.yaml",
        Ok(|l, dir| {
            // include → a service that extends a sibling file: the build
            // context stays relative to the file that wrote it.
            assert_eq!(l.stack.name, "combined");
            assert_eq!(
                svc(l, "service").build.as_ref().unwrap().context,
                dir.join("dir")
            );
        }),
    );
    m.insert(
        "compose-go/loader/testdata/combined/dir/extended.yaml",
        Ok(|l, dir| {
            assert_eq!(svc(l, "service").build.as_ref().unwrap().context, dir);
        }),
    );
    m.insert(
        "compose-go/loader/testdata/combined/dir/included.yaml",
        Ok(|l, dir| {
            assert_eq!(svc(l, "service").build.as_ref().unwrap().context, dir);
            assert_eq!(
                svc(l, "service").build.as_ref().unwrap().dockerfile,
                "Dockerfile"
            );
        }),
    );
    m.insert("compose-go/loader/testdata/compose-depends-on-cycle.yaml",
        Err("compose-depends-on-cycle.yaml:6:9: service `service1`, field `depends_on`: dependency cycle: service1 → service2 → service3 → service1"));
    // Despite its name the file has the same cycle and no profiles.
    m.insert(
        "compose-go/loader/testdata/compose-depends-on-profile-no-cycle.yaml",
        Err("dependency cycle: service1 → service2 → service3 → service1"),
    );
    m.insert("compose-go/loader/testdata/compose-depends-on-self.yaml",
        Err("compose-depends-on-self.yaml:6:9: service `service1`, field `depends_on`: service `service1` depends on itself"));
    m.insert(
        "compose-go/loader/testdata/compose-include-cycle.yaml",
        Err("compose-include-cycle.yaml:2:5: field `include`: include cycle:"),
    );
    m.insert(
        "compose-go/loader/testdata/compose-include.yaml",
        Ok(|l, dir| {
            assert_eq!(names(l), ["bar", "imported"]);
            assert_eq!(
                svc(l, "bar").environment.get("FOO"),
                Some(&Some("BAR".into()))
            );
            // env_file relative to the included file, not the includer.
            let imp = svc(l, "imported");
            assert_eq!(imp.environment.get("SOURCE"), Some(&Some("extends".into())));
            assert_eq!(imp.volumes[0].source.as_deref(), Some("/opt/data"));
            assert!(warned(l, "`container_name` is not supported"));
            let _ = dir;
        }),
    );
    m.insert(
        "compose-go/loader/testdata/compose-test-extends-with-context-url-imported.yaml",
        Ok(|l, _| {
            let b = svc(l, "imported-with-https-url").build.as_ref().unwrap();
            assert_eq!(
                b.context,
                PathBuf::from("https://github.com/docker/compose.git")
            );
        }),
    );
    m.insert(
        "compose-go/loader/testdata/compose-test-extends-with-context-url.yaml",
        Ok(|l, _| {
            assert_eq!(l.stack.name, "compose-test-extends-with-context-url");
            let b = svc(l, "importer-with-https-url").build.as_ref().unwrap();
            assert_eq!(
                b.context,
                PathBuf::from("https://github.com/docker/compose.git")
            );
        }),
    );
    m.insert(
        "compose-go/loader/testdata/compose-test-extends.yaml",
        Ok(|l, _| {
            let s = svc(l, "importer");
            assert_eq!(s.image.as_deref(), Some("nginx"));
            assert_eq!(s.environment.get("SOURCE"), Some(&Some("extends".into())));
            assert_eq!(s.volumes[0].target, "/var/lib/mysql");
        }),
    );
    m.insert(
        "compose-go/loader/testdata/compose-test-with-version.yaml",
        Ok(|l, dir| {
            assert_eq!(names(l), ["other", "web"]);
            assert!(warned(l, "`version` is obsolete"));
            assert!(warned(l, "`volumes_from` is not supported"));
            let web = svc(l, "web");
            assert_eq!(web.build.as_ref().unwrap().context, dir.join("Dockerfile"));
            assert!(web.networks.contains_key("front") && web.networks.contains_key("default"));
            let other = svc(l, "other");
            assert_eq!(other.command, Some(Command::Shell("top".into())));
            assert_eq!(other.volumes[0].kind, "volume");
            assert_eq!(other.volumes[0].source, None);
            assert!(l.stack.volumes.contains_key("data"));
        }),
    );
    m.insert(
        "compose-go/loader/testdata/empty.yaml",
        Err("empty.yaml: the file is empty"),
    );
    m.insert(
        "compose-go/loader/testdata/extends/base.yaml",
        Ok(|l, dir| {
            // Service names keep their case (Compose allows uppercase).
            assert_eq!(
                names(l),
                [
                    "another",
                    "base",
                    "nil",
                    "with-build",
                    "with-port",
                    "withUlimits"
                ]
            );
            assert_eq!(l.stack.name, "extends");
            // `extends: base` (same file) brings in the base's image.
            assert_eq!(svc(l, "another").image.as_deref(), Some("base"));
            assert_eq!(svc(l, "another").driver(), Driver::Docker);
            let w = svc(l, "withUlimits");
            assert_eq!(w.name, "withUlimits");
            assert_eq!(w.image.as_deref(), Some("test"));
            let warnings: Vec<(usize, Option<&str>, &str)> = l
                .warnings
                .iter()
                .map(|d| (d.line, d.service.as_deref(), d.message.as_str()))
                .collect();
            let nothing_to_run = "this service has no `command`, `entrypoint`, `image` or `build`: its instances will fail to start";
            assert_eq!(
                warnings,
                [
                    (8, Some("with-port"), nothing_to_run),
                    (14, Some("withUlimits"), "`ulimits` is not supported by berth and is ignored"),
                    (25, Some("nil"), nothing_to_run),
                ]
            );
            // Extended from sibling.yaml: its `build: .` is relative to that file.
            let b = svc(l, "with-build").build.as_ref().unwrap();
            assert_eq!(
                (b.context.as_path(), b.dockerfile.as_str()),
                (dir, "Dockerfile")
            );
            // No image or build: processes, run in the project dir.
            let p = svc(l, "with-port");
            assert_eq!(p.ports, [port(8000, Some(8000))]);
            assert_eq!(p.driver(), Driver::Process);
            assert_eq!(p.working_dir.as_deref(), Some(dir));
            let nil = svc(l, "nil");
            assert_eq!(
                (nil.command.as_ref(), nil.working_dir.as_deref()),
                (None, Some(dir))
            );
        }),
    );
    m.insert(
        "compose-go/loader/testdata/extends/depends_on.yaml",
        Ok(|l, _| {
            assert_eq!(names(l).len(), 5);
            assert!(svc(l, "with_depends_on").depends_on.contains_key("zot"));
            assert!(warned(l, "`ipc` is not supported"));
            assert!(warned(l, "`network_mode` is not supported"));
        }),
    );
    m.insert(
        "compose-go/loader/testdata/extends/interpolated.yaml",
        Ok(|l, _| {
            let v = &svc(l, "foo").volumes[0];
            assert_eq!(
                (v.source.as_deref(), v.target.as_str(), v.read_only),
                (Some("/dev/null"), "/tmp/foo", true)
            );
        }),
    );
    m.insert(
        "compose-go/loader/testdata/extends/nested.yaml",
        Ok(|l, dir| {
            assert_eq!(svc(l, "with-build").build.as_ref().unwrap().context, dir);
        }),
    );
    m.insert(
        "compose-go/loader/testdata/extends/ports.yaml",
        Ok(|l, _| {
            assert_eq!(svc(l, "test").ports, [port(8080, Some(8080))]);
        }),
    );
    m.insert(
        "compose-go/loader/testdata/extends/reset.yaml",
        Ok(|l, _| {
            assert_eq!(
                svc(l, "init").command,
                Some(Command::Shell("sleep infinity".into()))
            );
            // `command: !reset` removes what `extends` brought in.
            assert_eq!(svc(l, "base").command, None);
            assert_eq!(svc(l, "base").image.as_deref(), Some("alpine:latest"));
        }),
    );
    m.insert(
        "compose-go/loader/testdata/extends/sibling.yaml",
        Ok(|l, _| {
            assert_eq!(names(l), ["test"]);
        }),
    );
    m.insert(
        "compose-go/loader/testdata/extends/withdir/compose.yaml",
        Ok(|l, _| {
            assert_eq!(svc(l, "test").image.as_deref(), Some("hello-world"));
        }),
    );
    m.insert(
        "compose-go/loader/testdata/extends/withdir/dir/base.yaml",
        Ok(|l, _| {
            assert_eq!(l.stack.name, "dir");
        }),
    );
    m.insert(
        "compose-go/loader/testdata/extends/withdir/dir/compose.yaml",
        Ok(|l, _| {
            assert_eq!(svc(l, "test").image.as_deref(), Some("hello-world"));
        }),
    );
    m.insert(
        "compose-go/loader/testdata/include/compose.yaml",
        Ok(|l, dir| {
            assert_eq!(names(l), ["included"]);
            assert_eq!(
                svc(l, "included").volumes[0].source.as_deref(),
                Some(dir.to_str().unwrap())
            );
        }),
    );
    m.insert(
        "compose-go/loader/testdata/include/dir/compose.yaml",
        Err("dir/compose.yaml:12:9: service `service`, field `env_file`: env file"),
    );
    m.insert(
        "compose-go/loader/testdata/include/included.yaml",
        Ok(|l, _| {
            assert_eq!(names(l), ["included"]);
        }),
    );
    m.insert(
        "compose-go/loader/testdata/include/project-directory.yaml",
        Ok(|l, dir| {
            // Relative paths of the included file resolve against its
            // project_directory (../subdir), where extra.env exists.
            let s = svc(l, "service");
            assert_eq!(s.environment.get("SOURCE"), Some(&Some("extends".into())));
            let sub = dir.parent().unwrap().join("subdir");
            assert_eq!(
                s.volumes[0].source.as_deref(),
                Some(
                    sub.join("compose-test-extends-imported.yaml")
                        .to_str()
                        .unwrap()
                )
            );
            assert!(warned(l, "`dockerfile_inline` is not supported"));
        }),
    );
    m.insert(
        "compose-go/loader/testdata/remote/compose.yaml",
        Ok(|l, dir| {
            let s = svc(l, "foo");
            assert_eq!(s.environment.get("FOO"), Some(&Some("BAR".into())));
            assert_eq!(s.volumes[0].source.as_deref(), Some(dir.to_str().unwrap()));
        }),
    );
    m.insert("compose-go/loader/testdata/remote/cycle/compose-cycle.yaml", Err("compose-cycle.yaml:4:13: service `bar`, field `extends.file`: remote extends are not supported"));
    m.insert("compose-go/loader/testdata/remote/cycle/compose.yaml", Err("cycle/compose.yaml:4:13: service `foo`, field `extends.file`: remote extends are not supported"));
    m.insert(
        "compose-go/loader/testdata/remote/nested/compose-nested.yaml",
        Ok(|l, _| {
            assert_eq!(svc(l, "bar").image.as_deref(), Some("bar"));
        }),
    );
    m.insert("compose-go/loader/testdata/remote/nested/compose.yaml", Err("nested/compose.yaml:4:13: service `foo`, field `extends.file`: remote extends are not supported"));
    m.insert(
        "compose-go/loader/testdata/subdir/compose-test-extends-imported.yaml",
        Ok(|l, _| {
            assert_eq!(
                svc(l, "imported").environment.get("SOURCE"),
                Some(&Some("extends".into()))
            );
        }),
    );
    m.insert(
        "example-voting-app/docker-compose.images.yml",
        Ok(|l, _| {
            assert_eq!(l.stack.name, "example-voting-app");
            assert!(names(l).contains(&"vote") && names(l).contains(&"worker"));
        }),
    );
    m.insert(
        "example-voting-app/docker-compose.yml",
        Ok(|l, dir| {
            // `seed` has a profile that is not enabled.
            assert_eq!(names(l), ["db", "redis", "result", "vote", "worker"]);
            let vote = svc(l, "vote");
            let b = vote.build.as_ref().unwrap();
            assert_eq!(
                (b.context.clone(), b.target.as_deref()),
                (dir.join("vote"), Some("dev"))
            );
            assert_eq!(
                vote.depends_on["redis"].condition,
                DependencyCondition::ServiceHealthy
            );
            let hc = vote.healthcheck.as_ref().unwrap();
            assert_eq!(
                hc.test,
                HealthTest::Exec {
                    argv: vec!["curl".into(), "-f".into(), "http://localhost".into()]
                }
            );
            assert_eq!(
                (
                    hc.interval_ms,
                    hc.timeout_ms,
                    hc.retries,
                    hc.start_period_ms
                ),
                (15_000, 5_000, 3, 10_000)
            );
            assert_eq!(vote.ports, [port(80, Some(8080))]);
            let result = svc(l, "result");
            assert_eq!(
                result.entrypoint,
                Some(Command::Shell("nodemon --inspect=0.0.0.0 server.js".into()))
            );
            assert_eq!(result.ports[1].host_ip.as_deref(), Some("127.0.0.1"));
            let db = svc(l, "db");
            assert_eq!(db.environment["POSTGRES_USER"].as_deref(), Some("postgres"));
            assert_eq!(db.volumes[0].kind, "volume");
            assert_eq!(
                db.healthcheck.as_ref().unwrap().test,
                HealthTest::Shell {
                    command: "/healthchecks/postgres.sh".into()
                }
            );
            assert_eq!(db.healthcheck.as_ref().unwrap().interval_ms, 5_000);
            assert_eq!(svc(l, "worker").depends_on.len(), 2);
            assert_eq!(l.stack.networks.len(), 2);
        }),
    );
    m.insert(
        "example-voting-app/docker-stack.yml",
        Ok(|l, _| {
            assert_eq!(svc(l, "vote").deploy.replicas, 2);
            assert_eq!(svc(l, "worker").deploy.replicas, 2);
            assert_eq!(svc(l, "result").deploy.replicas, 1);
            assert!(warned(l, "`version` is obsolete"));
        }),
    );
    m
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            collect(&p, out);
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(p);
        }
    }
}

#[test]
fn every_corpus_file_has_the_expected_outcome() {
    let root = corpus_dir();
    assert!(
        root.join("compose-go").is_dir() && root.join("example-voting-app").is_dir(),
        "the Compose corpus is missing: expected it at {} (the repo's sibling shared/compose-corpus)",
        root.display()
    );
    let root = root.canonicalize().unwrap();
    let mut files = Vec::new();
    collect(&root.join("compose-go"), &mut files);
    collect(&root.join("example-voting-app"), &mut files);
    files.sort();
    let expect = expectations();
    let mut failures = Vec::new();
    let mut seen = 0;
    for file in &files {
        let rel = file
            .strip_prefix(&root)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let Some(e) = expect.get(rel.as_str()) else {
            failures.push(format!(
                "{rel}: no expectation written for this corpus file"
            ));
            continue;
        };
        seen += 1;
        let opts = LoadOptions {
            files: vec![file.clone()],
            working_dir: root.clone(),
            ..Default::default()
        };
        let outcome = std::panic::catch_unwind(|| load(&opts));
        let dir = file.parent().unwrap();
        match (outcome, e) {
            (Err(_), _) => failures.push(format!("{rel}: the loader panicked")),
            (Ok(Ok(l)), Expect::Ok(check)) => {
                if std::panic::catch_unwind(|| check(&l, dir)).is_err() {
                    failures.push(format!(
                        "{rel}: resolved stack differs from the expectation: {l:#?}"
                    ));
                }
            }
            (Ok(Ok(_)), Expect::Err(msg)) => {
                failures.push(format!("{rel}: loaded, expected error containing {msg:?}"))
            }
            (Ok(Err(err)), Expect::Ok(_)) => {
                failures.push(format!("{rel}: unexpected error: {err}"))
            }
            (Ok(Err(err)), Expect::Err(msg)) => {
                if !err.to_string().contains(msg) {
                    failures.push(format!("{rel}: error {err:?} does not contain {msg:?}"));
                }
            }
        }
    }
    assert!(
        seen == expect.len() || !failures.is_empty(),
        "expectations name files that are not in the corpus"
    );
    for k in expect.keys() {
        if !files
            .iter()
            .any(|f| f.strip_prefix(&root).unwrap().to_str() == Some(k))
        {
            failures.push(format!("{k}: expected in the corpus but not found"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
