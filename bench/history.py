#!/usr/bin/env python3
"""A Jepsen-style history checker for /cache: several herdsman instances sharing one Redis,
each through a link the test breaks, many clients on overlapping keys, every operation
recorded and the history checked against the consistency model below (issue 24).

    python3 bench/history.py --short --herdsman target/release/herdsman   # the suite's (25-50 s)
    python3 bench/history.py --herdsman target/release/herdsman           # the bench's (~2 min)
    python3 bench/history.py --seed 7 --ops 20000 --seconds 120           # longer, other seed
    python3 bench/history.py --short --expect-anomalies --herdsman OLD    # proof it can fail
    python3 -m unittest discover -s bench -p test_history.py              # the checker's tests

The cluster: a real redis-server on a free 127.0.0.1 port (no persistence); 3 instances of the
binary, 2 workers each (`WEB_CONCURRENCY=2`), each with `REDIS_URL` pointing at its own fault
proxy (an asyncio TCP proxy in this process, see `FaultProxy`); Debian's HAProxy in front of the
3, round-robin with keep-alive connections to the backends (`http-reuse always`), so clients
reach every worker. A few users register and log in while Redis is healthy. Then clients do PUT
(a value unique to the operation, `c3-op1234`), GET and DELETE on a few keys per user through
HAProxy, every value with `?ttl=3600` so nothing expires, while a nemesis cuts, pauses and slows
random instances' links for 0.3-1.5 s at a time and heals them. At the end every link is
healed, the script waits until every worker of every instance uses Redis again (its log says
so for each worker pid that left it: the lines `WENT_DOWN` and `CAME_BACK` name, which a change
to those messages must follow; and GETs on new connections answer from Redis), and reads
every key through every instance directly, several times on new connections (so both workers
answer): the final reads. It prints operations by kind and outcome, faults by kind and the
anomalies by rule with up to 5 examples each, writes the history to
bench/out/history/history.json, and exits non-zero on any anomaly (1) or when the run could not
be made (2: too few operations or faults, a server that did not start) — with
`--expect-anomalies`, non-zero when it found none instead (an old binary must fail).

Needs redis-server and haproxy on the PATH (bench/setup.sh installs them); stdlib only.

# The model

For each key (a user's key: users never share one), every PUT and DELETE is an operation with
the interval [invoke, complete] measured by the client on one monotonic clock. Its outcome:

- **ok**: 204, acknowledged (its `x-cache-tier` says whether Redis took it or memory holds it
  for replay);
- **fail**: 4xx, 503 or 507: it definitely did not happen (the server promises that a refused
  write is stored nowhere; HAProxy's own 503 means no backend was asked);
- **info** (indeterminate): anything else (no answer within the client's timeout, a reset, 500,
  HAProxy's 502 and 504): it may take effect at any time up to the end of the run, so its
  completion counts as +infinity.

W1 *strictly precedes* W2 when W1.complete < W2.invoke (never when W1 is indeterminate). A read
is a GET answered 200 (the value) or 404 (absent); other answers are not reads. The rules:

- **V (validity)**: every value read was written to that key by a PUT that was not refused, and
  invoked before the read completed: no corruption, no value of another key, no refused write.
- **F (final state)**, the floor "an acknowledged write is never replaced by a write
  acknowledged before it, and a delete is never undone by a replay": after quiescence all the
  final reads of a key agree, and the final value is the value of a PUT (ok or info) that no
  acknowledged write (PUT or DELETE) strictly follows; absent is allowed only if some DELETE (ok
  or info) is not strictly followed by an acknowledged write, or no PUT was acknowledged (an
  indeterminate PUT may never have happened). The final reads are reads served by Redis, so R
  holds them too.
- **R (reads served by Redis)**, `x-cache-tier: redis`: such a read must not return the value
  of a write W when some PUT or DELETE W' acknowledged with tier redis completed before the read
  was invoked and W strictly precedes W'; it must not return absent when some PUT W'
  acknowledged with tier redis completed before the read was invoked and every DELETE (ok or
  info) invoked before the read completed strictly precedes W' (a DELETE invoked after the
  read completed cannot explain it).
- Reads served from memory (`x-cache-tier: memory`, a worker cut off from Redis) may be stale,
  by design: only V applies to them (final reads included: F judges the final reads Redis
  served).
- **L (liveness)**, checked by the runner rather than over the history: within 20 s of the last
  heal every worker of every instance uses Redis again. A worker that does not is reported (its
  held writes are not in Redis, so F may then report them lost too).

The checker (`check`) is pure functions over the recorded `Op`s; bench/test_history.py holds
hand-made histories that must pass and must fail each rule.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import http.client
import itertools
import json
import math
import random
import re
import shutil
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness import (
    DEFAULT_HERDSMAN,
    LOOPBACK,
    OUT,
    BenchError,
    RedisServer,
    Server,
    bearer,
    free_port,
    log,
    session_token,
)

HISTORY_OUT = OUT / "history"
INSTANCES = 3
WORKERS = 2
TTL_S = 3600  # every value outlives the run: an expiry would look like a lost write
CLIENT_TIMEOUT_S = 5.0
FAULT_KINDS = ("cut", "pause", "slow")
RULES = "VFRL"


# ---------------------------------------------------------------------------------------------
# The history and its checker (pure functions)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One client operation. `value`: a PUT's value, a GET's answer (None: absent, 404)."""

    id: int
    kind: str  # "put" | "get" | "delete"
    key: str  # "user/key"
    invoke: float
    complete: float  # when the answer came, or when the client gave up
    status: int | None  # None: no HTTP answer (timeout, reset)
    tier: str | None = None  # x-cache-tier of the answer
    value: str | None = None
    process: str = ""  # the client ("c3") or the final reader
    final: bool = False  # a final read, after quiescence


