#!/usr/bin/env bash
# Runs the README's walk-through as written (its first ```sh block after the
# "## Walk-through" heading) twice against one database: the second run must succeed too.
# `cargo run --release -- serve` is replaced by the already built binary (BROKER_BIN, default
# target/debug/token-broker) so CI does not build a second profile; everything else is the
# README's text. Uses ports 8080 and 9911, as the README does.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="${BROKER_BIN:-target/debug/token-broker}"
[ -x "$bin" ] || cargo build --quiet
work=$(mktemp -d)
awk '/^## Walk-through/ {w = 1} w && /^```sh$/ {on = 1; next} on && /^```$/ {exit} on {print}' README.md \
  | sed "s#cargo run --release -- serve#$PWD/$bin serve#" >"$work/walkthrough.sh"
grep -q "serve" "$work/walkthrough.sh" || { echo "readme: walk-through block not found" >&2; exit 1; }
export DATABASE_URL="sqlite://$work/broker.db" RUST_LOG=warn
cleanup() { pkill -f "$PWD/$bin serve" 2>/dev/null || true; pkill -f "tests/fakes/setu_partner.py 9911" 2>/dev/null || true; }
trap 'cleanup; rm -rf "$work"' EXIT
for run in 1 2; do
  # Output to a file: the broker and partner it starts in the background keep their stdout.
  out="$work/out.$run"
  timeout 600 bash -e "$work/walkthrough.sh" >"$out" 2>&1 || { cat "$out"; echo "readme: run $run failed" >&2; exit 1; }
  grep -q '"access_token":"' "$out" || { cat "$out"; echo "readme: run $run fetched no token" >&2; exit 1; }
  grep -q '"api_key":"tbk_' "$out" || { cat "$out"; echo "readme: run $run rotated no key" >&2; exit 1; }
  echo "readme: walk-through run $run ok"
  cleanup
  sleep 0.5
done
