#!/usr/bin/env python3
"""CPU instructions one `GET /live` costs a worker, counted by callgrind (no other process can
disturb an instruction count, unlike a wall-clock figure on a shared machine).

Run with:
    python3 bench/callgrind_live.py BINARY [BINARY...] [--requests 2000] [--env NAME=VALUE ...]

For each binary: run the master under `valgrind --tool=callgrind --trace-children=yes` with
WEB_CONCURRENCY=1, once idle and once answering REQUESTS `GET /live` on one keep-alive
connection, stop it with SIGTERM and read the worker's instruction total. The difference
divided by REQUESTS is the cost of one request; boot, warm-up and drain are in both runs and
cancel out. BCRYPT_COST=4 and a long STARTUP_OPERATION_TIMEOUT keep the bcrypt warm-up small
and finished in both runs (under valgrind a cost-10 hash outlives the default 2 s timeout, and
how much of it ran would differ between the runs).
"""

import argparse
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_instructions(binary: str, requests: int, extra_env: dict) -> int:
    out = tempfile.mkdtemp(prefix="callgrind-")
    port = free_port()
    env = {"PORT": str(port), "HERDSMAN_HOST": "127.0.0.1", "WEB_CONCURRENCY": "1",
           "GUNICORN_TIMEOUT": "120", "HERDSMAN_BOOT_TIMEOUT": "120", "BCRYPT_COST": "4",
           "STARTUP_OPERATION_TIMEOUT": "120", "PATH": os.environ.get("PATH", ""), **extra_env}
    master = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--trace-children=yes", f"--callgrind-out-file={out}/cg.%p", binary],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=60)
                conn.sendall(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
                if conn.recv(4096).startswith(b"HTTP/1.1 200"):
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("the worker never answered")
            time.sleep(0.5)
        # The probe above is one request in both runs; these are the counted ones.
        request = b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n"
        for _ in range(requests):
            conn.sendall(request)
            if not conn.recv(4096).startswith(b"HTTP/1.1 200"):
                raise RuntimeError("a request failed")
        conn.close()
        time.sleep(1)
    finally:
        master.send_signal(signal.SIGTERM)
        master.wait(120)
    totals = []
    for path in glob.glob(f"{out}/cg.*"):
        with open(path, errors="replace") as f:
            text = f.read()
        if "__worker" not in text.split("\n", 20)[0:20].__str__():
            continue
        for line in text.splitlines():
            if line.startswith("summary:") or line.startswith("totals:"):
                totals.append(int(line.split()[1]))
                break
    shutil.rmtree(out)
    if len(totals) != 1:
        raise RuntimeError(f"expected one worker profile, found {len(totals)}")
    return totals[0]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("binaries", nargs="+")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for every binary")
    args = parser.parse_args()
    extra_env = dict(pair.split("=", 1) for pair in args.env)
    print("| binary | worker instructions, 0 requests | %d requests | per `/live` request |" % args.requests)
    print("|---|---|---|---|")
    for binary in args.binaries:
        idle = worker_instructions(binary, 0, extra_env)
        busy = worker_instructions(binary, args.requests, extra_env)
        print(f"| {binary} | {idle:,} | {busy:,} | {(busy - idle) / args.requests:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
