#!/usr/bin/env bash
# veil's whole test suite. On a fresh Debian 12 machine, run as root: it installs what the tests
# need (apt packages, a Python venv with pinned clients, cargo-fuzz), then runs lints, unit,
# property and integration tests, and a short fuzz smoke run.
#
#   tests/run.sh            everything
#   FUZZ_SECONDS=0 tests/run.sh   skip the fuzz smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
FUZZ_SECONDS=${FUZZ_SECONDS:-20}
step() { printf '\n==> %s\n' "$*"; }

step "system packages"
packages=(nftables tcpdump dante-server iproute2 curl util-linux systemd python3-minimal python3-venv coturn baresip-core kamailio)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages ${missing[*]} and not root: run tests/run.sh as root" >&2
    exit 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# Dante and kamailio start daemons on install on some systems; the tests run their own.
systemctl disable --now danted kamailio >/dev/null 2>&1 || true

step "python venv with pinned test clients"
if [ ! -x target/venv/bin/python ]; then
  mkdir -p target
  python3 -m venv target/venv
fi
target/venv/bin/pip install -q --disable-pip-version-check -r tests/requirements.txt
export VEIL_TEST_PYTHON="$PWD/target/venv/bin/python"

step "calling apps for the end-to-end calls (a venv the unprivileged test user can run)"
CALL_VENV=${VEIL_CALL_VENV:-/opt/veil-test/venv}
if [ ! -x "$CALL_VENV/bin/python" ]; then
  mkdir -p "$(dirname "$CALL_VENV")"
  /usr/bin/python3 -m venv "$CALL_VENV"
fi
"$CALL_VENV/bin/pip" install -q --disable-pip-version-check -r tests/call-requirements.txt
chmod -R a+rX "$(dirname "$CALL_VENV")"
export VEIL_CALL_PYTHON="$CALL_VENV/bin/python"

step "format and lints"
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings

step "unit, property and integration tests"
cargo test --all-targets 2>&1 | tee target/test-output.txt
grep -q "test result: ok" target/test-output.txt

if [ "$FUZZ_SECONDS" -gt 0 ]; then
  step "fuzz smoke run (${FUZZ_SECONDS}s per target)"
  command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --quiet
  # cargo-fuzz needs nightly flags; this machine has only stable, which accepts them with
  # RUSTC_BOOTSTRAP=1.
  for target in socks5_codec policy_load masque_wire; do
    mkdir -p "fuzz/corpus/$target"
    (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none "$target" "corpus/$target" "seeds/$target" -- \
      -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 -print_final_stats=1 2>&1 | tail -n 12)
  done
fi
step "all tests passed"
