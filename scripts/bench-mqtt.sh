#!/usr/bin/env bash
# MQTT in, through a real Mosquitto, into products published upstream at QoS 1 (release build).
# A Python publisher (tests/peers/mqtt_flood.py) sends machine data at RATE messages/s for SECONDS,
# round-robin over MACHINES machines (one product each, every_sample), as JSON or Sparkplug B.
# Prints messages/s taken in, agent CPU core-ms per 1000 messages, and RSS.
#   scripts/bench-mqtt.sh                 JSON then Sparkplug, 2000 messages/s
#   BENCH_RATE=5000 BENCH_MODES=json scripts/bench-mqtt.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
seconds="${BENCH_SECONDS:-20}"
rate="${BENCH_RATE:-2000}"
machines="${BENCH_MACHINES:-10}"
modes="${BENCH_MODES:-json sparkplug}"
export PATH="$PATH:/usr/sbin"
command -v mosquitto >/dev/null || { echo "needs mosquitto (scripts/test.sh installs it)"; exit 1; }
py="${PLANTMESH_PYTHON:-$root/.venv/bin/python}"
[ -x "$py" ] || { echo "needs the test peers' Python at $py (scripts/test.sh creates it)"; exit 1; }
cargo build -q --release -p plantmesh --bins
bin="$root/target/release/plantmesh"
# BENCH_AGENT=<binary>: measure another build of the agent (e.g. a gateway build); simulators stay.
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
clk=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
polls() { curl -s "http://$1/metrics" | awk '/^plantmesh_device_polls_total\{device="machines"\}/ {print $2}'; }
acked() { curl -s "http://$1/metrics" | awk '/^plantmesh_records_acked_total / {print $2}'; }

port=$(free_port)
printf 'user root\npersistence false\nlog_dest none\nmax_queued_messages 1000000\nlistener %s 127.0.0.1\nallow_anonymous true\n' "$port" > "$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" & pids+=($!)
sleep 0.5

for mode in $modes; do
  mport=$(free_port)
  rm -rf "$work/cfg" "$work/data"
  mkdir -p "$work/cfg/products"
  if [ "$mode" = json ]; then
    tags='
  [[devices.tags]]
  name = "{m}_temp"
  topic = "bench/+m/state"
  pointer = "/temp"
  timestamp_pointer = "/ts"
  [[devices.tags]]
  name = "{m}_count"
  topic = "bench/+m/state"
  pointer = "/count"
  timestamp_pointer = "/ts"
  type = "i64"
  [[devices.tags]]
  name = "{m}_state"
  topic = "bench/+m/state"
  pointer = "/state"
  timestamp_pointer = "/ts"
  type = "string"'
  else
    tags='
  [[devices.tags]]
  name = "{m}_temp"
  sparkplug = "G/edge/+m"
  metric = "temp"
  [[devices.tags]]
  name = "{m}_count"
  sparkplug = "G/edge/+m"
  metric = "count"
  type = "i64"
  [[devices.tags]]
  name = "{m}_state"
  sparkplug = "G/edge/+m"
  metric = "state"
  type = "string"'
  fi
  cat > "$work/cfg/agent.toml" <<CONF
[agent]
id = "gw-bench"
site = "bench"
area = "a"
line = "l"
governance = "builtin-defaults"
metrics_listen = "127.0.0.1:$mport"
[upstream]
url = "mqtt://127.0.0.1:$port"
max_inflight = 64
[[devices]]
id = "machines"
protocol = "mqtt"
url = "mqtt://127.0.0.1:$port"
$tags
CONF
  for i in $(seq 0 $((machines - 1))); do
    cat > "$work/cfg/products/m$i.toml" <<CONF
id = "m$i"
name = "machine $i"
version = "1.0.0"
domain = "bench"
owner = "bench"
[[fields]]
name = "temp"
source = "machines.m${i}_temp"
unit = "Cel"
[[fields]]
name = "count"
source = "machines.m${i}_count"
unit = "1"
[[fields]]
name = "state"
source = "machines.m${i}_state"
CONF
  done
  PLANTMESH_LOG=warn "${BENCH_AGENT:-$bin}" run --config "$work/cfg" --data-dir "$work/data" 2> "$work/agent-$mode.log" & agent=$!; pids+=($agent)
  sleep 2
  t0=$(date +%s.%N); c0=$(cpu_ticks "$agent"); m0=$(polls "127.0.0.1:$mport"); a0=$(acked "127.0.0.1:$mport")
  (cd tests/peers && "$py" mqtt_flood.py --port "$port" --mode "$mode" --rate "$rate" --seconds "$seconds" --machines "$machines") > "$work/flood.out"
  sleep 2
  t1=$(date +%s.%N); c1=$(cpu_ticks "$agent"); m1=$(polls "127.0.0.1:$mport"); a1=$(acked "127.0.0.1:$mport")
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$agent/status")
  sent=$(awk '/^SENT/ {print $2}' "$work/flood.out")
  kill "$agent"; wait "$agent" 2>/dev/null || true
  python3 - "$mode" "$t0" "$t1" "$c0" "$c1" "$m0" "$m1" "$a0" "$a1" "$clk" "$rss" "$sent" "$seconds" <<'PY'
import sys
mode = sys.argv[1]
t0, t1, c0, c1, m0, m1, a0, a1, clk, rss, sent, seconds = map(float, sys.argv[2:])
msgs = m1 - m0
cpu_ms = (c1 - c0) / clk * 1000
print(f"{mode:9}: sent {sent:.0f} in {seconds:.0f} s; taken in {msgs:.0f} ({msgs / seconds:.0f} messages/s), "
      f"records acknowledged upstream {a1 - a0:.0f}; agent CPU {cpu_ms / max(msgs, 1) * 1000:.0f} core-ms per 1000 messages "
      f"({cpu_ms / (t1 - t0) / 10:.1f} % of one core); RSS {rss / 1024:.1f} MiB")
PY
done
