"""The chaos suite: herdsman and the peer under steady load while something goes wrong.

Every scenario runs the same way, on each server with WEB_CONCURRENCY=2:

1. start the server and wait until both workers answer;
2. start a `LoadRecorder` (8 keep-alive connections paced to 400 requests/s in total, every
   request's start, latency and outcome kept) and two `Poller`s: the master's children every
   20 ms, and GET /health on a new connection every 50 ms (which worker answers, its Redis);
3. cause the event(s) at fixed times and mark them;
4. let the load run on, then summarise.

The figures per scenario and server:

- failed: requests that got no HTTP answer (reset, refused, timed out) or a 5xx;
- misses: 404s on a key that exists (cache scenarios only);
- p99 before / during: latency of answered requests before the first event, and of those in
  flight at some point between the first event and 2 s after the last one;
- recovery: from the event until the server is whole again; what "whole" means depends on the
  scenario (`Trial.summary`): a replacement worker has answered /health and no request has
  failed or been slow (over 5x the p99 before the event, at least 20 ms) since; every worker is
  new and has answered /health (HUP);
  every worker reports Redis `up` in /health (after Redis comes back); the master has exited
  (SIGTERM).

Scenarios: kill9, hang, redis (stopped, back, paused, back), hup, max-requests, sigterm,
ws-hup (WebSocket clients through a SIGHUP: no HTTP load, see `ws_hup`), memory-leak (a leaking
route called under load, each server in a memory cgroup: see `memory_leak`) and the redis-*
misbehaviours.
The hang, sigterm, ws-hup and memory-leak scenarios use test-only routes (`/__test/block`,
`/__test/sleep`, `/__test/ws`, `/__test/leak`): herdsman built with `--features test-hooks`, the
peer started with PEER_TEST_HOOKS=1.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import signal
import socket
import subprocess
import threading
import time

from harness import (
    LOOPBACK,
    OUT,
    VPY,
    VPY_PROGRAMS,
    BenchError,
    LoadRecorder,
    Ctx,
    RedisServer,
    Server,
    bearer,
    http_request,
    log,
    pct,
    session_token,
    read_response,
    resp_command,
    socket_to,
    spread,
    children,
    health_sample,
    proc_kib,
    start_target,
    wait_workers_serving,
    workers_killed,
)

WORKERS = 2
RATE = 400.0
CONNECTIONS = 8
SETTLE_S = 2.0  # "during the event" lasts until this long after the last event
HANG_TIMEOUT_S = 3  # GUNICORN_TIMEOUT in the hang scenario, both servers
WS_CLIENTS = 20  # WebSocket clients in the ws-hup scenario
WS_GRACE_S = 20  # GRACEFUL_TIMEOUT in the ws-hup scenario, both servers
WS_GRACE_S_SMOKE = 5  # the same under --smoke, so that a server that waits it out stays brief


# ---------------------------------------------------------------------------------------------
# Recording: the load, the worker processes, /health
# ---------------------------------------------------------------------------------------------


class Poller:
    """Calls `sample()` every `every` seconds on a thread, keeping (t, value) on the load's
    clock, until stopped. Used for the worker set and for /health."""

    def __init__(self, rec: LoadRecorder, sample, every: float):
        self.rec, self.sample, self.every = rec, sample, every
        self.samples: list[tuple[float, object]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = self.rec.now()
            value = self.sample()
            if value is not None:
                self.samples.append((t, value))
            self._stop.wait(self.every)

    def start(self) -> "Poller":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def answered(sample) -> bool:
    """A LoadRecorder sample that got an HTTP answer other than a 5xx."""
    return sample[2] is not None and sample[2] < 500


def fire(port: int, path: str, timeout: float, out: list, method: str = "GET") -> threading.Thread:
    """One request on its own connection and thread; appends (status, latency_ms, error)."""

    def go():
        t0 = time.perf_counter()
        try:
            status, _ = http_request(port, method, path, timeout=timeout)
            out.append((status, (time.perf_counter() - t0) * 1e3, None))
        except (OSError, ValueError, IndexError) as exc:
            out.append((None, (time.perf_counter() - t0) * 1e3, type(exc).__name__))

    th = threading.Thread(target=go, daemon=True)
    th.start()
    return th


# ---------------------------------------------------------------------------------------------
# A trial: one scenario on one server
# ---------------------------------------------------------------------------------------------


class Trial:
    """The load, the worker watcher and the events of one scenario on one server.

        with Trial(srv, "/live", duration=8) as trial:
            trial.at(3.0)
            os.kill(trial.workers()[-1], signal.SIGKILL)
            trial.mark("kill -9 of a worker")
        return trial.summary(recovery="worker-replaced")
    """

    def __init__(self, srv: Server, path: str, duration: float, headers: dict | None = None, request=None):
        """request: see LoadRecorder (the bytes of each request, instead of GET path)."""
        self.srv, self.path, self.duration = srv, path, duration
        self.headers, self.request = headers, request
        self.extra: dict = {}

    def __enter__(self) -> "Trial":
        wait_workers_serving(self.srv, WORKERS)
        self.initial = children(self.srv.proc.pid)
        self.rec = LoadRecorder(self.srv.port, self.path, self.duration, headers=self.headers,
                                request=self.request).start()
        master = self.srv.proc.pid
        self.watcher = Poller(self.rec, lambda: children(master), 0.02).start()
        # /health on a new connection every 50 ms: which worker answers, what it says of Redis.
        self.health = Poller(self.rec, lambda: health_sample(self.srv.port), 0.05).start()
        return self

    def __exit__(self, *exc) -> None:
        self.rec.join()
        self.watcher.stop()
        self.health.stop()

    def at(self, t: float) -> None:
        """Sleep until t seconds after the load started."""
        wait = t - self.rec.now()
        if wait > 0:
            time.sleep(wait)

    def mark(self, label: str) -> float:
        return self.rec.mark(label)

    def workers(self) -> list[int]:
        return sorted(children(self.srv.proc.pid))

    # -- summary ---------------------------------------------------------------------------

    def new_workers(self) -> list[tuple[float, int]]:
        """(t first seen, pid) of every worker started after the load began."""
        seen, out = set(self.initial), []
        for t, pids in self.watcher.samples:
            for pid in sorted(pids - seen):
                out.append((t, pid))
            seen |= pids
        return out

    def _workers_whole_at(self, t_event: float, all_new: bool) -> float | None:
        """First time after t_event at which WORKERS workers run, at least one of them (all_new:
        every one) started after the load began, and each of those has answered /health."""
        greeted: set[int] = set()
        health = iter(self.health.samples)
        pending = next(health, None)
        for t, pids in self.watcher.samples:
            while pending is not None and pending[0] <= t:
                greeted.add(pending[1][0])
                pending = next(health, None)
            if t < t_event or len(pids) != WORKERS:
                continue
            fresh = pids - self.initial
            if (all_new and fresh != pids) or not fresh:
                continue
            if fresh <= greeted:
                return t
        return None

    def _redis_up_everywhere_at(self, t_event: float) -> float | None:
        """First time after t_event by which every worker running then has reported Redis
        `up` in /health since t_event."""
        up: set[int] = set()
        for t, (pid, status) in self.health.samples:
            if t < t_event:
                continue
            if status == "up":
                up.add(pid)
            current = next((p for tw, p in reversed(self.watcher.samples) if tw <= t), None)
            if current and current <= up:
                return t
        return None

    def summary(self, recovery: str | None) -> dict:
        """recovery: "worker-replaced", "all-workers-new", "redis-up" (from each event named
        "Redis back"), "master-exit" (set in extra by the scenario), or None (no single
        event to recover from)."""
        samples = self.rec.samples
        events = self.rec.events
        failed = [s for s in samples if not answered(s)]
        misses = [s for s in samples if s[2] == 404]
        t_first = events[0][0] if events else 0.0
        t_last = events[-1][0] if events else 0.0
        before = sorted(s[1] for s in samples if answered(s) and s[0] + s[1] / 1e3 < t_first)
        # Every answered request in flight at some point of the window, not only those sent
        # in it: a request that waited out the whole event belongs to it.
        in_window = lambda s: s[0] <= t_last + SETTLE_S and s[0] + s[1] / 1e3 >= t_first  # noqa: E731
        during = sorted(s[1] for s in samples if answered(s) and in_window(s))
        if not events:  # steady-state scenario: the whole run is "during"
            during = sorted(s[1] for s in samples if answered(s))
        if events and not during and not any(in_window(s) for s in failed):
            raise BenchError("chaos: no request was sent, answered or failed during the event")
        p99_before = pct(before, 0.99)
        slow_ms = max(5 * (p99_before or 0.0), 20.0)
        res = {
            "requests": len(samples),
            "failed": len(failed),
            "failure_kinds": sorted({f"{s[2]}" if s[2] is not None else s[3] for s in failed}),
            "misses": len(misses),
            "p99_before_ms": p99_before,
            "p99_during_ms": pct(during, 0.99),
            "max_during_ms": during[-1] if during else None,
            # 0 when every connection was stuck through the window: a stall, not a gap in the
            # measurement (p99/max during are then None, and the failures say what happened).
            "answered_during": len(during),
            "events": [label for _, label in events],
            "new_workers": len(self.new_workers()),
            **self.extra,
        }
        if recovery in ("worker-replaced", "all-workers-new"):
            # The last request that failed or was slow after the event, and the replacement.
            bad_ends = [s[0] + s[1] / 1e3 for s in samples if s[0] + s[1] / 1e3 >= t_first
                        and (not answered(s) or s[1] > slow_ms)]
            whole = self._workers_whole_at(t_first, all_new=recovery == "all-workers-new")
            res["recovery_ms"] = (None if whole is None
                                  else (max([whole, *bad_ends]) - t_first) * 1e3)
        elif recovery == "redis-up":
            backs = [t for t, label in events if label.startswith("Redis back")]
            times = [self._redis_up_everywhere_at(t) for t in backs]
            res["recovery_each_ms"] = [None if t is None else (t - tb) * 1e3
                                       for t, tb in zip(times, backs)]
            res["recovery_ms"] = (None if None in times or not times
                                  else max(res["recovery_each_ms"]))
        elif recovery == "master-exit":
            res["recovery_ms"] = self.extra.get("exit_after_ms")
        else:
            res["recovery_ms"] = None
        return res

    def timeline(self, target: str) -> dict:
        """What the plot needs: every request, the events, when new workers appeared."""
        return {"target": target, "samples": self.rec.samples, "events": self.rec.events,
                "new_workers": [t for t, _ in self.new_workers()]}


# ---------------------------------------------------------------------------------------------
# The scenarios: (ctx, target) -> (summary, timeline)
# ---------------------------------------------------------------------------------------------


def hooks_env(target: str) -> dict:
    return {"PEER_TEST_HOOKS": "1"} if target == "peer" else {}


def require_test_hooks(srv: Server) -> None:
    srv.wait_http("/live")
    status, _ = http_request(srv.port, "GET", "/__test/sleep?ms=1", timeout=5)
    if status != 200:
        raise BenchError(f"{srv.name}: GET /__test/sleep answered {status}: the binary was built "
                         "without test hooks (cargo build --release --features test-hooks)")


def kill9(ctx: Ctx, target: str):
    with start_target(ctx, target, WORKERS) as srv, Trial(srv, "/live", 8.0) as trial:
        trial.at(3.0)
        os.kill(trial.workers()[-1], signal.SIGKILL)
        trial.mark("kill -9 of a worker")
    return trial.summary("worker-replaced"), trial.timeline(target)


def hang(ctx: Ctx, target: str):
    env = {"GUNICORN_TIMEOUT": HANG_TIMEOUT_S, **hooks_env(target)}
    with start_target(ctx, target, WORKERS, env) as srv:
        require_test_hooks(srv)
        with Trial(srv, "/live", 10.0) as trial:
            trial.at(2.0)
            probe: list = []
            fire(srv.port, "/__test/block?ms=60000", 12.0, probe)
            trial.mark(f"a worker's event loop blocks (timeout {HANG_TIMEOUT_S} s)")
    return trial.summary("worker-replaced"), trial.timeline(target)


def hup(ctx: Ctx, target: str):
    with start_target(ctx, target, WORKERS) as srv, Trial(srv, "/live", 10.0) as trial:
        trial.at(3.0)
        srv.proc.send_signal(signal.SIGHUP)
        trial.mark("SIGHUP (rolling restart)")
    return trial.summary("all-workers-new"), trial.timeline(target)


def max_requests(ctx: Ctx, target: str):
    env = {"MAX_REQUESTS": 1000, "MAX_REQUESTS_JITTER": 100}
    with start_target(ctx, target, WORKERS, env) as srv, Trial(srv, "/live", 10.0) as trial:
        pass
    res = trial.summary(None)
    res["recycled"] = res["new_workers"]
    return res, trial.timeline(target)


def sigterm(ctx: Ctx, target: str):
    """Four 3-second requests in flight when SIGTERM arrives: each must complete; requests the
    load sends after the signal may be refused (the server is going away): counted apart."""
    with start_target(ctx, target, WORKERS, hooks_env(target)) as srv:
        require_test_hooks(srv)
        with Trial(srv, "/live", 7.0) as trial:
            trial.at(2.0)
            slow: list = []
            threads = [fire(srv.port, "/__test/sleep?ms=3000", 15.0, slow) for _ in range(4)]
            time.sleep(0.5)
            t_sig = trial.mark("SIGTERM, four 3 s requests in flight")
            srv.proc.send_signal(signal.SIGTERM)
            try:
                status = srv.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                status = None
            exit_after = trial.rec.now() - t_sig
            for th in threads:
                th.join(15)
            trial.extra = {
                "slow_completed": sum(1 for s in slow if s[0] == 200),
                "slow_total": len(threads),
                "exit_status": status,
                "exit_after_ms": exit_after * 1e3 if status is not None else None,
            }
    res = trial.summary("master-exit")
    # Split the load's failures: in flight (sent before the signal) vs. sent after it.
    in_flight = [s for s in trial.rec.samples if s[0] < t_sig and not answered(s)]
    res["failed_after_signal"] = res["failed"] - len(in_flight)
    res["failed"] = len(in_flight) + res["slow_total"] - res["slow_completed"]
    return res, trial.timeline(target)


def redis_outage(ctx: Ctx, target: str):
    """GET /cache/k with a session (a value PUT through the server before the load) while Redis
    is stopped (SIGTERM; restarted on its port with its append-only file: the value and the
    session survive), then paused (SIGSTOP: it hangs instead of refusing), then resumed. The
    session is checked on every request by both servers: herdsman trusts one it verified
    lately through an outage (src/sessions.rs), the peer asks Redis each time."""
    with RedisServer(persistent=True) as redis:
        env = {"REDIS_URL": redis.url}
        with start_target(ctx, target, WORKERS, env) as srv:
            wait_workers_serving(srv, WORKERS, redis=True)
            auth = bearer(session_token(srv.port, "chaos"))
            status, _ = http_request(srv.port, "PUT", "/cache/k", b"v" * 64, headers=auth)
            if status != 204:
                raise BenchError(f"{srv.name}: PUT /cache/k answered {status}")
            with Trial(srv, "/cache/k", 14.0, headers=auth) as trial:
                trial.at(2.0)
                redis.stop()
                trial.mark("Redis stopped")
                trial.at(5.0)
                redis.start()
                trial.mark("Redis back (restarted)")
                trial.at(8.0)
                redis.pause()
                trial.mark("Redis paused")
                trial.at(11.0)
                redis.resume()
                trial.mark("Redis back (resumed)")
    return trial.summary("redis-up"), trial.timeline(target)


def ws_hup(ctx: Ctx, target: str):
    """WS_CLIENTS WebSocket echo clients (bench/vpy/ws_clients.py, an echo every 250 ms each)
    connected when SIGHUP arrives. A client told to go reconnects at once. Figures: clients
    whose first connection ended with a close frame (and its codes), clients that reconnected and
    were echoed, connections that could not be made, and the restart's duration (SIGHUP until
    WORKERS workers run and none is an old one), against GRACEFUL_TIMEOUT=WS_GRACE_S."""
    grace = WS_GRACE_S_SMOKE if ctx.smoke else WS_GRACE_S
    env = {"GRACEFUL_TIMEOUT": grace, **hooks_env(target)}
    with start_target(ctx, target, WORKERS, env) as srv:
        require_test_hooks(srv)
        wait_workers_serving(srv, WORKERS)
        master = srv.proc.pid
        initial = children(master)
        clients = subprocess.Popen(
            [str(VPY), str(VPY_PROGRAMS / "ws_clients.py"), str(srv.port), "/__test/ws", str(WS_CLIENTS)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            if clients.stdout.readline().strip() != "ready":
                raise BenchError(f"{srv.name}: the WebSocket clients could not connect")
            t0 = time.monotonic()
            new_workers: list[float] = []
            seen = set(initial)
            time.sleep(2.0)
            t_hup = time.monotonic()
            srv.proc.send_signal(signal.SIGHUP)
            restarted_at = None
            while time.monotonic() < t_hup + grace + 15:
                kids = children(master)
                for _ in kids - seen:
                    new_workers.append(time.monotonic() - t0)
                seen |= kids
                if restarted_at is None and len(kids) == WORKERS and not kids & initial:
                    restarted_at = time.monotonic()
                if restarted_at is not None and time.monotonic() > restarted_at + 2.0:
                    break  # two more seconds of echoes on the new workers
                time.sleep(0.02)
            out, _ = clients.communicate(input="", timeout=60)
        finally:
            if clients.poll() is None:
                clients.kill()
    recs = json.loads(out.splitlines()[-1])["clients"]
    first_codes = [r["closes"][0][1] if r["closes"] else None for r in recs]
    res = {
        "clients": len(recs),
        # 1001 "going away" (herdsman), 1012 "service restart" (uvicorn): told, not cut (1006).
        "clean_close": sum(1 for c in first_codes if c is not None and c != 1006),
        "first_close_codes": sorted({str(c) for c in first_codes}),
        "reconnected": sum(1 for r in recs if r["reconnected"]),
        # From a client's close to its first echo on a new connection: its time away.
        "away_max_ms": max(((r["reconnected"][0] - r["closes"][0][0]) * 1e3
                            for r in recs if r["closes"] and r["reconnected"]), default=None),
        "failed_connects": sum(len(r["failed_connects"]) for r in recs),
        "restart_ms": None if restarted_at is None else (restarted_at - t_hup) * 1e3,
        "grace_s": grace,
    }
    # The plot's timeline: each echo as an answered request, each failed connection attempt as
    # a failure, each close as a mark with its code.
    samples = [[t - t0, ms, 200, None] for r in recs for t, ms in r["echoes"]]
    samples += [[t - t0, 0.01, None, kind] for r in recs for t, kind in r["failed_connects"]]
    closes = [[t - t0, code] for r in recs for t, code in r["closes"]]
    timeline = {"target": target, "samples": sorted(samples), "events": [[t_hup - t0, "SIGHUP"]],
                "new_workers": new_workers, "closes": closes}
    return res, timeline


# ---------------------------------------------------------------------------------------------
# A Redis that misbehaves without dying (issue 14): hung, full, read-only, slow
# ---------------------------------------------------------------------------------------------


def cache_request(method: str, key: str, token: str, body: bytes = b"") -> bytes:
    """The bytes of one /cache request, keep-alive, in `token`'s session: every /cache request of
    these scenarios (the load's and the read-back's) is built here."""
    head = (f"{method} /cache/{key} HTTP/1.1\r\nHost: {LOOPBACK}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def put_value(key: str) -> bytes:
    """The value the load PUTs under key: 64 bytes that name the key, to be read back."""
    return (key.encode() * 64)[:64]


class PutLoad:
    """LoadRecorder's request: each PUT a new key (c{connection}-{n}), so a write lost anywhere
    shows; remembers how many each connection sent."""

    def __init__(self, token: str):
        self.sent: dict[int, int] = {}
        self.token = token

    def __call__(self, conn: int, n: int) -> bytes:
        self.sent[conn] = n + 1
        key = f"c{conn}-{n}"
        return cache_request("PUT", key, self.token, put_value(key))

    def keys(self) -> list[str]:
        return [f"c{conn}-{n}" for conn, count in self.sent.items() for n in range(count)]


def lost_writes(port: int, load: PutLoad, res: dict, samples: list) -> None:
    """Reads back every key the load PUT (one keep-alive connection) into res: `missing`, keys
    with no or another value, and `lost_writes`, those beyond the PUTs the server refused or
    did not answer: acknowledged writes that are gone (exact when no PUT was refused)."""
    refused = sum(1 for s in samples if s[2] is None or s[2] >= 300)
    missing = 0
    sock = socket_to(port, 5.0)
    try:
        for key in load.keys():
            sock.sendall(cache_request("GET", key, load.token))
            status, _, body = read_response(sock)
            missing += status != 200 or body != put_value(key)
    finally:
        sock.close()
    res["missing"] = missing
    res["lost_writes"] = max(0, missing - refused)


class SlowProxy:
    """A TCP port on 127.0.0.1 in front of a Redis that holds every reply chunk `delay`
    seconds before passing it on (requests pass at once); replies are delayed, not serialised."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.delay = 0.0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(128)
        self.sock.settimeout(0.1)
        self.url = f"redis://{LOOPBACK}:{self.sock.getsockname()[1]}/0"
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                continue
            client.settimeout(None)
            try:
                server = socket.create_connection((LOOPBACK, self.upstream_port))
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._copy, args=(client, server, 0.0), daemon=True).start()
            threading.Thread(target=self._copy, args=(server, client, None), daemon=True).start()

    def _copy(self, src: socket.socket, dst: socket.socket, delay) -> None:
        """delay None: this proxy's current delay (the replies); a number: that (requests)."""
        due: queue.Queue = queue.Queue()

        def send():
            while (item := due.get()) is not None:
                wait = item[0] - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    dst.sendall(item[1])
                except OSError:
                    return

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            while data := src.recv(65536):
                due.put((time.monotonic() + (self.delay if delay is None else delay), data))
        except OSError:
            pass
        due.put(None)
        sender.join(5)
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


