"""The stack herdsman replaces: a FastAPI service run by gunicorn with uvicorn workers.

Written the way such services usually are, not slowed on purpose:
- redis-py's asyncio client with socket timeouts;
- warm-up tasks started in the lifespan as background tasks, each under
  asyncio.wait_for(..., STARTUP_OPERATION_TIMEOUT): bcrypt pre-warm (in the thread pool),
  Redis connect, cache warm-up;
- a cache served from Redis when it answers and from a bounded in-memory TTL cache otherwise;
  while Redis is down a background task re-pings it, and requests never wait on it;
- users in Redis, passwords hashed with the `bcrypt` package in the default thread pool;
- the same session scheme as herdsman, so the comparison stays fair: /auth/login returns a
  random token stored as its SHA-256 with a TTL, /auth/logout and /auth/me, and every /cache
  request needs `Authorization: Bearer` (401 otherwise) and sees only its user's keys. As such
  services usually do, it checks the session in Redis on every request and has no memory of
  sessions for an outage (503 then), and it does not throttle logins.

With PEER_BLOCKING_WARMUP=1 it makes the seed's mistake instead (`bench/run.py seed`, the same
warm-ups as examples/seed.rs): the lifespan start-up hashes three bcrypt passwords at cost 12,
PINGs Redis with the synchronous client and no socket timeout, and sleeps 5 s for a cache load,
all on the event loop, before the worker serves.

Same HTTP surface and environment variables as herdsman (see bench/README.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
import time
from contextlib import asynccontextmanager

import bcrypt
import redis
import redis.asyncio as aioredis
from cachetools import TTLCache
from fastapi import FastAPI, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, PlainTextResponse

VERSION = "peer-0.1.0"
log = logging.getLogger("peer")


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    return float(raw) if raw.strip() else default


def _env_bool(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


REDIS_URL = os.environ.get("REDIS_URL", "").strip() or None
REDIS_REQUIRED = _env_bool("REDIS_REQUIRED")
STARTUP_TIMEOUT = _env_float("STARTUP_OPERATION_TIMEOUT", 2.0)
REDIS_TIMEOUT = _env_float("REDIS_TIMEOUT", 0.25)
BCRYPT_COST = int(os.environ.get("BCRYPT_COST", "10") or 10)
CACHE_WARM_KEYS = [k for k in os.environ.get("CACHE_WARM_KEYS", "").split(",") if k.strip()]
CACHE_ENTRIES = int(os.environ.get("CACHE_ENTRIES", "10000") or 10000)
DEFAULT_TTL = 3600.0
SESSION_TTL = 3600
RECONNECT_EVERY = 1.0
BLOCKING_WARMUP = _env_bool("PEER_BLOCKING_WARMUP")

CACHE_PREFIX = "cache:"
USER_PREFIX = "user:"
SESSION_PREFIX = "session:"


class State:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.redis: aioredis.Redis | None = None
        # "disabled" (no REDIS_URL), "connecting", "up", "fallback"
        self.redis_status = "disabled" if REDIS_URL is None else "connecting"
        self.redis_error: str | None = None
        self.memory: TTLCache = TTLCache(maxsize=CACHE_ENTRIES, ttl=DEFAULT_TTL)
        self.checks: dict[str, dict] = {
            "bcrypt_prewarm": {"state": "pending", "duration_ms": None},
            "cache_warmup": {"state": "pending", "duration_ms": None},
        }
        self.tasks: list[asyncio.Task] = []


state = State()


def _redis_usable() -> bool:
    return state.redis is not None and state.redis_status == "up"


def _redis_failed(exc: BaseException) -> None:
    if state.redis_status == "up":
        log.warning("redis unavailable, cache falls back to memory: %r", exc)
    state.redis_status = "fallback"
    state.redis_error = repr(exc)


async def _timed(name: str, coro) -> None:
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(coro, STARTUP_TIMEOUT)
        state.checks[name] = {"state": "ok"}
    except asyncio.TimeoutError:
        state.checks[name] = {"state": "timed_out"}
    except Exception as exc:  # noqa: BLE001 - report any failure in /health
        state.checks[name] = {"state": "failed", "error": repr(exc)}
    state.checks[name]["duration_ms"] = round((time.monotonic() - t0) * 1000, 1)


async def bcrypt_prewarm() -> None:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, bcrypt.hashpw, b"prewarm", bcrypt.gensalt(BCRYPT_COST))


async def redis_connect() -> None:
    try:
        await asyncio.wait_for(state.redis.ping(), STARTUP_TIMEOUT)
        state.redis_status = "up"
        state.redis_error = None
    except Exception as exc:  # noqa: BLE001
        _redis_failed(exc)
    # Keep re-pinging in the background while Redis is down (or comes back).
    while True:
        await asyncio.sleep(RECONNECT_EVERY)
        if state.redis_status == "up":
            continue
        try:
            await asyncio.wait_for(state.redis.ping(), STARTUP_TIMEOUT)
            state.redis_status = "up"
            state.redis_error = None
            log.info("redis is back")
        except Exception as exc:  # noqa: BLE001
            _redis_failed(exc)


async def cache_warmup() -> None:
    if not CACHE_WARM_KEYS or state.redis is None:
        return
    # Wait (bounded by wait_for around us) for the connect task to decide.
    while state.redis_status == "connecting":
        await asyncio.sleep(0.01)
    if not _redis_usable():
        return
    values = await state.redis.mget([CACHE_PREFIX + k for k in CACHE_WARM_KEYS])
    for key, value in zip(CACHE_WARM_KEYS, values):
        if value is not None:
            state.memory[key] = value


def blocking_warmup() -> None:
    """The seed's warm-ups as its service wrote them: blocking calls, no timeout."""
    for _ in range(3):
        bcrypt.hashpw(b"seed-prewarm", bcrypt.gensalt(12))
    if REDIS_URL:
        # No socket timeout, as in redis-py before 8 (whose default is 5 s): waits for ever.
        redis.Redis.from_url(REDIS_URL, socket_timeout=None, socket_connect_timeout=None).ping()
    time.sleep(5)  # the cache load


