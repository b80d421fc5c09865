"""Shared pieces of the benchmark harness: how to start each server and Redis, a raw-socket
HTTP client with exact timing, process trees, wrk and redis-benchmark, number formatting.

bench/measure.py (the measurements), bench/chaos.py (the chaos suite), bench/report.py and
bench/chaos_report.py (the tables, the markdown, the plots) and bench/run.py (the entry) build on
this module; it needs only the standard library.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENV = BENCH / ".venv"
VPY = VENV / "bin" / "python"
VPY_PROGRAMS = BENCH / "vpy"  # programs that need the venv: [VPY, VPY_PROGRAMS / name, ...]
PEER_DIR = BENCH / "peer"
HELLO_DIR = BENCH / "hello"
HELLO_TARGET = BENCH / "target-hello"
OUT = BENCH / "out"
LOGS = OUT / "logs"
CARGO_TARGET = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
DEFAULT_HERDSMAN = Path(os.environ.get("HERDSMAN_BIN") or CARGO_TARGET / "release" / "herdsman")
# examples/seed.rs, built next to the default herdsman binary by ensure_seed().
SEED_EXAMPLE = CARGO_TARGET / "release" / "examples" / "seed"
LOOPBACK = "127.0.0.1"


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


def cargo_release_build(what: str, manifest_dir: Path, target_dir: Path, *args: str) -> None:
    """`cargo build --release` of the crate in manifest_dir into target_dir; BenchError with
    cargo's last words when it fails."""
    env = dict(os.environ, CARGO_TARGET_DIR=str(target_dir))
    log(f"building {what} (cargo build --release {' '.join(args)}, target dir {target_dir})")
    r = subprocess.run(
        ["cargo", "build", "--release", "--quiet", "--manifest-path",
         str(manifest_dir / "Cargo.toml"), *args],
        env=env,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise BenchError(f"building {what} failed:\n{r.stderr[-2000:]}")


def ensure_hello() -> Path:
    cargo_release_build("bench/hello", HELLO_DIR, HELLO_TARGET)  # own target dir
    return HELLO_TARGET / "release" / "hello"


def ensure_seed() -> Path:
    """examples/seed.rs (an app whose warm-ups block) built next to the default herdsman
    binary, and copied to bench/out like the binary under test. BenchError when it cannot be."""
    cargo_release_build("examples/seed.rs", REPO, CARGO_TARGET, "--example", "seed")
    if not SEED_EXAMPLE.is_file():
        raise BenchError(f"cargo built the seed example but {SEED_EXAMPLE} is not there")
    OUT.mkdir(parents=True, exist_ok=True)
    snapshot = OUT / "seed-under-test"
    shutil.copy2(SEED_EXAMPLE, snapshot)
    return snapshot


def require_tools() -> None:
    missing = [t for t in ("wrk", "redis-server", "redis-benchmark") if shutil.which(t) is None]
    if missing:
        raise BenchError(
            f"missing tools: {', '.join(missing)} (apt-get install wrk redis-server redis-tools)"
        )


# ---------------------------------------------------------------------------------------------
# Minimal HTTP/1.1 client on a raw socket (no dependency, exact timing)
# ---------------------------------------------------------------------------------------------


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
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
    if status in (204, 304) or 100 <= status < 200:
        body = b""  # no body by definition (RFC 9112 6.3), whatever the headers say
    elif "content-length" in headers:
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


# The metrics token every herdsman target gets, so that /health shows the bench its details
# (the breaker's state, the answering worker's pid): an anonymous caller gets only
# {"status": "ok"}. Sent with every /health request; a server without it ignores it.
HEALTH_TOKEN = "bench-health-details-token"


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    content_type: str | None = None,
    timeout: float = 5.0,
    headers: dict | None = None,
) -> tuple[int, bytes]:
    if path == "/health" and not headers:
        headers = bearer(HEALTH_TOKEN)
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        head = f"{method} {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nConnection: close\r\n"
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
        for name, value in (headers or {}).items():
            head += f"{name}: {value}\r\n"
        if body is not None or method in ("PUT", "POST"):
            head += f"Content-Length: {len(body or b'')}\r\n"
        s.sendall(head.encode() + b"\r\n" + (body or b""))
        status, _, data = read_response(s)
        return status, data


