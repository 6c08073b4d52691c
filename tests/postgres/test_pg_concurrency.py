"""Concurrency on PostgreSQL: many transactions submitted at once from two store instances on
one database (two processes' view) all commit, in order, group-committed, without deadlocks;
inbox admission and idempotency keys stay exact under racing pushes; futures resolve only once
the commit is visible; the event loop keeps running; a lost writer connection is replaced."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

from meerkat_runtime.store.base import FencedError, InboxEntry, StoreError
from meerkat_runtime.store.postgres import PostgresStore
from tests.conformance.test_store_conformance import _idem, mk_event, mk_state, mk_txn


async def _open(url: str, n: int = 2, **kw: Any) -> list[PostgresStore]:
    stores = [PostgresStore(url, **kw) for _ in range(n)]
    for s in stores:
        await s.open()
    return stores


async def test_many_concurrent_submits_from_two_stores(pg_url: str) -> None:
    a, b = await _open(pg_url)
    try:
        runtimes = {f"rt-a{i}": a for i in range(8)} | {f"rt-b{i}": b for i in range(8)}
        gens = {
            rid: await s.acquire_lease(rid, f"owner-{id(s)}", 60) for rid, s in runtimes.items()
        }
        per_runtime = 40
        futs = []
        for n in range(per_runtime):  # interleaved across runtimes and stores
            for rid, s in runtimes.items():
                gen = gens[rid]
                assert gen is not None
                futs.append(s.submit(mk_txn(rid, gen, mk_state(), events=[mk_event(rid, n + 1)])))
        # meanwhile each store pushes into the other's runtimes, racing on shared keys
        pushes = [
            s.inbox_push(InboxEntry(rid, "{}"), _idem(f"key-{rid}-{k}", "h"), 10_000)
            for rid in runtimes
            for k in range(5)
            for s in (a, b)
        ]
        results = await asyncio.gather(*futs, *pushes)
        assert all(r is None for r in results[: len(futs)])
        verdicts = results[len(futs) :]
        assert sum(v[0] == "accepted" for v in verdicts) == len(runtimes) * 5  # once per key
        assert sum(v[0] == "deduplicated" for v in verdicts) == len(runtimes) * 5
        for rid, s in runtimes.items():
            assert [e.seq for e in await s.load_events(rid)] == list(range(1, per_runtime + 1))
            assert len(await s.load_input_states(rid)) == per_runtime
            assert len(await s.inbox_entries(rid)) == 5
        assert a.transactions == b.transactions == 8 * per_runtime
        assert a.commits < a.transactions and b.commits < b.transactions  # group commit
    finally:
        await a.close()
        await b.close()


async def test_admission_is_exact_under_racing_pushes(pg_url: str) -> None:
    a, b = await _open(pg_url)
    try:
        rid = "rt-admit"
        gen = await a.acquire_lease(rid, "owner", 60)
        assert gen is not None
        await a.submit(mk_txn(rid, gen, mk_state(), mk_state()))  # 2 pending inputs
        pushes = [s.inbox_push(InboxEntry(rid, "{}"), None, 10) for _ in range(10) for s in (a, b)]
        verdicts = [v for v, _ in await asyncio.gather(*pushes)]
        assert verdicts.count("accepted") == 8 and verdicts.count("queue_full") == 12
        # a runtime never written has no row to lock: the pushes serialize all the same
        fresh = [
            s.inbox_push(InboxEntry("rt-new", "{}"), None, 5) for _ in range(10) for s in (a, b)
        ]
        verdicts = [v for v, _ in await asyncio.gather(*fresh)]
        assert verdicts.count("accepted") == 5 and verdicts.count("queue_full") == 15
    finally:
        await a.close()
        await b.close()


async def test_a_fenced_transaction_fails_alone_in_its_batch(pgs: PostgresStore) -> None:
    rid = "rt-batch"
    gen = await pgs.acquire_lease(rid, "owner", 60)
    assert gen is not None
    commits = pgs.commits
    futs = [
        pgs.submit(mk_txn(rid, gen + 1 if i == 7 else gen, events=[mk_event(rid, i + 1)]))
        for i in range(20)
    ]
    results = await asyncio.gather(*futs, return_exceptions=True)
    assert isinstance(results[7], FencedError)
    assert sum(r is None for r in results) == 19
    assert pgs.commits - commits == 1  # one COMMIT for the twenty


async def test_futures_resolve_only_once_the_commit_is_visible(
    pgs: PostgresStore, pg_url: str
) -> None:
    seen: list[bool] = []
    with psycopg.connect(pg_url, autocommit=True) as other:

        def check(iid: str) -> Any:
            def cb(_: Any) -> None:
                row = other.execute("SELECT 1 FROM input_states WHERE input_id = %s", (iid,))
                seen.append(row.fetchone() is not None)

            return cb

        futs = []
        for _ in range(30):
            st = mk_state()
            fut = pgs.submit(mk_txn("rt-visible", 0, st))
            fut.add_done_callback(check(st.input_id.value))
            futs.append(fut)
        await asyncio.gather(*futs)
        await asyncio.sleep(0)
    assert seen == [True] * 30


async def test_the_event_loop_keeps_running_during_commits(pgs: PostgresStore) -> None:
    rid = "rt-loop"
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.002)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    futs = [
        pgs.submit(mk_txn(rid, 0, mk_state(), events=[mk_event(rid, i + 1)])) for i in range(600)
    ]
    in_flight = sum(not f.done() for f in futs)
    await asyncio.gather(*futs)
    stop.set()
    await task
    assert in_flight == 600, "submit returned before the work was done"
    assert len(gaps) >= 10
    assert max(gaps) < 0.25, f"the event loop stalled for {max(gaps):.3f}s"


async def test_a_lost_writer_connection_is_replaced(pgs: PostgresStore, pg_url: str) -> None:
    rid = "rt-lost"
    await pgs.submit(mk_txn(rid, 0, mk_state(), events=[mk_event(rid, 1)]))
    assert pgs._wconn is not None
    pid = pgs._wconn.info.backend_pid
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    await asyncio.sleep(0.05)
    kept = mk_state()
    await pgs.submit(mk_txn(rid, 0, kept, events=[mk_event(rid, 2)]))  # run again, elsewhere
    assert await pgs.load_input_state(rid, kept.input_id) is not None
    assert pgs._wconn is not None and pgs._wconn.info.backend_pid != pid


async def test_close_drains_and_later_work_is_refused(pg_url: str) -> None:
    (s1,) = await _open(pg_url, 1)
    futs = [s1.submit(mk_txn("rt", 0, events=[mk_event("rt", i + 1)])) for i in range(100)]
    await s1.close()
    assert all(f.done() and f.exception() is None for f in futs)
    with pytest.raises(StoreError, match="closed"):
        await s1.submit(mk_txn("rt", 0))
    with pytest.raises(StoreError, match="closed"):
        await s1.load_runtime("rt")
    with pytest.raises(StoreError, match="cannot be opened again"):
        await s1.open()
    (s2,) = await _open(pg_url, 1)
    try:
        assert len(await s2.load_events("rt")) == 100
    finally:
        await s2.close()


async def test_a_cancelled_read_is_never_swallowed(pg_url: str) -> None:
    """A read waiting for a pooled connection and cancelled as the connection is handed over
    raises CancelledError (psycopg_pool's wait uses asyncio.wait_for, which on Python < 3.12
    returns normally then; a maintenance task stopped that way would run on forever)."""
    (s,) = await _open(pg_url, 1, pool_size=1)
    try:
        for i in range(60):
            hold = asyncio.Event()

            async def holder(conn: Any, hold: asyncio.Event = hold) -> int:
                await hold.wait()
                return 1

            a = asyncio.create_task(s._read(holder))
            await asyncio.sleep(0.001)
            b = asyncio.create_task(s.change_token())  # waits for a's connection
            await asyncio.sleep(0.001)
            hold.set()
            for _ in range(i % 8):
                await asyncio.sleep(0)
            requested = b.cancel()
            await a
            if requested:
                with pytest.raises(asyncio.CancelledError):
                    await b
    finally:
        await s.close()
