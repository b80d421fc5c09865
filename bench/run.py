#!/usr/bin/env python3
"""herdsman benchmark harness: herdsman vs the stack it replaces (gunicorn + uvicorn + FastAPI)
vs a bare one-process axum hello-world (the ceiling).

    python3 bench/run.py                 # every measurement, real durations
    python3 bench/run.py live cache      # some measurements
    python3 bench/run.py --smoke         # every measurement with tiny durations (CI, < 2 min)
    python3 bench/run.py --markdown BENCHMARKS.md
    python3 bench/run.py --herdsman /path/to/herdsman
    python3 bench/run.py chaos-demo      # latency-over-time recorder + plot, kill -9 of a peer worker

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
import statistics
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENV = BENCH / ".venv"
VPY = VENV / "bin" / "python"
PEER_DIR = BENCH / "peer"
HELLO_DIR = BENCH / "hello"
HELLO_TARGET = BENCH / "target-hello"
OUT = BENCH / "out"
LOGS = OUT / "logs"
DEFAULT_HERDSMAN = Path(os.environ.get("HERDSMAN_BIN", "/work/main/target/release/herdsman"))
LOOPBACK = "127.0.0.1"

MEASUREMENTS = ("boot", "live", "cache", "login", "memory", "chaos-demo")


class BenchError(Exception):
    """A server failed to boot, a tool failed, or a measurement produced no figure."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def spread(values: list[float]) -> dict:
    """min/median/max of the runs, and the runs themselves (the noise, reported as is)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"min": None, "median": None, "max": None, "runs": []}
    return {
        "min": min(vals),
        "median": statistics.median(vals),
        "max": max(vals),
        "runs": vals,
    }


def ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return a / b


# ---------------------------------------------------------------------------------------------
# Setup: venv for the peer, the hello-world binary
# ---------------------------------------------------------------------------------------------


def ensure_venv() -> None:
    req = PEER_DIR / "requirements.txt"
    digest = hashlib.sha256(req.read_bytes()).hexdigest()
    stamp = VENV / ".requirements.sha256"
    if VPY.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return
    if not VPY.exists():
        log(f"creating venv {VENV}")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    log("installing bench/peer/requirements.txt into the venv")
    subprocess.run([str(VPY), "-m", "pip", "install", "-q", "-r", str(req)], check=True)
    stamp.write_text(digest + "\n")


def ensure_hello() -> Path:
    env = dict(os.environ, CARGO_TARGET_DIR=str(HELLO_TARGET))
    manifest = HELLO_DIR / "Cargo.toml"
    log("building bench/hello (cargo build --release, own target dir)")
    r = subprocess.run(
        ["cargo", "build", "--release", "--quiet", "--manifest-path", str(manifest)],
        env=env,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise BenchError(f"building bench/hello failed:\n{r.stderr[-2000:]}")
    return HELLO_TARGET / "release" / "hello"


def require_tools() -> None:
    missing = [t for t in ("wrk", "redis-server", "redis-benchmark") if shutil.which(t) is None]
    if missing:
        raise BenchError(
            f"missing tools: {', '.join(missing)} (apt-get install wrk redis-server redis-tools)"
        )


# ---------------------------------------------------------------------------------------------
# Minimal HTTP/1.1 client on a raw socket (no dependency, exact timing)
# ---------------------------------------------------------------------------------------------


def _read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the response headers")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(rest) < n:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        body = rest[:n]
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while not rest.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        body, data = b"", rest
        while data:
            size_line, _, data = data.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body, data = body + data[:size], data[size + 2 :]
    else:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        body = rest
    return status, headers, body


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    content_type: str | None = None,
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        head = f"{method} {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nConnection: close\r\n"
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
        if body is not None or method in ("PUT", "POST"):
            head += f"Content-Length: {len(body or b'')}\r\n"
        s.sendall(head.encode() + b"\r\n" + (body or b""))
        status, _, data = _read_response(s)
        return status, data


def http_json(port: int, method: str, path: str, obj=None, timeout: float = 5.0):
    body = json.dumps(obj).encode() if obj is not None else None
    status, data = http_request(
        port, method, path, body, "application/json" if obj is not None else None, timeout
    )
    try:
        return status, json.loads(data) if data else None
    except ValueError:
        return status, data


# ---------------------------------------------------------------------------------------------
# Processes: a Server context manager, process trees, memory
# ---------------------------------------------------------------------------------------------


class Server:
    """Start `argv` with `env` in its own process group, log to bench/out/logs, tear it down.

    `with Server(...) as srv: srv.wait_http("/health")` — on exit the whole process group gets
    SIGTERM, then SIGKILL after a grace period, whatever happened inside the block.
    """

    def __init__(self, name: str, argv: list[str], env: dict, port: int, cwd: Path | None = None):
        self.name, self.argv, self.port, self.cwd = name, argv, port, cwd
        self.env = {**os.environ, **{k: str(v) for k, v in env.items()}}
        self.proc: subprocess.Popen | None = None
        self.t_spawn = 0.0
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log_path = LOGS / f"{name}-{port}.log"

    def __enter__(self) -> "Server":
        self._log = open(self.log_path, "wb")
        self.t_spawn = time.perf_counter()
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: killpg reaches every worker
        )
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def check_alive(self) -> None:
        if not self.alive():
            raise BenchError(
                f"{self.name} exited with status {self.proc.returncode} "
                f"(log {self.log_path}):\n{self.log_tail()}"
            )

    def wait_http(self, path: str = "/live", want: int = 200, timeout: float = 60.0, pred=None):
        """Poll until GET path answers `want` (and pred(json) if given). Returns the body."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                status, body = http_json(self.port, "GET", path, timeout=2.0)
                last = (status, body)
                if status == want and (pred is None or pred(body)):
                    return body
            except OSError:
                pass
            time.sleep(0.01)
        raise BenchError(
            f"{self.name}: GET {path} did not answer {want} within {timeout}s (last: {last}); "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.alive() else []

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is None or self._log.closed:
            return
        try:
            pgid = os.getpgid(self.proc.pid)
        except ProcessLookupError:
            pgid = None
        if pgid is not None:
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        if pgid is not None:  # the master may be gone with workers still there
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


def process_tree(root: int) -> list[int]:
    """root and all its descendants, root first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ... ; comm may contain spaces and parentheses
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo.extend(sorted(children.get(pid, [])))
    return out


def proc_kib(pid: int, field: str, path: str = "status") -> int | None:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------------------------------
# Redis: a real one, and a "hanging" one (accepts TCP, never answers)
# ---------------------------------------------------------------------------------------------


def resp_command(port: int, *args: bytes | str, timeout: float = 2.0) -> bytes:
    parts = [a.encode() if isinstance(a, str) else a for a in args]
    msg = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        s.sendall(msg)
        return s.recv(65536)


class RedisServer:
    def __init__(self):
        self.port = free_port()
        self.url = f"redis://{LOOPBACK}:{self.port}/0"

    def __enter__(self):
        LOGS.mkdir(parents=True, exist_ok=True)
        self._log = open(LOGS / f"redis-{self.port}.log", "wb")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", LOOPBACK, "--save", "",
             "--appendonly", "no", "--daemonize", "no"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if resp_command(self.port, "PING").startswith(b"+PONG"):
                    return self
            except OSError:
                time.sleep(0.02)
        self.__exit__()
        raise BenchError("redis-server did not answer PING within 10s")

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


class HangingRedis:
    """A TCP port on 127.0.0.1 that accepts connections and never answers: a hung Redis."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(128)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.url = f"redis://{LOOPBACK}:{self.port}/0"
        self.conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
                self.conns.append(conn)  # held open, never read, never answered
            except (socket.timeout, OSError):
                continue

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(2)
        for c in self.conns:
            c.close()
        self.sock.close()


# ---------------------------------------------------------------------------------------------
# Targets: how to start herdsman, the peer and the hello-world
# ---------------------------------------------------------------------------------------------


class Ctx:
    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.herdsman: Path | None = None
        self.herdsman_source: Path | None = None
        self.hello: Path | None = None
        self.results: dict = {}
        self.failures: list[str] = []
        self.skipped: list[str] = []
        self.noise: dict[str, dict] = {}
        # durations
        self.wrk_duration = 1 if args.smoke else args.duration
        self.runs = 1 if args.smoke else args.runs
        self.boot_runs = 1 if args.smoke else args.boot_runs

    def fail(self, measurement: str, target: str, exc: Exception) -> None:
        """One target of a measurement failed: record it, keep measuring the others."""
        msg = f"{measurement}/{target}: {str(exc).splitlines()[0]}"
        self.failures.append(msg)
        log(f"FAIL {msg}")

    def targets(self, *names: str) -> list[str]:
        return [n for n in names if n != "herdsman" or self.herdsman is not None]


def start_target(ctx: Ctx, name: str, workers: int = 2, env: dict | None = None) -> Server:
    port = free_port()
    env = {"PORT": port, "WEB_CONCURRENCY": workers, **(env or {})}
    if name == "herdsman":
        env.setdefault("HERDSMAN_HOST", LOOPBACK)
        return Server("herdsman", [str(ctx.herdsman)], env, port)
    if name == "peer":
        # Same knob as herdsman's Redis command timeout, under the peer's own name.
        if "HERDSMAN_REDIS_TIMEOUT" in env:
            env.setdefault("REDIS_TIMEOUT", env["HERDSMAN_REDIS_TIMEOUT"])
        argv = [
            str(VENV / "bin" / "gunicorn"), "-c", "gunicorn.conf.py",
            "-k", "uvicorn.workers.UvicornWorker", "-w", str(workers),
            "-b", f"{LOOPBACK}:{port}", "app:app",
        ]
        return Server("peer", argv, env, port, cwd=PEER_DIR)
    if name == "hello":
        return Server("hello", [str(ctx.hello)], env, port)
    raise ValueError(name)


HEALTH_PATH = {"herdsman": "/health", "peer": "/health", "hello": "/live"}


def redis_up(body) -> bool:
    try:
        return body["checks"]["redis"]["status"] == "up"
    except (TypeError, KeyError):
        return False


def wait_redis_up(srv: Server, timeout: float = 20.0) -> None:
    """Wait for /health to say checks.redis.status == "up"; fail fast (3 s) when /health has
    no Redis check at all (a build without Redis support)."""
    srv.wait_http("/health")
    deadline, t_first = time.monotonic() + timeout, time.monotonic()
    body = None
    while time.monotonic() < deadline:
        srv.check_alive()
        _, body = http_json(srv.port, "GET", "/health", timeout=2.0)
        if redis_up(body):
            return
        has_check = isinstance(body, dict) and "redis" in (body.get("checks") or {})
        if not has_check and time.monotonic() - t_first > 3:
            raise BenchError(f"{srv.name}: /health has no checks.redis with REDIS_URL set "
                             f"(Redis support missing?): {body}")
        time.sleep(0.02)
    raise BenchError(f"{srv.name}: Redis not 'up' in /health within {timeout}s: {body}")


# ---------------------------------------------------------------------------------------------
# Load tools: wrk and redis-benchmark
# ---------------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise BenchError(f"cannot parse wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict:
    res: dict = {"rps": None, "p50_ms": None, "p99_ms": None, "requests": None,
                 "non2xx": 0, "socket_errors": 0}
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        res["rps"] = float(m.group(1))
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        if m := re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M):
            res[key] = _ms(m.group(1))
    if m := re.search(r"(\d+) requests in", out):
        res["requests"] = int(m.group(1))
    if m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out):
        res["non2xx"] = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        res["socket_errors"] = sum(int(x) for x in m.groups())
    return res


