#!/usr/bin/env python3
"""Benchmark stand-in for a partner token endpoint and an IdP, on one port.

POST <any path>         -> {"accessToken": <JWT, 1 h>} after the configured latency
POST /_latency/<ms>     -> sets the latency
GET  /_count            -> {"count": <token requests so far>}
GET  /jwks              -> the IdP's JWKS (an RSA key made at start)
GET  /_jwt?sub=&tenants= -> an RS256 caller JWT signed with that key (aud token-broker)
"""
import asyncio
import base64
import json
import sys
import time
import urllib.parse
import uuid

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

ISSUER = "https://idp.bench.local"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
STATE = {"latency": 0.0, "count": 0}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def num(n: int) -> str:
    return b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))


def jwt(claims, sign=False):
    header = {"alg": "RS256", "typ": "JWT", "kid": "bench"}
    head = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    if not sign:
        return head + "." + b64(uuid.uuid4().bytes)
    sig = KEY.sign(head.encode(), padding.PKCS1v15(), hashes.SHA256())
    return head + "." + b64(sig)


def jwks():
    pub = KEY.public_key().public_numbers()
    return {"keys": [{"kty": "RSA", "kid": "bench", "alg": "RS256", "use": "sig", "n": num(pub.n), "e": num(pub.e)}]}


async def handle(reader, writer):
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            method, target, _ = line.decode().split(" ", 2)
            length = 0
            while True:
                h = await reader.readline()
                if h in (b"\r\n", b"\n", b""):
                    break
                name, _, value = h.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value.strip())
            if length:
                await reader.readexactly(length)
            url = urllib.parse.urlparse(target)
            status, body = 200, {}
            if url.path.startswith("/_latency/"):
                STATE["latency"] = int(url.path.rsplit("/", 1)[1]) / 1000
            elif url.path == "/_count":
                body = {"count": STATE["count"]}
            elif url.path == "/jwks":
                body = jwks()
            elif url.path == "/_jwt":
                q = dict(urllib.parse.parse_qsl(url.query))
                now = int(time.time())
                body = {"token": jwt({"iss": ISSUER, "aud": "token-broker", "sub": q.get("sub", "bench"),
                                      "iat": now, "exp": now + 3600, "tenants": q.get("tenants", "*").split(",") if q.get("tenants", "*") != "*" else "*"}, sign=True)}
            elif method == "POST":
                STATE["count"] += 1
                if STATE["latency"]:
                    await asyncio.sleep(STATE["latency"])
                now = int(time.time())
                body = {"accessToken": jwt({"exp": now + 3600, "iat": now, "jti": str(uuid.uuid4())})}
            else:
                status = 404
            data = json.dumps(body).encode()
            writer.write(f"HTTP/1.1 {status} OK\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n".encode() + data)
            await writer.drain()
    except (ConnectionError, ValueError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def main(port):
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
