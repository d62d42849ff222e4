#!/usr/bin/env bash
# The token-path benchmark. One command on a fresh checkout:  bash bench/run.sh
# Builds the release binary, makes sure Redis answers, starts the broker(s) and a fake partner
# and IdP, registers tenants and callers, warms tokens, drives wrk, and prints one table (also
# written to bench/results/). Knobs: BENCH_BIN (a broker binary to measure instead of this
# tree's), BENCH_DURATION (s, default 10), BENCH_CONNECTIONS (32),
# PARTNER_LATENCY_MS (herd, 200), BENCH_TENANTS_RSS (10000), BENCH_TENANTS_MANY (100000),
# BENCH_WORKERS (BROKER_WORKERS for the brokers; default: the broker's own default, the cores),
# REDIS_URL (redis://127.0.0.1:6379).
set -euo pipefail
cd "$(dirname "$0")/.."

DUR="${BENCH_DURATION:-10}"
CONNS="${BENCH_CONNECTIONS:-32}"
LAT="${PARTNER_LATENCY_MS:-200}"
N_RSS="${BENCH_TENANTS_RSS:-10000}"
N_MANY="${BENCH_TENANTS_MANY:-100000}"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
ADMIN="bench-admin-token-$(od -An -N16 -tx1 /dev/urandom | tr -d " \n")"

say() { printf '%s\n' "bench: $*" >&2; }

command -v wrk >/dev/null || { apt-get install -y -qq wrk >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq wrk); }
python3 -c 'import cryptography' 2>/dev/null || python3 -m pip install -q cryptography
redis_port="${REDIS_URL##*:}"; redis_port="${redis_port%%/*}"
if ! (exec 3<>"/dev/tcp/127.0.0.1/$redis_port") 2>/dev/null; then
  say "starting redis-server on $redis_port"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no >/dev/null
  sleep 0.5
fi

say "building the release binary and the herd client"
[ -n "${BENCH_BIN:-}" ] || cargo build --release --quiet
cargo bench --no-run --quiet --bench herd 2>/dev/null
cargo bench --no-run --quiet --bench partner_api 2>/dev/null
cargo bench --no-run --quiet --bench bare_forwarder 2>/dev/null
cargo bench --no-run --quiet --bench bare_actix 2>/dev/null
# BENCH_BIN: another broker binary (an older build, for a before/after in one session).
BIN="${BENCH_BIN:-$PWD/target/release/token-broker}"

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

PP=$(port)
python3 tests/fakes/setu_partner.py "$PP" --lifetime 3600 --any-secret >"$work/partner.log" 2>&1 &
pids+=($!)
PARTNER="http://127.0.0.1:$PP"
for _ in $(seq 50); do curl -fs "$PARTNER/_count" >/dev/null 2>&1 && break; sleep 0.1; done

# start_broker <name> <port> [VAR=value ...]: runs a broker, waits for /healthz.
start_broker() {
  local name=$1 p=$2; shift 2
  env -i PATH="$PATH" BROKER_LISTEN="127.0.0.1:$p" BROKER_ADMIN_TOKEN="$ADMIN" \
    BROKER_ALLOW_INSECURE_ISSUERS=true BROKER_CALLER_RATE=10000000 RUST_LOG=warn \
    ${BENCH_WORKERS:+BROKER_WORKERS=$BENCH_WORKERS} "$@" \
    "$BIN" serve >"$work/$name.log" 2>&1 &
  pids+=($!)
  echo $! >"$work/$name.pid"
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$p/healthz" >/dev/null 2>&1 && return 0; sleep 0.1; done
  say "broker $name did not start:"; cat "$work/$name.log" >&2; exit 1
}