@asynccontextmanager
async def lifespan(app: FastAPI):
    if BLOCKING_WARMUP:
        blocking_warmup()  # on the event loop, before the worker serves
    if REDIS_URL:
        state.redis = aioredis.Redis.from_url(
            REDIS_URL,
            socket_timeout=REDIS_TIMEOUT,
            socket_connect_timeout=STARTUP_TIMEOUT,
            retry_on_timeout=False,
        )
        state.tasks.append(asyncio.create_task(redis_connect()))
    state.tasks.append(asyncio.create_task(_timed("bcrypt_prewarm", bcrypt_prewarm())))
    state.tasks.append(asyncio.create_task(_timed("cache_warmup", cache_warmup())))
    yield
    for task in state.tasks:
        task.cancel()
    if state.redis is not None:
        try:
            await asyncio.wait_for(state.redis.aclose(), 1)
        except Exception:  # noqa: BLE001
            pass


app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)


@app.get("/live")
async def live() -> PlainTextResponse:
    return PlainTextResponse("ok")


@app.get("/ready")
async def ready() -> JSONResponse:
    if REDIS_REQUIRED and state.redis_status != "up":
        return JSONResponse({"ready": False, "reason": f"redis {state.redis_status}"}, status_code=503)
    return JSONResponse({"ready": True})


@app.get("/health")
async def health() -> JSONResponse:
    redis_check: dict = {"status": state.redis_status}
    if state.redis_error:
        redis_check["error"] = state.redis_error
    degraded = REDIS_URL is not None and state.redis_status == "fallback"
    return JSONResponse(
        {
            "status": "degraded" if degraded else "ok",
            "version": VERSION,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - state.started, 3),
            "checks": {"redis": redis_check, **state.checks},
        }
    )