def outcome(op: Op) -> str:
    """A write's outcome: "ok" (acknowledged), "fail" (definitely not applied) or "info"
    (indeterminate); a GET's: "ok" (a read: 200 or 404) or "fail" (no read)."""
    if op.kind == "get":
        return "ok" if op.status in (200, 404) else "fail"
    if op.status == 204:
        return "ok"
    if op.status is not None and (400 <= op.status < 500 or op.status in (503, 507)):
        return "fail"
    return "info"


def effective_complete(op: Op) -> float:
    """When a write's effect may last occur: its completion, +infinity when indeterminate."""
    return math.inf if outcome(op) == "info" else op.complete


def precedes(a: Op, b: Op) -> bool:
    """a strictly precedes b: a completed (for sure) before b was invoked."""
    return effective_complete(a) < b.invoke


@dataclass
class Anomaly:
    rule: str  # "V" | "F" | "R"
    key: str
    message: str
    ops: list[Op] = field(default_factory=list)


def check(history: list[Op]) -> list[Anomaly]:
    """Every anomaly of the history, rule by rule (V, F, R), key by key."""
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in history:
        by_key[op.key].append(op)
    anomalies: list[Anomaly] = []
    for key in sorted(by_key):
        anomalies += check_validity(key, by_key[key], history)
        anomalies += check_final(key, by_key[key])
        anomalies += check_redis_reads(key, by_key[key])
    return anomalies


def _reads(ops: list[Op]) -> list[Op]:
    return [op for op in ops if op.kind == "get" and outcome(op) == "ok"]


def _writes(ops: list[Op]) -> list[Op]:
    return [op for op in ops if op.kind in ("put", "delete")]


def check_validity(key: str, ops: list[Op], history: list[Op]) -> list[Anomaly]:
    """V: every value read was written to this key by a PUT not refused, invoked before the
    read completed. `history` is only used to name the key a stray value belongs to."""
    puts = {op.value: op for op in ops if op.kind == "put"}
    out = []
    for read in _reads(ops):
        if read.value is None:
            continue
        put = puts.get(read.value)
        if put is None:
            elsewhere = [op for op in history if op.kind == "put" and op.value == read.value]
            where = f" (written to {elsewhere[0].key})" if elsewhere else ""
            out.append(Anomaly("V", key, f"read a value never written to this key{where}",
                               [read, *elsewhere[:1]]))
        elif outcome(put) == "fail":
            out.append(Anomaly("V", key, "read the value of a refused PUT", [put, read]))
        elif put.invoke > read.complete:
            out.append(Anomaly("V", key, "read a value before its PUT was invoked", [put, read]))
    return out


