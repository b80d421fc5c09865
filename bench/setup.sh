#!/usr/bin/env bash
# Installs what bench/run.py needs on a fresh Debian machine (idempotent):
# wrk, redis-server, redis-benchmark, haproxy (apt; haproxy is history.py's load balancer); the
# peer's venv and the hello-world build are done by run.py itself. Needs root (or sudo) only when a tool is missing.
set -euo pipefail
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-benchmark >/dev/null || missing+=(redis-tools)
# Debian installs haproxy in /usr/sbin, which a user's PATH may lack.
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
# A redis-server started by the Debian package is not used by the bench (it starts its own on a
# free port); leave it as it is.
python3 -c 'import sys; assert sys.version_info >= (3, 10), "python >= 3.10 needed"'
command -v cargo >/dev/null || { echo "cargo missing: needed to build bench/hello" >&2; exit 1; }
echo "bench setup ok"
