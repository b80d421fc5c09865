#!/usr/bin/env bash
# CPU instructions (valgrind --tool=callgrind) of herdsman builds, immune to the machine's load:
# for each binary, one worker run twice under callgrind, once idle and once serving N keep-alive
# GET /live; (serving - idle) / N is the cost of one request. The idle run's worker total is its
# boot, dominated by the bcrypt cost-10 pre-warm hash, so it also shows what a profile does to
# bcrypt.
#
#   bench/callgrind_builds.sh BINARY... [-- N]      (N = 2000 requests by default)
#
# Prints one line per binary: `BINARY: idle worker Ir, Ir per /live`.
set -euo pipefail
bins=()
n=2000
while (($#)); do
    if [ "$1" = "--" ]; then n="$2"; shift 2; else bins+=("$1"); shift; fi
done
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Total instructions of the worker (the callgrind file that is not the master's).
worker_ir() {
    local dir="$1" master="$2"
    for f in "$dir"/callgrind.out.*; do
        [ "$f" = "$dir/callgrind.out.$master" ] && continue
        grep -m1 '^summary:' "$f" | awk '{print $2}'
    done | sort -n | tail -1
}

run() {
    local bin="$1" requests="$2" dir="$work/$RANDOM"
    mkdir -p "$dir"
    local port
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    env -i PORT="$port" HERDSMAN_HOST=127.0.0.1 WEB_CONCURRENCY=1 GUNICORN_TIMEOUT=600 \
        HERDSMAN_BOOT_TIMEOUT=600 LOG_LEVEL=warn \
        valgrind --tool=callgrind --trace-children=yes --callgrind-out-file="$dir/callgrind.out.%p" \
        "$bin" 2>"$dir/log" &
    local master=$!
    python3 - "$port" "$requests" <<'PY'
import http.client, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
deadline = time.time() + 300
while True:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request("GET", "/live"); c.getresponse().read()
        break
    except OSError:
        if time.time() > deadline: sys.exit("no /live within 300 s")
        time.sleep(0.5)
# Let the bcrypt pre-warm finish in both runs alike.
time.sleep(60)
for _ in range(n):
    c.request("GET", "/live"); r = c.getresponse(); r.read()
    assert r.status == 200
PY
    kill -TERM "$master"
    wait "$master" || true
    worker_ir "$dir" "$master"
}

for bin in "${bins[@]}"; do
    idle="$(run "$bin" 0)"
    busy="$(run "$bin" "$n")"
    echo "$bin: idle worker $idle Ir, $(( (busy - idle) / n )) Ir per /live"
done
