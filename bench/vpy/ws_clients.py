"""WebSocket clients through a rolling restart, for bench/chaos.py's ws-hup scenario. Run with
the bench venv's python (the `websockets` package):

    bench/.venv/bin/python bench/vpy/ws_clients.py PORT PATH N

Connects N clients to ws://127.0.0.1:PORT/PATH, each checked with one echo, then prints `ready`.
Each client then sends a message every 250 ms and times its echo. When its connection closes it
records the close code (1006 when the connection ended without a close frame), reconnects
(retrying every 100 ms for 10 s) and checks an echo on the new connection. When stdin closes,
it prints one JSON object: per client its echoes, closes and reconnections, timestamps on
time.monotonic() (the same clock as the caller's on Linux).
"""

import asyncio
import json
import sys
import time

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

ECHO_EVERY_S = 0.25
RECONNECT_FOR_S = 10.0


async def open_checked(url: str):
    ws = await connect(url, open_timeout=5, close_timeout=5)
    await ws.send("hello")
    if await asyncio.wait_for(ws.recv(), 5) != "hello":
        raise RuntimeError("no echo")
    return ws


async def reconnect(url: str, rec: dict):
    deadline = time.monotonic() + RECONNECT_FOR_S
    while time.monotonic() < deadline:
        try:
            ws = await open_checked(url)
            rec["reconnected"].append(time.monotonic())
            return ws
        except (OSError, InvalidHandshake, ConnectionClosed, asyncio.TimeoutError, RuntimeError) as exc:
            rec["failed_connects"].append([time.monotonic(), type(exc).__name__])
            await asyncio.sleep(0.1)
    return None


async def client(url: str, ws, stop: asyncio.Event) -> dict:
    rec = {"echoes": [], "closes": [], "reconnected": [], "failed_connects": []}
    while ws is not None and not stop.is_set():
        sent = time.monotonic()
        try:
            await ws.send("tick")
            while await asyncio.wait_for(ws.recv(), 30) != "tick":
                pass
            rec["echoes"].append([sent, (time.monotonic() - sent) * 1e3])
            await asyncio.wait_for(stop.wait(), ECHO_EVERY_S)
        except asyncio.TimeoutError:
            continue
        except ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd is not None else 1006
            rec["closes"].append([time.monotonic(), code])
            ws = await reconnect(url, rec)
    if ws is not None:
        await ws.close()
    return rec


async def main() -> None:
    port, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    url = f"ws://127.0.0.1:{port}{path}"
    sockets = [await open_checked(url) for _ in range(n)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(client(url, ws, stop)) for ws in sockets]
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    stop.set()
    print(json.dumps({"clients": await asyncio.gather(*tasks)}), flush=True)


asyncio.run(main())