def redis_config(redis: RedisServer, *args: str) -> None:
    reply = resp_command(redis.port, *args)
    if not reply.startswith(b"+OK"):
        raise BenchError(f"redis {' '.join(args)}: {reply!r}")


def misbehaving(ctx: Ctx, target: str, env: dict, fault, heal, fault_label: str, heal_label: str):
    """PUT load (each request a new key) while Redis misbehaves from 3 s for 5 s (2 s in
    --smoke); then every key the load PUT is read back through the server."""
    t_fault, length = 3.0, (2.0 if ctx.smoke else 5.0)
    # A new key each request: far past the per-user key quota, which is not what is measured.
    env = {**env, "HERDSMAN_USER_MAX_KEYS": 1 << 30, "HERDSMAN_USER_MAX_BYTES": 1 << 40}
    with start_target(ctx, target, WORKERS, env) as srv:
        wait_workers_serving(srv, WORKERS, redis=True)
        load = PutLoad(session_token(srv.port, "chaos-misbehaving"))
        with Trial(srv, "/cache", t_fault + length + 4.0, request=load) as trial:
            trial.at(t_fault)
            fault()
            trial.mark(fault_label)
            trial.at(t_fault + length)
            heal()
            trial.mark(f"Redis back ({heal_label})")
        res = trial.summary("redis-up")
        wait_workers_serving(srv, WORKERS, redis=True)
        lost_writes(srv.port, load, res, trial.rec.samples)
    return res, trial.timeline(target)


