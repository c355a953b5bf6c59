//! The loader on small stack files: results, and each error kind at its
//! exact file:line:column.
#![allow(clippy::unwrap_used)] // tests unwrap what they control

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use berth_spec::types::*;
use berth_spec::{LoadOptions, Loaded, find_stack_file, load, load_str};

fn opts(dir: &Path) -> LoadOptions {
    LoadOptions {
        working_dir: dir.to_path_buf(),
        ..Default::default()
    }
}

fn ok(yaml: &str) -> Loaded {
    let dir = tempfile::tempdir().unwrap();
    match load_str(&dir.path().join("compose.yaml"), yaml, &opts(dir.path())) {
        Ok(l) => l,
        Err(e) => panic!("unexpected error:\n{e}"),
    }
}

/// The errors, one per line, with the temp dir stripped.
fn err_with(yaml: &str, o: impl FnOnce(&mut LoadOptions)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut op = opts(dir.path());
    o(&mut op);
    match load_str(&dir.path().join("compose.yaml"), yaml, &op) {
        Ok(l) => panic!("expected an error, got {:#?}", l.stack),
        Err(e) => e
            .to_string()
            .replace(&format!("{}/", dir.path().display()), ""),
    }
}

fn err(yaml: &str) -> String {
    err_with(yaml, |_| {})
}

#[test]
fn error_display_format() {
    let e = err(
        "services:\n  web:\n    command: x\n    healthcheck:\n      test: x\n      interval: 5x\n",
    );
    assert_eq!(
        e,
        "compose.yaml:6:17: service `web`, field `healthcheck.interval`: invalid duration \"5x\" (hint: use a Compose duration like 5s, 1m30s, 250ms)"
    );
}

#[test]
fn yaml_syntax_error_has_position() {
    let e = err("services:\n  web:\n    command: x\n   image: y\n");
    assert!(e.starts_with("compose.yaml:4:"), "{e}");
    assert!(e.contains("invalid YAML"), "{e}");
    let e = err("services:\n  web: [\n");
    assert!(
        e.starts_with("compose.yaml:3:") && e.contains("invalid YAML"),
        "{e}"
    );
}

#[test]
fn unknown_key_with_suggestion() {
    let e = err("services:\n  web:\n    comand: x\n");
    assert_eq!(
        e,
        "compose.yaml:3:5: service `web`, field `comand`: unknown key `comand` (hint: did you mean `command`?)"
    );
    let e = err("servics:\n  web: {}\n");
    assert!(e.contains("compose.yaml:1:1: field `servics`: unknown key `servics` (hint: did you mean `services`?)"), "{e}");
    let e = err(
        "services:\n  web:\n    command: x\n    healthcheck:\n      test: x\n      intervl: 5s\n",
    );
    assert!(
        e.contains("compose.yaml:6:7: service `web`, field `healthcheck.intervl`: unknown key"),
        "{e}"
    );
    assert!(e.contains("did you mean `interval`?"), "{e}");
}

#[test]
fn unsupported_key_warns() {
    let l = ok(
        "services:\n  web:\n    command: x\n    privileged: true\n    devices: [/dev/x]\n    x-note: hi\n",
    );
    let w: Vec<String> = l
        .warnings
        .iter()
        .map(|w| format!("{}:{} {}", w.line, w.column, w.message))
        .collect();
    assert_eq!(
        w,
        [
            "4:5 `privileged` is not supported by berth and is ignored",
            "5:5 `devices` is not supported by berth and is ignored"
        ]
    );
    assert_eq!(
        l.stack.services["web"].extensions["x-note"],
        serde_json::json!("hi")
    );
}

#[test]
fn container_keys_warn_on_processes() {
    let l = ok(
        "services:\n  web:\n    command: x\n    user: nobody\n    volumes: [./data:/data]\n    labels: {a: b}\n  db:\n    image: postgres\n    user: nobody\n    volumes: [./pg:/var/lib/postgresql/data]\n",
    );
    let w: Vec<String> = l.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w[0].ends_with("compose.yaml:4:5: service `web`, field `user`: `user` only applies to containers; this service runs as a process (no `image` or `build`), so it is ignored (hint: remove it, or give the service an `image:` to run it on the Docker driver)"),
        "{w:?}"
    );
    assert!(
        w[1].contains(
            "compose.yaml:5:5: service `web`, field `volumes`: `volumes` only applies to containers"
        ),
        "{w:?}"
    );
    // Still resolved, for `berth config` and the Docker driver later.
    assert_eq!(l.stack.services["web"].user.as_deref(), Some("nobody"));
    assert_eq!(l.stack.services["web"].volumes.len(), 1);
}

#[test]
fn a_missing_included_or_extended_file_says_where_it_was_named_and_how_to_fix_it() {
    let e = err("include:\n  - nope.yaml\nservices:\n  web: {command: x}\n");
    assert_eq!(
        e,
        "compose.yaml:2:5: cannot read stack file `nope.yaml`: No such file or directory (os error 2) (hint: fix the path: a relative one is relative to the folder of the file that names it)"
    );
    let e = err("services:\n  web:\n    extends: {file: base.yaml, service: b}\n");
    assert_eq!(
        e,
        "compose.yaml:3:21: service `web`, field `extends.file`: `base.yaml` does not exist (hint: fix the path: a relative one is relative to the folder of the file that names it)"
    );
}

