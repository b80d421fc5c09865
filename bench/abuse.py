"""The abuse scenarios (issue 11): what an attacker's floods cost each server, measured from the
outside. Measuring side only; bench/report.py renders the figures.

- guessing: a password-guessing flood on POST /auth/login (one account, wrong passwords, 8
  connections as fast as answered) with a paced /live probe beside it: how many bcrypt
  verifications ran (every answer but a 429 is one), the 429 share, /live p99 during the flood.
- anonymous-put: PUT /cache/{key} of 1 MB values with no token: every answer should be a 401,
  and the workers' RSS should not move.
- put-redis-up / put-redis-down: a logged-in user PUTs 1 MB values (herdsman: a 16 MiB memory
  budget and the per-user quota raised out of the way), Redis up, and Redis stopped after the
  session was verified by every worker; the workers' RSS growth, the answers, and how many
  acknowledged (204) values are missing from Redis once it is back.
"""

from __future__ import annotations

import socket
import threading
import time

from harness import (
    LOOPBACK,
    BenchError,
    Ctx,
    RedisServer,
    bearer,
    http_json,
    log,
    probe,
    proc_kib,
    read_response,
    resp_command,
    session_token,
    start_target,
    wait_workers_serving,
)

VALUE_BYTES = 1_000_000
MEMORY_BUDGET = 16 << 20  # herdsman's HERDSMAN_CACHE_MAX_BYTES in the PUT floods
PASSWORD = "correct horse battery staple"


