"""Event delivery of ``rkat-rpc``: ``session/event`` forwarding and ``session/stream_*``.

Two ways out, both fed by ``Runtime.events`` (the session's event sequence, S15):

- **Forwarders** (one per session this server touched): every *agent* event of the session
  becomes ``session/event {session_id, sequence, event}`` where ``event`` is the flat SDK
  event (``{"type": "text_delta", "delta": ...}``) that ``meerkat.EventStream`` parses and
  ``sequence`` is the event's ``seq`` in the session. A request that ran a turn calls
  ``flush`` before it answers, so every event of its run is on the wire before its response
  (the SDK stops reading a stream when the response arrives).
- **Streams** (``session/stream_open``): every event of the session's sequence, from
  ``after_seq`` on, as ``session/stream_event {stream_id, sequence, session_id, event}``;
  ``sequence`` counts this stream's notifications from 1 and ``event`` is the SDK's
  ``EventEnvelope`` ``{event_id, source_id, seq, timestamp_ms, payload}`` (plus
  ``category``) whose ``seq`` is the session sequence number to resume after. Agent events
  carry the SDK event as ``payload``; runtime events (input, run, state, recovery) carry
  ``{"type": "<dotted code>", ...their fields}``, which the SDK reads as ``UnknownEvent``.
  A stream ends with ``session/stream_end {stream_id, session_id, ended: true, outcome}``:
  ``explicit_close`` (``session/stream_close``), ``remote_end`` (session archived or server
  shutting down) or ``terminal_error`` (with ``error{code, message}``).

Invariants: a stream delivers the session's events in ``seq`` order, each once; reopening
with ``after_seq`` = the last ``seq`` seen misses no event still kept and repeats none (a
resume past what is kept yields one ``stream.events_gap`` whose envelope ``seq`` is the last
missing one). Writes are awaited one at a time, so a slow client slows its streams down
instead of losing events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .._ids import new_uuid7
from ..host import Runtime
from ..runtime.events import RuntimeEventEnvelope, event_code

__all__ = ["EventHub", "envelope_wire"]

log = logging.getLogger("meerkat_runtime.rpc")

Send = Callable[[dict[str, Any]], Awaitable[None]]

FLUSH_TIMEOUT = 2.0
"""Seconds a response waits for its run's events to be written before it goes anyway."""


