"""A Modbus TCP server for plantmesh's end-to-end tests, built on pymodbus (a peer nobody here wrote).

Usage: modbus_server.py PORT SPEC.json          (Modbus TCP on 127.0.0.1:PORT)
       modbus_server.py /dev/ttyX SPEC.json     (Modbus RTU on a serial port, 19200 8N2)

SPEC: {"values": [{"table": "holding"|"input"|"coil"|"discrete_input", "address": N,
                   "type": "u16"|"i16"|"u32"|"i32"|"u64"|"i64"|"f32"|"f64"|"string"|"bool"|"raw",
                   "order": "ABCD"|"CDAB"|"BADC"|"DCBA", "value": ..., "length": registers (string)}],
       "counter": {"address": N, "period_ms": M}   # optional: holding u32 (ABCD) counting up
      }
       With "units": {"1": SPEC, "2": SPEC} the server answers each unit id from its own SPEC and
       stays silent for any other unit id (as a missing RTU slave does).
Only register addresses listed exist: a read that touches any other gets exception 02.
Values are encoded here with Python's struct module, independently of the agent's decoder.
Every request is printed on stdout as `REQ <function> <address> <count>`; `READY <port>` once serving.
"""

import asyncio
import json
import struct
import sys

from pymodbus.datastore import ModbusServerContext, ModbusSlaveContext, ModbusSparseDataBlock
from pymodbus import FramerType
from pymodbus.server import StartAsyncSerialServer, StartAsyncTcpServer

FORMATS = {"u16": ">H", "i16": ">h", "u32": ">I", "i32": ">i", "u64": ">Q", "i64": ">q", "f32": ">f", "f64": ">d"}


def encode(spec):
    """Registers (ints) holding spec['value'] as a device with spec['order'] would."""
    t = spec["type"]
    if t == "raw":
        return list(spec["value"])
    if t == "string":
        data = spec["value"].encode("utf-8").ljust(spec["length"] * 2, b"\0")
    else:
        data = struct.pack(FORMATS[t], spec["value"])
    order = spec.get("order", "ABCD")
    words = [data[i : i + 2] for i in range(0, len(data), 2)]
    if order in ("BADC", "DCBA"):
        words = [w[::-1] for w in words]
    if order in ("CDAB", "DCBA"):
        words = list(reversed(words))
    return [int.from_bytes(w, "big") for w in words]


class LoggingContext(ModbusSlaveContext):
    """Logs every read request (refused ones too: validate runs once per request, first)."""

    def validate(self, fc_as_hex, address, count=1):
        if fc_as_hex in (3, 4):
            print(f"REQ {fc_as_hex} {address} {count}", flush=True)
        return super().validate(fc_as_hex, address, count)

    def getValues(self, fc_as_hex, address, count=1):
        # pymodbus 3.8 skips validate for bit reads: log those here.
        if fc_as_hex in (1, 2):
            print(f"REQ {fc_as_hex} {address} {count}", flush=True)
        return super().getValues(fc_as_hex, address, count)


def build_slave(spec):
    """One unit's data tables, and its counter task (if any)."""
    tables = {"holding": {}, "input": {}, "coil": {}, "discrete_input": {}}
    for v in spec.get("values", []):
        if v["table"] in ("coil", "discrete_input"):
            tables[v["table"]][v["address"] + 1] = bool(v["value"])
        else:
            for i, reg in enumerate(encode(v)):
                tables[v["table"]][v["address"] + 1 + i] = reg
    # pymodbus 3.8 does not validate bit reads against sparse blocks (KeyError, then a malformed
    # exception frame), so bit tables are made dense between their lowest and highest address.
    for t in ("coil", "discrete_input"):
        if tables[t]:
            for a in range(min(tables[t]), max(tables[t]) + 1):
                tables[t].setdefault(a, False)
    counter = spec.get("counter")
    if counter:
        for i in range(2):
            tables["holding"][counter["address"] + 1 + i] = 0
    blocks = {k: ModbusSparseDataBlock(v) if v else ModbusSparseDataBlock({65535: 0}) for k, v in tables.items()}
    slave = LoggingContext(hr=blocks["holding"], ir=blocks["input"], co=blocks["coil"], di=blocks["discrete_input"])

    async def count_up():
        n = 0
        while True:
            await asyncio.sleep(counter["period_ms"] / 1000)
            n += 1
            blocks["holding"].setValues(counter["address"] + 1, [n >> 16, n & 0xFFFF])

    if counter:
        asyncio.get_running_loop().create_task(count_up())
    return slave


async def main():
    where = sys.argv[1]
    with open(sys.argv[2]) as f:
        spec = json.load(f)
    if "units" in spec:
        slaves = {int(u): build_slave(s) for u, s in spec["units"].items()}
        context = ModbusServerContext(slaves=slaves, single=False)
    else:
        context = ModbusServerContext(slaves=build_slave(spec), single=True)
    asyncio.get_running_loop().call_later(0.3, lambda: print(f"READY {where}", flush=True))
    if where.startswith("/"):
        await StartAsyncSerialServer(
            context=context,
            framer=FramerType.RTU,
            port=where,
            baudrate=19200,
            bytesize=8,
            # Linux ptys refuse parity settings (EINVAL); the Modbus serial line spec allows
            # no parity with two stop bits instead.
            parity="N",
            stopbits=2,
            ignore_missing_slaves=True,
        )
    else:
        await StartAsyncTcpServer(context=context, address=("127.0.0.1", int(where)))


if __name__ == "__main__":
    asyncio.run(main())
