#!/usr/bin/env bash
# Generates a Python client from openapi.yaml with openapi-python-client and runs the README
# walk-through with it (twice, against one broker) against the fake Setu partner; then lints
# the spec with redocly (0 errors required). Needs a built binary (target/debug/token-broker by
# default).
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="${BROKER_BIN:-target/debug/token-broker}"
[ -x "$bin" ] || cargo build --quiet
command -v openapi-python-client >/dev/null || python3 -m pip install -q "openapi-python-client==0.29.*"

work=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
partner_port=$(free_port)
admin="client-admin-$(od -An -N24 -tx1 /dev/urandom | tr -d " \n")"
python3 tests/fakes/setu_partner.py "$partner_port" >"$work/partner.log" 2>&1 &
partner=$!
BROKER_LISTEN="127.0.0.1:$port" BROKER_ADMIN_TOKEN="$admin" DATABASE_URL="sqlite://$work/broker.db" \
  BROKER_ALLOW_INSECURE_ISSUERS=true RUST_LOG=warn "$bin" serve >"$work/broker.log" 2>&1 &
pid=$!
trap 'kill $pid $partner 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done

(cd "$work" && openapi-python-client generate --path "$OLDPWD/openapi.yaml" --output-path "$work/client" --meta setup >"$work/generate.log" 2>&1) ||
  { cat "$work/generate.log"; exit 1; }
if grep -qi "warning" "$work/generate.log"; then
  echo "openapi-python-client warned:" >&2; cat "$work/generate.log" >&2; exit 1
fi
python3 -m venv --system-site-packages "$work/venv"
"$work/venv/bin/pip" install -q "$work/client"
for run in 1 2; do
  "$work/venv/bin/python" .ci/client/walkthrough.py "http://127.0.0.1:$port" "$admin" \
    "http://127.0.0.1:$partner_port/auth/token" || { echo "--- broker log"; tail -50 "$work/broker.log"; exit 1; }
done
