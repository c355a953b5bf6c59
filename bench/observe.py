#!/usr/bin/env python3
"""Benchmark: what watching costs. A 50-instance stack idles under a berth
server for two equal windows in one run:

  A. nobody watching;
  B. an SSE client following GET /v1/events and a GET /metrics scrape every
     10 s (what an open dashboard plus a Prometheus do), with the built-in
     history sampling every 10 s in both windows.

Server CPU (utime+stime from /proc, agent included: it runs in-process) and
RSS are measured in each window; the difference is the cost of watching.

Usage: bench/observe.py [--berth target/release/berth] [--n 50] [--window 60]
Prints a Markdown table for BENCHMARKS.md.
"""
import argparse
import json
import os
import socket
import subprocess
import tempfile
import threading
import time

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / TICKS


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(port, path, stream=None):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    if stream is not None:
        return s
    out = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        out += b
    s.close()
    return out


def window(pid, seconds):
    c0, t0 = cpu_s(pid), time.time()
    peak = rss_kb(pid)
    while time.time() - t0 < seconds:
        time.sleep(1)
        peak = max(peak, rss_kb(pid))
    return (cpu_s(pid) - c0) / (time.time() - t0) * 100, rss_kb(pid), peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--berth", default="target/release/berth")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--window", type=int, default=60)
    a = ap.parse_args()
    berth = os.path.abspath(a.berth)
    data = tempfile.mkdtemp(prefix="berth-observe-")
    work = tempfile.mkdtemp(prefix="berth-observe-stack-")
    with open(os.path.join(work, "compose.yaml"), "w") as f:
        f.write(
            "services:\n"
            "  web:\n"
            "    command: [\"sh\", \"-c\", \"exec busybox httpd -f -p 127.0.0.1:$$PORT\"]\n"
            f"    deploy: {{ replicas: {a.n} }}\n"
            "    x-berth:\n"
            "      healthcheck: { http: /, interval: 10s, start_interval: 100ms }\n"
        )
    with open(os.path.join(work, "index.html"), "w") as f:
        f.write("ok")
    env = dict(os.environ, BERTH_DATA_DIR=data, NO_COLOR="1",
               BERTH_HTTP=f"127.0.0.1:{free_port()}", BERTH_DNS=f"127.0.0.1:{free_port()}")
    up = subprocess.run([berth, "up", "-d", "-p", "obs", "--wait-timeout", "120s"], cwd=work,
                        env=env, stdout=subprocess.DEVNULL)
    info = json.load(open(os.path.join(data, "server.json")))
    pid, port = info["pid"], int(info["tcp"][0].rsplit(":", 1)[1])
    try:
        if up.returncode != 0:
            raise SystemExit(f"berth up failed ({up.returncode}); see {data}/server.log")
        time.sleep(15)  # let start-up settle
        cpu_a, rss_a, peak_a = window(pid, a.window)

        stop = threading.Event()
        sse = http(port, "/v1/events?follow=true", stream=True)
        got = []

        def reader():
            sse.settimeout(1)
            while not stop.is_set():
                try:
                    b = sse.recv(65536)
                except socket.timeout:
                    continue
                if not b:
                    return
                got.append(len(b))

        def scraper():
            while not stop.is_set():
                body = http(port, "/metrics")
                got.append(len(body))
                stop.wait(10)

        threads = [threading.Thread(target=reader), threading.Thread(target=scraper)]
        for t in threads:
            t.start()
        cpu_b, rss_b, peak_b = window(pid, a.window)
        stop.set()
        for t in threads:
            t.join()
        sse.close()
        scrape = http(port, "/metrics")
        series = sum(1 for l in scrape.decode().splitlines() if l and not l.startswith("#"))
    finally:
        subprocess.run([berth, "down", "-p", "obs"], cwd=work, env=env, stdout=subprocess.DEVNULL)
        os.kill(pid, 15)
    print(f"| measure ({a.n} instances, {a.window} s windows) | idle, nobody watching | SSE on /v1/events + /metrics every 10 s | extra |")
    print("|---|---|---|---|")
    print(f"| server CPU (% of one core) | {cpu_a:.2f} | {cpu_b:.2f} | {cpu_b - cpu_a:+.2f} |")
    print(f"| server RSS at end (MB) | {rss_a / 1024:.1f} | {rss_b / 1024:.1f} | {(rss_b - rss_a) / 1024:+.1f} |")
    print(f"| server RSS peak (MB) | {peak_a / 1024:.1f} | {peak_b / 1024:.1f} | {(peak_b - peak_a) / 1024:+.1f} |")
    print(f"\n/metrics: {len(scrape)} bytes, {series} samples")


if __name__ == "__main__":
    main()