# ---- sessions ----------------------------------------------------------------------------


def _session_key(token: str) -> str:
    return SESSION_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _unauthorized(message: str = "missing or invalid bearer token") -> JSONResponse:
    return JSONResponse({"error": message}, status_code=401, headers={"WWW-Authenticate": "Bearer"})


async def _on_session(request: Request, command):
    """`command(session key)` in Redis for the request's bearer token: its reply, or the answer
    to give instead (401 without a token, 503 without Redis)."""
    token = _bearer(request)
    if token is None:
        return _unauthorized()
    if not _redis_usable():
        return _unavailable()
    try:
        return await command(_session_key(token))
    except Exception as exc:  # noqa: BLE001
        _redis_failed(exc)
        return _unavailable()


async def _session_user(request: Request) -> str | Response:
    """The username of the request's bearer token, or the answer to give instead."""
    username = await _on_session(request, state.redis.get if state.redis else None)
    if isinstance(username, Response):
        return username
    if username is None:
        return _unauthorized()
    return username.decode()


# ---- cache -------------------------------------------------------------------------------


@app.put("/cache/{key}", status_code=204)
async def cache_put(key: str, request: Request, ttl: float | None = None) -> Response:
    user = await _session_user(request)
    if isinstance(user, Response):
        return user
    key = f"{user}/{key}"
    body = await request.body()
    if _redis_usable():
        try:
            if ttl:
                await state.redis.set(CACHE_PREFIX + key, body, px=int(ttl * 1000))
            else:
                await state.redis.set(CACHE_PREFIX + key, body)
            return Response(status_code=204)
        except Exception as exc:  # noqa: BLE001
            _redis_failed(exc)
    if ttl:
        # TTLCache has one TTL for all entries; store the expiry with the value.
        state.memory[key] = (body, time.monotonic() + ttl)
    else:
        state.memory[key] = (body, None)
    return Response(status_code=204)


@app.get("/cache/{key}")
async def cache_get(key: str, request: Request) -> Response:
    user = await _session_user(request)
    if isinstance(user, Response):
        return user
    key = f"{user}/{key}"
    if _redis_usable():
        try:
            value = await state.redis.get(CACHE_PREFIX + key)
            if value is None:
                return Response(status_code=404)
            return Response(content=value, media_type="application/octet-stream")
        except Exception as exc:  # noqa: BLE001
            _redis_failed(exc)
    entry = state.memory.get(key)
    if entry is None:
        return Response(status_code=404)
    if isinstance(entry, bytes):  # loaded by the warm-up
        return Response(content=entry, media_type="application/octet-stream")
    value, expires = entry
    if expires is not None and expires < time.monotonic():
        state.memory.pop(key, None)
        return Response(status_code=404)
    return Response(content=value, media_type="application/octet-stream")


@app.delete("/cache/{key}", status_code=204)
async def cache_delete(key: str, request: Request) -> Response:
    user = await _session_user(request)
    if isinstance(user, Response):
        return user
    key = f"{user}/{key}"
    state.memory.pop(key, None)
    if _redis_usable():
        try:
            await state.redis.delete(CACHE_PREFIX + key)
        except Exception as exc:  # noqa: BLE001
            _redis_failed(exc)
    return Response(status_code=204)


# ---- auth --------------------------------------------------------------------------------


def _unavailable() -> JSONResponse:
    return JSONResponse({"error": "redis unavailable"}, status_code=503)


