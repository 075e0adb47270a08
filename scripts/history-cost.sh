#!/usr/bin/env bash
# What channel history costs Redis: CPU per app: publish (plain PUBLISH, as before recovery, against the publish
# script: XADD MAXLEN ~, PEXPIRE, GET epoch, PUBLISH), memory per channel, and the cost of one recovery read of
# the event log. Needs redis-server, redis-cli, redis-benchmark on PATH; starts its own servers on free ports and
# stops them. Usage: scripts/history-cost.sh [publishes per run, default 200000]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-200000}
LUA=crates/broker/src/redis/lua
DIR=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$PORT" --save "" --appendonly no --daemonize yes --pidfile "$DIR/pid" --logfile "$DIR/log"
trap 'redis-cli -p "$PORT" SHUTDOWN NOSAVE >/dev/null 2>&1 || true; rm -rf "$DIR"' EXIT
for _ in $(seq 50); do redis-cli -p "$PORT" PING >/dev/null 2>&1 && break; sleep 0.1; done
R="redis-cli -p $PORT"
PUB=$($R SCRIPT LOAD "$(cat $LUA/publish.lua)")
MISSED=$($R SCRIPT LOAD "$(cat $LUA/missed.lua)")
PAYLOAD='{"t":1764464000000123,"w":7,"msg":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}'
cpu() { $R INFO cpu | tr -d '\r' | awk -F: '/^used_cpu_(user|sys):/{s+=$2} END{printf "%.6f", s}'; }
stat() { $R INFO commandstats | tr -d '\r' | awk -F'[,=:]' -v c="cmdstat_$1" '$1==c{print $7}'; }
run() { # label, subscribers, command...
  local label=$1 subs=$2; shift 2
  $R CONFIG RESETSTAT >/dev/null
  local pids=()
  for _ in $(seq 1 "$subs"); do $R SUBSCRIBE 'ferry:app2:{room}' >/dev/null & pids+=($!); done
  sleep 0.3
  local c0 c1
  c0=$(cpu)
  redis-benchmark -p "$PORT" -n "$N" -c 20 -q "$@" >/dev/null
  c1=$(cpu)
  for p in "${pids[@]}"; do kill "$p"; done
  wait 2>/dev/null || true
  printf '%-22s subscribers=%s  redis process CPU %6.2f us/publish  (command time: %s us)\n' "$label" "$subs" \
    "$(echo "($c1-$c0)*1000000/$N" | bc -l)" "$(stat "${1,,}")"
}
echo "== CPU per publish ($N publishes, 20 clients, ${#PAYLOAD}-byte payload)"
for subs in 0 1; do
  run "PUBLISH (no history)" "$subs" PUBLISH 'ferry:app2:{room}' "$PAYLOAD"
  run "publish script" "$subs" EVALSHA "$PUB" 2 'ferry:app:{room}:h' ferry:epoch 'ferry:app2:{room}' "$PAYLOAD" 100 300000 e
done
echo "== memory per channel (1000 channels, history size 100)"
mem() { $R INFO memory | tr -d '\r' | awk -F: '/^used_memory:/{print $2}'; }
for per in 1 10 150; do
  $R FLUSHALL >/dev/null
  m0=$(mem)
  $R EVAL "for c=1,1000 do for i=1,tonumber(ARGV[1]) do local k='ferry:app:{c'..c..'}:h' redis.call('XADD',k,'MAXLEN','~',100,'*','d',ARGV[2]) redis.call('PEXPIRE',k,300000) end end return 1" 0 "$per" "$PAYLOAD" >/dev/null
  m1=$(mem)
  echo "$per publishes per channel: $($R XLEN 'ferry:app:{c1}:h') entries held, $(( (m1 - m0) / 1000 )) bytes per channel"
done
echo "== one recovery read of the event log (ferry:events, entries of ~560 bytes)"
$R FLUSHALL >/dev/null
E='[{"type":"job.completed","state":"completed","at":1764464000000,"jobs":[{"job":"01a23bb1-c88e-733b-b09f-03b0f66d3a4a","queue":"emails","kind":"send","owner":"alice","pt":17},{"job":"01a23bb1-c88e-733b-b09f-03b0f66d3a4b","queue":"emails","kind":"send","owner":"alice","pt":17},{"job":"01a23bb1-c88e-733b-b09f-03b0f66d3a4c","queue":"emails","kind":"send","owner":"alice","pt":17},{"job":"01a23bb1-c88e-733b-b09f-03b0f66d3a4d","queue":"emails","kind":"send","owner":"alice","pt":17}],"attempts":[1,1,1,1],"data":[{"ok":true},{"ok":true},{"ok":true},{"ok":true}]}]'
$R EVAL "for i=1,1000 do redis.call('XADD','ferry:events','*','e',ARGV[1]) end return 1" 0 "$E" >/dev/null
FIRST=$($R XRANGE ferry:events - + COUNT 1 | head -1)
for n in 100 1000; do
  $R CONFIG RESETSTAT >/dev/null
  redis-benchmark -p "$PORT" -n 2000 -c 4 -q XRANGE ferry:events "($FIRST" + COUNT "$n" >/dev/null
  redis-benchmark -p "$PORT" -n 2000 -c 4 -q EVALSHA "$MISSED" 2 ferry:events ferry:epoch e >/dev/null
  echo "$n entries: XRANGE $(stat xrange) us + missed.lua $(stat evalsha) us"
done
