#!/usr/bin/env python3
"""herdsman benchmark harness: herdsman vs the stack it replaces (gunicorn + uvicorn + FastAPI)
vs a bare one-process axum hello-world (the ceiling).

    python3 bench/run.py --markdown BENCHMARKS.md   # everything, real durations: the report
    python3 bench/run.py seed                       # the seed's blocking warm-ups (~3 min)
    python3 bench/run.py live cache                 # some measurements
    python3 bench/run.py chaos --chaos hang,redis   # some chaos scenarios (bench/chaos.py)
    python3 bench/run.py --smoke                    # everything, short and once (CI, ~5 min)
    python3 bench/run.py --herdsman /path/to/herdsman

Only the standard library at the top level; the peer (and matplotlib for plots) live in
bench/.venv, which this script creates and fills from bench/peer/requirements.txt (idempotent).
Every figure printed or written comes from a measurement made in the same run. All traffic goes
to 127.0.0.1; every load loop is bounded in time. Every process started is torn down on exit,
error or not (each runs in its own process group).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import chaos
from harness import (
    BENCH,
    DEFAULT_HERDSMAN,
    HEALTH_PATH,
    LOGS,
    LOOPBACK,
    OUT,
    PEER_DIR,
    REPO,
    VPY,
    BenchError,
    Ctx,
    HangingRedis,
    LoadRecorder,
    RedisServer,
    Server,
    ensure_hello,
    ensure_seed,
    ensure_venv,
    fmt,
    fmt_spread,
    http_json,
    http_request,
    log,
    probe,
    proc_kib,
    ratio,
    read_response,
    redis_benchmark,
    redis_status,
    redis_up,
    require_tools,
    resp_command,
    spread,
    start_target,
    wait_workers_serving,
    workers_killed,
    wrk,
)

MEASUREMENTS = ("seed", "boot", "live", "cache", "login", "memory", "image", "chaos")



# ---------------------------------------------------------------------------------------------
# Measurements: one function each, returning a JSON-able dict
# ---------------------------------------------------------------------------------------------


def time_to_first_200(srv: Server, path: str, timeout: float = 60.0,
                      attempt_timeout: float | None = None) -> dict:
    """Poll with a raw socket every ~1 ms from the spawn: first TCP connect, first 200 on path.
    attempt_timeout: give up on one request after this long and send another (a server that
    accepts but does not answer), instead of waiting until the deadline."""
    t0 = srv.t_spawn
    deadline = t0 + timeout
    t_connect = None
    req = f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}\r\nConnection: close\r\n\r\n".encode()
    while time.perf_counter() < deadline:
        srv.check_alive()
        s = socket.socket()
        s.settimeout(min(attempt_timeout or timeout, max(0.05, deadline - time.perf_counter())))
        try:
            s.connect((LOOPBACK, srv.port))
        except (ConnectionRefusedError, socket.timeout):
            s.close()
            time.sleep(0.001)
            continue
        if t_connect is None:
            t_connect = time.perf_counter() - t0
        try:
            s.sendall(req)
            status, _, body = read_response(s)
        except (OSError, ValueError, IndexError):
            status, body = None, b""
        finally:
            s.close()
        if status == 200:
            t = time.perf_counter() - t0
            try:
                info = json.loads(body)
            except ValueError:
                info = None
            return {"connect_ms": t_connect * 1e3, "first_200_ms": t * 1e3, "health": info}
        time.sleep(0.001)
    raise BenchError(f"{srv.name}: no 200 on {path} within {timeout}s:\n{srv.log_tail()}")


# The seed's failure (examples/seed.rs, bench/peer with PEER_BLOCKING_WARMUP=1): worker count,
# GUNICORN_TIMEOUT, how long the server runs (workers killed are counted over all of it) and
# how long the load runs (failed requests are counted over that).
SEED = {"workers": 4, "timeout_s": 60, "window_s": 75.0, "load_s": 30.0}
SEED_SMOKE = {"workers": 2, "timeout_s": 6, "window_s": 10.0, "load_s": 8.0}
SEED_LOAD = {"connections": 4, "rate": 20.0, "timeout_s": 5.0}  # a light, paced load on /live


def measure_seed(ctx: Ctx) -> dict:
    """The seed's start-up: warm-ups written the blocking way (bcrypt cost 12 three times, a
    synchronous Redis PING with no timeout, a 5 s sleep) against a Redis that accepts and never
    answers. Per server, from the spawn: the first 200 on /live, the requests of a light paced
    load that failed, and the workers the master killed."""
    p = SEED_SMOKE if ctx.smoke else SEED
    res: dict = {**p, "load": dict(SEED_LOAD), "targets": {}}
    names = ctx.targets("herdsman", "peer")
    seed = ensure_seed() if "herdsman" in names else None
    if seed is not None:
        res["seed_commit"] = _cmd(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    for name in names:
        env = {"GUNICORN_TIMEOUT": p["timeout_s"]}
        if name == "peer":
            env["PEER_BLOCKING_WARMUP"] = 1
        with HangingRedis() as redis:
            env["REDIS_URL"] = redis.url
            with start_target(ctx, name, p["workers"], env, binary=seed) as srv:
                res["targets"][name] = _seed_target(srv, p)
                srv.stop(grace=2)  # a worker stuck in a Redis read ignores SIGTERM
    return res


def _seed_target(srv: Server, p: dict) -> dict:
    rec = LoadRecorder(srv.port, "/live", p["load_s"], SEED_LOAD["connections"],
                       SEED_LOAD["rate"], SEED_LOAD["timeout_s"]).start()
    first: dict = {}

    def poll():
        try:
            first.update(time_to_first_200(srv, "/live", p["window_s"], attempt_timeout=1.0))
        except BenchError:
            pass  # no 200 within the window (or the master exited: said below)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    time.sleep(max(0.0, srv.t_spawn + p["window_s"] - time.perf_counter()))
    killed = workers_killed(srv.log_path.read_text(errors="replace"))
    exit_status = srv.proc.poll()
    rec.join()
    poller.join(5)
    # Of the requests sent while the load ran (a load thread may send one more as it stops),
    # failed: refused, reset, timed out (no answer within the client timeout), non-2xx, or
    # answered only after the load stopped.
    sent = [s for s in rec.samples if s[0] < p["load_s"]]
    failed = [s for s in sent
              if s[2] is None or not 200 <= s[2] < 300 or s[0] + s[1] / 1e3 > p["load_s"]]
    return {
        "first_200_s": first["first_200_ms"] / 1e3 if first else None,
        "requests": len(sent),
        "failed": len(failed),
        "failure_kinds": sorted({s[3] or (f"{s[2]} after the {p['load_s']:.0f} s"
                                          if 200 <= s[2] < 300 else str(s[2])) for s in failed}),
        "workers_killed": killed,
        "master_exit_status": exit_status,
    }


def measure_boot(ctx: Ctx) -> dict:
    """Spawn -> first 200 on /health, WEB_CONCURRENCY=2, with no Redis, a real Redis and a
    hanging Redis (accepts TCP, never answers). Median of N spawns."""
    res: dict = {"runs": ctx.boot_runs, "variants": {}}
    with ExitStack() as stack:
        real = stack.enter_context(RedisServer())
        hanging = stack.enter_context(HangingRedis())
        variants = {"no-redis": None, "redis-up": real.url, "redis-hanging": hanging.url}
        for variant, url in variants.items():
            row = {}
            for name in ctx.targets("herdsman", "peer"):
                first, conn, redis_at_first = [], [], []
                for _ in range(ctx.boot_runs):
                    env = {"REDIS_URL": url} if url else {}
                    with start_target(ctx, name, workers=2, env=env) as srv:
                        t = time_to_first_200(srv, "/health")
                    first.append(t["first_200_ms"])
                    conn.append(t["connect_ms"])
                    redis_at_first.append(redis_status(t["health"]))
                row[name] = {"first_200_ms": spread(first), "connect_ms": spread(conn),
                             "redis_status_at_first_200": redis_at_first}
            if "herdsman" in row:
                row["ratio_herdsman_over_peer"] = ratio(
                    row["herdsman"]["first_200_ms"]["median"], row["peer"]["first_200_ms"]["median"])
            res["variants"][variant] = row
    return res


def throughput_figures(runs: list[dict]) -> dict:
    """Median and spread of req/s, p50 and p99 over the runs of one load tool (wrk or
    redis-benchmark, which reports no errors), and the errors of all runs."""
    return {
        "rps": spread([x["rps"] for x in runs]),
        "p50_ms": spread([x["p50_ms"] for x in runs]),
        "p99_ms": spread([x["p99_ms"] for x in runs]),
        "errors": sum(x.get("non2xx", 0) + x.get("socket_errors", 0) for x in runs),
    }


def measure_live(ctx: Ctx) -> dict:
    """wrk GET /live: herdsman (2 workers), peer (2 workers), bare axum (1 process).
    Runs are interleaved (round-robin) so drift hits every target alike."""
    conns, threads, dur = ctx.args.connections, 2, ctx.wrk_duration
    res: dict = {"wrk": f"-t{threads} -c{conns} -d{dur}s", "runs": ctx.runs, "targets": {}}
    names = ctx.targets("herdsman", "peer", "hello")
    with ExitStack() as stack:
        servers = {}
        for name in names:
            srv = stack.enter_context(start_target(ctx, name, workers=2))
            srv.wait_http(HEALTH_PATH[name])
            servers[name] = srv
        for name, srv in servers.items():  # warm-up, not recorded
            wrk(srv.port, "/live", conns, threads, 1)
        samples: dict[str, list[dict]] = {n: [] for n in names}
        for _ in range(ctx.runs):
            for name, srv in servers.items():
                samples[name].append(wrk(srv.port, "/live", conns, threads, dur))
    for name in names:
        res["targets"][name] = throughput_figures(samples[name])
    t = res["targets"]
    med = lambda n, k="rps": t[n][k]["median"] if n in t else None  # noqa: E731
    res["ratios"] = {
        "herdsman_over_hello": ratio(med("herdsman"), med("hello")),
        "herdsman_over_peer": ratio(med("herdsman"), med("peer")),
        "peer_over_hello": ratio(med("peer"), med("hello")),
    }
    return res


def measure_cache(ctx: Ctx) -> dict:
    """wrk GET /cache/k (value set through the server into Redis) vs redis-benchmark GET on the
    same Redis with the same concurrency and value size."""
    conns, dur, size = ctx.args.connections, ctx.wrk_duration, 64
    n_redis = 20000 if ctx.smoke else 200000
    value = (b"0123456789abcdef" * (size // 16 + 1))[:size]
    res: dict = {"wrk": f"-t2 -c{conns} -d{dur}s", "value_bytes": size, "runs": ctx.runs,
                 "redis_benchmark": f"-t get -c {conns} -n {n_redis} -d {size}", "targets": {}}
    names = ctx.targets("herdsman", "peer")
    with ExitStack() as stack:
        redis = stack.enter_context(RedisServer())
        resp_command(redis.port, "SET", "key:__rand_int__", value)  # redis-benchmark's key
        servers = {}
        for name in names:
            srv = stack.enter_context(start_target(ctx, name, workers=2, env={"REDIS_URL": redis.url}))
            try:
                wait_workers_serving(srv, 2, redis=True)
                status, _ = http_request(srv.port, "PUT", "/cache/k", value)
                if status != 204:
                    raise BenchError(f"{name}: PUT /cache/k answered {status}")
                status, body = http_request(srv.port, "GET", "/cache/k")
                if status != 200 or body != value:
                    raise BenchError(f"{name}: GET /cache/k answered {status} {body[:40]!r}")
            except BenchError as exc:
                ctx.fail("cache", name, exc)
                srv.stop()
                continue
            servers[name] = srv
        names = list(servers)
        for name, srv in servers.items():
            wrk(srv.port, "/cache/k", conns, 2, 1)  # warm-up
        samples: dict[str, list[dict]] = {n: [] for n in [*names, "redis-benchmark"]}
        for _ in range(ctx.runs):
            for name, srv in servers.items():
                samples[name].append(wrk(srv.port, "/cache/k", conns, 2, dur))
            samples["redis-benchmark"].append(redis_benchmark(redis.port, conns, n_redis, size))
        for name, srv in servers.items():  # the figures above must have come from Redis
            health = srv.wait_http("/health")
            if not redis_up(health):
                raise BenchError(f"{name}: Redis left 'up' during the cache run: {health}")
    for name, s in samples.items():
        res["targets"][name] = throughput_figures(s)
    t = res["targets"]
    rb = t["redis-benchmark"]["rps"]["median"]
    res["ratios"] = {f"{n}_over_redis_benchmark": ratio(t[n]["rps"]["median"], rb) for n in names}
    if "herdsman" in t and "peer" in t:
        res["ratios"]["herdsman_over_peer"] = ratio(t["herdsman"]["rps"]["median"],
                                                    t["peer"]["rps"]["median"])
    return res


def _bcrypt_worker(args):
    cost, n = args
    import bcrypt  # the venv's

    salt = bcrypt.gensalt(cost)
    t0 = time.perf_counter()
    for _ in range(n):
        bcrypt.hashpw(b"bench-password", salt)
    return time.perf_counter() - t0


BCRYPT_RATE_SCRIPT = r"""
import json, os, sys, time
from concurrent.futures import ProcessPoolExecutor
sys.path.insert(0, sys.argv[3])
from run import _bcrypt_worker
cost, n = int(sys.argv[1]), int(sys.argv[2])
one = _bcrypt_worker((cost, n))
cores = os.cpu_count()
with ProcessPoolExecutor(cores) as pool:
    _ = list(pool.map(_bcrypt_worker, [(cost, 1)] * cores))  # spawn + warm
    t0 = time.perf_counter()
    list(pool.map(_bcrypt_worker, [(cost, n)] * cores))
    wall = time.perf_counter() - t0