def wrk(port: int, path: str, connections: int, threads: int, duration: float,
        script: Path | None = None) -> dict:
    threads = max(1, min(threads, connections))
    argv = ["wrk", "--latency", f"-t{threads}", f"-c{connections}", f"-d{duration}s",
            "--timeout", "5s"]
    if script:
        argv += ["-s", str(script)]
    argv.append(f"http://{LOOPBACK}:{port}{path}")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    if r.returncode != 0:
        raise BenchError(f"wrk failed ({r.returncode}): {r.stderr.strip()}")
    res = parse_wrk(r.stdout)
    if res["rps"] is None or not res["requests"]:
        raise BenchError(f"wrk produced no figure:\n{r.stdout}")
    return res


def redis_benchmark(port: int, connections: int, requests: int, size: int) -> dict:
    argv = ["redis-benchmark", "-h", LOOPBACK, "-p", str(port), "-t", "get",
            "-c", str(connections), "-n", str(requests), "-d", str(size), "--csv"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise BenchError(f"redis-benchmark failed: {r.stderr.strip()}")
    rows = [line.replace('"', "").split(",") for line in r.stdout.strip().splitlines()]
    header = rows[0]
    for row in rows[1:]:
        if row[0] == "GET":
            d = dict(zip(header, row))
            return {"rps": float(d["rps"]), "p50_ms": float(d["p50_latency_ms"]),
                    "p99_ms": float(d["p99_latency_ms"])}
    raise BenchError(f"redis-benchmark produced no GET figure:\n{r.stdout}")


# ---------------------------------------------------------------------------------------------
# Measurements: one function each, returning a JSON-able dict
# ---------------------------------------------------------------------------------------------


def time_to_first_200(srv: Server, path: str, timeout: float = 60.0) -> dict:
    """Poll with a raw socket every ~1 ms from the spawn: first TCP connect, first 200 on path."""
    t0 = srv.t_spawn
    deadline = t0 + timeout
    t_connect = None
    req = f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}\r\nConnection: close\r\n\r\n".encode()
    while time.perf_counter() < deadline:
        srv.check_alive()
        s = socket.socket()
        s.settimeout(max(0.05, deadline - time.perf_counter()))
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
            status, _, body = _read_response(s)
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
                    try:
                        redis_at_first.append(t["health"]["checks"]["redis"]["status"])
                    except (TypeError, KeyError):
                        redis_at_first.append(None)
                row[name] = {"first_200_ms": spread(first), "connect_ms": spread(conn),
                             "redis_status_at_first_200": redis_at_first}
            if "herdsman" in row:
                row["ratio_herdsman_over_peer"] = ratio(
                    row["herdsman"]["first_200_ms"]["median"], row["peer"]["first_200_ms"]["median"])
            res["variants"][variant] = row
    return res


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
        s = samples[name]
        res["targets"][name] = {
            "rps": spread([x["rps"] for x in s]),
            "p50_ms": spread([x["p50_ms"] for x in s]),
            "p99_ms": spread([x["p99_ms"] for x in s]),
            "errors": sum(x["non2xx"] + x["socket_errors"] for x in s),
        }
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
                wait_redis_up(srv)
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
        res["targets"][name] = {
            "rps": spread([x["rps"] for x in s]),
            "p50_ms": spread([x["p50_ms"] for x in s]),
            "p99_ms": spread([x["p99_ms"] for x in s]),
            "errors": sum(x.get("non2xx", 0) + x.get("socket_errors", 0) for x in s),
        }
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
    """/live p50/p99 (probe: 1 thread, 4 connections) alone, then while 8 connections hammer
    POST /auth/login; login throughput vs what the cores can hash at the same cost."""
    cost = ctx.args.bcrypt_cost
    dur = max(2, ctx.wrk_duration) if ctx.smoke else ctx.wrk_duration
    res: dict = {"bcrypt_cost": cost, "login_wrk": f"-t1 -c8 -d{dur}s",
                 "probe_wrk": f"-t1 -c4 -d{dur}s /live", "runs": ctx.runs, "targets": {}}
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
    wait_redis_up(srv)
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
        idle.append(wrk(srv.port, "/live", 4, 1, dur))
        box: dict = {}

        def hammer():
            try:
                box["r"] = wrk(srv.port, "/auth/login", 8, 1, dur + 1, script)
            except BenchError as exc:
                box["e"] = exc

        th = threading.Thread(target=hammer)
        th.start()
        time.sleep(0.5)  # let the login load build up first
        loaded.append(wrk(srv.port, "/live", 4, 1, dur))
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
        "live_loaded_rps": spread([x["rps"] for x in loaded]),
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




