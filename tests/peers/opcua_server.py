"""An OPC UA server for plantmesh's end-to-end tests, built on python asyncua (a peer nobody here wrote).

Usage: opcua_server.py PORT SPEC.json

SPEC: {"namespace": "urn:...", "security": "none" | "encrypt", "pki": DIR (server cert and key here),
       "variables": [{"name": "Double", "type": "Double", "value": 1.5, "array": false}],
       "counter_ms": 100,                  # optional: Int64 variable "Counter" counting up
       "tree": [folders, variables_per_folder],  # optional: a large address space for discover
       "users": {"name": "password"}}            # optional: only these users may open sessions
Endpoint: opc.tcp://127.0.0.1:PORT/plantmesh/test. Prints `READY <port>` once serving, and every
0.5 s `SUBS <n> SESSIONS <m>` (the server's live subscriptions and sessions).
"""

import asyncio
import datetime
import json
import sys
import uuid
from pathlib import Path

from asyncua import Server, ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.user_managers import UserManager
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from cryptography.x509.oid import ExtendedKeyUsageOID

APP_URI = "urn:plantmesh:test:server"


def coerce(kind, value):
    if kind == "DateTime":
        return datetime.datetime.fromisoformat(value)
    if kind == "ByteString":
        return bytes(value)
    if kind == "Guid":
        return uuid.UUID(value)
    if kind == "LocalizedText":
        return ua.LocalizedText(value)
    return value


class Passwords(UserManager):
    """Accepts exactly the configured users (spec "users": {"name": "password"}); nobody else."""

    def __init__(self, users):
        self.users = users

    def get_user(self, iserver, username=None, password=None, certificate=None):
        if username is not None and self.users.get(username) == password:
            return User(role=UserRole.User, name=username)
        return None


async def main():
    port = int(sys.argv[1])
    with open(sys.argv[2]) as f:
        spec = json.load(f)
    users = spec.get("users")
    server = Server(user_manager=Passwords(users)) if users else Server()
    await server.init()
    if users:
        server.set_security_IDs(["Username"])
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/plantmesh/test")
    server.set_server_name("plantmesh test server")
    await server.set_application_uri(APP_URI)
    if spec.get("security", "none") == "encrypt":
        pki = spec["pki"]
        cert, key = Path(pki) / "server-cert.der", Path(pki) / "server-key.pem"
        await setup_self_signed_certificate(
            key, cert, APP_URI, "127.0.0.1", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            {"countryName": "DE", "organizationName": "plantmesh tests", "commonName": "plantmesh test server"},
        )
        await server.load_certificate(cert)
        await server.load_private_key(key)
        server.set_security_policy([
            ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt,
            ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt,
        ])
    else:
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    idx = await server.register_namespace(spec.get("namespace", "urn:plantmesh:test"))
    plant = await server.nodes.objects.add_object(ua.NodeId("Plant", idx), "Plant")
    for v in spec.get("variables", []):
        kind = ua.VariantType[v["type"]]
        value = [coerce(v["type"], x) for x in v["value"]] if v.get("array") else coerce(v["type"], v["value"])
        await plant.add_variable(ua.NodeId(v["name"], idx), v["name"], ua.Variant(value, kind))
    counter = None
    if spec.get("counter_ms"):
        counter = await plant.add_variable(ua.NodeId("Counter", idx), "Counter", ua.Variant(0, ua.VariantType.Int64))
    if spec.get("tree"):
        folders, per = spec["tree"]
        for f in range(folders):
            folder = await plant.add_folder(ua.NodeId(f"Area{f}", idx), f"Area{f}")
            for i in range(per):
                await folder.add_variable(ua.NodeId(f"Area{f}.Tag{i}", idx), f"Tag{i}", ua.Variant(float(i), ua.VariantType.Double))

    async with server:
        print(f"READY {port}", flush=True)
        n = 0
        tick = 0
        while True:
            await asyncio.sleep((spec.get("counter_ms") or 500) / 1000)
            if counter is not None:
                n += 1
                await counter.write_value(ua.Variant(n, ua.VariantType.Int64))
            tick += 1
            if tick % max(1, 500 // (spec.get("counter_ms") or 500)) == 0:
                subs = len(server.iserver.subscription_service.subscriptions)
                sessions = len(getattr(server.iserver, "_external_sessions", {}) or {})
                print(f"SUBS {subs} SESSIONS {sessions}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
