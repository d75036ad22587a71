#!/usr/bin/env bash
# Reload at 10,000 tags: 10 simulated Modbus devices x 1,000 registers polled at 1 s, 10 products of
# 1,000 fields, into a real Mosquitto. Measures, for a reload that changes one product and for one
# that changes all ten (the whole configuration re-planned):
#   - the time from SIGHUP to the first record of the changed product (p0, new version) at the broker;
#   - the CPU (% of one core) and peak RSS over the 5 s after the signal, beside the same before it.
#   scripts/bench-reload.sh            (BENCH_AGENT=<binary> to measure another build;
#                                       BENCH_RELOAD_REPEAT=n for n more reloads after those two)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin"
cargo build -q --profile gateway -p plantmesh --no-default-features --bin plantmesh
agent_bin=${BENCH_AGENT:-target/gateway/plantmesh}
sim=""
for b in target/release/plantmesh target/debug/plantmesh; do [ -x "$b" ] && { sim=$b; break; }; done
[ -n "$sim" ] || { cargo build -q -p plantmesh --bin plantmesh; sim=target/debug/plantmesh; }
command -v mosquitto >/dev/null || { echo "needs mosquitto (scripts/test.sh installs it)"; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
clk=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
now_ms() { date +%s%3N; }
port=$(free_port)
printf 'user root\npersistence false\nlog_dest none\nmax_queued_messages 1000000\nlistener %s 127.0.0.1\nallow_anonymous true\n' "$port" > "$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" & pids+=($!)

"$sim" simulate --devices 10 --registers 1000 > "$work/sim.out" & pids+=($!)
for _ in $(seq 100); do [ "$(grep -c '^SIM' "$work/sim.out" || true)" -ge 10 ] && break; sleep 0.1; done
mkdir -p "$work/cfg/products"
{
  printf '[agent]\nid = "gw-reload"\nsite = "fp"\narea = "a"\nline = "l"\ngovernance = "builtin-defaults"\nmetrics_listen = "off"\n\n'
  printf '[upstream]\nurl = "mqtt://127.0.0.1:%s"\n\n' "$port"
  while read -r _ i addr; do
    printf '[[devices]]\nid = "d%s"\nprotocol = "modbus_tcp"\naddress = "%s"\npoll_interval = "1s"\n' "$i" "$addr"
    for r in $(seq 0 999); do printf '[[devices.tags]]\nname = "r%s"\ntable = "holding"\naddress = %s\n' "$r" "$r"; done
  done < "$work/sim.out"
} > "$work/cfg/agent.toml"
product() { # product <i> <minor>
  printf 'id = "p%s"\nname = "p%s"\nversion = "1.%s.0"\ndomain = "fp"\nowner = "fp"\n' "$1" "$1" "$2"
  for r in $(seq 0 999); do printf '[[fields]]\nname = "r%s"\nsource = "d%s.r%s"\nunit = "1"\n' "$r" "$1" "$r"; done
  # A compatible change: one field more per minor version.
  for f in $(seq 1 "$2"); do printf '[[fields]]\nname = "extra%s"\nsource = "d%s.r0"\nunit = "1"\n' "$f" "$1"; done
}
for i in $(seq 0 9); do product "$i" 0 > "$work/cfg/products/p$i.toml"; done

PLANTMESH_LOG=info "$agent_bin" run --config "$work/cfg" --data-dir "$work/data" 2> "$work/agent.log" & agent=$!; pids+=($agent)
sleep 15
mosquitto_sub -p "$port" -t 'fp/a/l/fp/p0/v1' -R -C 1 -W 10 > /dev/null || { echo "no product messages"; cat "$work/agent.log"; exit 1; }

# sample <seconds>: CPU % and peak RSS MiB of the agent over that long.
sample() {
  local c0 c1 peak=0 r end
  c0=$(cpu_ticks "$agent"); end=$(( $(now_ms) + $1 * 1000 ))
  while [ "$(now_ms)" -lt "$end" ]; do r=$(rss_kib "$agent"); [ "$r" -gt "$peak" ] && peak=$r; sleep 0.02; done
  c1=$(cpu_ticks "$agent")
  awk -v d=$((c1 - c0)) -v clk="$clk" -v s="$1" -v p="$peak" 'BEGIN { printf "CPU %.1f %% of one core, peak RSS %.1f MiB", d / clk / s * 100, p / 1024 }'
}

# reload <label> <minor> <products...>: rewrite those products at that minor, SIGHUP, measure.
reload() {
  local label=$1 minor=$2; shift 2
  for i in "$@"; do product "$i" "$minor" > "$work/cfg/products/p$i.toml"; done
  echo "before: $(sample 5)"
  # The first p0 message of the new version, with its arrival time.
  ( mosquitto_sub -p "$port" -t 'fp/a/l/fp/p0/v1' -R -W 30 | while read -r line; do
      case "$line" in *"\"version\":\"1.$minor.0\""*) now_ms > "$work/first.$minor"; exit 0;; esac
    done ) & watcher=$!
  sleep 0.5
  t0=$(now_ms)
  kill -HUP "$agent"
  echo "after:  $(sample 5)"
  wait "$watcher" || true
  [ -f "$work/first.$minor" ] || { echo "$label: no record of the new version within 30 s"; tail -20 "$work/agent.log"; exit 1; }
  took=$(grep -o 'took_ms=[0-9]*' "$work/agent.log" | tail -1)
  sleep 10
  echo "settled (15 s after): RSS $(awk -v k="$(rss_kib "$agent")" 'BEGIN { printf "%.1f", k / 1024 }') MiB"
  echo "$label: SIGHUP -> first record of p0 1.$minor.0 at the broker: $(( $(cat "$work/first.$minor") - t0 )) ms (reload itself: ${took#took_ms=} ms)"
}
echo "== reload changing one product of ten (10,000 tags)"
reload "one product" 1 0
echo "== reload changing all ten products (10,000 tags re-planned)"
reload "all products" 2 0 1 2 3 4 5 6 7 8 9
# BENCH_RELOAD_REPEAT=n: n more one-product reloads, to see whether memory settles or grows.
for m in $(seq 3 $((2 + ${BENCH_RELOAD_REPEAT:-0}))); do
  echo "== repeat: one product, version 1.$m.0"
  reload "repeat" "$m" 0
done
grep -E "ERROR|refused" "$work/agent.log" | head -5 || true