# ---------------------------------------------------------------------------------------------
# Per-request recorder and latency-over-time plot (the base of the chaos suite)
# ---------------------------------------------------------------------------------------------


class LoadRecorder:
    """Closed-loop load from `connections` threads, each on a keep-alive HTTP/1.1 connection,
    paced to `rate` requests/s in total, for at most `duration` seconds. Records one
    (t_since_start_s, latency_ms, status_or_None, error_or_None) per request; reconnects after
    any error. `events` holds (t, label) markers added with mark()."""

    def __init__(self, port: int, path: str = "/live", connections: int = 8,
                 rate: float = 400.0, duration: float = 6.0, timeout: float = 5.0):
        self.port, self.path, self.connections = port, path, connections
        self.interval = connections / rate
        self.duration, self.timeout = duration, timeout
        self.samples: list[tuple[float, float, int | None, str | None]] = []
        self.events: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.t0 = 0.0

    def mark(self, label: str) -> None:
        self.events.append((time.perf_counter() - self.t0, label))

    def _conn(self):
        s = socket.create_connection((LOOPBACK, self.port), timeout=self.timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def _loop(self, idx: int):
        req = f"GET {self.path} HTTP/1.1\r\nHost: {LOOPBACK}\r\n\r\n".encode()
        sock = None
        next_t = self.t0 + idx * self.interval / self.connections
        end = self.t0 + self.duration
        while not self._stop.is_set():
            now = time.perf_counter()
            if now >= end:
                break
            if next_t > now:
                time.sleep(next_t - now)
            next_t += self.interval
            start = time.perf_counter()
            status, err = None, None
            try:
                if sock is None:
                    sock = self._conn()
                sock.sendall(req)
                status, headers, _ = _read_response(sock)
                if headers.get("connection", "").lower() == "close":
                    sock.close()
                    sock = None
            except (OSError, ValueError, IndexError) as exc:
                err = type(exc).__name__
                if sock is not None:
                    sock.close()
                    sock = None
            lat = (time.perf_counter() - start) * 1e3
            with self._lock:
                self.samples.append((start - self.t0, lat, status, err))
        if sock is not None:
            sock.close()

    def start(self):
        self.t0 = time.perf_counter()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True)
                         for i in range(self.connections)]
        for th in self._threads:
            th.start()
        return self

    def join(self):
        for th in self._threads:
            th.join(self.duration + self.timeout + 5)
        self._stop.set()

    def summary(self) -> dict:
        ok = [s for s in self.samples if s[2] is not None and 200 <= s[2] < 400]
        bad = [s for s in self.samples if not (s[2] is not None and 200 <= s[2] < 400)]
        lats = sorted(s[1] for s in ok)
        pct = lambda q: lats[min(len(lats) - 1, int(q * len(lats)))] if lats else None  # noqa
        t_event = self.events[0][0] if self.events else None
        after = [s for s in bad if t_event is not None and s[0] + s[1] / 1e3 >= t_event]
        slow_after = [s for s in ok if t_event is not None and s[0] >= t_event]
        return {"requests": len(self.samples), "ok": len(ok), "failed": len(bad),
                "failures": sorted({f"{s[2]}/{s[3]}" for s in bad}),
                "failed_after_first_event": len(after),
                "last_failure_after_event_ms": (max(s[0] - t_event for s in after) * 1e3
                                                if after else 0.0),
                "max_ms_after_event": max((s[1] for s in slow_after), default=0.0),
                "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": lats[-1] if lats else None,
                "events": self.events}