def check_final(key: str, ops: list[Op]) -> list[Anomaly]:
    """F: the final reads agree, on a value the model allows after quiescence."""
    finals = [op for op in _reads(ops) if op.final and op.tier == "redis"]
    if not finals:
        return []
    values = sorted({op.value for op in finals}, key=lambda v: (v is not None, v or ""))
    out = []
    if len(values) > 1:
        shown = [next(op for op in finals if op.value == v) for v in values]
        out.append(Anomaly("F", key, f"final reads disagree: {len(values)} different answers", shown))
    acked = [w for w in _writes(ops) if outcome(w) == "ok"]
    candidates = [w for w in _writes(ops) if outcome(w) != "fail"]
    # A write is overtaken when an acknowledged write was invoked after it surely completed.
    last_acked = max(acked, key=lambda a: a.invoke, default=None)

    def overtaker(w: Op) -> Op | None:
        """The first acknowledged write that w strictly precedes, if any."""
        if last_acked is None or not precedes(w, last_acked):
            return None
        return min((a for a in acked if precedes(w, a)), key=lambda a: a.invoke)

    for value in values:
        read = next(op for op in finals if op.value == value)
        if value is not None:
            put = next((w for w in candidates if w.kind == "put" and w.value == value), None)
            if put is None:
                continue  # V's anomaly (never written, or refused)
            later = overtaker(put)
            if later is not None:
                out.append(Anomaly("F", key, "final value is a PUT overtaken by an acknowledged "
                                   f"{later.kind.upper()}", [put, later, read]))
            continue
        puts = [w for w in acked if w.kind == "put"]
        deletes = [w for w in candidates if w.kind == "delete"]
        # The DELETE that completed last is the one least likely to be overtaken.
        last_delete = max(deletes, key=effective_complete, default=None)
        if not puts or (last_delete is not None and overtaker(last_delete) is None):
            continue
        if last_delete is None:
            out.append(Anomaly("F", key, "final state absent, but no DELETE was made",
                               [max(puts, key=lambda w: w.complete), read]))
        else:
            out.append(Anomaly("F", key, "final state absent, but every DELETE was overtaken by an "
                               "acknowledged write", [last_delete, overtaker(last_delete), read]))
    return out


def _latest_invoked(writes: list[Op]) -> tuple[list[float], list[Op]]:
    """`writes` by completion, and for each prefix of them the write invoked last: which write
    completed before time t and was invoked last is a bisection away."""
    writes = sorted(writes, key=lambda w: w.complete)
    latest: list[Op] = []
    for w in writes:
        latest.append(w if not latest or w.invoke > latest[-1].invoke else latest[-1])
    return [w.complete for w in writes], latest


def check_redis_reads(key: str, ops: list[Op]) -> list[Anomaly]:
    """R: a read served by Redis returns neither a value overtaken by a write Redis acknowledged
    before the read began, nor absent after a PUT Redis acknowledged that followed every
    DELETE that could have come before the read."""
    writes = _writes(ops)
    by_value = {w.value: w for w in writes if w.kind == "put"}
    redis_acked = [w for w in writes if outcome(w) == "ok" and w.tier == "redis"]
    completes, latest = _latest_invoked(redis_acked)
    put_completes, latest_put = _latest_invoked([w for w in redis_acked if w.kind == "put"])
    # DELETEs by invocation, and for each prefix the one whose effect may come last.
    deletes = sorted((w for w in writes if w.kind == "delete" and outcome(w) != "fail"),
                     key=lambda w: w.invoke)
    delete_invokes = [d.invoke for d in deletes]
    last_effect: list[Op] = []
    for d in deletes:
        keep = last_effect and effective_complete(last_effect[-1]) >= effective_complete(d)
        last_effect.append(last_effect[-1] if keep else d)

    out = []
    for read in _reads(ops):
        if read.tier != "redis":
            continue
        if read.value is not None:
            n = bisect.bisect_left(completes, read.invoke)
            written = by_value.get(read.value)
            if n and written is not None and precedes(written, latest[n - 1]):
                newer = latest[n - 1]
                out.append(Anomaly("R", key, f"Redis served a value overtaken by a {newer.kind.upper()} "
                                   "acknowledged by Redis before the read", [written, newer, read]))
            continue
        n = bisect.bisect_left(put_completes, read.invoke)
        if not n:
            continue
        put = latest_put[n - 1]
        m = bisect.bisect_left(delete_invokes, read.complete)  # DELETEs invoked before the read ended
        if m == 0 or precedes(last_effect[m - 1], put):
            shown = [*last_effect[m - 1:m], put, read]
            out.append(Anomaly("R", key, "Redis served absent after a PUT it acknowledged that "
                               "followed every DELETE", shown))
    return out