def one_request(port: int, method: str, path: str, body: bytes, headers: dict,
                timeout: float = 10.0) -> int | str:
    """A request on a new connection: its status, or what went wrong (a server may answer and
    close before it has read a large body: `closed`)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: {LOOPBACK}\r\nConnection: close\r\n"
    head += f"Content-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
            try:
                s.sendall(head.encode() + b"\r\n" + body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # answered early: the status may still be there to read
            status, _, _ = read_response(s)
            return status
    except (OSError, ValueError, IndexError):
        return "closed"


def flood(port: int, method: str, path_of, body: bytes, headers: dict, duration: float,
          connections: int) -> dict:
    """`connections` threads sending back to back for `duration` s; counts by status."""
    counts: dict = {}
    lock = threading.Lock()
    end = time.monotonic() + duration

    def run(idx: int) -> None:
        n = 0
        while time.monotonic() < end:
            status = one_request(port, method, path_of(idx, n), body, headers)
            n += 1
            with lock:
                counts[str(status)] = counts.get(str(status), 0) + 1

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(connections)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(duration + 30)
    return counts


def worker_rss_mib(srv) -> list[float]:
    return [(proc_kib(pid, "VmRSS") or 0) / 1024 for pid in srv.pids()[1:]]


def guessing(ctx: Ctx, name: str) -> dict:
    dur = 3.0 if ctx.smoke else 10.0
    with RedisServer() as redis:
        env = {"REDIS_URL": redis.url, "BCRYPT_COST": ctx.args.bcrypt_cost}
        with start_target(ctx, name, workers=2, env=env) as srv:
            wait_workers_serving(srv, 2, redis=True)
            status, body = http_json(srv.port, "POST", "/auth/register",
                                     {"username": "victim", "password": PASSWORD}, timeout=30)
            if status != 201:
                raise BenchError(f"{name}: register answered {status} {body}")
            wrong = b'{"username":"victim","password":"guess-guess-guess"}'
            box: dict = {}

            def attack():
                box["counts"] = flood(srv.port, "POST", lambda i, n: "/auth/login", wrong,
                                      {"Content-Type": "application/json"}, dur, 8)

            th = threading.Thread(target=attack)
            th.start()
            time.sleep(0.3)
            live = probe(srv.port, "/live", dur - 0.6)
            th.join(dur + 60)
    counts = box.get("counts") or {}
    attempts = sum(counts.values())
    throttled = counts.get("429", 0)
    if not attempts:
        raise BenchError(f"{name}: the guessing flood sent nothing")
    return {
        "duration_s": dur,
        "attempts": attempts,
        "statuses": counts,
        # A 401 is a verification that ran (unknown users too: against a dummy hash).
        "bcrypt_verifications": counts.get("401", 0) + counts.get("200", 0),
        "throttled_share": throttled / attempts,
        "live_p99_ms": live["p99_ms"],
        "live_failed": live["failed"],
    }


def anonymous_put(ctx: Ctx, name: str) -> dict:
    dur = 2.0 if ctx.smoke else 5.0
    value = b"x" * VALUE_BYTES
    with RedisServer() as redis:
        with start_target(ctx, name, workers=2, env={"REDIS_URL": redis.url}) as srv:
            wait_workers_serving(srv, 2, redis=True)
            before = worker_rss_mib(srv)
            counts = flood(srv.port, "PUT", lambda i, n: f"/cache/anon-{i}-{n}", value, {}, dur, 4)
            time.sleep(0.3)
            after = worker_rss_mib(srv)
    sent = sum(counts.values())
    return {
        "duration_s": dur,
        "requests": sent,
        "statuses": counts,
        "unauthorized_share": (counts.get("401", 0) + counts.get("closed", 0)) / max(1, sent),
        "worker_rss_before_mib": before,
        "worker_rss_after_mib": after,
        "max_worker_growth_mib": max((a - b for a, b in zip(after, before)), default=0.0),
    }


def _stored_key(name: str, user: str, key: str) -> str:
    return f"herdsman:cache:user:{user}/{key}" if name == "herdsman" else f"cache:{user}/{key}"


def authenticated_put(ctx: Ctx, name: str, redis_down: bool) -> dict:
    values = 30 if ctx.smoke else 150
    value = b"y" * VALUE_BYTES
    env_extra = {"HERDSMAN_CACHE_MAX_BYTES": MEMORY_BUDGET, "HERDSMAN_USER_MAX_BYTES": 1 << 40,
                 "HERDSMAN_USER_MAX_KEYS": 1 << 20}
    with RedisServer(persistent=True) as redis:
        with start_target(ctx, name, workers=2, env={"REDIS_URL": redis.url, **env_extra}) as srv:
            wait_workers_serving(srv, 2, redis=True)
            user = "flooder"
            auth = bearer(session_token(srv.port, user))
            # Every worker checks the session once (fresh connections reach both), as real
            # traffic would have before an outage.
            for _ in range(10):
                http_json(srv.port, "GET", "/auth/me", headers=auth)
            before = worker_rss_mib(srv)
            peak = list(before)
            if redis_down:
                redis.stop()
            counts: dict = {}
            acknowledged = []
            for i in range(values):
                status = one_request(srv.port, "PUT", f"/cache/v{i}", value, auth)
                counts[str(status)] = counts.get(str(status), 0) + 1
                if status == 204:
                    acknowledged.append(f"v{i}")
                peak = [max(p, r) for p, r in zip(peak, worker_rss_mib(srv))]
            alive = len(srv.pids()) - 1
            if redis_down:
                redis.start()
                wait_workers_serving(srv, 2, redis=True, timeout=30)
                time.sleep(1.0)  # the probe replays before it closes the breaker; slack
            lost = [k for k in acknowledged
                    if resp_command(redis.port, "EXISTS", _stored_key(name, user, k)) != b":1\r\n"]
    log(f"abuse put ({'Redis down' if redis_down else 'Redis up'}) on {name}: {counts}, "
        f"{len(lost)} acknowledged values missing from Redis")
    return {
        "values": values,
        "statuses": counts,
        "acknowledged": len(acknowledged),
        "acknowledged_lost": len(lost),
        "worker_rss_before_mib": before,
        "worker_rss_peak_mib": peak,
        "max_worker_growth_mib": max((p - b for p, b in zip(peak, before)), default=0.0),
        "workers_alive_after": alive,
    }


PARTS = {
    "guessing": ("password guessing on POST /auth/login", guessing),
    "anonymous-put": ("anonymous PUT /cache of 1 MB values", anonymous_put),
    "put-redis-up": ("logged-in PUT of 1 MB values, Redis up",
                     lambda ctx, name: authenticated_put(ctx, name, redis_down=False)),
    "put-redis-down": ("logged-in PUT of 1 MB values, Redis stopped",
                       lambda ctx, name: authenticated_put(ctx, name, redis_down=True)),
}


def measure_abuse(ctx: Ctx) -> dict:
    res: dict = {"memory_budget_mib": MEMORY_BUDGET >> 20, "value_bytes": VALUE_BYTES,
                 "bcrypt_cost": ctx.args.bcrypt_cost, "parts": {}}
    for part, (title, fn) in PARTS.items():
        res["parts"][part] = {"title": title, "targets": {}}
        for name in ctx.targets("herdsman", "peer"):
            log(f"abuse {part} on {name}")
            try:
                res["parts"][part]["targets"][name] = fn(ctx, name)
            except (BenchError, OSError) as exc:
                ctx.fail(f"abuse {part}", name, exc)
    return res
