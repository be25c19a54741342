#!/usr/bin/env bash
# Builds every fuzz target (cargo-fuzz, libFuzzer) and runs each for a while from its
# committed seed corpus. Fails on any finding (a crash, a failed assertion, a timeout, an
# out-of-memory) and prints the executions each target ran.
#
#   scripts/fuzz.sh                       build, then run every target for 30 s
#   scripts/fuzz.sh --seconds 180         a longer run
#   scripts/fuzz.sh --sanitizer address   with AddressSanitizer (default: none, see below)
#   scripts/fuzz.sh --build-only          build, run nothing
#   scripts/fuzz.sh frames policy         only these targets
#   scripts/fuzz.sh --write-seeds         rewrite the seed corpora from the real encoders
#   scripts/fuzz.sh --jobs 1              one target at a time (default: one per core)
#
# Targets live in certs/fuzz, libtransport/fuzz and transportd/fuzz, each its own cargo
# workspace; they share one target directory, libtransport/fuzz/target (gitignored). The
# runs write new inputs to a scratch copy, so the committed corpus only changes on purpose.
# cargo-fuzz needs nightly compiler flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain
# accept them. The default sanitizer is none: Rust code is memory safe without it, the runs
# still catch panics, failed assertions, hangs and runaway memory, and the target executes
# several times more inputs per second. `--sanitizer address` is there for the C parts
# (aws-lc) and for `unsafe` code, should it appear.
#
# A finding's input is kept under the printed artifacts directory. Turn it into a named
# regression test holding those bytes, next to the code it broke, then fix the code.
set -euo pipefail
cd "$(dirname "$0")/.."