print(json.dumps({"single_thread_per_s": n / one, "pool_all_cores_per_s": cores * n / wall,
                  "cores_x_single_thread_per_s": cores * n / one, "cores": cores}))
"""


def bcrypt_rate(cost: int, n: int) -> dict:
    """Hashes per second at `cost`: one thread, and every core (a process pool), with the
    `bcrypt` package (its hashing core is Rust)."""
    r = subprocess.run([str(VPY), "-c", BCRYPT_RATE_SCRIPT, str(cost), str(n), str(BENCH)],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise BenchError(f"bcrypt rate failed: {r.stderr[-1000:]}")
    return json.loads(r.stdout)


LOGIN_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"username":"%s","password":"%s"}'
"""


def measure_login(ctx: Ctx) -> dict:
    """/live p50/p99 alone, then while 8 connections hammer POST /auth/login; login throughput
    vs what the cores can hash at the same cost. The /live probe is paced (200 requests/s on 4
    connections): a wrk probe would itself saturate the CPU, so it would measure /live against
    /live rather than /live while logins run."""
    cost = ctx.args.bcrypt_cost
    dur = max(2, ctx.wrk_duration) if ctx.smoke else ctx.wrk_duration
    res: dict = {"bcrypt_cost": cost, "login_wrk": f"-t1 -c8 -d{dur}s",
                 "probe": f"GET /live paced at 200 req/s on 4 keep-alive connections, {dur}s", "runs": ctx.runs, "targets": {}}
    names = ctx.targets("herdsman", "peer")
    password = "correct horse battery staple"
    with ExitStack() as stack:
        redis = stack.enter_context(RedisServer())
        for name in names:
            env = {"REDIS_URL": redis.url, "BCRYPT_COST": cost}
            srv = stack.enter_context(start_target(ctx, name, workers=2, env=env))
            try:
                res["targets"][name] = _login_target(ctx, srv, name, password, dur)
            except BenchError as exc:
                ctx.fail("login", name, exc)
            srv.stop()
    rate = bcrypt_rate(cost, 2 if ctx.smoke else 8)
    res["bcrypt"] = rate
    for t in res["targets"].values():
        t["login_over_all_cores_hash_rate"] = ratio(t["login_ok_rps"]["median"],
                                                    rate["cores_x_single_thread_per_s"])
    if "herdsman" in res["targets"] and "peer" in res["targets"]:
        h, p = res["targets"]["herdsman"], res["targets"]["peer"]
        res["ratios"] = {
            "login_rps_herdsman_over_peer": ratio(h["login_ok_rps"]["median"],
                                                  p["login_ok_rps"]["median"]),
            "live_loaded_p99_herdsman_over_peer": ratio(h["live_loaded_p99_ms"]["median"],
                                                        p["live_loaded_p99_ms"]["median"]),
        }
    return res


