#!/usr/bin/env python3
"""p99 through a SIGHUP rolling restart against steady state, under the same saturating wrk load.

Run with:
    python3 bench/hup_latency.py BINARY [--rounds 7] [--seconds 3] [--variant NAME:K=V,K=V ...]

Issue 12's point 4 asks that p99 during a rolling restart stay within 2x the steady-state p99
under the same load (wrk, 32 connections, 2 workers). Each round, for each variant in turn (so
that drift on a shared machine hits all alike): start the master, wait for both workers, run wrk
for SECONDS (steady), then run it again and send SIGHUP 0.3 s in (restart). Both windows are the
same length, so a restart that spoils a few hundred milliseconds shows in the second p99 as it
would in a platform's latency graph. The restart must complete inside the window (checked: every
worker pid new before wrk ends) and lose nothing (wrk's errors and non-2xx are reported).

A variant is a name and the environment it adds, e.g. `cost4:BCRYPT_COST=4`: compare what a
setting changes without a second build. Without --variant, one variant `default`.
Medians over rounds; the per-round ratio restart/steady is the figure (both from the same
minute of the machine's life).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import threading
import time
from pathlib import Path

from harness import LOOPBACK, Server, children, free_port, log, wait_workers_serving, wrk

CONNECTIONS = 32
WORKERS = 2
HUP_AFTER_S = 0.3


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, assignments = text.partition(":")
    env = {}
    for pair in filter(None, assignments.split(",")):
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--variant {text!r}: {pair!r} is not KEY=VALUE")
        env[key] = value
    return name, env


def one_round(binary: Path, env: dict, seconds: int) -> dict:
    port = free_port()
    srv_env = {"PORT": port, "WEB_CONCURRENCY": WORKERS, "HERDSMAN_HOST": LOOPBACK, **env}
    with Server(f"hup-{port}", [str(binary)], srv_env, port) as srv:
        wait_workers_serving(srv, WORKERS)
        wrk(port, "/live", CONNECTIONS, 2, 1)  # warm-up, not recorded
        steady = wrk(port, "/live", CONNECTIONS, 2, seconds)
        before = children(srv.proc.pid)
        done_at: dict = {}

        def hup_and_watch() -> None:
            time.sleep(HUP_AFTER_S)
            t_hup = time.monotonic()
            os.kill(srv.proc.pid, signal.SIGHUP)
            while time.monotonic() < t_hup + seconds + 5:
                now = children(srv.proc.pid)
                if len(now) == WORKERS and not now & before:
                    done_at["ms"] = (time.monotonic() - t_hup) * 1e3
                    return
                time.sleep(0.005)

        watcher = threading.Thread(target=hup_and_watch, daemon=True)
        watcher.start()
        restart = wrk(port, "/live", CONNECTIONS, 2, seconds)
        watcher.join()
        srv.check_alive()
    return {
        "steady_p99": steady["p99_ms"],
        "restart_p99": restart["p99_ms"],
        "ratio": restart["p99_ms"] / steady["p99_ms"],
        "steady_rps": steady["rps"],
        "restart_rps": restart["rps"],
        "errors": restart["non2xx"] + restart["socket_errors"] + steady["non2xx"] + steady["socket_errors"],
        "restart_ms": done_at.get("ms"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary", type=Path)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=int, default=3, help="wrk seconds per window")
    ap.add_argument("--variant", action="append", default=[], help="NAME:K=V,K=V (repeatable)")
    args = ap.parse_args()
    variants = dict(parse_variant(v) for v in args.variant) or {"default": {}}
    rows: dict = {name: [] for name in variants}
    for n in range(args.rounds):
        for name, env in variants.items():
            r = one_round(args.binary.resolve(), env, args.seconds)
            rows[name].append(r)
            restart = "not done in the window" if r["restart_ms"] is None else f"{r['restart_ms']:.0f} ms"
            log(f"round {n + 1} {name}: steady p99 {r['steady_p99']:.2f} ms, restart p99 "
                f"{r['restart_p99']:.2f} ms (x{r['ratio']:.2f}), restart took {restart}, errors {r['errors']}")
    print(f"\n{'variant':<12} {'steady p99':>11} {'restart p99':>12} {'ratio':>7} {'ratio range':>13} "
          f"{'steady rps':>11} {'restart rps':>12} {'restart':>9} {'errors':>7}")
    for name, rs in rows.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("steady_p99", "restart_p99", "ratio",
                                                               "steady_rps", "restart_rps")}
        done = [r["restart_ms"] for r in rs if r["restart_ms"] is not None]
        ratios = [r["ratio"] for r in rs]
        print(f"{name:<12} {med['steady_p99']:>8.2f} ms {med['restart_p99']:>9.2f} ms {med['ratio']:>7.2f} "
              f"{min(ratios):>6.2f}–{max(ratios):<6.2f} {med['steady_rps']:>11,.0f} {med['restart_rps']:>12,.0f} "
              f"{(statistics.median(done) if done else float('nan')):>6.0f} ms {sum(r['errors'] for r in rs):>7}")
        if len(done) < len(rs):
            print(f"  {name}: {len(rs) - len(done)} restart(s) did not finish inside the window")


if __name__ == "__main__":
    main()
