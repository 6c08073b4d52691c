"""The REST surface's gate: bearer-token auth and the request body limit, as plain ASGI
middleware (so streaming answers, SSE, pass through untouched).

Invariants:
- With a token configured, every path but ``/health`` needs ``Authorization: Bearer
  <token>``; the comparison is constant-time, and an unauthorised request is answered 401
  before its body is read. Requests matching ``open_routes`` (method, full-path pattern:
  the webhooks, which authenticate by their signature) are exempt; they still get the body
  limit.
- A body larger than ``max_body`` bytes is answered 413 and the application sees none of
  it. The rest of the body is read and dropped (up to ``DRAIN_LIMIT`` bytes) so that the
  client, still sending, gets the answer instead of a reset connection; beyond that the
  connection is closed. A body within the limit is handed on whole, and after it the
  application still receives the client's disconnect.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Sequence
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["Guard", "error_message_bytes"]

_OPEN_PATHS = frozenset({"/health"})
DRAIN_LIMIT = 16 << 20


def error_message_bytes(message: str, code: str, **details: Any) -> bytes:
    return json.dumps({"error": message, "code": code, **details}).encode()


async def _answer(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class Guard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str | None,
        max_body: int,
        open_routes: Sequence[tuple[str, re.Pattern[str]]] = (),
    ) -> None:
        self.app = app
        self._token = token.encode() if token else None
        self.max_body = max_body
        self._open_routes = tuple(open_routes)

    def _open(self, scope: Scope) -> bool:
        path = scope.get("path")
        if path in _OPEN_PATHS:
            return True
        method = scope.get("method")
        return any(
            method == m and isinstance(path, str) and pattern.fullmatch(path) is not None
            for m, pattern in self._open_routes
        )

    def _authorized(self, scope: Scope) -> bool:
        assert self._token is not None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    return hmac.compare_digest(credentials.strip(), self._token)
                return False
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._token is not None and not self._open(scope) and not self._authorized(scope):
            await _answer(
                send,
                401,
                error_message_bytes(
                    "missing or wrong bearer token: send Authorization: Bearer <token> "
                    "(the token the server was started with, MEERKAT_API_TOKEN)",
                    "unauthorized",
                ),
                [(b"www-authenticate", b"Bearer")],
            )
            return
        length: int | None = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
        if length is not None and length > self.max_body:
            await self._too_large(receive, send, length, 0)
            return
        if scope.get("method") in ("GET", "HEAD", "OPTIONS") and not length:
            await self.app(scope, receive, send)
            return
        # read the whole body (within the limit), then replay it
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # the client went away before sending its body
                await self.app(scope, _replay([], message, receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            more = bool(message.get("more_body", False))
            if size > self.max_body:
                await self._too_large(receive, send, size if not more else None, size, more)
                return
            chunks.append(chunk)
            if not more:
                break
        await self.app(scope, _replay(chunks, None, receive), send)

    async def _too_large(
        self, receive: Receive, send: Send, size: int | None, read: int, more: bool = True
    ) -> None:
        """Answer 413 after dropping the rest of the body (when it is not huge)."""
        drained = not more
        if more and (size is None or size <= DRAIN_LIMIT):
            while read <= DRAIN_LIMIT:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                read += len(message.get("body", b""))
                if not message.get("more_body", False):
                    drained = True
                    break
        told = f"{size} bytes" if size is not None else f"over {self.max_body} bytes"
        await _answer(
            send,
            413,
            error_message_bytes(
                f"request body too large: {told}, the limit is {self.max_body} bytes",
                "too_large",
                limit=self.max_body,
            ),
            None if drained else [(b"connection", b"close")],
        )


def _replay(chunks: list[bytes], pending: Message | None, receive: Receive) -> Receive:
    body = b"".join(chunks)
    state = {"sent": False}

    async def replay() -> Message:
        if not state["sent"]:
            state["sent"] = True
            if pending is not None:
                return pending
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
