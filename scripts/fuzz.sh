#!/usr/bin/env bash
# Runs each fuzz target (fuzz/, cargo fuzz on the nightly toolchain) for SECONDS and prints, per
# target, the executions, the time and the crashes. Exits non-zero if any target crashed; the
# input that did is in fuzz/artifacts/TARGET/ (replay: cargo +nightly fuzz run TARGET FILE).
#   scripts/fuzz.sh SECONDS [TARGET...]     (default: every target)
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:?usage: scripts/fuzz.sh SECONDS [TARGET...]}"
shift
if (($#)); then targets=("$@"); else mapfile -t targets < <(cargo +nightly fuzz list); fi

command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
# Build first, so that each target's time below is time spent fuzzing.
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
cargo +nightly fuzz build >"$logs/build.log" 2>&1 || { cat "$logs/build.log" >&2; exit 1; }

failed=0
printf '%-12s %12s %8s %10s %8s\n' target executions seconds exec/s crashes
for target in "${targets[@]}"; do
    log="$logs/$target.log"
    started=$(date +%s)
    # -timeout: one input running this long is a hang, reported like a crash.
    if cargo +nightly fuzz run "$target" -- -max_total_time="$seconds" -timeout=30 -print_final_stats=1 \
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