def _login_target(ctx: Ctx, srv: Server, name: str, password: str, dur: float) -> dict:
    wait_workers_serving(srv, 2, redis=True)
    user = f"bench-{name}-{srv.port}"
    status, body = http_json(srv.port, "POST", "/auth/register",
                             {"username": user, "password": password}, timeout=30)
    if status != 201:
        raise BenchError(f"{name}: register answered {status} {body}")
    status, body = http_json(srv.port, "POST", "/auth/login",
                             {"username": user, "password": password}, timeout=30)
    if status != 200 or not isinstance(body, dict) or "token" not in body:
        raise BenchError(f"{name}: login answered {status} {body}")
    script = OUT / f"login-{name}.lua"
    script.write_text(LOGIN_LUA % (user, password))
    idle, loaded, login = [], [], []
    for _ in range(ctx.runs):
        idle.append(probe(srv.port, "/live", dur))
        box: dict = {}

        def hammer():
            try:
                box["r"] = wrk(srv.port, "/auth/login", 8, 1, dur + 1, script)
            except BenchError as exc:
                box["e"] = exc

        th = threading.Thread(target=hammer)
        th.start()
        time.sleep(0.5)  # let the login load build up first
        loaded.append(probe(srv.port, "/live", dur))
        th.join(dur + 60)
        if "r" not in box:
            raise BenchError(f"{name}: login wrk produced no figure: {box.get('e')}")
        login.append(box["r"])
    if all(x["non2xx"] == x["requests"] for x in login):
        raise BenchError(f"{name}: every login failed under load")
    ok = [x["rps"] * (1 - x["non2xx"] / max(1, x["requests"])) for x in login]
    return {
        "live_idle_p50_ms": spread([x["p50_ms"] for x in idle]),
        "live_idle_p99_ms": spread([x["p99_ms"] for x in idle]),
        "live_loaded_p50_ms": spread([x["p50_ms"] for x in loaded]),
        "live_loaded_p99_ms": spread([x["p99_ms"] for x in loaded]),
        "live_loaded_failed": sum(x["failed"] for x in loaded),
        "login_ok_rps": spread(ok),
        "login_p99_ms": spread([x["p99_ms"] for x in login]),
        "login_non2xx": sum(x["non2xx"] for x in login),
    }


