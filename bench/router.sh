#!/usr/bin/env bash
# Router benchmark: berth's HTTP router against nginx and HAProxy as reverse
# proxies, in one run, with the same backend and the same wrk settings.
#
#   bench/router.sh            # 3 rounds × 10 s per target, 2 wrk threads, 64 connections
#   ROUNDS=5 DURATION=5s CONNS=32 bench/router.sh
#   ROUTER=/path/to/examples/router bench/router.sh   # a router built elsewhere
#   BASELINE=/path/to/older/router bench/router.sh     # also an older build, same run
#
# The backend is nginx answering a small fixed body (one worker). Each proxy
# gets 2 workers/threads and keeps connections to the backend alive. All
# traffic stays on 127.0.0.1; every wrk run is bounded by DURATION.
#
# The machine is shared and noisy, so one run per target is not enough: two
# single runs once disagreed by 2× (0.74× and 1.63× nginx). Each round runs
# every target once, in an order rotated from round to round, so a burst of
# outside load hits different targets in different rounds; the table reports
# each target's median over the rounds (and the spread of its req/s).
# berth's router runs as `berth server` runs it: one single-threaded
# runtime per thread, SO_REUSEPORT (`Router::serve_on_threads`).
#
# Requests/s and latency depend on how the kernel shares 2 cores between
# wrk, the proxy and the backend, so the table also gives each proxy's CPU
# time per request (user + system, from /proc/PID/stat of the proxy and its
# children, over the measured wrk run): the fairer comparison of what the
# proxies themselves cost on a shared machine.
# Prints a Markdown table: requests/s, p50, p99, CPU µs per request, and
# ratios against nginx.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
THREADS=${THREADS:-2}
CONNS=${CONNS:-64}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]} (apt)" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)

if [ -z "${ROUTER:-}" ]; then
    echo "building the router example (release)" >&2
    CARGO_TARGET_DIR=$TARGET_DIR cargo build -q --release -p berth-net --example router
    ROUTER=$TARGET_DIR/release/examples/router
