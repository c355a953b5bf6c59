#!/usr/bin/env python3
"""Benchmark: `berth logs` asked of one server of two on etcd, which merges
the other server's lines (the logs fan-out), against one server with the
embedded store holding all the lines itself, in one run.

Fleet: one etcd member on 127.0.0.1 and two `berth server --store etcd://…`
(s1, s2), each with its own local agent; service `a` is pinned to s1 and `b`
to s2, each printing --lines lines at start, so each server stores half the
lines and `berth logs` on s1 has to fetch s2's. Single: one `berth server`
(embedded store) running both services. hyperfine times `berth logs --tail
100` and the whole log (`berth logs`, 2 × --lines lines) against s1 and
against the single server.

Usage: bench/logs_fanout.py [--berth target/release/berth] [--lines 50000]
Prints a Markdown table for BENCHMARKS.md.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cluster_scale import Cli, Procs, free_port, server_api, wait  # noqa: E402

STACK = (
    "name: bench\n"
    "services:\n"
    "  a:\n"
    "    command: [\"sh\", \"-c\", \"seq -f 'a line %g' {n}; exec sleep 100000\"]\n"
    "{pin_a}"
    "  b:\n"
    "    command: [\"sh\", \"-c\", \"seq -f 'b line %g' {n}; exec sleep 100000\"]\n"
    "{pin_b}"
)


def pin(node):
    return f"    deploy: {{ placement: {{ constraints: [\"node.id == {node}\"] }} }}\n"


def etcd(procs, work):
    c, p = free_port(), free_port()
    procs.start([
        "etcd", "--name", "e0", "--data-dir", os.path.join(work, "etcd"),
        "--listen-client-urls", f"http://127.0.0.1:{c}",
        "--advertise-client-urls", f"http://127.0.0.1:{c}",
        "--listen-peer-urls", f"http://127.0.0.1:{p}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{p}",
        "--initial-cluster", f"e0=http://127.0.0.1:{p}",
    ], os.path.join(work, "etcd.log"))
    wait("etcd healthy", 30, lambda: b"true" in urllib.request.urlopen(
        f"http://127.0.0.1:{c}/health", timeout=2).read())
    return f"127.0.0.1:{c}"


def server(procs, berth, work, name, args):
    data = os.path.join(work, name)
    os.makedirs(data)
    env = dict(os.environ, BERTH_DATA_DIR=data, NO_COLOR="1")
    procs.start([berth, "server", "--no-http", "--no-dns", *args], os.path.join(work, f"{name}.log"),
                env=env, cwd=data)
    wait(f"server {name}", 30, lambda: server_api(data))
    return data


def stack(work, name, n, pinned):
    d = os.path.join(work, name)
    os.makedirs(d)
    with open(os.path.join(d, "compose.yaml"), "w") as f:
        f.write(STACK.format(n=n, pin_a=pin("s1") if pinned else "", pin_b=pin("s2") if pinned else ""))
    return d


def all_lines(cli, n):
    out = cli.run("logs", "--no-prefix", capture=True)
    return out.count("a line ") >= n and out.count("b line ") >= n


def hyperfine(berth, data, stack_dir, label, work):
    """Mean and stddev (ms) of `berth logs --tail 100` and `berth logs`."""
    out = os.path.join(work, f"{label}.json")
    env = f"cd {stack_dir} && BERTH_DATA_DIR={data} NO_COLOR=1 {berth}"
    subprocess.run(["hyperfine", "--shell=bash", "--warmup", "3", "--runs", "20",
                    "--export-json", out,
                    "-n", "tail", f"{env} logs --tail 100",
                    "-n", "all", f"{env} logs"], check=True, stdout=subprocess.DEVNULL)
    res = json.load(open(out))["results"]
    return {r["command"]: (r["mean"] * 1000, r["stddev"] * 1000) for r in res}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--berth", default="target/release/berth")
    ap.add_argument("--lines", type=int, default=50000, help="lines per service")
    args = ap.parse_args()
    berth = os.path.abspath(args.berth)
    for tool in ("etcd", "hyperfine"):
        if not shutil.which(tool):
            raise SystemExit(f"needs {tool} (scripts/deps installs it)")
    n = args.lines
    work = tempfile.mkdtemp(prefix="berth-logs-bench-")
    procs = Procs()
    try:
        endpoint = etcd(procs, work)
        datas = [server(procs, berth, work, s, ["--store", f"etcd://{endpoint}/bench", "--node-id", s])
                 for s in ("s1", "s2")]
        d = stack(work, "fleet-stack", n, True)
        fleet = Cli(berth, datas[0], d)
        fleet.run("up", "-d")
        wait("every line via s1", 120, lambda: all_lines(fleet, n))
        f = hyperfine(berth, datas[0], d, "fleet", work)
        procs.stop_all()
        procs = Procs()
        single_data = server(procs, berth, work, "single", [])
        d = stack(work, "single-stack", n, False)
        single = Cli(berth, single_data, d)
        single.run("up", "-d")
        wait("every line", 120, lambda: all_lines(single, n))
        s = hyperfine(berth, single_data, d, "single", work)
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    print(f"| `berth logs` ({n:,} lines per service) | s1 of two servers on etcd, merging s2's (ms) "
          "| one server, embedded store (ms) | ratio |")
    print("|---|---|---|---|")
    for cmd, what in (("tail", "`--tail 100`"), ("all", f"whole log ({2 * n:,} lines)")):
        (fm, fs), (sm, ss) = f[cmd], s[cmd]
        print(f"| {what} | {fm:.1f} ± {fs:.1f} | {sm:.1f} ± {ss:.1f} | {fm / sm:.2f}× |")


if __name__ == "__main__":
    main()