#[test]
fn an_unsupported_key_with_a_supported_equivalent_names_it() {
    let l = ok("services:\n  web:\n    command: x\n    mem_limit: 512m\n");
    let w: Vec<String> = l.warnings.iter().map(ToString::to_string).collect();
    assert!(
        w.iter().any(|w| w.contains("`mem_limit` is not supported")
            && w.contains("(hint: use `deploy.resources.limits.memory`")),
        "{w:?}"
    );
}

#[test]
fn an_environment_entry_without_a_name_is_an_error() {
    let e = err("services:\n  web:\n    command: x\n    environment:\n      - =foo\n");
    assert_eq!(
        e,
        "compose.yaml:5:9: service `web`, field `environment`: entry \"=foo\" has no name before `=` (hint: write KEY=VALUE, or KEY alone to take its value from the environment)"
    );
    let e = err("services:\n  web:\n    command: x\n    labels: {\"\": x}\n");
    assert!(
        e.starts_with("compose.yaml:4:14: service `web`, field `labels`: a key is empty"),
        "{e}"
    );
}

#[test]
fn wrong_types() {
    let e = err("services:\n  web:\n    command: x\n    deploy:\n      replicas: many\n");
    assert_eq!(
        e,
        "compose.yaml:5:17: service `web`, field `deploy.replicas`: expected a whole number, found `many`"
    );
    let e = err("services:\n  web:\n    command: x\n    deploy: {replicas: -1}\n");
    assert_eq!(
        e,
        "compose.yaml:4:24: service `web`, field `deploy.replicas`: expected a whole number, found `-1` (it cannot be negative)"
    );
    let e = err("services:\n  web:\n    command: x\n    deploy: {replicas: 99999999999}\n");
    assert_eq!(
        e,
        "compose.yaml:4:24: service `web`, field `deploy.replicas`: expected a whole number, found `99999999999` (too large)"
    );
    let e = err("services:\n  web:\n    command: x\n    ports: 80\n");
    assert_eq!(
        e,
        "compose.yaml:4:12: service `web`, field `ports`: expected a list of ports, found a number"
    );
    let e = err("services:\n  web: [a]\n");
    assert!(
        e.starts_with("compose.yaml:2:8: service `web`: a service must be a mapping, found a list"),
        "{e}"
    );
}

#[test]
fn missing_required_variable() {
    let e = err("services:\n  web:\n    command: run ${DB_URL:?database URL needed}\n");
    assert!(
        e.starts_with("compose.yaml:3:14: service `web`, field `command`: required variable `DB_URL` is missing a value: database URL needed"),
        "{e}"
    );
    let l = {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path());
        o.env.insert("DB_URL".into(), "pg://x".into());
        load_str(
            &dir.path().join("compose.yaml"),
            "services:\n  web:\n    command: run ${DB_URL:?x}\n",
            &o,
        )
        .unwrap()
    };
    assert_eq!(
        l.stack.services["web"].command,
        Some(Command::Shell("run pg://x".into()))
    );
}

#[test]
fn dependency_errors() {
    let e = err(
        "services:\n  a:\n    command: x\n    depends_on: [b]\n  b:\n    command: x\n    depends_on:\n      c: {condition: service_healthy}\n  c:\n    command: x\n    depends_on: [a]\n",
    );
    assert_eq!(
        e,
        "compose.yaml:4:18: service `a`, field `depends_on`: dependency cycle: a → b → c → a (hint: remove one of these depends_on entries)"
    );
    let e = err("services:\n  a:\n    command: x\n    depends_on: [a]\n");
    assert!(
        e.starts_with(
            "compose.yaml:4:18: service `a`, field `depends_on`: service `a` depends on itself"
        ),
        "{e}"
    );
    let e =
        err("services:\n  web:\n    command: x\n    depends_on: [dbb]\n  db:\n    command: x\n");
    assert_eq!(
        e,
        "compose.yaml:4:18: service `web`, field `depends_on`: depends on undefined service `dbb` (hint: did you mean `db`?)"
    );
    let e = err(
        "services:\n  web:\n    command: x\n    depends_on:\n      db:\n        condition: service_ready\n  db:\n    command: x\n",
    );
    assert!(
        e.starts_with(
            "compose.yaml:6:20: service `web`, field `depends_on.db.condition`: invalid condition"
        ),
        "{e}"
    );
}

