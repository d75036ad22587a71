#!/usr/bin/env bash
# Soak: the agent killed with SIGKILL again and again (default 500 cycles, 0.2-1 s apart), with
# uplink outages and broker restarts, against Mosquitto and a pymodbus device, a persistent QoS 1
# subscriber checking completeness by the documented rules (docs/wire-format.md): every message
# committed at a kill is delivered identical, every seq is delivered or in a gap event, epochs only
# grow. Prints records committed, delivered, lost, duplicates and wall time.
#
#   scripts/soak.sh [cycles] [broker restart every N cycles on average, 0: never]
#
# The suite (scripts/test.sh) runs the same test with 50 cycles. Needs what scripts/test.sh
# installs (mosquitto, the Python venv with pymodbus).
set -euo pipefail
cd "$(dirname "$0")/.."
cycles=${1:-500}
every=${2:-8}
export PLANTMESH_PYTHON="${PLANTMESH_PYTHON:-$PWD/.venv/bin/python}"
[ -x "$PLANTMESH_PYTHON" ] || { echo "no Python venv at $PLANTMESH_PYTHON: run scripts/test.sh once"; exit 1; }
command -v mosquitto >/dev/null || { echo "needs mosquitto (scripts/test.sh installs it)"; exit 1; }
cargo build -q -p plantmesh
start=$(date +%s)
log=$(mktemp)
status=0
PLANTMESH_CRASH_CYCLES=$cycles PLANTMESH_BROKER_RESTART_EVERY=$every \
  cargo test -q -p plantmesh-e2e --test fastpath sigkill_in_a_loop -- --nocapture --test-threads=1 >"$log" 2>&1 || status=$?
grep -E "^soak:|panicked|test result" "$log" || tail -40 "$log"
echo "wall time: $(( $(date +%s) - start )) s (full output: $log)"
exit "$status"