fi

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_port() {
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "nothing listens on port $1" >&2
    tail -n 5 "$WORK"/*.err >&2 || true
    return 1
}

BACKEND=$(free_port)
NGINX_PROXY=$(free_port)
HAPROXY_PORT=$(free_port)
BERTH=$(free_port)

nginx_conf() { # name workers server-block
    mkdir -p "$WORK/$1"
    cat >"$WORK/$1/nginx.conf" <<EOF
worker_processes $2;
daemon off;
pid $WORK/$1/nginx.pid;
error_log $WORK/$1/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/$1/body;
    proxy_temp_path $WORK/$1/proxy;
    fastcgi_temp_path $WORK/$1/fastcgi;
    uwsgi_temp_path $WORK/$1/uwsgi;
    scgi_temp_path $WORK/$1/scgi;
    keepalive_requests 1000000;
    $3
}
EOF
}

nginx_conf backend 1 "server { listen 127.0.0.1:$BACKEND; location / { default_type text/plain; return 200 'hello, world\n'; } }"
nginx_conf proxy 2 "upstream app { server 127.0.0.1:$BACKEND; keepalive 128; }
    server { listen 127.0.0.1:$NGINX_PROXY; location / {
        proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\";
        proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for; proxy_set_header Host \$host; } }"
cat >"$WORK/haproxy.cfg" <<EOF
global
    nbthread 2
    maxconn 4000
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
    option forwardfor
    http-reuse always
frontend fe
    bind 127.0.0.1:$HAPROXY_PORT
    default_backend be
backend be
    server s1 127.0.0.1:$BACKEND
EOF

declare -A PID
"$NGINX" -c "$WORK/backend/nginx.conf" -p "$WORK/backend" 2>"$WORK/backend.err" &
PIDS+=($!)
PID["backend (direct)"]=$!
"$NGINX" -c "$WORK/proxy/nginx.conf" -p "$WORK/proxy" 2>"$WORK/proxy.err" &
PIDS+=($!)
PID["nginx"]=$!
"$HAPROXY" -db -f "$WORK/haproxy.cfg" 2>"$WORK/haproxy.err" &
PIDS+=($!)
PID["HAProxy"]=$!
"$ROUTER" --listen "127.0.0.1:$BERTH" --backend "127.0.0.1:$BACKEND" --threads 2 2>"$WORK/router.err" &
PIDS+=($!)
PID["berth router"]=$!
for p in "$BACKEND" "$NGINX_PROXY" "$HAPROXY_PORT" "$BERTH"; do wait_port "$p"; done
if [ -n "${BASELINE:-}" ]; then
    BERTH_BASE=$(free_port)
    "$BASELINE" --listen "127.0.0.1:$BERTH_BASE" --backend "127.0.0.1:$BACKEND" --threads 2 2>"$WORK/baseline.err" &
    PIDS+=($!)
    PID["berth router (baseline build)"]=$!
    wait_port "$BERTH_BASE"
fi

# wrk latency "123.45us" / "1.23ms" / "1.02s" → milliseconds
to_ms() {
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
        else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v * 1000 }
        else { print v } }'
}

declare -A RPS P50 P99 CPU PORT
NAMES=("backend (direct)" "berth router" "nginx" "HAProxy")
PORT["backend (direct)"]=$BACKEND
PORT["berth router"]=$BERTH
PORT["nginx"]=$NGINX_PROXY
PORT["HAProxy"]=$HAPROXY_PORT
if [ -n "${BASELINE:-}" ]; then
    NAMES+=("berth router (baseline build)")
    PORT["berth router (baseline build)"]=$BERTH_BASE
fi
HZ=$(getconf CLK_TCK)

# user + system clock ticks of a process and its children (nginx workers)
ticks() {
    local t=0 p
    for p in "$1" $(pgrep -P "$1"); do
        t=$((t + $(awk '{ print $14 + $15 }' "/proc/$p/stat")))
    done
    echo "$t"
}

run() { # name port round
    wrk -t"$THREADS" -c"$CONNS" -d"$WARMUP" "http://127.0.0.1:$2/" >/dev/null
    local out before after
    before=$(ticks "${PID[$1]}")
    out=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency "http://127.0.0.1:$2/")
    after=$(ticks "${PID[$1]}")
    echo "$out" >"$WORK/$1.$3.wrk"
    if grep -q "Non-2xx\|Socket errors" <<<"$out"; then
        echo "warning: $1: $(grep "Non-2xx\|Socket errors" <<<"$out")" >&2
    fi
    local rps p50 p99 n cpu
    rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    n=$(awk '/requests in/ {print $1}' <<<"$out")
    cpu=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$n" 'BEGIN { printf "%.2f", t / hz * 1e6 / n }')
    p50=$(to_ms "$(awk '$1 == "50%" {print $2}' <<<"$out")")
    p99=$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")
    RPS[$1]+="$rps "
    P50[$1]+="$p50 "
    P99[$1]+="$p99 "
    CPU[$1]+="$cpu "
    echo "round $3: $1: $rps req/s, p50 $p50 ms, p99 $p99 ms, $cpu µs CPU/request (load $(cut -d' ' -f1 /proc/loadavg))" >&2
}

median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
spread() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk 'NR==1 {lo=$1} {hi=$1} END {printf "%.0f–%.0f", lo, hi}'; }

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
n=${#NAMES[@]}
for ((r = 0; r < ROUNDS; r++)); do
    for ((i = 0; i < n; i++)); do
        name=${NAMES[$(((i + r) % n))]}
        run "$name" "${PORT[$name]}" "$r"
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

declare -A MRPS MP50 MP99 MCPU
for name in "${NAMES[@]}"; do
    MRPS[$name]=$(median "${RPS[$name]}")
    MP50[$name]=$(median "${P50[$name]}")
    MP99[$name]=$(median "${P99[$name]}")
    MCPU[$name]=$(median "${CPU[$name]}")
done

echo
echo "wrk -t$THREADS -c$CONNS -d$DURATION --latency, keep-alive, 13-byte body; $(nproc) cores shared by wrk, proxy and backend"
echo "median of $ROUNDS interleaved rounds; load average before: $LOAD_BEFORE, after: $LOAD_AFTER"
echo
echo "CPU µs/request: the target's own processes (for the backend row, the backend alone)"
echo
echo "| target | req/s (median) | req/s range | p50 ms | p99 ms | CPU µs/request | req/s vs nginx | p99 vs nginx | CPU/request vs nginx |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for name in "${NAMES[@]}"; do
    awk -v n="$name" -v r="${MRPS[$name]}" -v range="$(spread "${RPS[$name]}")" -v p50="${MP50[$name]}" -v p99="${MP99[$name]}" \
        -v cpu="${MCPU[$name]}" -v nr="${MRPS[nginx]}" -v np="${MP99[nginx]}" -v nc="${MCPU[nginx]}" \
        'BEGIN { printf "| %s | %.0f | %s | %.3f | %.3f | %.1f | %.2f× | %.2f× | %.2f× |\n", n, r, range, p50, p99, cpu, r / nr, p99 / np, cpu / nc }'
done
