#!/usr/bin/env bash
# The Python package's benchmark (loader_bench.py): builds the release binaries (transportd,
# transport-bench) and the extension module (maturin develop --release, into the test venv
# that libtransport/python/test.sh makes), then runs it. Arguments go to loader_bench.py:
#
#   benches/python/run.sh [--size 1GiB] [--runs 3] [--modes quic,tls-tcp] [--out benches/results]
#
# The test venv gets the release build of the module; the next test.sh puts the dev build back.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
cd "$repo"
cargo build --locked --release -p transportd -p benches --bin transportd --bin transport-bench
libtransport/python/test.sh --venv-only
export VIRTUAL_ENV=$target/python/venv PATH=$target/python/venv/bin:$PATH
(cd libtransport/python && maturin develop --locked --release)
exec python benches/python/loader_bench.py --transportd "$target/release/transportd" \
    --transport-bench "$target/release/transport-bench" "$@"
