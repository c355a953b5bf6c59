#!/usr/bin/env bash
# Server CPU and RSS while idle, without and then with the dashboard open in
# headless Chromium on a 50-instance stack (issue 5). Usage:
#   bench/dashboard.sh [path/to/berth] [seconds]
# Prints one line per phase: CPU % of one core over the window, RSS in MiB.
set -euo pipefail
BERTH=${1:-target/release/berth}
SECS=${2:-60}
work=$(mktemp -d)
export BERTH_DATA_DIR=$work/data
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
api=$(free_port)
"$BERTH" server --listen 127.0.0.1:$api --no-http --no-dns --dashboard-no-auth >"$work/server.log" 2>&1 &
server=$!
chrome=
cleanup() {
  [ -n "$chrome" ] && kill "$chrome" 2>/dev/null || true
  (cd "$work/stack" 2>/dev/null && "$BERTH" down -p bench >/dev/null 2>&1) || true
  kill "$server" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 100); do [ -S "$BERTH_DATA_DIR/berth.sock" ] && break; sleep 0.1; done
mkdir -p "$work/stack"
cat >"$work/stack/compose.yaml" <<'YAML'
services:
  web:
    command: ["sh", "-c", "while true; do echo tick; sleep 5; done"]
    deploy:
      replicas: 50
YAML
(cd "$work/stack" && "$BERTH" up -d -p bench >/dev/null 2>&1)
sleep 5
ticks() { awk '{print $14+$15}' "/proc/$server/stat"; }
rss() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$server/status"; }
hz=$(getconf CLK_TCK)
measure() {
  local t0 t1
  t0=$(ticks); sleep "$SECS"; t1=$(ticks)
  # Open connections to the API: the dashboard's streams (0 without it).
  local conns
  conns=$(ss -tn state established "( sport = :$api )" | tail -n +2 | wc -l)
  echo "$1: $conns API connections, cpu $(python3 -c "print(f'{($t1-$t0)/$hz/$SECS*100:.2f}')")% of a core, rss $(rss) MiB"
}
measure "idle, no dashboard"
chromium --headless=new --no-sandbox --disable-gpu --user-data-dir="$work/profile" \
  --remote-debugging-port=0 "http://127.0.0.1:$api/ui/#/stack/default/bench" >/dev/null 2>&1 &
chrome=$!
sleep 10
measure "idle, dashboard open on the stack page"
kill "$chrome"; wait "$chrome" 2>/dev/null || true
# The service page also follows the 50 instances' logs (10 lines/s).
chromium --headless=new --no-sandbox --disable-gpu --user-data-dir="$work/profile" \
  --remote-debugging-port=0 "http://127.0.0.1:$api/ui/#/service/default/bench/web" >/dev/null 2>&1 &
chrome=$!
sleep 10
measure "idle, dashboard open on the service page (live logs)"