def plot_timeline(rec: LoadRecorder, title: str, path: Path) -> None:
    """Latency over time, failures as red crosses, events as vertical lines (venv matplotlib)."""
    data = {"title": title, "samples": rec.samples, "events": rec.events}
    tmp = OUT / (path.stem + ".json")
    tmp.write_text(json.dumps(data))
    script = r"""
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
d = json.load(open(sys.argv[1]))
ok = [s for s in d["samples"] if s[2] is not None and 200 <= s[2] < 400]
bad = [s for s in d["samples"] if not (s[2] is not None and 200 <= s[2] < 400)]
fig, ax = plt.subplots(figsize=(10, 4.5))
ax.scatter([s[0] for s in ok], [s[1] for s in ok], s=3, alpha=0.5, label=f"ok ({len(ok)})")
if bad:
    ax.scatter([s[0] for s in bad], [max(s[1], 0.01) for s in bad], s=30, marker="x",
               color="red", label=f"failed ({len(bad)})")
for t, label in d["events"]:
    ax.axvline(t, color="black", linestyle="--", linewidth=1)
    ax.annotate(label, (t, 1), xycoords=("data", "axes fraction"), xytext=(4, -14),
                textcoords="offset points", fontsize=9)
ax.set_yscale("log")
ax.set_xlabel("time since load start (s)")
ax.set_ylabel("latency (ms, log)")
ax.set_title(d["title"])
ax.legend(loc="upper right")
ax.grid(True, which="both", alpha=0.3)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
"""
    r = subprocess.run([str(VPY), "-c", script, str(tmp), str(path)], capture_output=True,
                       text=True, timeout=120)
    if r.returncode != 0:
        raise BenchError(f"plot failed: {r.stderr[-1000:]}")