#[test]
fn profiles() {
    let y = "services:\n  web:\n    command: x\n    depends_on:\n      dbg: {condition: service_started, required: false}\n  dbg:\n    command: x\n    profiles: [debug]\n";
    let l = ok(y);
    assert_eq!(l.stack.services.keys().collect::<Vec<_>>(), ["web"]);
    assert!(l.stack.services["web"].depends_on.is_empty());
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.profiles = vec!["debug".into()];
    let l = load_str(&dir.path().join("compose.yaml"), y, &o).unwrap();
    assert_eq!(l.stack.services.len(), 2);
    let e = err(
        "services:\n  web:\n    command: x\n    depends_on: [dbg]\n  dbg:\n    command: x\n    profiles: [debug]\n",
    );
    assert!(e.contains("compose.yaml:4:18: service `web`, field `depends_on`: depends on `dbg`, whose profiles are not enabled"), "{e}");
    let l = {
        let mut o = opts(dir.path());
        o.env.insert("COMPOSE_PROFILES".into(), "debug".into());
        load_str(&dir.path().join("compose.yaml"), y, &o).unwrap()
    };
    assert_eq!(l.stack.services.len(), 2);
}

#[test]
fn full_service() {
    let l = ok(r#"
name: shop
x-base: &base
  restart: on-failure:5
  labels: [tier=web]
services:
  web:
    <<: *base
    command: ["python", "-m", "http.server"]
    entrypoint: /bin/sh -c
    working_dir: app
    environment:
      - A=1
      - FROM_ENV
      - LATER
    ports:
      - target: 5000
        published: "8080"
        host_ip: 127.0.0.1
        protocol: tcp
        app_protocol: http
        name: web
        mode: host
    healthcheck:
      test: ["CMD-SHELL", "curl -f localhost"]
      start_interval: 1s
    stop_signal: "15"
    stop_grace_period: 1m
    scale: 2
    deploy:
      resources:
        limits: {cpus: 0.25, memory: 1g, pids: 100}
        reservations: {cpus: "0.5", memory: 100k}
      update_config: {parallelism: 2, delay: 10s, order: start-first, failure_action: pause, monitor: 30s, max_failure_ratio: 0.1}
      placement:
        constraints: [node.labels.zone == east]
        preferences: [{spread: node.labels.rack}]
        max_replicas_per_node: 1
      labels: {a: b}
    x-berth:
      routes: [shop.localhost/api]
      port_env: HTTP_PORT
"#);
    let s = &l.stack.services["web"];
    assert_eq!(l.stack.name, "shop");
    assert_eq!(
        s.restart,
        RestartPolicy::OnFailure {
            max_attempts: Some(5)
        }
    );
    assert_eq!(s.labels["tier"], "web");
    assert_eq!(
        s.command,
        Some(Command::Exec(vec![
            "python".into(),
            "-m".into(),
            "http.server".into()
        ]))
    );
    assert_eq!(s.entrypoint, Some(Command::Shell("/bin/sh -c".into())));
    assert_eq!(s.working_dir, Some(l.stack.project_dir.join("app")));
    assert_eq!(s.environment["A"].as_deref(), Some("1"));
    assert_eq!(s.environment["FROM_ENV"], None);
    let p = &s.ports[0];
    assert_eq!(
        (
            p.target,
            p.published,
            p.host_ip.as_deref(),
            p.app_protocol.as_deref(),
            p.name.as_deref(),
            p.mode.as_deref()
        ),
        (
            5000,
            Some(8080),
            Some("127.0.0.1"),
            Some("http"),
            Some("web"),
            Some("host")
        )
    );
    let hc = s.healthcheck.as_ref().unwrap();
    assert_eq!(
        hc.test,
        HealthTest::Shell {
            command: "curl -f localhost".into()
        }
    );
    assert_eq!(
        (
            hc.interval_ms,
            hc.timeout_ms,
            hc.retries,
            hc.start_period_ms,
            hc.start_interval_ms
        ),
        (30_000, 30_000, 3, 0, 1_000)
    );
    assert_eq!(s.stop_signal, "SIGTERM");
    assert_eq!(s.stop_grace_period_ms, 60_000);
    assert_eq!(s.deploy.replicas, 2);
    assert_eq!(
        s.deploy.resources.limits,
        ResourceSpec {
            cpus: Some(0.25),
            memory_bytes: Some(1 << 30),
            pids: Some(100)
        }
    );
    assert_eq!(s.deploy.resources.reservations.cpus, Some(0.5));
    let u = s.deploy.update_config.as_ref().unwrap();
    assert_eq!(
        (
            u.parallelism,
            u.delay_ms,
            u.order.as_deref(),
            u.failure_action.as_str(),
            u.monitor_ms
        ),
        (2, 10_000, Some("start-first"), "pause", 30_000)
    );
    assert_eq!(s.deploy.placement.preferences, ["node.labels.rack"]);
    assert_eq!(s.deploy.placement.max_replicas_per_node, Some(1));
    assert_eq!(s.berth.routes, ["shop.localhost/api"]);
    assert_eq!(s.berth.port_env.as_deref(), Some("HTTP_PORT"));
    assert!(l.stack.extensions.contains_key("x-base"));
}

#[test]
fn port_mode() {
    let l = ok(
        "services:\n  a:\n    command: x\n    ports: [{target: 80, mode: ingress}, {target: 81}, \"82\"]\n",
    );
    let modes: Vec<Option<&str>> = l.stack.services["a"]
        .ports
        .iter()
        .map(|p| p.mode.as_deref())
        .collect();
    assert_eq!(modes, [Some("ingress"), None, None]);
    // Kept in the resolved YAML only when given.
    let out = berth_spec::to_yaml(&l.stack);
    assert_eq!(out.matches("mode: ingress").count(), 1, "{out}");
    let e =
        err("services:\n  a:\n    command: x\n    ports:\n      - {target: 80, mode: bridge}\n");
    assert!(
        e.starts_with("compose.yaml:5:28: service `a`, field `ports.mode`: invalid port mode \"bridge\" (hint: use host or ingress)"),
        "{e}"
    );
}

#[test]
fn port_host_ip_must_be_an_address() {
    let l = ok(
        "services:\n  a:\n    command: x\n    ports: [\"0.0.0.0:80:80\", \"[::1]:81:81\", {target: 82, published: 82, host_ip: 127.0.0.1}]\n",
    );
    let ips: Vec<Option<&str>> = l.stack.services["a"]
        .ports
        .iter()
        .map(|p| p.host_ip.as_deref())
        .collect();
    assert_eq!(ips, [Some("0.0.0.0"), Some("::1"), Some("127.0.0.1")]);
    let e = err(
        "services:\n  a:\n    command: x\n    ports:\n      - localhost:80:80\n      - {target: 81, host_ip: myhost}\n",
    );
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(lines.len(), 2, "{e}");
    assert_eq!(
        lines[0],
        "compose.yaml:5:9: service `a`, field `ports`: invalid host IP \"localhost\": expected an IPv4 or IPv6 address (hint: write 127.0.0.1 (this machine only) or 0.0.0.0 (every interface))"
    );
    assert!(
        lines[1].starts_with(
            "compose.yaml:6:31: service `a`, field `ports`: invalid host IP \"myhost\""
        ),
        "{e}"
    );
}

#[test]
fn nothing_to_run_and_env_file_format_warn() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "a.env", "A=1\n");
    let l = load_str(
        &d.join("compose.yaml"),
        "services:\n  idle: {}\n  a:\n    command: x\n    env_file: [{path: a.env, format: raw}]\n",
        &opts(d),
    )
    .unwrap();
    let w: Vec<String> = l
        .warnings
        .iter()
        .map(|w| format!("{}:{} {}", w.line, w.column, w.message))
        .collect();
    assert_eq!(
        w,
        [
            "2:3 this service has no `command`, `entrypoint`, `image` or `build`: its instances will fail to start",
            "5:30 `format` is not supported by berth and is ignored",
        ]
    );
    assert_eq!(l.stack.services["a"].environment["A"].as_deref(), Some("1"));
}

