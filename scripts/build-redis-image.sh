#!/usr/bin/env bash
# Make sure the Redis image the integration tests use exists locally.
#
# Elsewhere `redis:7` is simply pulled from a registry. On machines that
# cannot reach any container registry, this script builds a stand-in image
# with the same name from the host's Debian `redis-server`: a tiny root
# filesystem holding the binary, the shared libraries `ldd` lists, the dynamic
# loader, /tmp, /data and an /etc/passwd line, then `docker import`ed.
#
# Usage: scripts/build-redis-image.sh        (image: $HERDSMAN_REDIS_IMAGE, default redis:7)
# Idempotent: does nothing when the image already exists. Prints one line.
set -euo pipefail

image="${HERDSMAN_REDIS_IMAGE:-redis:7}"

if docker image inspect "$image" >/dev/null 2>&1; then
    echo "build-redis-image: $image already present, nothing to do"
    exit 0
fi

if ! command -v redis-server >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq redis-server >/dev/null
fi

# Debian ships redis-server as a symlink to redis-check-rdb; the binary picks
# its personality from argv[0], so copy the real file under the server's name.
server="$(readlink -f "$(command -v redis-server)")"

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT

mkdir -p "$root/usr/local/bin" "$root/tmp" "$root/data" "$root/etc"
chmod 1777 "$root/tmp"
cp "$server" "$root/usr/local/bin/redis-server"

# Every library ldd resolves ("name => /path (addr)") plus the loader
# (a bare "/lib64/ld-linux-x86-64.so.2 (addr)" line), copied at the same path.
ldd "$server" | awk '/=> \//{print $3} /^[[:space:]]*\//{print $1}' | sort -u |
    while read -r lib; do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done

echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
echo 'root:x:0:' >"$root/etc/group"

tar -C "$root" -c . | docker import \
    --change 'CMD ["redis-server","--protected-mode","no","--save","","--appendonly","no"]' \
    --change 'EXPOSE 6379' \
    --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' \
    --change 'WORKDIR /data' \
    - "$image" >/dev/null

echo "build-redis-image: built $image from host redis-server $(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')"
