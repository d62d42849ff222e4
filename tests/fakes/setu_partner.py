#!/usr/bin/env python3
"""A stand-in for Setu's partner token endpoint: the one fake partner of the README, the CI
scripts and the benchmark (the Rust integration tests mount wiremock partners instead, one per
test).

POST /auth/token with grant_type=client_credentials&client_id=...&client_secret=... answers
{"accessToken": <JWT>, "refreshToken": <JWT>} with no expiry field; the access token's exp
claim is iat + 300 s, as in Setu's own sample (--lifetime changes it). Any client id is
accepted when the secret is "demo-secret" (--any-secret accepts every secret).

For the benchmark, on the same port:
  POST /_latency/<ms>      every later token answer waits this long
  GET  /_count             {"count": <token requests so far>}
  GET  /jwks               an IdP's JWKS (an RSA key made on first use; needs `cryptography`)
  GET  /_jwt?sub=&tenants= an RS256 caller JWT signed with that key (aud token-broker)

Usage: python3 tests/fakes/setu_partner.py [port] [--lifetime S] [--any-secret]  (port 9911)
"""
import asyncio
import base64
import json
import sys
import time
import urllib.parse
import uuid

ISSUER = "https://idp.bench.local"
STATE = {"latency": 0.0, "count": 0, "key": None, "lifetime": 300, "any_secret": False}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def key():
    if STATE["key"] is None:
        from cryptography.hazmat.primitives.asymmetric import rsa
        STATE["key"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return STATE["key"]


def jwt(claims, sign=False):
    header = {"alg": "RS256", "typ": "JWT", "kid": "fake"}
    head = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    if not sign:
        return head + "." + b64(uuid.uuid4().bytes)
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    return head + "." + b64(key().sign(head.encode(), padding.PKCS1v15(), hashes.SHA256()))


def jwks():
    pub = key().public_key().public_numbers()
    num = lambda n: b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))
    return {"keys": [{"kty": "RSA", "kid": "fake", "alg": "RS256", "use": "sig", "n": num(pub.n), "e": num(pub.e)}]}


async def token(form):
    """The Setu answer for a token request, as (status, body)."""
    STATE["count"] += 1
    if STATE["latency"]:
        await asyncio.sleep(STATE["latency"])
    if form.get("grant_type") != "client_credentials" or not (
            STATE["any_secret"] or form.get("client_secret") == "demo-secret"):
        return 401, {"error": "invalid_client"}
    now = int(time.time())
    return 200, {
        "accessToken": jwt({"exp": now + STATE["lifetime"], "iat": now, "jti": str(uuid.uuid4()), "azp": form.get("client_id")}),
        "refreshToken": jwt({"exp": now + 1800, "iat": now, "typ": "Refresh"}),
    }


async def route(method, url, body):
    if method == "POST" and url.path == "/auth/token":
        return await token(dict(urllib.parse.parse_qsl(body.decode())))
    if method == "POST" and url.path.startswith("/_latency/"):
        STATE["latency"] = int(url.path.rsplit("/", 1)[1]) / 1000
        return 200, {}
    if url.path == "/_count":
        return 200, {"count": STATE["count"]}
    if url.path == "/jwks":
        return 200, jwks()
    if url.path == "/_jwt":
        q = dict(urllib.parse.parse_qsl(url.query))
        tenants = q.get("tenants", "*")
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": "token-broker", "sub": q.get("sub", "bench"), "iat": now,
                  "exp": now + 3600, "tenants": "*" if tenants == "*" else tenants.split(",")}
        return 200, {"token": jwt(claims, sign=True)}
    return 404, {"error": "not_found"}


async def handle(reader, writer):
    """HTTP/1.1 with keep-alive, bodies by content-length (what the broker sends)."""
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
            body = await reader.readexactly(length) if length else b""
            status, answer = await route(method, urllib.parse.urlparse(target), body)
            data = json.dumps(answer).encode()
            writer.write(f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\ncontent-type: application/json\r\n"
                         f"content-length: {len(data)}\r\n\r\n".encode() + data)
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
    args = sys.argv[1:]
    if "--any-secret" in args:
        STATE["any_secret"] = True
        args.remove("--any-secret")
    if "--lifetime" in args:
        i = args.index("--lifetime")
        STATE["lifetime"] = int(args[i + 1])
        del args[i:i + 2]
    try:
        asyncio.run(main(int(args[0]) if args else 9911))
    except KeyboardInterrupt:
        pass
