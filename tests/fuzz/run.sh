#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each) and prints the executions.
#   bash tests/fuzz/run.sh [seconds]
# Needs cargo-fuzz (cargo install cargo-fuzz). The machine's stable toolchain builds the
# sanitizer flags with RUSTC_BOOTSTRAP=1. Crashes land in tests/fuzz/artifacts/<target>/ and
# become regression tests in tests/fuzz_regressions.rs.
set -euo pipefail
cd "$(dirname "$0")/../.."
secs="${1:-60}"
export RUSTC_BOOTSTRAP=1
for target in tenant_spec custom_recipe partner_answer jwt_expiry; do
  mkdir -p "tests/fuzz/corpus/$target"
  log=$(mktemp)
  if cargo fuzz run --fuzz-dir tests/fuzz "$target" "tests/fuzz/corpus/$target" -- \
      -max_total_time="$secs" -max_len=4096 -print_final_stats=1 >"$log" 2>&1; then
    result=ok
  else
    result=CRASH
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*' || echo '?')
  echo "$target: $result, $runs executions in ${secs}s, coverage $cov"
  [ "$result" = ok ] || { tail -n 40 "$log"; exit 1; }
  rm -f "$log"
done