def measure_memory(ctx: Ctx) -> dict:
    """VmRSS (and PSS, which splits shared pages fairly) of the master and each worker, after a
    short /live load, WEB_CONCURRENCY=2, no Redis."""
    res: dict = {"targets": {}}
    for name in ctx.targets("herdsman", "peer", "hello"):
        with start_target(ctx, name, workers=2) as srv:
            srv.wait_http(HEALTH_PATH[name])
            wrk(srv.port, "/live", 16, 1, 1)
            time.sleep(0.5)
            pids = srv.pids()
            procs = []
            for pid in pids:
                procs.append({
                    "pid": pid,
                    "comm": Path(f"/proc/{pid}/comm").read_text().strip(),
                    "rss_kib": proc_kib(pid, "VmRSS"),
                    "pss_kib": proc_kib(pid, "Pss", "smaps_rollup"),
                })
        master, workers = procs[0], procs[1:]
        total_rss = sum(p["rss_kib"] or 0 for p in procs)
        total_pss = sum(p["pss_kib"] or 0 for p in procs)
        res["targets"][name] = {
            "processes": procs,
            "master_rss_mib": (master["rss_kib"] or 0) / 1024,
            "worker_rss_mib": [(p["rss_kib"] or 0) / 1024 for p in workers],
            "total_rss_mib": total_rss / 1024,
            "total_pss_mib": total_pss / 1024,
        }
        if not total_rss:
            raise BenchError(f"{name}: no RSS figure")
    t = res["targets"]
    if "herdsman" in t:
        res["ratios"] = {
            "total_rss_herdsman_over_peer": ratio(t["herdsman"]["total_rss_mib"],
                                                  t["peer"]["total_rss_mib"]),
            "total_pss_herdsman_over_peer": ratio(t["herdsman"]["total_pss_mib"],
                                                  t["peer"]["total_pss_mib"]),
        }
    return res


