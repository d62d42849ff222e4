#!/usr/bin/env bash
# Partners that demand proof of possession, checked against real implementations: panva's
# oidc-provider (OpenID Certified) as the partner's token endpoint with private_key_jwt,
# client_secret_jwt, tls_client_auth (HTTPS with a test CA), DPoP with nonces required and a
# JWT bearer grant; a resource server beside it that accepts a token only with the proof it is
# bound to (checked with `jose`). Drives a live broker on the embedded default (check.py).
# Needs a built binary (target/debug/token-broker by default), Node.js and openssl.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
bin="${BROKER_BIN:-target/debug/token-broker}"
[ -x "$bin" ] || cargo build --quiet
python3 -c 'import requests' 2>/dev/null || python3 -m pip install -q requests
work=$(mktemp -d)
(cd "$work" && npm init -y >/dev/null && npm install --silent --no-audit --no-fund "oidc-provider@9" "jose@6" >/dev/null)
cp .ci/pop/partner.mjs "$work/"

# A test CA, the partner's server certificate and the tenant's client certificate (P-256),
# and the tenant's signing key (PKCS#8).
cd "$work"
ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.pem -days 2 -subj /CN=pop-test-ca 2>/dev/null
openssl req "${ec[@]}" -keyout server.key -out server.csr -subj /CN=127.0.0.1 2>/dev/null
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 \
  -extfile <(printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth') 2>/dev/null
openssl req "${ec[@]}" -keyout client.key -out client.csr -subj /CN=token-broker-test 2>/dev/null
openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 2 \
  -extfile <(printf 'extendedKeyUsage=clientAuth') 2>/dev/null
openssl req -x509 "${ec[@]}" -keyout selfsigned.key -out selfsigned.pem -days 2 -subj /CN=self-signed-client 2>/dev/null
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out tenant.pem 2>/dev/null
cd "$root"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
admin="pop-admin-$(od -An -N24 -tx1 /dev/urandom | tr -d " \n")"
BROKER_LISTEN="127.0.0.1:$port" BROKER_ADMIN_TOKEN="$admin" DATABASE_URL="sqlite://$work/broker.db" \
  BROKER_ALLOW_INSECURE_ISSUERS=true RUST_LOG=info "$bin" serve >"$work/broker.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
python3 .ci/pop/check.py "http://127.0.0.1:$port" "$admin" "$work" \
  "$(free_port)" "$(free_port)" "$(free_port)" "$(free_port)" ||
  { echo "--- broker log"; tail -30 "$work/broker.log"; echo "--- partner log"; tail -30 "$work/partner.log"; exit 1; }
