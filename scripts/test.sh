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
# tcpdump, ping and util-linux (unshare, nsenter); for the `rdma` feature (ibverbs through
# rdma-sys, whose bindings bindgen generates at build time): libibverbs-dev, librdmacm-dev,
# libclang-dev, clang and pkg-config; python3 (3.11 or later) and python3-venv for the
# Python package's venv (maturin, pytest, numpy and ruff come from PyPI into it) and
# py-spiffe's (the Workload API's interoperability test); faketime (libfaketime) for the
# clock-skew test, which moves one process's wall clock; systemd for `systemd-analyze
# verify` of the units in packaging/systemd (scripts/packaging.sh); chromium to render the
# audit evidence report headless (transportd/tests/report.rs).
packages=(gcc make git iproute2 nftables tcpdump iputils-ping util-linux
    libibverbs-dev librdmacm-dev libclang-dev clang pkg-config python3 python3-venv faketime
    systemd chromium)
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

started=$(date +%s)
step() { echo "== [$(( $(date +%s) - started )) s] $*"; }

# Tools built from crates.io (no prebuilt binaries are reachable): a quick release profile,
# since they need not be fast, only present.
quick_install() {
    CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
        CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_DEBUG=false \
        cargo install --locked "$@"
}
export -f quick_install
cargo_deny_version=0.20.2

# Off the critical path: cargo-fuzz and cargo-deny are installed, and the fuzz targets
# built, in the background at the lowest CPU priority while the lints and tests run (a
# build leaves a core idle much of the time, and the tests spend much of theirs waiting on
# the network and timers); the fuzz runs follow the build in the same job. Its output goes
# to a log, printed when it is waited for, after the root-only tests.
scratch=$(mktemp -d)
# Background jobs run in sessions of their own, so that a failure here stops them all.
background=""
python_venv=""
packaging_venv=""
cleanup() {
    for pid in $background $python_venv $packaging_venv; do
        kill -- "-$pid" 2>/dev/null || true
    done
    rm -rf "$scratch"
}
trap cleanup EXIT
install_cargo_deny() {
    if ! cargo deny --version >/dev/null 2>&1; then
        echo "== installing cargo-deny $cargo_deny_version"
        quick_install cargo-deny --version "$cargo_deny_version"
    fi
}
# The whole background chain: tools, the fuzz build, then the fuzz runs (FUZZ_SECONDS each),
# so nothing in the foreground ever waits for the build to finish.
tools_then_fuzz() {
    install_cargo_deny
    scripts/fuzz.sh --build-only || return
    echo "== fuzz: run each target for ${FUZZ_SECONDS:-30} s (scripts/fuzz.sh)"
    scripts/fuzz.sh --seconds "${FUZZ_SECONDS:-30}"
}
export -f install_cargo_deny tools_then_fuzz
export cargo_deny_version
# Starts the command "$@" in the background, output to log $1, at the lowest CPU priority;
# its pid is left in $job. Where the kernel groups each session for the scheduler
# (autogroup), nice only ranks processes within their group, and setsid gives the job a
# group of its own: the job sets that group's nice value too, from inside its session.
start_background() {
    local log=$1
    shift
    setsid bash -c 'echo 19 2>/dev/null >/proc/self/autogroup; exec nice -n 19 "$@"' \
        background "$@" >"$log" 2>&1 &
    job=$!
}
if [ "$quick" = 0 ]; then
    start_background "$scratch/background.log" bash -c tools_then_fuzz
    background=$job
fi
# The Python package's venv (PyTorch and the rest from PyPI: about a minute of download and
# unpacking, little CPU) is made in the background too, while the Rust builds run.
start_background "$scratch/python-venv.log" libtransport/python/test.sh --venv-only
python_venv=$job
# kubernetes-validate's venv for the manifests' check (scripts/packaging.sh), likewise.
start_background "$scratch/packaging-venv.log" scripts/packaging.sh --venv-only
packaging_venv=$job
# Waits for background job $1, whose output is in $2, and prints that output; fails if it did.
await() {
    local status=0
    wait "$1" || status=$?
    cat "$2"
    if [ "$status" != 0 ]; then
        echo "!! $3 failed (exit $status): see above" >&2
        exit "$status"
    fi
}

# Lints and docs, first with the hardware RDMA device (feature rdma) compiled in, as the
# tests below are built, then the default build's lints (without the feature).
if [ "$quick" = 0 ]; then
    step "cargo fmt --check"
    cargo fmt --all -- --check
    step "cargo clippy --all-targets --features libtransport/rdma -- -D warnings"
    cargo clippy --workspace --all-targets --locked --features libtransport/rdma -- -D warnings
    step "cargo doc --features libtransport/rdma (warnings are errors)"
    RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet \
        --features libtransport/rdma
    # Without the feature only libtransport's own code changes (no other crate has code
    # behind it): its every target, and the other crates' libraries and binaries built on it.
    step "cargo clippy -- -D warnings (libtransport: all targets; the rest: libraries and binaries)"
    cargo clippy -p libtransport --all-targets --locked -- -D warnings
    cargo clippy --workspace --locked -- -D warnings
fi

