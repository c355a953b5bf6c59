//! End-to-end with a real Docker engine (issue 4): a stack mixing a
//! container service and a process service comes up healthy, and `down -v`
//! leaves none of berth's containers, networks or named volumes behind; a
//! `docker kill`ed container is restarted; a `kill -9`ed server, started
//! again, adopts its containers (same ids, no duplicates).
//! Needs an engine (scripts/docker-up) — it fails, not skips, without one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// Full ids of the stack's containers, running or not, sorted.
fn container_ids(stack: &str, all: bool) -> Vec<String> {
    let label = format!("label=berth.stack={stack}");
    let mut args = vec!["ps", "-q", "--no-trunc", "--filter", &label];
    if all {
        args.push("-a");
    }
    let mut ids: Vec<String> = docker(&args).lines().map(str::to_owned).collect();
    ids.sort();
    ids
}

#[test]
fn docker_kill_restarts_kill_9_of_the_server_adopts_and_down_leaves_nothing() {
    test_image();
    let mut berth = Berth::new();
    let stack = format!("dockadopt{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("compose.yaml"),
        concat!(
            "services:\n",
            "  web:\n",
            "    image: berth-test/busybox:latest\n",
            "    pull_policy: never\n",
            "    command: [\"sh\", \"-c\", \"mkdir -p /w; echo ok > /w/ok; exec httpd -f -p 8000 -h /w\"]\n",
            "    ports: [\"8000\"]\n",
            "    restart: always\n",
            "    deploy: { replicas: 2 }\n",
            "    x-berth:\n",
            "      healthcheck: { http: /ok, interval: 1s, start_interval: 100ms }\n",
        ),
    )
    .unwrap();
    let dir = dir.path();
    berth.ok(dir, &["up", "-d", "-p", &stack]);
    all_ready(&berth.ps(dir, &stack), "web", 2).unwrap();
    let before = container_ids(&stack, true);
    assert_eq!(before.len(), 2, "{before:?}");

    // `docker kill` behind berth's back: the supervisor restarts it (in a
    // new container, as a process restart makes a new process).
    docker(&["kill", &before[0]]);
    wait_until(
        "web.* restarted and healthy",
        Duration::from_secs(60),
        || {
            let ps = berth.ps(dir, &stack);
            all_ready(&ps, "web", 2)?;
            let restarts: u64 = instances(&ps, "web")
                .iter()
                .map(|i| i["restarts"].as_u64().unwrap_or(0))
                .sum();
            let ids = container_ids(&stack, true);
            if restarts >= 1 && ids.len() == 2 && !ids.contains(&before[0]) {
                Ok(())
            } else {
                Err(format!("restarts {restarts}, containers {ids:?}"))
            }
        },
    );
    let running = container_ids(&stack, false);
    assert_eq!(running.len(), 2, "{running:?}");

    // kill -9 the server: the containers keep running; a new server adopts
    // exactly them.
    let pid = berth.server_pid().expect("server.json names the server");
    signal(pid, "KILL");
    wait_until("the server gone", Duration::from_secs(30), || {
        if alive(pid) {
            Err(format!("{pid} alive"))
        } else {
            Ok(())
        }
    });
    assert_eq!(
        container_ids(&stack, false),
        running,
        "containers survive the server"
    );
    berth.start_server();
    wait_until("the new server answers", Duration::from_secs(30), || {
        let out = berth.run(dir, &["ps", "--json", "-p", &stack]);
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    });
    wait_until("web adopted and healthy", Duration::from_secs(60), || {
        let ps = berth.ps(dir, &stack);
        all_ready(&ps, "web", 2)?;
        if ps.iter().any(|i| i["pid"].is_null()) {
            return Err(format!("not all reported: {ps:?}"));
        }
        Ok(())
    });
    // The new agent took both over (its supervisors said so in the logs),
    // rather than the rows being the old agent's last reports.
    wait_until("both containers adopted", Duration::from_secs(30), || {
        let logs = berth.ok(dir, &["logs", "-p", &stack, "web"]);
        let n = logs.lines().filter(|l| l.contains("(adopted)")).count();
        if n >= 2 {
            Ok(())
        } else {
            Err(format!("{n} adoptions logged:\n{logs}"))
        }
    });
    assert_eq!(
        container_ids(&stack, true),
        running,
        "the restarted server adopted the same containers and made none"
    );
    all_ready(&berth.ps(dir, &stack), "web", 2).unwrap();

    berth.ok(dir, &["down", "-p", &stack]);
    let label = format!("label=berth.stack={stack}");
    wait_until(
        "containers and network gone",
        Duration::from_secs(30),
        || {
            let containers = container_ids(&stack, true);
            let networks = docker(&["network", "ls", "-q", "--filter", &label]);
            if containers.is_empty() && networks.trim().is_empty() {
                Ok(())
            } else {
                Err(format!("containers {containers:?} networks {networks:?}"))
            }
        },
    );
}

