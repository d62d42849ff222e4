#!/usr/bin/env python3
"""Benchmark driver helpers (stdlib only): registering tenants and callers, warming tokens.
The cold herd runs in Rust (benches/herd.rs)."""
import argparse
import concurrent.futures
import http.client
import json
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
    body = json.loads(data)
    # `--with-id`: "<id> <key>" (the OAuth client id and secret).
    print(f'{body["id"]} {body["api_key"]}' if a.with_id else body["api_key"])


def warm(a):
    def one(i):
        status, data = request(a.base, "GET", f"/v1/tenants/{a.prefix}{i}/token", a.key)
        if status != 200:
            raise SystemExit(f"warm {i}: {status} {data[:200]}")
    with concurrent.futures.ThreadPoolExecutor(a.concurrency) as pool:
        list(pool.map(one, range(a.start, a.start + a.count)))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("register"); r.add_argument("--base"); r.add_argument("--admin"); r.add_argument("--partner")
    r.add_argument("--prefix", default="t"); r.add_argument("--start", type=int, default=0); r.add_argument("--count", type=int); r.add_argument("--concurrency", type=int, default=16)
    c = sub.add_parser("caller"); c.add_argument("--base"); c.add_argument("--admin"); c.add_argument("--name", default="bench"); c.add_argument("--with-id", action="store_true")
    w = sub.add_parser("warm"); w.add_argument("--base"); w.add_argument("--key"); w.add_argument("--prefix", default="t")
    w.add_argument("--start", type=int, default=0); w.add_argument("--count", type=int); w.add_argument("--concurrency", type=int, default=16)

    a = ap.parse_args()
    {"register": register, "caller": caller, "warm": warm}[a.cmd](a)


if __name__ == "__main__":
    main()
