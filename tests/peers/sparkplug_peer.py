"""Sparkplug B peer for the end-to-end tests, decoding with Google's protobuf from sparkplug_b.proto.

  node    an edge node with one device, driven by JSON commands on stdin:
            {"op": "connect", "bdseq": 3}          connect (NDEATH with bdSeq as the will), NBIRTH, DBIRTH
            {"op": "data", "values": {...}, "ts": ms}  DDATA by alias, the next seq
            {"op": "skip", "n": 2}                 lose n messages (seq moves on, nothing is sent)
          prints READY after the births, and REBIRTH when an NCMD asks for them (then sends them again).
  rebirth publishes an NCMD asking --group/--node for its births, as a host does.
  state   publishes a primary host's retained STATE (--id, --online true|false).
  decode  subscribes to --topic and prints every message as one JSON line:
            {"topic": ..., "retain": bool, "payload": {...}}  (undecodable: "error")
          prints SUBSCRIBED once the broker has acknowledged the subscription.
"""
import argparse
import json
import os
import sys
import tempfile
import threading
import time

import paho.mqtt.client as mqtt


def load_proto():
    from grpc_tools import protoc

    here = os.path.dirname(os.path.abspath(__file__))
    out = tempfile.mkdtemp(prefix="sparkplug-pb-")
    rc = protoc.main(["protoc", f"-I{here}", f"--python_out={out}", os.path.join(here, "sparkplug_b.proto")])
    if rc != 0:
        raise SystemExit("protoc failed on sparkplug_b.proto")
    sys.path.insert(0, out)
    import sparkplug_b_pb2

    return sparkplug_b_pb2


pb = load_proto()

# Data types (the specification's DataType enumeration).
INT32, INT64, UINT64, DOUBLE, BOOLEAN, STRING = 3, 4, 8, 10, 11, 12

# The device's metrics: name -> (alias, datatype).
DEVICE_METRICS = {
    "Fill/Count": (10, INT32),
    "Fill/Weight": (11, DOUBLE),
    "Running": (12, BOOLEAN),
    "Recipe": (13, STRING),
}


def set_value(m, datatype, v):
    if datatype in (INT32,):
        m.int_value = v & 0xFFFFFFFF
    elif datatype in (INT64, UINT64):
        m.long_value = v & 0xFFFFFFFFFFFFFFFF
    elif datatype == DOUBLE:
        m.double_value = v
    elif datatype == BOOLEAN:
        m.boolean_value = v
    else:
        m.string_value = v


def prop_dict(ps):
    out = {}
    for k, v in zip(ps.keys, ps.values):
        kind = v.WhichOneof("value")
        if kind == "propertyset_value":
            out[k] = prop_dict(v.propertyset_value)
        else:
            out[k] = {"type": v.type, "value": getattr(v, kind) if kind else None}
    return out


def metric_dict(m):
    d = {}
    for f in ("name", "alias", "timestamp", "datatype", "is_historical", "is_transient", "is_null"):
        if m.HasField(f):
            d[f] = getattr(m, f)
    kind = m.WhichOneof("value")
    if kind:
        d["value"] = getattr(m, kind)
        d["value_kind"] = kind
    if m.HasField("properties"):
        d["properties"] = prop_dict(m.properties)
    return d


def payload_dict(raw):
    p = pb.Payload()
    p.ParseFromString(raw)
    d = {"metrics": [metric_dict(m) for m in p.metrics]}
    for f in ("timestamp", "seq", "uuid"):
        if p.HasField(f):
            d[f] = getattr(p, f)
    return d


def emit(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def decode(args):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=args.id, clean_session=not args.persistent)

    def on_connect(client, userdata, flags, rc, props=None):
        client.subscribe(args.topic, qos=1)

    def on_subscribe(client, userdata, mid, rcs, props=None):
        emit("SUBSCRIBED")

    def on_message(client, userdata, msg):
        rec = {"topic": msg.topic, "retain": bool(msg.retain)}
        if msg.topic.startswith("spBv1.0/STATE/"):
            rec["text"] = msg.payload.decode("utf-8", "replace")
        else:
            try:
                rec["payload"] = payload_dict(msg.payload)
            except Exception as e:  # noqa: BLE001 - reported to the test, which decides
                rec["error"] = str(e)
        emit(json.dumps(rec))

    c.on_connect = on_connect
    c.on_subscribe = on_subscribe
    c.on_message = on_message
    c.connect("127.0.0.1", args.port, keepalive=30)
    c.loop_forever()


