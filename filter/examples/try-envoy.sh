#!/usr/bin/env bash
# Smoke test of the fledge filter in a real Envoy, using filter/examples/envoy.yaml.
#
#   cargo build -p fledge-filter --target wasm32-wasip1 --release
#   filter/examples/try-envoy.sh            # ENVOY=/path/to/envoy to override
#
# Starts two trivial upstreams (python3 -m http.server on 127.0.0.1) and Envoy on free
# loopback ports, then checks three things in /stats/prometheus:
#   1. good config: fledge_requests_total{fledge_service="app",fledge_subset="canary",fledge_class="2xx"}
#      and fledge_request_duration_ms_bucket{...} appear; upstream 404/501 are 4xx/5xx;
#   2. canary port closed: its requests are classed "none" (no upstream response);
#   3. malformed config {"clusters": 5}: every request is still served, the error is logged and
#      fledge_config_errors_total goes up.
# Everything it starts is killed on exit. KEEP=1 keeps the Envoy logs and rendered configs.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
ENVOY=${ENVOY:-$root/.venv/bin/envoy}
WASM_PATH=${WASM_PATH:-$root/target/wasm32-wasip1/release/fledge_filter.wasm}
[ -x "$ENVOY" ] || { echo "envoy not found at $ENVOY (set ENVOY=...)"; exit 2; }
[ -f "$WASM_PATH" ] || { echo "build first: cargo build -p fledge-filter --target wasm32-wasip1 --release"; exit 2; }

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "logs and rendered configs kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
LISTEN_PORT=$(free_port); ADMIN_PORT=$(free_port); STABLE_PORT=$(free_port); CANARY_PORT=$(free_port)
CLOSED_PORT=$(free_port)   # nothing listens here

mkdir -p "$work/www" && echo ok > "$work/www/index.html"
for port in "$STABLE_PORT" "$CANARY_PORT"; do
  python3 -m http.server "$port" --bind 127.0.0.1 --directory "$work/www" >/dev/null 2>&1 &
  pids+=($!)
done

GOOD='{"clusters": {"app_stable": {"service": "app", "subset": "stable"}, "app_canary": {"service": "app", "subset": "canary"}}}'
envoy_pid=

# start_envoy <config-json> <canary-port> <name>
start_envoy() {
  local config=$1 canary=$2 name=$3
  sed -e "s|\${LISTEN_PORT}|$LISTEN_PORT|; s|\${ADMIN_PORT}|$ADMIN_PORT|" \
      -e "s|\${STABLE_PORT}|$STABLE_PORT|; s|\${CANARY_PORT}|$canary|" \
      -e "s|\${WASM_PATH}|$WASM_PATH|" \
      -e "s|\${FLEDGE_CONFIG}|$config|" "$here/envoy.yaml" > "$work/$name.yaml"
  "$ENVOY" -c "$work/$name.yaml" --concurrency 1 --use-dynamic-base-id -l info \
    >"$work/$name.log" 2>&1 &
  envoy_pid=$!
  pids+=("$envoy_pid")
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$ADMIN_PORT/ready" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "envoy did not become ready:"; tail -30 "$work/$name.log"; exit 1
}
stop_envoy() { kill "$envoy_pid" 2>/dev/null || true; wait "$envoy_pid" 2>/dev/null || true; }

# send <n>: prints a histogram of status codes
send() {
  for _ in $(seq "$1"); do curl -s -o /dev/null -w '%{http_code}\n' "http://127.0.0.1:$LISTEN_PORT/"; done | sort | uniq -c
}
fledge_stats() { sleep 2.5; curl -s "http://127.0.0.1:$ADMIN_PORT/stats/prometheus" | grep '^fledge_' | grep -v ' 0$' || true; }
fail=0
expect() { if grep -qF "$1" <<<"$2"; then echo "  ok: $1"; else echo "  MISSING: $1"; fail=1; fi; }

echo "== 1. good configuration"
start_envoy "$GOOD" "$CANARY_PORT" good
send 40
# Upstream errors are the upstream's: http.server answers 404 for a missing file, 501 for DELETE.
for _ in $(seq 10); do
  curl -s -o /dev/null "http://127.0.0.1:$LISTEN_PORT/missing"
  curl -s -o /dev/null -X DELETE "http://127.0.0.1:$LISTEN_PORT/"
done
stats=$(fledge_stats); echo "$stats"
expect 'fledge_requests_total{fledge_service="app",fledge_subset="canary",fledge_class="2xx"}' "$stats"
expect 'fledge_requests_total{fledge_service="app",fledge_subset="stable",fledge_class="2xx"}' "$stats"
expect 'fledge_class="4xx"}' "$stats"
expect 'fledge_class="5xx"}' "$stats"
expect 'fledge_request_duration_ms_bucket{fledge_service="app",fledge_subset="canary",le="1"}' "$stats"
expect 'fledge_request_duration_ms_count{fledge_service="app",fledge_subset="canary"}' "$stats"
stop_envoy

echo "== 2. canary upstream down (connection refused)"
start_envoy "$GOOD" "$CLOSED_PORT" down
send 40
stats=$(fledge_stats); echo "$stats"
expect 'fledge_requests_total{fledge_service="app",fledge_subset="canary",fledge_class="none"}' "$stats"
if grep -q 'fledge_subset="canary",fledge_class="5xx"' <<<"$stats"; then echo "  WRONG: local 503 classed 5xx"; fail=1; fi
stop_envoy

echo "== 3. malformed configuration"
start_envoy '{"clusters": 5}' "$CANARY_PORT" bad
codes=$(send 40); echo "$codes"
[ "$(awk '$2 != 200' <<<"$codes")" = "" ] && echo "  ok: every request served 200" || { echo "  NOT all 200"; fail=1; }
stats=$(fledge_stats); echo "$stats"
expect 'fledge_config_errors_total' "$stats"
grep -F 'invalid plugin configuration' "$work/bad.log" | head -2
grep -qF 'clusters: expected an object' "$work/bad.log" && echo "  ok: error logged" || { echo "  MISSING: error log"; fail=1; }
stop_envoy

[ "$fail" = 0 ] && echo "PASS" || { echo "FAIL"; exit 1; }
