#!/usr/bin/env bash
# Discovery propagation: time from an instance's health check passing to its
# first routed request, and from its check failing to its last, measured
# with real processes (a private `berth server`, two instances of the
# harness's own backend, closed-loop load through the HTTP router).
# See crates/net/examples/propagation.rs for how each sample is taken.
#
#   bench/propagation.sh              # 40 fail/recover cycles, 8 load connections
#   CYCLES=100 CONNS=4 bench/propagation.sh
set -euo pipefail

CYCLES=${CYCLES:-40}
CONNS=${CONNS:-8}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

echo "building berth and the propagation harness (release)" >&2
(cd "$ROOT" && CARGO_TARGET_DIR=$TARGET_DIR cargo build -q --release -p berth-cli -p berth-net --bin berth --example propagation)
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
"$TARGET_DIR/release/examples/propagation" --berth "$TARGET_DIR/release/berth" --cycles "$CYCLES" --conns "$CONNS"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