# ---------------------------------------------------------------------------------------------
# Fault proxies: one asyncio loop in a thread, one proxy per instance
# ---------------------------------------------------------------------------------------------


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of Redis that can be cut (every connection closed,
    new ones reset at once), paused (connections kept, nothing forwarded either way, new ones
    accepted and left waiting: a hang; what was held flows on heal, as bytes in flight would),
    slowed (each chunk held `delay` seconds, chunks not serialised) and healed. Runs on
    `FaultProxies`' loop; its methods are called there."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.mode = "ok"
        self.delay = 0.0
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.transports: set[asyncio.Transport] = set()
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def set(self, mode: str, delay: float = 0.0) -> None:
        self.mode, self.delay = mode, delay
        if mode == "pause":
            self.flowing.clear()
        else:
            self.flowing.set()
        if mode == "cut":
            for transport in list(self.transports):
                transport.abort()
            self.transports.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "cut":
            writer.transport.abort()
            return
        self.transports.add(writer.transport)
        try:
            await self.flowing.wait()
            if writer.transport.is_closing():
                return
            up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        self.transports.add(up_writer.transport)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for t in (writer.transport, up_writer.transport):
                t.abort()
                self.transports.discard(t)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        due: asyncio.Queue = asyncio.Queue()

        async def send():
            while (item := await due.get()) is not None:
                await asyncio.sleep(max(0.0, item[0] - time.monotonic()))
                await self.flowing.wait()
                if dst.transport.is_closing():
                    return
                dst.write(item[1])
            if not dst.transport.is_closing() and dst.transport.can_write_eof():
                dst.transport.write_eof()  # the other side's FIN, passed on

        sender = asyncio.create_task(send())
        try:
            while data := await src.read(65536):
                due.put_nowait((time.monotonic() + self.delay, data))
        except (OSError, asyncio.IncompleteReadError):
            pass
        due.put_nowait(None)
        try:
            await sender
        except OSError:
            pass


class FaultProxies:
    """`n` FaultProxy in front of one Redis, on an event loop in a daemon thread; cut, pause,
    slow and heal are called from any thread."""

    def __init__(self, upstream_port: int, n: int):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.proxies = [FaultProxy(upstream_port) for _ in range(n)]
        for proxy in self.proxies:
            self._call(proxy.start())

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def url(self, i: int) -> str:
        return f"redis://{LOOPBACK}:{self.proxies[i].port}/0"

    def set(self, i: int, mode: str, delay: float = 0.0) -> None:
        async def apply():
            self.proxies[i].set(mode, delay)
        self._call(apply())

    def heal(self, i: int) -> None:
        self.set(i, "ok")

    def close(self) -> None:
        async def shutdown():
            for proxy in self.proxies:
                proxy.server.close()
                proxy.set("cut")  # every connection's tasks end on their own
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if tasks:
                await asyncio.wait(tasks, timeout=1.0)
            self.loop.set_exception_handler(lambda *_: None)  # what is left is cancelled, quietly
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self._call(shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)


# ---------------------------------------------------------------------------------------------
# The cluster: Redis, 3 instances behind their proxies, HAProxy
# ---------------------------------------------------------------------------------------------


