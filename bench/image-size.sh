#!/usr/bin/env bash
# Prints the size of herdsman's container image.
#
#   bench/image-size.sh            build the release image the way users do (`docker build .`,
#                                  needs registry access for rust:1-bookworm), print its size
#   bench/image-size.sh --host     no registry: build a static release binary on this host and
#                                  the Dockerfile's `runtime-from-host` stage from it
#   bench/image-size.sh --host BIN the same stage from a static binary built already
#   bench/image-size.sh IMAGE      print the size of an image that already exists
#
# Output: one line, `herdsman image IMAGE: BYTES bytes (X.XX MB)`, and exit 1 above 8 MB.
set -euo pipefail
cd "$(dirname "$0")/.."

limit=$((8 * 1000 * 1000))
tag="herdsman:size"

case "${1:-}" in
"")
    docker build --quiet --tag "$tag" . >/dev/null
    image="$tag"
    ;;
--host)
    binary="${2:-}"
    if [ -z "$binary" ]; then
        # Its own target dir: the tests' static build (scripts/test.sh) has the test hooks.
        target=x86_64-unknown-linux-gnu
        static_dir="${CARGO_TARGET_DIR:-target}-static-release"
        RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$static_dir" \
            cargo build --quiet --release --locked --bin herdsman --target "$target"
        binary="$static_dir/$target/release/herdsman"
    fi
    stage="deploy/docker/host/size-$$"
    trap 'rm -rf "$stage"' EXIT
    mkdir -p "$stage"
    cp "$binary" "$stage/herdsman"
    docker build --quiet --target runtime-from-host --build-arg "HOST_ROOTFS=$stage" --tag "$tag" . >/dev/null
    image="$tag"
    ;;
*)
    image="$1"
    ;;
esac

bytes="$(docker image inspect --format '{{.Size}}' "$image")"
awk -v image="$image" -v b="$bytes" 'BEGIN { printf "herdsman image %s: %d bytes (%.2f MB)\n", image, b, b / 1e6 }'
[ "$bytes" -le "$limit" ] || { echo "over the 8 MB bound" >&2; exit 1; }
