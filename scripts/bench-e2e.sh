#!/usr/bin/env bash
# End to end into a real Mosquitto at QoS 1 with simulated Modbus TCP devices (release build):
# delivered points/s, CPU core-ms per 1000 points, RSS, p50/p99 read-to-PUBACK latency, and bytes
# the agent wrote to storage per point (write_bytes of /proc/<pid>/io).
#   scripts/bench-e2e.sh                       both scenarios of the spine issue
#   scripts/bench-e2e.sh DEVICES REGS POLL     one scenario, e.g. 10 1000 100ms
#   BENCH_FIELDS=1 scripts/bench-e2e.sh 100 100 1s  products of 1 field (10,000 products): the same data
#                                              spread over REGS/BENCH_FIELDS products per device
#                                              (default: one product of REGS fields per device)
#   BENCH_UNS=true scripts/bench-e2e.sh 100 100 1s  the UNS view too: every field also retained on its
#                                              own topic (reports UNS messages/s and core-ms per 1000)
#   BENCH_INFLIGHT=512 scripts/bench-e2e.sh ...   the agent's max_inflight (default 64)
#   BENCH_UNS=true scripts/bench-e2e.sh 100 100 100ms  the broker's ceiling: 100,000 field values/s
#                                              offered to the UNS view (the newest of each goes)
#   BENCH_PUBACK_DELAY_MS=50 scripts/bench-e2e.sh   the broker's answers 50 ms late (a slow uplink,
#                                              through tests/peers/delay_proxy.py)
#   BENCH_BROKER_NODELAY=true scripts/bench-e2e.sh  Mosquitto with `set_tcp_nodelay true` (without it,
#                                              Nagle holds PUBACKs of a burst until the agent's delayed
#                                              TCP ACK, about 40 ms)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
seconds="${BENCH_SECONDS:-30}"
export PATH="$PATH:/usr/sbin"
command -v mosquitto >/dev/null || { echo "needs mosquitto (scripts/test.sh installs it)"; exit 1; }
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

port=$(free_port)
cat > "$work/mosquitto.conf" <<CONF
user root
persistence false
log_dest none
max_inflight_messages 0
set_tcp_nodelay ${BENCH_BROKER_NODELAY:-false}
max_queued_messages 1000000
listener $port 127.0.0.1
allow_anonymous true
CONF
mosquitto -c "$work/mosquitto.conf" & pids+=($!)
sleep 0.5
uplink=$port
if [ -n "${BENCH_PUBACK_DELAY_MS:-}" ]; then
  python3 "$root/tests/peers/delay_proxy.py" 0 "$port" "$BENCH_PUBACK_DELAY_MS" > "$work/proxy.out" & pids+=($!)
  for _ in $(seq 50); do grep -q '^PROXY' "$work/proxy.out" 2>/dev/null && break; sleep 0.1; done
  uplink=$(awk '/^PROXY/{print $2}' "$work/proxy.out")
  echo "uplink through a proxy delaying the broker's answers by ${BENCH_PUBACK_DELAY_MS} ms"
fi
wbytes() { awk '/^write_bytes/{print $2}' "/proc/$1/io"; }

