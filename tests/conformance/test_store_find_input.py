"""Store conformance for ``find_input_runtime`` (``meerkat wait INPUT_ID`` without a session):
the same rules for the memory store (the reference) and the SQLite store, plus the SQLite
index that keeps the lookup off a table scan and its migration of an older file."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meerkat_runtime._ids import InputId
from meerkat_runtime.runtime.inputs import PromptInput
from meerkat_runtime.store.base import InboxEntry
from meerkat_runtime.store.memory import MemoryStore
from meerkat_runtime.store.postgres import PostgresStore
from meerkat_runtime.store.sqlite import SqliteStore, load_migrations
from tests.conformance.stores import STORE_KINDS, StoreFactory
from tests.conformance.test_store_conformance import IS, _idem, lease, mk_state, mk_txn

Store = MemoryStore | SqliteStore | PostgresStore


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    factory = StoreFactory(request.param, tmp_path)
    s: Store = factory()  # type: ignore[assignment]
    try:
        await s.open()
        yield s
    finally:
        await factory.close_all()


async def test_find_input_runtime_in_the_ledger_of_the_runtime_that_holds_it(
    store: Store,
) -> None:
    queued, consumed, other = mk_state(IS.QUEUED), mk_state(IS.CONSUMED), mk_state(IS.QUEUED)
    await store.submit(mk_txn("rt-a", await lease(store, "rt-a"), queued, consumed))
    await store.submit(mk_txn("rt-b", await lease(store, "rt-b"), other))
    assert await store.find_input_runtime(queued.input_id) == "rt-a"
    assert await store.find_input_runtime(consumed.input_id) == "rt-a"  # terminal ones too
    assert await store.find_input_runtime(other.input_id) == "rt-b"
    assert await store.find_input_runtime(InputId.new()) is None


async def test_find_input_runtime_in_the_inbox_with_or_without_a_key(store: Store) -> None:
    await lease(store, "rt-inbox")
    plain = PromptInput.new("no key")
    keyed = PromptInput.new("with a key", idempotency_key="k1")
    idem = _idem("k1", "h1", keyed.id)
    assert await store.inbox_push(InboxEntry("rt-inbox", plain.to_json()), None, 10) == (
        "accepted",
        None,
    )
    assert await store.inbox_push(InboxEntry("rt-inbox", keyed.to_json()), idem, 10) == (
        "accepted",
        None,
    )
    assert await store.find_input_runtime(plain.id) == "rt-inbox"
    assert await store.find_input_runtime(keyed.id) == "rt-inbox"


async def test_find_input_runtime_ignores_an_id_named_elsewhere_in_an_inbox_document(
    store: Store,
) -> None:
    """Only the document's own header id counts, not an id quoted in its text."""
    await lease(store, "rt-text")
    mentioned = InputId.new()
    doc = PromptInput.new(f"see input {mentioned}")
    await store.inbox_push(InboxEntry("rt-text", doc.to_json()), None, 10)
    assert await store.find_input_runtime(mentioned) is None
    assert await store.find_input_runtime(doc.id) == "rt-text"


async def test_sqlite_find_input_runtime_uses_the_index_and_survives_reopen(
    tmp_path: Path,
) -> None:
    path = tmp_path / "idx.db"
    s = SqliteStore(path)
    await s.open()
    st = mk_state(IS.QUEUED)
    await s.submit(mk_txn("rt-x", await lease(s, "rt-x"), st))
    await s.close()
    s2 = SqliteStore(path)
    await s2.open()
    try:
        assert await s2.find_input_runtime(st.input_id) == "rt-x"
    finally:
        await s2.close()
    with sqlite3.connect(path) as raw:
        plan = raw.execute(
            "EXPLAIN QUERY PLAN SELECT runtime_id FROM input_states WHERE input_id = ?",
            (st.input_id.value,),
        ).fetchall()
    assert any("input_states_by_input" in str(row[-1]) for row in plan), plan


async def test_sqlite_migration_2_adds_the_index_to_a_version_1_file(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    v1 = [m for m in load_migrations() if m.version == 1]
    old = SqliteStore(path, migrations=v1)
    await old.open()
    st = mk_state(IS.QUEUED)
    await old.submit(mk_txn("rt-old", await lease(old, "rt-old"), st))
    await old.close()
    new = SqliteStore(path)
    await new.open()
    try:
        assert await new.schema_version() >= 2
        assert await new.find_input_runtime(st.input_id) == "rt-old"
    finally:
        await new.close()
    with sqlite3.connect(path) as raw:
        names = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "input_states_by_input" in names
