#!/usr/bin/env bash
# The Python package's build and tests: a venv with pinned tools, the extension module built
# by maturin into it, ruff (lint and format check), then pytest against real nodes (the
# transportd binary, built here too). scripts/test.sh calls it after the Rust tests.
#
#   libtransport/python/test.sh [pytest args...]
#   libtransport/python/test.sh --venv-only   only make the venv (scripts/test.sh runs this
#                                             in the background while the Rust tests run)
#
# The venv lives in $CARGO_TARGET_DIR/python (target/python by default) and is reused. The
# node the tests start is built with the test profile, as the Rust tests build it, so their
# dependencies are reused; the module with the dev profile (its dependencies optimised, as
# the test profile's are: maturin cannot build a library with the test profile). A wheel
# for users is `maturin build --release` in this directory (one abi3 wheel for CPython 3.11
# and later).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
venv=$target/python/venv
python=${PYTHON:-python3}

# The venv lives in cargo's target directory. Made before cargo's first build (the test
# command makes it in the background while the Rust builds start), the directory gets the
# cache-directory tag cargo would have written, which tools (and netlab, to find where its
# artifacts go) look for.
if [ ! -e "$target/CACHEDIR.TAG" ]; then
    mkdir -p "$target"
    printf '%s\n' 'Signature: 8a477f597d28d172789f06886806bc55' \
        '# This file is a cache directory tag created by cargo.' \
        '# For information about cache directory tags see https://bford.info/cachedir/' \
        >"$target/CACHEDIR.TAG"
fi

started=$(date +%s)
step() { echo "== [python $(( $(date +%s) - started )) s] $*"; }

# Pinned: the build backend, the test runner, numpy (the zero-copy checks), the linter; and
# what the package's integrations are tested against: PyTorch (CPU; PyPI's wheel brings its
# CUDA libraries, about 7 GB, installed in about a minute from pip's cache) with torchdata's
# StatefulDataLoader, fsspec with pyarrow and pandas (Parquet through transportd://), and
# safetensors (tensor reads).
requirements=(maturin==1.16.0 pytest==9.2.0 numpy==2.4.6 ruff==0.17.6
    torch==2.15.0 torchdata==0.11.0 fsspec==2026.9.0 pyarrow==26.0.1 pandas==3.1.1
    safetensors==0.8.0)
stamp=$venv/.requirements
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "${requirements[*]}" ]; then
    step "venv in $venv: ${requirements[*]}"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${requirements[@]}"
    echo "${requirements[*]}" >"$stamp"
fi
if [ "${1:-}" = --venv-only ]; then
    step "venv ready"
    exit 0
fi
export VIRTUAL_ENV=$venv PATH=$venv/bin:$PATH
export CARGO_TARGET_DIR=$target

step "ruff check and ruff format --check (the package, and its benchmark in benches/python)"
(cd "$here" && ruff check . && ruff format --check .)
(cd "$repo/benches/python" && ruff check . && ruff format --check .)

# The node the tests start: $TRANSPORTD_BIN if given (scripts/test.sh passes the one the
# Rust tests built), else built here; CARGO_BUILD_FEATURES (e.g. "--features
# libtransport/rdma") builds it with the features the Rust tests use.
if [ -n "${TRANSPORTD_BIN:-}" ]; then
    [ -x "$TRANSPORTD_BIN" ] || { echo "TRANSPORTD_BIN=$TRANSPORTD_BIN is not an executable" >&2; exit 1; }
    step "the node the tests start: $TRANSPORTD_BIN"
else
    step "cargo build -p transportd ${CARGO_BUILD_FEATURES:-} (the node the tests start)"
    # shellcheck disable=SC2086 # the features are words
    (cd "$repo" && cargo build --locked --quiet --profile test -p transportd ${CARGO_BUILD_FEATURES:-})
fi

step "maturin develop (transportd._native into the venv)"
(cd "$here" && maturin develop --locked)
python -c 'import transportd' # fails loudly if the build above did not install

step "pytest"
(cd "$here" && python -m pytest -q "$@")
step "passed"