# wrk_run <url> [bearer] [lua script]: prints "req/s p50_ms p99_ms".
wrk_run() {
  local url=$1 auth=${2:-} script=${3:-}
  local out
  local args=(-t1 -c"$CONNS" -d"${DUR}s" --latency)
  [ -z "$auth" ] || args+=(-H "authorization: Bearer $auth")
  [ -z "$script" ] || args+=(-s "$script")
  out=$(wrk "${args[@]}" "$url")
  local non2xx
  non2xx=$(printf '%s\n' "$out" | awk '/Non-2xx/ {print $NF}')
  [ -z "$non2xx" ] || { say "wrk saw $non2xx non-2xx answers on $url"; printf '%s\n' "$out" >&2; exit 1; }
  printf '%s\n' "$out" | python3 -c '
import re, sys
t = sys.stdin.read()
def ms(v):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", v)
    if not m:
        sys.exit("unreadable wrk latency " + repr(v) + "\n" + t)
    n, u = m.groups()
    return float(n) * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[u]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
# Anchored: a "Stdev" column such as 94.50% must not pass for the 50% line.
p50 = ms(re.search(r"^\s*50%\s+(\S+)", t, re.M).group(1)); p99 = ms(re.search(r"^\s*99%\s+(\S+)", t, re.M).group(1))
print(f"{rps:.0f} {p50:.3f} {p99:.3f}")'
}

# start_server <bench target> <url that answers once it is up> [VAR=value ...]: one of the
# comparison servers in benches/ (partner API, ceilings), stopped with the others at exit.
start_server() {
  local bench=$1 ready=$2; shift 2
  env "$@" cargo bench --quiet --bench "$bench" >"$work/$bench.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do curl -fs "$ready" >/dev/null 2>&1 && break; sleep 0.1; done
}

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$(cat "$work/$1.pid")/status"; }

# --- (a)-(c): one broker on the embedded default, in-process cache, API key and JWT callers.
P1=$(port)
start_broker one "$P1" DATABASE_URL="sqlite://$work/one.db" \
  BROKER_JWT_JWKS_URL="$PARTNER/jwks" BROKER_JWT_ISSUER="https://idp.bench.local" BROKER_JWT_AUDIENCE="token-broker"
