#!/usr/bin/env bash
# Installs what the tests need and runs them all: formatting, lints, documentation, every
# test of every crate (the real binaries included), and a smoke run of transport-bench.
#
#   scripts/test.sh            everything
#   scripts/test.sh --quick    skip fmt, clippy and docs
#
# Needs the Rust toolchain (cargo, rustfmt, clippy). System packages the tests need are
# installed with apt-get when running as root on Debian; otherwise they are listed.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
[ "${1:-}" = "--quick" ] && quick=1

# System packages: a C compiler for aws-lc-sys (the TLS crypto), git for the bench's
# records, and for the lab (netlab) and the root-only tests: iproute2 (ip, tc), nftables,
# tcpdump, ping and util-linux (unshare, nsenter).
packages=(gcc make git iproute2 nftables tcpdump iputils-ping util-linux)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "missing Debian packages: ${missing[*]} (run as root, or install them first)" >&2
        exit 1
    fi
fi

step() { echo "== $*"; }
started=$(date +%s)

if [ "$quick" = 0 ]; then
    step "cargo fmt --check"
    cargo fmt --all -- --check
    step "cargo clippy --all-targets -- -D warnings"
    cargo clippy --workspace --all-targets --locked -- -D warnings
    step "cargo doc (warnings are errors)"
    RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
fi

step "cargo test (every crate; the real transportd and transport-bench binaries)"
cargo test --workspace --locked

# Tests that need root: network namespaces (netlab), mount namespaces (a full audit disk).
if [ "$(id -u)" = 0 ]; then
    step "cargo test -- --ignored (root-only: labs of network namespaces, a full disk)"
    cargo test --workspace --locked -- --ignored --test-threads=1
else
    echo "== skipped the root-only tests (network and mount namespaces): run as root to include them" >&2
fi

echo "== all passed in $(( $(date +%s) - started )) s"