#[test]
fn restart_policy_from_deploy_wins() {
    let l = ok(
        "services:\n  w:\n    command: x\n    restart: always\n    deploy:\n      restart_policy: {condition: on-failure, max_attempts: 3}\n",
    );
    assert_eq!(
        l.stack.services["w"].restart,
        RestartPolicy::OnFailure {
            max_attempts: Some(3)
        }
    );
    let l = ok(
        "services:\n  w:\n    command: x\n    deploy:\n      restart_policy: {condition: none}\n",
    );
    assert_eq!(l.stack.services["w"].restart, RestartPolicy::No);
    let e = err("services:\n  w:\n    command: x\n    restart: sometimes\n");
    assert!(
        e.starts_with("compose.yaml:4:14: service `w`, field `restart`: invalid restart policy"),
        "{e}"
    );
}

#[test]
fn healthcheck_variants() {
    let l = ok(
        "services:\n  a:\n    command: x\n    healthcheck: {test: [NONE]}\n  b:\n    command: x\n    healthcheck: {test: x, disable: true}\n",
    );
    assert!(l.stack.services.values().all(|s| s.healthcheck.is_none()));
    let l = ok(
        "services:\n  a:\n    command: x\n    x-berth:\n      healthcheck: {http: /healthz, port: 8080, interval: 1s}\n  b:\n    command: x\n    x-berth: {healthcheck: {tcp: true}}\n",
    );
    let a = l.stack.services["a"].healthcheck.as_ref().unwrap();
    assert_eq!(
        a.test,
        HealthTest::Http {
            port: Some(8080),
            path: "/healthz".into()
        }
    );
    assert_eq!(a.interval_ms, 1_000);
    assert_eq!(
        l.stack.services["b"].healthcheck.as_ref().unwrap().test,
        HealthTest::Tcp { port: None }
    );
    let e = err(
        "services:\n  a:\n    command: x\n    healthcheck: {test: x}\n    x-berth:\n      healthcheck: {http: /}\n",
    );
    assert!(e.contains("compose.yaml:6:20: service `a`, field `x-berth.healthcheck`: both `healthcheck` and `x-berth.healthcheck` are set"), "{e}");
    let e = err("services:\n  a:\n    command: x\n    x-berth:\n      route: [a]\n");
    assert!(e.contains("compose.yaml:5:7: service `a`, field `x-berth.route`: unknown key `route` (hint: did you mean `routes`?)"), "{e}");
    let e = err("services:\n  a:\n    command: x\n    healthcheck: {test: [CURL, x]}\n");
    assert!(
        e.contains("compose.yaml:4:25: service `a`, field `healthcheck.test`"),
        "{e}"
    );
}

