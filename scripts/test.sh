#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what it lacks, builds the local images
# the tests need when no registry can provide them, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: redis-server (to build a local Redis image when `redis:7` cannot be pulled).
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
if ((${#need[@]})); then
    echo "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ -x scripts/build-redis-image.sh ]; then
    scripts/build-redis-image.sh
fi

cargo fmt --all -- --check
cargo clippy --all-targets --all-features -- -D warnings
cargo test --all-features --no-fail-fast
