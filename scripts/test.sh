#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what it lacks, builds the local images
# the tests need when no registry can provide them, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# The Redis suites and tests/docker.rs need a Docker engine. Without one they skip themselves,
# each with a line, except under CI (CI set to anything but "", "false" or "0"), where every test
# must run: the same policy as tests/support/docker_engine.rs. Checked first, so CI fails fast.
ci="${CI:-}"
case "${ci,,}" in "" | false | 0) ci="" ;; esac
no_docker=""
if ! command -v docker >/dev/null 2>&1; then
    no_docker="\`docker\` is not installed"
elif ! docker info >/dev/null 2>&1; then
    no_docker="\`docker info\` fails (no Docker engine answers)"
fi
if [ -n "$no_docker" ]; then
    if [ -n "$ci" ]; then
        echo "test.sh: FAILED: $no_docker, and \"Test it\" needs a Docker engine (CI=$CI runs every test)" >&2
        exit 1
    fi
    echo "test.sh: $no_docker, and \"Test it\" needs a Docker engine: the Redis and image tests will be skipped" >&2
fi

# Debian packages: redis-server (to build a local Redis image when `redis:7` cannot be pulled,
# and run on the host with --tls-port by tests/redis_tls.rs: Debian's is built with TLS), and
# openssl, which makes that test's certificates; nghttp2-client (h2load, nghttp) and curl, the
# HTTP/2 clients of tests/h2c.rs; haproxy, the load balancer of bench/history.py (Debian puts it
# in /usr/sbin, which a user's PATH may lack).
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v openssl >/dev/null || need+=(openssl)
command -v redis-cli >/dev/null || need+=(redis-tools)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v curl >/dev/null || need+=(curl)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
if ((${#need[@]})); then
    echo "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ -z "$no_docker" ]; then
    scripts/build-redis-image.sh

    # The static binaries tests/docker.rs puts in its images (`runtime-from-host` stage), glibc
    # with +crt-static: the release one, exactly what the Dockerfile ships (its image is held to
    # 6 MB), and one with the test-hooks routes. Their own target dir, because RUSTFLAGS changes
    # would invalidate the shared one; the release binary is copied out of cargo's output path,
    # which the second build overwrites (the second costs about 1.5 min: only axum, herdsman and
    # the WebSocket crates differ, then the link).
    static_dir="${CARGO_TARGET_DIR:-target}-static"
    static_build() {
        RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$static_dir" \
            cargo build --release --locked --bin herdsman --target x86_64-unknown-linux-gnu "$@"
    }
    static_out="$(mkdir -p "$static_dir" && cd "$static_dir" && pwd)"
    static_build
    cp "$static_out/x86_64-unknown-linux-gnu/release/herdsman" "$static_out/herdsman-release"
    static_build --features test-hooks
    HERDSMAN_RELEASE_BIN="$static_out/herdsman-release"
    HERDSMAN_STATIC_BIN="$static_out/x86_64-unknown-linux-gnu/release/herdsman"
    export HERDSMAN_RELEASE_BIN HERDSMAN_STATIC_BIN
fi

cargo fmt --all -- --check
cargo clippy --all-targets --all-features -- -D warnings
cargo test --all-features --no-fail-fast

# The fuzz targets (fuzz/), each for HERDSMAN_FUZZ_SECONDS (default 10; 0 skips them), in the
# quick build (unoptimised, no sanitiser: a few minutes cold, where the sanitised build took 25).
# They need the nightly toolchain: without it they are skipped with a line, except under CI.
fuzz_seconds="${HERDSMAN_FUZZ_SECONDS:-10}"
if [ "$fuzz_seconds" = 0 ]; then
    echo "fuzz targets not run (HERDSMAN_FUZZ_SECONDS=0)"
elif rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    scripts/fuzz.sh --quick "$fuzz_seconds"
elif [ -n "$ci" ]; then
    echo "test.sh: FAILED: no nightly toolchain for the fuzz targets (CI=$CI runs every test)" >&2
    exit 1
else
    echo "no nightly toolchain: fuzz targets skipped (rustup toolchain install nightly)"
fi

# The benchmark harness in its smoke mode (short durations, one run of each measurement and
# chaos scenario), so that it cannot rot. Its figures are printed, not judged: a shared machine
# is too noisy for that; it fails when a measurement cannot be made. The chaos scenarios need
# the test-hooks routes: the static test binary has them, else build one.
bench/setup.sh
bench_bin="${HERDSMAN_STATIC_BIN:-}"
if [ -z "$bench_bin" ]; then
    cargo build --release --locked --features test-hooks --bin herdsman
    bench_bin="${CARGO_TARGET_DIR:-target}/release/herdsman"
fi

# The history checker (issue 24): its unit tests, then its short run against the same binary:
# 3 instances x 2 workers behind HAProxy, >= 2,000 operations under >= 10 link faults, checked
# against the consistency model in bench/history.py; non-zero on any anomaly. About 25 s: 20 s of
# load, then boot, the wait for every worker to be back on Redis and the final reads.
python3 -m unittest discover -s bench -p test_history.py
python3 bench/history.py --short --herdsman "$bench_bin"

python3 bench/run.py --smoke --require-herdsman --herdsman "$bench_bin"