#[test]
fn names_are_validated() {
    // Compose's rule: uppercase is fine, and the name keeps its case.
    let l = ok(
        "services:\n  WebApp:\n    command: x\n  worker:\n    command: x\n    depends_on: [WebApp]\n",
    );
    assert_eq!(
        l.stack.services.keys().collect::<Vec<_>>(),
        ["WebApp", "worker"]
    );
    assert_eq!(l.stack.services["WebApp"].name, "WebApp");
    assert!(l.stack.services["worker"].depends_on.contains_key("WebApp"));
    let e = err("services:\n  _web:\n    command: x\n");
    assert!(
        e.starts_with("compose.yaml:2:3: service `_web`: invalid service name `_web` (hint: use letters, digits, `_`, `.` and `-`, starting with a letter or digit (e.g. `web`))"),
        "{e}"
    );
    let e = err("services:\n  My App:\n    command: x\n");
    assert!(
        e.starts_with("compose.yaml:2:3: service `My App`: invalid service name `My App` (hint: use letters, digits, `_`, `.` and `-`, starting with a letter or digit (e.g. `My-App`))"),
        "{e}"
    );
    // Names become DNS labels: at most 63 characters.
    let long = "a".repeat(64);
    ok(&format!("services:\n  {}:\n    command: x\n", &long[..63]));
    let e = err(&format!("services:\n  {long}:\n    command: x\n"));
    assert!(
        e.starts_with(&format!("compose.yaml:2:3: service `{long}`: invalid service name `{long}` (hint: service names are at most 63 characters long)")),
        "{e}"
    );
    let e = err_with("services:\n  web:\n    command: x\n", |o| {
        o.project_name = Some(long.clone())
    });
    assert!(
        e.contains(&format!("invalid stack name `{long}` (from -p)")),
        "{e}"
    );
    let e = err("name: MyApp\nservices:\n  web:\n    command: x\n");
    assert!(
        e.starts_with("compose.yaml:1:7: field `name`: invalid stack name `MyApp`"),
        "{e}"
    );
    let e = err("name: My App\nservices:\n  web:\n    command: x\n");
    assert!(
        e.starts_with("compose.yaml:1:7: field `name`: invalid stack name `My App`"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("My_Cool.App");
    std::fs::create_dir(&folder).unwrap();
    let l = load_str(
        &folder.join("compose.yaml"),
        "services:\n  web:\n    command: x\n",
        &opts(&folder),
    )
    .unwrap();
    assert_eq!(l.stack.name, "my_coolapp");
    let mut o = opts(&folder);
    o.project_name = Some("other".into());
    let l = load_str(
        &folder.join("compose.yaml"),
        "name: mine\nservices:\n  web:\n    command: x\n",
        &o,
    )
    .unwrap();
    assert_eq!(l.stack.name, "other");
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn env_files_and_dotenv() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        ".env",
        "# comment\nTAG=1.2\nexport GREETING=\"hello\\nworld\"\nSHADOWED=fromdotenv\n",
    );
    write(
        d,
        "app.env",
        "A=1\nB='lit ${X}'\nC=plain # trailing comment\nexport D=4\n",
    );
    write(
        d,
        "compose.yaml",
        "services:\n  web:\n    image: app:${TAG}\n    env_file: [app.env, {path: missing.env, required: false}]\n    environment:\n      A: override\n      G: ${GREETING}\n      S: ${SHADOWED}\n",
    );
    let mut o = opts(d);
    o.env.insert("SHADOWED".into(), "fromenv".into());
    let l = load(&o).unwrap();
    let s = &l.stack.services["web"];
    assert_eq!(s.image.as_deref(), Some("app:1.2"));
    let env: BTreeMap<&str, Option<&str>> = s
        .environment
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_deref()))
        .collect();
    assert_eq!(env["A"], Some("override"));
    assert_eq!(env["B"], Some("lit ${X}"));
    assert_eq!(env["C"], Some("plain"));
    assert_eq!(env["D"], Some("4"));
    assert_eq!(env["G"], Some("hello\nworld"));
    assert_eq!(env["S"], Some("fromenv"));
    assert!(l.files.iter().any(|f| f.ends_with("app.env")));
    write(d, "bad.env", "OK=1\nNOT A KEY=2\n");
    write(
        d,
        "compose.yaml",
        "services:\n  web:\n    command: x\n    env_file: bad.env\n",
    );
    let e = load(&o).unwrap_err().to_string();
    assert!(
        e.contains("bad.env:2:1: service `web`: invalid variable name `NOT A KEY`"),
        "{e}"
    );
}

