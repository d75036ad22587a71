#!/usr/bin/env bash
# Sensor-node link into a real Mosquitto at QoS 1 (release build): a simulated node (the firmware
# library, sensor waits skipped) writes a cycle every INTERVAL ms into a pty; the agent publishes
# every cycle. Prints frames/s read, agent CPU core-ms per 1000 frames, and RSS.
#   scripts/bench-sensor.sh            1 ms cycles (about 1000 frames/s)
#   BENCH_INTERVAL_MS=0 scripts/bench-sensor.sh   back to back
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
seconds="${BENCH_SECONDS:-20}"
interval="${BENCH_INTERVAL_MS:-1}"
export PATH="$PATH:/usr/sbin"
command -v mosquitto >/dev/null || { echo "needs mosquitto (scripts/test.sh installs it)"; exit 1; }
cargo build -q --release -p plantmesh --bins
bin="$root/target/release/plantmesh"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
clk=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
polls() { curl -s "http://$1/metrics" | awk '/^plantmesh_device_polls_total\{device="node"\}/ {print $2}'; }

port=$(free_port)
printf 'user root\npersistence false\nlog_dest none\nmax_queued_messages 1000000\nlistener %s 127.0.0.1\nallow_anonymous true\n' "$port" > "$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" & pids+=($!)
"$bin" simulate --sensor-node --link "$work/tty" --interval-ms "$interval" --no-delays > "$work/sim.out" & pids+=($!)
for _ in $(seq 50); do [ -e "$work/tty" ] && break; sleep 0.1; done
mport=$(free_port)
mkdir -p "$work/cfg/products"
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
protocol = "5"
max_inflight = 64
[[devices]]
id = "node"
protocol = "sensor_node"
port = "$work/tty"
CONF
cat > "$work/cfg/products/node.toml" <<'CONF'
id = "node"
name = "node"
version = "1.0.0"
domain = "bench"
owner = "bench"
[[fields]]
name = "t"
source = "node.temperature"
unit = "Cel"
[[fields]]
name = "h"
source = "node.humidity"
unit = "%"
[[fields]]
name = "p"
source = "node.line_pressure"
unit = "bar"
[[fields]]
name = "l"
source = "node.tank_level"
unit = "m"
CONF
PLANTMESH_LOG=warn "$bin" run --config "$work/cfg" --data-dir "$work/data" 2> "$work/agent.log" & agent=$!; pids+=($agent)
sleep 3
t0=$(date +%s.%N); c0=$(cpu_ticks "$agent"); f0=$(polls "127.0.0.1:$mport")
sleep "$seconds"
t1=$(date +%s.%N); c1=$(cpu_ticks "$agent"); f1=$(polls "127.0.0.1:$mport")
rss=$(awk '/VmRSS/ {print $2}' "/proc/$agent/status")
python3 - "$t0" "$t1" "$c0" "$c1" "$f0" "$f1" "$clk" "$rss" "$interval" <<'PY'
import sys
t0, t1, c0, c1, f0, f1, clk, rss, interval = map(float, sys.argv[1:])
frames = f1 - f0
secs = t1 - t0
cpu_ms = (c1 - c0) / clk * 1000
print(f"sensor link, {interval:g} ms cycles: {frames / secs:,.0f} frames/s read, "
      f"{cpu_ms / (frames / 1000):.2f} core-ms per 1000 frames, RSS {rss / 1024:.1f} MiB")
PY
