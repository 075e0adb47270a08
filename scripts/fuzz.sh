#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets: http_body, ws_frame, jwt_header) for a bounded time each, with
# cargo-fuzz on the nightly toolchain (libFuzzer needs it). Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
# (default 60 s, every target). The HTTP and WebSocket targets drive a real gateway on a loopback port inside the
# fuzz process. Crashes are kept under fuzz/artifacts/<target>/ and make the script fail; the corpus grows under
# fuzz/corpus/ (neither is committed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
secs=${1:-60}
shift || true
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(http_body ws_frame jwt_header)

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "scripts/fuzz.sh: needs the nightly toolchain (rustup toolchain install nightly), which libFuzzer's instrumentation requires" >&2
  exit 1
fi
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked

status=0
for t in "${targets[@]}"; do
  echo "== $t: ${secs} s"
  # -s none: no sanitizer (the code under test forbids unsafe); -rss_limit_mb bounds memory.
  if ! cargo +nightly fuzz run -s none "$t" -- -max_total_time="$secs" -rss_limit_mb=4096 -timeout=10; then
    echo "scripts/fuzz.sh: $t found a failure (see fuzz/artifacts/$t/)" >&2
    status=1
  fi
done
exit "$status"