B1="http://127.0.0.1:$P1"
python3 bench/load.py register --base "$B1" --admin "$ADMIN" --partner "$PARTNER/auth/token" --prefix t --count 1
KEY=$(python3 bench/load.py caller --base "$B1" --admin "$ADMIN")
JWT=$(curl -fs "$PARTNER/_jwt?sub=bench-jwt&tenants=t0" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
python3 bench/load.py warm --base "$B1" --key "$KEY" --count 1
curl -fs -o /dev/null -H "authorization: Bearer $JWT" "$B1/v1/tenants/t0/token"
# The honest ceiling: a bare actix-web server, no middleware, answering a body of the size
# of the broker's token answer on the same route pattern.
BODY_BYTES=$(curl -fs -H "authorization: Bearer $KEY" "$B1/v1/tenants/t0/token" | wc -c)
BP=$(port)
start_server bare_actix "http://127.0.0.1:$BP/v1/tenants/t0/token" BARE_PORT="$BP" BODY_BYTES="$BODY_BYTES"
say "(a0) bare actix-web, $BODY_BYTES-byte body"; read -r Z_RPS Z_P50 Z_P99 < <(wrk_run "http://127.0.0.1:$BP/v1/tenants/t0/token")
kill "${pids[-1]}" 2>/dev/null || true
say "(a) /healthz";                 read -r A_RPS A_P50 A_P99 < <(wrk_run "$B1/healthz")
say "(b) token, API key, L1";       read -r B_RPS B_P50 B_P99 < <(wrk_run "$B1/v1/tenants/t0/token" "$KEY")
say "(c) token, JWT, L1";           read -r C_RPS C_P50 C_P99 < <(wrk_run "$B1/v1/tenants/t0/token" "$JWT")
# The OAuth 2.0 face: client_secret_basic, the same cached token.
read -r OID OKEY < <(python3 bench/load.py caller --base "$B1" --admin "$ADMIN" --name bench-oauth --with-id)
cat >"$work/oauth.lua" <<LUA
wrk.method = "POST"
wrk.body = "grant_type=client_credentials&resource=urn%3Atoken-broker%3Atenant%3At0"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Authorization"] = "Basic $(printf '%s:%s' "$OID" "$OKEY" | base64 -w0)"
LUA
say "(o) OAuth token endpoint";     read -r O_RPS O_P50 O_P99 < <(wrk_run "$B1/oauth2/token" "" "$work/oauth.lua")

# --- (d): Redis on every fetch (in-process cache off).
P2=$(port)
start_broker redis "$P2" DATABASE_URL="sqlite://$work/redis.db" REDIS_URL="$REDIS_URL" \
  BROKER_REDIS_PREFIX="bench-$RANDOM-d" BROKER_L1_CACHE=false
B2="http://127.0.0.1:$P2"
python3 bench/load.py register --base "$B2" --admin "$ADMIN" --partner "$PARTNER/auth/token" --prefix t --count 1
KEY2=$(python3 bench/load.py caller --base "$B2" --admin "$ADMIN")
python3 bench/load.py warm --base "$B2" --key "$KEY2" --count 1
say "(d) token, API key, Redis every fetch"; read -r D_RPS D_P50 D_P99 < <(wrk_run "$B2/v1/tenants/t0/token" "$KEY2")
kill "$(cat "$work/redis.pid")"

# --- (e): a cold herd across three replicas sharing a database and Redis.
curl -fs -X POST "$PARTNER/_latency/$LAT" >/dev/null
PREFIX="bench-$RANDOM-e"
HERD=()
for i in 1 2 3; do
  p=$(port)
  start_broker "herd$i" "$p" DATABASE_URL="sqlite://$work/herd.db" REDIS_URL="$REDIS_URL" BROKER_REDIS_PREFIX="$PREFIX"
  HERD+=("http://127.0.0.1:$p")
done
python3 bench/load.py register --base "${HERD[0]}" --admin "$ADMIN" --partner "$PARTNER/auth/token" --prefix herd --count 1
KEY3=$(python3 bench/load.py caller --base "${HERD[0]}" --admin "$ADMIN")
before=$(curl -fs "$PARTNER/_count" | python3 -c 'import json,sys; print(json.load(sys.stdin)["count"])')
say "(e) 1000 callers, cold tenant, 3 replicas, partner latency ${LAT} ms"
HERD_JSON=$(HERD_BASES="$(IFS=,; echo "${HERD[*]}")" HERD_KEY="$KEY3" HERD_TENANT=herd0 HERD_N=1000 \
  cargo bench --quiet --bench herd 2>/dev/null | tail -n 1)
after=$(curl -fs "$PARTNER/_count" | python3 -c 'import json,sys; print(json.load(sys.stdin)["count"])')
E_CALLS=$((after - before))
read -r E_OK E_TOKENS E_P99 < <(printf '%s' "$HERD_JSON" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["ok"], d["distinct_tokens"], d["p99_ms"])')
for i in 1 2 3; do kill "$(cat "$work/herd$i.pid")"; done
curl -fs -X POST "$PARTNER/_latency/0" >/dev/null

# --- (f): memory with many tenants holding tokens; throughput with many registered.
P4=$(port)
start_broker many "$P4" DATABASE_URL="sqlite://$work/many.db"
B4="http://127.0.0.1:$P4"
say "(f) registering $N_RSS tenants and warming a token for each"
python3 bench/load.py register --base "$B4" --admin "$ADMIN" --partner "$PARTNER/auth/token" --prefix t --count "$N_RSS"
KEY4=$(python3 bench/load.py caller --base "$B4" --admin "$ADMIN")
python3 bench/load.py warm --base "$B4" --key "$KEY4" --count "$N_RSS"
sleep 1
F_RSS_MB=$(( $(rss_kb many) / 1024 ))
say "(f) registering up to $N_MANY tenants"
python3 bench/load.py register --base "$B4" --admin "$ADMIN" --partner "$PARTNER/auth/token" --prefix t --start "$N_RSS" --count $((N_MANY - N_RSS)) --concurrency 8
read -r F_RPS F_P50 F_P99 < <(wrk_run "$B4/v1/tenants/t0/token" "$KEY4")

# --- (g): proxy mode against a fast local partner API (Rust), direct and through the broker.
AP=$(port)
start_server partner_api "http://127.0.0.1:$AP/v2/ping" PARTNER_API_PORT="$AP"
P5=$(port)
start_broker proxy "$P5" DATABASE_URL="sqlite://$work/proxy.db"
B5="http://127.0.0.1:$P5"
python3 bench/load.py register --base "$B5" --admin "$ADMIN" --partner "$PARTNER/auth/token" --prefix p --count 1
curl -fs -o /dev/null -X PATCH "$B5/admin/v1/tenants/p0" -H "authorization: Bearer $ADMIN" \
  -H 'content-type: application/json' \
  -d '{"proxy": {"base_url": "http://127.0.0.1:'"$AP"'/v2", "headers": {"x-product-instance-id": "bench"}, "max_body_bytes": 67108864}}'
KEY5=$(python3 bench/load.py caller --base "$B5" --admin "$ADMIN")
curl -fs -o /dev/null -H "authorization: Bearer $KEY5" "$B5/v1/tenants/p0/proxy/accounts/42/balance"
say "(g) partner API direct";     read -r G_RPS G_P50 G_P99 < <(wrk_run "http://127.0.0.1:$AP/v2/accounts/42/balance")
say "(g) partner API via proxy";  read -r H_RPS H_P50 H_P99 < <(wrk_run "$B5/v1/tenants/p0/proxy/accounts/42/balance" "$KEY5")
# The stack's own ceiling: a bare actix-web forwarder on the proxy's client (no broker logic).
FP=$(port)
start_server bare_forwarder "http://127.0.0.1:$FP/v2/ping" FORWARD_PORT="$FP" FORWARD_TO="http://127.0.0.1:$AP" FORWARD_CLIENT=hyper
say "(g) partner API via a bare forwarder"; read -r K_RPS K_P50 K_P99 < <(wrk_run "http://127.0.0.1:$FP/v2/accounts/42/balance")
kill "${pids[-1]}" 2>/dev/null || true
# A DPoP tenant: the same partner API, a fresh ES256 proof (with ath) on every proxied call.
curl -fs -o /dev/null -X POST "$B5/admin/v1/tenants" -H "authorization: Bearer $ADMIN" \
  -H 'content-type: application/json' \
  -d '{"id": "pdpop", "issuer": {"kind": "oauth2_client_credentials", "token_url": "http://127.0.0.1:'"$AP"'/token", "dpop": true, "min_interval_ms": 0},
       "credentials": {"client_id": "bench", "client_secret": "bench"},
       "proxy": {"base_url": "http://127.0.0.1:'"$AP"'/v2", "headers": {"x-product-instance-id": "bench"}}}'
