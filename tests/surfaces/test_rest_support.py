"""Helpers for the REST tests (no tests here): a real uvicorn server on 127.0.0.1, run as a
task in the test's event loop, and an SSE reader.

The server listens on a socket bound to port 0 (no port races) and is stopped through
uvicorn's own shutdown path (``should_exit``), so the tests exercise the same shutdown as
``meerkat serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI

from meerkat_runtime import Runtime
from meerkat_runtime.runtime.driver import RuntimeConfig
from meerkat_runtime.runtime.policy import PolicyTable
from meerkat_runtime.surfaces import rest


@dataclass
class Live:
    url: str
    server: rest._Server
    task: asyncio.Task[None]

    async def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        await asyncio.wait_for(asyncio.shield(self.task), timeout)


@contextlib.asynccontextmanager
async def live_server(app: FastAPI) -> AsyncIterator[Live]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = rest._server_for(app, host="127.0.0.1", port=port, log_level="warning")
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(1000):
            if server.started:
                break
            if task.done():
                task.result()
                raise RuntimeError("the server stopped before it started")
            await asyncio.sleep(0.01)
        else:
            raise RuntimeError("the server did not start within 10 s")
        live = Live(f"http://127.0.0.1:{port}", server, task)
        yield live
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 20)
        sock.close()


def rt_config(**overrides: Any) -> RuntimeConfig:
    cfg: dict[str, Any] = {"shutdown_grace": 0.5, "backoff_base": 0.01, "backoff_max": 0.05}
    cfg.update(overrides)
    return RuntimeConfig(**cfg)


@dataclass
class Api:
    rt: Runtime
    client: httpx.AsyncClient
    live: Live


@contextlib.asynccontextmanager
async def api_for(
    *,
    token: str | None = None,
    config: RuntimeConfig | None = None,
    policy: PolicyTable | None = None,
) -> AsyncIterator[Api]:
    async with Runtime.open("memory://", config=config or rt_config(), policy=policy) as rt:
        app = rest.create_app(rt, token=token)
        async with live_server(app) as live:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with httpx.AsyncClient(base_url=live.url, timeout=20, headers=headers) as c:
                yield Api(rt, c, live)


@dataclass
class SseEvent:
    id: str | None
    event: str | None
    data: dict[str, Any] | None
    comment: bool = False
    received_at: float = 0.0

    @property
    def seq(self) -> int:
        assert self.id is not None
        return int(self.id)


@dataclass
class SseReader:
    """Parses an SSE byte stream into events (comments kept as ``comment`` events)."""

    buffer: str = ""
    lines: list[str] = field(default_factory=list)

    def feed(self, text: str) -> list[SseEvent]:
        self.buffer += text
        out: list[SseEvent] = []
        while "\n\n" in self.buffer:
            block, self.buffer = self.buffer.split("\n\n", 1)
            ev_id = ev_name = None
            data: list[str] = []
            comment = False
            for line in block.split("\n"):
                if line.startswith(":"):
                    comment = True
                elif line.startswith("id: "):
                    ev_id = line[4:]
                elif line.startswith("event: "):
                    ev_name = line[7:]
                elif line.startswith("data: "):
                    data.append(line[6:])
            parsed = json.loads("\n".join(data)) if data else None
            now = asyncio.get_running_loop().time()
            out.append(SseEvent(ev_id, ev_name, parsed, comment, now))
        return out


async def read_sse(
    client: httpx.AsyncClient,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    until: str | None = None,
    count: int | None = None,
    timeout: float = 10.0,
    on_open: asyncio.Event | None = None,
) -> list[SseEvent]:
    """Events (not comments) of ``path`` until one named ``until`` (included), ``count``
    events, or the end of the stream; then the client disconnects."""
    events: list[SseEvent] = []
    reader = SseReader()

    async def consume() -> None:
        async with client.stream("GET", path, headers=headers or {}) as resp:
            assert resp.status_code == 200, await resp.aread()
            assert resp.headers["content-type"].startswith("text/event-stream")
            async for chunk in resp.aiter_text():
                for ev in reader.feed(chunk):
                    if ev.comment:
                        if on_open is not None:
                            on_open.set()
                        continue
                    events.append(ev)
                    if (until is not None and ev.event == until) or (
                        count is not None and len(events) >= count
                    ):
                        return

    await asyncio.wait_for(consume(), timeout)
    return events
