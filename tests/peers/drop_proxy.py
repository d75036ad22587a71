"""A TCP proxy for MQTT that withholds one PUBLISH: every byte passes both ways, except that the
N-th PUBLISH from the client on TOPIC is not forwarded (and nothing is faked in its place: no
PUBACK comes back for it). For testing that a consumer notices a message the broker never got.

    python3 drop_proxy.py LISTEN_PORT TARGET_PORT TOPIC N

Prints "PROXY <port>" when listening and "DROPPED <topic>" when it withheld the message.
"""
import asyncio
import sys

seen = 0


def packets(buf):
    """Splits complete MQTT packets off the front of buf: (packets, rest)."""
    out = []
    while len(buf) >= 2:
        length, mult, i = 0, 1, 1
        while True:
            if i >= len(buf):
                return out, buf
            b = buf[i]
            length += (b & 0x7F) * mult
            mult *= 128
            i += 1
            if not b & 0x80:
                break
        if len(buf) < i + length:
            return out, buf
        out.append((buf[0], buf[i:i + length], buf[:i + length]))
        buf = buf[i + length:]
    return out, buf


async def client_to_broker(reader, writer, topic, n):
    global seen
    buf = b""
    while True:
        data = await reader.read(65536)
        if not data:
            break
        buf += data
        done, buf = packets(buf)
        for first, body, raw in done:
            if first >> 4 == 3 and len(body) >= 2:
                tlen = int.from_bytes(body[:2], "big")
                if body[2:2 + tlen].decode("utf-8", "replace") == topic:
                    seen += 1
                    if seen == n:
                        print(f"DROPPED {topic}", flush=True)
                        continue
            writer.write(raw)
        await writer.drain()
    writer.close()


async def broker_to_client(reader, writer):
    while True:
        data = await reader.read(65536)
        if not data:
            break
        writer.write(data)
        await writer.drain()
    writer.close()


async def main():
    listen, target, topic, n = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])

    async def handle(cr, cw):
        try:
            br, bw = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            cw.close()
            return
        await asyncio.gather(client_to_broker(cr, bw, topic, n), broker_to_client(br, cw), return_exceptions=True)

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    print(f"PROXY {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
