"""Drives a live broker against a partner that demands proof of possession (partner.mjs:
oidc-provider + a resource server checking proofs with jose). Every check names what failed.

    python3 check.py <broker url> <admin token> <work dir> <as port> <as tls port> <rs port> <rs tls port>
"""
import json
import subprocess
import sys
import time

import requests

broker, admin, work, as_port, as_tls, rs_port, rs_tls = sys.argv[1:8]
A = {"authorization": f"Bearer {admin}"}
AS = f"http://127.0.0.1:{as_port}"
AS_TLS = f"https://127.0.0.1:{as_tls}"
RS = f"http://127.0.0.1:{rs_port}"
RS_TLS = f"https://127.0.0.1:{rs_tls}"


def read(name):
    with open(f"{work}/{name}") as f:
        return f.read()


def check(cond, what, *context):
    if not cond:
        print(f"pop: FAILED: {what}", *context, file=sys.stderr)
        sys.exit(1)
    print(f"pop: ok: {what}")


def tenant(spec):
    r = requests.post(f"{broker}/admin/v1/tenants", headers=A, json=spec)
    check(r.status_code == 201, f"tenant {spec['id']} created", r.status_code, r.text)
    return r.json()


key = read("tenant.pem")
secrets = {
    "private key": key.strip().splitlines()[1],
    "client secret": "csjwt-secret-that-is-at-least-32-bytes-long",
    "tls key": read("client.key").strip().splitlines()[1],
}
made = [
    tenant({"id": "pkjwt", "issuer": {"kind": "oauth2_client_credentials", "token_url": f"{AS}/token",
            "auth_method": "private_key_jwt", "publish_jwks": True},
            "credentials": {"client_id": "pkjwt", "private_key": key}}),
    tenant({"id": "csjwt", "issuer": {"kind": "oauth2_client_credentials", "token_url": f"{AS}/token",
            "auth_method": "client_secret_jwt"},
            "credentials": {"client_id": "csjwt", "client_secret": secrets["client secret"]}}),
    tenant({"id": "dpop", "issuer": {"kind": "oauth2_client_credentials", "token_url": f"{AS}/token",
            "auth_method": "private_key_jwt", "dpop": True},
            "credentials": {"client_id": "dpop", "private_key": key},
            "proxy": {"base_url": RS}}),
    tenant({"id": "mtls", "issuer": {"kind": "oauth2_client_credentials", "token_url": f"{AS_TLS}/token",
            "auth_method": "tls_client_auth", "tls_ca": read("ca.pem")},
            "credentials": {"client_id": "mtls", "tls_certificate": read("client.pem"),
                            "tls_private_key": read("client.key")},
            "proxy": {"base_url": RS_TLS}}),
    tenant({"id": "selfsigned", "issuer": {"kind": "oauth2_client_credentials", "token_url": f"{AS_TLS}/token",
            "auth_method": "self_signed_tls_client_auth", "tls_ca": read("ca.pem")},
            "credentials": {"client_id": "selfsigned", "tls_certificate": read("selfsigned.pem"),
                            "tls_private_key": read("selfsigned.key")}}),
    tenant({"id": "jwtb", "issuer": {"kind": "jwt_bearer", "token_url": f"{AS}/token",
            "assertion": {"iss": "{{client_id}}@broker.test", "sub": "svc@broker.test",
                          "aud": f"{AS}/token", "scope": "openid"}},
            "credentials": {"client_id": "bearer", "private_key": key}}),
]
for t in made:
    text = json.dumps(t)
    check(all(v not in text for v in secrets.values()), f"tenant {t['id']}: no key or secret in the answer")
dpop_fields = made[2]["credential_fields"]
check("dpop_private_key" in dpop_fields, "a DPoP tenant gets its own key, named among the fields", dpop_fields)

# The public halves: admins always, the partner when published.
jwks = requests.get(f"{broker}/admin/v1/tenants/pkjwt/jwks", headers=A)
check(jwks.status_code == 200 and len(jwks.json()["keys"]) == 1, "admin JWKS of pkjwt", jwks.text)
jwk = jwks.json()["keys"][0]
check(set(jwk) == {"kty", "crv", "x", "y", "kid", "alg", "use"}, "the JWK holds the public half only", sorted(jwk))
public = requests.get(f"{broker}/v1/tenants/pkjwt/jwks.json")
check(public.status_code == 200 and public.json() == jwks.json(), "published JWKS equals the admin's", public.text)
check(requests.get(f"{broker}/v1/tenants/csjwt/jwks.json").status_code == 404, "an unpublished JWKS is not found")
with open(f"{work}/client.jwk.json", "w") as f:
    json.dump(jwk, f)

partner = subprocess.Popen(["node", "partner.mjs", as_port, as_tls, rs_port, rs_tls, work], cwd=work,
                           stdout=subprocess.PIPE, stderr=open(f"{work}/partner.log", "w"), text=True)
check(partner.stdout.readline().strip() == "ready", "the partner (oidc-provider) is up")

