#!/usr/bin/env bash
# The admin console in a real headless browser (Debian's chromium and chromium-driver, driven
# by Selenium): a first start without BROKER_ADMIN_TOKEN prints the admin token, the test signs
# in with it, registers a Setu-style tenant against the fake partner, sees it turn healthy,
# creates a caller (its key shown once), finds the audit entry, checks the security headers and
# that the browser logged no CSP violation, and keeps a screenshot in its temp dir
# (CONSOLE_SCREENSHOT copies it elsewhere). Needs a built binary (target/debug/token-broker).
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="${BROKER_BIN:-target/debug/token-broker}"
[ -x "$bin" ] || cargo build --quiet
python3 -c 'import selenium' 2>/dev/null || python3 -m pip install -q selenium
python3 .ci/console/test_console.py "$bin"
