#!/usr/bin/env python3
"""Benchmark: `berth scale web=100` to 100 healthy instances, against
supervisord starting the same 100 programs, in one run.

The program is busybox's httpd (Debian's busybox-static): tiny, starts in a
millisecond, so the figure measures the supervisor, not the app. "Healthy"
means the same for both: an HTTP GET / on the instance's port answers 200.
berth's own HTTP health check decides for berth; for supervisord (which has
no health checks) this script polls every port itself.

Usage: bench/scale100.py [--berth target/release/berth] [--n 100]
Prints a Markdown table for BENCHMARKS.md.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def http_200(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            head = s.recv(64)
            return head.startswith(b"HTTP/1.") and b" 200 " in head
    except OSError:
        return False


def free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def bench_berth(berth, n, work):
    data = os.path.join(work, "berth-data")
    stack_dir = os.path.join(work, "stack")
    os.makedirs(stack_dir)
    with open(os.path.join(stack_dir, "index.html"), "w") as f:
        f.write("ok")
    with open(os.path.join(stack_dir, "compose.yaml"), "w") as f:
        f.write(
            "name: bench\n"
            "services:\n"
            "  web:\n"
            '    command: ["sh", "-c", "exec busybox httpd -f -p 127.0.0.1:$$PORT"]\n'
            '    ports: ["8080"]\n'
            "    x-berth:\n"
            "      healthcheck: { http: /, interval: 5s, start_interval: 50ms }\n"
        )
    env = dict(os.environ, BERTH_DATA_DIR=data, NO_COLOR="1")
    run = lambda *a, **k: subprocess.run([berth, *a], cwd=stack_dir, env=env, check=True, **k)
    run("up", "-d", stdout=subprocess.DEVNULL)
    server = json.load(open(os.path.join(data, "server.json")))["pid"]
    time.sleep(3)
    idle = rss_kb(server)

    def healthy():
        out = subprocess.run([berth, "ps", "--json"], cwd=stack_dir, env=env, check=True, capture_output=True).stdout
        rows = json.loads(out)
        return sum(1 for r in rows if r["service"] == "web" and r["state"] == "running" and r["health"] == "healthy")

    t0 = time.monotonic()
    run("scale", f"web={n}", stdout=subprocess.DEVNULL)
    while healthy() < n:
        time.sleep(0.01)
    elapsed = time.monotonic() - t0
    time.sleep(3)
    busy = rss_kb(server)
    run("down", stdout=subprocess.DEVNULL)
    os.kill(server, signal.SIGTERM)
    return elapsed, idle, busy


def bench_supervisord(n, work):
    conf_dir = os.path.join(work, "supervisor")
    os.makedirs(conf_dir)
    with open(os.path.join(conf_dir, "index.html"), "w") as f:
        f.write("ok")
    ports = free_ports(n)
    conf = os.path.join(conf_dir, "supervisord.conf")
    with open(conf, "w") as f:
        f.write(f"[supervisord]\nnodaemon=true\nlogfile={conf_dir}/supervisord.log\npidfile={conf_dir}/s.pid\n"
                f"[unix_http_server]\nfile={conf_dir}/s.sock\n"
                "[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n")
        for i, p in enumerate(ports):
            f.write(f"[program:web{i}]\ncommand=busybox httpd -f -p 127.0.0.1:{p}\ndirectory={conf_dir}\n"
                    f"startsecs=0\nautorestart=true\nstdout_logfile={conf_dir}/web{i}.log\nredirect_stderr=true\n")
    t0 = time.monotonic()
    proc = subprocess.Popen(["supervisord", "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pending = set(ports)
    while pending:
        pending = {p for p in pending if not http_200(p)}
        if pending:
            time.sleep(0.01)
    elapsed = time.monotonic() - t0
    time.sleep(3)
    rss = rss_kb(proc.pid)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    return elapsed, rss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--berth", default="target/release/berth")
    ap.add_argument("--n", type=int, default=100)
    args = ap.parse_args()
    berth = os.path.abspath(args.berth)
    if not shutil.which("supervisord") or not shutil.which("busybox"):
        raise SystemExit("needs Debian's supervisor and busybox-static packages")
    with tempfile.TemporaryDirectory() as work:
        b_time, b_idle, b_busy = bench_berth(berth, args.n, work)
        s_time, s_rss = bench_supervisord(args.n, work)
    n = args.n
    print(f"| measure | berth | supervisord | ratio |")
    print(f"|---|---|---|---|")
    print(f"| {n} instances to healthy (s) | {b_time:.2f} | {s_time:.2f} | berth {s_time / b_time:.2f}× faster |")
    print(f"| server RSS idle (MB) | {b_idle / 1024:.1f} | | |")
    print(f"| server RSS with {n} instances (MB) | {b_busy / 1024:.1f} | {s_rss / 1024:.1f} | |")
    print(f"| server memory per extra instance (KB) | {(b_busy - b_idle) / (n - 1):.0f} | | |")


if __name__ == "__main__":
    main()
