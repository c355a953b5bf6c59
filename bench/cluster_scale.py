#!/usr/bin/env python3
"""Benchmark: `berth scale web=N` (300 by default) to all healthy on a real
loopback cluster, against one server with the embedded store, in one run.

Cluster: a 3-member etcd (Debian's etcd-server) on 127.0.0.1, two
`berth server --store etcd://… --no-agent`, three `berth agent --join`
(own node ids and data dirs). Single: one `berth server` (embedded store,
its own local agent). The stack is the same for both: busybox httpd with an
HTTP health check, so "healthy" is decided by berth's own checks on the
agents; the clock starts when `berth scale` is typed and stops when
`berth ps --json` lists N running+healthy current instances.

When the cluster does not get there within --timeout, the rows that are not
healthy are printed (state, health, node, restarts, message) with the tail
of the agent logs that mention them, to find out why.

Usage: bench/cluster_scale.py [--berth target/release/berth] [--n 300]
Prints a Markdown table for BENCHMARKS.md.
"""
import argparse
import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

STACK = (
    "name: bench\n"
    "services:\n"
    "  web:\n"
    '    command: ["sh", "-c", "exec busybox httpd -f -p 127.0.0.1:$$PORT"]\n'
    '    ports: ["8080"]\n'
    "    x-berth:\n"
    "      healthcheck: { http: /, interval: 5s, start_interval: 50ms }\n"
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(what, timeout, f):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = f()
            if r:
                return r
        except Exception as e:  # noqa: BLE001 - anything means "not yet"
            last = e
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}: {last}")


class Procs:
    """Every child started, stopped (TERM, then KILL) at the end."""

    def __init__(self):
        self.children = []

    def start(self, args, log, env=None, cwd=None):
        f = open(log, "w")
        p = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=env, cwd=cwd)
        self.children.append(p)
        return p

    def stop_all(self):
        for p in reversed(self.children):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in reversed(self.children):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def etcd_cluster(procs, work):
    ports = [(free_port(), free_port()) for _ in range(3)]
    initial = ",".join(f"e{i}=http://127.0.0.1:{p}" for i, (_, p) in enumerate(ports))
    for i, (c, p) in enumerate(ports):
        procs.start([
            "etcd", "--name", f"e{i}", "--data-dir", os.path.join(work, f"etcd{i}"),
            "--listen-client-urls", f"http://127.0.0.1:{c}",
            "--advertise-client-urls", f"http://127.0.0.1:{c}",
            "--listen-peer-urls", f"http://127.0.0.1:{p}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{p}",
            "--initial-cluster", initial, "--initial-cluster-token", f"bench-{os.getpid()}",
            "--initial-cluster-state", "new",
            "--heartbeat-interval", "100", "--election-timeout", "1000",
        ], os.path.join(work, f"etcd{i}.log"))
    for c, _ in ports:
        wait("etcd healthy", 30, lambda c=c: b"true" in urllib.request.urlopen(
            f"http://127.0.0.1:{c}/health", timeout=2).read())
    return ",".join(f"127.0.0.1:{c}" for c, _ in ports)


def server_api(data):
    info = json.load(open(os.path.join(data, "server.json")))
    return info["tcp"][0]


class Cli:
    def __init__(self, berth, data, stack_dir):
        self.berth = berth
        self.env = dict(os.environ, BERTH_DATA_DIR=data, NO_COLOR="1")
        self.env.pop("BERTH_ADDR", None)
        self.stack_dir = stack_dir

    def run(self, *args, capture=False):
        r = subprocess.run([self.berth, *args], cwd=self.stack_dir, env=self.env,
                           capture_output=True, timeout=60)
        if r.returncode != 0:
            raise SystemExit(f"berth {' '.join(args)} failed: {r.stderr.decode()}")
        return r.stdout.decode() if capture else None

    def rows(self):
        return [r for r in json.loads(self.run("ps", "--json", capture=True)) if r["service"] == "web"]


def healthy(rows):
    return [r for r in rows if r["current"] and r["state"] == "running" and r["health"] == "healthy"]


def scale(cli, n, timeout):
    """Time from `berth scale web=n` to n healthy; (seconds or None, last rows)."""
    t0 = time.monotonic()
    cli.run("scale", f"web={n}")
    rows = []
    while time.monotonic() - t0 < timeout:
        rows = cli.rows()
        if len(healthy(rows)) >= n:
            return time.monotonic() - t0, rows
        time.sleep(0.05)
    return None, rows


