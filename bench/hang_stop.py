#!/usr/bin/env python3
"""A SIGSTOPped worker under load: how long until it is gone, and until its replacement serves.

Run with:
    python3 bench/hang_stop.py BINARY [BINARY...] [--runs 3] [--timeout 5]

For each run and binary (binaries interleaved, so drift hits all alike): start the master with
WEB_CONCURRENCY=2 and GUNICORN_TIMEOUT, put wrk load on /live (32 connections), SIGSTOP one
worker, then poll /proc every 5 ms until the stopped worker is gone (reaped, or a zombie) and
read the master's log for when its replacement said it was ready. Times are from the SIGSTOP;
the worker's last heartbeat came at most GUNICORN_TIMEOUT/4 (capped at 1 s) before it, so
"gone" minus the timeout is an upper bound on what the promise "gone within GUNICORN_TIMEOUT
+ 0.5 s of its last heartbeat" measures. The chaos bench's `hang` scenario blocks the runtime
instead (the worker can still print its diagnostics); this one is the case it cannot.
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import threading
import time
from datetime import datetime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return out


def state(pid: int):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def log_time(line: str) -> float:
    stamp = line.split()[0].rstrip("Z")
    return datetime.fromisoformat(stamp[:26]).timestamp()


def one_run(binary: str, timeout_s: float) -> dict:
    port = free_port()
    env = {"PORT": str(port), "HERDSMAN_HOST": "127.0.0.1", "WEB_CONCURRENCY": "2",
           "GUNICORN_TIMEOUT": str(timeout_s), "PATH": os.environ.get("PATH", "")}
    master = subprocess.Popen([binary], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list = []
    threading.Thread(target=lambda: lines.extend(iter(master.stderr.readline, "")), daemon=True).start()
    try:
        deadline = time.time() + 10
        while sum("ready in" in l for l in lines) < 2:
            if time.time() > deadline:
                raise RuntimeError("workers not ready:\n" + "".join(lines))
            time.sleep(0.02)
        wrk = subprocess.Popen(["wrk", "-t2", "-c32", f"-d{timeout_s + 6}s", f"http://127.0.0.1:{port}/live"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2)
        victim = children(master.pid)[0]
        stopped_at = time.time()
        os.kill(victim, signal.SIGSTOP)
        while state(victim) not in (None, "Z"):
            if time.time() - stopped_at > timeout_s + 10:
                raise RuntimeError("the stopped worker was never killed")
            time.sleep(0.005)
        gone = time.time() - stopped_at
        time.sleep(1)
        ready = [log_time(l) for l in lines if "ready in" in l and "[master]" in l]
        replacement = min((t for t in ready if t > stopped_at), default=None)
        wrk.wait()
        return {"gone_s": gone, "replacement_ready_s": None if replacement is None else replacement - stopped_at}
    finally:
        master.send_signal(signal.SIGQUIT)
        try:
            master.wait(5)
        except subprocess.TimeoutExpired:
            master.kill()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("binaries", nargs="+")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=5)
    args = parser.parse_args()
    results = {b: [] for b in args.binaries}
    for run in range(args.runs):
        for binary in args.binaries:
            r = one_run(binary, args.timeout)
            results[binary].append(r)
            print(f"run {run + 1} {binary}: gone {r['gone_s']:.2f} s, replacement ready "
                  f"{r['replacement_ready_s'] if r['replacement_ready_s'] is None else round(r['replacement_ready_s'], 2)} s"
                  " after SIGSTOP", flush=True)
    for binary, rs in results.items():
        gone = sorted(r["gone_s"] for r in rs)
        print(f"{binary}: gone after SIGSTOP, median {gone[len(gone) // 2]:.2f} s (min {gone[0]:.2f}, max {gone[-1]:.2f})")


if __name__ == "__main__":
    main()
