#!/usr/bin/env bash
# Builds shadowsocks-rust's sslocal and ssserver (AEAD ciphers only) into target/shadowsocks,
# where `cargo bench --bench datapath` finds them and adds their row. Optional; about 2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo install shadowsocks-rust --version 1.25.0 --locked --root target/shadowsocks \
    --no-default-features --features "local server aead-cipher"
