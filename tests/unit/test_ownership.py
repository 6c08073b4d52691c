"""Ownership at scale (S10, issue 7) on one shared in-memory store: the per-process lease bound,
sessions that cannot be renewed in time (stopped, nothing abandoned: S8), adoption of
sessions nobody runs (recovered first: S7), waiters that follow their input to the new owner
(S12), drains that release leases (S19)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from meerkat_runtime import Runtime
from meerkat_runtime.runtime.outcomes import CompletedWait
from meerkat_runtime.store.base import StoreError
from meerkat_runtime.store.memory import MemoryStore

Events = list[tuple[str, str, int, str]]


def _runtime(store: MemoryStore, events: Events | None = None, **kw: object) -> Runtime:
    def hook(event: str, sid: str, gen: int, detail: str) -> None:
        if events is not None:
            events.append((event, sid, gen, detail))

    opts: dict[str, object] = {"lease_ttl": 1.0, "poll_interval": 0.02, "on_ownership": hook}
    opts.update(kw)
    return Runtime(store, **opts)  # type: ignore[arg-type]


async def test_max_sessions_bounds_leases_and_the_rest_go_to_inboxes() -> None:
    store = MemoryStore()
    worker = _runtime(store, max_sessions=2)
    other = _runtime(store)
    async with worker, other:
        ids = [(await worker.create_session()).id for _ in range(3)]
        assert sorted(worker.owned_sessions()) == sorted(ids[:2])
        # the third session has no owner: its input waits in the inbox until one comes
        handle = await worker.turn(ids[2], "hello")
        assert ids[2] not in worker.owned_sessions()
        assert len(await store.inbox_entries(ids[2])) == 1
        assert await store.runtimes_needing_owner() == [ids[2]]
        # a process with room adopts it (its maintainer's scan) and runs the input
        outcome = await handle.wait(10)
        assert isinstance(outcome, CompletedWait)
        assert ids[2] in other.owned_sessions()
        assert await store.runtimes_needing_owner() == []


async def test_max_sessions_is_validated() -> None:
    from meerkat_runtime.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="max_sessions"):
        Runtime(MemoryStore(), max_sessions=0)


async def test_a_lease_not_renewed_in_time_stops_the_session_without_abandoning() -> None:
    store = MemoryStore()
    events: Events = []
    rt = _runtime(store, events)
    async with rt:
        sid = (await rt.create_session()).id
        assert rt.owned_sessions() == [sid]
        store.fail_on("renew_leases", StoreError("store memory://: unreachable"), times=1000)
        started = time.monotonic()
        while sid in rt.owned_sessions():
            assert time.monotonic() - started < 5, "the session was never stopped"
            await asyncio.sleep(0.02)
        lost = [e for e in events if e[0] == "lost"]
        assert lost and lost[0][1] == sid and "not renewed in time" in lost[0][3]
        # stopped a quarter of the lease before it expires: nobody else could own it yet
        owner, expiry, _ = await store.lease_owner(sid)
        assert owner == rt.owner_id and expiry is not None and expiry > time.time()


async def test_a_refused_renewal_stops_the_session_at_once() -> None:
    store = MemoryStore()
    events: Events = []
    rt = _runtime(store, events, lease_ttl=0.6)
    async with rt:
        sid = (await rt.create_session()).id
        _, _, gen = await store.lease_owner(sid)
        # another process took the session over (an expired lease, say): generation + 1
        row = store._rows[sid]
        row.generation = gen + 1
        row.lease_owner = "someone-else"
        deadline = time.monotonic() + 5
        while sid in rt.owned_sessions():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert [e[0] for e in events if e[1] == sid] == ["acquired", "lost"]
        assert "another process owns" in events[-1][3]


class _Cuttable:
    """A process's view of a shared store that can be cut off (a partition): while ``cut``,
    every call fails with ``StoreError``."""

    def __init__(self, inner: MemoryStore) -> None:
        self._inner = inner
        self.cut = False
        self.url = inner.url

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr) or name == "abandon_generation":  # local, synchronous
            return attr
        if name == "submit":

            def submit(txn: Any) -> Any:
                if self.cut:
                    fut = asyncio.get_running_loop().create_future()
                    fut.set_exception(StoreError("store memory://: unreachable"))
                    return fut
                return attr(txn)

            return submit

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.cut and name not in ("open", "close"):
                raise StoreError("store memory://: unreachable")
            return await attr(*args, **kwargs)

        return call


async def test_waiters_follow_an_input_to_the_new_owner_after_a_partition() -> None:
    shared = MemoryStore()
    view = _Cuttable(shared)
    slow = [{"type": "text", "text": "done", "delay": 1.5}]
    events: Events = []
    a = _runtime(view, events)  # type: ignore[arg-type]
    async with a:
        sid = (await a.create_session(offline_script=slow)).id
        handle = await a.turn(sid, "work")
        await asyncio.sleep(0.1)
        view.cut = True  # a can no longer reach the store: it stops the session in time
        b = _runtime(shared)
        async with b:
            deadline = time.monotonic() + 10
            while sid not in b.owned_sessions():  # b adopts it once a's lease expired
                assert time.monotonic() < deadline, "nobody took the session over"
                await asyncio.sleep(0.05)
            assert ("lost", sid) in [(e[0], e[1]) for e in events]
            view.cut = False
            # a's waiter rode out the partition and follows the input to b
            outcome = await handle.wait(15)
            assert isinstance(outcome, CompletedWait), outcome
            assert sid in b.owned_sessions() and sid not in a.owned_sessions()


async def test_drain_releases_leases_and_another_process_takes_over_at_once() -> None:
    store = MemoryStore()
    events: Events = []
    a = _runtime(store, events, lease_ttl=30.0)
    sid = ""
    async with a:
        sid = (await a.create_session()).id
    assert ("released", sid) in [(e[0], e[1]) for e in events]
    owner, _, _ = await store.lease_owner(sid)
    assert owner is None
    # with the lease released, another process owns the session now (no 30 s wait)
    b = _runtime(store, lease_ttl=30.0)
    async with b:
        outcome = await (await b.turn(sid, "hi")).wait(10)
        assert isinstance(outcome, CompletedWait)
        assert b.owned_sessions() == [sid]


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_a_backlog_taken_over_is_admitted_in_inbox_order(kind: str, tmp_path: Any) -> None:
    """S10: a new owner ingests a session's inbox backlog in seq order, also when it admits
    the entries concurrently (their commits grouped)."""
    schema = None
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'backlog.db'}"
    else:
        from tests.postgres import support as pg

        reason = pg.unavailable()
        if reason is not None:
            pytest.skip(reason)
        url, schema = pg.fresh_schema()
    try:
        async with Runtime.open(url, owns_sessions=False) as client:
            sid = (await client.create_session()).id
            handles = [await client.turn(sid, f"m{n}") for n in range(30)]
            assert len(await client.store.inbox_entries(sid)) == 30
            async with Runtime.open(url, recover_on_open=False) as owner:
                assert await owner.load(sid) is not None
                for h in handles:
                    assert isinstance(await h.wait(30), CompletedWait)
                texts = [m.content for m in (await owner.history(sid)).messages if m.role == "user"]
                assert texts == [f"m{n}" for n in range(30)]
    finally:
        if schema is not None:
            pg.drop_schema(schema)
