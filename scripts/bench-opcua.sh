#!/usr/bin/env bash
# OPC UA at load: ITEMS monitored items changing every INTERVAL on a fast in-process server
# (`plantmesh simulate --opcua-items`), through plantmesh into a real Mosquitto at QoS 1.
# Prints data changes per second delivered, CPU, RSS and p50/p99 from SourceTimestamp to PUBACK.
#   scripts/bench-opcua.sh [ITEMS [INTERVAL]]      default 5000 100ms
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
items="${1:-5000}"
interval="${2:-100ms}"
seconds="${BENCH_SECONDS:-30}"
per_product=100
export PATH="$PATH:/usr/sbin"
command -v mosquitto >/dev/null || { echo "needs mosquitto (scripts/test.sh installs it)"; exit 1; }
cargo build -q --release -p plantmesh --bins
bin="$root/target/release/plantmesh"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; cp "$work/agent.log" "${TMPDIR:-/tmp}/bench-opcua-agent.log" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
clk=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

port=$(free_port)
printf 'user root\npersistence false\nlog_dest none\nmax_queued_messages 1000000\nlistener %s 127.0.0.1\nallow_anonymous true\n' "$port" > "$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" & pids+=($!)

"$bin" simulate --opcua-items "$items" --opcua-interval "$interval" > "$work/sim.out" 2> "$work/sim.err" & sim=$!; pids+=($sim)
for _ in $(seq 200); do grep -q '^SIM-OPCUA' "$work/sim.out" 2>/dev/null && break; sleep 0.1; done
endpoint=$(awk '/^SIM-OPCUA/{print $2}' "$work/sim.out")
mkdir -p "$work/cfg/products"
{
  printf '[agent]\nid = "gw-bench"\nsite = "bench"\narea = "a"\nline = "l"\ngovernance = "builtin-defaults"\n\n'
  printf '[upstream]\nurl = "mqtt://127.0.0.1:%s"\nprotocol = "5"\nmax_inflight = 64\n\n[buffer]\nmax_bytes = "1GiB"\n\n' "$port"
  printf '[[devices]]\nid = "bank"\nprotocol = "opcua"\nendpoint = "%s"\nsecurity_policy = "None"\npublishing_interval = "%s"\n' "$endpoint" "$interval"
  for i in $(seq 0 $((items - 1))); do
    printf '[[devices.tags]]\nname = "i%s"\nnode_id = "s=Item%s"\nnamespace_uri = "urn:plantmesh:sim:bank"\nsampling_interval = "%s"\nqueue_size = 2\n' "$i" "$i" "$interval"
  done
} > "$work/cfg/agent.toml"
for p in $(seq 0 $((items / per_product - 1))); do
  {
    printf 'id = "p%s"\nname = "p%s"\nversion = "1.0.0"\ndomain = "bench"\nowner = "bench"\n' "$p" "$p"
    for i in $(seq $((p * per_product)) $((p * per_product + per_product - 1))); do printf '[[fields]]\nname = "i%s"\nsource = "bank.i%s"\n' "$i" "$i"; done
  } > "$work/cfg/products/p$p.toml"
done
"$bin" check "$work/cfg" > /dev/null
PLANTMESH_LOG=info "$bin" run --config "$work/cfg" --data-dir "$work/data" 2> "$work/agent.log" & agent=$!; pids+=($agent)
sleep 5
t0=$(date +%s.%N); c0=$(cpu_ticks "$agent"); s0=$(cpu_ticks "$sim")
sleep "$seconds"
t1=$(date +%s.%N); c1=$(cpu_ticks "$agent"); s1=$(cpu_ticks "$sim")
rss=$(awk '/VmRSS/{print $2}' "/proc/$agent/status"); hwm=$(awk '/VmHWM/{print $2}' "/proc/$agent/status")
kill -TERM "$agent"; wait "$agent" || true
summary=$(grep 'publisher stopped' "$work/agent.log" | tail -1)
records=$(sed -n 's/.*records_acked=\([0-9]*\).*/\1/p' <<< "$summary")
p50=$(sed -n 's/.*latency_p50_ms=\([0-9]*\).*/\1/p' <<< "$summary")
p99=$(sed -n 's/.*latency_p99_ms=\([0-9]*\).*/\1/p' <<< "$summary")
python3 - "$items" "$interval" "$records" "$per_product" "$t0" "$t1" "$c0" "$c1" "$s0" "$s1" "$clk" "$rss" "$hwm" "$p50" "$p99" "$seconds" <<'PY'
import sys
items, interval, records, per, t0, t1, c0, c1, s0, s1, clk, rss, hwm, p50, p99, secs = sys.argv[1:]
wall = float(t1) - float(t0)
iv = float(interval[:-2]) / 1000 if interval.endswith("ms") else float(interval[:-1])
offered = int(items) / iv
delivered = int(records) * int(per)
run = wall + 5
print(f"{items} items every {interval}: offered {offered:.0f} changes/s; delivered {delivered} values "
      f"(~{delivered / run:.0f}/s over the run, warm-up and drain included); agent CPU {(int(c1) - int(c0)) * 1000 / int(clk) / wall:.0f} core-ms/s "
      f"(server {(int(s1) - int(s0)) * 1000 / int(clk) / wall:.0f}); RSS {int(rss) / 1024:.1f} MiB (peak {int(hwm) / 1024:.1f}); "
      f"SourceTimestamp-to-PUBACK p50 {p50} ms, p99 {p99} ms")
PY
