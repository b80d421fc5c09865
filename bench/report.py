"""The report: tables on stdout and in markdown (BENCHMARKS.md), the noise, the plots. It reads
the results bench/measure.py and bench/chaos.py produce (the dicts written to results.json);
neither imports this module.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import chaos_report
from harness import BenchError, Ctx, fmt, fmt_spread, log

NOISY_SHARE = 0.10  # foreign CPU share above which a measurement is flagged as unreliable


def _counts(values: list) -> str:
    """["up", "up", "connecting"] -> "up×2, connecting×1"; None (no such check) -> "—"."""
    seen: dict = {}
    for v in values:
        seen[v] = seen.get(v, 0) + 1
    return ", ".join(f"{'—' if k is None else k}×{n}" for k, n in seen.items())


def throughput_rows(targets: dict) -> list[list[str]]:
    return [[n, fmt_spread(x["rps"], "", 0), fmt_spread(x["p50_ms"], " ms", 2),
             fmt_spread(x["p99_ms"], " ms", 2), str(x["errors"])] for n, x in targets.items()]


def ratio_notes(ratios: dict) -> list[str]:
    return [f"{k.replace('_over_', ' / ')}: {fmt(v, '', 3)}" for k, v in ratios.items()
            if v is not None]


def seed_table(r: dict) -> tuple[str, list[str], list[list[str]], list[str]]:
    rows = []
    for name, x in r["targets"].items():
        first = x["first_200_s"]
        first = (f"none in {r['window_s']:.0f} s" if first is None
                 else fmt(first * 1e3, " ms") if first < 1 else fmt(first, " s"))
        rows.append([name, first, f"{x['failed']} of {x['requests']}", str(x["workers_killed"]),
                     ", ".join(x["failure_kinds"]) or "—"])
    load = r["load"]
    notes = [
        "warm-ups written the blocking way: bcrypt cost 12 three times, a synchronous Redis "
        "PING with no timeout, a 5 s sleep; herdsman: `examples/seed.rs` (three warm-up tasks"
        f"{', built from commit ' + r['seed_commit'] if 'seed_commit' in r else ''}); "
        "peer: `bench/peer` with PEER_BLOCKING_WARMUP=1 (in the lifespan start-up); REDIS_URL: "
        "a port that accepts and never answers",
        f"failed: of the requests of {load['connections']} keep-alive connections paced to "
        f"{load['rate']:.0f} req/s on /live from the spawn for {r['load_s']:.0f} s: refused, "
        f"reset, no answer within {load['timeout_s']:.0f} s, non-2xx, or answered after the "
        f"{r['load_s']:.0f} s",
        f"workers killed: distinct workers the master's log names as timed out (WORKER TIMEOUT, "
        f"WORKER BOOT TIMEOUT) or killed by a signal within {r['window_s']:.0f} s of the spawn; "
        "one run",
    ]
    notes += [f"{n}: the master exited with status {x['master_exit_status']} within the window"
              for n, x in r["targets"].items() if x["master_exit_status"] is not None]
    return (f"seed: warm-ups that block, Redis that never answers (WEB_CONCURRENCY={r['workers']}, "
            f"GUNICORN_TIMEOUT={r['timeout_s']})",
            ["server", "first 200 on /live", f"failed in the first {r['load_s']:.0f} s",
             f"workers killed in {r['window_s']:.0f} s", "how requests failed"], rows, notes)


SEED_INTRO = (
    "The failure herdsman was written for, reproduced side by side: an app whose workers warm up "
    "the blocking way (bcrypt at cost 12, a synchronous Redis connect with no timeout, a 5 s "
    "cache load as a sleep) while Redis accepts connections and never answers. The friendly "
    "case is a first 200 within milliseconds of the spawn, no failed request and no worker "
    "killed: the warm-ups block only themselves. The unfriendly case is the seed's: no 200 in "
    "the whole window and every request failed, the workers either killed by the master's "
    "timeout (WORKER TIMEOUT) and replaced by workers that block again, or left blocked without "
    "a word when the timeout does not catch them (gunicorn 27 starts a worker's timeout at its "
    "first heartbeat, which a uvicorn worker sends only after its lifespan start-up)."
)


def tables(results: dict) -> list[tuple[str, list[str], list[list[str]], list[str]]]:
    """(title, header, rows, notes) per measurement; shared by stdout and markdown."""
    out = []
    if "seed" in results:
        out.append(seed_table(results["seed"]))
    if "boot" in results:
        r = results["boot"]
        rows = []
        for variant, row in r["variants"].items():
            for name in ("herdsman", "peer"):
                if name in row:
                    x = row[name]
                    rows.append([variant, name, fmt_spread(x["connect_ms"], " ms"),
                                 fmt_spread(x["first_200_ms"], " ms"),
                                 _counts(x["redis_status_at_first_200"])])
            if row.get("ratio_herdsman_over_peer") is not None:
                rows.append([variant, "herdsman/peer", "", fmt(row["ratio_herdsman_over_peer"],
                                                               "×", 3), ""])
        out.append(("boot: spawn → first 200 on /health (WEB_CONCURRENCY=2)",
                    ["Redis", "server", "port accepts", "first 200 /health", "redis at first 200"],
                    rows, [f"median of {r['runs']} spawns (min–max)"]))
    if "live" in results:
        r = results["live"]
        rows = throughput_rows(r["targets"])
        notes = [f"wrk {r['wrk']}, median of {r['runs']} interleaved runs (min–max)"]
        notes += ratio_notes(r["ratios"])
        out.append(("live: GET /live", ["server", "req/s", "p50", "p99", "errors"], rows, notes))
    if "cache" in results:
        r = results["cache"]
        rows = throughput_rows(r["targets"])
        notes = [f"servers: wrk {r['wrk']} GET /cache/k ({r['value_bytes']} B value in Redis); "
                 f"redis-benchmark {r['redis_benchmark']}; median of {r['runs']} runs"]
        notes += ratio_notes(r["ratios"])
        out.append(("cache: GET /cache/k from Redis vs redis-benchmark GET",
                    ["client → server", "req/s", "p50", "p99", "errors"], rows, notes))
    if "login" in results:
        r = results["login"]
        rows = [[n, fmt_spread(x["login_ok_rps"], "", 1), fmt_spread(x["login_p99_ms"], " ms", 0),
                 fmt_spread(x["live_idle_p99_ms"], " ms", 2),
                 fmt_spread(x["live_loaded_p99_ms"], " ms", 2),
                 fmt(x["login_over_all_cores_hash_rate"], "", 2)]
                for n, x in r["targets"].items()]
        b = r["bcrypt"]
        notes = [f"bcrypt cost {r['bcrypt_cost']} (Python bcrypt): {b['single_thread_per_s']:.1f} "
                 f"hashes/s on one thread, so {b['cores_x_single_thread_per_s']:.1f}/s for "
                 f"{b['cores']} cores (the reference); a {b['cores']}-process pool measured "
                 f"{b['pool_all_cores_per_s']:.1f}/s",
                 f"login load: wrk {r['login_wrk']}; /live probe: {r['probe']}; "
                 f"median of {r['runs']} runs"]
        notes += [f"{k}: {fmt(v, '', 3)}" for k, v in r.get("ratios", {}).items() if v is not None]
        out.append(("login: POST /auth/login throughput, /live p99 under login load",
                    ["server", "logins/s", "login p99", "/live p99 idle", "/live p99 loaded",
                     "logins / cores' hash rate"], rows, notes))
    if "memory" in results:
        r = results["memory"]
        rows = [[n, f"{len(x['processes'])}", fmt(x["master_rss_mib"], " MiB"),
                 ", ".join(fmt(w, "", 1) for w in x["worker_rss_mib"]) or "—",
                 fmt(x["total_rss_mib"], " MiB"), fmt(x["total_pss_mib"], " MiB")]
                for n, x in r["targets"].items()]
        notes = [f"{k}: {fmt(v, '', 3)}" for k, v in r.get("ratios", {}).items() if v is not None]
        notes.append("RSS counts shared pages once per process; PSS splits them")
        out.append(("memory: process tree after 1 s of /live load (WEB_CONCURRENCY=2)",
                    ["server", "procs", "master RSS", "worker RSS (MiB)", "total RSS",
                     "total PSS"], rows, notes))
    if "image" in results:
        r = results["image"]
        out.append(("image: container image size",
                    ["server", "size", "what"],
                    [["herdsman", fmt(r["herdsman_image_mb"], " MB", 2),
                      f"whole image: scratch + {r['source']}"],
                     ["peer", fmt(r["peer_packages_and_app_mb"], " MB", 1),
                      "its Python packages and app only, to add to a Python base image (no "
                      "base image can be pulled here)"]],
                    ["bound: herdsman image < 8 MB (bench/image-size.sh)"]))
    if "chaos" in results:
        out.append(chaos_report.table(results["chaos"]))
        ws = chaos_report.ws_table(results["chaos"])
        if ws is not None:
            out.append(ws)
    if "abuse" in results:
        out.extend(abuse_tables(results["abuse"]))
    if "history" in results:
        out.append(history_table(results["history"]))
    return out


def history_table(r: dict) -> tuple[str, list[str], list[list[str]], list[str]]:
    """bench/history.py's run: what was done to the cluster and what the checker found."""
    faults = ", ".join(f"{n} {kind}" for kind, n in r["faults"].items())
    anomalies = ", ".join(f"{rule} {n}" for rule, n in r["anomalies"].items())
    rows = [["herdsman", f"{r['operations']:,}", faults, anomalies, f"{r['seed']}", fmt(r["seconds"], " s", 0)]]
    notes = ["3 instances × 2 workers behind HAProxy, each on its own proxy to one Redis, links cut, "
             "paused and slowed at random; rules (history.py's docstring): V validity, F final "
             "state, R reads served by Redis, L every worker back on Redis; the goal is 0"]
    return ("history: /cache under link faults, checked against the consistency model",
            ["server", "operations", "faults", "anomalies", "seed", "duration"], rows, notes)