def chaos_demo(ctx: Ctx) -> dict:
    """The peer (2 workers) under a paced /live load; kill -9 one gunicorn worker at t=2 s;
    latency over time with the event marked. Also herdsman when its binary is there."""
    res: dict = {"targets": {}}
    dur = 4.0 if ctx.smoke else 8.0
    for name in ctx.targets("peer", "herdsman"):
        with start_target(ctx, name, workers=2) as srv:
            srv.wait_http("/health")
            time.sleep(0.5)
            pids = srv.pids()
            if len(pids) < 2:
                raise BenchError(f"{name}: no worker process found under pid {pids}")
            victim = pids[1]
            rec = LoadRecorder(srv.port, "/live", connections=8, rate=400, duration=dur).start()
            time.sleep(2.0)
            os.kill(victim, signal.SIGKILL)
            rec.mark(f"kill -9 worker {victim}")
            rec.join()
            srv.check_alive()
        png = OUT / f"chaos-kill9-{name}.png"
        plot_timeline(rec, f"{name}: GET /live at 400 req/s, kill -9 of one of 2 workers", png)
        res["targets"][name] = {**rec.summary(), "plot": str(png.relative_to(BENCH))}
    return res


MEASURE = {"boot": measure_boot, "live": measure_live, "cache": measure_cache,
           "login": measure_login, "memory": measure_memory, "chaos-demo": chaos_demo}