#[test]
fn env_file_values_are_interpolated() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, ".env", "HOST=db.local\nLITERAL='$NOT_A_VAR'\n");
    write(
        d,
        "app.env",
        concat!(
            "BASE=postgres://${HOST}:5432\n",
            "URL=${BASE}/app\n",
            "GREETING=\"hi ${USER_NAME}\\n\"\n",
            "RAW='${HOST}'\n",
            "PRICE=\"\\$5 or $$6\"\n",
            "DEF=${NOPE:-fallback}\n",
            "NAME=fromfile\n",
            "SEEN=${NAME}\n",
            "EMPTY=x${UNSET_ONE}y\n",
            "USER_NAME\n",
        ),
    );
    write(
        d,
        "compose.yaml",
        "services:\n  web:\n    command: x\n    env_file: app.env\n    environment:\n      L: ${LITERAL}\n",
    );
    let mut o = opts(d);
    o.env.insert("USER_NAME".into(), "ada".into());
    o.env.insert("NAME".into(), "fromenv".into());
    let l = load(&o).unwrap();
    let env: BTreeMap<&str, Option<&str>> = l.stack.services["web"]
        .environment
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_deref()))
        .collect();
    assert_eq!(env["BASE"], Some("postgres://db.local:5432"));
    // Entries above in the same file are visible.
    assert_eq!(env["URL"], Some("postgres://db.local:5432/app"));
    assert_eq!(env["GREETING"], Some("hi ada\n"));
    // Single quotes are literal, in env files and in `.env`.
    assert_eq!(env["RAW"], Some("${HOST}"));
    assert_eq!(env["L"], Some("$NOT_A_VAR"));
    assert_eq!(env["PRICE"], Some("$5 or $6"));
    assert_eq!(env["DEF"], Some("fallback"));
    // The loader's environment wins over the file's own entries for
    // lookups (Compose's order); the entry itself keeps its value.
    assert_eq!(env["NAME"], Some("fromfile"));
    assert_eq!(env["SEEN"], Some("fromenv"));
    assert_eq!(env["USER_NAME"], Some("ada"));
    assert_eq!(env["EMPTY"], Some("xy"));
    let w: Vec<String> = l.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].ends_with("app.env:9:7: service `web`: variable `UNSET_ONE` is not set; using an empty string (hint: set `UNSET_ONE` in the environment, in the `.env` file or above this line, or give a default with `${UNSET_ONE:-default}`)"),
        "{w:?}"
    );

    write(d, "app.env", "OK=1\n  X = ${REQ:?needs REQ}\nY=$5\n");
    let e = load(&o).unwrap_err().to_string();
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(lines.len(), 2, "{e}");
    assert!(
        lines[0].ends_with("app.env:2:7: service `web`: required variable `REQ` is missing a value: needs REQ (hint: set `REQ` in the environment, in the `.env` file or above this line)"),
        "{e}"
    );
    assert!(
        lines[1].contains("app.env:3:3: service `web`: invalid interpolation `$5`"),
        "{e}"
    );
}

#[test]
fn extends_and_include() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        "common/base.yaml",
        "services:\n  base:\n    command: run\n    environment: [A=1, B=2]\n    ports: [\"80\"]\n    volumes: [./data:/data]\n",
    );
    write(
        d,
        "lib/compose.yaml",
        "services:\n  lib:\n    command: lib\n",
    );
    write(
        d,
        "compose.yaml",
        "include:\n  - lib/compose.yaml\nservices:\n  web:\n    extends: {file: common/base.yaml, service: base}\n    environment: {B: 3}\n    ports: [\"81\"]\n    command: [run, fast]\n  worker:\n    extends: web\n",
    );
    let l = load(&opts(d)).unwrap();
    let web = &l.stack.services["web"];
    assert_eq!(web.environment["A"].as_deref(), Some("1"));
    assert_eq!(web.environment["B"].as_deref(), Some("3"));
    assert_eq!(
        web.ports.iter().map(|p| p.target).collect::<Vec<_>>(),
        [80, 81]
    );
    assert_eq!(
        web.command,
        Some(Command::Exec(vec!["run".into(), "fast".into()]))
    );
    // Relative paths stay relative to the file that wrote them.
    assert_eq!(
        web.volumes[0].source.as_deref(),
        Some(d.join("common/data").to_str().unwrap())
    );
    assert_eq!(l.stack.services["worker"].ports.len(), 2);
    assert!(l.stack.services.contains_key("lib"));

    write(
        d,
        "compose.yaml",
        "services:\n  a:\n    extends: b\n  b:\n    extends: a\n",
    );
    let e = load(&opts(d)).unwrap_err().to_string();
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.contains("compose.yaml:5:14: service `b`, field `extends`: `extends` cycle: a → b → a"),
        "{e}"
    );

    write(
        d,
        "compose.yaml",
        "include: [lib/compose.yaml]\nservices:\n  lib:\n    command: x\n",
    );
    let e = load(&opts(d)).unwrap_err().to_string();
    assert!(
        e.contains(
            "compose.yaml:3:3: service `lib`: service `lib` is also defined by the included file"
        ),
        "{e}"
    );

    write(
        d,
        "compose.yaml",
        "include:\n  - https://example.com/compose.yaml\nservices:\n  a:\n    command: x\n",
    );
    let e = load(&opts(d)).unwrap_err().to_string();
    assert!(
        e.contains("compose.yaml:2:5: field `include`: remote includes are not supported"),
        "{e}"
    );
}