#[test]
fn mixed_stack_runs_and_down_v_removes_containers_networks_and_volumes() {
    test_image();
    let berth = Berth::new();
    let stack = format!("dock{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("compose.yaml"),
        concat!(
            "services:\n",
            "  box:\n",
            "    image: berth-test/busybox:latest\n",
            "    pull_policy: never\n",
            "    command: [\"sh\", \"-c\", \"echo hi > /data/hi; exec httpd -f -p 8000 -h /data\"]\n",
            "    ports: [\"8000\"]\n",
            "    volumes: [\"data:/data\"]\n",
            "    restart: unless-stopped\n",
            "    x-berth:\n",
            "      healthcheck: { http: /hi, interval: 1s, start_interval: 100ms }\n",
            "  local:\n",
            "    command: sleep 1000\n",
            "volumes:\n",
            "  data: {}\n",
        ),
    )
    .unwrap();
    let dir = dir.path();
    berth.ok(dir, &["up", "-d", "-p", &stack]);
    let ps = berth.ps(dir, &stack);
    all_ready(&ps, "box", 1).unwrap();
    all_ready(&ps, "local", 1).unwrap();
    let label = format!("label=berth.stack={stack}");
    assert_eq!(docker(&["ps", "-q", "--filter", &label]).lines().count(), 1);
    assert!(
        docker(&["volume", "ls", "-q"])
            .lines()
            .any(|v| v == format!("{stack}_data"))
    );

    berth.ok(dir, &["down", "-v", "-p", &stack]);
    wait_until(
        "containers, network and volume gone",
        Duration::from_secs(30),
        || {
            let containers = docker(&["ps", "-aq", "--filter", &label]);
            let networks = docker(&["network", "ls", "-q", "--filter", &label]);
            let volume = docker(&["volume", "ls", "-q"])
                .lines()
                .any(|v| v == format!("{stack}_data"));
            if containers.trim().is_empty() && networks.trim().is_empty() && !volume {
                Ok(())
            } else {
                Err(format!(
                    "containers {containers:?} networks {networks:?} volume {volume}"
                ))
            }
        },
    );
    wait_until(
        "the process service stopped",
        Duration::from_secs(30),
        || {
            let left = processes_of(&stack, None);
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            }
        },
    );
}

/// The example-voting-app's images, made locally from the test image under
/// the names its compose file expects; labelled so a rerun removes only
/// these, never a real `redis:alpine`.
const VOTING_LABEL: &str = "berth.test=voting-app";

fn remove_test_tags(images: &[&str]) {
    for image in images {
        let out = Command::new("docker")
            .args([
                "image",
                "inspect",
                "-f",
                "{{index .Config.Labels \"berth.test\"}}",
                image,
            ])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).trim() == "voting-app" {
            docker(&["rmi", image]);
        }
    }
}

fn write_exec(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn build_image(tag: &str, dockerfile: &str) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Dockerfile"), dockerfile).unwrap();
    docker(&["build", "-q", "-t", tag, &dir.path().to_string_lossy()]);
}