def http_json(port: int, method: str, path: str, obj=None, timeout: float = 5.0,
              headers: dict | None = None):
    body = json.dumps(obj).encode() if obj is not None else None
    status, data = http_request(
        port, method, path, body, "application/json" if obj is not None else None, timeout, headers
    )
    try:
        return status, json.loads(data) if data else None
    except ValueError:
        return status, data



def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def session_token(port: int, username: str, password: str = "correct horse battery staple") -> str:
    """Registers `username` (or finds it taken) and logs in: the token /cache needs, on both
    servers (the same session scheme: bench/peer/app.py)."""
    creds = {"username": username, "password": password}
    status, body = http_json(port, "POST", "/auth/register", creds, timeout=30)
    if status not in (201, 409):
        raise BenchError(f"register {username} answered {status} {body}")
    status, body = http_json(port, "POST", "/auth/login", creds, timeout=30)
    if status != 200 or not isinstance(body, dict) or "token" not in body:
        raise BenchError(f"login {username} answered {status} {body}")
    return body["token"]


def cache_session(port: int, key: str, value: bytes) -> dict:
    """Stores `value` under /cache/{key}: the headers a /cache request needs from now on, `{}`
    for a build whose /cache is open (before sessions), else a fresh user's bearer header (for
    comparisons of builds from either side of that change)."""
    status, _ = http_request(port, "PUT", f"/cache/{key}", value, timeout=30)
    if status == 204:
        return {}
    if status != 401:
        raise BenchError(f"PUT /cache/{key} answered {status}")
    headers = bearer(session_token(port, f"bench-{os.getpid()}-{port}"))
    status, _ = http_request(port, "PUT", f"/cache/{key}", value, timeout=30, headers=headers)
    if status != 204:
        raise BenchError(f"PUT /cache/{key} with a session answered {status}")
    return headers

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
    """A real redis-server on a free 127.0.0.1 port. `persistent=True` keeps an append-only
    file (in a fresh directory under bench/out) so that stop() then start() on the same port
    brings the data back, as a Redis with persistence would; pause() and resume() make it hang
    (SIGSTOP) and answer again."""

    def __init__(self, persistent: bool = False, tls: bool = False):
        self.port = free_port()
        self.url = f"redis://{LOOPBACK}:{self.port}/0"
        self.persistent = persistent
        # tls=True: a TLS port too, with a fresh self-signed certificate; `url` is then the
        # rediss:// one (the plain port stays for the harness's own PINGs). A client must not
        # verify it: REDIS_TLS_INSECURE=true.
        self.tls_port = free_port() if tls else None
        if tls:
            self.url = f"rediss://{LOOPBACK}:{self.tls_port}/0"
        self.proc: subprocess.Popen | None = None
        self.dir = OUT / f"redis-{self.port}"

    def __enter__(self):
        LOGS.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self._log = open(LOGS / f"redis-{self.port}.log", "ab")
        try:
            self.start()
        except BenchError:
            self.__exit__()
            raise
        return self

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", LOOPBACK, "--save", "",
                "--dir", str(self.dir), "--daemonize", "no"]
        argv += ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else \
            ["--appendonly", "no"]
        if self.tls_port:
            cert, key = self.dir / "cert.pem", self.dir / "key.pem"
            if not cert.exists():
                subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                                "-subj", f"/CN={LOOPBACK}", "-keyout", str(key), "-out", str(cert)],
                               check=True, capture_output=True)
            argv += ["--tls-port", str(self.tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                     "--tls-auth-clients", "no"]
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if resp_command(self.port, "PING").startswith(b"+PONG"):
                    return
            except OSError:
                time.sleep(0.02)
        raise BenchError("redis-server did not answer PING within 10s")

    def stop(self) -> None:
        """SIGTERM and wait, as `docker stop` would (SIGCONT first in case it is paused)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def __exit__(self, *exc):
        self.stop()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


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
        self.chaos_runs = 1 if args.smoke else args.chaos_runs
        self.chaos_scenarios: list[str] = args.chaos

    def fail(self, measurement: str, target: str, exc: Exception) -> None:
        """One target of a measurement failed: record it, keep measuring the others."""
        msg = f"{measurement}/{target}: {str(exc).splitlines()[0]}"
        self.failures.append(msg)
        log(f"FAIL {msg}")

    def targets(self, *names: str) -> list[str]:
        return [n for n in names if n != "herdsman" or self.herdsman is not None]


def start_target(ctx: Ctx, name: str, workers: int = 2, env: dict | None = None,
                 binary: Path | None = None) -> Server:
    """binary: what to start as herdsman, when not the binary under test (an example app)."""
    port = free_port()
    env = {"PORT": port, "WEB_CONCURRENCY": workers, **(env or {})}
    if name == "herdsman":
        env.setdefault("HERDSMAN_HOST", LOOPBACK)
        env.setdefault("HERDSMAN_METRICS_TOKEN", HEALTH_TOKEN)
        return Server("herdsman", [str(binary or ctx.herdsman)], env, port)
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


def redis_status(body) -> str | None:
    """checks.redis.status of a /health body, or None when it has none."""
    try:
        return body["checks"]["redis"]["status"]
    except (TypeError, KeyError):
        return None


def redis_up(body) -> bool:
    return redis_status(body) == "up"


# A master's log line for a worker it killed or lost to a signal, with the worker's pid:
# herdsman's "WORKER TIMEOUT (pid:N)", "WORKER BOOT TIMEOUT (pid:N)", "Worker 3 (pid:N) was
# killed by SIGKILL"; gunicorn's "WORKER TIMEOUT (pid:N)", "Worker (pid:N) was sent SIGKILL!".
KILLED_WORKER = re.compile(r"WORKER (?:BOOT )?TIMEOUT \(pid:(\d+)\)|\(pid:(\d+)\) was (?:killed by|sent) SIG")


def workers_killed(log_text: str) -> int:
    """How many distinct workers a master's log says it timed out or lost to a signal."""
    return len({a or b for a, b in KILLED_WORKER.findall(log_text)})


def children(pid: int) -> frozenset[int]:
    """The direct children of pid (a master's workers), from /proc."""
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        kids: set[int] = set()
        for task in tasks:
            text = (task / "children").read_text().split()
            kids.update(int(k) for k in text)
        return frozenset(kids)
    except OSError:
        return frozenset()


def health_sample(port: int):
    """(worker pid, checks.redis.status or None) from one GET /health on a new connection, or
    None when it did not answer 200."""
    try:
        status, body = http_json(port, "GET", "/health", timeout=1.0)
        if status != 200:
            return None
        return body["pid"], redis_status(body)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def wait_workers_serving(srv: Server, n: int, redis: bool = False, timeout: float = 30.0) -> None:
    """Until n distinct worker pids have answered /health (each request on a new connection);
    redis=True: have reported Redis `up` (a worker still connecting serves from memory). Fails
    fast (3 s) when /health has no Redis check at all (a build without Redis support)."""
    seen: set[int] = set()
    t_first = time.monotonic()
    deadline = t_first + timeout
    sample = None
    while time.monotonic() < deadline:
        srv.check_alive()
        sample = health_sample(srv.port)
        if sample is not None and (not redis or sample[1] == "up"):
            seen.add(sample[0])
        if len(seen) >= n and len(children(srv.proc.pid)) == n:
            return
        if redis and sample is not None and sample[1] is None and time.monotonic() - t_first > 3:
            raise BenchError(f"{srv.name}: /health has no checks.redis with REDIS_URL set "
                             "(Redis support missing?)")
        time.sleep(0.02)
    raise BenchError(f"{srv.name}: {n} workers did not all answer{' with Redis up' if redis else ''} "
                     f"within {timeout}s (seen {sorted(seen)}, last {sample}):\n{srv.log_tail()}")


class LoadRecorder:
    """Closed-loop load from `connections` threads, each on a keep-alive HTTP/1.1 connection,
    paced to `rate` requests/s in total, for `duration` seconds. Records one
    (t_since_start_s, latency_ms, status_or_None, error_or_None) per request; reconnects after
    any error or `Connection: close`. `events` holds (t, label) markers added with mark().
    `request(connection, n)`, when given, makes the bytes of each request instead of GET path."""

    def __init__(self, port: int, path: str, duration: float, connections: int = 8,
                 rate: float = 400.0, timeout: float = 5.0, headers: dict | None = None,
                 request=None):
        self.port, self.path, self.connections = port, path, connections
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.request = request
        self.interval = connections / rate
        self.duration, self.timeout = duration, timeout
        self.samples: list[tuple[float, float, int | None, str | None]] = []
        self.events: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self.t0 = time.perf_counter()
        self._threads: list[threading.Thread] = []

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def mark(self, label: str) -> float:
        t = self.now()
        self.events.append((t, label))
        return t

    def _loop(self, idx: int) -> None:
        get = f"GET {self.path} HTTP/1.1\r\nHost: {LOOPBACK}\r\n{self.headers}\r\n".encode()
        sent = 0
        sock = None
        next_t = self.t0 + idx * self.interval / self.connections
        end = self.t0 + self.duration
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            if next_t > now:
                time.sleep(next_t - now)
            next_t = max(next_t + self.interval, time.perf_counter() - self.interval)
            req = get if self.request is None else self.request(idx, sent)
            sent += 1
            start = time.perf_counter()
            status, err = None, None
            try:
                if sock is None:
                    sock = socket_to(self.port, self.timeout)
                sock.sendall(req)
                status, headers, _ = read_response(sock)
                if headers.get("connection", "").lower() == "close":
                    sock.close()
                    sock = None
            except (OSError, ValueError, IndexError) as exc:
                err = type(exc).__name__
                if sock is not None:
                    sock.close()
                    sock = None
            latency_ms = (time.perf_counter() - start) * 1e3
            with self._lock:
                self.samples.append((start - self.t0, latency_ms, status, err))
        if sock is not None:
            sock.close()

    def start(self) -> "LoadRecorder":
        self.t0 = time.perf_counter()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True)
                         for i in range(self.connections)]
        for th in self._threads:
            th.start()
        return self

    def join(self) -> None:
        for th in self._threads:
            th.join(max(0.0, self.duration - self.now()) + self.timeout + 5)


def socket_to(port: int, timeout: float) -> socket.socket:
    s = socket.create_connection((LOOPBACK, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def probe(port: int, path: str, duration: float, rate: float = 200.0) -> dict:
    """A paced latency probe (4 keep-alive connections, `rate` requests/s in total): unlike
    wrk, it measures the latency a light client sees without taking the CPU itself."""
    rec = LoadRecorder(port, path, duration, connections=4, rate=rate).start()
    rec.join()
    ok = sorted(s[1] for s in rec.samples if s[2] == 200)
    if not ok:
        raise BenchError(f"probe of {path}: no request answered 200")
    return {"p50_ms": pct(ok, 0.5), "p99_ms": pct(ok, 0.99), "requests": len(rec.samples),
            "failed": len(rec.samples) - len(ok)}


def pct(sorted_values: list[float], q: float):
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


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
        script: Path | None = None, headers: dict | None = None) -> dict:
    threads = max(1, min(threads, connections))
    argv = ["wrk", "--latency", f"-t{threads}", f"-c{connections}",
            f"-d{duration:g}s",  # wrk takes whole seconds: --duration 4 is 4.0 here
            "--timeout", "5s"]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
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