def redis_hang(ctx: Ctx, target: str):
    with RedisServer() as redis:
        return misbehaving(ctx, target, {"REDIS_URL": redis.url}, redis.pause, redis.resume,
                           "Redis paused (SIGSTOP: hangs)", "SIGCONT")


def redis_full(ctx: Ctx, target: str):
    with RedisServer() as redis:
        redis_config(redis, "CONFIG", "SET", "maxmemory-policy", "noeviction")
        return misbehaving(ctx, target, {"REDIS_URL": redis.url},
                           lambda: redis_config(redis, "CONFIG", "SET", "maxmemory", "1"),
                           lambda: redis_config(redis, "CONFIG", "SET", "maxmemory", "0"),
                           "Redis full (maxmemory, noeviction: OOM)", "maxmemory raised")


def redis_readonly(ctx: Ctx, target: str):
    """The Redis the server uses becomes a replica of its standby (a failover the server's URL
    did not follow), then is promoted back. The standby holds a copy, so no data is lost by
    the switch itself."""
    with RedisServer() as redis, RedisServer() as standby:
        redis_config(standby, "REPLICAOF", LOOPBACK, str(redis.port))

        def fail_over():
            redis_config(standby, "REPLICAOF", "NO", "ONE")
            redis_config(redis, "REPLICAOF", LOOPBACK, str(standby.port))

        return misbehaving(ctx, target, {"REDIS_URL": redis.url}, fail_over,
                           lambda: redis_config(redis, "REPLICAOF", "NO", "ONE"),
                           "Redis demoted to a replica (READONLY)", "promoted again")