def stack_dir(work, name):
    d = os.path.join(work, name)
    os.makedirs(d)
    with open(os.path.join(d, "index.html"), "w") as f:
        f.write("ok")
    with open(os.path.join(d, "compose.yaml"), "w") as f:
        f.write(STACK)
    return d


def explain(rows, agent_logs):
    bad = [r for r in rows if r not in healthy(rows)]
    print(f"\n{len(bad)} instance(s) not healthy:")
    for r in bad[:20]:
        print(f"  {r['instance']} node={r['node']} state={r['state']} health={r['health']} "
              f"restarts={r['restarts']} current={r['current']} port={r.get('port')} "
              f"message={r.get('message')!r} health_output={r.get('health_output')!r}")
        for log in agent_logs:
            lines = [l for l in open(log, errors="replace") if f"{r['instance']}" in l]
            for l in lines[-5:]:
                print(f"    {os.path.basename(log)}: {l.rstrip()[:300]}")


def bench_cluster(berth, n, timeout, work, procs):
    endpoints = etcd_cluster(procs, work)
    datas = []
    for i in (1, 2):
        data = os.path.join(work, f"s{i}")
        os.makedirs(data)
        env = dict(os.environ, BERTH_DATA_DIR=data, NO_COLOR="1")
        procs.start([berth, "server", "--store", f"etcd://{endpoints}/bench", "--node-id", f"s{i}",
                     "--no-agent", "--listen", "127.0.0.1:0", "--no-http", "--no-dns"],
                    os.path.join(work, f"s{i}.log"), env=env, cwd=data)
        wait("server", 30, lambda d=data: server_api(d))
        datas.append(data)
    apis = [server_api(d) for d in datas]
    d = stack_dir(work, "cluster-stack")
    cli = Cli(berth, datas[0], d)
    token = cli.run("token", capture=True).strip()
    logs = []
    for i in range(3):
        adir = os.path.join(work, f"a{i}")
        log = os.path.join(work, f"a{i}.log")
        logs.append(log)
        procs.start([berth, "agent", "--join", f"http://{apis[0]}", "--token", token,
                     "--node-id", f"a{i}", "--data", adir], log)
    wait("3 agents up", 30, lambda: sum(
        1 for x in json.loads(cli.run("nodes", "--json", capture=True)) if x["state"] == "up") == 3)
    cli.run("up", "-d")
    secs, rows = scale(cli, n, timeout)
    per_node = collections.Counter(r["node"] for r in healthy(rows))
    if secs is None:
        explain(rows, logs)
    return secs, len(healthy(rows)), dict(sorted(per_node.items()))


def bench_single(berth, n, timeout, work, procs):
    data = os.path.join(work, "single")
    os.makedirs(data)
    env = dict(os.environ, BERTH_DATA_DIR=data, NO_COLOR="1")
    procs.start([berth, "server", "--listen", "127.0.0.1:0", "--no-http", "--no-dns"],
                os.path.join(work, "single.log"), env=env, cwd=data)
    wait("server", 30, lambda: server_api(data))
    cli = Cli(berth, data, stack_dir(work, "single-stack"))
    cli.run("up", "-d")
    secs, rows = scale(cli, n, timeout)
    if secs is None:
        explain(rows, [os.path.join(work, "single.log")])
    return secs, len(healthy(rows))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--berth", default="target/release/berth")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = ap.parse_args()
    berth = os.path.abspath(args.berth)
    for tool in ("etcd", "busybox"):
        if not shutil.which(tool):
            raise SystemExit(f"needs {tool} (scripts/deps installs it)")
    work = tempfile.mkdtemp(prefix="berth-cluster-bench-")
    procs = Procs()
    try:
        c_secs, c_ok, per_node = bench_cluster(berth, args.n, args.timeout, work, procs)
        procs.stop_all()
        procs = Procs()
        s_secs, s_ok = bench_single(berth, args.n, args.timeout, work, procs)
    finally:
        procs.stop_all()
        if args.keep:
            print(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    fmt = lambda s, ok: f"{s:.2f}" if s is not None else f"not reached ({ok}/{args.n} after {args.timeout:.0f} s)"
    n = args.n
    print("| measure | cluster (3 etcd, 2 servers, 3 agents) | single server (embedded store) | ratio |")
    print("|---|---|---|---|")
    ratio = f"cluster {c_secs / s_secs:.2f}× the single's time" if c_secs and s_secs else ""
    print(f"| `scale web={n}` to all healthy (s) | {fmt(c_secs, c_ok)} | {fmt(s_secs, s_ok)} | {ratio} |")
    print(f"| healthy per agent | {per_node} | | |")


if __name__ == "__main__":
    main()
