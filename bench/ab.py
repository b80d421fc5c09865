#!/usr/bin/env python3
"""Two herdsman builds side by side, interleaved: is B as fast as A?

    python3 bench/ab.py A_BINARY B_BINARY [--rounds 5] [--duration 5] [--json out.json] [--tls]

For a change that must not cost anything (a restructure, a release profile, metrics counting):
boot (spawn -> first 200 on /health, no Redis), wrk GET /live, wrk GET /cache/k served from a
real Redis, and wrk PUT /cache/k (the same 64-byte value again, 204: a cache write), each
measured on A then B then A then B... so that whatever else the machine does
(other builds, a noisy neighbour) hits both alike. It prints each figure's median per binary and
the ratio B/A; a ratio within the spread of the rounds is noise, not a difference. Beside
req/s and p99, `*_cpu_us` is the server's CPU time (user + kernel, master and workers, from
/proc) per answered request: it counts what req/s hides (wrk shares the cores) and what
callgrind's instruction count misses (the kernel, cache misses, code layout).

A build whose /cache needs a session (Authorization: Bearer) gets one: the script registers and
logs in a user through the binary itself (the Redis is real, so that works), and sends the token
with every wrk request. With --tls the servers reach that Redis over TLS (rediss://, a
self-signed certificate, REDIS_TLS_INSECURE=true), as with a managed Redis that requires it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from harness import (HEALTH_TOKEN, LOOPBACK, OUT, RedisServer, Server, cache_session, free_port, log, parse_wrk,
                     process_tree, wait_workers_serving)
from measure import time_to_first_200

CONNECTIONS = 32
VALUE = b"0123456789abcdef" * 4  # 64 bytes, as measure_cache uses
PUT_LUA = f"""
wrk.method = "PUT"
wrk.body = "{VALUE.decode()}"
"""
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def start(binary: Path, env: dict | None = None) -> Server:
    port = free_port()
    # Both builds get the token that opens /health's details (the newer one shows them only so).
    return Server(f"ab-{binary.parent.name}", [str(binary)],
                  {"PORT": port, "WEB_CONCURRENCY": 2, "HERDSMAN_HOST": LOOPBACK,
                   "HERDSMAN_METRICS_TOKEN": HEALTH_TOKEN, **(env or {})}, port)


def cpu_ticks(srv: Server) -> int:
    """User + system CPU time the server's processes (master and workers) have used, in ticks."""
    total = 0
    for pid in process_tree(srv.proc.pid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone since the listing
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total


def wrk(port: int, path: str, duration: int, headers: dict, script: Path | None = None) -> dict:
    """wrk GET `path`, or what `script` (a wrk Lua script) makes of the request; every answer
    must be 2xx (a PUT's is 204)."""
    argv = ["wrk", "--latency", "-t2", f"-c{CONNECTIONS}", f"-d{duration}s", "--timeout", "5s"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    if script:
        argv += ["-s", str(script)]
    out = subprocess.run([*argv, f"http://{LOOPBACK}:{port}{path}"], capture_output=True, text=True,
                         timeout=duration + 30, check=True).stdout
    res = parse_wrk(out)
    if not res["requests"] or res["non2xx"] or res["socket_errors"]:
        raise SystemExit(f"wrk on :{port}{path} failed or got errors:\n{out}")
    return res


def measured_wrk(srv: Server, path: str, duration: int, headers: dict, script: Path | None = None) -> dict:
    """wrk, plus the server's CPU time per answered request (µs): what one request costs the
    machine, user and kernel, less disturbed than req/s by what else the machine runs (wrk is on
    the same two cores, so req/s also counts wrk's share)."""
    before = cpu_ticks(srv)
    res = wrk(srv.port, path, duration, headers, script)
    res["cpu_us"] = (cpu_ticks(srv) - before) * 1e6 / TICKS_PER_SECOND / res["requests"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=5, help="wrk seconds per run")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--tls", action="store_true", help="the servers reach Redis over TLS (rediss://)")
    args = ap.parse_args()
    binaries = {"A": args.a.resolve(), "B": args.b.resolve()}
    figures = ("boot_ms", "live_rps", "live_p99_ms", "live_cpu_us", "cache_rps", "cache_p99_ms", "cache_cpu_us",
               "put_rps", "put_p99_ms", "put_cpu_us")
    samples: dict = {k: {figure: [] for figure in figures} for k in binaries}
    put_script = OUT / "ab-put.lua"
    OUT.mkdir(parents=True, exist_ok=True)
    put_script.write_text(PUT_LUA)
    with RedisServer(tls=args.tls) as redis:
        servers, headers = {}, {}
        for key, binary in binaries.items():
            srv = start(binary, {"REDIS_URL": redis.url, "REDIS_TLS_INSECURE": "true"}).__enter__()
            servers[key] = srv
            wait_workers_serving(srv, 2, redis=True)  # every worker: a login may land on either
            headers[key] = cache_session(srv.port, "k", VALUE)
            wrk(srv.port, "/live", 1, {})  # warm-up, not recorded
        try:
            for round_no in range(args.rounds):
                log(f"ab: round {round_no + 1}/{args.rounds}")
                for key, binary in binaries.items():
                    with start(binary) as fresh:
                        samples[key]["boot_ms"].append(time_to_first_200(fresh, "/health")["first_200_ms"])
                    for name, path, hdrs, script in (("live", "/live", {}, None),
                                                     ("cache", "/cache/k", headers[key], None),
                                                     ("put", "/cache/k", headers[key], put_script)):
                        res = measured_wrk(servers[key], path, args.duration, hdrs, script)
                        samples[key][f"{name}_rps"].append(res["rps"])
                        samples[key][f"{name}_p99_ms"].append(res["p99_ms"])
                        samples[key][f"{name}_cpu_us"].append(res["cpu_us"])
        finally:
            for srv in servers.values():
                srv.stop()
    result = {"binaries": {k: str(v) for k, v in binaries.items()}, "rounds": args.rounds,
              "wrk": f"-t2 -c{CONNECTIONS} -d{args.duration}s", "figures": {}}
    print(f"{'figure':<14} {'A median':>10} {'B median':>10} {'B/A':>6}   (A min-max | B min-max)")
    for figure in samples["A"]:
        a, b = samples["A"][figure], samples["B"][figure]
        ma, mb = statistics.median(a), statistics.median(b)
        result["figures"][figure] = {"A": a, "B": b, "ratio_b_over_a": mb / ma}
        print(f"{figure:<14} {ma:>10.1f} {mb:>10.1f} {mb / ma:>6.3f}   "
              f"({min(a):.1f}-{max(a):.1f} | {min(b):.1f}-{max(b):.1f})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
