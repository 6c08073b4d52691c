"""LISTEN/NOTIFY for the PostgreSQL store: wake-ups without polling (issue 7).

Three channels per store (``channels_for``: suffixed for a schema other than ``public``),
each notification's payload a runtime id:

- ``meerkat_inbox``: an input was pushed to the runtime's durable inbox. The owner ingests it
  at once; with no live owner, a worker takes the session over.
- ``meerkat_released``: the runtime's lease was released (a drained worker): a worker may
  take it over now.
- ``meerkat_changes``: a transaction of the runtime committed (states, runs, events). Waiters
  and event followers in other processes re-read the store.

Notifications are sent inside the writing transaction (``pg_notify``), so PostgreSQL delivers
them only after COMMIT (a reader woken by one sees the write) and never for a rolled-back
savepoint. They are hints, not data: nothing is lost when one is missed, because every
consumer also re-reads on a slow poll. Each (re)connection of the listener first yields a
``resync`` notice, since notifications sent while it was not listening are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import TupleRow

from .base import StoreNotice

__all__ = ["Channels", "channels_for", "listen"]

log = logging.getLogger("meerkat_runtime.store")

_MAX_BACKOFF = 5.0


@dataclass(frozen=True, slots=True)
class Channels:
    """The channel names of one store (one schema)."""

    inbox: str
    changes: str
    released: str


def channels_for(schema: str) -> Channels:
    """``meerkat_inbox`` / ``meerkat_changes`` for the ``public`` schema; other schemas (other
    stores in the same database: notifications are database-wide) add a short digest of the
    schema name, so stores side by side never wake each other."""
    if schema == "public":
        return Channels("meerkat_inbox", "meerkat_changes", "meerkat_released")
    tag = hashlib.sha1(schema.encode()).hexdigest()[:10]
    return Channels(f"meerkat_inbox_{tag}", f"meerkat_changes_{tag}", f"meerkat_released_{tag}")


async def listen(
    connect: Callable[[], Awaitable[AsyncConnection[TupleRow]]],
    channels: Channels,
    name: str,
    is_open: Callable[[], bool],
) -> AsyncIterator[StoreNotice]:
    """Notices of both channels, forever (until ``is_open()`` turns false or the consumer
    stops iterating): ``resync`` after each (re)connection, then ``inbox`` / ``change``
    notices in delivery order. A lost connection is reconnected with backoff (capped at 5 s);
    the failure is logged once per outage, naming the store."""
    topics = {
        channels.inbox: "inbox",
        channels.changes: "change",
        channels.released: "released",
    }
    backoff = 0.1
    failing = False
    while is_open():
        conn: AsyncConnection[TupleRow] | None = None
        try:
            conn = await connect()
            for channel in topics:
                await conn.execute(f"LISTEN {channel}")  # names are ours: [a-z0-9_]
            if failing:
                log.warning("store %s: listening for notifications again", name)
            failing, backoff = False, 0.1
            yield StoreNotice("resync", "")
            async for note in conn.notifies():
                topic = topics.get(note.channel)
                if topic is not None and note.payload:
                    yield StoreNotice(topic, note.payload)
        except (psycopg.Error, OSError) as exc:
            if not failing:
                log.warning(
                    "store %s: notification listener lost its connection (%s); reconnecting,"
                    " polling meanwhile",
                    name,
                    str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                )
            failing = True
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        if not is_open():
            return
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, _MAX_BACKOFF)