def redis_slow(ctx: Ctx, target: str):
    """Every Redis reply 50 ms late (a proxy), then on time again."""
    with RedisServer() as redis:
        proxy = SlowProxy(redis.port)
        try:
            return misbehaving(ctx, target, {"REDIS_URL": proxy.url},
                               lambda: setattr(proxy, "delay", SLOW_REDIS_S),
                               lambda: setattr(proxy, "delay", 0.0),
                               f"Redis replies {SLOW_REDIS_S * 1e3:.0f} ms late", "on time")
        finally:
            proxy.close()


SLOW_REDIS_S = 0.05


# ---------------------------------------------------------------------------------------------
# A leaking worker under a memory limit (issue 15 point 1)
# ---------------------------------------------------------------------------------------------

MEMORY_LIMIT = 256 << 20  # the "container's" memory limit, each server's whole process tree
LEAK_MIB = 4  # per POST /__test/leak
LEAK_EVERY_S = 0.1  # 40 MiB/s in all, spread over the workers (a new connection each)
# herdsman's line: 80 % of the limit shared among the workers, what its platform fit gives. In
# bytes: herdsman reads the limit at the cgroup mount's root (a container's own cgroup), and
# the bench's cgroup is a child of this machine's root.
MEMORY_LINE = int(0.8 * MEMORY_LIMIT / WORKERS)
_cgroup_serial = itertools.count()