#[test]
fn example_voting_app_explains_what_cannot_run_then_runs_with_local_images() {
    test_image();
    let corpus = repo()
        .join("../shared/compose-corpus/example-voting-app")
        .canonicalize()
        .expect("the compose corpus (../shared)");
    let file = corpus.join("docker-compose.yml");
    let original = std::fs::read_to_string(&file).expect("the compose corpus (../shared)");
    let pulled = ["redis:alpine", "postgres:15-alpine"];
    remove_test_tags(&pulled);
    for image in pulled {
        let present = Command::new("docker")
            .args(["image", "inspect", image])
            .output()
            .unwrap();
        assert!(
            !present.status.success(),
            "{image} is on this machine (not one this test made): the explanation cannot be checked"
        );
    }

    // The real file: it loads, and `config` names per service what is
    // missing and how to provide it.
    let berth = Berth::new();
    let file_arg = file.to_string_lossy().into_owned();
    let out = berth.run(&corpus, &["config", "-f", &file_arg]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "config: {stderr}");
    let yaml = String::from_utf8_lossy(&out.stdout);
    for service in ["vote:", "result:", "worker:", "redis:", "db:"] {
        assert!(yaml.contains(service), "{service} in {yaml}");
    }
    let explains = |stderr: &str| {
        for (service, image) in [("redis", "redis:alpine"), ("db", "postgres:15-alpine")] {
            let line = stderr
                .lines()
                .find(|l| {
                    l.trim_start()
                        .starts_with(&format!("service `{service}`: cannot run here"))
                })
                .unwrap_or_else(|| panic!("no line for {service}: {stderr}"));
            for part in [
                format!("image `{image}` is not on this machine and cannot be pulled"),
                format!("docker build -t {image}"),
                "docker load".to_owned(),
                "pull_policy: never".to_owned(),
            ] {
                assert!(line.contains(&part), "{part:?} not in {line:?}");
            }
        }
        for service in ["vote", "result", "worker"] {
            let line = stderr
                .lines()
                .find(|l| {
                    l.trim_start()
                        .starts_with(&format!("service `{service}`: cannot run here"))
                })
                .unwrap_or_else(|| panic!("no line for {service}: {stderr}"));
            let dir = corpus.join(service);
            assert!(
                line.contains(&format!("build context {} does not exist", dir.display())),
                "{line}"
            );
        }
        // `seed` is behind a profile: not looked at.
        assert!(!stderr.contains("service `seed`"), "{stderr}");
        // The missing healthcheck folder is a warning, not an error.
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with("service `redis`: warning: bind mount")
                    && l.contains("healthchecks")),
            "{stderr}"
        );
    };
    explains(&stderr);

    // `up` refuses with the same explanation, before starting anything (not
    // even a server).
    let stack = format!("vote{}", std::process::id());
    let stderr = berth.fails(&corpus, &["up", "-d", "-f", &file_arg, "-p", &stack], 5);
    assert!(stderr.contains("nothing was started"), "{stderr}");
    explains(&stderr);
    assert!(berth.server_pid().is_none(), "no server was started");

    // Now provide what it needs: its images built locally under the names
    // it expects, its build contexts and health-check scripts, and free
    // host ports instead of 8080/8081/9229 (other tests run alongside).
    build_image(
        "redis:alpine",
        &format!(
            "FROM berth-test/busybox:latest\nLABEL {VOTING_LABEL}\n\
             RUN mkdir -p /www && echo PONG > /www/index.html\n\
             CMD [\"httpd\", \"-f\", \"-p\", \"6379\", \"-h\", \"/www\"]\n"
        ),
    );
    build_image(
        "postgres:15-alpine",
        &format!(
            "FROM berth-test/busybox:latest\nLABEL {VOTING_LABEL}\n\
             RUN mkdir -p /www && echo ROWS > /www/index.html\n\
             CMD [\"httpd\", \"-f\", \"-p\", \"5432\", \"-h\", \"/www\"]\n"
        ),
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let [vote_port, result_port, debug_port] = free_ports();
    let text = original
        .replace("\"8080:80\"", &format!("\"{vote_port}:80\""))
        .replace("\"8081:80\"", &format!("\"{result_port}:80\""))
        .replace(
            "\"127.0.0.1:9229:9229\"",
            &format!("\"127.0.0.1:{debug_port}:9229\""),
        );
    assert_ne!(text, original);
    std::fs::write(dir.join("docker-compose.yml"), text).unwrap();
    std::fs::create_dir(dir.join("healthchecks")).unwrap();
    write_exec(
        &dir.join("healthchecks/redis.sh"),
        "#!/bin/sh\nwget -q -O /dev/null http://127.0.0.1:6379/\n",
    );
    write_exec(
        &dir.join("healthchecks/postgres.sh"),
        "#!/bin/sh\nwget -q -O /dev/null http://127.0.0.1:5432/\n",
    );
    let vote = dir.join("vote");
    std::fs::create_dir(&vote).unwrap();
    std::fs::write(vote.join("index.html"), "Cats vs Dogs\n").unwrap();
    // `curl -f URL`, as the vote health check calls it.
    write_exec(
        &vote.join("curl"),
        "#!/bin/sh\nfor a; do url=$a; done\nexec wget -q -O /dev/null \"$url\"\n",
    );
    std::fs::write(
        vote.join("Dockerfile"),
        "FROM berth-test/busybox:latest AS base\nRUN mkdir -p /usr/local/app\n\
         FROM base AS dev\nCOPY curl /bin/curl\n\
         CMD [\"httpd\", \"-f\", \"-p\", \"80\", \"-h\", \"/usr/local/app\"]\n",
    )
    .unwrap();
    let result = dir.join("result");
    std::fs::create_dir(&result).unwrap();
    std::fs::write(result.join("index.html"), "Results\n").unwrap();
    write_exec(
        &result.join("nodemon"),
        "#!/bin/sh\nexec httpd -f -p 80 -h /usr/local/app\n",
    );
    std::fs::write(
        result.join("Dockerfile"),
        "FROM berth-test/busybox:latest\nCOPY nodemon /bin/nodemon\n",
    )
    .unwrap();
    let worker = dir.join("worker");
    std::fs::create_dir(&worker).unwrap();
    std::fs::write(
        worker.join("Dockerfile"),
        "FROM berth-test/busybox:latest\nCMD [\"sh\", \"-c\", \"while true; do \
         wget -q -O- http://redis:6379/; wget -q -O- http://db:5432/; sleep 1; done\"]\n",
    )
    .unwrap();

    let out = berth.run(dir, &["config"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("cannot run here"), "{stderr}");

    berth.ok(dir, &["up", "-d", "-p", &stack, "--wait-timeout", "3m"]);
    let ps = berth.ps(dir, &stack);
    for service in ["vote", "result", "worker", "redis", "db"] {
        all_ready(&ps, service, 1).unwrap();
    }
    assert!(instances(&ps, "seed").is_empty(), "{ps:?}");
    // Published through berth's proxy, as the file asks.
    wait_until(
        "vote answers on its host port",
        Duration::from_secs(30),
        || http_get(vote_port, "/").and_then(|r| r.contains("Cats vs Dogs").then_some(()).ok_or(r)),
    );
    // Each published port's proxy learns of its instance on its own.
    wait_until(
        "result answers on its host port",
        Duration::from_secs(30),
        || http_get(result_port, "/").map(|_| ()),
    );
    // The worker reaches redis and db by service name.
    wait_until(
        "worker reaches redis and db",
        Duration::from_secs(30),
        || {
            let logs = berth.ok(dir, &["logs", "-p", &stack, "worker"]);
            if logs.contains("PONG") && logs.contains("ROWS") {
                Ok(())
            } else {
                Err(logs)
            }
        },
    );

    berth.ok(dir, &["down", "-v", "-p", &stack]);
    let label = format!("label=berth.stack={stack}");
    wait_until(
        "containers and network gone",
        Duration::from_secs(30),
        || {
            let containers = container_ids(&stack, true);
            let networks = docker(&["network", "ls", "-q", "--filter", &label]);
            if containers.is_empty() && networks.trim().is_empty() {
                Ok(())
            } else {
                Err(format!("containers {containers:?} networks {networks:?}"))
            }
        },
    );
    remove_test_tags(&pulled);
    for service in ["vote", "result", "worker"] {
        let _ = Command::new("docker")
            .args(["rmi", &format!("{stack}-{service}")])
            .output();
    }
}