def instance_env(port: int, redis_url: str) -> dict:
    return {
        "PORT": port,
        "HERDSMAN_HOST": LOOPBACK,
        "WEB_CONCURRENCY": WORKERS,
        "REDIS_URL": redis_url,
        "BCRYPT_COST": 4,
        # Quotas and throttles out of the way: this measures ordering, not limits.
        "HERDSMAN_USER_MAX_KEYS": 1 << 30,
        "HERDSMAN_USER_MAX_BYTES": 1 << 40,
        "HERDSMAN_AUTH_LIMIT_ACCOUNT": 1_000_000,
        "HERDSMAN_AUTH_LIMIT_ADDRESS": 1_000_000,
    }


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if found is None:
        raise BenchError("haproxy missing (bench/setup.sh installs it: apt-get install haproxy)")
    return found


def haproxy_config(port: int, backends: list[int]) -> str:
    servers = "\n".join(f"    server h{i} {LOOPBACK}:{p}" for i, p in enumerate(backends))
    return f"""\
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 10s
    http-reuse always

frontend clients
    bind {LOOPBACK}:{port}
    default_backend herdsman

backend herdsman
    balance roundrobin
{servers}
"""


# A worker's breaker transitions in its instance's log: "… [pid] [role] LEVEL message …".
LOG_LINE = re.compile(r"\[(\d+)\] \[[^\]]+\] +\w+ +(.*)")
WENT_DOWN = ("cache switched to in-memory fallback", "cache stays in memory")
CAME_BACK = "cache uses redis"
QUIESCE_S = 20  # after the last heal: the probe retries at least every 1.25 s


def workers_in_fallback(log_text: str) -> set[int]:
    """The pids whose last breaker transition in the log is the switch to memory."""
    down: set[int] = set()
    for line in log_text.splitlines():
        m = LOG_LINE.search(line)
        if not m:
            continue
        pid, message = int(m.group(1)), m.group(2)
        if any(down_message in message for down_message in WENT_DOWN):
            down.add(pid)
        elif CAME_BACK in message:
            down.discard(pid)
    return down


