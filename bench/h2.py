#!/usr/bin/env python3
"""GET /live over HTTP/1.1 (wrk) and cleartext HTTP/2 (h2load) on the same herdsman, alternated:

    python3 bench/h2.py BINARY [--rounds 3] [--duration 5]

One server (WEB_CONCURRENCY=2, no Redis) serves three loads in turn, round after round, so that
whatever else the machine does hits all three alike: wrk with 32 keep-alive HTTP/1.1
connections; h2load with 32 h2c connections of one stream each (the same concurrency, one
request at a time per connection); h2load with 4 connections of 32 streams each (what an HTTP/2
proxy such as Cloud Run's sends: few connections, many streams). Prints each load's median
requests/s, its range, and its ratio to HTTP/1.1.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
from pathlib import Path

from harness import LOOPBACK, Server, free_port, parse_wrk

CONNECTIONS = 32


def wrk(url: str, duration: int) -> float:
    out = subprocess.run(["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{duration}s", url], capture_output=True,
                         text=True, timeout=duration + 30, check=True).stdout
    res = parse_wrk(out)
    if not res["rps"] or res["non2xx"] or res["socket_errors"]:
        raise SystemExit(f"wrk failed or saw errors:\n{out}")
    return res["rps"]


def h2load(url: str, duration: int, connections: int, streams: int) -> float:
    out = subprocess.run(["h2load", "-t2", f"-c{connections}", f"-m{streams}", f"-D{duration}", url],
                         capture_output=True, text=True, timeout=duration + 30, check=True).stdout
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored",
                     out)
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    if not done or not rps or int(done.group(3)) or int(done.group(4)):
        raise SystemExit(f"h2load failed or saw errors:\n{out}")
    return float(rps.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    args = ap.parse_args()
    port = free_port()
    url = f"http://{LOOPBACK}:{port}/live"
    loads = {
        f"HTTP/1.1, wrk, {CONNECTIONS} connections": lambda: wrk(url, args.duration),
        f"h2c, h2load, {CONNECTIONS} connections x 1 stream": lambda: h2load(url, args.duration, CONNECTIONS, 1),
        "h2c, h2load, 4 connections x 32 streams": lambda: h2load(url, args.duration, 4, 32),
    }
    figures: dict[str, list[float]] = {name: [] for name in loads}
    env = {"PORT": port, "WEB_CONCURRENCY": 2, "HERDSMAN_HOST": LOOPBACK}
    with Server("h2-bench", [str(args.binary.resolve())], env, port) as server:
        server.wait_http("/live")
        for _ in range(args.rounds):
            for name, run in loads.items():
                figures[name].append(run())
    baseline = statistics.median(next(iter(figures.values())))
    print(f"{'load':<45} {'req/s (median)':>15} {'min-max':>20} {'vs HTTP/1.1':>12}")
    for name, values in figures.items():
        median = statistics.median(values)
        print(f"{name:<45} {median:>15,.0f} {min(values):>9,.0f}-{max(values):<10,.0f} {median / baseline:>11.2f}x")


if __name__ == "__main__":
    main()
