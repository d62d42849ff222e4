#!/usr/bin/env bash
# Runs the README's quick start as a newcomer would: the first ```sh block after "## Quick
# start" (the broker's first start) in the background, the admin token taken from what it
# printed, then the second block (CLI and curl) with that token. The built binary (BROKER_BIN,
# default target/debug/token-broker) stands in for `cargo run --release --` and
# ./target/release/token-broker. Uses ports 8080 and 9911, as the README does.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="${BROKER_BIN:-target/debug/token-broker}"
[ -x "$bin" ] || cargo build --quiet
work=$(mktemp -d)
block() {
  awk -v n="$1" '/^## Quick start/ {q = 1} /^## / && !/^## Quick start/ {q = 0}
    q && /^```sh$/ {k++; if (k == n) {on = 1; next}} on && /^```$/ {exit} on {print}' README.md
}
block 1 | sed "s#cargo run --release -- serve#$PWD/$bin serve#" >"$work/start.sh"
grep -q "serve" "$work/start.sh" || { echo "quickstart: first block not found" >&2; exit 1; }
export DATABASE_URL="sqlite://$work/token-broker.db" RUST_LOG=warn
unset BROKER_ADMIN_TOKEN
cleanup() { pkill -f "$PWD/$bin serve" 2>/dev/null || true; pkill -f "tests/fakes/setu_partner.py 9911" 2>/dev/null || true; }
trap 'cleanup; rm -rf "$work"' EXIT
bash -e "$work/start.sh" >"$work/broker.out" 2>"$work/broker.err" &
for _ in $(seq 1 100); do
  grep -q 'tbadmin_' "$work/broker.out" 2>/dev/null && break
  sleep 0.1
done
token=$(grep -o 'tbadmin_[0-9A-Za-z]\{43\}' "$work/broker.out" | head -1)
[ -n "$token" ] || { cat "$work/broker.out" "$work/broker.err"; echo "quickstart: no admin token printed" >&2; exit 1; }
block 2 | sed -e "s#BROKER_ADMIN_TOKEN=tbadmin_…#BROKER_ADMIN_TOKEN=$token#" \
  -e "s#\./target/release/token-broker#$PWD/$bin#g" >"$work/use.sh"
grep -q "tenants create" "$work/use.sh" || { echo "quickstart: second block not found" >&2; exit 1; }
timeout 120 bash -e "$work/use.sh" >"$work/use.out" 2>&1 || { cat "$work/use.out"; echo "quickstart: the steps failed" >&2; exit 1; }
grep -q '"access_token":"' "$work/use.out" || { cat "$work/use.out"; echo "quickstart: no token fetched" >&2; exit 1; }
echo "quickstart: ok (first start printed the admin token; tenant, caller and token through the CLI)"
