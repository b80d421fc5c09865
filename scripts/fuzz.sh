#!/usr/bin/env bash
# Runs each fuzz target (fuzz/, cargo fuzz on the nightly toolchain) for SECONDS and prints, per
# target, the executions, the time and the crashes. Exits non-zero if any target crashed; the
# input that did is in fuzz/artifacts/TARGET/ (replay: cargo +nightly fuzz run TARGET FILE).
#   scripts/fuzz.sh [--quick] SECONDS [TARGET...]     (default: every target)
# --quick (what scripts/test.sh runs): an unoptimised build without AddressSanitizer, still
# coverage-guided, with debug assertions and overflow checks. It builds in a few minutes where
# the optimised, sanitised build took 25 on a busy 2-core machine, at a fraction of the
# executions per second: enough to run each target briefly on every change. The sanitiser adds
# little for this crate, whose few `unsafe` blocks (inherited descriptors, mapping the shared
# tables, thread priority) take no fuzzed input; long runs should still use the default build.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
build_flags=()
if [ "${1:-}" = --quick ]; then
    build_flags=(--dev --sanitizer none)
    shift
fi
seconds="${1:?usage: scripts/fuzz.sh [--quick] SECONDS [TARGET...]}"
shift
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
# The list after the install: a process substitution's failure does not stop the script, and an
# empty list would run nothing and pass (it did, on a machine without cargo-fuzz).
if (($#)); then targets=("$@"); else mapfile -t targets < <(cargo +nightly fuzz list); fi
if ((${#targets[@]} == 0)); then
    echo "fuzz.sh: FAILED: no fuzz targets (cargo +nightly fuzz list printed none)" >&2
    exit 1
fi
# Build first, so that each target's time below is time spent fuzzing.
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
cargo +nightly fuzz build "${build_flags[@]}" >"$logs/build.log" 2>&1 || { cat "$logs/build.log" >&2; exit 1; }

failed=0
printf '%-12s %12s %8s %10s %8s\n' target executions seconds exec/s crashes
for target in "${targets[@]}"; do
    log="$logs/$target.log"
    started=$(date +%s)
    # -timeout: one input running this long is a hang, reported like a crash.
    if cargo +nightly fuzz run "${build_flags[@]}" "$target" -- -max_total_time="$seconds" -timeout=30 -print_final_stats=1 \
        >"$log" 2>&1; then
        crashes=0
    else
        crashes=1
        failed=1
    fi
    elapsed=$(($(date +%s) - started))
    # libFuzzer's final stats; without them (a crash), the last status line `#N ...`.
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    [ -n "$execs" ] || execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
    execs=${execs:-0}
    printf '%-12s %12s %8s %10s %8s\n' "$target" "$execs" "$elapsed" "$((execs / (elapsed > 0 ? elapsed : 1)))" "$crashes"
    if ((crashes)); then
        echo "--- $target crashed; the end of its log:" >&2
        tail -40 "$log" >&2
    fi
done
exit "$failed"