async def _credentials(request: Request) -> tuple[str, str] | None:
    try:
        data = json.loads(await request.body())
        username, password = data["username"], data["password"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(username, str) or not isinstance(password, str) or not username:
        return None
    return username, password


@app.post("/auth/register")
async def register(request: Request) -> JSONResponse:
    creds = await _credentials(request)
    if creds is None:
        return JSONResponse({"error": "expected {\"username\",\"password\"}"}, status_code=400)
    if not _redis_usable():
        return _unavailable()
    username, password = creds
    loop = asyncio.get_running_loop()
    hashed = await loop.run_in_executor(
        None, bcrypt.hashpw, password.encode(), bcrypt.gensalt(BCRYPT_COST)
    )
    try:
        created = await state.redis.set(USER_PREFIX + username, hashed, nx=True)
    except Exception as exc:  # noqa: BLE001
        _redis_failed(exc)
        return _unavailable()
    if not created:
        return JSONResponse({"error": "user exists"}, status_code=409)
    return JSONResponse({"username": username}, status_code=201)


@app.post("/auth/login")
async def login(request: Request) -> JSONResponse:
    creds = await _credentials(request)
    if creds is None:
        return JSONResponse({"error": "expected {\"username\",\"password\"}"}, status_code=400)
    if not _redis_usable():
        return _unavailable()
    username, password = creds
    try:
        hashed = await state.redis.get(USER_PREFIX + username)
    except Exception as exc:  # noqa: BLE001
        _redis_failed(exc)
        return _unavailable()
    loop = asyncio.get_running_loop()
    if hashed is None:
        return JSONResponse({"error": "invalid credentials"}, status_code=401)
    ok = await loop.run_in_executor(None, bcrypt.checkpw, password.encode(), hashed)
    if not ok:
        return JSONResponse({"error": "invalid credentials"}, status_code=401)
    token = secrets.token_hex(32)
    try:
        await state.redis.set(_session_key(token), username, ex=SESSION_TTL)
    except Exception as exc:  # noqa: BLE001
        _redis_failed(exc)
        return _unavailable()
    return JSONResponse({"token": token, "expires_in": SESSION_TTL})


@app.post("/auth/logout")
async def logout(request: Request) -> Response:
    removed = await _on_session(request, state.redis.delete if state.redis else None)
    if isinstance(removed, Response):
        return removed
    return Response(status_code=204) if removed else _unauthorized()


@app.get("/auth/me")
async def me(request: Request) -> Response:
    user = await _session_user(request)
    if isinstance(user, Response):
        return user
    return JSONResponse({"username": user})


# ---- test hooks (chaos suite only: PEER_TEST_HOOKS=1) ------------------------------------

if _env_bool("PEER_TEST_HOOKS"):

    @app.get("/__test/block")
    async def test_block(ms: int) -> PlainTextResponse:
        # Blocks the event loop, as a CPU-bound or sync call in an async handler does: the
        # worker stops notifying gunicorn, which aborts it after its timeout.
        time.sleep(ms / 1000)
        return PlainTextResponse("unblocked")

    @app.get("/__test/sleep")
    async def test_sleep(ms: int) -> PlainTextResponse:
        await asyncio.sleep(ms / 1000)
        return PlainTextResponse("slept")

    _leaked: list[bytes] = []

    @app.post("/__test/leak")
    async def test_leak(mb: int) -> PlainTextResponse:
        # Keeps mb MiB of written memory for the worker's life, as a leaking handler does
        # (herdsman's /__test/leak): gunicorn has no memory line (benoitc/gunicorn #1299).
        if not 1 <= mb <= 1024:
            return PlainTextResponse("mb must be from 1 to 1024", status_code=400)
        _leaked.append(b"\xa5" * (mb << 20))
        return PlainTextResponse(f"leaked {mb} MiB in pid {os.getpid()}")

    @app.websocket("/__test/ws")
    async def test_ws(websocket: WebSocket) -> None:
        # An echo as FastAPI's docs write one: nothing of its own for a shutdown, which is
        # uvicorn's to handle (encode/uvicorn #1140).
        await websocket.accept()
        try:
            while True:
                await websocket.send_text(await websocket.receive_text())
        except WebSocketDisconnect:
            pass
