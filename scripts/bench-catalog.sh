#!/usr/bin/env bash
# What the agent retains at the broker per product, and how long a late subscriber takes to read
# the catalog index of N products, at a real Mosquitto (release build).
#   scripts/bench-catalog.sh          1,000 products of 2 fields each
#   scripts/bench-catalog.sh N        N products
# Prints retained bytes per product by document (descriptor, contract, catalog entry, SLI) and
# the index read time (median of 5 reads, each a fresh `mosquitto_sub --retained-only -C N`).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
n="${1:-1000}"
export PATH="$PATH:/usr/sbin"
command -v mosquitto >/dev/null || { echo "needs mosquitto (scripts/test.sh installs it)"; exit 1; }
cargo build -q --release -p plantmesh --bins
bin="${BENCH_AGENT:-$root/target/release/plantmesh}"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

port=$(free_port)
printf 'user root\npersistence false\nmax_queued_messages 1000000\nlistener %s 127.0.0.1\nallow_anonymous true\n' "$port" \
  > "$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" >/dev/null 2>&1 & pids+=($!)
sleep 0.5

# One Modbus device nobody serves (the products are announced all the same), N products.
mkdir -p "$work/cfg/products"
{
  printf '[agent]\nid = "gw-bench"\nsite = "s1"\narea = "a1"\nline = "l1"\ngovernance = "builtin-defaults"\nmetrics_listen = "off"\nsli_interval = "2s"\n'
  printf '[upstream]\nurl = "mqtt://127.0.0.1:%s"\n' "$port"
  printf '[[devices]]\nid = "plc"\nprotocol = "modbus_tcp"\naddress = "127.0.0.1:9"\npoll_interval = "10s"\n'
  for i in $(seq 0 $((2 * n - 1))); do
    printf '  [[devices.tags]]\n  name = "t%s"\n  table = "holding"\n  address = %s\n  type = "u16"\n' "$i" "$i"
  done
} > "$work/cfg/agent.toml"
for i in $(seq 0 $((n - 1))); do
  printf 'id = "p%s"\nname = "Product %s"\nversion = "1.0.0"\ndomain = "production"\nowner = "team-a"\ncontact = "team-a@plant.example"\ndescription = "bench product"\n[[fields]]\nname = "a"\nsource = "plc.t%s"\nunit = "1"\nrange = [0, 1000]\n[[fields]]\nname = "b"\nsource = "plc.t%s"\nunit = "Cel"\nrequired = true\n' \
    "$i" "$i" $((2 * i)) $((2 * i + 1)) > "$work/cfg/products/p$i.toml"
done
PLANTMESH_LOG=warn "$bin" run --config "$work/cfg" --data-dir "$work/data" 2>"$work/agent.log" & pids+=($!)

# Retained messages under a filter, one line each (mosquitto_sub -W ends with status 27: expected).
retained() { timeout 30 mosquitto_sub -p "$port" -t "$1" --retained-only -W 3 -F "$2" 2>/dev/null || true; }
count() { retained "$1" '%t' | wc -l; }
for _ in $(seq 1 120); do
  [ "$(count 's1/+/+/+/+/+/_sli')" -ge "$n" ] && break
  sleep 1
done
echo "products: $n (2 fields each)"
for doc in _descriptor _contract _sli; do
  bytes=$(retained "s1/+/+/+/+/+/$doc" '%l' | awk '{s+=$1} END {print s+0}')
  printf '  %-12s %7.0f bytes retained per product\n' "$doc" "$(awk -v b="$bytes" -v n="$n" 'BEGIN {print b / n}')"
done
bytes=$(retained '_plantmesh/catalog/#' '%l' | awk '{s+=$1} END {print s+0}')
printf '  %-12s %7.0f bytes retained per product\n' "catalog" "$(awk -v b="$bytes" -v n="$n" 'BEGIN {print b / n}')"
doc=$(retained 's1/_agents/gw-bench/asyncapi' '%l')
if [ -n "$doc" ]; then echo "  AsyncAPI document of the gateway: $doc bytes"
else echo "  AsyncAPI document of the gateway: not retained (larger than max_message_bytes; the agent log says so)"; fi
times=()
for _ in 1 2 3 4 5; do
  t0=$(date +%s%N)
  got=$(timeout 60 mosquitto_sub -p "$port" -t '_plantmesh/catalog/#' -C "$n" -F '%t' | wc -l)
  t1=$(date +%s%N)
  [ "$got" -eq "$n" ] || { echo "the index read gave $got entries, not $n"; exit 1; }
  times+=($(( (t1 - t0) / 1000000 )))
done
median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n 3p)
echo "  late subscriber reads the index of $n products: ${median} ms (median of 5: ${times[*]})"