curl -fs -o /dev/null -H "authorization: Bearer $KEY5" "$B5/v1/tenants/pdpop/proxy/accounts/42/balance"
say "(g) partner API via proxy, DPoP tenant"; read -r J_RPS J_P50 J_P99 < <(wrk_run "$B5/v1/tenants/pdpop/proxy/accounts/42/balance" "$KEY5")
head -c $((50 * 1024 * 1024)) /dev/zero >"$work/upload.bin"
hwm_kb() { awk '/VmHWM/ {print $2}' "/proc/$(cat "$work/$1.pid")/status"; }
before_kb=$(hwm_kb proxy)
sent=$(curl -fs -X POST --data-binary @"$work/upload.bin" -H 'content-type: application/octet-stream' \
  -H "authorization: Bearer $KEY5" "$B5/v1/tenants/p0/proxy/upload")
[ "$sent" = "$((50 * 1024 * 1024))" ] || { say "the 50 MiB upload arrived as $sent bytes"; exit 1; }
G_UPLOAD_MB=$(( ($(hwm_kb proxy) - before_kb) / 1024 ))
# The peer a user would deploy instead: nginx (Debian's nginx-light) injecting the same header,
# keep-alive to the partner API, 2 workers; nginx itself as the partner API too, so both
# proxies forward to the same fast server.
if command -v nginx >/dev/null; then
  NA=$(port); NX=$(port)
  mkdir -p "$work/nginx"
  cat >"$work/nginx/nginx.conf" <<NGINX
