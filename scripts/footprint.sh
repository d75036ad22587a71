#!/usr/bin/env bash
# Footprint of the gateway build: stripped binary size per target and feature set, RSS with 10,000
# tags polled at 1 s from simulated Modbus devices into a real Mosquitto, and idle CPU.
#   scripts/footprint.sh            measure and print
#   scripts/footprint.sh --check    also fail when a budget in README.md ("Footprint budgets") is exceeded
# Uses the cross builds that exist (scripts/build-gateway.sh <target>) and builds the host's gateway
# binaries, glibc and static musl (no-ops when up to date). RSS and CPU are measured on those, each
# while it is seen delivering live product messages: under qemu-user they would be the emulator's.
#   FOOTPRINT_AGENT=<binary>        measure that binary only (FOOTPRINT_WRAP=<cmd> runs it under cmd)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
check=0
[ "${1:-}" = "--check" ] && check=1
seconds=${FOOTPRINT_SECONDS:-20}
export PATH="$PATH:/usr/sbin"

mib() { awk -v s="$1" 'BEGIN { printf "%.2f", s / 1048576 }'; }
declare -A measured

echo "== binary size (stripped)"
printf '%-40s %-24s %10s\n' target features MiB
# Always through cargo: a no-op when up to date, and never a stale binary measured.
cargo build -q --profile gateway -p plantmesh --no-default-features --bin plantmesh
for t in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf; do
  b="target/$t/gateway/plantmesh"
  [ -f "$b" ] || continue
  printf '%-40s %-24s %10s\n' "$t" "gateway (no broker, sims)" "$(mib "$(stat -c %s "$b")")"
  [ "$t" = aarch64-unknown-linux-gnu ] && measured[aarch64_binary_mib]=$(mib "$(stat -c %s "$b")")
done
printf '%-40s %-24s %10s\n' "host ($(uname -m))" "gateway (no broker, sims)" "$(mib "$(stat -c %s target/gateway/plantmesh)")"
# The static build of the host, for RSS: the same code as the static ARM builds.
static_target="$(uname -m)-unknown-linux-musl"
if ! out=$(scripts/build-gateway.sh "$static_target" 2>&1); then echo "$out"; exit 1; fi
static="target/$static_target/gateway/plantmesh"
printf '%-40s %-24s %10s\n' "host $static_target" "gateway (no broker, sims)" "$(mib "$(stat -c %s "$static")")"
[ -f target/release/plantmesh ] && printf '%-40s %-24s %10s\n' "host ($(uname -m))" "default (broker, sims)" "$(mib "$(stat -c %s target/release/plantmesh)")"

