"""Ownership on PostgreSQL (S10): two store instances on one database stand for two processes.
The database decides: a stale generation's transaction is refused with ``FencedError`` and
writes nothing, also when the store that sends it never heard of the takeover; leases are
taken over after expiry with a new generation, and a race for a free lease has one winner."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import psycopg
import pytest

from meerkat_runtime.runtime.state import RuntimeState
from meerkat_runtime.store.base import FencedError, InboxEntry
from meerkat_runtime.store.postgres import PostgresStore
from tests.conformance.test_store_conformance import _idem, mk_event, mk_state, mk_txn


@pytest.fixture
async def two(pg_url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    a, b = PostgresStore(pg_url), PostgresStore(pg_url)
    await a.open()
    await b.open()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


def _count(url: str, sql: str, *args: object) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(sql, args).fetchone()
    assert row is not None
    return int(row[0])


async def test_a_stale_generation_is_refused_by_the_database(
    two: tuple[PostgresStore, PostgresStore], pg_url: str
) -> None:
    a, b = two
    rid = "rt-fenced"
    ga = await a.acquire_lease(rid, "proc-a", 0.2)
    assert ga == 1
    await a.submit(mk_txn(rid, ga, mk_state(), events=[mk_event(rid, 1)]))
    assert await b.acquire_lease(rid, "proc-b", 30) is None  # a's lease is live
    await asyncio.sleep(0.3)
    gb = await b.acquire_lease(rid, "proc-b", 30)  # expired: taken over
    assert gb == 2
    # a goes on as if nothing happened: it has no idea, the database does
    stale = mk_state()
    with pytest.raises(FencedError, match=r"generation 2.*generation 1"):
        await a.submit(
            mk_txn(
                rid,
                ga,
                stale,
                events=[mk_event(rid, 2)],
                runtime_state=RuntimeState.RETIRED,
                recovered=True,
                next_generation=9,
            )
        )
    assert (
        _count(
            pg_url, "SELECT count(*) FROM input_states WHERE input_id = %s", stale.input_id.value
        )
        == 0
    )
    assert _count(pg_url, "SELECT count(*) FROM events WHERE runtime_id = %s", rid) == 1
    loaded = await b.load_runtime(rid)
    assert (loaded.generation, loaded.state, loaded.recovery_count, loaded.last_seq) == (
        2,
        RuntimeState.IDLE,
        0,
        1,
    )
    # the new owner writes; the old one stays refused (and cannot renew)
    await b.submit(mk_txn(rid, gb, stale, events=[mk_event(rid, 2)]))
    assert await a.renew_lease(rid, "proc-a", ga, 30) is False
    with pytest.raises(FencedError):
        await a.submit(mk_txn(rid, ga, mk_state()))


async def test_the_fence_is_read_in_the_writing_transaction(
    two: tuple[PostgresStore, PostgresStore], pg_url: str
) -> None:
    """No cached generation: moving the fence in the database (as another process's
    takeover does) is enough to refuse the very next write of this store."""
    a, _ = two
    rid = "rt-direct"
    gen = await a.acquire_lease(rid, "proc-a", 30)
    assert gen == 1
    await a.submit(mk_txn(rid, gen, mk_state()))
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE runtimes SET generation = 7 WHERE runtime_id = %s", (rid,))
    doomed = mk_state()
    with pytest.raises(FencedError, match="generation 7"):
        await a.submit(mk_txn(rid, gen, doomed))
    assert await a.load_input_state(rid, doomed.input_id) is None
    await a.submit(mk_txn(rid, 7, doomed))  # generation 7 is the owner now
    assert await a.load_input_state(rid, doomed.input_id) is not None


async def test_a_fenced_transaction_waits_for_the_takeover_it_races(
    two: tuple[PostgresStore, PostgresStore], pg_url: str
) -> None:
    """A takeover holding the runtime row blocks the old owner's write until it commits; the
    write then sees the new generation and is refused (row locks, not a stale read)."""
    a, _ = two
    rid = "rt-race"
    gen = await a.acquire_lease(rid, "proc-a", 30)
    assert gen == 1
    with psycopg.connect(pg_url) as conn:  # a transaction: the row stays locked
        conn.execute(
            "UPDATE runtimes SET generation = generation + 1, lease_owner = 'proc-b'"
            " WHERE runtime_id = %s",
            (rid,),
        )
        fut = a.submit(mk_txn(rid, gen, mk_state(), events=[mk_event(rid, 1)]))
        await asyncio.sleep(0.2)
        assert not fut.done()  # waiting for the row lock
        conn.commit()
    with pytest.raises(FencedError, match="generation 2"):
        await fut
    assert _count(pg_url, "SELECT count(*) FROM events WHERE runtime_id = %s", rid) == 0


async def test_lease_takeover_after_expiry_bumps_the_generation(
    two: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = two
    rid = "rt-lease"
    assert await a.lease_owner(rid) == (None, None, 0)
    assert await a.acquire_lease(rid, "proc-a", 0.2) == 1
    owner, expiry, gen = await b.lease_owner(rid)
    assert (owner, gen) == ("proc-a", 1) and expiry is not None
    assert await b.acquire_lease(rid, "proc-b", 30) is None
    assert await a.renew_lease(rid, "proc-a", 1, 0.2) is True
    await asyncio.sleep(0.3)
    assert await b.acquire_lease(rid, "proc-b", 30) == 2
    assert await a.renew_lease(rid, "proc-a", 1, 30) is False
    assert await a.acquire_lease(rid, "proc-a", 30) is None
    assert (await a.lease_owner(rid))[::2] == ("proc-b", 2)
    await a.release_lease(rid, "proc-a", 1)  # not the holder: nothing happens
    assert (await a.lease_owner(rid))[0] == "proc-b"
    await b.release_lease(rid, "proc-b", 2)
    assert await a.acquire_lease(rid, "proc-a", 30) == 3  # free


async def test_a_race_for_a_free_lease_has_one_winner(pg_url: str) -> None:
    stores = [PostgresStore(pg_url) for _ in range(4)]
    for s in stores:
        await s.open()
    try:
        for rid in ("rt-new", "rt-new"):  # a missing row, then an existing free one
            results = await asyncio.gather(
                *(s.acquire_lease(rid, f"proc-{i}", 30) for i, s in enumerate(stores))
            )
            winners = [g for g in results if g is not None]
            assert len(winners) == 1, results
            owner = (await stores[0].lease_owner(rid))[0]
            assert owner is not None
            i = int(owner.split("-")[1])
            await stores[i].release_lease(rid, owner, winners[0])
    finally:
        for s in stores:
            await s.close()


async def test_another_process_pushes_into_the_inbox_the_owner_ingests(
    two: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = two
    rid = "rt-inbox"
    gen = await a.acquire_lease(rid, "proc-a", 30)
    assert gen is not None
    token = await a.change_token()
    entry = InboxEntry(rid, '{"from":"b"}')
    assert await b.inbox_push(entry, _idem("k", "h"), 10) == ("accepted", None)
    assert await a.change_token() != token  # a sees b's commit
    assert [e.seq for e in await a.inbox_entries(rid)] == [entry.seq]
    await a.submit(mk_txn(rid, gen, mk_state(), inbox_done=[entry.seq]))
    assert await b.inbox_entries(rid) == []
    assert (await b.inbox_push(InboxEntry(rid, "{}"), _idem("k", "h"), 10))[0] == "deduplicated"


async def test_a_writer_frozen_mid_transaction_releases_its_locks(pg_url: str) -> None:
    """A process frozen (or cut off) inside a transaction would hold its runtime rows locked
    until the server noticed the dead connection; ``idle_in_transaction_session_timeout``
    ends that transaction, so another process can take the session over."""
    frozen = PostgresStore(pg_url, idle_txn_timeout=0.5)
    other = PostgresStore(pg_url, lock_timeout=3.0)
    await frozen.open()
    await other.open()
    try:
        assert await frozen.acquire_lease("rt-frozen", "a", 0.2) == 1
        conn = await frozen._connect()
        await conn.execute("BEGIN")
        await conn.execute("SELECT 1 FROM runtimes WHERE runtime_id = 'rt-frozen' FOR UPDATE")
        await asyncio.sleep(0.3)  # the lease expires; the row stays locked
        # without the timeout this waits for the row lock and fails (lock_timeout, 3 s)
        assert await other.acquire_lease("rt-frozen", "b", 30) == 2
        with pytest.raises(psycopg.Error):
            await conn.execute("SELECT 1")
        await conn.close()
    finally:
        await frozen.close()
        await other.close()
