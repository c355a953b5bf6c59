#!/usr/bin/env python3
"""Benchmark: `berth up -d` of a stack with one service scaled to 50
containers from a local image, against Debian's `docker-compose up -d
--scale web=50` on the same file and image, in one run.

Both are timed from the command being typed (berth's server already
running, as dockerd is for docker-compose) to every container running, and
to every container healthy: the file's health check is a `wget` of the
container's own httpd, every 1 s. berth runs the check itself (an exec in
the container); for docker-compose, Docker runs it and this script polls
`docker ps --filter health=healthy`. "Running" is read from `docker ps` for
both, by each tool's project label.

Usage: bench/docker50.py [--berth target/release/berth] [--n 50]
Needs: a Docker engine (scripts/docker-up), the test image
(scripts/test-image), Debian's docker-compose (installed when absent).
Prints a Markdown table for BENCHMARKS.md.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

IMAGE = "berth-test/busybox:latest"

COMPOSE = """\
services:
  web:
    image: {image}
    pull_policy: never
    command: ["sh", "-c", "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 8000 -h /www"]
    deploy:
      replicas: {n}
    healthcheck:
      test: ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8000/"]
      interval: 1s
      timeout: 2s
      retries: 3
"""


def docker_count(label, *extra):
    out = subprocess.run(
        ["docker", "ps", "-q", "--filter", f"label={label}", *extra],
        check=True, capture_output=True, text=True,
    ).stdout
    return len(out.split())


def wait_running_and_healthy(t0, n, label, healthy):
    """Poll until n containers run, then until `healthy()` says n; return
    both times since t0."""
    t_run = t_healthy = None
    while t_healthy is None:
        now = time.monotonic() - t0
        if t_run is None and docker_count(label, "--filter", "status=running") >= n:
            t_run = now
        if t_run is not None and healthy() >= n:
            t_healthy = time.monotonic() - t0
        else:
            time.sleep(0.05)
        if now > 600:
            raise SystemExit(f"not all {n} healthy after 600 s ({label})")
    return t_run, t_healthy


def bench_berth(berth, n, work):
    data = os.path.join(work, "berth-data")
    stack_dir = os.path.join(work, "berth")
    os.makedirs(stack_dir)
    with open(os.path.join(stack_dir, "compose.yaml"), "w") as f:
        f.write(COMPOSE.format(image=IMAGE, n=n))
    env = dict(os.environ, BERTH_DATA_DIR=data, NO_COLOR="1")
    log = open(os.path.join(work, "berth-server.log"), "w")
    server = subprocess.Popen([berth, "server", "--no-tcp", "--no-http", "--no-dns"], env=env, stdout=log, stderr=log)
    while not os.path.exists(os.path.join(data, "server.json")):
        time.sleep(0.05)
    time.sleep(1)
    stack = "bench50"

    def healthy():
        ps = subprocess.run([berth, "ps", "--json", "-p", stack], cwd=stack_dir, env=env,
                            capture_output=True)
        if ps.returncode != 0:
            with open(os.path.join(work, "berth-server.log")) as f:
                tail = f.read()[-3000:]
            raise SystemExit(f"berth ps failed: {ps.stderr.decode()}\nserver log:\n{tail}")
        out = ps.stdout
        return sum(1 for r in json.loads(out)
                   if r["service"] == "web" and r["state"] == "running" and r["health"] == "healthy")

    t0 = time.monotonic()
    # `up -d` waits for health itself; its verdict is not the measure
    # (the polling below is, the same for both).
    up = subprocess.Popen([berth, "up", "-d", "-p", stack, "--wait-timeout", "10m"],
                          cwd=stack_dir, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    t_run, t_healthy = wait_running_and_healthy(t0, n, f"berth.stack={stack}", healthy)
    up.wait(timeout=600)
    subprocess.run([berth, "down", "-p", stack], cwd=stack_dir, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    while docker_count(f"berth.stack={stack}", "-a") > 0:
        time.sleep(0.2)
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=60)
    return t_run, t_healthy


def bench_compose(n, work):
    project = "bench50compose"
    d = os.path.join(work, "compose")
    os.makedirs(d)
    with open(os.path.join(d, "docker-compose.yml"), "w") as f:
        f.write(COMPOSE.format(image=IMAGE, n=n))
    label = f"com.docker.compose.project={project}"
    t0 = time.monotonic()
    up = subprocess.Popen(["docker-compose", "-p", project, "up", "-d", "--scale", f"web={n}"],
                          cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t_run, t_healthy = wait_running_and_healthy(
        t0, n, label, lambda: docker_count(label, "--filter", "health=healthy"))
    up.wait(timeout=600)
    subprocess.run(["docker-compose", "-p", project, "down", "-t", "1"], cwd=d, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return t_run, t_healthy


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--berth", default="target/release/berth")
    ap.add_argument("--n", type=int, default=50)
    args = ap.parse_args()
    berth = os.path.abspath(args.berth)
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([os.path.join(here, "..", "scripts", "test-image")], check=True)
    if not shutil.which("docker-compose"):
        subprocess.run(["apt-get", "install", "-y", "docker-compose"], check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    with tempfile.TemporaryDirectory() as work:
        b = bench_berth(berth, args.n, work)
        c = bench_compose(args.n, work)
    n = args.n
    print("| measure | berth | docker-compose | ratio |")
    print("|---|---|---|---|")
    for i, what in enumerate([f"{n} containers running (s)", f"{n} containers healthy (s)"]):
        print(f"| {what} | {b[i]:.2f} | {c[i]:.2f} | berth {c[i] / b[i]:.2f}× faster |")


if __name__ == "__main__":
    main()
