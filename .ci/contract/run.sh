#!/usr/bin/env bash
# Property-based contract test: starts the broker on the embedded default (a throwaway SQLite
# database) with an admin token, and runs schemathesis against openapi.yaml with the checks
# not_a_server_error, status_code_conformance, content_type_conformance and
# response_schema_conformance. Needs a built binary (target/debug/token-broker by default).
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="${BROKER_BIN:-target/debug/token-broker}"
[ -x "$bin" ] || cargo build --quiet
command -v schemathesis >/dev/null || python3 -m pip install -q schemathesis

work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
admin="contract-admin-$(date +%s)"
BROKER_LISTEN="127.0.0.1:$port" BROKER_ADMIN_TOKEN="$admin" DATABASE_URL="sqlite://$work/broker.db" \
  RUST_LOG=warn "$bin" serve >"$work/broker.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done

schemathesis --config-file .ci/contract/schemathesis.toml run openapi.yaml \
  --url "http://127.0.0.1:$port" \
  -H "Authorization: Bearer $admin" \
  --seed "${CONTRACT_SEED:-20261123}"
