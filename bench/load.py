#!/usr/bin/env python3
"""Benchmark driver helpers (stdlib only): registering tenants and callers, warming tokens,
and the cold herd (many concurrent one-shot callers across replicas)."""
import argparse
import asyncio
import concurrent.futures
import http.client
import json
import statistics
import sys
import time
import urllib.parse


def request(base, method, path, token=None, body=None):
    u = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data


def register(a):
    def one(i):
        spec = {"id": f"{a.prefix}{i}", "issuer": {"kind": "setu_partner", "token_url": a.partner, "default_ttl_seconds": 900},
                "credentials": {"client_id": f"c{i}", "client_secret": "bench-secret"}}
        status, data = request(a.base, "POST", "/admin/v1/tenants", a.admin, spec)
        if status not in (201, 409):
            raise SystemExit(f"register {i}: {status} {data[:200]}")
    with concurrent.futures.ThreadPoolExecutor(a.concurrency) as pool:
        list(pool.map(one, range(a.start, a.start + a.count)))


def caller(a):
    status, data = request(a.base, "POST", "/admin/v1/callers", a.admin, {"name": a.name, "tenants": "*"})
    if status != 201:
        raise SystemExit(f"caller: {status} {data[:200]}")
    print(json.loads(data)["api_key"])


def warm(a):
    def one(i):
        status, data = request(a.base, "GET", f"/v1/tenants/{a.prefix}{i}/token", a.key)
        if status != 200:
            raise SystemExit(f"warm {i}: {status} {data[:200]}")
    with concurrent.futures.ThreadPoolExecutor(a.concurrency) as pool:
        list(pool.map(one, range(a.start, a.start + a.count)))


async def one_shot(host, port, path, key):
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {key}\r\nconnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    status = int(data.split(b" ", 2)[1])
    return time.perf_counter() - t0, status, data.split(b"\r\n\r\n", 1)[1]


async def herd_async(a):
    bases = [urllib.parse.urlparse(b) for b in a.bases.split(",")]
    path = f"/v1/tenants/{a.tenant}/token"
    start = asyncio.Event()

    async def caller_task(i):
        await start.wait()
        b = bases[i % len(bases)]
        return await one_shot(b.hostname, b.port, path, a.key)

    tasks = [asyncio.create_task(caller_task(i)) for i in range(a.n)]
    await asyncio.sleep(0.2)
    start.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    ok = [r for r in results if not isinstance(r, BaseException) and r[1] == 200]
    tokens = {json.loads(r[2])["access_token"] for r in ok}
    lat = sorted(r[0] for r in ok)
    p = lambda q: lat[min(len(lat) - 1, int(len(lat) * q))] * 1000 if lat else float("nan")
    print(json.dumps({"callers": a.n, "ok": len(ok), "errors": a.n - len(ok), "distinct_tokens": len(tokens),
                      "p50_ms": round(p(0.5), 1), "p99_ms": round(p(0.99), 1), "max_ms": round(lat[-1] * 1000, 1) if lat else None}))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("register"); r.add_argument("--base"); r.add_argument("--admin"); r.add_argument("--partner")
    r.add_argument("--prefix", default="t"); r.add_argument("--start", type=int, default=0); r.add_argument("--count", type=int); r.add_argument("--concurrency", type=int, default=16)
    c = sub.add_parser("caller"); c.add_argument("--base"); c.add_argument("--admin"); c.add_argument("--name", default="bench")
    w = sub.add_parser("warm"); w.add_argument("--base"); w.add_argument("--key"); w.add_argument("--prefix", default="t")
    w.add_argument("--start", type=int, default=0); w.add_argument("--count", type=int); w.add_argument("--concurrency", type=int, default=16)
    h = sub.add_parser("herd"); h.add_argument("--bases"); h.add_argument("--key"); h.add_argument("--tenant"); h.add_argument("--n", type=int, default=1000)
    a = ap.parse_args()
    if a.cmd == "herd":
        asyncio.run(herd_async(a))
    else:
        {"register": register, "caller": caller, "warm": warm}[a.cmd](a)


if __name__ == "__main__":
    main()