#[test]
fn several_files_merge() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        "compose.yaml",
        "services:\n  web:\n    command: a\n    environment: [A=1]\n    ports: [\"80\"]\n    labels: {x: y}\n",
    );
    write(
        d,
        "override.yaml",
        "services:\n  web:\n    command: b\n    environment: {B: 2}\n    ports: [\"81\", \"80\"]\n    labels: !reset {}\n  extra:\n    command: c\n",
    );
    let mut o = opts(d);
    o.files = vec!["compose.yaml".into(), "override.yaml".into()];
    let l = load(&o).unwrap();
    let web = &l.stack.services["web"];
    assert_eq!(web.command, Some(Command::Shell("b".into())));
    assert_eq!(web.environment.len(), 2);
    assert_eq!(web.ports.len(), 2);
    assert!(web.labels.is_empty());
    assert!(l.stack.services.contains_key("extra"));
}

#[test]
fn procfile() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("myapp");
    std::fs::create_dir(&d).unwrap();
    write(
        &d,
        "Procfile",
        "# processes\nweb: gunicorn app:app --bind 0.0.0.0:$PORT\n\nworker:   python worker.py\nReportJob: ./report\n",
    );
    assert_eq!(find_stack_file(&d), Some(d.join("Procfile")));
    let l = load(&opts(&d)).unwrap();
    assert_eq!(l.stack.name, "myapp");
    assert_eq!(l.stack.source, SourceKind::Procfile);
    let web = &l.stack.services["web"];
    assert_eq!(
        web.command,
        Some(Command::Shell(
            "gunicorn app:app --bind 0.0.0.0:$PORT".into()
        ))
    );
    assert_eq!(web.ports[0].target, 5000);
    let hc = web.healthcheck.as_ref().unwrap();
    assert_eq!(
        hc.test,
        HealthTest::Http {
            port: None,
            path: "/".into()
        }
    );
    assert_eq!(
        (
            hc.interval_ms,
            hc.timeout_ms,
            hc.retries,
            hc.start_interval_ms
        ),
        (2_000, 2_000, 3, 500)
    );
    // Process names keep their case; only `web` (lowercase) gets a port.
    let job = &l.stack.services["ReportJob"];
    assert!(job.ports.is_empty() && job.healthcheck.is_none());
    let worker = &l.stack.services["worker"];
    assert_eq!(
        worker.command,
        Some(Command::Shell("python worker.py".into()))
    );
    assert!(worker.ports.is_empty() && worker.healthcheck.is_none());
    write(
        &d,
        "Procfile",
        "web: ok\nthis line is wrong\nb@d: x\nempty:\n",
    );
    let e = load(&opts(&d)).unwrap_err().to_string();
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(lines.len(), 3, "{e}");
    assert!(lines[0].ends_with("Procfile:2:1: expected `name: command` (hint: each Procfile line is a process name, a colon and the command, e.g. `web: python app.py`)"), "{e}");
    assert!(
        lines[1].contains("Procfile:3:1: service `b@d`: invalid process name"),
        "{e}"
    );
    assert!(
        lines[2].contains("Procfile:4:7: service `empty`: process `empty` has no command"),
        "{e}"
    );
}

#[test]
fn procfile_is_not_merged_with_other_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "Procfile", "web: ./web\n");
    write(d, "compose.yaml", "services:\n  w:\n    command: x\n");
    for files in [["Procfile", "compose.yaml"], ["compose.yaml", "Procfile"]] {
        let mut o = opts(d);
        o.files = files.iter().map(PathBuf::from).collect();
        let e = load(&o).unwrap_err().to_string();
        assert!(
            e.ends_with("Procfile: a Procfile cannot be combined with other stack files (hint: pass the Procfile alone (`-f Procfile`), or describe the stack in a compose.yaml)"),
            "{e}"
        );
    }
}

#[test]
fn anchors_merge_keys_and_duplicates() {
    let l = ok(
        "x-env: &env {A: '1'}\nservices:\n  a:\n    command: x\n    environment: *env\n  b:\n    command: x\n    environment:\n      <<: *env\n      B: '2'\n",
    );
    assert_eq!(l.stack.services["b"].environment.len(), 2);
    let e = err("services:\n  a:\n    command: x\n    command: y\n");
    assert!(
        e.starts_with("compose.yaml:4:5: duplicate key `command`"),
        "{e}"
    );
    let e = err("a: &a [*a]\n");
    assert!(e.contains("compose.yaml:1:"), "{e}");
}

#[test]
fn version_warns_and_no_stack_file_errors() {
    let l = ok("version: '3.8'\nservices:\n  a:\n    command: x\n");
    assert_eq!(l.warnings[0].line, 1);
    assert!(l.warnings[0].message.contains("obsolete"));
    let dir = tempfile::tempdir().unwrap();
    let e = load(&opts(dir.path())).unwrap_err();
    assert!(e.errors[0].message.contains("no stack file found"));
}

