#!/usr/bin/env bash
# Discovery propagation: time from an instance's health check passing to its
# first routed request, and from its check failing to its last, measured
# with real processes (a private `berth server`, two instances of the
# harness's own backend, closed-loop load through the HTTP router).
# See crates/net/examples/propagation.rs for how each sample is taken.
#
#   bench/propagation.sh              # 40 fail/recover cycles, 8 load connections
#   CYCLES=100 CONNS=4 bench/propagation.sh
#   HOPS=1 bench/propagation.sh       # also break each transition down per hop
#   BASE=main bench/propagation.sh    # run a build of that git ref first, same settings
#   LOG=/tmp/server.log bench/propagation.sh   # keep the server's log
set -euo pipefail

CYCLES=${CYCLES:-40}
CONNS=${CONNS:-8}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
EXTRA=()
if [ -n "${HOPS:-}" ]; then EXTRA+=(--hops); fi
if [ -n "${LOG:-}" ]; then EXTRA+=(--log "$LOG"); fi   # keep the server's log

echo "building berth and the propagation harness (release)" >&2
(cd "$ROOT" && CARGO_TARGET_DIR=$TARGET_DIR cargo build -q --release -p berth-cli -p berth-net --bin berth --example propagation)

run() { # label, berth binary
    echo "== $1" >&2
    echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    "$TARGET_DIR/release/examples/propagation" --berth "$2" --cycles "$CYCLES" --conns "$CONNS" "${EXTRA[@]}"
    echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
}

if [ -n "${BASE:-}" ]; then
    # The same harness against the berth of another ref, built in its own
    # worktree and target dir (`<target>-base`, kept for the next run).
    BASE_DIR=$(mktemp -d)
    trap 'git -C "$ROOT" worktree remove --force "$BASE_DIR" >/dev/null 2>&1 || true' EXIT
    git -C "$ROOT" worktree add --detach "$BASE_DIR" "$BASE" >&2
    echo "building berth at $BASE (release)" >&2
    # Start from this tree's build: only the workspace crates are rebuilt.
    [ -d "$TARGET_DIR-base" ] || cp -r "$TARGET_DIR" "$TARGET_DIR-base"
    (cd "$BASE_DIR" && CARGO_TARGET_DIR=$TARGET_DIR-base cargo build -q --release -p berth-cli --bin berth)
    echo "## base: $BASE ($(git -C "$ROOT" rev-parse --short "$BASE"))"
    run "base $BASE" "$TARGET_DIR-base/release/berth"
    echo
    echo "## this tree ($(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD || echo ', with local changes'))"
fi
run "this tree" "$TARGET_DIR/release/berth"