class MemoryCgroup:
    """A memory cgroup with a limit, made for one server and removed after: cgroup v2 where a
    cgroup2 mount has the memory controller (memory.max), else v1 (memory.limit_in_bytes).
    `MemoryCgroup.make(limit)` is None when neither can be made here (not root, no controller,
    a read-only /sys/fs/cgroup); `wrap(argv)` starts argv inside it (a shell that moves itself in,
    then execs, so the pid is the server's)."""

    def __init__(self, path: str, v2: bool):
        self.path, self.v2 = path, v2

    @staticmethod
    def _mounts() -> list[tuple[str, str, str]]:
        with open("/proc/self/mounts") as f:
            return [tuple(line.split()[1:4]) for line in f]

    @classmethod
    def make(cls, limit: int) -> "MemoryCgroup | None":
        name = f"herdsman-bench-{os.getpid()}-{next(_cgroup_serial)}"
        for mount, fstype, options in cls._mounts():
            try:
                if fstype == "cgroup2":
                    with open(os.path.join(mount, "cgroup.controllers")) as f:
                        if "memory" not in f.read().split():
                            continue
                    with open(os.path.join(mount, "cgroup.subtree_control"), "w") as f:
                        f.write("+memory")
                    v2, limit_file = True, "memory.max"
                elif fstype == "cgroup" and "memory" in options.split(","):
                    v2, limit_file = False, "memory.limit_in_bytes"
                else:
                    continue
                path = os.path.join(mount, name)
                os.mkdir(path)
                group = cls(path, v2)
                try:
                    group._write(limit_file, str(limit))
                    if v2:
                        group._write("memory.swap.max", "0")
                except OSError:
                    group.close()
                    raise
                return group
            except OSError:
                continue
        return None

    def _write(self, file: str, value: str) -> None:
        with open(os.path.join(self.path, file), "w") as f:
            f.write(value)

    def _read(self, file: str) -> str:
        with open(os.path.join(self.path, file)) as f:
            return f.read()

    def wrap(self, argv: list[str]) -> list[str]:
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', self.path, *argv]

    def peak_bytes(self) -> int | None:
        try:
            return int(self._read("memory.peak" if self.v2 else "memory.max_usage_in_bytes"))
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int | None:
        """Processes the limit's OOM killer killed (memory.events / memory.oom_control)."""
        try:
            text = self._read("memory.events" if self.v2 else "memory.oom_control")
        except OSError:
            return None
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return None

    def close(self) -> None:
        """Removes the cgroup once its processes are gone (they were killed with the server)."""
        for _ in range(50):
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
        log(f"could not remove the cgroup {self.path}")


