"""Stores for the runtime conformance suite (``test_conformance.py``), one per kind.

``StoreFactory`` builds a fresh store of one kind (``memory``, ``sqlite`` or ``postgres``; the
SQLite file lives in the test's ``tmp_path``, the PostgreSQL store in a fresh schema of the
``MEERKAT_TEST_PG_URL`` database, dropped at teardown; a ``postgres`` test is skipped, saying
why, when that server is unreachable) and can reopen a closed store's data the way a restarted
process would: the same object for the memory store (its data lives in the object), a new
``SqliteStore`` on the same file for SQLite, a new ``PostgresStore`` on the same schema for
PostgreSQL (a closed store cannot be reopened).

``ProbeStore`` wraps any store and delegates every call to it. It only observes ``submit``:
the awaitable it hands back completes after the real store's (optionally ``delay`` seconds
later, to widen the window in which a runtime that acknowledges before durability would be
caught), it records which input ids a durable transaction made durable (``synced``), and
``flushed()`` waits until every transaction submitted so far has completed, so a test can read
what the store durably holds without racing the store's writer.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from meerkat_runtime._ids import InputId
from meerkat_runtime.store.base import RuntimeStore, Txn
from meerkat_runtime.store.memory import MemoryStore
from meerkat_runtime.store.postgres import PostgresStore
from meerkat_runtime.store.sqlite import SqliteStore
from tests.postgres import support as pg

__all__ = ["STORE_KINDS", "ProbeStore", "StoreFactory", "skip_without_postgres"]

STORE_KINDS = ("memory", "sqlite", "postgres")


def skip_without_postgres() -> None:
    """Skip the running test, saying why, when the test PostgreSQL server is unreachable."""
    reason = pg.unavailable()
    if reason is not None:
        pytest.skip(reason)


class ProbeStore:
    """Delegates to ``inner``; observes ``submit`` (see the module docstring)."""

    def __init__(self, inner: Any, delay: float = 0.0) -> None:
        self.inner = inner
        self.delay = delay
        self.synced: set[InputId] = set()
        self._pending: set[asyncio.Future[None]] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"ProbeStore({self.inner!r}, delay={self.delay})"

    def submit(self, txn: Txn) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        inner = asyncio.ensure_future(self.inner.submit(txn))
        fut: asyncio.Future[None] = loop.create_future()
        ids = list(txn.states)
        durable = txn.durable

        def resolve() -> None:
            if fut.done():
                return
            if inner.cancelled():
                fut.cancel()
                return
            exc = inner.exception()
            if exc is not None:
                fut.set_exception(exc)
                return
            if durable:
                self.synced.update(ids)
            fut.set_result(None)

        def on_inner(_: asyncio.Future[None]) -> None:
            if self.delay > 0:
                loop.call_later(self.delay, resolve)
            else:
                resolve()

        inner.add_done_callback(on_inner)
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)
        return fut

    async def flushed(self) -> None:
        """Wait until every transaction submitted so far completed (durable or failed)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)


@dataclass
class StoreFactory:
    """Fresh stores of one kind for one test (``kind`` is the pytest id)."""

    kind: str
    tmp_path: Path
    made: list[Any] = field(default_factory=list)
    schemas: list[str] = field(default_factory=list)

    def __call__(self) -> RuntimeStore:
        store: Any
        if self.kind == "memory":
            store = MemoryStore()
        elif self.kind == "sqlite":
            store = SqliteStore(self.tmp_path / f"conformance-{len(self.made)}.db")
        elif self.kind == "postgres":
            skip_without_postgres()
            url, schema = pg.fresh_schema()
            self.schemas.append(schema)
            store = PostgresStore(url)
        else:
            raise ValueError(f"unknown store kind {self.kind!r}")
        self.made.append(store)
        return store  # type: ignore[no-any-return]

    def reopen(self, store: Any) -> RuntimeStore:
        """The same data as ``store`` (closed by its Runtime), as a restarted process sees it."""
        inner = store.inner if isinstance(store, ProbeStore) else store
        if isinstance(inner, MemoryStore):
            return inner  # type: ignore[return-value]
        if isinstance(inner, SqliteStore):
            again = SqliteStore(inner.path)
            self.made.append(again)
            return again  # type: ignore[return-value]
        if isinstance(inner, PostgresStore):
            pg_again = PostgresStore(inner._dsn)
            self.made.append(pg_again)
            return pg_again  # type: ignore[return-value]
        raise TypeError(f"cannot reopen {store!r}")

    async def close_all(self) -> None:
        """Teardown: close whatever a failing test left open (closing twice is harmless)."""
        for store in self.made:
            with contextlib.suppress(Exception):
                await store.close()
        for schema in self.schemas:
            pg.drop_schema(schema)
