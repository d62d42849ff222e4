#!/usr/bin/env bash
# The OAuth 2.0 face, driven by the client libraries callers use (not hand-rolled requests):
# Python Authlib (client_secret_basic, client_secret_post, RFC 8693 token exchange) and Node
# openid-client (RFC 8414 discovery, client credentials, token exchange), each getting the fake
# Setu partner's token through a live broker on the embedded default, with a test IdP whose
# JWKS is served from a temporary directory. Needs a built binary (target/debug/token-broker by
# default).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
bin="${BROKER_BIN:-target/debug/token-broker}"
[ -x "$bin" ] || cargo build --quiet
python3 -c 'import authlib, requests' 2>/dev/null || python3 -m pip install -q "authlib==1.*" requests
work=$(mktemp -d)
(cd "$work" && npm init -y >/dev/null && npm install --silent --no-audit --no-fund "openid-client@6" >/dev/null)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
partner_port=$(free_port)
idp_port=$(free_port)
admin="oauth-admin-$(od -An -N24 -tx1 /dev/urandom | tr -d " \n")"

# The test IdP: its public key as a JWKS, served over plain HTTP on loopback.
mkdir -p "$work/idp"
python3 .ci/oauth/idp.py jwks tests/fixtures/rsa1.pub.pem k1 >"$work/idp/jwks.json"
python3 -m http.server "$idp_port" --bind 127.0.0.1 --directory "$work/idp" >"$work/idp.log" 2>&1 &
idp=$!
python3 tests/fakes/setu_partner.py "$partner_port" >"$work/partner.log" 2>&1 &
partner=$!
BROKER_LISTEN="127.0.0.1:$port" BROKER_ADMIN_TOKEN="$admin" DATABASE_URL="sqlite://$work/broker.db" \
  BROKER_ALLOW_INSECURE_ISSUERS=true RUST_LOG=warn \
  BROKER_JWT_JWKS_URL="http://127.0.0.1:$idp_port/jwks.json" BROKER_JWT_ISSUER=https://idp.test \
  BROKER_JWT_AUDIENCE=token-broker "$bin" serve >"$work/broker.log" 2>&1 &
pid=$!
trap 'kill $pid $partner $idp 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done

base="http://127.0.0.1:$port"
auth=(-H "authorization: Bearer $admin" -H 'content-type: application/json')
curl -fsS -o /dev/null -X POST "$base/admin/v1/tenants" "${auth[@]}" -d '{"id": "acme-setu",
  "issuer": {"kind": "setu_partner", "token_url": "http://127.0.0.1:'"$partner_port"'/auth/token"},
  "credentials": {"client_id": "acme", "client_secret": "demo-secret"}}'
curl -fsS -o /dev/null -X POST "$base/admin/v1/tenants" "${auth[@]}" -d '{"id": "other",
  "issuer": {"kind": "setu_partner", "token_url": "http://127.0.0.1:'"$partner_port"'/auth/token"},
  "credentials": {"client_id": "other", "client_secret": "demo-secret"}}'
caller=$(curl -fsS -X POST "$base/admin/v1/callers" "${auth[@]}" -d '{"name": "billing", "tenants": ["acme-setu"]}')
export OAUTH_CLIENT_ID=$(echo "$caller" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
export OAUTH_CLIENT_SECRET=$(echo "$caller" | python3 -c 'import json,sys; print(json.load(sys.stdin)["api_key"])')
export OAUTH_SUBJECT_TOKEN=$(python3 .ci/oauth/idp.py sign tests/fixtures/rsa1.pem k1 https://idp.test token-broker payments acme-setu)
export BROKER_URL="$base"

fail() { echo "--- broker log"; tail -50 "$work/broker.log"; exit 1; }
started=$(date +%s%N)
python3 .ci/oauth/authlib_client.py || fail
# ESM resolves packages from the script's directory: run a copy beside node_modules.
cp .ci/oauth/openid_client.mjs "$work/" && node "$work/openid_client.mjs" || fail
echo "oauth clients: $(( ($(date +%s%N) - started) / 1000000 )) ms"
