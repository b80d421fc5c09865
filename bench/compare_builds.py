#!/usr/bin/env python3
"""Two herdsman binaries (two release profiles of the same source) compared on a shared machine:
rounds alternate A and B, so that a neighbour's load lands on both alike, and the ratios B/A are
taken per round before their median.

    python3 bench/compare_builds.py BEFORE AFTER [--rounds 7] [--duration 5]

Per round and binary: boot (spawn -> first 200 on /live, WEB_CONCURRENCY=2, no Redis), then wrk
on /live (1 thread, 16 keep-alive connections, --duration s). Prints one JSON object: the file
sizes, the medians and min-max of each figure, and the median of the per-round ratios.
Everything listens on 127.0.0.1 and every process is killed on the way out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def live_ok(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"GET /live HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            return s.recv(16).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def start(binary: Path, port: int) -> subprocess.Popen:
    env = {"PORT": str(port), "HERDSMAN_HOST": "127.0.0.1", "WEB_CONCURRENCY": "2", "LOG_LEVEL": "warn"}
    return subprocess.Popen([str(binary)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def boot_ms(binary: Path) -> float:
    port = free_port()
    started = time.perf_counter()
    proc = start(binary, port)
    try:
        while not live_ok(port):
            if time.perf_counter() - started > 10:
                raise RuntimeError(f"{binary} did not answer /live within 10 s")
            time.sleep(0.001)
        return (time.perf_counter() - started) * 1000
    finally:
        stop(proc)


def wrk_live(binary: Path, duration: float) -> dict:
    port = free_port()
    proc = start(binary, port)
    try:
        deadline = time.perf_counter() + 10
        while not live_ok(port):
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{binary} did not answer /live within 10 s")
            time.sleep(0.005)
        out = subprocess.run(["wrk", "-t1", "-c16", f"-d{duration:g}s", "--latency", f"http://127.0.0.1:{port}/live"],
                             capture_output=True, text=True, timeout=duration + 30).stdout
    finally:
        stop(proc)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    return {"rps": rps, "p99_ms": float(p99.group(1)) * scale}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--duration", type=float, default=5)
    args = ap.parse_args()
    figures = {"a": {"boot_ms": [], "rps": [], "p99_ms": []}, "b": {"boot_ms": [], "rps": [], "p99_ms": []}}
    ratios = {"boot_ms": [], "rps": [], "p99_ms": []}
    for round_ in range(args.rounds):
        # Alternate which goes first, too.
        order = ("a", "b") if round_ % 2 == 0 else ("b", "a")
        this_round = {}
        for name in order:
            binary = getattr(args, name)
            boot = boot_ms(binary)
            live = wrk_live(binary, args.duration)
            this_round[name] = {"boot_ms": boot, **live}
            for key, value in this_round[name].items():
                figures[name][key].append(value)
        for key in ratios:
            ratios[key].append(this_round["b"][key] / this_round["a"][key])
        print(f"round {round_ + 1}: {json.dumps(this_round)}", file=sys.stderr)
    result = {
        "a": {"binary": str(args.a), "bytes": args.a.stat().st_size,
              **{k: spread(v) for k, v in figures["a"].items()}},
        "b": {"binary": str(args.b), "bytes": args.b.stat().st_size,
              **{k: spread(v) for k, v in figures["b"].items()}},
        "median_ratio_b_over_a": {k: statistics.median(v) for k, v in ratios.items()},
        "rounds": args.rounds,
        "duration_s": args.duration,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
