"""JSON-RPC 2.0 framing for ``rkat-rpc``: error numbers, message checks, line splitting and
the stdio transport.

Invariants:
- Every error a client sees is ``{code, message, data}`` where ``data.code`` is a
  ``SurfaceError`` code (``common.ERROR_CODES``) or a protocol code (``parse_error``,
  ``invalid_request``, ``method_not_found``, ``too_large``), plus the error's details.
- ``RPC_CODES`` is the one table from ``SurfaceError`` codes to JSON-RPC numbers.
- Lines longer than ``max_line`` bytes are never buffered whole: the splitter reports them
  as ``Oversized`` (with the first bytes, to find the request id) and skips to the next
  newline.
- Messages are written one per line, whole, in the order ``send`` is called (one lock); a
  client that went away makes ``send`` a no-op, never an exception in a handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sys
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from .common import SurfaceError

__all__ = [
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "RPC_CODES",
    "LineSplitter",
    "MessageWriter",
    "Oversized",
    "RpcError",
    "error_object",
    "guess_id",
    "open_stdio",
]

log = logging.getLogger("meerkat_runtime.rpc")

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
SESSION_NOT_FOUND = -32001
SESSION_BUSY = -32002
PROVIDER_ERROR = -32010
BUDGET_EXHAUSTED = -32011

RPC_CODES: dict[str, int] = {
    "bad_request": INVALID_PARAMS,
    "unsupported": INVALID_PARAMS,
    "too_large": INVALID_PARAMS,
    "not_found": SESSION_NOT_FOUND,
    "conflict": SESSION_BUSY,
    "not_ready": SESSION_BUSY,
    "queue_full": SESSION_BUSY,
    "provider_error": PROVIDER_ERROR,
    "budget_exhausted": BUDGET_EXHAUSTED,
    "unauthorized": INTERNAL_ERROR,
    "cancelled": INTERNAL_ERROR,
    "failed": INTERNAL_ERROR,
    "timeout": INTERNAL_ERROR,
    "internal": INTERNAL_ERROR,
}
"""``SurfaceError.code`` → JSON-RPC error number."""


class RpcError(Exception):
    """A protocol-level failure (not a ``SurfaceError``): parse, invalid request, unknown
    method."""

    def __init__(self, number: int, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.number = number
        self.code = code
        self.message = message
        self.details = details


def error_object(exc: SurfaceError | RpcError) -> dict[str, Any]:
    """The JSON-RPC ``error`` member for ``exc``."""
    number = exc.number if isinstance(exc, RpcError) else RPC_CODES.get(exc.code, INTERNAL_ERROR)
    data: dict[str, Any] = {"code": exc.code}
    data.update(exc.details)
    return {"code": number, "message": exc.message, "data": data}


_ID_PATTERN = re.compile(rb'"id"\s*:\s*(-?\d{1,18}|"(?:[^"\\]|\\.){0,200}")')


def guess_id(prefix: bytes) -> Any:
    """The request id found in the first bytes of a line that could not be read whole (so
    the client can match the error to its request); None when there is none."""
    match = _ID_PATTERN.search(prefix)
    if match is None:
        return None
    try:
        return json.loads(match.group(1))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Oversized:
    """A line longer than the limit: its first bytes and its size so far."""

    prefix: bytes
    size: int


class LineSplitter:
    """Splits a byte stream into lines (without the newline) of at most ``max_line`` bytes."""

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._skipping: Oversized | None = None

    def feed(self, chunk: bytes) -> list[bytes | Oversized]:
        out: list[bytes | Oversized] = []
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            piece = chunk[start:] if nl < 0 else chunk[start:nl]
            if self._skipping is not None:
                self._skipping = Oversized(self._skipping.prefix, self._skipping.size + len(piece))
            else:
                self._buf += piece
                if len(self._buf) > self.max_line:
                    self._skipping = Oversized(bytes(self._buf[:4096]), len(self._buf))
                    self._buf.clear()
            if nl < 0:
                return out
            if self._skipping is not None:
                out.append(self._skipping)
                self._skipping = None
            else:
                out.append(bytes(self._buf))
                self._buf.clear()
            start = nl + 1

    def finish(self) -> list[bytes | Oversized]:
        """What remains at end of input (a last line without a newline)."""
        if self._skipping is not None:
            last: list[bytes | Oversized] = [self._skipping]
        elif self._buf.strip():
            last = [bytes(self._buf)]
        else:
            last = []
        self._skipping = None
        self._buf.clear()
        return last


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


class MessageWriter:
    """Writes whole JSON lines in call order; silent once the client is gone."""

    def __init__(
        self,
        write: Callable[[bytes], None],
        drain: Callable[[], Any] | None = None,
        close: Callable[[], None] | None = None,
    ) -> None:
        self._write = write
        self._drain = drain
        self._close = close
        self._lock = asyncio.Lock()
        self.broken = False

    async def send(self, message: dict[str, Any]) -> None:
        try:
            data = _encode(message)
        except (TypeError, ValueError) as exc:  # a bug: never let it kill the server
            log.error("cannot encode a message: %s", exc)
            data = _encode(
                {
                    "jsonrpc": "2.0",
                    "id": message.get("id"),
                    "error": {
                        "code": INTERNAL_ERROR,
                        "message": f"internal error: the result cannot be encoded: {exc}",
                        "data": {"code": "internal"},
                    },
                }
            )
        async with self._lock:
            if self.broken:
                return
            try:
                self._write(data)
                if self._drain is not None:
                    drained = self._drain()
                    if drained is not None:
                        await drained
            except (OSError, RuntimeError, ConnectionError) as exc:
                self.broken = True
                log.info("client output closed: %s", exc)

    def close(self) -> None:
        if self._close is not None:
            with contextlib.suppress(Exception):
                self._close()


async def _thread_chunks(fd: int) -> AsyncIterator[bytes]:
    """Chunks read from ``fd`` by a daemon thread (for stdin that is a regular file)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    def pump() -> None:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            try:
                loop.call_soon_threadsafe(queue.put_nowait, chunk)
            except RuntimeError:  # the loop is closed
                return
            if not chunk:
                return

    threading.Thread(target=pump, name="meerkat-rpc-stdin", daemon=True).start()
    while True:
        chunk = await queue.get()
        if not chunk:
            return
        yield chunk


async def _reader_chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            return
        yield chunk


async def open_stdio() -> tuple[AsyncIterator[bytes], MessageWriter]:
    """The chunks of stdin and a writer for the protocol output.

    Protocol output goes to a duplicate of the original stdout; file descriptor 1 (and
    ``sys.stdout``) are then pointed at stderr, so nothing but protocol lines can ever reach
    the client's stdout (a stray ``print`` in a tool or library lands on stderr)."""
    loop = asyncio.get_running_loop()
    sys.stdout.flush()
    out_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    out_file: BinaryIO = os.fdopen(out_fd, "wb", buffering=0)

    writer: MessageWriter
    try:
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, out_file
        )
        stream = asyncio.StreamWriter(transport, protocol, None, loop)
        writer = MessageWriter(stream.write, stream.drain, stream.close)
    except (ValueError, OSError):  # a regular file: plain blocking writes are fine

        def write_file(data: bytes) -> None:
            out_file.write(data)

        writer = MessageWriter(write_file, None, out_file.close)

    chunks: AsyncIterator[bytes]
    try:
        reader = asyncio.StreamReader(limit=1 << 20)
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader),
            os.fdopen(0, "rb", buffering=0, closefd=False),
        )
        chunks = _reader_chunks(reader)
    except (ValueError, OSError):
        chunks = _thread_chunks(0)
    return chunks, writer