worker_processes ${BENCH_WORKERS:-$(nproc)};
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/nginx; proxy_temp_path $work/nginx;
  upstream api { server 127.0.0.1:$NA; keepalive 64; }
  server { listen 127.0.0.1:$NA; location / { default_type application/json;
    return 200 '{"ok":true,"balance":{"amount":4200,"currency":"INR"}}'; } }
  server { listen 127.0.0.1:$NX; location /v2/ { proxy_pass http://api; proxy_http_version 1.1;
    proxy_set_header Connection ""; proxy_set_header Authorization "Bearer bench-token";
    proxy_set_header x-product-instance-id bench; } }
}
NGINX
  nginx -c "$work/nginx/nginx.conf" -g 'daemon off;' >"$work/nginx.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 50); do curl -fs "http://127.0.0.1:$NA/v2/ping" >/dev/null 2>&1 && break; sleep 0.1; done
  curl -fs -o /dev/null -X PATCH "$B5/admin/v1/tenants/p0" -H "authorization: Bearer $ADMIN" \
    -H 'content-type: application/json' -d '{"proxy": {"base_url": "http://127.0.0.1:'"$NA"'/v2"}}'
  sleep 0.2
  curl -fs -o /dev/null -H "authorization: Bearer $KEY5" "$B5/v1/tenants/p0/proxy/accounts/42/balance"
  say "(n) nginx partner API direct"; read -r N_RPS N_P50 N_P99 < <(wrk_run "http://127.0.0.1:$NA/v2/accounts/42/balance")
  say "(n) via nginx injecting the header"; read -r M_RPS M_P50 M_P99 < <(wrk_run "http://127.0.0.1:$NX/v2/accounts/42/balance")
  say "(n) via the broker's proxy mode"; read -r Q_RPS Q_P50 Q_P99 < <(wrk_run "$B5/v1/tenants/p0/proxy/accounts/42/balance" "$KEY5")
  # The stack's ceilings against the same nginx: bare actix-web forwarders, through hyper-util's
  # client (what proxy mode uses) and through reqwest, which wraps it (what it used before).
  for client in reqwest hyper; do
    FP=$(port)
    start_server bare_forwarder "http://127.0.0.1:$FP/v2/ping" FORWARD_PORT="$FP" FORWARD_TO="http://127.0.0.1:$NA" FORWARD_CLIENT="$client"
    say "(n) via a bare actix-web + $client forwarder"; read -r rps _ _ < <(wrk_run "http://127.0.0.1:$FP/v2/accounts/42/balance")
    kill "${pids[-1]}" 2>/dev/null || true
    if [ "$client" = reqwest ]; then NR_RPS=$rps; else NH_RPS=$rps; fi
  done
  N1=$(wrk -t1 -c1 -d3s --latency "http://127.0.0.1:$NX/v2/accounts/42/balance" | awk '/^ *50%/ {print $2}')
  Q1=$(wrk -t1 -c1 -d3s --latency -H "authorization: Bearer $KEY5" "$B5/v1/tenants/p0/proxy/accounts/42/balance" | awk '/^ *50%/ {print $2}')
  D1=$(wrk -t1 -c1 -d3s --latency "http://127.0.0.1:$NA/v2/accounts/42/balance" | awk '/^ *50%/ {print $2}')