def own_memory(pid: int) -> int | None:
    """A process's PSS in bytes (smaps_rollup), as herdsman's memory line measures it."""
    kib = proc_kib(pid, "Pss", "smaps_rollup")
    return None if kib is None else kib << 10


def memory_leak(ctx: Ctx, target: str):
    """GET /live under load while POST /__test/leak?mb=LEAK_MIB arrives every LEAK_EVERY_S on a
    new connection (each keeps its MiB for the worker's life), from 2 s until 2 s before the end.
    Each server runs in a memory cgroup of MEMORY_LIMIT; herdsman with HERDSMAN_MAX_WORKER_MEMORY
    at 80 % of it among the workers, the peer as gunicorn is (no such setting: benoitc/gunicorn
    #1299). Figures: the load's failures, workers started, each worker's peak own memory (PSS,
    sampled every 100 ms), the cgroup's peak usage and its OOM kills. Without a cgroup here the
    servers run unbounded and the figures show the growth."""
    duration = 10.0 if ctx.smoke else 16.0
    env = dict(hooks_env(target))
    if target == "herdsman":
        env["HERDSMAN_MAX_WORKER_MEMORY"] = MEMORY_LINE
    group = MemoryCgroup.make(MEMORY_LIMIT)
    if group is None:
        log("memory-leak: no memory cgroup can be made here: the servers run without a limit")
    try:
        srv = start_target(ctx, target, WORKERS, env)
        if group is not None:
            srv.argv = group.wrap(srv.argv)
        with srv:
            require_test_hooks(srv)
            master = srv.proc.pid
            peaks: dict[int, int] = {}

            def sample():
                now = {pid: own_memory(pid) for pid in children(master)}
                for pid, pss in now.items():
                    if pss is not None:
                        peaks[pid] = max(peaks.get(pid, 0), pss)
                return {pid: pss for pid, pss in now.items() if pss is not None}

            with Trial(srv, "/live", duration) as trial:
                memory = Poller(trial.rec, sample, 0.1).start()
                trial.at(2.0)
                trial.mark(f"leak: {LEAK_MIB} MiB every {LEAK_EVERY_S * 1e3:.0f} ms")
                leaks: list = []
                while trial.rec.now() < duration - 2.0:
                    fire(srv.port, f"/__test/leak?mb={LEAK_MIB}", 5.0, leaks, method="POST")
                    time.sleep(LEAK_EVERY_S)
                trial.mark("leak stops")
                trial.at(duration)
                memory.stop()
            trial.extra = {
                "limit_mib": None if group is None else MEMORY_LIMIT >> 20,
                "line_mib": MEMORY_LINE / (1 << 20) if target == "herdsman" else None,
                "leaks_sent": len(leaks),
                "leaks_answered": sum(1 for status, _, _ in leaks if status == 200),
                "worker_peak_mib": max(peaks.values(), default=0) / (1 << 20),
                "cgroup_peak_mib": None if group is None or group.peak_bytes() is None
                else group.peak_bytes() / (1 << 20),
                "oom_kills": None if group is None else group.oom_kills(),
                # From the master's log: workers it lost to a signal (the OOM killer's SIGKILL).
                "workers_killed": workers_killed(srv.log_path.read_text(errors="replace")),
            }
            timeline = trial.timeline(target)
            timeline["memory"] = [[t, {str(pid): pss / (1 << 20) for pid, pss in by_pid.items()}]
                                  for t, by_pid in memory.samples]
            timeline["memory_lines"] = [[label, mib] for label, mib in
                                        (("limit", None if group is None else MEMORY_LIMIT >> 20),
                                         ("HERDSMAN_MAX_WORKER_MEMORY", trial.extra["line_mib"]))
                                        if mib is not None]
    finally:
        if group is not None:
            group.close()
    res = trial.summary(None)
    res["continuous"] = True  # a steady leak, nothing to recover from
    return res, timeline


