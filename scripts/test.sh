#!/usr/bin/env bash
# The whole test suite in one command, the same on a laptop and in CI (.ci/run calls exactly this).
# Installs redis-server, PostgreSQL, HAProxy and chromium (the browser tests) from Debian packages only when they
# are missing (the tests start their own private servers on ephemeral ports; the system services are never used,
# nor started by the install), unpacks promtool and prometheus without installing Prometheus, then checks
# formatting and lints and runs every test. Extra arguments go to `cargo nextest run` (e.g. `scripts/test.sh -E 'test(restart)'`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    echo "scripts/test.sh: need root or sudo to install: $*" >&2
    exit 1
  fi
}

# Installs Debian packages without starting their services: redis-server, postgresql and haproxy would otherwise
# start system-wide daemons on their default ports, and the tests never use them. A policy-rc.d that answers 101
# ("action forbidden") holds invoke-rc.d back during the install, then goes (one that was there stays).
apt_install() {
  local policy=/usr/sbin/policy-rc.d placed=0 rc=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# scripts/test.sh: no service starts while it installs packages.\nexit 101\n' \
      | as_root tee "$policy" >/dev/null
    as_root chmod 755 "$policy"
    placed=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" || rc=$?
  if [ "$placed" -eq 1 ]; then as_root rm -f "$policy"; fi
  return "$rc"
}

# Debian keeps each PostgreSQL version in /usr/lib/postgresql/<version>/bin, off PATH; testkit looks there too.
have_postgres() {
  local dir
  if command -v pg_config >/dev/null && dir=$(pg_config --bindir 2>/dev/null) \
    && [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/postgres" ]; then
    return 0
  fi
  for dir in /usr/lib/postgresql/*/bin; do
    [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/postgres" ] && return 0
  done
  return 1
}

missing=()
{ command -v redis-server && command -v redis-cli; } >/dev/null || missing+=(redis-server)
{ have_postgres && command -v psql >/dev/null; } || missing+=(postgresql)
# HAProxy runs deploy/haproxy/haproxy.cfg in front of real gateways (crates/cli/tests/cli/proxies.rs).
{ command -v haproxy || [ -x /usr/sbin/haproxy ]; } >/dev/null || missing+=(haproxy)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "scripts/test.sh: installing ${missing[*]}" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
  apt_install "${missing[@]}"
fi

# promtool, for the deploy/prometheus checks (crates/cli/tests/cli/deploy.rs, container.rs), and the Prometheus
# server, which scrapes every role of the compose topology (crates/cli/tests/cli/topology.rs) as a private process
# on a port of its own. The Debian package `prometheus` is not installed (it pulls in dozens of packages and
# enables prometheus.service and node-exporter timers): its .deb is downloaded and only unpacked, into
# target/tools/prometheus, where the tests look (FERRY_TOOLS_DIR) for what is not on PATH.
prom_dir=target/tools/prometheus
prom_ready=true
for tool in promtool prometheus; do
  command -v "$tool" >/dev/null || [ -x "$prom_dir/bin/$tool" ] || prom_ready=false
done
if [ "$prom_ready" = false ]; then
  echo "scripts/test.sh: unpacking promtool and prometheus from the Debian package prometheus into $prom_dir" >&2
  rm -rf "$prom_dir/deb" && mkdir -p "$prom_dir/deb" "$prom_dir/bin"
  if ! (cd "$prom_dir/deb" && apt-get download -q prometheus); then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    (cd "$prom_dir/deb" && apt-get download -q prometheus)
  fi
  dpkg-deb -x "$prom_dir"/deb/prometheus_*.deb "$prom_dir/deb/root"
  for tool in promtool prometheus; do
    install -m 755 "$prom_dir/deb/root/usr/bin/$tool" "$prom_dir/bin/$tool"
  done
  rm -rf "$prom_dir/deb"
fi

# Python tools for the container, Kubernetes and Terraform checks and the API fuzzer, each in its own
# virtualenv under target/tools (never committed): kubernetes-validate (the Kubernetes schemas, offline),
# checkov (static analysis) and schemathesis (OpenAPI-driven fuzzing of `ferry dev`,
# crates/cli/tests/cli/openapi_fuzz.rs). The tests look for them there (FERRY_TOOLS_DIR).
py_tool() {
  local name=$1 version=$2 cmd=$3 dir=target/tools/$1
  [ -x "$dir/bin/$cmd" ] && return 0
  echo "scripts/test.sh: installing $name $version into $dir" >&2
  if ! python3 -m venv "$dir" >/dev/null 2>&1; then
    apt_install python3-venv python3-pip
    python3 -m venv "$dir"
  fi
  "$dir/bin/pip" install -q "$name==$version"
}
py_tool kubernetes-validate 1.37.0 kubernetes-validate
py_tool checkov 3.3.30 checkov
py_tool schemathesis 4.32.5 schemathesis
export FERRY_TOOLS_DIR="$PWD/target/tools"

# The browser tests drive Debian's chromium headless through puppeteer-core, which never downloads a browser of
# its own: install the package when it is missing. Building and running ferry needs neither chromium nor npm
# (the dashboard is plain files embedded in the binary); Node 20+ and npm must be on PATH for the tests.
if ! [ -x /usr/bin/chromium ]; then
  echo "scripts/test.sh: installing chromium (the browser tests)" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
  apt_install chromium
fi
# The TypeScript client (clients/typescript), tested by crates/cli/tests/cli/ts_client.rs through node --test:
# its devDependencies exactly as locked, compiled (tsc) into clients/typescript/dist, which the tests import.
(cd clients/typescript && npm ci --no-audit --no-fund && npm run build)
# The web dashboard's browser test (crates/cli/tests/cli/dashboard.rs runs crates/gateway/ui-tests with node):
# its node_modules from the committed package-lock.json, only when missing or out of date.
ui_tests=crates/gateway/ui-tests
if ! [ -d "$ui_tests/node_modules/puppeteer-core" ] \
  || [ "$ui_tests/package-lock.json" -nt "$ui_tests/node_modules/.package-lock.json" ]; then
  echo "scripts/test.sh: npm ci in $ui_tests" >&2
  (cd "$ui_tests" && PUPPETEER_SKIP_DOWNLOAD=1 npm ci --no-audit --no-fund)
fi

if command -v rustup >/dev/null; then
  cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
  cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
fi
cargo nextest --version >/dev/null 2>&1 || cargo install cargo-nextest --locked

# A full test build takes about 3 GB under target/ (lints, test binaries, tools). Say so up front rather than
# letting the linker fail half-way with "No space left on device".
mkdir -p target
free_kb=$(df -Pk target | awk 'NR == 2 { print $4 }')
if [ "${free_kb:-0}" -lt $((4 * 1024 * 1024)) ]; then
  echo "scripts/test.sh: warning: only $((free_kb / 1024)) MB free under target/; a full test build needs about 3 GB, 4 GB to be safe" >&2
fi

set -x
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo nextest run --workspace --all-targets --no-fail-fast "$@"
cargo test --workspace --doc