# ---------------------------------------------------------------------------------------------
# Reporting: table, results.json, BENCHMARKS.md
# ---------------------------------------------------------------------------------------------


def fmt(v, unit: str = "", nd: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.{nd}f}{unit}"
    return f"{v}{unit}"


def fmt_spread(s: dict, unit: str = "", nd: int = 1) -> str:
    if not s or s.get("median") is None:
        return "—"
    if len(s["runs"]) == 1:
        return fmt(s["median"], unit, nd)
    return f"{fmt(s['median'], unit, nd)} ({fmt(s['min'], '', nd)}–{fmt(s['max'], '', nd)})"


def _counts(values: list) -> str:
    """["up", "up", "connecting"] -> "up×2, connecting×1"; None (no such check) -> "—"."""
    seen: dict = {}
    for v in values:
        seen[v] = seen.get(v, 0) + 1
    return ", ".join(f"{'—' if k is None else k}×{n}" for k, n in seen.items())


def tables(results: dict) -> list[tuple[str, list[str], list[list[str]], list[str]]]:
    """(title, header, rows, notes) per measurement; shared by stdout and markdown."""
    out = []
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
        rows = [[n, fmt_spread(x["rps"], "", 0), fmt_spread(x["p50_ms"], " ms", 2),
                 fmt_spread(x["p99_ms"], " ms", 2), str(x["errors"])]
                for n, x in r["targets"].items()]
        notes = [f"wrk {r['wrk']}, median of {r['runs']} interleaved runs (min–max)"]
        notes += [f"{k.replace('_over_', ' / ')}: {fmt(v, '', 3)}" for k, v in r["ratios"].items()
                  if v is not None]
        out.append(("live: GET /live", ["server", "req/s", "p50", "p99", "errors"], rows, notes))
    if "cache" in results:
        r = results["cache"]
        rows = [[n, fmt_spread(x["rps"], "", 0), fmt_spread(x["p50_ms"], " ms", 2),
                 fmt_spread(x["p99_ms"], " ms", 2), str(x["errors"])]
                for n, x in r["targets"].items()]
        notes = [f"servers: wrk {r['wrk']} GET /cache/k ({r['value_bytes']} B value in Redis); "
                 f"redis-benchmark {r['redis_benchmark']}; median of {r['runs']} runs"]
        notes += [f"{k.replace('_over_', ' / ')}: {fmt(v, '', 3)}" for k, v in r["ratios"].items()
                  if v is not None]
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
                 f"login load: wrk {r['login_wrk']}; /live probe: wrk {r['probe_wrk']}; "
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
    if "chaos-demo" in results:
        r = results["chaos-demo"]
        rows = [[n, str(x["requests"]), str(x["failed"]), ", ".join(x["failures"]) or "—",
                 fmt(x["last_failure_after_event_ms"], " ms", 1),
                 fmt(x["p99_ms"], " ms", 2), fmt(x["max_ms"], " ms", 1), x["plot"]]
                for n, x in r["targets"].items()]
        out.append(("chaos-demo: kill -9 of one worker under 400 req/s /live",
                    ["server", "requests", "failed", "failure kinds", "last failure after kill",
                     "p99", "max", "plot"], rows,
                    ["LoadRecorder: 8 keep-alive connections paced to 400 req/s in total; "
                     "failures are requests that got no HTTP answer (connection reset/closed)"]))
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
    herdsman_rev = "?"
    if ctx.herdsman_source is not None:
        herdsman_rev = _cmd(["git", "-C", str(ctx.herdsman_source.parent), "log", "-1",
                             "--format=%h %cI %s"])
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