try:
    caller = requests.post(f"{broker}/admin/v1/callers", headers=A, json={"name": "pop-caller", "tenants": "*"}).json()
    C = {"authorization": f"Bearer {caller['api_key']}"}

    tokens = {}
    for t, typ in [("pkjwt", "Bearer"), ("csjwt", "Bearer"), ("dpop", "DPoP"), ("mtls", "Bearer"), ("selfsigned", "Bearer"), ("jwtb", "Bearer")]:
        r = requests.get(f"{broker}/v1/tenants/{t}/token", headers=C)
        check(r.status_code == 200, f"{t}: the partner accepted the broker's client authentication", r.status_code, r.text)
        check(r.json()["token_type"] == typ, f"{t}: token_type {typ}", r.json()["token_type"])
        tokens[t] = r.json()["access_token"]
    test = requests.post(f"{broker}/admin/v1/tenants/dpop/test", headers=A)
    check(test.status_code == 200 and test.json().get("ok") is True, "dpop: the admin dry run mints too", test.text)
    tokens["dpop"] = requests.get(f"{broker}/v1/tenants/dpop/token", headers=C).json()["access_token"]

    # Proxy mode with DPoP: a fresh proof per call, the RS nonce followed without a re-mint.
    r = requests.get(f"{broker}/v1/tenants/dpop/proxy/api/accounts?x=1", headers=C)
    check(r.status_code == 200 and r.json().get("dpop", {}).get("nonce"), "dpop proxy: the RS took the token with its proof", r.status_code, r.text)
    jkt = r.json()["dpop"]["jkt"]
    for i in range(3):
        requests.get(f"{RS}/rotate-nonce")
        r = requests.post(f"{broker}/v1/tenants/dpop/proxy/api/pay", headers=C, json={"n": i})
        check(r.status_code == 200, f"dpop proxy: a new RS nonce is followed (round {i + 1})", r.status_code, r.text)
    same = requests.get(f"{broker}/v1/tenants/dpop/token", headers=C).json()["access_token"]
    check(same == tokens["dpop"], "dpop proxy: a nonce challenge never re-mints")

    # The bound token is useless without the key.
    bearer = requests.get(f"{RS}/api/accounts", headers={"authorization": f"Bearer {tokens['dpop']}"})
    check(bearer.status_code == 401, "the DPoP-bound token is refused as a Bearer token", bearer.status_code)
    bare = requests.get(f"{RS}/api/accounts", headers={"authorization": f"DPoP {tokens['dpop']}"})
    check(bare.status_code == 401, "the DPoP-bound token is refused without a proof", bare.status_code)

    # A caller's own call with a proof from the broker.
    url = f"{RS}/api/reports"
    p = requests.post(f"{broker}/v1/tenants/dpop/dpop-proof", headers=C, json={"htm": "GET", "htu": url})
    check(p.status_code == 200 and p.json()["jkt"] == jkt, "dpop-proof answers a proof for the token's key", p.status_code, p.text)
    first = requests.get(url, headers={"authorization": f"DPoP {tokens['dpop']}", "dpop": p.json()["proof"]})
    check(first.status_code == 401 and first.headers.get("dpop-nonce"), "the RS asks for its nonce", first.status_code)
    p = requests.post(f"{broker}/v1/tenants/dpop/dpop-proof", headers=C,
                      json={"htm": "GET", "htu": url + "?q=1#f", "nonce": first.headers["dpop-nonce"]})
    ok = requests.get(url, headers={"authorization": f"DPoP {tokens['dpop']}", "dpop": p.json()["proof"]})
    check(ok.status_code == 200, "a caller's call with the broker's proof and the RS nonce", ok.status_code, ok.text)
    replay = requests.get(url, headers={"authorization": f"DPoP {tokens['dpop']}", "dpop": p.json()["proof"]})
    check(replay.status_code == 401, "the same proof is not accepted twice", replay.status_code)
    wrong = requests.post(f"{broker}/v1/tenants/pkjwt/dpop-proof", headers=C, json={"htm": "GET", "htu": url})
    check(wrong.status_code == 409 and wrong.json()["code"] == "dpop_not_enabled", "no proof for a tenant without DPoP", wrong.text)
    bad = requests.post(f"{broker}/v1/tenants/dpop/dpop-proof", headers=C, json={"htm": "get", "htu": "ftp://x"})
    check(bad.status_code == 400 and bad.json()["field"] == "htm", "a malformed proof request is 400 naming the field", bad.text)

    # mTLS: the certificate at the token endpoint and on proxied calls.
    r = requests.get(f"{broker}/v1/tenants/mtls/proxy/api/accounts", headers=C)
    check(r.status_code == 200 and r.json().get("mtls"), "mtls proxy: the RS saw the bound certificate", r.status_code, r.text)
    no_cert = requests.get(f"{RS_TLS}/api/accounts", headers={"authorization": f"Bearer {tokens['mtls']}"},
                           verify=f"{work}/ca.pem")
    check(no_cert.status_code == 401, "the certificate-bound token is refused without the certificate", no_cert.status_code)

    for _ in range(40):  # the audit writer flushes in batches
        audit = requests.get(f"{broker}/admin/v1/audit?tenant=dpop&limit=200", headers=A).json()["entries"]
        if any(e.get("detail") == "dpop proof" for e in audit):
            break
        time.sleep(0.1)
    check(any(e.get("detail") == "dpop proof" for e in audit), "dpop-proof is on the audit trail",
          [(e.get("action"), e.get("detail")) for e in audit][:20])
finally:
    partner.terminate()

log = read("broker.log") + read("partner.log")
for what, value in secrets.items():
    check(value not in log, f"no {what} in the logs")
for t, tok in tokens.items():
    check(tok not in read("broker.log"), f"no {t} access token in the broker's log")
print("pop: all checks passed")