# Everything runs inside main, which bash reads whole before starting: editing this file
# during a long run cannot change what that run does.
main() {
    seconds=30
    sanitizer=none
    build_only=0
    write_seeds=0
    only=()
    jobs=$(nproc)
    while [ $# -gt 0 ]; do
        case "$1" in
            --seconds) seconds="$2"; shift 2 ;;
            --sanitizer) sanitizer="$2"; shift 2 ;;
            --build-only) build_only=1; shift ;;
            --write-seeds) write_seeds=1; shift ;;
            --jobs) jobs="$2"; shift 2 ;;
            -h|--help) awk 'NR > 1 && /^#/ { print } /^set -euo/ { exit }' "$0"; exit 0 ;;
            -*) echo "unknown option $1" >&2; exit 64 ;;
            *) only+=("$1"); shift ;;
        esac
    done

    export RUSTC_BOOTSTRAP=1
    root=$(pwd)
    target_dir="$root/libtransport/fuzz/target"
    # Builds with a sanitizer keep their own directory, so switching does not rebuild the other.
    [ "$sanitizer" != none ] && target_dir="$target_dir/$sanitizer"
    fuzz_dirs=(certs/fuzz libtransport/fuzz transportd/fuzz)
    cargo_fuzz_version=0.13.2

    if [ "$write_seeds" = 1 ]; then
        # The generators are ignored tests in certs/src/fuzzing.rs and libtransport/src/fuzzing.rs,
        # which exist only under --cfg fuzzing; they build in their own target directory so the
        # main one keeps its cache. The node_config and sealed_chunks seeds are hand-written.
        for crate in certs libtransport; do
            echo "== writing $crate/fuzz/corpus"
            RUSTFLAGS="--cfg fuzzing" CARGO_TARGET_DIR="$root/libtransport/fuzz/target/seeds" \
                FUZZ_CORPUS_DIR="$root/$crate/fuzz/corpus" \
                cargo test --locked -p "$crate" --features test-util --lib fuzzing::seeds \
                -- --ignored --exact fuzzing::seeds::write_seed_corpus
        done
        exit 0
    fi

    if ! cargo fuzz --version >/dev/null 2>&1; then
        echo "== installing cargo-fuzz $cargo_fuzz_version"
        if declare -F quick_install >/dev/null; then
            quick_install cargo-fuzz --version "$cargo_fuzz_version"
        else
            cargo install cargo-fuzz --locked --version "$cargo_fuzz_version"
        fi
    fi

    # Every target, as "fuzz_dir target".
    all=()
    for dir in "${fuzz_dirs[@]}"; do
        for t in $(cargo fuzz list --fuzz-dir "$dir"); do
            all+=("$dir $t")
        done
    done
    selected=()
    for entry in "${all[@]}"; do
        t=${entry#* }
        if [ "${#only[@]}" = 0 ] || printf '%s\n' "${only[@]}" | grep -qx "$t"; then
            selected+=("$entry")
        fi
    done
    if [ "${#selected[@]}" = 0 ]; then
        echo "no such target: ${only[*]}; have: $(printf '%s ' "${all[@]#* }")" >&2
        exit 64
    fi

    for dir in "${fuzz_dirs[@]}"; do
        # Only the fuzz crates that hold a selected target.
        printf '%s\n' "${selected[@]}" | grep -q "^$dir " || continue
        echo "== cargo fuzz build ($dir, sanitizer $sanitizer)"
        started=$(date +%s)
        cargo fuzz build --fuzz-dir "$dir" --target-dir "$target_dir" -s "$sanitizer"
        echo "   built in $(( $(date +%s) - started )) s"
    done
    [ "$build_only" = 1 ] && exit 0

    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    artifacts="$root/libtransport/fuzz/target/artifacts"
    # Targets run side by side, one per core (libFuzzer uses one thread each), so a short
    # run of every target costs the wall time of (targets / cores) runs.
    running=0
    for entry in "${selected[@]}"; do
        dir=${entry% *}
        t=${entry#* }
        seeds="$dir/corpus/$t"
        [ -d "$seeds" ] || { echo "missing seed corpus $seeds" >&2; exit 1; }
        mkdir -p "$scratch/$t" "$artifacts/$t"
        echo "== fuzz $t (${seconds} s, $(find "$seeds" -type f | wc -l) seeds)"
        (
            status=0
            # A single allocation over 64 MiB is a finding too (enforced with a sanitizer;
            # without one, the 2 GiB RSS limit still stops a runaway).
            cargo fuzz run --fuzz-dir "$dir" --target-dir "$target_dir" -s "$sanitizer" "$t" \
                "$scratch/$t" "$seeds" -- \
                -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=64 \
                -print_final_stats=1 -artifact_prefix="$artifacts/$t/" \
                >"$scratch/$t.log" 2>&1 || status=$?
            echo "$status" >"$scratch/$t.status"
        ) &
        running=$((running + 1))
        if [ "$running" -ge "$jobs" ]; then
            wait -n || true
            running=$((running - 1))
        fi
    done
    wait
    summary=()
    failed=0
    for entry in "${selected[@]}"; do
        dir=${entry% *}
        t=${entry#* }
        log="$scratch/$t.log"
        status=$(cat "$scratch/$t.status" 2>/dev/null || echo 1)
        # cargo-fuzz makes <fuzz dir>/artifacts/<target> for its default prefix; ours is
        # under the target directory, so drop what it left empty.
        find "$dir/artifacts" -type d -empty -delete 2>/dev/null || true
        stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
        line=$(printf '%-16s %12s %10s %8s %8s' "$t" "$(stat number_of_executed_units)" \
            "$(stat average_exec_per_sec)" "$(stat new_units_added)" "$(stat peak_rss_mb)")
        if [ "$status" != 0 ]; then
            failed=1
            tail -n 40 "$log" >&2
            echo "!! $t: finding (exit $status); its input is in $artifacts/$t/" >&2
            summary+=("$line  FINDING")
        else
            summary+=("$line  ok")
        fi
    done

    echo "== fuzz summary: ${seconds} s per target (sanitizer $sanitizer)"
    printf '%-16s %12s %10s %8s %8s\n' target executions "execs/s" "new" "rss MiB"
    printf '%s\n' "${summary[@]}"
    if [ "$failed" != 0 ]; then
        echo "fuzzing found problems: see above" >&2
        exit 1
    fi
    echo "== no findings"
}

main "$@"