def is_static(binary: Path) -> bool:
    """No ELF interpreter named in its headers: a binary that runs in a `scratch` image."""
    with open(binary, "rb") as f:
        return b"/ld-linux" not in f.read(8192)


# In the venv: the bytes on disk of the peer's packages and everything they require (not the
# harness's own matplotlib), from the installed distributions' file lists.
PEER_PACKAGES_BYTES = r"""
import importlib.metadata as md, re, sys
todo, seen, total = list(sys.argv[1:]), set(), 0
while todo:
    name = re.split(r"[\s\[<>=;!~]", todo.pop())[0].lower().replace("_", "-")
    if not name or name in seen:
        continue
    seen.add(name)
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        continue
    total += sum(f.size or 0 for f in dist.files or [])
    todo += [r for r in dist.requires or [] if "extra ==" not in r]
print(total)
"""


def peer_packages_bytes() -> int:
    reqs = [line.split("#")[0].strip() for line in (PEER_DIR / "requirements.txt").read_text()
            .splitlines()]
    reqs = [r for r in reqs if r and not r.startswith("matplotlib")]
    # uvicorn[standard]: the extras it is installed with are part of the peer.
    extras = ["uvloop", "httptools", "websockets", "watchfiles", "python-dotenv", "pyyaml"]
    r = subprocess.run([str(VPY), "-c", PEER_PACKAGES_BYTES, *reqs, *extras],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise BenchError(f"sizing the peer's packages failed: {r.stderr[-500:]}")
    app = sum(f.stat().st_size for f in PEER_DIR.iterdir() if f.is_file())
    return int(r.stdout) + app


def measure_image(ctx: Ctx) -> dict:
    """herdsman's container image: the Dockerfile's final stage around a static binary built on
    this host (no registry here for the build stage). The peer's image cannot be built here (no
    Python base image can be pulled): what it adds to one, its venv and app, is measured."""
    if shutil.which("docker") is None or subprocess.run(
            ["docker", "info"], capture_output=True).returncode != 0:
        raise BenchError("no Docker engine reachable (docker info failed)")
    argv = [str(BENCH / "image-size.sh"), "--host"]
    source = "static release build (cargo build --release, +crt-static)"
    if ctx.smoke and ctx.herdsman is not None and is_static(ctx.herdsman):
        argv.append(str(ctx.herdsman))  # no second static build in CI
        source = "the static binary under test"
    r = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    m = re.search(r": (\d+) bytes", r.stdout)
    if m is None:
        raise BenchError(f"image-size.sh failed ({r.returncode}): {(r.stdout + r.stderr)[-1000:]}")
    return {"herdsman_image_mb": int(m.group(1)) / 1e6, "source": source,
            "peer_packages_and_app_mb": peer_packages_bytes() / 1e6}


MEASURE = {"seed": measure_seed, "boot": measure_boot, "live": measure_live, "cache": measure_cache,
           "login": measure_login, "memory": measure_memory, "image": measure_image,
           "chaos": chaos.measure_chaos}


# ---------------------------------------------------------------------------------------------
# Reporting: table, results.json, BENCHMARKS.md
# ---------------------------------------------------------------------------------------------



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
                      f"whole image: scratch + CA bundle + {r['source']}"],
                     ["peer", fmt(r["peer_packages_and_app_mb"], " MB", 1),
                      "its Python packages and app only, to add to a Python base image (no "
                      "base image can be pulled here)"]],
                    ["target: herdsman image ≤ 10 MB (bench/image-size.sh)"]))
    if "chaos" in results:
        out.append(chaos.table(results["chaos"]))
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