class Node:
    def __init__(self, args):
        self.args = args
        self.seq = 0
        self.bdseq = 0
        self.lock = threading.Lock()
        self.client = None
        self.values = {"Fill/Count": 0, "Fill/Weight": 0.0, "Running": False, "Recipe": "none"}

    def topic(self, kind, device=False):
        t = f"spBv1.0/{self.args.group}/{kind}/{self.args.node}"
        return t + f"/{self.args.device}" if device else t

    def next_seq(self):
        s = self.seq
        self.seq = (self.seq + 1) % 256
        return s

    def death(self):
        p = pb.Payload()
        p.timestamp = int(time.time() * 1000)
        m = p.metrics.add()
        m.name, m.datatype, m.long_value = "bdSeq", INT64, self.bdseq
        return p.SerializeToString()

    def births(self):
        with self.lock:
            now = int(time.time() * 1000)
            self.seq = 0
            p = pb.Payload()
            p.timestamp, p.seq = now, self.next_seq()
            m = p.metrics.add()
            m.name, m.datatype, m.long_value, m.timestamp = "bdSeq", INT64, self.bdseq, now
            m = p.metrics.add()
            m.name, m.alias, m.datatype, m.long_value, m.timestamp = "Uptime", 1, UINT64, 1000, now
            self.client.publish(self.topic("NBIRTH"), p.SerializeToString(), qos=0).wait_for_publish()
            p = pb.Payload()
            p.timestamp, p.seq = now, self.next_seq()
            for name, (alias, dt) in DEVICE_METRICS.items():
                m = p.metrics.add()
                m.name, m.alias, m.datatype, m.timestamp = name, alias, dt, now
                set_value(m, dt, self.values[name])
            self.client.publish(self.topic("DBIRTH", True), p.SerializeToString(), qos=0).wait_for_publish()

    def data(self, values, ts):
        with self.lock:
            p = pb.Payload()
            p.timestamp, p.seq = ts, self.next_seq()
            for name, v in values.items():
                alias, dt = DEVICE_METRICS[name]
                self.values[name] = v
                m = p.metrics.add()
                m.alias, m.timestamp = alias, ts
                set_value(m, dt, v)
            self.client.publish(self.topic("DDATA", True), p.SerializeToString(), qos=0).wait_for_publish()

    def connect(self, bdseq):
        self.bdseq = bdseq
        ready = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{self.args.node}-peer", clean_session=True)
        c.will_set(self.topic("NDEATH"), self.death(), qos=1, retain=False)

        def on_connect(client, userdata, flags, rc, props=None):
            client.subscribe(self.topic("NCMD"), qos=0)

        def on_subscribe(client, userdata, mid, rcs, props=None):
            ready.set()

        def on_message(client, userdata, msg):
            p = pb.Payload()
            p.ParseFromString(msg.payload)
            if any(m.name == "Node Control/Rebirth" and m.boolean_value for m in p.metrics):
                emit("REBIRTH")
                threading.Thread(target=self.births, daemon=True).start()

        c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
        c.connect("127.0.0.1", self.args.port, keepalive=5)
        c.loop_start()
        self.client = c
        if not ready.wait(10):
            raise SystemExit("no SUBACK from the broker")
        self.births()
        emit("READY")

    def run(self):
        for line in sys.stdin:
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "connect":
                self.connect(cmd.get("bdseq", 0))
            elif op == "data":
                self.data(cmd["values"], cmd.get("ts") or int(time.time() * 1000))
                emit("SENT")
            elif op == "skip":
                with self.lock:
                    for _ in range(cmd.get("n", 1)):
                        self.next_seq()
                emit("SKIPPED")


def publish_once(port, topic, payload, retain):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"peer-{os.getpid()}", clean_session=True)
    c.connect("127.0.0.1", port, keepalive=10)
    c.loop_start()
    c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)
    c.disconnect()
    c.loop_stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["node", "decode", "rebirth", "state"])
    ap.add_argument("--persistent", action="store_true", help="decode: keep the session across reconnects")
    ap.add_argument("--online", choices=["true", "false"], default="true", help="state: the host's state")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--topic", default="spBv1.0/#")
    ap.add_argument("--id", default="sparkplug-decoder")
    ap.add_argument("--group", default="G1")
    ap.add_argument("--node", default="edge-1")
    ap.add_argument("--device", default="filler")
    args = ap.parse_args()
    if args.mode == "decode":
        decode(args)
    elif args.mode == "rebirth":
        # As a host would: NCMD with Node Control/Rebirth = true.
        p = pb.Payload()
        p.timestamp = int(time.time() * 1000)
        m = p.metrics.add()
        m.name, m.datatype, m.boolean_value = "Node Control/Rebirth", BOOLEAN, True
        publish_once(args.port, f"spBv1.0/{args.group}/NCMD/{args.node}", p.SerializeToString(), retain=False)
    elif args.mode == "state":
        # A primary host's retained STATE (Sparkplug 3.0 JSON).
        body = json.dumps({"online": args.online == "true", "timestamp": int(time.time() * 1000)})
        publish_once(args.port, f"spBv1.0/STATE/{args.id}", body.encode(), retain=True)
    else:
        Node(args).run()


if __name__ == "__main__":
    main()
