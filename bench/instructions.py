#!/usr/bin/env python3
"""Instructions one request costs a herdsman worker, counted by callgrind: a figure no other
process on the machine can disturb (wall-clock figures on a shared machine can).

    python3 bench/instructions.py BINARY [BINARY ...] [--path /live] [--requests 2000] [--redis]
                                  [--put] [--bcrypt-cost 4] [--h2c] [--tls]

For each binary: a master with one worker (WEB_CONCURRENCY=1) runs under
`valgrind --tool=callgrind --trace-children=yes`, twice: once idle, once answering N `GET path`
on one keep-alive connection (BCRYPT_COST=4, so that registering a user costs little). Both
runs boot, finish warming up and stop the same way, so the difference
between the worker's totals, divided by N, is the cost of one request. With --redis, a real
redis-server backs the cache and `/cache/k` holds a 64-byte value (a cached GET is then a Redis
round trip); a build whose /cache needs a session gets one (register + login, Redis is real).
With --put each request is a `PUT path` of that 64-byte value instead (204): a cache write.

With --redis --tls the Redis is reached over TLS (rediss://, a self-signed certificate, so
REDIS_TLS_INSECURE=true): what a cached GET costs with a managed Redis that requires TLS.
With --h2c the requests are cleartext HTTP/2 instead (h2load, one connection, one stream at a
time), the path an HTTP/2 front end such as Cloud Run's end-to-end HTTP/2 takes.

The idle run is the worker's boot, most of it the bcrypt pre-warm (one hash at BCRYPT_COST):
`--bcrypt-cost 10 --requests 0` prints it at the default cost, which is what a login costs, so
that is how to compare two builds' bcrypt.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import LOOPBACK, RedisServer, cache_session, free_port, http_json, read_response  # noqa: E402

VALUE = b"0123456789abcdef" * 4


def wait_health(port: int, redis: bool, timeout: float = 120.0) -> None:
    """Until /health is 200 with every warm-up task settled (a run stopped while bcrypt still
    pre-warms would count fewer instructions than one stopped after)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, body = http_json(port, "GET", "/health", timeout=5.0)
            if body == {"status": "ok"}:
                # A build that shows /health's details only with the metrics token, which is not
                # set here (it would add the route labels to every request counted): readiness,
                # and with Redis the session cache_session opens, say what the details said.
                if http_json(port, "GET", "/ready", timeout=5.0)[0] == 200:
                    return
                time.sleep(0.2)
                continue
            checks = body.get("checks", {}) if isinstance(body, dict) else {}
            settled = all(c.get("state") not in ("pending", "running") for c in checks.values())
            if status == 200 and settled and (not redis or '"up"' in json.dumps(body)):
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"no healthy /health on :{port} within {timeout}s")


def keepalive_requests(port: int, path: str, n: int, headers: dict, put: bool = False) -> None:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    method, body, expected = ("PUT", VALUE, 204) if put else ("GET", b"", 200)
    length = f"Content-Length: {len(body)}\r\n" if put else ""
    req = f"{method} {path} HTTP/1.1\r\nHost: {LOOPBACK}\r\n{extra}{length}\r\n".encode() + body
    with socket.create_connection((LOOPBACK, port), timeout=30) as s:
        for _ in range(n):
            s.sendall(req)
            status, _, _ = read_response(s)
            if status != expected:
                raise SystemExit(f"{method} {path} answered {status}")


def h2c_gets(port: int, path: str, n: int, headers: dict) -> None:
    argv = ["h2load", "-n", str(n), "-c", "1", "-m", "1"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    out = subprocess.run([*argv, f"http://{LOOPBACK}:{port}{path}"], capture_output=True, text=True,
                         timeout=600, check=True).stdout
    if not re.search(rf"status codes: {n} 2xx", out):
        raise SystemExit(f"h2load {path}: not every request answered 2xx:\n{out}")


def worker_instructions(binary: Path, env: dict, path: str, n: int, redis: bool, bcrypt_cost: int,
                        h2c: bool = False, put: bool = False) -> int:
    """Total instructions of the worker process of one run (the largest callgrind file that is
    not the master's)."""
    with tempfile.TemporaryDirectory() as out:
        port = free_port()
        argv = ["valgrind", "--tool=callgrind", "--trace-children=yes",
                f"--callgrind-out-file={out}/callgrind.%p", str(binary)]
        proc = subprocess.Popen(argv, env={**os.environ, **env, "PORT": str(port), "WEB_CONCURRENCY": "1",
                                           "HERDSMAN_HOST": LOOPBACK, "HERDSMAN_BOOT_TIMEOUT": "120",
                                           "BCRYPT_COST": str(bcrypt_cost),
                                           "GUNICORN_TIMEOUT": "120"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_health(port, redis)
            headers = cache_session(port, "k", VALUE) if redis else {}
            if n and h2c:
                h2c_gets(port, path, n, headers)
            elif n:
                keepalive_requests(port, path, n, headers, put)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        totals = {}
        for f in Path(out).glob("callgrind.*"):
            m = re.search(r"^totals:\s+(\d+)", f.read_text(errors="replace"), re.M)
            if m:
                totals[f.name] = int(m.group(1))
        master = f"callgrind.{proc.pid}"
        workers = [v for k, v in totals.items() if k != master]
        if not workers:
            raise SystemExit(f"no worker callgrind output in {sorted(totals)}")
        return max(workers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binaries", nargs="+", type=Path)
    ap.add_argument("--path", default="/live")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--redis", action="store_true", help="a real Redis behind the cache")
    ap.add_argument("--bcrypt-cost", type=int, default=4, help="BCRYPT_COST of both runs (the pre-warm's hash)")
    ap.add_argument("--h2c", action="store_true", help="requests over cleartext HTTP/2 (h2load)")
    ap.add_argument("--tls", action="store_true", help="with --redis: Redis over TLS (rediss://)")
    ap.add_argument("--put", action="store_true", help="each request a PUT of a 64-byte value (204)")
    args = ap.parse_args()
    if args.put and args.h2c:
        ap.error("--put is HTTP/1.1 only")
    print(f"{'binary':<50} {'idle':>14} {f'{args.requests} requests':>16} {'per request':>12}")
    for binary in args.binaries:
        def run(n: int) -> int:
            if not args.redis:
                return worker_instructions(binary.resolve(), {}, args.path, n, False, args.bcrypt_cost, args.h2c,
                                           args.put)
            with RedisServer(tls=args.tls) as redis:
                env = {"REDIS_URL": redis.url, "REDIS_TLS_INSECURE": "true"}
                return worker_instructions(binary.resolve(), env, args.path, n, True, args.bcrypt_cost, args.h2c,
                                           args.put)
        idle = run(0)
        if not args.requests:
            print(f"{str(binary):<50} {idle:>14,} {'-':>16} {'-':>12}")
            continue
        busy = run(args.requests)
        print(f"{str(binary):<50} {idle:>14,} {busy:>16,} {(busy - idle) / args.requests:>12,.0f}")


if __name__ == "__main__":
    main()