def _cmd(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        return (r.stdout or r.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def cpu_snapshot() -> dict:
    """Machine-wide busy and steal CPU seconds (/proc/stat) and this harness's own CPU seconds
    (itself + every descendant it has reaped: servers, their workers, wrk, redis)."""
    import resource

    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    own = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        own += ru.ru_utime + ru.ru_stime
    return {"t": time.monotonic(), "busy": (user + nice + system + irq + softirq) / hz,
            "steal": steal / hz, "own": own}


def foreign_cpu(before: dict, after: dict) -> dict:
    """CPU used during a measurement by processes that are not the harness's (other builds,
    other jobs), and hypervisor steal: the noise the figures carry. Valid once every process
    the measurement started has been reaped."""
    wall = after["t"] - before["t"]
    foreign = max(0.0, (after["busy"] - before["busy"]) - (after["own"] - before["own"]))
    steal = after["steal"] - before["steal"]
    cores = os.cpu_count() or 1
    return {"wall_s": round(wall, 1), "foreign_cpu_s": round(foreign, 1),
            "foreign_share": round(foreign / (wall * cores), 3) if wall else None,
            "steal_s": round(steal, 1)}


NOISY_SHARE = 0.10  # foreign CPU share above which a measurement is flagged as unreliable


def wait_for_quiet(max_wait: float, threshold: float = 0.10) -> float:
    """Between measurements (nothing of ours running): wait, at most max_wait seconds, until
    the machine's CPU use over 1 s is under `threshold` of all cores. Returns the share seen."""
    deadline = time.monotonic() + max_wait
    share, said = 1.0, False
    while True:
        a = cpu_snapshot()
        time.sleep(1.0)
        share = foreign_cpu(a, cpu_snapshot())["foreign_share"] or 0.0
        if share < threshold or time.monotonic() >= deadline:
            return share
        if not said:
            log(f"machine busy ({100 * share:.0f} % of all cores used by others); waiting up to "
                f"{max_wait:.0f} s for it to calm down")
            said = True


def machine_info(ctx: Ctx) -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1])
    pipv = subprocess.run([str(VPY), "-c",
                           "import importlib.metadata as m;print(' '.join(f'{p}=={m.version(p)}' "
                           "for p in ['fastapi','uvicorn','gunicorn','starlette','redis','bcrypt',"
                           "'uvloop','httptools']))"], capture_output=True, text=True).stdout.strip()
    # The binary may live in any target dir: name the commit of the checkout it was built from
    # when it is inside one, else this repository's (with --dirty, as `git describe` says).
    where = ctx.herdsman_source.parent if ctx.herdsman_source is not None else REPO
    herdsman_rev = _cmd(["git", "-C", str(where), "describe", "--always", "--dirty"])
    if herdsman_rev.startswith("fatal") or herdsman_rev == "?":
        herdsman_rev = _cmd(["git", "-C", str(REPO), "describe", "--always", "--dirty"]) + \
            " (this checkout; the binary was built outside it)"
    return {
        "cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem / 1024 / 1024, 1),
        "kernel": platform.release(), "os": _cmd(["sh", "-c", ". /etc/os-release; echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        "herdsman": str(ctx.herdsman_source) if ctx.herdsman else None,
        "herdsman_sha256": (hashlib.sha256(ctx.herdsman.read_bytes()).hexdigest()[:16]
                            if ctx.herdsman else None),
        "herdsman_version": _cmd([str(ctx.herdsman), "--version"]) if ctx.herdsman else None,
        "herdsman_commit": herdsman_rev,
        "rustc": _cmd(["rustc", "--version"]),
        "peer_packages": pipv,
        "wrk": _cmd(["wrk", "--version"]),
        "redis": _cmd(["redis-server", "--version"]),
        "harness_commit": _cmd(["git", "-C", str(BENCH), "log", "-1", "--format=%h"]),
        "smoke": ctx.smoke,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def chaos_plots(result: dict, path: Path) -> list[str]:
    """Copy the chaos plots to bench/plots (committed with the report); markdown that shows them."""
    plots = BENCH / "plots"
    plots.mkdir(exist_ok=True)
    lines = []
    for name, sc in result["scenarios"].items():
        png = plots / Path(sc["plot"]).name
        shutil.copy2(sc["plot"], png)
        rel = os.path.relpath(png, path.resolve().parent)
        lines += [f"### {name}: {sc['title']}", "", f"![{name}]({rel})", ""]
    return lines


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
            lines += chaos_plots(results["chaos"], path)
    path.write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------


# May be None in a good run: ratios when herdsman was skipped; in the seed, the first 200 of a
# server that never answered and the exit status of a master still running; in the chaos
# suite, what a scenario has no value for (p99 before when there is no event, p99/max during
# when every load connection stalled through the event, recovery when not recovered).
OPTIONAL_FIGURES = {"ratios", "health", "redis_status_at_first_200", "p99_before_ms",
                    "recovery_ms", "recovery_each_ms", "p99_during_ms", "max_during_ms", "exit_status",
                    "exit_after_ms", "first_200_s", "master_exit_status"}


def missing_figures(obj, where="") -> list[str]:
    """Every None where a figure should be (ratios may be None when herdsman was skipped)."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in OPTIONAL_FIGURES or k.startswith("ratio"):
                continue
            out += missing_figures(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += missing_figures(v, f"{where}[{i}]")
    elif obj is None:
        out.append(where)
    return out


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
    what = args.what or list(MEASUREMENTS)
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

    meta = machine_info(ctx)
    doc = {"meta": meta, "skipped": ctx.skipped, "failures": ctx.failures, "noise": ctx.noise,
           **ctx.results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print_tables(ctx.results)
    if ctx.noise:
        print("\n== noise: CPU used by other processes during each measurement")
        for name, n in ctx.noise.items():
            flag = "  UNRELIABLE" if (n["foreign_share"] or 0) > NOISY_SHARE else ""
            print(f"   {name:<11} wall {n['wall_s']:>6} s  foreign {n['foreign_cpu_s']:>5} s "
                  f"({100 * (n['foreign_share'] or 0):.1f} % of all cores)  steal {n['steal_s']} s"
                  f"{flag}")
    if args.markdown:
        write_markdown(args.markdown, ctx, meta, ctx.results)
        log(f"wrote {args.markdown}")
    log(f"wrote {args.json} in {time.monotonic() - t_start:.0f}s total")
    if ctx.failures:
        log(f"{len(ctx.failures)} measurement(s) failed: " + " | ".join(ctx.failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