def write_markdown(path: Path, ctx: Ctx, meta: dict, results: dict) -> None:
    m = meta
    lines = [
        "# herdsman benchmarks",
        "",
        f"Generated by `python3 bench/run.py{' --smoke' if ctx.smoke else ''} --markdown ...` on "
        f"{m['date']}. Every figure below was measured in that run; rerun the command to "
        "reproduce (results in `bench/out/results.json`).",
        "",
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
    for title, header, rows, notes in tables(results):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        lines.append("")
        lines += [f"- {n}" for n in notes]
        lines.append("")
        if title.startswith("chaos-demo"):
            for x in results["chaos-demo"]["targets"].values():
                rel = os.path.relpath(BENCH / x["plot"], path.resolve().parent)
                lines += [f"![{x['plot']}]({rel})", ""]
    path.write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------


def missing_figures(obj, where="") -> list[str]:
    """Every None where a figure should be (ratios may be None when herdsman was skipped)."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("ratios", "health", "redis_status_at_first_200") or k.startswith("ratio"):
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
    ap.add_argument("--smoke", action="store_true", help="tiny durations, 1 run: CI, < 2 min")
    ap.add_argument("--herdsman", type=Path, default=DEFAULT_HERDSMAN,
                    help=f"herdsman binary (default {DEFAULT_HERDSMAN}, or $HERDSMAN_BIN)")
    ap.add_argument("--require-herdsman", action="store_true",
                    help="fail (instead of skipping herdsman) when the binary is missing")
    ap.add_argument("--duration", type=float, default=10, help="wrk seconds per run (10)")
    ap.add_argument("--runs", type=int, default=3, help="runs per server for wrk figures (3)")
    ap.add_argument("--boot-runs", type=int, default=5, help="spawns per boot variant (5)")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
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
