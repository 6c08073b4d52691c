"""A scriptable HTTP/1.1 server on 127.0.0.1 for provider tests.

It runs its own asyncio loop in a daemon thread, so the SDK clients under test (on the test's
loop) talk to it over a real socket. Each request is recorded and answered by the next queued
``Reply`` (or by ``default``). A reply's ``chunks`` are written one by one with chunked
transfer encoding; a float in ``chunks`` is a pause in seconds, so a test can stream slowly
(or for 30 s, to be cancelled). ``cut`` closes the connection after the chunks without the
terminating chunk: the client sees a stream that broke in the middle. A pause ends early when
the client closes the connection (the reply is then dropped), so ``open_streams`` drops to 0
soon after a client abandons a slow stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LoopbackServer", "Recorded", "Reply", "sse"]


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes | str | float] = field(default_factory=list)
    cut: bool = False

    @classmethod
    def json(cls, status: int, body: Any, headers: dict[str, str] | None = None) -> Reply:
        h = {"content-type": "application/json", **(headers or {})}
        return cls(status=status, headers=h, chunks=[json.dumps(body).encode()])


def sse(*events: tuple[str | None, Any]) -> list[bytes | str | float]:
    """Server-sent-event chunks: ``(event_name or None, data)``; data that is not a str is
    JSON-encoded. Floats may be interleaved by the caller for pauses."""
    out: list[bytes | str | float] = []
    for name, data in events:
        payload = data if isinstance(data, str) else json.dumps(data)
        head = f"event: {name}\n" if name else ""
        out.append(f"{head}data: {payload}\n\n".encode())
    return out


_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
    529: "Overloaded",
}


class LoopbackServer:
    """Use as a context manager; ``url`` is ``http://127.0.0.1:<port>``."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.replies: queue.Queue[Reply | Callable[[Recorded], Reply]] = queue.Queue()
        self.default: Reply | Callable[[Recorded], Reply] = Reply.json(
            500, {"error": {"message": "no reply queued", "type": "server_error"}}
        )
        self.port = 0
        self.open_streams = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def push(self, *replies: Reply | Callable[[Recorded], Reply]) -> None:
        for r in replies:
            self.replies.put(r)

    def __enter__(self) -> LoopbackServer:
        self._thread = threading.Thread(target=self._serve, daemon=True, name="loopback-http")
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("loopback server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._server = loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await self._read_request(reader)
                if request is None:
                    return
                self.requests.append(request)
                try:
                    reply = self.replies.get_nowait()
                except queue.Empty:
                    reply = self.default
                if callable(reply):
                    reply = reply(request)
                keep = await self._write(writer, reply, reader)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> Recorded | None:
        line = await reader.readline()
        if not line:
            return None
        method, path, _ = line.decode("latin-1").split(" ", 2)
        headers: dict[str, str] = {}
        while True:
            h = await reader.readline()
            if h in (b"\r\n", b"\n", b""):
                break
            k, _, v = h.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        body = b""
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await reader.readline()).strip(), 16)
                if size == 0:
                    await reader.readline()
                    break
                parts.append(await reader.readexactly(size))
                await reader.readline()
            body = b"".join(parts)
        return Recorded(method, path, headers, body)

    async def _write(
        self,
        writer: asyncio.StreamWriter,
        reply: Reply,
        reader: asyncio.StreamReader | None = None,
    ) -> bool:
        reason = _REASONS.get(reply.status, "Status")
        head = [f"HTTP/1.1 {reply.status} {reason}", "transfer-encoding: chunked"]
        head += [f"{k}: {v}" for k, v in reply.headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        self.open_streams += 1
        try:
            for chunk in reply.chunks:
                if isinstance(chunk, float):
                    if await self._pause(chunk, reader):
                        writer.transport.abort()  # the client went away
                        return False
                    continue
                data = chunk.encode() if isinstance(chunk, str) else chunk
                writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                await writer.drain()
            if reply.cut:
                writer.transport.abort()
                return False
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        finally:
            self.open_streams -= 1

    @staticmethod
    async def _pause(seconds: float, reader: asyncio.StreamReader | None) -> bool:
        """Sleep ``seconds``; return True early if the client closed the connection."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            if reader is not None and (reader.at_eof() or reader.exception() is not None):
                return True
            left = deadline - loop.time()
            if left <= 0:
                return False
            await asyncio.sleep(min(left, 0.01))


@contextlib.contextmanager
def loopback() -> Iterator[LoopbackServer]:
    with LoopbackServer() as server:
        yield server
