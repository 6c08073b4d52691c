"""A session's events as Server-Sent Events.

One SSE message per event envelope (runtime and agent events share the session's ``seq``)::

    id: 42
    event: agent.text_delta
    data: {"id": "...", "seq": 42, "timestamp": "...", "runtime_id": "...", "event": {...}}

Invariants:
- ``id`` is the envelope's ``seq``, so a client that reconnects with ``Last-Event-ID`` (or
  ``?after=``) gets every later event exactly once. An ``events_gap`` event (what it asked
  for was pruned) carries as ``id`` the last ``seq`` it stands for (its ``to``), so resuming
  after it continues after the gap.
- A comment line (``: keep-alive``) goes out whenever nothing was sent for ``keepalive``
  seconds, so proxies and clients see the stream is alive.
- The stream ends when the runtime's event iterator ends (``follow=false``: what is kept,
  then the end), when ``stop`` is set (server shutdown) or when the client goes away (the
  response task is cancelled); in every case the reader task and the runtime iterator are
  closed, nothing is left running.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from ..host import Runtime
from ..runtime.events import RuntimeEventEnvelope

__all__ = ["event_stream", "format_event"]

log = logging.getLogger("meerkat_runtime.rest")

_END = object()


def format_event(env: RuntimeEventEnvelope) -> bytes:
    code = env.code
    event_id = env.seq
    if code == "stream.events_gap":
        data = env.event.get("data") or {}
        to = data.get("to")
        if isinstance(to, int):
            event_id = to
    return f"id: {event_id}\nevent: {code}\ndata: {env.to_json()}\n\n".encode()


async def event_stream(
    rt: Runtime,
    session_id: str,
    after: int,
    *,
    follow: bool,
    stop: asyncio.Event,
    keepalive: float = 15.0,
) -> AsyncIterator[bytes]:
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=512)

    async def pump() -> None:
        it = rt.events(session_id, after, follow=follow)
        try:
            async for env in it:
                await queue.put(env)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream ends; the client resumes from its last id
            log.warning("event stream of session %s ended: %s", session_id, exc)
        finally:
            close = getattr(it, "aclose", None)
            if close is not None:
                await close()
        await queue.put(_END)

    reader = asyncio.get_running_loop().create_task(pump(), name=f"sse-{session_id}")
    stopper = asyncio.get_running_loop().create_task(stop.wait())
    try:
        yield b": meerkat events\n\n"
        while True:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait(
                {getter, stopper}, timeout=keepalive, return_when=asyncio.FIRST_COMPLETED
            )
            if getter not in done:
                getter.cancel()
                try:
                    await getter
                    done.add(getter)  # it finished while being cancelled: keep its event
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise  # we are being cancelled, not just the getter
            if getter in done:
                item = getter.result()
                if item is _END:
                    return
                assert isinstance(item, RuntimeEventEnvelope)
                yield format_event(item)
                continue
            if stopper in done:
                return
            yield b": keep-alive\n\n"
    finally:
        for task in (reader, stopper):
            task.cancel()
        await asyncio.wait({reader, stopper}, timeout=5.0)
