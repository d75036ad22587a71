#!/usr/bin/env bash
# Buffer throughput and fsync rate at the default group commit. BENCH_DIR picks the disk.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_SECONDS="${BENCH_SECONDS:-10}" cargo bench -q -p plantmesh --bench buffer
