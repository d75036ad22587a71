#!/usr/bin/env bash
# A fleet on one machine: N agents (small configs over `plantmesh simulate` register banks) against
# one Mosquitto, to show and measure fleet behaviour. Prints:
#   - catalog convergence: seconds from the agents' start until `plantmesh catalog --watch --json`
#     lists every product, that reader's CPU and peak RSS, and a one-shot `catalog --json` on the
#     settled fleet (wall time, CPU, peak RSS);
#   - verify: messages/s it followed and its CPU per 1000 messages, with its verdict;
#   - a broker restart: TCP connections Mosquitto saw per agent while they reconnected (backoff is
#     jittered: one connection per agent per attempt), and how long until every agent was back.
#   scripts/fleet.sh [N] [PRODUCTS]      default 20 agents x 6 products
#   FLEET_KEEP=DIR scripts/fleet.sh ...  keep the working directory (configs, logs) in DIR
#   FLEET_BIN=<plantmesh binary>         default: a release build
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
agents=${1:-20}
products=${2:-6}
export PATH="$PATH:/usr/sbin"
command -v mosquitto >/dev/null || { echo "needs mosquitto (scripts/test.sh installs it)"; exit 1; }
if [ -z "${FLEET_BIN:-}" ]; then
  cargo build -q --release -p plantmesh --bin plantmesh
  FLEET_BIN="$root/target/release/plantmesh"
