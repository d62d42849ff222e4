#!/usr/bin/env bash
# Property-based contract test: starts the broker on the embedded default (a throwaway SQLite
# database) with an admin token and the fake Setu partner, and runs schemathesis against
# openapi.yaml with every check it has (the stated exceptions are in the .toml files) three
# times: every operation with
# the admin token; the caller endpoints with a real caller key, the tenant pinned to a
# registered one (so tokens are really minted); the OAuth endpoints with the caller's id and
# key as HTTP Basic client credentials. Needs a built binary (target/debug/token-broker by
# default).
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="${BROKER_BIN:-target/debug/token-broker}"
[ -x "$bin" ] || cargo build --quiet
command -v schemathesis >/dev/null || python3 -m pip install -q schemathesis

work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
partner_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
admin="contract-admin-$(od -An -N24 -tx1 /dev/urandom | tr -d " \n")"
python3 tests/fakes/setu_partner.py "$partner_port" >"$work/partner.log" 2>&1 &
partner=$!
# The ignored-auth check sends hundreds of invalid admin credentials in seconds and wants 401
# for each: the failed-authentication throttle (429 admin_auth_throttled past 10/s, tested
# on its own in tests/api/security.rs) is raised for this run.
BROKER_LISTEN="127.0.0.1:$port" BROKER_ADMIN_TOKEN="$admin" DATABASE_URL="sqlite://$work/broker.db" \
  BROKER_ADMIN_AUTH_FAILURES_PER_SECOND=100000 \
  BROKER_ALLOW_INSECURE_ISSUERS=true RUST_LOG=warn "$bin" serve >"$work/broker.log" 2>&1 &
pid=$!
trap 'kill $pid $partner 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done

schemathesis --config-file .ci/contract/schemathesis.toml run openapi.yaml \
  --url "http://127.0.0.1:$port" \
  -H "Authorization: Bearer $admin" --exclude-tag token --exclude-tag oauth \
  --seed "${CONTRACT_SEED:-20261123}"

# A registered tenant and a caller scoped to it, for the caller and OAuth runs.
auth=(-H "authorization: Bearer $admin" -H 'content-type: application/json')
curl -fsS -o /dev/null -X DELETE "http://127.0.0.1:$port/admin/v1/tenants/acme-setu" "${auth[@]}" || true
curl -fsS -o /dev/null -X POST "http://127.0.0.1:$port/admin/v1/tenants" "${auth[@]}" -d '{"id": "acme-setu",
  "issuer": {"kind": "setu_partner", "token_url": "http://127.0.0.1:'"$partner_port"'/auth/token"},
  "credentials": {"client_id": "acme", "client_secret": "demo-secret"}}'
caller=$(curl -fsS -X POST "http://127.0.0.1:$port/admin/v1/callers" "${auth[@]}" \
  -d '{"name": "contract-caller", "tenants": ["acme-setu"]}')
key=$(echo "$caller" | python3 -c 'import json,sys; print(json.load(sys.stdin)["api_key"])')
id=$(echo "$caller" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')

schemathesis --config-file .ci/contract/callers.toml run openapi.yaml \
  --url "http://127.0.0.1:$port" --include-tag token \
  -H "Authorization: Bearer $key" \
  --seed "${CONTRACT_SEED:-20261123}"
schemathesis --config-file .ci/contract/schemathesis.toml run openapi.yaml \
  --url "http://127.0.0.1:$port" --include-tag oauth \
  --auth "$id:$key" \
  --seed "${CONTRACT_SEED:-20261123}"

# The caller run must have reached the partner through the broker (not only 401/403/404).
fetched=$(curl -fsS "http://127.0.0.1:$port/metrics" | python3 -c '
import sys
print(int(sum(float(l.rsplit(" ", 1)[1]) for l in sys.stdin
  if l.startswith("broker_token_requests_total{") and "tenant=\"acme-setu\"" in l
  and ("outcome=\"cache\"" in l or "outcome=\"minted\"" in l))))')
echo "contract: $fetched tokens handed out to the generated caller requests"
[ "$fetched" -gt 0 ] || { echo "contract: the caller run never got a token" >&2; exit 1; }
