"""The measurements of the benchmark: one function per measurement (MEASURE), each returning
a JSON-able dict of figures, and what the runner needs around them: the CPU other processes used
during each (the noise), the machine and versions, the check that no figure is missing.

Rendering those results (tables, markdown, plots) is bench/report.py's; this module never
imports it. Programs that need the venv's packages are files in bench/vpy/, run with the venv's
python (bcrypt_rate.py, peer_packages_bytes.py, peer_versions.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import abuse
import chaos
from harness import (
    BENCH,
    HEALTH_PATH,
    HEALTH_TOKEN,
    LOOPBACK,
    OUT,
    PEER_DIR,
    REPO,
    VPY,
    VPY_PROGRAMS,
    BenchError,
    bearer,
    Ctx,
    HangingRedis,
    LoadRecorder,
    RedisServer,
    Server,
    ensure_seed,
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
    resp_command,
    session_token,
    spread,
    start_target,
    wait_workers_serving,
    workers_killed,
    wrk,
)


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
    auth = f"Authorization: Bearer {HEALTH_TOKEN}\r\n" if path == "/health" else ""
    req = f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}\r\n{auth}Connection: close\r\n\r\n".encode()
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
                auth = bearer(session_token(srv.port, f"bench-{name}"))
                status, _ = http_request(srv.port, "PUT", "/cache/k", value, headers=auth)
                if status != 204:
                    raise BenchError(f"{name}: PUT /cache/k answered {status}")
                status, body = http_request(srv.port, "GET", "/cache/k", headers=auth)
                if status != 200 or body != value:
                    raise BenchError(f"{name}: GET /cache/k answered {status} {body[:40]!r}")
            except BenchError as exc:
                ctx.fail("cache", name, exc)
                srv.stop()
                continue
            servers[name] = (srv, auth)
        names = list(servers)
        for name, (srv, auth) in servers.items():
            wrk(srv.port, "/cache/k", conns, 2, 1, headers=auth)  # warm-up
        samples: dict[str, list[dict]] = {n: [] for n in [*names, "redis-benchmark"]}
        for _ in range(ctx.runs):
            for name, (srv, auth) in servers.items():
                sample = wrk(srv.port, "/cache/k", conns, 2, dur, headers=auth)
                if sample["non2xx"]:
                    raise BenchError(f"{name}: {sample['non2xx']} GET /cache/k answers were not 200")
                samples[name].append(sample)
            samples["redis-benchmark"].append(redis_benchmark(redis.port, conns, n_redis, size))
        for name, (srv, _) in servers.items():  # the figures above must have come from Redis
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


def bcrypt_rate(cost: int, n: int) -> dict:
    """Hashes per second at `cost`: one thread, and every core (a process pool), with the
    `bcrypt` package (its hashing core is Rust): bench/vpy/bcrypt_rate.py."""
    r = subprocess.run([str(VPY), str(VPY_PROGRAMS / "bcrypt_rate.py"), str(cost), str(n)],
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
            # The login throttle lifted: this measures what bcrypt work costs the server (the
            # throttle itself is the abuse scenario's, measure_abuse).
            env = {"REDIS_URL": redis.url, "BCRYPT_COST": cost,
                   "HERDSMAN_AUTH_LIMIT_ACCOUNT": 1_000_000, "HERDSMAN_AUTH_LIMIT_ADDRESS": 1_000_000}
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


def peer_packages_bytes() -> int:
    """The bytes on disk of the peer's packages and everything they require (not the harness's
    own matplotlib: bench/vpy/peer_packages_bytes.py), plus its app's files."""
    reqs = [line.split("#")[0].strip() for line in (PEER_DIR / "requirements.txt").read_text()
            .splitlines()]
    reqs = [r for r in reqs if r and not r.startswith("matplotlib")]
    # uvicorn[standard]: the extras it is installed with are part of the peer.
    extras = ["uvloop", "httptools", "websockets", "watchfiles", "python-dotenv", "pyyaml"]
    r = subprocess.run([str(VPY), str(VPY_PROGRAMS / "peer_packages_bytes.py"), *reqs, *extras],
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


def measure_history(ctx: Ctx) -> dict:
    """bench/history.py against the binary under test: the long version (>= 10,000 operations
    under cuts, pauses and slow links), the short one under --smoke. Its own process, so that its
    asyncio proxies and client threads end with it; BenchError when it finds an anomaly."""
    summary = OUT / "history" / "summary.json"
    summary.unlink(missing_ok=True)
    argv = ["python3", str(BENCH / "history.py"), "--herdsman", str(ctx.herdsman), "--json", str(summary)]
    r = subprocess.run(argv + (["--short"] if ctx.smoke else []), capture_output=True, text=True,
                       timeout=900)
    print(r.stdout, end="")
    if not summary.exists():
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"history.py exited {r.returncode}: {last}")
    figures = json.loads(summary.read_text())
    if r.returncode != 0:
        found = ", ".join(f"{rule} {n}" for rule, n in figures["anomalies"].items())
        raise BenchError(f"history.py exited {r.returncode}; anomalies: {found}")
    return figures


MEASURE = {"seed": measure_seed, "boot": measure_boot, "live": measure_live, "cache": measure_cache,
           "login": measure_login, "memory": measure_memory, "image": measure_image,
           "chaos": chaos.measure_chaos, "abuse": abuse.measure_abuse, "history": measure_history}

# ---------------------------------------------------------------------------------------------
# Around the measurements: the noise, the machine, missing figures
# ---------------------------------------------------------------------------------------------


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
    pipv = subprocess.run([str(VPY), str(VPY_PROGRAMS / "peer_versions.py")],
                          capture_output=True, text=True).stdout.strip()
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
