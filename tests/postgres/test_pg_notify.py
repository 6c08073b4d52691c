"""Wake-ups without polling on PostgreSQL (issue 7): LISTEN/NOTIFY carries inbox arrivals to
the owning process (S10; or, with no owner, to a process that takes the session over and
recovers it, S7) and committed changes to waiters in other processes (S12). Every Runtime here
polls only every 60 s, so a test that passes within its 20 s timeouts was woken by a
notification; the listener comes back after its connection is killed; stores in other schemas
of the same database are not woken."""

from __future__ import annotations

import asyncio
import time

import psycopg

from meerkat_runtime import Runtime
from meerkat_runtime.runtime.outcomes import CompletedWait
from meerkat_runtime.store.base import InboxEntry, StoreNotice
from meerkat_runtime.store.postgres import PostgresStore
from tests.postgres import support as pg

_NO_POLL = {"poll_interval": 60.0, "slow_poll": 60.0}


def _worker(url: str) -> Runtime:
    return Runtime.open(url, lease_ttl=30.0, **_NO_POLL)  # type: ignore[arg-type]


def _client(url: str) -> Runtime:
    return Runtime.open(url, owns_sessions=False, lease_ttl=30.0, **_NO_POLL)  # type: ignore[arg-type]


async def _wait_until(pred: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def test_inbox_arrival_wakes_the_owner_and_the_outcome_wakes_the_waiter(
    pg_url: str,
) -> None:
    async with _worker(pg_url) as worker, _client(pg_url) as client:
        sid = (await worker.create_session()).id  # owned by the worker from now on
        first = await client.turn(sid, "first")
        assert isinstance(await first.wait(20), CompletedWait)
        # many in a row: each needs both wake-ups (owner ingests, waiter sees the outcome)
        for n in range(5):
            outcome = await (await client.turn(sid, f"turn {n}")).wait(20)
            assert isinstance(outcome, CompletedWait)
        assert worker.owned_sessions() == [sid] and client.owned_sessions() == []


async def test_a_session_nobody_runs_is_taken_over_on_its_inbox_notice(pg_url: str) -> None:
    async with _client(pg_url) as client:
        sid = (await client.create_session()).id  # a client takes no lease
        async with _worker(pg_url) as worker:
            assert worker.owned_sessions() == []  # nothing pending at its start
            outcome = await (await client.turn(sid, "hello")).wait(20)
            assert isinstance(outcome, CompletedWait)
            assert worker.owned_sessions() == [sid]


async def test_sessions_spread_over_workers(pg_url: str) -> None:
    async with _client(pg_url) as client, _worker(pg_url) as w1, _worker(pg_url) as w2:
        ids = [(await client.create_session()).id for _ in range(12)]
        handles = [await client.turn(sid, "hi") for sid in ids]
        for h in handles:
            assert isinstance(await h.wait(20), CompletedWait)
        owned1, owned2 = set(w1.owned_sessions()), set(w2.owned_sessions())
        assert owned1 | owned2 == set(ids) and not owned1 & owned2
        assert owned1 and owned2, "one worker took every session"


async def test_the_listener_comes_back_after_its_connection_is_killed(pg_url: str) -> None:
    async with _worker(pg_url) as worker, _client(pg_url) as client:
        sid = (await worker.create_session()).id
        assert isinstance(await (await client.turn(sid, "before")).wait(20), CompletedWait)
        admin = await psycopg.AsyncConnection.connect(pg.base_url(), autocommit=True)
        try:
            query = (
                "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN meerkat_%%'"
                " AND datname = current_database()"
            )
            cur = await admin.execute(query)
            before = {r[0] for r in await cur.fetchall()}
            assert len(before) >= 2, "expected the worker's and the client's listeners"
            for pid in before:
                await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

            async def relistening() -> bool:
                cur = await admin.execute(query)
                now = {r[0] for r in await cur.fetchall()}
                return len(now - before) >= 2

            deadline = time.monotonic() + 20
            while not await relistening():
                assert time.monotonic() < deadline, "the listeners did not reconnect"
                await asyncio.sleep(0.05)
        finally:
            await admin.close()
        for n in range(3):
            outcome = await (await client.turn(sid, f"after {n}")).wait(20)
            assert isinstance(outcome, CompletedWait)


async def test_stores_in_other_schemas_are_not_woken(pg_url: str) -> None:
    other_url, other_schema = pg.fresh_schema()
    a, b = PostgresStore(pg_url), PostgresStore(other_url)
    await a.open()
    await b.open()
    try:
        assert a.channels != b.channels
        got_a: list[StoreNotice] = []
        got_b: list[StoreNotice] = []

        async def collect(store: PostgresStore, into: list[StoreNotice]) -> None:
            async for notice in store.notifications():
                into.append(notice)

        tasks = [
            asyncio.create_task(collect(a, got_a)),
            asyncio.create_task(collect(b, got_b)),
        ]
        await _wait_until(lambda: got_a and got_b, 20, "no resync notice")
        assert got_a[0].topic == got_b[0].topic == "resync"
        await a.inbox_push(InboxEntry("rt-in-a", "{}"), None, 100)
        await b.inbox_push(InboxEntry("rt-in-b", "{}"), None, 100)
        await _wait_until(lambda: len(got_a) > 1 and len(got_b) > 1, 20, "no inbox notice")
        await asyncio.sleep(0.2)  # anything crossing over would have arrived by now
        assert [(n.topic, n.runtime_id) for n in got_a[1:]] == [("inbox", "rt-in-a")]
        assert [(n.topic, n.runtime_id) for n in got_b[1:]] == [("inbox", "rt-in-b")]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await a.close()
        await b.close()
        pg.drop_schema(other_schema)


async def test_a_drained_worker_hands_its_sessions_over_at_once(pg_url: str) -> None:
    """A lease released at shutdown is announced: another worker takes the session without
    waiting for the lease (30 s here) or a scan."""
    async with _client(pg_url) as client, _worker(pg_url) as stays:
        leaving = _worker(pg_url)
        await leaving.start()
        sid = (await leaving.create_session()).id
        assert leaving.owned_sessions() == [sid]
        # input accepted while the owner drains: it waits in the inbox for the next owner
        await leaving.close(grace=0.0)
        outcome = await (await client.turn(sid, "after the drain")).wait(20)
        assert isinstance(outcome, CompletedWait)
        assert stays.owned_sessions() == [sid]
