#!/usr/bin/env bash
# The NEON kernel path, compiled for aarch64 and tested under qemu on an x86-64 Debian machine:
# cross-builds lsplit-model's library tests (every kernel path the CPU has against the portable
# code, bit for bit; our kernels against candle's) and runs them in qemu-aarch64.
# Not part of scripts/test.sh: it needs rustup's aarch64 standard library (from
# static.rust-lang.org) and a second build of the model crate's dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v qemu-aarch64 >/dev/null 2>&1 || missing+=(qemu-user)
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || missing+=(gcc-aarch64-linux-gnu)
if ((${#missing[@]})); then
  as_root=()
  [ "$(id -u)" -eq 0 ] || as_root=(sudo)
  "${as_root[@]}" apt-get update -qq
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
rustup target add aarch64-unknown-linux-gnu

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
cargo test --locked -p lsplit-model --lib --target aarch64-unknown-linux-gnu "$@"