# Every test, built once with the hardware RDMA device (feature rdma) compiled in, which
# adds to the default build and changes nothing else: tests that need a device are
# #[ignore = "needs RDMA device"]; the rest show that a machine without one reports none,
# cleanly, and falls back.
features=(--features libtransport/rdma)
if cargo nextest --version >/dev/null 2>&1; then
    # cargo-nextest (on these machines' images) runs the tests of every binary side by side,
    # each in a process of its own; many of them spend their time waiting on timers (SVID
    # rotation, timeouts), so more run at once than there are cores. It skips doc tests.
    step "cargo nextest run (every crate, feature rdma; the real transportd and transport-bench binaries)"
    cargo nextest run --workspace --locked "${features[@]}" --test-threads "$(( $(nproc) * 2 ))" \
        --no-fail-fast --failure-output final --status-level fail
    step "cargo test --doc"
    cargo test --workspace --locked "${features[@]}" --doc
else
    step "cargo test (every crate, feature rdma; the real transportd and transport-bench binaries)"
    cargo test --workspace --locked "${features[@]}"
fi

# Packaging: the systemd units (systemd-analyze verify), the Kubernetes manifests (their
# schemas), the configurations in them, each with a negative control; on the binary the
# tests just built.
step "waiting for kubernetes-validate's venv"
await "$packaging_venv" "$scratch/packaging-venv.log" "making kubernetes-validate's venv"
step "scripts/packaging.sh (systemd units, Kubernetes manifests)"
scripts/packaging.sh target/debug/transportd

# The Python package (libtransport/python): its venv, the extension module built by maturin,
# ruff, and pytest against real nodes over QUIC and TLS/TCP.
step "waiting for the Python package's venv"
await "$python_venv" "$scratch/python-venv.log" "making the Python package's venv"
step "libtransport/python/test.sh (the Python package: ruff, maturin, pytest)"
# The node its tests start is the one the Rust tests just built (not built again).
TRANSPORTD_BIN="$PWD/target/debug/transportd" CARGO_BUILD_FEATURES="${features[*]}" \
    libtransport/python/test.sh

# Fuzzing: every parser's target runs for a short while from its seed corpus (FUZZ_SECONDS
# each, 30 by default; scripts/fuzz.sh --seconds N for longer runs), in the background job
# started above once its build is done, beside the tests, at the lowest priority.
if [ "$quick" = 1 ]; then
    echo "== skipped the fuzz runs (--quick)" >&2
fi

# Tests that need root: network namespaces (netlab), mount namespaces (a full audit disk),
# FUSE (an audit disk that fails or hangs: netlab's faultyfs mounts through /dev/fuse itself,
# no libfuse or fusermount needed).
# Among the ignored tests too: py-spiffe, the SPIFFE Python client (grpc-core underneath),
# against a node's Workload API, from a venv of its own.
if [ "$(id -u)" = 0 ]; then
    step "py-spiffe for the Workload API's interoperability test"
    py_spiffe=target/py-spiffe
    [ -x "$py_spiffe/bin/python" ] || python3 -m venv "$py_spiffe"
    "$py_spiffe/bin/pip" install --quiet --disable-pip-version-check "spiffe==0.3.2"
    export PY_SPIFFE_PYTHON="$PWD/$py_spiffe/bin/python"
    step "cargo test -- --ignored (root-only: labs of network namespaces, a full disk)"
    # (The hardware device's own tests, ignored because they need a device, stay skipped.)
    cargo test --workspace --locked "${features[@]}" -- --ignored --test-threads=1 \
        --skip rdma::hardware::tests::hardware_
elif [ "${CI:-}" = true ]; then
    # CI must not pass on a machine that silently skipped a whole class of tests.
    echo "!! CI=true but not root: the root-only tests (network and mount namespaces) cannot run" >&2
    exit 1
else
    echo "== skipped the root-only tests (network and mount namespaces): run as root to include them" >&2
fi

if [ "$quick" = 0 ]; then
    step "waiting for the tool installs, the fuzz build and the fuzz runs"
    await "$background" "$scratch/background.log" "installing cargo-deny and cargo-fuzz, or fuzzing"
fi

# Supply chain: licences, banned crates (OpenSSL, native-tls) and sources (crates.io only),
# for the workspace and the fuzz workspaces.
install_cargo_deny
step "cargo deny check licenses bans sources"
# cargo-deny reads the metadata of every target platform's crates; fetch them first (the
# build only fetched this platform's), then check without network.
cargo fetch --locked --quiet
cargo deny --offline --locked --all-features check licenses bans sources
for fuzz in certs/fuzz libtransport/fuzz transportd/fuzz; do
    cargo fetch --manifest-path "$fuzz/Cargo.toml" --quiet
    cargo deny --offline --all-features --manifest-path "$fuzz/Cargo.toml" \
        check licenses bans sources
done
echo "== cargo deny: security advisories were NOT checked. The RustSec advisory database is" \
    "fetched from GitHub, which these machines cannot reach; run 'cargo deny check advisories'" \
    "where GitHub is reachable."

if [ "$(id -u)" = 0 ]; then
    echo "== all passed in $(( $(date +%s) - started )) s"
else
    echo "== passed in $(( $(date +%s) - started )) s, WITHOUT the root-only tests (not root)"
fi