def logged_in(port: int, user: str, patience: float = 20.0) -> str:
    """A session token for `user`, retried while the answer is 503: a worker whose breaker a
    busy machine opened (Redis late by 20 ms) refuses logins until its probe closes it."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return session_token(port, user)
        except BenchError as exc:
            if " 503 " not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class Client:
    """One keep-alive HTTP/1.1 connection (http.client) that records every request as an Op."""

    def __init__(self, port: int, token: str, name: str, ids):
        self.port, self.name, self.ids = port, name, ids
        self.headers = bearer(token)
        self.conn: http.client.HTTPConnection | None = None

    def request(self, kind: str, user: str, key: str, value: str | None = None,
                final: bool = False, fresh: bool = False) -> Op:
        method = {"put": "PUT", "get": "GET", "delete": "DELETE"}[kind]
        path = f"/cache/{key}" + (f"?ttl={TTL_S}" if kind == "put" else "")
        body = value.encode() if kind == "put" else None
        status = tier = read = None
        invoke = time.monotonic()
        try:
            if self.conn is None or fresh:
                self.close()
                self.conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=CLIENT_TIMEOUT_S)
            self.conn.request(method, path, body=body, headers=self.headers)
            resp = self.conn.getresponse()
            data = resp.read()
            status, tier = resp.status, resp.getheader("x-cache-tier")
            if kind == "get" and status == 200:
                read = data.decode(errors="replace")
            if resp.will_close:
                self.close()
        except (OSError, http.client.HTTPException):
            self.close()
        complete = time.monotonic()
        return Op(next(self.ids), kind, f"{user}/{key}", invoke, complete, status, tier,
                  value if kind == "put" else read, self.name, final)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


@dataclass
class Fault:
    kind: str
    instance: int
    start: float
    end: float = 0.0
    delay_ms: int = 0


class Run:
    """One run: the cluster, the users, the workload and nemesis, the final reads."""

    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.ids = itertools.count()
        self.users = [f"u{i}" for i in range(args.users)]
        self.keys = [f"k{i}" for i in range(args.keys)]
        self.tokens: dict[str, str] = {}
        self.history: list[Op] = []
        self.faults: list[Fault] = []
        self.stuck: dict[str, list[int]] = {}  # instance -> worker pids still in fallback (L)
        self.t0 = 0.0

    def execute(self) -> None:
        HISTORY_OUT.mkdir(parents=True, exist_ok=True)
        with RedisServer() as redis:
            hub = FaultProxies(redis.port, INSTANCES)
            try:
                self._with_redis(hub)
            finally:
                hub.close()

    def _with_redis(self, hub: FaultProxies) -> None:
        ports = [free_port() for _ in range(INSTANCES)]
        instances = [Server(f"herdsman-{chr(97 + i)}", [str(self.args.herdsman)],
                            instance_env(ports[i], hub.url(i)), ports[i])
                     for i in range(INSTANCES)]
        lb_port = free_port()
        config = HISTORY_OUT / "haproxy.cfg"
        config.write_text(haproxy_config(lb_port, ports))
        lb = Server("haproxy", [haproxy_binary(), "-db", "-f", str(config)], {}, lb_port)
        try:
            for srv in instances:
                srv.__enter__()
            for srv in instances:
                srv.wait_http("/live", timeout=30)
            with lb:
                lb.wait_http("/live", timeout=10)
                for user in self.users:
                    self.tokens[user] = logged_in(lb_port, user)
                log(f"{INSTANCES} instances x {WORKERS} workers behind haproxy :{lb_port}, "
                    f"{len(self.users)} users, {len(self.keys)} keys each")
                self._workload(hub, lb_port)
                self._quiesce(hub, instances)
                self._final_reads(instances)
        finally:
            for srv in instances:
                srv.stop()

    def _workload(self, hub: FaultProxies, lb_port: int) -> None:
        stop = threading.Event()
        per_client: list[list[Op]] = [[] for _ in range(self.args.clients)]
        self.t0 = time.monotonic()

        def client_loop(i: int) -> None:
            rng = random.Random(self.args.seed * 1000 + i)
            user = self.users[i % len(self.users)]
            client = Client(lb_port, self.tokens[user], f"c{i}", self.ids)
            for seq in itertools.count():
                if stop.is_set():
                    break
                kind = rng.choices(("put", "get", "delete"), weights=(45, 40, 15))[0]
                value = f"c{i}-op{seq}" if kind == "put" else None
                per_client[i].append(client.request(kind, user, rng.choice(self.keys), value))
            client.close()

        threads = [threading.Thread(target=client_loop, args=(i,), daemon=True)
                   for i in range(self.args.clients)]
        nemesis = threading.Thread(target=self._nemesis, args=(hub, stop), daemon=True)
        for th in threads:
            th.start()
        if not self.args.no_nemesis:
            nemesis.start()
        hard_stop = self.t0 + 3 * self.args.seconds
        while True:
            time.sleep(0.2)
            now, done = time.monotonic(), sum(len(ops) for ops in per_client)
            if now >= hard_stop or (now - self.t0 >= self.args.seconds and done >= self.args.ops):
                break
        stop.set()
        for th in threads:
            th.join(CLIENT_TIMEOUT_S + 5)
        if nemesis.is_alive():
            nemesis.join(5)
        self.history = [op for ops in per_client for op in ops]
        log(f"workload: {len(self.history)} operations in {time.monotonic() - self.t0:.1f}s, "
            f"{len(self.faults)} faults")

    def _nemesis(self, hub: FaultProxies, stop: threading.Event) -> None:
        """Breaks a random healthy instance's link every 0.2-0.8 s for 0.3-1.5 s, at most two at
        once (so that some instance always writes to Redis while another holds writes), after
        a first second without faults in which every worker verifies the sessions."""
        active: dict[int, Fault] = {}
        next_start = self.t0 + 1.0
        while not stop.is_set():
            now = time.monotonic()
            for i, fault in list(active.items()):
                if now >= fault.end:
                    hub.heal(i)
                    fault.end = time.monotonic()
                    del active[i]
            if len(active) < INSTANCES - 1 and now >= next_start:
                i = self.rng.choice([j for j in range(INSTANCES) if j not in active])
                kind = self.rng.choices(FAULT_KINDS, weights=(2, 2, 1))[0]
                delay_ms = self.rng.randint(30, 150) if kind == "slow" else 0
                fault = Fault(kind, i, now, now + self.rng.uniform(0.3, 1.5), delay_ms)
                hub.set(i, kind, delay_ms / 1e3)
                active[i] = fault
                self.faults.append(fault)
                next_start = now + self.rng.uniform(0.2, 0.8)
            time.sleep(0.01)
        for i, fault in active.items():
            hub.heal(i)
            fault.end = time.monotonic()

    def _quiesce(self, hub: FaultProxies, instances: list[Server]) -> None:
        """Every link healed; waits until every worker of every instance uses Redis again: its
        log shows no worker whose last breaker transition is the switch to memory, and 10 GETs
        in a row on new connections straight to the instance answer from Redis. An instance
        that does not within QUIESCE_S goes in `stuck` (rule L)."""
        for i in range(INSTANCES):
            hub.heal(i)
        t = time.monotonic()
        deadline = t + QUIESCE_S
        user = self.users[0]
        for srv in instances:
            client = Client(srv.port, self.tokens[user], "quiesce", itertools.count())
            streak = 0
            while streak < 10:
                srv.check_alive()
                down = workers_in_fallback(srv.log_path.read_text(errors="replace"))
                if time.monotonic() > deadline:
                    self.stuck[srv.name] = sorted(down)
                    log(f"{srv.name} did not use Redis again within {QUIESCE_S} s of the last heal; "
                        f"workers in fallback: {sorted(down)} (log {srv.log_path})")
                    break
                if down:
                    streak = 0
                    time.sleep(0.05)
                    continue
                op = client.request("get", user, self.keys[0], fresh=True)
                streak = streak + 1 if op.tier == "redis" else 0
            client.close()
        if not self.stuck:
            log(f"every worker uses Redis again ({time.monotonic() - t:.1f}s after the last heal)")

    def _final_reads(self, instances: list[Server]) -> None:
        for srv in instances:
            for user in self.users:
                client = Client(srv.port, self.tokens[user], f"final-{srv.name}", self.ids)
                for key in self.keys:
                    for _ in range(self.args.final_reads):
                        self.history.append(client.request("get", user, key, final=True, fresh=True))
                client.close()


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def describe(op: Op, t0: float) -> str:
    what = {"put": f"PUT {op.value}", "delete": "DELETE",
            "get": f"GET -> {op.value if op.value is not None else 'absent'}"}[op.kind]
    end = "∞" if op.kind != "get" and outcome(op) == "info" else f"{op.complete - t0:.3f}"
    return (f"#{op.id} {op.process} {what} [{op.invoke - t0:.3f}, {end}] "
            f"{op.status if op.status is not None else 'no answer'} {op.tier or '-'}"
            f"{' (final)' if op.final else ''}")


def summarize(history: list[Op], faults: list[Fault], anomalies: list[Anomaly], t0: float) -> str:
    lines = ["operations (kind outcome [tier]: count):"]
    counts = Counter((op.kind, "final" if op.final else outcome(op),
                      op.tier if outcome(op) == "ok" else None) for op in history)
    for (kind, out, tier), n in sorted(counts.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        lines.append(f"  {kind:6} {out:5} {tier or '':6} {n:7}")
    lines.append(f"  total {len(history)}")
    by_kind = Counter(f.kind for f in faults)
    lines.append("faults: " + (", ".join(f"{k} {by_kind[k]}" for k in FAULT_KINDS) or "none")
                 + f" (total {len(faults)})")
    by_rule: dict[str, list[Anomaly]] = defaultdict(list)
    for a in anomalies:
        by_rule[a.rule].append(a)
    lines.append("anomalies: " + (", ".join(f"{r} {len(by_rule[r])}" for r in RULES) if anomalies else "none"))
    for rule in RULES:
        # Examples of different keys and kinds first: one stale value is often read many times.
        distinct = {(a.key, a.message): a for a in reversed(by_rule[rule])}
        examples = [*distinct.values()][::-1][:5]
        examples += [a for a in by_rule[rule] if a not in examples][:5 - len(examples)]
        for a in examples:
            lines.append(f"  {rule} {a.key}: {a.message}")
            lines += [f"      {describe(op, t0)}" for op in a.ops]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--herdsman", type=Path, default=DEFAULT_HERDSMAN, help=f"binary (default {DEFAULT_HERDSMAN})")
    ap.add_argument("--short", action="store_true", help="the suite's version: >= 2,000 ops, >= 10 faults, ~40 s")
    ap.add_argument("--ops", type=int, help="fewest operations for a valid run (10,000; --short 2,000)")
    ap.add_argument("--seconds", type=float, help="workload duration at least (90; --short 20)")
    ap.add_argument("--min-faults", type=int, help="fewest faults for a valid run (30; --short 10)")
    ap.add_argument("--seed", type=int, default=1, help="seeds the nemesis and the clients' choices (1)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (16)")
    ap.add_argument("--users", type=int, default=4, help="users, each with its own keys (4)")
    ap.add_argument("--keys", type=int, default=6, help="keys per user (6)")
    ap.add_argument("--final-reads", type=int, default=4, help="final reads per key per instance (4)")
    ap.add_argument("--no-nemesis", action="store_true",
                    help="no faults (with --min-faults 0): a control run, whose only breaker "
                    "openings are a busy machine's")
    ap.add_argument("--json", type=Path, help="also write the figures of the run here (bench/run.py)")
    ap.add_argument("--expect-anomalies", action="store_true",
                    help="succeed only if anomalies are found (an old binary: the checker can fail)")
    args = ap.parse_args()
    args.ops = args.ops or (2_000 if args.short else 10_000)
    args.seconds = args.seconds or (20.0 if args.short else 90.0)
    args.min_faults = args.min_faults if args.min_faults is not None else (10 if args.short else 30)
    if not args.herdsman.is_file():
        log(f"FAIL herdsman binary not found at {args.herdsman}")
        return 2

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # tear the cluster down on SIGTERM
    started = time.monotonic()
    run = Run(args)
    try:
        run.execute()
    except BenchError as exc:
        log(f"FAIL the run could not be made: {exc}")
        return 2
    anomalies = check(run.history)
    anomalies += [Anomaly("L", name, f"workers {pids} did not use Redis again within {QUIESCE_S} s "
                          "of the last heal") for name, pids in run.stuck.items()]
    (HISTORY_OUT / "history.json").write_text(json.dumps(
        {"seed": args.seed, "faults": [asdict(f) for f in run.faults],
         "ops": [asdict(op) for op in run.history]}) + "\n")
    print(summarize(run.history, run.faults, anomalies, run.t0))
    workload = sum(1 for op in run.history if not op.final)
    seconds = time.monotonic() - started
    print(f"seed {args.seed}, {workload} operations in the workload, {seconds:.1f}s in all")
    if args.json:
        by_rule = Counter(a.rule for a in anomalies)
        args.json.write_text(json.dumps({
            "seed": args.seed, "seconds": round(seconds, 1), "operations": workload,
            "outcomes": {f"{kind} {out} {tier or ''}".strip(): n for (kind, out, tier), n in
                         Counter((op.kind, outcome(op), op.tier) for op in run.history
                                 if not op.final).items()},
            "faults": {kind: sum(f.kind == kind for f in run.faults) for kind in FAULT_KINDS},
            "anomalies": {rule: by_rule[rule] for rule in RULES},
        }, indent=2) + "\n")
    if workload < args.ops or len(run.faults) < args.min_faults:
        log(f"FAIL too small a run: {workload} operations (want {args.ops}), "
            f"{len(run.faults)} faults (want {args.min_faults})")
        return 2
    if args.expect_anomalies:
        if not anomalies:
            log("FAIL no anomaly found, and --expect-anomalies says this binary has them")
            return 1
        log(f"{len(anomalies)} anomalies found, as expected")
        return 0
    return 1 if anomalies else 0


if __name__ == "__main__":
    sys.exit(main())