# The simulated devices come from a build with simulators (any profile).
sim=""
for b in target/release/plantmesh target/debug/plantmesh; do [ -x "$b" ] && { sim=$b; break; }; done
[ -n "$sim" ] || { cargo build -q -p plantmesh --bin plantmesh; sim=target/debug/plantmesh; }
command -v mosquitto >/dev/null || { echo "needs mosquitto (scripts/test.sh installs it)"; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
[ -n "${FOOTPRINT_KEEP:-}" ] && trap - EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
clk=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
port=$(free_port)
printf 'user root\npersistence false\nlog_dest none\nmax_queued_messages 1000000\nlistener %s 127.0.0.1\nallow_anonymous true\n' "$port" > "$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" & pids+=($!)

header() {
  printf '[agent]\nid = "gw-footprint"\nsite = "fp"\narea = "a"\nline = "l"\ngovernance = "builtin-defaults"\nmetrics_listen = "off"\n\n'
  printf '[upstream]\nurl = "mqtt://127.0.0.1:%s"\n\n' "$port"
}

echo "== idle: no devices, connected upstream, ${seconds}s"
mkdir -p "$work/idle/products"
header > "$work/idle/agent.toml"
PLANTMESH_LOG=warn target/gateway/plantmesh run --config "$work/idle" --data-dir "$work/idle-data" 2> "$work/idle.log" & idle=$!; pids+=($idle)
sleep 3
c0=$(cpu_ticks "$idle"); sleep "$seconds"; c1=$(cpu_ticks "$idle")
idle_cpu=$(awk -v d=$((c1 - c0)) -v clk="$clk" -v s="$seconds" 'BEGIN { printf "%.2f", d / clk / s * 100 }')
echo "idle CPU: ${idle_cpu} % of one core; RSS $(awk -v k="$(rss_kib "$idle")" 'BEGIN { printf "%.1f", k / 1024 }') MiB"
measured[idle_cpu_percent]=$idle_cpu
kill "$idle"

echo "== 10,000 tags at 1 s: 10 simulated devices x 1,000 registers, 10 products, ${seconds}s after 15s warm-up"
"$sim" simulate --devices 10 --registers 1000 > "$work/sim.out" & pids+=($!)
for _ in $(seq 100); do [ "$(grep -c '^SIM' "$work/sim.out" || true)" -ge 10 ] && break; sleep 0.1; done
mkdir -p "$work/load/products"
{
  header
  while read -r _ i addr; do
    printf '[[devices]]\nid = "d%s"\nprotocol = "modbus_tcp"\naddress = "%s"\npoll_interval = "1s"\n' "$i" "$addr"
    for r in $(seq 0 999); do printf '[[devices.tags]]\nname = "r%s"\ntable = "holding"\naddress = %s\n' "$r" "$r"; done
  done < "$work/sim.out"
} > "$work/load/agent.toml"
for i in $(seq 0 9); do
  {
    printf 'id = "p%s"\nname = "p%s"\nversion = "1.0.0"\ndomain = "fp"\nowner = "fp"\n' "$i" "$i"
    for r in $(seq 0 999); do printf '[[fields]]\nname = "r%s"\nsource = "d%s.r%s"\nunit = "1"\n' "$r" "$i" "$r"; done
  } > "$work/load/products/p$i.toml"
done
# RSS and CPU of one build at 10,000 tags; it must also be delivering live product data upstream.
load_run() {
  local bin=$1 key=$2 label=$3
  rm -rf "$work/load-data"
  PLANTMESH_LOG=warn ${FOOTPRINT_WRAP:-} "$bin" run --config "$work/load" --data-dir "$work/load-data" 2> "$work/load.log" & agent=$!; pids+=($agent)
  sleep 15
  c0=$(cpu_ticks "$agent"); peak=0
  for _ in $(seq "$seconds"); do
    r=$(rss_kib "$agent"); [ "$r" -gt "$peak" ] && peak=$r
    sleep 1
  done
  c1=$(cpu_ticks "$agent")
  # Live (not retained) messages on the product topics: the agent measured is doing its work.
  if ! mosquitto_sub -p "$port" -t 'fp/a/l/#' -R -C 10 -W 10 > /dev/null; then
    echo "$label: no product messages reached the broker"; cat "$work/load.log"; exit 1
  fi
  kill "$agent"; wait "$agent" 2>/dev/null || true
  rss=$(awk -v k="$peak" 'BEGIN { printf "%.1f", k / 1024 }')
  cpu=$(awk -v d=$((c1 - c0)) -v clk="$clk" -v s="$seconds" 'BEGIN { printf "%.1f", d / clk / s * 100 }')
  echo "$label: RSS (peak of 1 s samples) ${rss} MiB; CPU ${cpu} % of one core"
  grep -E "ERROR" "$work/load.log" | head -3 || true
  measured[$key]=$rss
}
load_run "${FOOTPRINT_AGENT:-target/gateway/plantmesh}" rss_10k_tags_mib "glibc build ($(uname -m))"
# The static musl build: no libc mapped beside it, and musl's allocator hands freed memory back.
[ -z "${FOOTPRINT_AGENT:-}" ] && load_run "$static" rss_10k_tags_static_mib "static musl build ($(uname -m))"

if [ $check = 1 ]; then
  echo "== budgets (README.md, Footprint budgets)"
  fail=0
  while IFS='|' read -r _ name key limit _; do
    key=$(echo "$key" | tr -d ' `'); limit=$(echo "$limit" | tr -d ' ')
    [ -n "$key" ] && [ -n "${measured[$key]:-}" ] || { echo "no measurement for budget '$key'"; fail=1; continue; }
    if awk -v m="${measured[$key]}" -v l="$limit" 'BEGIN { exit !(m <= l) }'; then
      echo "ok    $key: ${measured[$key]} <= $limit"
    else
      echo "OVER  $key: ${measured[$key]} > $limit"; fail=1
    fi
  done < <(sed -n '/<!-- budgets:start -->/,/<!-- budgets:end -->/p' README.md | grep '^| .* | `' )
  exit $fail
fi
