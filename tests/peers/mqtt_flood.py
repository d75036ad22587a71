"""Publishes machine data as fast as asked, for scripts/bench-mqtt.sh.

  mqtt_flood.py --port P --mode json|sparkplug --rate N --seconds S [--machines M]

json: {"ts": ms, "temp": x, "count": n, "state": "RUNNING"} on bench/<machine>/state, machines in turn.
sparkplug: an edge node G/edge with one device per machine (NBIRTH, DBIRTH), then DDATA by alias.
Messages go out at QoS 0 paced to --rate; prints SENT <count> at the end.
"""
import argparse
import json
import time

import paho.mqtt.client as mqtt

from sparkplug_peer import pb, DOUBLE, INT64, STRING, set_value


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", choices=["json", "sparkplug"], required=True)
    ap.add_argument("--rate", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--machines", type=int, default=10)
    args = ap.parse_args()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-flood", clean_session=True)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", args.port, keepalive=30)
    c.loop_start()
    time.sleep(0.5)
    metrics = [("temp", 1, DOUBLE), ("count", 2, INT64), ("state", 3, STRING)]
    seq = 0
    if args.mode == "sparkplug":
        p = pb.Payload()
        p.timestamp, p.seq = int(time.time() * 1000), 0
        m = p.metrics.add()
        m.name, m.datatype, m.long_value = "bdSeq", INT64, 0
        c.publish("spBv1.0/G/NBIRTH/edge", p.SerializeToString()).wait_for_publish()
        for i in range(args.machines):
            seq += 1
            p = pb.Payload()
            p.timestamp, p.seq = int(time.time() * 1000), seq
            for name, alias, dt in metrics:
                m = p.metrics.add()
                m.name, m.alias, m.datatype = name, alias + 10 * i, dt
                set_value(m, dt, 0 if dt != STRING else "IDLE")
            c.publish(f"spBv1.0/G/DBIRTH/edge/m{i}", p.SerializeToString()).wait_for_publish()
    sent = 0
    start = time.time()
    end = start + args.seconds
    while time.time() < end:
        due = int((time.time() - start) * args.rate)
        while sent < due:
            i = sent % args.machines
            ts = int(time.time() * 1000)
            if args.mode == "json":
                body = json.dumps({"ts": ts, "temp": 20 + (sent % 100) / 10, "count": sent, "state": "RUNNING"})
                c.publish(f"bench/m{i}/state", body)
            else:
                seq = (seq + 1) % 256
                p = pb.Payload()
                p.timestamp, p.seq = ts, seq
                for name, alias, dt in metrics:
                    m = p.metrics.add()
                    m.alias, m.timestamp = alias + 10 * i, ts
                    set_value(m, dt, {"temp": 20 + (sent % 100) / 10, "count": sent, "state": "RUNNING"}[name])
                c.publish(f"spBv1.0/G/DDATA/edge/m{i}", p.SerializeToString())
            sent += 1
        time.sleep(0.001)
    time.sleep(0.5)
    c.loop_stop()
    print(f"SENT {sent}", flush=True)


if __name__ == "__main__":
    main()