#[test]
fn unset_port_hint_said_use_a_default_instead_of_dollar_dollar() {
    let l = ok(concat!(
        "services:\n",
        "  web:\n",
        "    command: python3 -m http.server $PORT\n",
        "  api:\n",
        "    command: serve --port ${API_LISTEN} --name $BERTH_INSTANCE --x $OTHER\n",
        "    x-berth: { port_env: API_LISTEN }\n",
        "  other:\n",
        "    command: run $API_LISTEN\n",
    ));
    let w: Vec<String> = l.warnings.iter().map(ToString::to_string).collect();
    let about = |var: &str, service: &str| {
        w.iter()
            .find(|x| {
                x.contains(&format!("`{var}` is not set")) && x.contains(&format!("`{service}`"))
            })
            .unwrap_or_else(|| panic!("no warning about {var} in {service}: {w:?}"))
            .clone()
    };
    let runtime = "so the variable is expanded when the process starts, not when the file is read";
    let port = about("PORT", "web");
    assert!(
        port.contains("write `$$PORT`") && port.contains(runtime),
        "{port}"
    );
    assert!(!port.contains(":-default"), "{port}");
    assert!(about("API_LISTEN", "api").contains("write `$$API_LISTEN`"));
    assert!(about("BERTH_INSTANCE", "api").contains("write `$$BERTH_INSTANCE`"));
    // Not berth's: the usual advice.
    assert!(about("OTHER", "api").contains("${OTHER:-default}"));
    // Another service's port variable is not this service's.
    assert!(about("API_LISTEN", "other").contains("${API_LISTEN:-default}"));
}

#[test]
fn placement_constraints_are_checked_with_their_position() {
    let e = err(
        "services:\n  web:\n    command: x\n    deploy:\n      placement:\n        constraints:\n          - node.labels.zone == east\n          - node.facts.load_10m < low\n          - zone == east\n          - node.facts.kernel ~= ([\n",
    );
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(lines.len(), 3, "{e}");
    assert!(
        lines[0].starts_with("compose.yaml:8:13: service `web`, field `deploy.placement.constraints`: invalid constraint \"node.facts.load_10m < low\": \"low\" is not a number"),
        "{e}"
    );
    assert!(
        lines[1].starts_with("compose.yaml:9:13:")
            && lines[1].contains("unknown attribute \"zone\""),
        "{e}"
    );
    assert!(
        lines[2].contains("invalid regular expression \"([\": unclosed"),
        "{e}"
    );
    let e = err(
        "services:\n  web:\n    command: x\n    deploy:\n      placement:\n        preferences:\n          - spread: zone\n",
    );
    assert!(e.contains("cannot spread over \"zone\""), "{e}");
}

/// A fact no agent reports (`load_10m`: Linux has 1, 5 and 15 minute load
/// averages) is a warning at its position naming the facts there are: the
/// service would otherwise stay pending with only the constraint as reason.
#[test]
fn constraints_on_facts_no_agent_reports_warn() {
    let l = ok(
        "services:\n  web:\n    command: x\n    deploy:\n      placement:\n        constraints:\n          - node.facts.load_10m < 0.25\n          - node.facts.load_15m < 0.25\n          - node.facts.memory_free > 1G\n          - node.labels.anything == x\n",
    );
    let w: Vec<String> = l.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("compose.yaml:7:13: service `web`, field `deploy.placement.constraints`: berth agents report no fact `load_10m`")
            && w[0].contains("load_1m, load_5m, load_15m"),
        "{w:?}"
    );
}

#[test]
fn x_berth_placement_strategy_and_affinity() {
    let l = ok(
        "services:\n  cache:\n    command: x\n  web:\n    command: x\n    x-berth:\n      placement:\n        strategy: binpack\n        affinity: [cache]\n        anti_affinity: [web]\n",
    );
    let p = &l.stack.services["web"].berth.placement;
    assert_eq!(p.strategy, berth_spec::types::Strategy::Binpack);
    assert_eq!(p.affinity, ["cache"]);
    assert_eq!(p.anti_affinity, ["web"]);
    let e = err(
        "services:\n  web:\n    command: x\n    x-berth:\n      placement:\n        strategy: random\n        affinity: [cahce]\n",
    );
    assert!(
        e.contains(
            "unknown placement strategy \"random\" (hint: use `spread` (the default) or `binpack`)"
        ),
        "{e}"
    );
    assert!(
        e.contains("compose.yaml:7:20:")
            && e.contains("x-berth.placement.affinity names undefined or disabled service `cahce`"),
        "{e}"
    );
}

#[test]
fn expose_declares_unpublished_ports_after_ports() {
    let l = ok(
        "services:\n  db:\n    command: x\n    expose: [\"5433\", 5432, \"9000-9001/tcp\"]\n    ports: [\"5432\"]\n",
    );
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    let ports: Vec<(u16, Option<u16>)> = l.stack.services["db"]
        .ports
        .iter()
        .map(|p| (p.target, p.published))
        .collect();
    // `ports` first (the instance's $PORT is the first port), no duplicate.
    assert_eq!(
        ports,
        [(5432, None), (5433, None), (9000, None), (9001, None)]
    );
    let e = err("services:\n  db:\n    command: x\n    expose: [\"8000:5432\"]\n");
    assert!(e.contains("`expose` takes container ports only"), "{e}");
}