fi
bin=$FLEET_BIN
work=${FLEET_KEEP:-$(mktemp -d)}
mkdir -p "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; [ -n "${FLEET_KEEP:-}" ] || rm -rf "$work"; }
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || true
clk=$(getconf CLK_TCK)
cpu_s() { awk -v c="$clk" '{printf "%.2f", ($14+$15)/c}' "/proc/$1/stat"; }
hwm_mib() { awk '/VmHWM/{printf "%.1f", $2/1024}' "/proc/$1/status"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

port=$(free_port)
mkdir -p "$work/mosquitto"
cat > "$work/mosquitto.conf" <<CONF
user root
persistence true
persistence_location $work/mosquitto/
log_dest file $work/mosquitto.log
log_type notice
log_type information
connection_messages true
max_queued_messages 1000000
listener $port 127.0.0.1
allow_anonymous true
CONF
broker_up() {
  mosquitto -c "$work/mosquitto.conf" & broker=$!; pids+=($broker)
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return; sleep 0.1; done
  echo "mosquitto did not start"; exit 1
}
broker_up
url="mqtt://127.0.0.1:$port"

"$bin" simulate --devices "$agents" --registers "$products" > "$work/sim.out" & pids+=($!)
for _ in $(seq 300); do [ "$(grep -c '^SIM' "$work/sim.out" || true)" -ge "$agents" ] && break; sleep 0.1; done

python3 - "$work" "$agents" "$products" "$port" <<'PY'
import os, sys
work, agents, products, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
sims = [l.split()[2] for l in open(f"{work}/sim.out") if l.startswith("SIM ")]
templates = ["{site}/{area}/{line}/{domain}/{product}/v{major}", "plant/{site}/{line}/{domain}/{product}/v{major}"]
for i in range(agents):
    d = f"{work}/a{i:03d}"
    os.makedirs(f"{d}/cfg/products", exist_ok=True)
    with open(f"{d}/cfg/governance.toml", "w") as f:
        f.write(f'topic_template = "{templates[i % 2]}"\ndefault_classification = "internal"\n'
                '[classes.internal]\naction = "pass"\n[egress]\nallow_topic_prefixes = ["#"]\nallow_classes = ["internal"]\n')
    with open(f"{d}/cfg/agent.toml", "w") as f:
        f.write(f'[agent]\nid = "gw-{i:03d}"\nsite = "site-{i % 10}"\narea = "a"\nline = "l{i}"\n'
                f'metrics_listen = "off"\nsli_interval = "5s"\n\n'
                f'[upstream]\nurl = "mqtt://127.0.0.1:{port}"\nkeep_alive = "5s"\nreconnect_min = "500ms"\nreconnect_max = "10s"\n\n'
                f'[[devices]]\nid = "plc"\nprotocol = "modbus_tcp"\naddress = "{sims[i]}"\npoll_interval = "1s"\n')
        for r in range(products):
            f.write(f'[[devices.tags]]\nname = "r{r}"\ntable = "holding"\naddress = {r}\n')
    for p in range(products):
        with open(f"{d}/cfg/products/p{p}.toml", "w") as f:
            f.write(f'id = "p{p}"\nname = "P{p}"\nversion = "1.{p}.0"\ndomain = "{["production", "quality"][p % 2]}"\n'
                    f'owner = "team-{p % 3}"\n[[fields]]\nname = "v"\nsource = "plc.r{p}"\n')
PY
"$bin" check "$work/a000/cfg" > /dev/null

# The catalog reader first, then every agent at once.
"$bin" catalog --broker "$url" --watch --json > "$work/catalog.jsonl" 2> "$work/catalog.err" & reader=$!; pids+=($reader)
start=$(date +%s.%N)
for i in $(seq 0 $((agents - 1))); do
  d=$(printf '%s/a%03d' "$work" "$i")
  PLANTMESH_LOG=warn "$bin" run --config "$d/cfg" --data-dir "$d/data" 2> "$d/agent.log" & pids+=($!)
done
want=$((agents * products))
echo "fleet: $agents agents x $products products = $want products into Mosquitto on port $port"
converged=""
for _ in $(seq 1200); do
  n=$(tail -1 "$work/catalog.jsonl" 2>/dev/null | python3 -c 'import json,sys
try: print(sum(1 for p in json.loads(sys.stdin.read())["products"] if p["online"] and p["sli"]))
except Exception: print(0)')
  if [ "$n" -ge "$want" ]; then converged=$(python3 -c "import time; print(f'{time.time() - $start:.1f}')"); break; fi
  sleep 0.5
done
[ -n "$converged" ] || { echo "the catalog never listed all $want products online with SLIs (last: $n)"; exit 1; }
echo "catalog: all $want products online with SLIs after ${converged} s (--watch reader: $(cpu_s "$reader") s CPU, peak RSS $(hwm_mib "$reader") MiB)"
python3 - "$bin" "$url" "$want" <<'PY'
import json, resource, subprocess, sys, time
bin, url, want = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = time.time()
out = subprocess.run([bin, "catalog", "--broker", url, "--json"], capture_output=True, check=True).stdout
wall = time.time() - t
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
n = len(json.loads(out)["products"])
print(f"catalog --json (one-shot, settled fleet): {n}/{want} products in {wall:.1f} s wall, "
      f"{ru.ru_utime + ru.ru_stime:.2f} s CPU, peak RSS {ru.ru_maxrss / 1024:.1f} MiB")
PY

# verify across a broker restart.
"$bin" verify --broker "$url" --for 40s --json > "$work/verify.json" 2> "$work/verify.err" & verifier=$!; pids+=($verifier)
sleep 15
before=$(wc -l < "$work/mosquitto.log")
kill -TERM "$broker"; wait "$broker" 2>/dev/null || true
restart=$(date +%s.%N)
sleep 2
broker_up
back=""
for _ in $(seq 600); do
  # Every agent (and the verifier) connected again since the restart.
  n=$(tail -n +"$((before + 1))" "$work/mosquitto.log" | grep -c 'New client connected .* as plantmesh-gw-' || true)
  if [ "$n" -ge "$agents" ]; then back=$(python3 -c "import time; print(f'{time.time() - $restart:.1f}')"); break; fi
  sleep 0.2
done
sleep 3
conns=$(tail -n +"$((before + 1))" "$work/mosquitto.log" | grep -c 'New connection from' || true)
sessions=$(tail -n +"$((before + 1))" "$work/mosquitto.log" | grep -c 'New client connected .* as plantmesh-gw-' || true)
echo "broker restart (down 2 s): every agent back ${back:-never} s after the stop; $conns TCP connections for $agents agents, the catalog reader and the verifier ($(python3 -c "print(f'{$conns / ($agents + 2):.2f}')") per client); $sessions agent sessions"
verify_cpu=$(cpu_s "$verifier")
rc=0; wait "$verifier" || rc=$?
python3 - "$work/verify.json" "$verify_cpu" "$rc" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
cpu, rc = float(sys.argv[2]), int(sys.argv[3])
streams = r["streams"]
print(f"verify: {r['messages']} messages over {len(streams)} streams; {r['messages'] / 40:.0f} msgs/s followed, "
      f"{1e6 * cpu / max(r['messages'], 1):.1f} core-ms per 1000 messages ({cpu:.2f} s CPU in all); delivered {r['delivered']}, duplicates {r['duplicates']} "
      f"({r['differing']} differing), gaps {r['gaps']}, unexplained hole seqs {r['hole_seqs']}; exit {rc}")
PY