def _statuses(counts: dict) -> str:
    return ", ".join(f"{n}× {status}" for status, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def abuse_tables(r: dict) -> list[tuple[str, list[str], list[list[str]], list[str]]]:
    """The abuse scenarios (bench/abuse.py): one table per attack."""
    parts, out = r["parts"], []
    if "guessing" in parts:
        rows = [[n, f"{x['attempts']}", f"{x['bcrypt_verifications']}", fmt(100 * x["throttled_share"], " %", 1),
                 fmt(x["live_p99_ms"], " ms", 2), _statuses(x["statuses"])]
                for n, x in parts["guessing"]["targets"].items()]
        notes = [f"8 connections of wrong-password logins for one account, back to back, "
                 f"{next(iter(parts['guessing']['targets'].values()), {}).get('duration_s', '?')} s; "
                 f"bcrypt cost {r['bcrypt_cost']}; /live probe paced at 200 req/s beside it",
                 "verifications: every answer but a 429 ran one bcrypt; herdsman with its default "
                 "limits (10 a minute per account, 60 per address), the peer has none"]
        out.append(("abuse: password guessing on POST /auth/login",
                    ["server", "attempts", "bcrypt verifications", "429 share", "/live p99", "answers"],
                    rows, notes))
    if "anonymous-put" in parts:
        rows = [[n, f"{x['requests']}", fmt(100 * x["unauthorized_share"], " %", 1),
                 fmt(x["max_worker_growth_mib"], " MiB", 1), _statuses(x["statuses"])]
                for n, x in parts["anonymous-put"]["targets"].items()]
        out.append(("abuse: anonymous PUT /cache of 1 MB values",
                    ["server", "requests", "401 (or closed unread)", "worker RSS growth", "answers"],
                    rows, ["4 connections, a new one per request; `closed`: answered or closed "
                           "before the body was read"]))
    for part in ("put-redis-up", "put-redis-down"):
        if part not in parts:
            continue
        rows = [[n, f"{x['values']}", f"{x['acknowledged']}", f"{x['acknowledged_lost']}",
                 fmt(x["max_worker_growth_mib"], " MiB", 1), f"{x['workers_alive_after']}",
                 _statuses(x["statuses"])]
                for n, x in parts[part]["targets"].items()]
        notes = [f"one logged-in user, {r['value_bytes']:,} B values one after another; herdsman: "
                 f"HERDSMAN_CACHE_MAX_BYTES={r['memory_budget_mib']} MiB, user quota raised; "
                 "lost: acknowledged with 204 but not in Redis once it is back"]
        out.append((f"abuse: {parts[part]['title']}",
                    ["server", "PUTs", "acknowledged", "acknowledged but lost", "max worker RSS growth",
                     "workers alive", "answers"], rows, notes))
    return out


def print_tables(results: dict) -> None:
    for title, header, rows, notes in tables(results):
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
        print(f"\n== {title}")
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for row in rows:
            print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
        for n in notes:
            print(f"   {n}")



def print_noise(noise: dict) -> None:
    if not noise:
        return
    print("\n== noise: CPU used by other processes during each measurement")
    for name, n in noise.items():
        flag = "  UNRELIABLE" if (n["foreign_share"] or 0) > NOISY_SHARE else ""
        print(f"   {name:<11} wall {n['wall_s']:>6} s  foreign {n['foreign_cpu_s']:>5} s "
              f"({100 * (n['foreign_share'] or 0):.1f} % of all cores)  steal {n['steal_s']} s"
              f"{flag}")


def draw_plots(results: dict) -> list[str]:
    """The plots of the measurements that have some (chaos); what failed, as failures."""
    if "chaos" not in results:
        return []
    try:
        chaos_report.plot(results["chaos"])
    except (BenchError, subprocess.SubprocessError, OSError) as exc:
        log(f"FAIL chaos plots: {exc}")
        return [f"chaos: {exc}".splitlines()[0]]
    return []


def markdown_table(header: list[str], rows: list[list[str]], notes: list[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*lines, "", *[f"- {n}" for n in notes], ""]


def write_markdown(path: Path, ctx: Ctx, meta: dict, results: dict) -> None:
    m = meta
    lines = [
        "# herdsman benchmarks",
        "",
        f"Generated by `python3 bench/run.py{' --smoke' if ctx.smoke else ''} --markdown ...` on "
        f"{m['date']}. Every figure below was measured in that run; rerun the command to "
        "reproduce (results in `bench/out/results.json`).",
        "",
    ]
    sections = tables(results)
    if "seed" in results:  # the headline: first, before the machine
        lines += [f"## {sections[0][0]}", "", SEED_INTRO, "", *markdown_table(*sections.pop(0)[1:])]
    lines += [
        "## Machine and versions",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB; kernel {m['kernel']}; {m['os']}",
        f"- herdsman: {m['herdsman'] or 'not measured (binary missing)'}"
        + (f" — `{m['herdsman_version']}`, commit {m['herdsman_commit']}" if m["herdsman"] else ""),
        f"- peer: gunicorn + uvicorn workers + FastAPI (`bench/peer`), Python {m['python']}: "
        f"{m['peer_packages']}",
        f"- ceiling: bare axum hello-world, one process, tokio multi-thread (`bench/hello`); {m['rustc']}",
        f"- load: {m['wrk']}; {m['redis']}",
        "",
        "## Noise",
        "",
        "Load generator, servers and Redis share the same cores (nothing is pinned), so "
        "throughput figures are lower than on a dedicated client/server pair and ratios matter "
        "more than absolutes. Each cell shows the median of the runs and, in parentheses, "
        "their min–max; runs of different servers are interleaved so drift hits all alike.",
        "",
        "CPU used during each measurement by processes other than the harness and what it "
        "started (e.g. a build running alongside), and hypervisor steal time:",
        "",
        "| measurement | wall | foreign CPU | share of all cores | steal |",
        "|---|---|---|---|---|",
    ]
    for name, n in ctx.noise.items():
        lines.append(f"| {name} | {n['wall_s']} s | {n['foreign_cpu_s']} s | "
                     f"{100 * (n['foreign_share'] or 0):.1f} % | {n['steal_s']} s |")
    lines.append("")
    noisy = [k for k, n in ctx.noise.items() if (n["foreign_share"] or 0) > NOISY_SHARE]
    if noisy:
        lines += [f"**Warning:** other processes used more than {100 * NOISY_SHARE:.0f} % of the "
                  f"cores during {', '.join(noisy)}: those figures (and ratios between them) are "
                  "not reliable; rerun on a quiet machine (`--quiet-wait 300`).", ""]
    if ctx.skipped:
        lines += ["Skipped: " + "; ".join(ctx.skipped), ""]
    if ctx.failures:
        lines += ["**Failures in this run:** " + "; ".join(ctx.failures), ""]
    for title, header, rows, notes in sections:
        lines += [f"## {title}", "", *markdown_table(header, rows, notes)]
        if title.startswith("chaos"):
            lines += chaos_report.markdown_plots(results["chaos"], path)
    path.write_text("\n".join(lines))
