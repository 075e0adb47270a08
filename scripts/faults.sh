#!/usr/bin/env bash
# The fault suite (crates/cli/tests/cli/fault_suite.rs) at a larger size, printed as a table:
#   scenario | jobs | lost | doubled | stuck | recovery | restored
# Each scenario runs a small cluster of real processes (redis-server, PostgreSQL, two workers with recorders)
# under a steady feed of jobs while one fault strikes; the ground truth is PostgreSQL. The test suite runs the
# same scenarios shorter. Usage: scripts/faults.sh [FEED_SECS] [RATE]   (defaults: 30 s at 200 jobs/s)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export FERRY_FAULT_FEED_SECS=${1:-30} FERRY_FAULT_RATE=${2:-200}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
status=0
cargo nextest run -p ferry-cli --test cli -E 'test(/^fault_suite::/)' --no-capture --no-fail-fast 2>&1 \
  | tee "$out" || status=$?
echo
echo "feed: ${FERRY_FAULT_FEED_SECS} s at ${FERRY_FAULT_RATE} jobs/s"
echo "| scenario | jobs | lost | doubled | stuck | recovery | restored |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
grep '^FAULT-ROW' "$out" | sed 's/^FAULT-ROW //; s/$/ |/' | sort
exit "$status"
