"""Rendering of the chaos suite's results (bench/chaos.py's measure_chaos): the latency-over-time
plots, the table, the markdown around the plots. Imports the measurement side's constants,
never the other way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from chaos import WS_CLIENTS
from harness import BENCH, OUT, VPY, VPY_PROGRAMS, BenchError, fmt, fmt_spread

WS_SCENARIOS = ("ws-hup",)

PLOTS = OUT / "plots"


def plot_timelines(data: Path, path: Path) -> None:
    """Draw the timelines measure_chaos wrote to `data` into the PNG `path`
    (bench/vpy/plot_timeline.py, with the venv's matplotlib)."""
    r = subprocess.run([str(VPY), str(VPY_PROGRAMS / "plot_timeline.py"), str(data), str(path)],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise BenchError(f"plot failed: {r.stderr[-1000:]}")


def plot(result: dict) -> None:
    """One plot per scenario in bench/out/plots; its path in the scenario's "plot"."""
    PLOTS.mkdir(parents=True, exist_ok=True)
    for name, sc in result["scenarios"].items():
        png = PLOTS / f"chaos-{name}.png"
        plot_timelines(Path(sc["timeline"]), png)
        sc["plot"] = str(png)


def markdown_plots(result: dict, path: Path) -> list[str]:
    """Copy the chaos plots to bench/plots (committed with the report); markdown that shows them."""
    plots = BENCH / "plots"
    plots.mkdir(exist_ok=True)
    lines = []
    for name, sc in result["scenarios"].items():
        if "plot" not in sc:
            continue  # drawing it failed: the run's failures say so
        png = plots / Path(sc["plot"]).name
        shutil.copy2(sc["plot"], png)
        rel = os.path.relpath(png, path.resolve().parent)
        lines += [f"### {name}: {sc['title']}", "", f"![{name}]({rel})", ""]
    return lines


def table(result: dict) -> tuple[str, list[str], list[list[str]], list[str]]:
    """(title, header, rows, notes) for report.py's tables."""
    rows = []
    for name, sc in result["scenarios"].items():
        if name in WS_SCENARIOS:
            continue  # ws_table
        for target, x in sc["targets"].items():
            runs = x["runs"]
            rows.append([name, target, fmt_spread(x["failed"], "", 0),
                         fmt_spread(x["misses"], "", 0),
                         fmt_spread(x["p99_before_ms"], " ms", 1),
                         fmt_spread(x["p99_during_ms"], " ms", 1),
                         fmt_spread(x["max_during_ms"], " ms", 1),
                         recovery_cell(x, len(runs)), scenario_note(name, runs)])
    notes = [
        f"load: {result['connections']} keep-alive connections paced to {result['rate']:.0f} "
        f"req/s in total; median of {result['runs']} run(s) (min–max)",
        "failed: no HTTP answer or a 5xx (sigterm: only requests in flight at the signal and "
        "the slow ones); misses: 404 for a key that exists",
        "p99/max during: answered requests in flight between the first event and 2 s after the "
        "last (the whole run for max-requests); recovery: until a replacement worker has "
        "answered /health and "
        "no request has failed or been slow (> 5x p99 before, ≥ 20 ms) since (kill9, hang), "
        "until every worker is new and has answered (hup), until every worker reports Redis up "
        "(redis: the slower of the two returns), until the master exited (sigterm); /health is "
        "polled every 50 ms, the workers every 20 ms",
    ]
    return ("chaos: failures, latency and recovery under steady load (WEB_CONCURRENCY=2)",
            ["scenario", "server", "failed", "misses", "p99 before", "p99 during", "max during",
             "recovery",
             "notes"], rows, notes)


def ws_table(result: dict) -> tuple[str, list[str], list[list[str]], list[str]] | None:
    """The ws-hup scenario's own table, or None when it did not run."""
    sc = result["scenarios"].get("ws-hup")
    if sc is None:
        return None
    rows = []
    for target, x in sc["targets"].items():
        first = x["runs"][0]
        rows.append([target, fmt_spread(x["clean_close"], f"/{first['clients']}", 0),
                     ", ".join(first["first_close_codes"]),
                     fmt_spread(x["reconnected"], f"/{first['clients']}", 0),
                     fmt_spread(x["away_max_ms"], " ms", 0),
                     fmt_spread(x["failed_connects"], "", 0),
                     fmt_spread(x["restart_ms"], " ms", 0) if x["restart_ms"]["median"] is not None
                     else "not within grace + 15 s",
                     f"{first['grace_s']} s"])
    notes = [f"{WS_CLIENTS} WebSocket echo clients (an echo every 250 ms each) connected through "
             f"a SIGHUP, WEB_CONCURRENCY=2; median of {result['runs']} run(s) (min–max)",
             "closed cleanly: clients whose first connection ended with a close frame (1001 \"going "
             "away\", 1012 \"service restart\"), not cut (1006); codes: of those first connections; "
             "reconnected: clients that connected again and got an echo; longest time away: the "
             "slowest client's close to its first echo on a new connection (the close is seen at "
             "its next echo, up to 250 ms late); failed connects: "
             "attempts refused or broken while reconnecting (every 100 ms); restart: SIGHUP until "
             "two workers run and neither is an old one"]
    return ("WebSockets through a rolling restart (chaos ws-hup)",
            ["server", "closed cleanly", "close codes", "reconnected", "longest time away", "failed connects",
             "restart", "GRACEFUL_TIMEOUT"], rows, notes)


def recovery_cell(x: dict, runs: int) -> str:
    if not x["runs"][0]["events"] or x["runs"][0].get("continuous"):
        return "—"  # nothing to recover from (max-requests, memory-leak)
    if x["recovered_runs"] == 0:
        return "not within the run"
    cell = fmt_spread(x["recovery_ms"], " ms", 0)
    if x["recovered_runs"] < runs:
        cell += f" ({runs - x['recovered_runs']} run(s) did not recover)"
    return cell


def scenario_note(name: str, runs: list[dict]) -> str:
    if name == "sigterm":
        return "; ".join(f"slow {r['slow_completed']}/{r['slow_total']} completed, exit "
                         f"{r['exit_status']}, {r['failed_after_signal']} refused after the signal"
                         for r in runs[:1]) + (" (run 1)" if len(runs) > 1 else "")
    if name == "memory-leak":
        return "; ".join(memory_note(r) for r in runs[:1]) + (" (run 1)" if len(runs) > 1 else "")
    if name == "max-requests":
        return "workers recycled per run: " + ", ".join(str(r["recycled"]) for r in runs)
    if name == "redis":
        return "back → all workers up (ms): " + "; ".join(
            ", ".join(fmt(v, "", 0) for v in r["recovery_each_ms"]) for r in runs)
    if "lost_writes" in runs[0]:
        return ("acknowledged PUTs missing afterwards per run: "
                + ", ".join(str(r["lost_writes"]) for r in runs)
                + " (keys read back per run: " + ", ".join(str(r["requests"]) for r in runs) + ")")
    return "new workers per run: " + ", ".join(str(r["new_workers"]) for r in runs) + stalls(runs)


def memory_note(r: dict) -> str:
    limit = "no limit (no memory cgroup here)" if r["limit_mib"] is None else f"limit {r['limit_mib']} MiB"
    line = "" if r["line_mib"] is None else f", line {r['line_mib']:.0f} MiB"
    oom = "" if r["oom_kills"] is None else f", {r['oom_kills']} OOM kill(s)"
    return (f"{limit}{line}: worker peak {r['worker_peak_mib']:.0f} MiB (PSS), all processes peak "
            f"{fmt(r['cgroup_peak_mib'], ' MiB', 0)}{oom}, {r['workers_killed']} worker(s) lost to a "
            f"signal, {r['new_workers']} new worker(s); leaks answered {r['leaks_answered']}/{r['leaks_sent']}")


def stalls(runs: list[dict]) -> str:
    stalled = [str(i + 1) for i, r in enumerate(runs) if r.get("answered_during") == 0]
    if not stalled:
        return ""
    return (f"; run {', '.join(stalled)}: no request answered during the event (every load "
            f"connection was stuck on the hung worker), left out of p99/max during")
