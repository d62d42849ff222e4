#!/usr/bin/env python3
"""A stand-in for Setu's partner token endpoint, for local trials of the broker.

POST /auth/token with grant_type=client_credentials&client_id=...&client_secret=...
answers {"accessToken": <JWT>, "refreshToken": <JWT>} with no expiry field; the access
token's exp claim is iat + 300 s, as in Setu's own sample. Any client id is accepted when the
secret is "demo-secret". Usage: python3 tests/fakes/setu_partner.py [port]  (default 9911)
"""
import base64
import http.server
import json
import sys
import time
import urllib.parse
import uuid


def b64(obj):
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def jwt(claims):
    return f'{b64({"alg": "RS256", "typ": "JWT"})}.{b64(claims)}.{b64(uuid.uuid4().hex)}'


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("content-length", 0))
        form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
        if self.path != "/auth/token":
            return self.answer(404, {"error": "not_found"})
        if form.get("grant_type") != "client_credentials" or form.get("client_secret") != "demo-secret":
            return self.answer(401, {"error": "invalid_client"})
        now = int(time.time())
        self.answer(200, {
            "accessToken": jwt({"exp": now + 300, "iat": now, "jti": str(uuid.uuid4()), "azp": form.get("client_id")}),
            "refreshToken": jwt({"exp": now + 1800, "iat": now, "typ": "Refresh"}),
        })

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):
        sys.stderr.write("fake-setu: " + (fmt % args) + "\n")


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 9911
    http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