def _notification(method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": method, "params": params}


def envelope_wire(env: RuntimeEventEnvelope) -> dict[str, Any]:
    """The SDK's ``EventEnvelope`` for one event of the session's sequence."""
    category = str(env.event.get("category", ""))
    data = env.event.get("data") or {}
    seq = env.seq
    if category == "agent":
        payload: dict[str, Any] = dict(data)
    else:
        payload = {"type": event_code(env.event)}
        payload.update({k: v for k, v in data.items() if k != "code"})
        if seq == 0 and isinstance(data.get("to"), int):  # events_gap: resume after the gap
            seq = data["to"]
    return {
        "event_id": str(env.id),
        "source_id": env.runtime_id,
        "seq": seq,
        "timestamp_ms": int(env.timestamp.timestamp() * 1000),
        "category": category,
        "payload": payload,
    }


@dataclass
class _Forwarder:
    session_id: str
    seen: int
    task: asyncio.Task[None] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def advance(self, seq: int) -> None:
        if seq > self.seen:
            self.seen = seq
            self.changed.set()
            self.changed = asyncio.Event()


@dataclass
class _Stream:
    stream_id: str
    session_id: str
    after_seq: int
    task: asyncio.Task[None] | None = None
    sequence: int = 0
    ended: bool = False


class EventHub:
    """The forwarders and streams of one server."""

    def __init__(self, rt: Runtime, send: Send) -> None:
        self.rt = rt
        self.send = send
        self._forwarders: dict[str, _Forwarder] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._streams: dict[str, _Stream] = {}
        self._closed_streams: set[str] = set()
        self._closing = False

    # ------------------------------------------------------------------ session/event

    async def ensure_forwarder(self, session_id: str) -> None:
        """Start forwarding the session's agent events (from its current last ``seq``)."""
        if session_id in self._forwarders or self._closing:
            return
        lock = self._locks.setdefault(session_id, asyncio.Lock())
        async with lock:
            if session_id in self._forwarders:
                return
            after = await self.rt.last_event_seq(session_id)
            fwd = _Forwarder(session_id, after)
            fwd.task = asyncio.get_running_loop().create_task(
                self._forward(fwd), name=f"rpc-forward:{session_id}"
            )
            self._forwarders[session_id] = fwd

    async def _forward(self, fwd: _Forwarder) -> None:
        try:
            async for env in self.rt.events(fwd.session_id, fwd.seen, follow=True):
                if env.event.get("category") == "agent":
                    await self.send(
                        _notification(
                            "session/event",
                            {
                                "session_id": fwd.session_id,
                                "sequence": env.seq,
                                "event": dict(env.event.get("data") or {}),
                            },
                        )
                    )
                seq = env.seq
                if seq == 0:  # events_gap
                    to = (env.event.get("data") or {}).get("to")
                    seq = to if isinstance(to, int) else fwd.seen
                fwd.advance(seq)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("event forwarding of session %s stopped: %s", fwd.session_id, exc)
            self._forwarders.pop(fwd.session_id, None)

    async def flush(self, session_id: str, timeout: float = FLUSH_TIMEOUT) -> None:
        """Wait until every event the session has published so far is on the wire (at most
        ``timeout`` seconds; never raises)."""
        fwd = self._forwarders.get(session_id)
        if fwd is None:
            return
        try:
            target = await self.rt.last_event_seq(session_id)
            deadline = asyncio.get_running_loop().time() + timeout
            while fwd.seen < target and fwd.task is not None and not fwd.task.done():
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    log.warning("events of session %s not flushed in %.1f s", session_id, timeout)
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(fwd.changed.wait(), remaining)
        except Exception as exc:  # flushing is best effort: the response matters more
            log.warning("cannot flush the events of session %s: %s", session_id, exc)

    # ------------------------------------------------------------------ session/stream_*

    def open_stream(self, session_id: str, after_seq: int) -> _Stream:
        """Register a stream; ``start_stream`` starts it once the open response is out."""
        stream = _Stream(f"stream-{new_uuid7()}", session_id, after_seq)
        self._streams[stream.stream_id] = stream
        return stream

    def start_stream(self, stream: _Stream) -> None:
        if stream.ended or self._closing:
            return
        stream.task = asyncio.get_running_loop().create_task(
            self._pump(stream), name=f"rpc-stream:{stream.stream_id}"
        )

    async def _pump(self, stream: _Stream) -> None:
        try:
            async for env in self.rt.events(stream.session_id, stream.after_seq, follow=True):
                stream.sequence += 1
                await self.send(
                    _notification(
                        "session/stream_event",
                        {
                            "stream_id": stream.stream_id,
                            "sequence": stream.sequence,
                            "session_id": stream.session_id,
                            "event": envelope_wire(env),
                        },
                    )
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("stream %s failed: %s", stream.stream_id, exc)
            await self._end(
                stream,
                "terminal_error",
                {"code": "stream_failed", "message": f"{type(exc).__name__}: {exc}"},
            )
            return
        await self._end(stream, "remote_end")

    async def _end(
        self, stream: _Stream, outcome: str, error: dict[str, Any] | None = None
    ) -> None:
        if stream.ended:
            return
        stream.ended = True
        self._streams.pop(stream.stream_id, None)
        self._closed_streams.add(stream.stream_id)
        params: dict[str, Any] = {
            "stream_id": stream.stream_id,
            "session_id": stream.session_id,
            "ended": True,
            "outcome": outcome,
        }
        if error is not None:
            params["error"] = error
        await self.send(_notification("session/stream_end", params))

    async def _stop(self, stream: _Stream) -> None:
        task = stream.task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def stream_known(self, stream_id: str) -> bool | None:
        """True for an open stream, False for one that ended, None for an unknown id."""
        if stream_id in self._streams:
            return True
        if stream_id in self._closed_streams:
            return False
        return None

    async def close_stream(self, stream_id: str) -> dict[str, Any]:
        stream = self._streams.get(stream_id)
        if stream is None:
            return {"stream_id": stream_id, "closed": True, "already_closed": True}
        await self._stop(stream)
        await self._end(stream, "explicit_close")
        return {
            "stream_id": stream_id,
            "session_id": stream.session_id,
            "closed": True,
            "already_closed": False,
        }

    # ------------------------------------------------------------------ lifecycle

    async def end_session(self, session_id: str) -> None:
        """The session was archived: flush and stop its forwarder, end its streams."""
        await self.flush(session_id)
        fwd = self._forwarders.pop(session_id, None)
        if fwd is not None and fwd.task is not None:
            fwd.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fwd.task
        for stream in [s for s in self._streams.values() if s.session_id == session_id]:
            await self._stop(stream)
            await self._end(stream, "remote_end")

    async def close(self, *, notify: bool) -> None:
        """Stop every forwarder and stream (ending streams with ``remote_end`` when
        ``notify``)."""
        self._closing = True
        tasks = [f.task for f in self._forwarders.values() if f.task is not None]
        self._forwarders.clear()
        for task in tasks:
            task.cancel()
        for stream in list(self._streams.values()):
            await self._stop(stream)
            if notify:
                await self._end(stream, "remote_end")
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