SCENARIOS = {
    "kill9": ("kill -9 of one worker", kill9),
    "hang": ("a hung worker (event loop blocked)", hang),
    "redis": ("Redis stopped, back, paused, back (GET /cache/k)", redis_outage),
    "hup": ("SIGHUP rolling restart", hup),
    "max-requests": ("MAX_REQUESTS=1000 (+ jitter 100) recycling, 10 s", max_requests),
    "sigterm": ("SIGTERM with slow requests in flight", sigterm),
    "ws-hup": (f"SIGHUP with {WS_CLIENTS} WebSocket clients connected", ws_hup),
    "redis-hang": ("Redis hangs 5 s (PUT /cache, a new key each)", redis_hang),
    "redis-full": ("Redis full 5 s: OOM (PUT /cache, a new key each)", redis_full),
    "redis-readonly": ("Redis a replica 5 s: READONLY (PUT /cache, a new key each)", redis_readonly),
    "redis-slow": ("Redis replies 50 ms late for 5 s (PUT /cache, a new key each)", redis_slow),
    "memory-leak": (f"a route leaking {LEAK_MIB} MiB every {LEAK_EVERY_S * 1e3:.0f} ms under a "
                    f"{MEMORY_LIMIT >> 20} MiB memory limit", memory_leak),
}