else
  say "nginx not installed (apt-get install nginx-light): the peer-proxy case is skipped"
  N_RPS=0 N_P50=0 N_P99=0 M_RPS=0 M_P50=0 M_P99=0 Q_RPS=0 Q_P50=0 Q_P99=0 N1=0us Q1=0us D1=0us NR_RPS=0 NH_RPS=0
fi
kill "$(cat "$work/proxy.pid")"

# --- the table.
stamp=$(date -u +%Y-%m-%dT%H:%MZ)
host="$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -m)"
workers="${BENCH_WORKERS:-$(nproc)}"
report=$(python3 - "$A_RPS" "$A_P50" "$A_P99" "$B_RPS" "$B_P50" "$B_P99" "$C_RPS" "$C_P50" "$C_P99" \
  "$D_RPS" "$D_P50" "$D_P99" "$E_CALLS" "$E_OK" "$E_TOKENS" "$E_P99" "$LAT" "$F_RSS_MB" "$F_RPS" "$F_P50" "$F_P99" \
  "$N_RSS" "$N_MANY" "$stamp" "$host" "$DUR" "$CONNS" "$workers" \
  "$G_RPS" "$G_P50" "$G_P99" "$H_RPS" "$H_P50" "$H_P99" "$G_UPLOAD_MB" "$K_RPS" "$K_P50" "$K_P99" \
  "$Z_RPS" "$Z_P50" "$Z_P99" "$O_RPS" "$O_P50" "$O_P99" "$BODY_BYTES" \
  "$J_RPS" "$J_P50" "$J_P99" "$N_RPS" "$M_RPS" "$M_P50" "$Q_RPS" "$Q_P50" "$N1" "$Q1" "$D1" "$NR_RPS" "$NH_RPS" <<'PY'
import re, sys
(a, a50, a99, b, b50, b99, c, c50, c99, d, d50, d99, ecalls, eok, etok, e99, lat, rss, f, f50, f99,
 nrss, nmany, stamp, host, dur, conns, workers, g, g50, g99, h, h50, h99, upload, k, k50, k99,
 z, z50, z99, o, o50, o99, body, j, j50, j99, n, m, m50, q, q50, n1, q1, d1, nr, nh) = sys.argv[1:]
j, n, m, q, nr, nh = map(float, (j, n, m, q, nr, nh))
def us(v):
    num, unit = re.match(r"([\d.]+)(us|ms|s)$", v).groups()
    return float(num) * {"us": 1, "ms": 1000, "s": 1e6}[unit]
n1, q1, d1 = us(n1), us(q1), us(d1)
g, h, k = float(g), float(h), float(k)
a, b, c, d, f, z, o = map(float, (a, b, c, d, f, z, o))
ok = lambda cond: "PASS" if cond else "FAIL"
rows = [
    (f"(a0) bare actix-web, no middleware, {body}-byte body", z, z50, z99, z / a, "the ceiling for (b), (c)"),
    ("(a) /healthz, same server", a, a50, a99, 1.0, "the broker's own floor (for reference)"),
    ("(b) token, API key, in-process cache", b, b50, b99, b / a,
     ok(b >= 0.85 * z and float(b99) <= 1.3 * float(z99)) + f" (>= 0.85 x a0: {b / z:.2f}; p99 <= 1.3 x a0's: {float(b99) / float(z99):.2f})"),
    ("(c) token, JWT caller, in-process cache", c, c50, c99, c / a, ok(c >= 0.8 * z) + f" (>= 0.8 x a0: {c / z:.2f})"),
    ("(o) OAuth token endpoint, client_secret_basic", o, o50, o99, o / a, ok(o >= 0.9 * b) + f" (>= 0.9 x b: {o / b:.2f})"),
    ("(d) token, API key, Redis on every fetch", d, d50, d99, d / a, ok(d >= 0.55 * a and float(d99) <= 2.0) + " (>= 0.55 x a, p99 <= 2 ms)"),
    (f"(f) token with {int(nmany):,} tenants registered", f, f50, f99, f / a, ok(f >= 0.9 * b) + f" (within 10 % of b: {f / b:.2f} x b)"),
]
out = [f"token-broker benchmark, {stamp}, {host}; {workers} broker worker(s); wrk -t1 -c{conns} -d{dur}s on the same machine", "",
       "| case | req/s | p50 ms | p99 ms | x (a) | target |", "| --- | ---: | ---: | ---: | ---: | --- |"]
for name, rps, p50, p99, ratio, target in rows:
    out.append(f"| {name} | {rps:,.0f} | {float(p50):.3f} | {float(p99):.3f} | {ratio:.2f} | {target} |")
out += ["", "| case | figure | target |", "| --- | --- | --- |",
        f"| (e) cold herd: 1000 callers, 3 replicas, partner {lat} ms | {ecalls} partner call(s), {eok}/1000 ok, {etok} distinct token(s), caller p99 {float(e99):.1f} ms | "
        + ok(int(ecalls) == 1 and float(e99) <= int(lat) + 50) + f" (exactly 1 call, p99 <= {int(lat) + 50} ms) |",
        f"| (f) RSS with {int(nrss):,} tenants each holding a cached token | {rss} MiB | " + ok(int(rss) <= 64) + " (<= 64 MiB) |",
        f"| (g) proxy: partner API direct | {g:,.0f} req/s, p50 {float(g50):.3f} ms, p99 {float(g99):.3f} ms | the ceiling |",
        f"| (g) proxy: the same through the broker | {h:,.0f} req/s ({h / g:.2f} x direct), p50 {float(h50):.3f} ms (+{float(h50) - float(g50):.3f} ms) | "
        + ok(h >= 0.5 * g and float(h50) - float(g50) <= 0.3) + " (>= 0.5 x direct, p50 added <= 0.3 ms) |",
        f"| (g) proxy: 50 MiB upload, broker peak RSS growth | {upload} MiB | " + ok(int(upload) < 16) + " (< 16 MiB: streamed) |",
        f"| (g) the stack's ceiling: a bare actix-web + hyper forwarder, no broker logic | {k:,.0f} req/s ({k / g:.2f} x direct), p50 {float(k50):.3f} ms (+{float(k50) - float(g50):.3f} ms); the broker's proxy is {h / k:.2f} x this | for reference |",
        f"| (g) proxy, DPoP tenant (a fresh ES256 proof per call) | {j:,.0f} req/s ({j / h:.2f} x the bearer tenant), p50 {float(j50):.3f} ms | " + ok(j >= 0.9 * h) + " (>= 0.9 x bearer proxy) |"]
if n > 0:
    out += [f"| (n) nginx as the partner API, direct | {n:,.0f} req/s | the ceiling |",
            f"| (n) nginx injecting the header (the peer) | {m:,.0f} req/s, p50 {float(m50):.3f} ms; +{n1 - d1:.0f} us at 1 connection | the peer |",
            f"| (n) the broker's proxy mode, same partner API | {q:,.0f} req/s ({q / m:.2f} x nginx), p50 {float(q50):.3f} ms; +{q1 - d1:.0f} us at 1 connection | "
            + ok(q >= 0.8 * m and q1 - d1 <= 50) + " (>= 0.8 x nginx, <= 50 us added at 1 connection) |",
            f"| (n) a bare actix-web + hyper forwarder (proxy mode's client), same partner API | {nh:,.0f} req/s ({nh / m:.2f} x nginx); the broker's proxy is {q / nh:.2f} x this | the stack's ceiling |",
            f"| (n) a bare actix-web + reqwest forwarder (reqwest wraps the same client) | {nr:,.0f} req/s ({nr / m:.2f} x nginx) | for reference |"]
print("\n".join(out))
PY
)
printf '%s\n' "$report"
mkdir -p bench/results
printf '%s\n' "$report" > "bench/results/$(date -u +%Y%m%dT%H%M%SZ).md"