run() {
  local devices=$1 regs=$2 poll=$3
  local dir="$work/s-$devices-$regs"
  mkdir -p "$dir/cfg/products"
  "$bin" simulate --devices "$devices" --registers "$regs" > "$dir/sim.out" & local sim=$!; pids+=($sim)
  for _ in $(seq 100); do [ "$(grep -c '^SIM' "$dir/sim.out" || true)" -ge "$devices" ] && break; sleep 0.1; done
  {
    printf '[agent]\nid = "gw-bench"\nsite = "bench"\narea = "a"\nline = "l"\ngovernance = "builtin-defaults"\nmetrics_listen = "127.0.0.1:0"\n\n'
    printf '[upstream]\nurl = "mqtt://127.0.0.1:%s"\nprotocol = "5"\nmax_inflight = %s\n\n' "$uplink" "${BENCH_INFLIGHT:-64}"
    printf '[buffer]\nmax_bytes = "1GiB"\n\n'
    while read -r _ i addr; do
      printf '[[devices]]\nid = "d%s"\nprotocol = "modbus_tcp"\naddress = "%s"\npoll_interval = "%s"\n' "$i" "$addr" "$poll"
      for r in $(seq 0 $((regs - 1))); do printf '[[devices.tags]]\nname = "r%s"\ntable = "holding"\naddress = %s\n' "$r" "$r"; done
    done < "$dir/sim.out"
  } > "$dir/cfg/agent.toml"
  # Products of BENCH_FIELDS fields each (default: one per device, of all its registers).
  local fields=${BENCH_FIELDS:-$regs}
  python3 - "$dir/cfg/products" "$devices" "$regs" "$fields" "${BENCH_UNS:-false}" <<'PY'
import sys
out, devices, regs, fields = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
uns = sys.argv[5] == "true"
for d in range(devices):
    for p, start in enumerate(range(0, regs, fields)):
        name = f"p{d}" if fields >= regs else f"p{d}-{p}"
        with open(f"{out}/{name}.toml", "w") as f:
            f.write(f'id = "{name}"\nname = "{name}"\nversion = "1.0.0"\ndomain = "bench"\nowner = "bench"\n')
            if uns:
                f.write('[publish]\nuns = true\n')
            for r in range(start, min(start + fields, regs)):
                f.write(f'[[fields]]\nname = "r{r}"\nsource = "d{d}.r{r}"\n')
PY
  "$bin" check "$dir/cfg" > /dev/null
  PLANTMESH_LOG=info "${BENCH_AGENT:-$bin}" run --config "$dir/cfg" --data-dir "$dir/data" 2> "$dir/agent.log" & local agent=$!; pids+=($agent)
  # Up (thousands of products take a while to plan), then a warm-up: connections, first polls.
  local metrics=""
  for _ in $(seq 600); do
    metrics=$(sed -n 's|.*metrics on http://\([^/]*\)/metrics.*|\1|p' "$dir/agent.log" | head -1)
    [ -n "$metrics" ] && break
    kill -0 "$agent" 2>/dev/null || { cat "$dir/agent.log"; exit 1; }
    sleep 0.1
  done
  sleep 5
  curl_metrics() { python3 -c 'import sys, urllib.request; print(urllib.request.urlopen("http://" + sys.argv[1] + "/metrics").read().decode())' "$metrics"; }
  curl_metrics > "$dir/m0"
  local t0 c0 w0; t0=$(date +%s.%N); c0=$(cpu_ticks "$agent"); w0=$(wbytes "$agent")
  sleep "$seconds"
  local t1 c1 w1; t1=$(date +%s.%N); c1=$(cpu_ticks "$agent"); w1=$(wbytes "$agent")
  curl_metrics > "$dir/m1"
  local rss hwm anon; rss=$(awk '/VmRSS/{print $2}' "/proc/$agent/status"); hwm=$(awk '/VmHWM/{print $2}' "/proc/$agent/status"); anon=$(awk '/RssAnon/{print $2}' "/proc/$agent/status")
  kill -TERM "$agent"; wait "$agent" || true
  kill -TERM "$sim"; wait "$sim" 2>/dev/null || true
  local summary; summary=$(sed 's/\x1b\[[0-9;]*m//g' "$dir/agent.log" | grep 'publisher stopped' | tail -1)
  local records p50 p99
  records=$(sed -n 's/.*records_acked=\([0-9]*\).*/\1/p' <<< "$summary")
  p50=$(sed -n 's/.*latency_p50_ms=\([0-9]*\).*/\1/p' <<< "$summary")
  p99=$(sed -n 's/.*latency_p99_ms=\([0-9]*\).*/\1/p' <<< "$summary")
  # Points delivered over the whole run (warm-up and drain included) and over the measured window.
  python3 - "$devices" "$regs" "$poll" "$records" "$t0" "$t1" "$c0" "$c1" "$clk" "$rss" "$hwm" "$p50" "$p99" "$seconds" "$anon" "$w0" "$w1" "$dir/m0" "$dir/m1" "$fields" <<'PY'
import sys
d, r, poll, records, t0, t1, c0, c1, clk, rss, hwm, p50, p99, secs, anon, w0, w1, m0, m1, f = sys.argv[1:]


def counter(path, name):
    for line in open(path):
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def buckets(path):
    out = {}
    for line in open(path):
        if line.startswith("plantmesh_publish_latency_window_ms_bucket"):
            le = line.split('le="')[1].split('"')[0]
            out[le] = int(line.rsplit(" ", 1)[1])
    return out


# Read-to-PUBACK latency over the measured window only (warm-up excluded): the first bound that
# holds the quantile, from the agent's cumulative histogram.
b0, b1 = buckets(m0), buckets(m1)
window = [(le, b1[le] - b0.get(le, 0)) for le in b1]
total = dict(window).get("+Inf", 0)


def quantile(q):
    for le, n in window:
        if total and n >= q * total:
            return le
    return "?"


w50, w99 = quantile(0.5), quantile(0.99)
d, r, records = int(d), int(r), int(records)
wall = float(t1) - float(t0)
cpu_ms = (int(c1) - int(c0)) * 1000 / int(clk)
poll_s = float(poll[:-2]) / 1000 if poll.endswith("ms") else float(poll[:-1])
offered = d * r / poll_s
points = records * min(int(f), r)
shape = f"{d} devices x {r} registers" + (f" in {d * (r // int(f))} products of {f} fields" if int(f) < r else "")
print(f"{shape} @ {poll}: offered {offered:.0f} points/s; delivered {points} points total "
      f"(~{points / (wall + 5):.0f}/s over the run); CPU {cpu_ms / wall:.0f} core-ms/s = "
      f"{cpu_ms / (offered * wall / 1000):.2f} core-ms per 1000 points; RSS {int(rss) / 1024:.1f} MiB "
      f"(anonymous {int(anon) / 1024:.1f} MiB, peak {int(hwm) / 1024:.1f} MiB); read-to-PUBACK over the window p50 <= {w50} ms, p99 <= {w99} ms (whole run incl. warm-up {p50}/{p99} ms); "
      f"written {(int(w1) - int(w0)) / wall / 1000:.1f} kB/s = {(int(w1) - int(w0)) / (offered * wall):.2f} B per point")
uns = counter(m1, "plantmesh_uns_messages_total") - counter(m0, "plantmesh_uns_messages_total")
if uns > 0:
    print(f"  UNS view: {uns / wall:.0f} field messages/s; whole agent {cpu_ms / (uns / 1000):.2f} core-ms per 1000 UNS messages "
          f"(product stream included)")
PY
}

if [ $# -eq 3 ]; then
  run "$1" "$2" "$3"
else
  run 100 100 1s
  run 10 1000 100ms
fi