# Scenarios left out of --smoke (they run when named with --chaos, and in full runs): both
# servers of memory-leak take 45 s in all, over the smoke's 30 s per scenario.
NOT_IN_SMOKE = ("memory-leak",)

# Scenarios whose figures are not the HTTP load's (FIGURES): aggregated with their own.
WS_FIGURES = ("clean_close", "reconnected", "away_max_ms", "failed_connects", "restart_ms")


# ---------------------------------------------------------------------------------------------
# The measurement: every scenario, both servers, several runs; the first run's timelines
# ---------------------------------------------------------------------------------------------


def measure_chaos(ctx: Ctx) -> dict:
    names = ctx.chaos_scenarios or [n for n in SCENARIOS if not (ctx.smoke and n in NOT_IN_SMOKE)]
    runs = ctx.chaos_runs
    trials: dict = {n: {t: [] for t in ctx.targets("herdsman", "peer")} for n in names}
    timelines: dict = {n: [] for n in names}
    for run in range(runs):
        for name in names:
            _, scenario = SCENARIOS[name]
            for target in trials[name]:
                log(f"chaos {name} on {target} (run {run + 1}/{runs})")
                try:
                    res, timeline = scenario(ctx, target)
                except (BenchError, OSError) as exc:
                    ctx.fail(f"chaos {name} (run {run + 1})", target, exc)
                    continue
                trials[name][target].append(res)
                if not any(tl["target"] == target for tl in timelines[name]):
                    timelines[name].append(timeline)
    out: dict = {"runs": runs, "rate": RATE, "connections": CONNECTIONS, "scenarios": {}}
    for name in names:
        if not timelines[name]:
            continue  # failed on every server: ctx.failures says why
        title, _ = SCENARIOS[name]
        # What the plot needs (every request of the first run, the events, new workers): the
        # report draws it (bench/chaos_report.py).
        data = OUT / f"chaos-{name}.json"
        if name == "ws-hup":
            load = "an echo every 250 ms per client"
        else:  # the redis-* scenarios say PUT in their title
            load = f"{'PUT' if 'PUT' in title else 'GET'} at {RATE:.0f} req/s"
        data.write_text(json.dumps({"title": f"{title}: {load}, 2 workers",
                                    "timelines": timelines[name]}))
        out["scenarios"][name] = {
            "title": title,
            "timeline": str(data),
            "targets": {t: aggregate(results) for t, results in trials[name].items() if results},
        }
    return out


FIGURES = ("failed", "misses", "p99_before_ms", "p99_during_ms", "max_during_ms", "recovery_ms")
# The scenarios that read back what they wrote add these.
WRITE_FIGURES = ("lost_writes",)


def aggregate(results: list[dict]) -> dict:
    """Median and spread over runs of each figure, and every run as it was."""
    if "clean_close" in results[0]:
        agg = {k: spread([r[k] for r in results]) for k in WS_FIGURES}
        agg["runs"] = results
        return agg
    agg = {k: spread([r[k] for r in results]) for k in FIGURES}
    agg.update({k: spread([r[k] for r in results]) for k in WRITE_FIGURES if k in results[0]})
    agg["recovered_runs"] = sum(1 for r in results if r["recovery_ms"] is not None)
    agg["runs"] = results
    return agg
