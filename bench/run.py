#!/usr/bin/env python3
"""herdsman benchmark harness: herdsman vs the stack it replaces (gunicorn + uvicorn + FastAPI)
vs a bare one-process axum hello-world (the ceiling).

    python3 bench/run.py --markdown BENCHMARKS.md   # everything, real durations: the report
    python3 bench/run.py seed                       # the seed's blocking warm-ups (~3 min)
    python3 bench/run.py live cache                 # some measurements
    python3 bench/run.py chaos --chaos hang,redis   # some chaos scenarios (bench/chaos.py)
    python3 bench/run.py history                    # the history checker's long run (history.py)
    python3 bench/run.py --smoke                    # everything, short and once (CI, ~5 min)
    python3 bench/run.py --herdsman /path/to/herdsman

This file is the entry (arguments, the order of things); the measurements are in measure.py and
chaos.py, the tables, markdown and plots in report.py and chaos_report.py, what they all use in
harness.py. Only the standard library at the top level; the peer (and matplotlib for plots) live in
bench/.venv, which this script creates and fills from bench/peer/requirements.txt (idempotent).
Every figure printed or written comes from a measurement made in the same run. All traffic goes
to 127.0.0.1; every load loop is bounded in time. Every process started is torn down on exit,
error or not (each runs in its own process group).
"""


from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import chaos
import report
from harness import (
    DEFAULT_HERDSMAN,
    LOGS,
    OUT,
    BenchError,
    Ctx,
    ensure_hello,
    ensure_venv,
    log,
    require_tools,
)
from measure import MEASURE, cpu_snapshot, foreign_cpu, machine_info, missing_figures, wait_for_quiet

MEASUREMENTS = ("seed", "boot", "live", "cache", "login", "memory", "image", "chaos", "abuse", "history")
# scripts/test.sh runs history.py --short itself, so --smoke leaves it out unless asked for.
NOT_IN_SMOKE = ("history",)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="*", help=f"measurements: {', '.join(MEASUREMENTS)} "
                    "(default: all)")
    ap.add_argument("--smoke", action="store_true", help="short durations, 1 run: CI, ~5 min")
    ap.add_argument("--herdsman", type=Path, default=DEFAULT_HERDSMAN,
                    help=f"herdsman binary (default {DEFAULT_HERDSMAN}, or $HERDSMAN_BIN)")
    ap.add_argument("--require-herdsman", action="store_true",
                    help="fail (instead of skipping herdsman) when the binary is missing")
    ap.add_argument("--duration", type=float, default=10, help="wrk seconds per run (10)")
    ap.add_argument("--runs", type=int, default=3, help="runs per server for wrk figures (3)")
    ap.add_argument("--boot-runs", type=int, default=5, help="spawns per boot variant (5)")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    ap.add_argument("--chaos-runs", type=int, default=3, help="runs per chaos scenario (3)")
    ap.add_argument("--chaos", type=lambda v: [x for x in v.split(",") if x], default=[],
                    metavar="A,B", help=f"chaos scenarios ({','.join(chaos.SCENARIOS)}; default all)")
    ap.add_argument("--bcrypt-cost", type=int, default=10, help="BCRYPT_COST for login (10)")
    ap.add_argument("--quiet-wait", type=float, default=0, metavar="SECONDS",
                    help="before each measurement, wait up to this long for other processes to "
                    "leave the CPU (< 10 %% of all cores); the CPU they used anyway is reported")
    ap.add_argument("--markdown", type=Path, help="also write a markdown report here")
    ap.add_argument("--json", type=Path, default=OUT / "results.json")
    args = ap.parse_args()
    what = args.what or [m for m in MEASUREMENTS if not (args.smoke and m in NOT_IN_SMOKE)]
    unknown = [w for w in what if w not in MEASUREMENTS]
    if unknown:
        ap.error(f"unknown measurement(s): {unknown}")
    unknown = [c for c in args.chaos if c not in chaos.SCENARIOS]
    if unknown:
        ap.error(f"unknown chaos scenario(s): {unknown}")

    # SIGTERM (CI timeout, `timeout`) unwinds like Ctrl-C, so every server is torn down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ctx = Ctx(args)
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(LOGS, ignore_errors=True)  # logs of this run only
    t_start = time.monotonic()
    try:
        require_tools()
        ensure_venv()
        ctx.hello = ensure_hello()
    except (BenchError, subprocess.CalledProcessError) as exc:
        log(f"FAIL setup: {exc}")
        return 1
    if args.herdsman.is_file() and os.access(args.herdsman, os.X_OK):
        # Measure a snapshot: a `cargo build` in the herdsman repo during the run must not
        # swap the binary between two spawns.
        src = args.herdsman.resolve()
        ctx.herdsman_source = src
        ctx.herdsman = OUT / "herdsman-under-test"
        shutil.copy2(src, ctx.herdsman)
    else:
        msg = (f"herdsman binary not found at {args.herdsman} (run `cargo build --release` in the "
               "herdsman repo, or pass --herdsman PATH)")
        if args.require_herdsman:
            log(f"FAIL {msg}")
            return 1
        log(f"SKIP herdsman: {msg}; measuring the peer and the hello-world only")
        ctx.skipped.append(f"herdsman ({msg})")

    for name in what:
        log(f"measuring {name}")
        if args.quiet_wait > 0:
            wait_for_quiet(args.quiet_wait)
        t0 = time.monotonic()
        cpu0 = cpu_snapshot()
        try:
            fn = MEASURE[name]
            ctx.results[name] = fn(ctx)
            if name != "image":  # a size, not a time: other processes do not change it
                ctx.noise[name] = foreign_cpu(cpu0, cpu_snapshot())
            holes = missing_figures(ctx.results[name])
            if holes:
                raise BenchError(f"no figure for {', '.join(holes[:5])}")
            log(f"{name} done in {time.monotonic() - t0:.1f}s")
        except (BenchError, subprocess.SubprocessError, OSError) as exc:
            ctx.failures.append(f"{name}: {exc}".splitlines()[0])
            log(f"FAIL {name}: {exc}")

    ctx.failures += report.draw_plots(ctx.results)
    meta = machine_info(ctx)
    doc = {"meta": meta, "skipped": ctx.skipped, "failures": ctx.failures, "noise": ctx.noise,
           **ctx.results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    report.print_tables(ctx.results)
    report.print_noise(ctx.noise)
    if args.markdown:
        report.write_markdown(args.markdown, ctx, meta, ctx.results)
        log(f"wrote {args.markdown}")
    log(f"wrote {args.json} in {time.monotonic() - t_start:.0f}s total")
    if ctx.failures:
        log(f"{len(ctx.failures)} measurement(s) failed: " + " | ".join(ctx.failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
