"""Latency over time of a chaos scenario, one panel per server: answered requests as dots, 404s
on an existing key as orange squares, failures as red crosses at the time they were sent, events
as dashed lines, new workers as dotted ones; for WebSocket scenarios, each connection's close as a
triangle at 1 ms, coloured by close code; for the memory-leak scenario, each worker's PSS and the
memory lines on a second axis.

    bench/.venv/bin/python bench/vpy/plot_timeline.py DATA.json OUT.png

DATA.json: {"title": ..., "timelines": [{"target", "samples", "events", "new_workers"}, ...]}, as
bench/chaos.py writes it. Run with the venv's python (matplotlib) by bench/chaos_report.py.
"""

import json
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
d = json.load(open(sys.argv[1]))
tls = d["timelines"]
fig, axes = plt.subplots(len(tls), 1, figsize=(12, 3.2 * len(tls)), sharex=True, squeeze=False)
for ax, tl in zip(axes[:, 0], tls):
    ok = [s for s in tl["samples"] if s[2] is not None and s[2] < 500 and s[2] != 404]
    miss = [s for s in tl["samples"] if s[2] == 404]
    bad = [s for s in tl["samples"] if s[2] is None or s[2] >= 500]
    ax.scatter([s[0] for s in ok], [s[1] for s in ok], s=3, alpha=0.5, label=f"ok ({len(ok)})")
    if miss:
        ax.scatter([s[0] for s in miss], [s[1] for s in miss], s=12, marker="s", color="orange",
                   label=f"404 on an existing key ({len(miss)})")
    if bad:
        ax.scatter([s[0] for s in bad], [max(s[1], 0.01) for s in bad], s=30, marker="x",
                   color="red", label=f"failed ({len(bad)})")
    # WebSocket scenarios: when each connection was closed, and with which code.
    for code in sorted({c for _, c in tl.get("closes", [])}):
        ts = [t for t, c in tl["closes"] if c == code]
        ax.scatter(ts, [1.0] * len(ts), s=40, marker="v", color="orange" if code == 1001 else "purple",
                   label=f"closed with {code} ({len(ts)})")
    for i, t in enumerate(tl["new_workers"]):
        ax.axvline(t, color="green", linestyle=":", linewidth=1,
                   label="new worker" if i == 0 else None)
    for t, label in tl["events"]:
        ax.axvline(t, color="black", linestyle="--", linewidth=1)
        ax.annotate(label, (t, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=8)
    # The memory-leak scenario: each worker's own memory (PSS) on a second axis, with the lines.
    if tl.get("memory"):
        mem = ax.twinx()
        pids = sorted({pid for _, by_pid in tl["memory"] for pid in by_pid})
        for pid in pids:
            points = [(t, by_pid[pid]) for t, by_pid in tl["memory"] if pid in by_pid]
            mem.plot([p[0] for p in points], [p[1] for p in points], linewidth=1, color="tab:purple", alpha=0.7)
        for label, mib in tl.get("memory_lines", []):
            mem.axhline(mib, color="tab:red" if label == "limit" else "tab:purple", linestyle="-.",
                        linewidth=1)
            mem.annotate(f"{label} {mib:.0f} MiB", (0, mib), xycoords=("axes fraction", "data"),
                         xytext=(3, 2), textcoords="offset points", fontsize=7)
        mem.set_ylabel("each worker's PSS (MiB), purple")
        mem.set_ylim(bottom=0)
    ax.set_yscale("log")
    ax.set_ylabel(f"{tl['target']}: latency (ms)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
axes[-1, 0].set_xlabel("time since the load started (s)")
fig.suptitle(d["title"])
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=100)
