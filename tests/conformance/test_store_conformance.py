"""Store conformance: one suite, run against every store (``store/base.py``'s protocol).

The parametrized tests hold the memory store (the reference) and the SQLite store to the same
rules: atomic submits that read back exactly, commit order, group commit with per-transaction
failure, fencing by generation, leases, the inbox, idempotency, the recovery view, append-only
conversations, ``stopped`` never stored, events, retention and sessions. The SQLite-only tests
cover durability across reopen, pragmas, schema versions and migrations, damaged files, write
failures, threads (the event loop keeps running during commits) and ``open_store`` URLs.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from meerkat_runtime._ids import InputId, RunId
from meerkat_runtime._time import utcnow
from meerkat_runtime.core.lifecycle import (
    Message,
    RunApplyBoundary,
    RunBoundaryReceipt,
    RunResult,
    Usage,
)
from meerkat_runtime.core.session import Conversation, ConversationRow
from meerkat_runtime.runtime.events import RuntimeEventEnvelope
from meerkat_runtime.runtime.input_state import (
    CoalescingSource,
    InputLifecycleState,
    InputState,
)
from meerkat_runtime.runtime.inputs import InputDurability, PromptInput
from meerkat_runtime.runtime.policy import PolicySnapshot, default_policy_table
from meerkat_runtime.runtime.state import RuntimeState
from meerkat_runtime.store import default_state_path, open_store
from meerkat_runtime.store.base import (
    FencedError,
    IdempotencyRecord,
    InboxEntry,
    RunRecord,
    SessionRecord,
    StoreError,
    Txn,
)
from meerkat_runtime.store.memory import MemoryStore
from meerkat_runtime.store.postgres import PostgresStore
from meerkat_runtime.store.sqlite import Migration, SqliteStore, load_migrations
from tests.conformance.stores import STORE_KINDS, StoreFactory

sqlite_mod = importlib.import_module("meerkat_runtime.store.sqlite")

IS = InputLifecycleState
Store = MemoryStore | SqliteStore | PostgresStore

_PATHS: dict[IS, list[IS]] = {
    IS.ACCEPTED: [],
    IS.QUEUED: [IS.QUEUED],
    IS.STAGED: [IS.QUEUED, IS.STAGED],
    IS.APPLIED: [IS.QUEUED, IS.STAGED, IS.APPLIED],
    IS.APPLIED_PENDING_CONSUMPTION: [
        IS.QUEUED,
        IS.STAGED,
        IS.APPLIED,
        IS.APPLIED_PENDING_CONSUMPTION,
    ],
    IS.CONSUMED: [IS.QUEUED, IS.STAGED, IS.APPLIED, IS.APPLIED_PENDING_CONSUMPTION, IS.CONSUMED],
    IS.ABANDONED: [IS.QUEUED, IS.ABANDONED],
    IS.COALESCED: [IS.QUEUED, IS.COALESCED],
}


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    factory = StoreFactory(request.param, tmp_path)
    s: Store = factory()  # type: ignore[assignment]
    try:
        await s.open()
        yield s
    finally:
        await factory.close_all()


@pytest.fixture
async def sq(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "m.db")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


# ------------------------------------------------------------------------------ builders


def mk_state(
    cur: IS = IS.QUEUED,
    *,
    days_ago: float = 0,
    run: RunId | None = None,
    key: str | None = None,
    source: list[InputId] | None = None,
) -> InputState:
    """A realistic input state (payload, policy, history) walked to ``cur``."""
    when = utcnow() - timedelta(days=days_ago)
    inp = PromptInput.new("hello ünïcode", idempotency_key=key)
    st = InputState.new_accepted(inp.id, when)
    st.persisted_input = inp
    st.durability = InputDurability.DURABLE
    st.idempotency_key = inp.header.idempotency_key
    st.policy = PolicySnapshot(version=1, decision=default_policy_table().resolve("prompt", True))
    if source is not None:
        st.reconstruction_source = CoalescingSource(source_input_ids=source)
    for to in _PATHS[cur]:
        st.transition(to, f"to {to.value}", when)
    if run is not None:
        st.last_run_id = run
        st.last_boundary_sequence = 0
    return st


def mk_event(rid: str, seq: int, code: str = "queued") -> RuntimeEventEnvelope:
    return RuntimeEventEnvelope.make(
        seq, utcnow(), rid, "input_lifecycle", {"code": code, "input_id": str(InputId.new())}
    )


def mk_rows(
    conv: Conversation, n: int, run: RunId | None = None, ids: list[InputId] | None = None
) -> list[ConversationRow]:
    msgs = [
        Message(role="user", content=f"message {len(conv) + i}", input_ids=ids or [])
        for i in range(n)
    ]
    rows = conv.make_rows(msgs, run)
    conv.extend(rows)
    return rows


def mk_receipt(run: RunId, ids: list[InputId], seq: int = 0) -> RunBoundaryReceipt:
    return RunBoundaryReceipt(
        run_id=run,
        boundary=RunApplyBoundary.RUN_START,
        contributing_input_ids=ids,
        conversation_digest="ab" * 32,
        message_count=2,
        sequence=seq,
    )


def mk_txn(rid: str, gen: int, *states: InputState, **kw: Any) -> Txn:
    t = Txn(rid, gen, durable=True, **kw)
    for s in states:
        t.touch(s)
    return t


async def lease(store: Store, rid: str, owner: str = "owner-a", ttl: float = 30.0) -> int:
    gen = await store.acquire_lease(rid, owner, ttl)
    assert gen is not None
    return gen


def row_tuple(r: ConversationRow) -> tuple[Any, ...]:
    return (r.index, r.run_id, r.input_ids, r.message.to_json(), r.digest)


def session(sid: str, created_ago: float, **kw: Any) -> SessionRecord:
    at = utcnow() - timedelta(seconds=created_ago)
    return SessionRecord(sid, at, at, **kw)


# ------------------------------------------------------------------------------ submit


async def test_submit_is_atomic_and_reads_back_exactly(store: Store) -> None:
    rid = "rt-atomic"
    gen = await lease(store, rid)
    r_live, r_done = RunId.new(), RunId.new()
    queued = mk_state(IS.QUEUED, key="k-1")
    staged = mk_state(IS.STAGED, run=r_live)
    consumed = mk_state(IS.CONSUMED, run=r_done)
    conv = Conversation()
    rows = mk_rows(conv, 3, r_live, [staged.input_id])
    result = RunResult(text="done", usage=Usage(input_tokens=3, output_tokens=4), turns=1)
    events = [mk_event(rid, i) for i in (1, 2, 3)]
    idem = IdempotencyRecord("k-1", queued.input_id, "hash-1", utcnow())
    txn = mk_txn(
        rid,
        gen,
        queued,
        staged,
        consumed,
        queue_orders={queued.input_id: 7},
        idempotency=[idem],
        rows=rows,
        receipts=[mk_receipt(r_live, [staged.input_id])],
        runs=[
            RunRecord(r_live, rid),
            RunRecord(r_done, rid, "completed", result, None, True),
        ],
        runtime_state=RuntimeState.RUNNING,
        events=events,
    )
    assert not txn.empty
    await store.submit(txn)

    for st in (queued, staged, consumed):
        got = await store.load_input_state(rid, st.input_id)
        assert got is not None and got.to_json() == st.to_json()
        assert got == st
    all_states = await store.load_input_states(rid)
    assert [s.input_id for s in all_states] == sorted(
        [queued.input_id, staged.input_id, consumed.input_id]
    )
    pending = await store.load_input_states(rid, include_terminal=False)
    assert {s.input_id for s in pending} == {queued.input_id, staged.input_id}
    assert len(await store.load_input_states(rid, limit=1)) == 1
    done = await store.load_run(r_done)
    assert done is not None and done.status == "completed" and done.is_continuation
    assert done.result == result and done.runtime_id == rid
    assert await store.load_run(RunId.new()) is None
    assert [row_tuple(r) for r in await store.load_conversation(rid)] == [
        row_tuple(r) for r in rows
    ]
    stored_events = await store.load_events(rid)
    assert [e.to_json() for e in stored_events] == [e.to_json() for e in events]
    assert await store.first_event_seq(rid) == 1

    loaded = await store.load_runtime(rid)
    assert loaded.state is RuntimeState.RUNNING
    assert loaded.generation == gen
    assert [s.input_id for s in loaded.inputs] == [staged.input_id, queued.input_id]
    assert loaded.queue_orders == {queued.input_id: 7}
    assert loaded.receipted == {(r_live, staged.input_id)}
    assert set(loaded.runs) == {r_live}  # named by a pending input (and still running)
    assert loaded.idempotency == [idem]
    assert [row_tuple(r) for r in loaded.conversation] == [row_tuple(r) for r in rows]
    assert loaded.last_seq == 3
    assert loaded.recovery_count == 0


async def test_submit_keeps_a_copy_of_what_it_was_given(store: Store) -> None:
    rid = "rt-copy"
    st = mk_state(IS.QUEUED)
    before = st.to_json()
    run = RunRecord(RunId.new(), rid)
    fut = store.submit(mk_txn(rid, 0, st, runs=[run]))
    st.transition(IS.STAGED)  # the runtime keeps changing its live objects
    run.status = "completed"
    await fut
    got = await store.load_input_state(rid, st.input_id)
    assert got is not None and got.to_json() == before
    loaded_run = await store.load_run(run.run_id)
    assert loaded_run is not None and loaded_run.status == "running"
    got.transition(IS.STAGED)  # and what it hands out is a copy too
    again = await store.load_input_state(rid, st.input_id)
    assert again is not None and again.to_json() == before


async def test_a_refused_transaction_writes_nothing(store: Store) -> None:
    rid = "rt-refused"
    run = RunId.new()
    first = mk_state(IS.STAGED, run=run)
    conv = Conversation()
    await store.submit(
        mk_txn(
            rid,
            0,
            first,
            rows=mk_rows(conv, 1),
            receipts=[mk_receipt(run, [first.input_id])],
            events=[mk_event(rid, 1)],
        )
    )
    other = mk_state(IS.QUEUED)
    bad = mk_txn(
        rid,
        0,
        other,
        rows=mk_rows(conv, 2),
        receipts=[mk_receipt(run, [first.input_id])],  # same (run, sequence): refused
        runtime_state=RuntimeState.RUNNING,
        events=[mk_event(rid, 2)],
        recovered=True,
    )
    with pytest.raises(StoreError, match="receipt"):
        await store.submit(bad)
    assert await store.load_input_state(rid, other.input_id) is None
    assert len(await store.load_conversation(rid)) == 1
    assert [e.seq for e in await store.load_events(rid)] == [1]
    loaded = await store.load_runtime(rid)
    assert loaded.state is None and loaded.recovery_count == 0 and loaded.last_seq == 1
    # the store goes on working for this runtime under a new generation
    gen = await lease(store, rid)
    await store.submit(mk_txn(rid, gen, other, events=[mk_event(rid, 2)]))
    assert await store.load_input_state(rid, other.input_id) is not None


async def test_a_failed_transaction_poisons_later_ones_of_its_generation(store: Store) -> None:
    """Later transactions were built on the failed one: none of them may become durable
    without it (base.py: order). Other runtimes and a new generation are unaffected."""
    rid = "rt-poison"
    gen = await lease(store, rid)
    conv = Conversation()
    first, bad, later = mk_state(), mk_state(), mk_state()
    await store.submit(mk_txn(rid, gen, first, rows=mk_rows(conv, 1), events=[mk_event(rid, 1)]))
    dup = Conversation().make_rows([Message(role="user", content="dup")], None)
    futs = [  # submitted together: they may share one batch
        store.submit(mk_txn(rid, gen, bad, rows=dup, events=[mk_event(rid, 2)])),
        store.submit(mk_txn(rid, gen, later, events=[mk_event(rid, 3)])),
        store.submit(mk_txn("rt-bystander", 0, mk_state())),
    ]
    results = await asyncio.gather(*futs, return_exceptions=True)
    assert isinstance(results[0], StoreError) and not isinstance(results[0], FencedError)
    assert isinstance(results[1], FencedError) and "earlier write" in str(results[1])
    assert results[2] is None
    with pytest.raises(FencedError, match="earlier write"):
        await store.submit(mk_txn(rid, gen, later))
    for st in (bad, later):
        assert await store.load_input_state(rid, st.input_id) is None
    assert [e.seq for e in await store.load_events(rid)] == [1]
    gen2 = await lease(store, rid)  # recovery under a new generation
    await store.submit(mk_txn(rid, gen2, later, events=[mk_event(rid, 2)]))
    assert await store.load_input_state(rid, later.input_id) is not None


async def test_next_generation_moves_the_fence(store: Store) -> None:
    """Respawn (S9): a transaction of the current generation installs the next one."""
    rid = "rt-respawn"
    g1 = await lease(store, rid)
    with pytest.raises(FencedError):  # a stale writer cannot move the fence
        await store.submit(mk_txn(rid, g1 + 5, next_generation=g1 + 6))
    assert (await store.load_runtime(rid)).generation == g1
    await store.submit(mk_txn(rid, g1, mk_state(), next_generation=g1 + 1))
    assert (await store.load_runtime(rid)).generation == g1 + 1
    assert (await store.lease_owner(rid))[2] == g1 + 1
    with pytest.raises(FencedError):
        await store.submit(mk_txn(rid, g1, mk_state()))
    await store.submit(mk_txn(rid, g1 + 1, mk_state()))
    assert len(await store.load_input_states(rid)) == 2


async def test_commit_order_is_submission_order_and_group_commit(store: Store) -> None:
    rid = "rt-order"
    gen = await lease(store, rid)
    st = mk_state(IS.QUEUED)
    futs = []
    for i in range(200):
        st.attempt_count = i
        extra = mk_state(IS.QUEUED)
        futs.append(store.submit(mk_txn(rid, gen, st, extra, events=[mk_event(rid, i + 1)])))
    await asyncio.gather(*futs)
    got = await store.load_input_state(rid, st.input_id)
    assert got is not None and got.attempt_count == 199  # the last one won
    assert [e.seq for e in await store.load_events(rid, limit=1000)] == list(range(1, 201))
    assert len(await store.load_input_states(rid)) == 201
    if isinstance(store, SqliteStore | PostgresStore):
        assert store.transactions == 200
        assert store.commits < 200, "transactions waiting in the queue share one COMMIT"
    else:
        assert store.commits == 200


async def test_a_failing_transaction_in_a_batch_fails_only_itself(store: Store) -> None:
    rid = "rt-batch"
    gen = await lease(store, rid)
    states = [mk_state(IS.QUEUED) for _ in range(50)]
    futs = [
        store.submit(mk_txn(rid, gen + 7 if i == 25 else gen, s, events=[mk_event(rid, i + 1)]))
        for i, s in enumerate(states)
    ]
    results = await asyncio.gather(*futs, return_exceptions=True)
    assert isinstance(results[25], FencedError)
    assert [r for i, r in enumerate(results) if i != 25] == [None] * 49
    seqs = [e.seq for e in await store.load_events(rid)]
    assert seqs == [i + 1 for i in range(50) if i != 25]
    assert await store.load_input_state(rid, states[25].input_id) is None
    assert len(await store.load_input_states(rid)) == 49


# ------------------------------------------------------------------------------ ownership


async def test_fencing_by_generation(store: Store) -> None:
    rid = "rt-fence"
    # a runtime never leased is not fenced (generation 0)
    await store.submit(mk_txn(rid, 5, mk_state(), events=[mk_event(rid, 1)]))
    assert (await store.load_runtime(rid)).generation == 0
    g1 = await lease(store, rid)
    assert g1 == 1
    await store.submit(mk_txn(rid, g1, mk_state(), events=[mk_event(rid, 2)]))
    assert await store.acquire_lease(rid, "owner-b", 30) is None  # owner-a's lease is live
    await store.release_lease(rid, "owner-a", g1)
    g2 = await lease(store, rid, "owner-b")
    assert g2 == 2
    stale = mk_state()
    with pytest.raises(FencedError, match=r"generation 2.*generation 1"):
        await store.submit(
            mk_txn(
                rid,
                g1,
                stale,
                events=[mk_event(rid, 3)],
                runtime_state=RuntimeState.RETIRED,
                recovered=True,
            )
        )
    assert await store.load_input_state(rid, stale.input_id) is None
    loaded = await store.load_runtime(rid)
    assert loaded.last_seq == 2 and loaded.state is None  # the refused RETIRED not stored
    assert loaded.recovery_count == 0 and loaded.generation == 2
    await store.submit(mk_txn(rid, g2, stale, events=[mk_event(rid, 3)]))
    assert await store.load_input_state(rid, stale.input_id) is not None


async def test_leases(store: Store) -> None:
    rid = "rt-lease"
    assert await store.lease_owner(rid) == (None, None, 0)
    t0 = time.time()
    g1 = await store.acquire_lease(rid, "a", 30)
    assert g1 == 1
    owner, expiry, gen = await store.lease_owner(rid)
    assert owner == "a" and gen == 1 and expiry is not None and t0 + 29 < expiry < t0 + 31
    assert (await store.load_runtime(rid)).state is RuntimeState.IDLE  # row created idle
    assert await store.acquire_lease(rid, "b", 30) is None  # live lease of another owner
    assert (await store.lease_owner(rid))[2] == 1
    assert await store.renew_lease(rid, "a", 1, 30) is True
    g2 = await store.acquire_lease(rid, "a", 0.05)  # the owner itself: bumps
    assert g2 == 2
    await asyncio.sleep(0.1)
    g3 = await store.acquire_lease(rid, "b", 30)  # expired: taken over
    assert g3 == 3
    assert await store.renew_lease(rid, "a", 2, 30) is False  # lost
    await store.release_lease(rid, "a", 2)  # not the holder: nothing happens
    assert (await store.lease_owner(rid))[0] == "b"
    await store.release_lease(rid, "b", 3)
    assert (await store.lease_owner(rid))[:1] == (None,)
    assert await store.acquire_lease(rid, "a", 30) == 4  # free
    assert await store.renew_lease("rt-missing", "a", 1, 30) is False


async def test_renew_leases_renews_only_what_the_owner_holds_under_its_generation(
    store: Store,
) -> None:
    a1, a2, b1 = "rt-rl-a1", "rt-rl-a2", "rt-rl-b1"
    ga1 = await store.acquire_lease(a1, "a", 0.5)
    ga2 = await store.acquire_lease(a2, "a", 0.5)
    gb1 = await store.acquire_lease(b1, "b", 0.5)
    assert ga1 and ga2 and gb1
    t0 = time.time()
    renewed = await store.renew_leases("a", {a1: ga1, a2: ga2 + 1, b1: gb1, "rt-rl-missing": 1}, 30)
    assert renewed == {a1}  # a2: stale generation; b1: another owner's; missing: none
    assert (await store.lease_owner(a1))[1] > t0 + 29  # type: ignore[operator]
    assert (await store.lease_owner(a2))[1] < t0 + 1  # type: ignore[operator]
    assert (await store.lease_owner(b1))[1] < t0 + 1  # type: ignore[operator]
    assert await store.renew_leases("a", {}, 30) == set()


async def test_abandon_generation_refuses_later_transactions_only(store: Store) -> None:
    rid = "rt-abandon"
    gen = await store.acquire_lease(rid, "a", 30)
    assert gen is not None
    before = store.submit(mk_txn(rid, gen, mk_state()))  # submitted before: commits
    store.abandon_generation(rid, gen)
    after = store.submit(mk_txn(rid, gen, mk_state()))
    await before
    with pytest.raises(FencedError):
        await after
    assert len(await store.load_input_states(rid)) == 1
    # a new generation (the next owner, or this process recovering) writes again
    gen2 = await store.acquire_lease(rid, "a", 30)
    assert gen2 is not None
    await store.submit(mk_txn(rid, gen2, mk_state()))
    assert len(await store.load_input_states(rid)) == 2


# ------------------------------------------------------------------------------ inbox


def _idem(key: str, chash: str, iid: InputId | None = None) -> IdempotencyRecord:
    return IdempotencyRecord(key, iid or InputId.new(), chash, utcnow())


async def test_inbox_push_dedup_conflict_queue_full_and_ingest(store: Store) -> None:
    rid = "rt-inbox"
    gen = await lease(store, rid)
    first = _idem("k1", "h1")
    e1 = InboxEntry(rid, '{"input_type":"prompt","text":"one"}', None)
    assert await store.inbox_push(e1, first, 10) == ("accepted", None)
    assert e1.seq > 0 and e1.created_at is not None
    dup = InboxEntry(rid, '{"input_type":"prompt","text":"one again"}')
    assert await store.inbox_push(dup, _idem("k1", "h1"), 10) == ("deduplicated", first.input_id)
    assert await store.inbox_push(dup, _idem("k1", "h2"), 10) == ("conflict", first.input_id)
    e2 = InboxEntry(rid, '{"input_type":"prompt","text":"two"}', '{"source_type":"x"}')
    assert await store.inbox_push(e2, None, 10) == ("accepted", None)
    assert e2.seq > e1.seq
    entries = await store.inbox_entries(rid)
    assert [(e.seq, e.input_json, e.reconstruction_json) for e in entries] == [
        (e1.seq, e1.input_json, None),
        (e2.seq, e2.input_json, '{"source_type":"x"}'),
    ]
    assert await store.runtimes_with_pending_inputs() == [rid]
    # admission counts inbox entries plus non-terminal inputs
    assert await store.inbox_push(InboxEntry(rid, "{}"), None, 2) == ("queue_full", None)
    await store.submit(mk_txn(rid, gen, mk_state(IS.QUEUED), mk_state(IS.CONSUMED)))
    assert await store.inbox_push(InboxEntry(rid, "{}"), None, 3) == ("queue_full", None)
    assert await store.inbox_push(InboxEntry(rid, "{}"), _idem("k9", "h"), 3) == (
        "queue_full",
        None,
    )
    # a refused push claimed nothing
    assert await store.inbox_push(InboxEntry(rid, "{}"), _idem("k9", "h"), 4) == (
        "accepted",
        None,
    )
    # the owner ingests e1: its state and the entry's removal in one transaction
    ingested = mk_state(IS.QUEUED)
    await store.submit(mk_txn(rid, gen, ingested, inbox_done=[e1.seq]))
    assert [e.seq for e in await store.inbox_entries(rid)][:1] == [e2.seq]
    assert e1.seq not in [e.seq for e in await store.inbox_entries(rid)]
    assert len(await store.inbox_entries(rid, limit=1)) == 1
    # keys claimed by the owner's own transactions dedup inbox pushes too
    own = _idem("k-own", "ho", ingested.input_id)
    await store.submit(mk_txn(rid, gen, idempotency=[own]))
    assert await store.inbox_push(InboxEntry(rid, "{}"), _idem("k-own", "ho"), 100) == (
        "deduplicated",
        ingested.input_id,
    )


async def test_idempotency_is_unique_per_runtime_and_key(store: Store) -> None:
    x, y, z = InputId.new(), InputId.new(), InputId.new()
    await store.submit(mk_txn("rt-1", 0, idempotency=[_idem("k", "h", x)]))
    await store.submit(mk_txn("rt-2", 0, idempotency=[_idem("k", "h", y)]))  # other runtime
    one = (await store.load_runtime("rt-1")).idempotency
    two = (await store.load_runtime("rt-2")).idempotency
    assert [(r.key, r.input_id) for r in one] == [("k", x)]
    assert [(r.key, r.input_id) for r in two] == [("k", y)]
    # the owner re-claims a key whose window it released: still one record per key
    await store.submit(mk_txn("rt-1", 0, idempotency=[_idem("k", "h2", z)]))
    one = (await store.load_runtime("rt-1")).idempotency
    assert [(r.key, r.input_id, r.content_hash) for r in one] == [("k", z, "h2")]
    assert await store.inbox_push(InboxEntry("rt-1", "{}"), _idem("k", "h2"), 10) == (
        "deduplicated",
        z,
    )
    # an inbox push never replaces a claim
    assert await store.inbox_push(InboxEntry("rt-2", "{}"), _idem("k", "other"), 10) == (
        "conflict",
        y,
    )
    assert [r.input_id for r in (await store.load_runtime("rt-2")).idempotency] == [y]


# ------------------------------------------------------------------------------ recovery view


async def test_runtimes_with_pending_inputs(store: Store) -> None:
    await store.submit(mk_txn("rt-a", 0, mk_state(IS.CONSUMED), mk_state(IS.ABANDONED)))
    await store.submit(mk_txn("rt-b", 0, mk_state(IS.CONSUMED), mk_state(IS.STAGED)))
    await store.inbox_push(InboxEntry("rt-c", "{}"), None, 10)
    await store.submit(mk_txn("rt-d", 0, runtime_state=RuntimeState.IDLE))
    await store.submit(mk_txn("rt-e", 0, mk_state(IS.APPLIED_PENDING_CONSUMPTION)))
    assert await store.runtimes_with_pending_inputs() == ["rt-b", "rt-c", "rt-e"]


async def test_load_runtime_gives_what_recovery_needs(store: Store) -> None:
    rid = "rt-recover"
    gen = await lease(store, rid)
    run_a, run_b, run_old = RunId.new(), RunId.new(), RunId.new()
    staged = mk_state(IS.STAGED, run=run_a)
    applied = mk_state(IS.APPLIED_PENDING_CONSUMPTION, run=run_b)
    q_late, q_front, q_mid = mk_state(), mk_state(), mk_state()
    src1, src2 = mk_state(IS.COALESCED), mk_state(IS.COALESCED)
    aggregate = mk_state(IS.QUEUED, source=[src1.input_id, src2.input_id])
    old = mk_state(IS.CONSUMED, run=run_old)
    conv = Conversation()
    rows = mk_rows(conv, 2, run_b, [applied.input_id])
    await store.submit(
        mk_txn(
            rid,
            gen,
            staged,
            applied,
            q_late,
            q_front,
            q_mid,
            src1,
            src2,
            aggregate,
            old,
            queue_orders={
                q_late.input_id: 5,
                q_front.input_id: -1,
                q_mid.input_id: 2,
                aggregate.input_id: 3,
                InputId.new(): 9,  # unknown input: ignored
            },
            rows=rows,
            receipts=[
                mk_receipt(run_b, [applied.input_id]),
                mk_receipt(run_old, [old.input_id]),
            ],
            runs=[
                RunRecord(run_b, rid, "failed", None, "boom"),
                RunRecord(run_old, rid, "completed"),
                RunRecord(RunId.new(), rid, "completed"),
            ],
            events=[mk_event(rid, 1), mk_event(rid, 2)],
        )
    )
    # a later transaction takes q_mid out of the queue order (staged for a run)
    q_mid.transition(IS.STAGED)
    q_mid.last_run_id = run_a
    await store.submit(
        mk_txn(
            rid,
            gen,
            q_mid,
            queue_orders={q_mid.input_id: None},
            receipts=[mk_receipt(run_a, [staged.input_id, q_mid.input_id])],
            runs=[RunRecord(run_a, rid)],
            recovered=True,
        )
    )
    await store.submit(mk_txn(rid, gen, recovered=True, events=[mk_event(rid, 7)]))

    loaded = await store.load_runtime(rid)
    unordered = sorted([staged.input_id, applied.input_id, q_mid.input_id])
    assert [s.input_id for s in loaded.inputs] == [
        *unordered,
        q_front.input_id,
        aggregate.input_id,
        q_late.input_id,
    ]
    assert loaded.queue_orders == {q_front.input_id: -1, aggregate.input_id: 3, q_late.input_id: 5}
    assert loaded.receipted == {
        (run_a, staged.input_id),
        (run_a, q_mid.input_id),
        (run_b, applied.input_id),
    }
    assert set(loaded.runs) == {run_a, run_b}
    assert loaded.runs[run_b].error == "boom" and loaded.runs[run_a].status == "running"
    assert set(loaded.sources) == {src1.input_id, src2.input_id}
    assert loaded.sources[src1.input_id].to_json() == src1.to_json()
    assert loaded.recovery_count == 2
    assert loaded.last_seq == 7
    assert [r.digest for r in loaded.conversation] == [r.digest for r in rows]
    assert loaded.conversation[-1].digest == conv.digest
    empty = await store.load_runtime("rt-never-seen")
    assert empty.state is None and empty.generation == 0 and not empty.inputs
    assert empty.last_seq == 0 and empty.recovery_count == 0


async def test_conversation_reset_and_append_only(store: Store) -> None:
    rid = "rt-conv"
    conv = Conversation()
    await store.submit(mk_txn(rid, 0, rows=mk_rows(conv, 3)))
    assert [r.index for r in await store.load_conversation(rid)] == [0, 1, 2]
    fresh = Conversation()
    new_rows = mk_rows(fresh, 2)
    await store.submit(mk_txn(rid, 0, rows=new_rows, conversation_reset=True))
    got = await store.load_conversation(rid)
    assert [row_tuple(r) for r in got] == [row_tuple(r) for r in new_rows]
    more = mk_rows(fresh, 1)
    await store.submit(mk_txn(rid, 0, rows=more))
    assert [r.message.content for r in await store.load_conversation(rid)] == [
        "message 0",
        "message 1",
        "message 2",
    ]
    dup_rows = Conversation().make_rows([Message(role="user", content="again")], None)
    intruder = mk_state()
    with pytest.raises(StoreError, match="append-only"):
        await store.submit(mk_txn(rid, 0, intruder, rows=dup_rows))  # index 0 again
    assert await store.load_input_state(rid, intruder.input_id) is None
    assert [row_tuple(r) for r in await store.load_conversation(rid)] == [
        row_tuple(r) for r in [*new_rows, *more]
    ]
    gen = await lease(store, rid)
    await store.submit(mk_txn(rid, gen, conversation_reset=True))
    assert await store.load_conversation(rid) == []


async def test_stopped_is_never_stored(store: Store) -> None:
    await store.submit(mk_txn("rt-s", 0, runtime_state=RuntimeState.RUNNING))
    await store.submit(mk_txn("rt-s", 0, runtime_state=RuntimeState.STOPPED))
    assert (await store.load_runtime("rt-s")).state is RuntimeState.RUNNING
    await store.submit(mk_txn("rt-t", 0, runtime_state=RuntimeState.STOPPED))
    assert (await store.load_runtime("rt-t")).state is None
    await store.submit(mk_txn("rt-s", 0, runtime_state=RuntimeState.RETIRED))
    assert (await store.load_runtime("rt-s")).state is RuntimeState.RETIRED


async def test_events_after_seq_first_seq_and_growth(store: Store) -> None:
    rid = "rt-ev"
    assert await store.first_event_seq(rid) is None
    assert await store.last_event_seq(rid) == 0
    assert await store.load_events(rid) == []
    await store.submit(mk_txn(rid, 0, events=[mk_event(rid, i) for i in range(1, 11)]))
    assert await store.last_event_seq(rid) == 10
    assert [e.seq for e in await store.load_events(rid, after_seq=3, limit=4)] == [4, 5, 6, 7]
    assert [e.seq for e in await store.load_events(rid, after_seq=10)] == []
    assert await store.first_event_seq(rid) == 1
    with pytest.raises(StoreError, match="seq"):
        await store.submit(mk_txn(rid, 0, events=[mk_event(rid, 10)]))
    assert await store.load_events("rt-other") == []
    counts = await store.prune(older_than=utcnow() - timedelta(days=1), keep_events=3)
    assert counts["events"] == 7
    assert await store.first_event_seq(rid) == 8
    assert [e.seq for e in await store.load_events(rid)] == [8, 9, 10]
    assert (await store.load_runtime(rid)).last_seq == 10  # kept across pruning
    assert await store.last_event_seq(rid) == 10


async def test_s18_prune_deletes_only_terminal_old_data_in_batches(store: Store) -> None:
    rid = "rt-prune"
    gen = await lease(store, rid)
    run_staged, run_done, run_orphan, run_live = (RunId.new() for _ in range(4))
    old_terminal = [mk_state(IS.CONSUMED, days_ago=30, key=f"old-{i}") for i in range(5)]
    new_terminal = mk_state(IS.ABANDONED)
    old_pending = mk_state(IS.QUEUED, days_ago=30, key="pending-key")
    staged = mk_state(IS.STAGED, days_ago=30, run=run_staged)
    src1, src2 = mk_state(IS.COALESCED, days_ago=30), mk_state(IS.COALESCED, days_ago=30)
    aggregate = mk_state(IS.QUEUED, days_ago=30, source=[src1.input_id, src2.input_id])
    done_named = mk_state(IS.CONSUMED, run=run_done)  # new: kept at the first prune
    old_idem = [
        IdempotencyRecord(s.idempotency_key.value, s.input_id, "h", utcnow() - timedelta(days=30))
        for s in old_terminal
        if s.idempotency_key is not None
    ]
    pending_idem = IdempotencyRecord(
        "pending-key", old_pending.input_id, "h", utcnow() - timedelta(days=30)
    )
    await store.submit(
        mk_txn(
            rid,
            gen,
            *old_terminal,
            new_terminal,
            old_pending,
            staged,
            src1,
            src2,
            aggregate,
            done_named,
            idempotency=[*old_idem, pending_idem],
            receipts=[mk_receipt(run_staged, [staged.input_id]), mk_receipt(run_done, [])],
            runs=[
                RunRecord(run_staged, rid, "failed"),
                RunRecord(run_done, rid, "completed"),
                RunRecord(run_orphan, rid, "completed"),
                RunRecord(run_live, rid),
            ],
            events=[mk_event(rid, i) for i in range(1, 8)],
        )
    )
    inboxed = _idem("inbox-key", "h")
    inboxed = IdempotencyRecord(inboxed.key, inboxed.input_id, "h", utcnow() - timedelta(days=30))
    assert (await store.inbox_push(InboxEntry(rid, "{}"), inboxed, 100))[0] == "accepted"

    # a window of one day: only the old terminal inputs (and their keys) go
    counts = await store.prune(older_than=utcnow() - timedelta(days=1), keep_events=100, batch=2)
    assert counts == {
        "input_states": 5,
        "receipts": 0,
        "runs": 0,
        "idempotency": 5,
        "events": 0,
    }
    for s in old_terminal:
        assert await store.load_input_state(rid, s.input_id) is None
    for s in (new_terminal, old_pending, staged, src1, src2, aggregate, done_named):
        assert await store.load_input_state(rid, s.input_id) is not None

    # everything older than an hour from now: all terminal data except what is still needed
    counts = await store.prune(older_than=utcnow() + timedelta(hours=1), keep_events=2, batch=2)
    assert counts["input_states"] == 2  # new_terminal and done_named
    assert counts["receipts"] == 1  # run_done's; run_staged's is kept for recovery
    assert counts["runs"] == 2  # run_done (no longer named) and run_orphan
    assert counts["events"] == 5
    assert counts["idempotency"] == 0  # pending and inboxed keys stay
    for s in (old_pending, staged, aggregate, src1, src2):  # sources of a pending aggregate
        assert await store.load_input_state(rid, s.input_id) is not None
    loaded = await store.load_runtime(rid)
    assert {s.input_id for s in loaded.inputs} == {
        old_pending.input_id,
        staged.input_id,
        aggregate.input_id,
    }
    assert loaded.receipted == {(run_staged, staged.input_id)}
    assert await store.load_run(run_live) is not None  # running: never pruned
    assert await store.load_run(run_staged) is not None  # named by a pending input
    assert await store.load_run(run_orphan) is None
    assert {r.key for r in loaded.idempotency} == {"pending-key", "inbox-key"}
    assert [e.seq for e in await store.load_events(rid)] == [6, 7]
    assert await store.runtimes_with_pending_inputs() == [rid]


# ------------------------------------------------------------------------------ sessions


async def test_sessions_save_load_list_and_archive(store: Store) -> None:
    a = session(
        "s-a", 30, config={"model": "offline", "script": [{"text": "x"}]}, labels={"t": "1"}
    )
    b = session("s-b", 20, archived=True)
    c = session("s-c", 10)
    for rec in (c, a, b):
        await store.save_session(rec)
    got = await store.load_session("s-a")
    assert got == a
    assert await store.load_session("s-missing") is None
    assert [r.session_id for r in await store.list_sessions()] == ["s-a", "s-c"]
    assert [r.session_id for r in await store.list_sessions(include_archived=True)] == [
        "s-a",
        "s-b",
        "s-c",
    ]
    a.archived = True
    a.labels["t"] = "2"
    assert (await store.load_session("s-a")) != a  # the store kept its own copy
    await store.save_session(a)
    assert [r.session_id for r in await store.list_sessions()] == ["s-c"]
    again = await store.load_session("s-a")
    assert again is not None and again.archived and again.labels == {"t": "2"}


async def test_change_token_moves_on_every_commit(store: Store) -> None:
    t0 = await store.change_token()
    assert await store.change_token() == t0
    await store.submit(mk_txn("rt-tok", 0, mk_state()))
    t1 = await store.change_token()
    assert t1 != t0
    await store.inbox_push(InboxEntry("rt-tok", "{}"), None, 10)
    assert await store.change_token() != t1


# ------------------------------------------------------------------------------ memory only


async def test_memory_fault_injection() -> None:
    store = MemoryStore()
    store.fail_next = StoreError("store memory://: injected")
    with pytest.raises(StoreError, match="injected"):
        await store.submit(mk_txn("rt", 0, mk_state()))
    await store.submit(mk_txn("rt-2", 0, mk_state()))
    store.fail_on("load_runtime", StoreError("store memory://: cannot read"))
    with pytest.raises(StoreError, match="cannot read"):
        await store.load_runtime("rt")
    await store.load_runtime("rt")  # once only
    store.fail_on("submit", OSError("disk"), times=2)
    for rid in ("rt-3", "rt-4"):
        with pytest.raises(OSError):
            await store.submit(mk_txn(rid, 0))
    await store.submit(mk_txn("rt-5", 0))
    with pytest.raises(ValueError):
        store.fail_on("no_such_method", StoreError("x"))


# ------------------------------------------------------------------------------ SQLite only


async def test_sqlite_data_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state" / "nested" / "m.db"  # directories are created
    s1 = SqliteStore(path)
    await s1.open()
    rid = "rt-durable"
    gen = await lease(s1, rid)
    conv = Conversation()
    st = mk_state(IS.QUEUED, key="k")
    rows = mk_rows(conv, 2, None, [st.input_id])
    await s1.submit(
        mk_txn(
            rid,
            gen,
            st,
            queue_orders={st.input_id: 1},
            idempotency=[_idem("k", "h", st.input_id)],
            rows=rows,
            runtime_state=RuntimeState.IDLE,
            events=[mk_event(rid, 1)],
            recovered=True,
        )
    )
    await s1.save_session(session("s-1", 5, config={"model": "offline"}))
    await s1.inbox_push(InboxEntry(rid, '{"x":1}'), None, 10)
    before = await s1.load_runtime(rid)
    await s1.close()
    await s1.close()  # idempotent

    s2 = SqliteStore(path)
    await s2.open()
    try:
        after = await s2.load_runtime(rid)
        assert [s.to_json() for s in after.inputs] == [s.to_json() for s in before.inputs]
        assert after.queue_orders == before.queue_orders
        assert after.idempotency == before.idempotency
        assert [row_tuple(r) for r in after.conversation] == [row_tuple(r) for r in rows]
        assert (after.state, after.generation, after.last_seq, after.recovery_count) == (
            RuntimeState.IDLE,
            gen,
            1,
            1,
        )
        assert (await s2.lease_owner(rid))[0] == "owner-a"
        assert [e.input_json for e in await s2.inbox_entries(rid)] == ['{"x":1}']
        assert [r.session_id for r in await s2.list_sessions()] == ["s-1"]
        assert await s2.runtimes_with_pending_inputs() == [rid]
    finally:
        await s2.close()


async def test_sqlite_close_drains_pending_transactions(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    s1 = SqliteStore(path)
    await s1.open()
    futs = [s1.submit(mk_txn("rt", 0, events=[mk_event("rt", i + 1)])) for i in range(100)]
    await s1.close()
    assert all(f.done() and f.exception() is None for f in futs)
    late = s1.submit(mk_txn("rt", 0))
    with pytest.raises(StoreError, match="closed"):
        await late
    with pytest.raises(StoreError, match="closed"):
        await s1.load_runtime("rt")
    s2 = SqliteStore(path)
    await s2.open()
    try:
        assert len(await s2.load_events("rt")) == 100
    finally:
        await s2.close()


async def test_sqlite_refuses_work_before_open(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "m.db")
    with pytest.raises(StoreError, match="not open"):
        await s.submit(mk_txn("rt", 0))
    with pytest.raises(StoreError, match="not open"):
        await s.list_sessions()
    assert not (tmp_path / "m.db").exists()


async def test_sqlite_wal_and_synchronous_full_are_in_force(sq: SqliteStore) -> None:
    pragmas = await sq.pragmas()
    assert pragmas["journal_mode"] == "wal"
    assert pragmas["synchronous"] == 2  # FULL
    assert pragmas["busy_timeout"] == 5000
    raw = sqlite3.connect(sq.path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # stored in the file
    finally:
        raw.close()


async def test_sqlite_schema_version_is_recorded(sq: SqliteStore) -> None:
    known = load_migrations()
    assert [m.version for m in known] == list(range(1, len(known) + 1))
    assert known[0].name == "initial"
    assert await sq.schema_version() == len(known)
    raw = sqlite3.connect(sq.path)
    try:
        rows = raw.execute("SELECT version, name FROM schema_version ORDER BY version").fetchall()
        assert rows == [(m.version, m.name) for m in known]
        plan = " ".join(
            str(r[-1])
            for r in raw.execute(
                "EXPLAIN QUERY PLAN SELECT runtime_id FROM input_states WHERE is_terminal = 0"
                " UNION SELECT runtime_id FROM inbox ORDER BY 1"
            ).fetchall()
        )
        assert "input_states_pending" in plan and "inbox_by_runtime" in plan
        with pytest.raises(sqlite3.IntegrityError):  # the unique index behind S11
            raw.executemany(
                "INSERT INTO idempotency VALUES ('rt', 'k', ?, 'h', 0)", [("a",), ("b",)]
            )
    finally:
        raw.close()


async def test_sqlite_applies_missing_migrations_in_one_transaction(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    base = load_migrations()
    s1 = SqliteStore(path)
    await s1.open()
    await s1.close()
    broken = Migration(
        len(base) + 1, "broken", "CREATE TABLE extra (x INTEGER);\nINSERT INTO nowhere VALUES (1);"
    )
    s2 = SqliteStore(path, migrations=[*base, broken])
    with pytest.raises(StoreError, match=str(path)):
        await s2.open()
    raw = sqlite3.connect(path)
    try:
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master").fetchall()}
        assert "extra" not in tables  # nothing of the failed migration stayed
        assert raw.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == len(base)
    finally:
        raw.close()
    good = Migration(
        len(base) + 1,
        "extra",
        "-- a later migration\nCREATE TABLE extra (x INTEGER);\n"
        "CREATE TRIGGER extra_t AFTER INSERT ON extra BEGIN SELECT 1; END;\n",
    )
    s3 = SqliteStore(path, migrations=[*base, good])
    await s3.open()
    try:
        assert await s3.schema_version() == len(base) + 1
    finally:
        await s3.close()


async def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    s1 = SqliteStore(path)
    await s1.open()
    await s1.close()
    raw = sqlite3.connect(path)
    raw.execute("INSERT INTO schema_version VALUES (999, 'future', 0)")
    raw.commit()
    raw.close()
    s2 = SqliteStore(path)
    with pytest.raises(StoreError) as err:
        await s2.open()
    msg = str(err.value)
    assert str(path) in msg and "999" in msg and "newer" in msg and "upgrade" in msg


def _assert_untouched(path: Path, content: bytes) -> None:
    assert path.read_bytes() == content
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0


async def test_sqlite_refuses_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    content = b"\x00garbage" + os.urandom(64 * 1024)
    path.write_bytes(content)
    for _ in range(2):  # and again: the failed open created nothing
        with pytest.raises(StoreError) as err:
            await SqliteStore(path).open()
        assert str(err.value).startswith(f"store {path}: file is not a database")
    _assert_untouched(path, content)


async def test_sqlite_refuses_a_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    content = ("these are my notes, not a database\n" * 200).encode()
    path.write_bytes(content)
    with pytest.raises(StoreError, match=f"store {path}: file is not a database"):
        await SqliteStore(path).open()
    _assert_untouched(path, content)


async def test_sqlite_refuses_a_truncated_database(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    s1 = SqliteStore(path)
    await s1.open()
    for i in range(20):
        states = [mk_state() for _ in range(20)]
        await s1.submit(mk_txn("rt", 0, *states, events=[mk_event("rt", i + 1)]))
    await s1.close()
    data = path.read_bytes()
    assert len(data) > 100_000
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError) as err:
        await SqliteStore(path).open()
    assert str(err.value).startswith(f"store {path}: database disk image is malformed")


async def test_sqlite_refuses_another_applications_database(tmp_path: Path) -> None:
    path = tmp_path / "theirs.db"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, name TEXT)")
    raw.commit()
    raw.close()
    content = path.read_bytes()
    with pytest.raises(StoreError, match=f"store {path}: not a meerkat-runtime database"):
        await SqliteStore(path).open()
    assert path.read_bytes() == content


class _Held:
    """Hold SQLite's write lock from another connection so that the store's writer waits on
    a first (filler) job and everything submitted meanwhile lands in its next batch."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self.raw = sqlite3.connect(store.path, isolation_level=None)

    async def __aenter__(self) -> _Held:
        self.raw.execute("BEGIN IMMEDIATE")
        self.filler = self.store.submit(mk_txn("rt-filler", 0))
        await asyncio.sleep(0.05)  # the writer took the filler and waits for the lock
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.sleep(0.05)
        self.raw.execute("ROLLBACK")
        self.raw.close()
        await self.filler


async def test_sqlite_write_failure_fails_the_awaitable_and_writes_nothing(
    sq: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    rid = "rt-io"
    kept = mk_state()
    await sq.submit(mk_txn(rid, 0, kept, events=[mk_event(rid, 1)]))
    real = sqlite_mod._apply_txn
    doomed: set[str] = set()

    def failing(conn: sqlite3.Connection, t: Any) -> None:
        real(conn, t)  # the writes happen, then the disk fails
        if t.runtime_id in doomed:
            raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(sqlite_mod, "_apply_txn", failing)
    doomed.add(rid)
    lost = mk_state()
    with pytest.raises(StoreError) as err:
        await sq.submit(
            mk_txn(rid, 0, lost, events=[mk_event(rid, 2)], runtime_state=RuntimeState.RUNNING)
        )
    assert str(err.value) == f"store {sq.path}: disk I/O error (is the disk full?)"
    assert isinstance(err.value.__cause__, sqlite3.OperationalError)
    assert await sq.load_input_state(rid, lost.input_id) is None
    assert [e.seq for e in await sq.load_events(rid)] == [1]
    assert (await sq.load_runtime(rid)).state is None
    doomed.clear()
    gen = await lease(sq, rid)  # the owner recovers under a new generation
    await sq.submit(mk_txn(rid, gen, lost, events=[mk_event(rid, 2)]))
    assert await sq.load_input_state(rid, lost.input_id) is not None


async def test_sqlite_an_abandoned_transaction_fails_only_its_culprit(
    sq: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an I/O error SQLite rolls back the whole transaction, neighbours' work included:
    the culprit fails, neighbours run again and commit, except those of the culprit's
    runtime and generation submitted after it (poisoned); those submitted before it commit."""
    real = sqlite_mod._apply_txn
    doomed = mk_state()

    def failing(conn: sqlite3.Connection, t: Any) -> None:
        real(conn, t)
        if any(row[1] == doomed.input_id.value for row in t.states):
            conn.execute("ROLLBACK")  # what SQLite does on SQLITE_IOERR / SQLITE_FULL
            raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(sqlite_mod, "_apply_txn", failing)
    before, after, other = mk_state(), mk_state(), mk_state()
    commits = sq.commits
    async with _Held(sq):  # all four share one batch
        futs = [
            sq.submit(mk_txn("rt-mix", 0, before)),
            sq.submit(mk_txn("rt-mix", 0, doomed)),
            sq.submit(mk_txn("rt-mix", 0, after)),
            sq.submit(mk_txn("rt-other", 0, other)),
        ]
    results = await asyncio.gather(*futs, return_exceptions=True)
    assert results[0] is None and results[3] is None
    assert isinstance(results[1], StoreError) and "disk I/O error" in str(results[1])
    assert isinstance(results[2], FencedError) and "earlier write" in str(results[2])
    assert await sq.load_input_state("rt-mix", before.input_id) is not None
    assert await sq.load_input_state("rt-mix", doomed.input_id) is None
    assert await sq.load_input_state("rt-mix", after.input_id) is None
    assert await sq.load_input_state("rt-other", other.input_id) is not None
    assert sq.commits - commits == 2  # the filler's batch, then the retried neighbours


async def test_sqlite_disk_full_fails_cleanly(sq: SqliteStore) -> None:
    rid = "rt-full"
    await sq.submit(mk_txn(rid, 0, mk_state(), events=[mk_event(rid, 1)]))
    pages = await sq._write(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
    await sq._write(lambda c: c.execute(f"PRAGMA max_page_count = {pages + 30}").fetchone())
    big = [mk_state() for _ in range(400)]
    small_before, small_after = mk_state(), mk_state()
    async with _Held(sq):  # the three share one batch
        futs = [
            sq.submit(mk_txn("rt-before", 0, small_before)),
            sq.submit(mk_txn(rid, 0, *big, events=[mk_event(rid, 2)])),
            sq.submit(mk_txn("rt-after", 0, small_after)),
        ]
    before, full, after = await asyncio.gather(*futs, return_exceptions=True)
    assert before is None and after is None
    assert isinstance(full, StoreError)
    assert str(full).startswith(f"store {sq.path}: database or disk is full")
    assert len(await sq.load_input_states(rid)) == 1
    assert [e.seq for e in await sq.load_events(rid)] == [1]
    assert await sq.load_input_state("rt-before", small_before.input_id) is not None
    assert await sq.load_input_state("rt-after", small_after.input_id) is not None
    await sq._write(lambda c: c.execute("PRAGMA max_page_count = 1073741823").fetchone())
    gen = await lease(sq, rid)
    await sq.submit(mk_txn(rid, gen, *big, events=[mk_event(rid, 2)]))
    assert len(await sq.load_input_states(rid)) == 401


async def test_sqlite_a_dead_writer_never_leaves_a_future_hanging(
    sq: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should the writer thread die of a bug, work in flight and later work fail with a clear
    error instead of hanging, and close() still returns."""

    def broken(conn: sqlite3.Connection, batch: list[Any]) -> None:
        raise RuntimeError("a bug in the writer")

    monkeypatch.setattr(sq, "_run_batch", broken)
    with pytest.raises(StoreError, match=r"a bug in the writer.*writer thread stopped"):
        await asyncio.wait_for(sq.submit(mk_txn("rt", 0, mk_state())), 5)
    with pytest.raises(StoreError, match="writer thread stopped"):
        await asyncio.wait_for(sq.submit(mk_txn("rt", 0, mk_state())), 5)
    with pytest.raises(StoreError, match="writer thread stopped"):
        await asyncio.wait_for(sq.acquire_lease("rt", "a", 30), 5)
    await asyncio.wait_for(sq.close(), 5)


async def test_sqlite_group_commit_batches_waiting_transactions(sq: SqliteStore) -> None:
    """While another connection holds the write lock, submissions queue up; once it is
    released they share one COMMIT, and a fenced one among them fails alone."""
    rid = "rt-group"
    gen = await lease(sq, rid)
    commits = sq.commits
    async with _Held(sq):
        futs = [
            sq.submit(mk_txn(rid, gen + 1 if i == 30 else gen, events=[mk_event(rid, i + 1)]))
            for i in range(60)
        ]
        await asyncio.sleep(0.1)
        assert not any(f.done() for f in futs)  # not durable yet: nothing resolved
    results = await asyncio.gather(*futs, return_exceptions=True)
    assert isinstance(results[30], FencedError)
    assert sum(r is None for r in results) == 59
    assert sq.commits - commits == 2  # the filler's batch, then all 60 in one COMMIT


async def test_sqlite_futures_resolve_only_after_commit(sq: SqliteStore) -> None:
    rid = "rt-visible"
    seen: list[bool] = []
    sts = [mk_state() for _ in range(20)]

    def check(st: InputState) -> Any:
        def cb(_: Any) -> None:
            raw = sqlite3.connect(sq.path)
            try:
                row = raw.execute(
                    "SELECT 1 FROM input_states WHERE input_id = ?", (st.input_id.value,)
                ).fetchone()
                seen.append(row is not None)
            finally:
                raw.close()

        return cb

    futs = []
    for st in sts:
        fut = sq.submit(mk_txn(rid, 0, st))
        fut.add_done_callback(check(st))
        futs.append(fut)
    await asyncio.gather(*futs)
    await asyncio.sleep(0)
    assert seen == [True] * 20


async def test_sqlite_event_loop_keeps_running_during_commits(
    sq: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """500 transactions on a slow disk (2 ms each, on the writer thread, so at least 1 s of
    commits). ``submit`` returns at once with the work still in flight, and a ticker on the
    loop keeps ticking while the writer commits. A store that committed on the loop would have
    finished everything inside the submit calls, and the ticker would have stalled."""
    real = sqlite_mod._apply_txn

    def slow(conn: sqlite3.Connection, t: Any) -> None:
        time.sleep(0.002)
        real(conn, t)

    monkeypatch.setattr(sqlite_mod, "_apply_txn", slow)
    rid = "rt-loop"
    txns = [mk_txn(rid, 0, mk_state(), events=[mk_event(rid, i + 1)]) for i in range(500)]
    gaps: list[float] = []
    during: list[int] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.002)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            if 0 < sq.transactions < 500:
                during.append(sq.transactions)

    futs = [sq.submit(t) for t in txns]  # synchronous, as the runtime calls it
    in_flight = sum(not f.done() for f in futs)
    task = asyncio.create_task(ticker())
    await asyncio.gather(*futs)
    stop.set()
    await task
    assert in_flight >= 250, "submit returned before the work was done"
    assert sq.transactions == 500
    assert len(during) >= 20, "the loop ticked while the writer was committing"
    # a loop blocked by the writer would stall for the whole batch (500 x 2 ms = 1 s); allow
    # scheduling noise on a busy machine, but not a stall of most of the batch
    assert max(gaps) < 0.6, f"the event loop stalled for {max(gaps):.3f}s"


async def test_sqlite_two_stores_on_one_file_share_leases_and_fencing(tmp_path: Path) -> None:
    """Two processes' view: leases and fencing hold across connections."""
    path = tmp_path / "m.db"
    a, b = SqliteStore(path), SqliteStore(path)
    await a.open()
    await b.open()
    try:
        rid = "rt-shared"
        ga = await a.acquire_lease(rid, "proc-a", 0.05)
        assert ga == 1
        assert await b.acquire_lease(rid, "proc-b", 30) is None
        token = await a.change_token()
        await asyncio.sleep(0.1)
        gb = await b.acquire_lease(rid, "proc-b", 30)
        assert gb == 2
        assert await a.change_token() != token  # another connection committed
        with pytest.raises(FencedError):
            await a.submit(mk_txn(rid, 1, mk_state()))
        entry = InboxEntry(rid, '{"from":"a"}')
        assert await a.inbox_push(entry, _idem("k", "h"), 10) == ("accepted", None)
        assert [e.seq for e in await b.inbox_entries(rid)] == [entry.seq]
        await b.submit(mk_txn(rid, 2, mk_state(), inbox_done=[entry.seq]))
        assert await a.inbox_entries(rid) == []
    finally:
        await a.close()
        await b.close()


# ------------------------------------------------------------------------------ open_store


def test_open_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    mem = open_store("memory://")
    assert isinstance(mem, MemoryStore) and mem.url == "memory://"
    rel = open_store("sqlite:///state/rel.db")
    assert isinstance(rel, SqliteStore) and rel.path == tmp_path / "state" / "rel.db"
    absolute = open_store(f"sqlite:///{tmp_path}/abs.db")  # four slashes in all
    assert isinstance(absolute, SqliteStore) and absolute.path == tmp_path / "abs.db"
    assert open_store(f"sqlite:///{tmp_path}/abs.db").url == f"sqlite:///{tmp_path}/abs.db"
    for bare in ("plain.db", "plain.sqlite", "dir/plain.sqlite3", str(tmp_path / "x.db")):
        s = open_store(bare)
        assert isinstance(s, SqliteStore) and s.path == (tmp_path / bare).absolute()
    assert not (tmp_path / "state").exists()  # not opened yet


def test_open_store_default_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEERKAT_STATE_DIR", str(tmp_path / "st"))
    assert default_state_path() == tmp_path / "st" / "meerkat.db"
    s = open_store(None)
    assert isinstance(s, SqliteStore) and s.path == tmp_path / "st" / "meerkat.db"
    monkeypatch.delenv("MEERKAT_STATE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_path() == tmp_path / "home" / ".local" / "share" / "meerkat" / "meerkat.db"


async def test_open_store_default_creates_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEERKAT_STATE_DIR", str(tmp_path / "new" / "dir"))
    s = open_store(None)
    await s.open()
    try:
        assert (tmp_path / "new" / "dir" / "meerkat.db").exists()
    finally:
        await s.close()


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("mysql://host/db", ["unknown scheme 'mysql'", "memory://", "sqlite:///", "postgresql://"]),
        ("mysql://u:pw@host/db", ["mysql://u:***@host/db"]),
        ("state.json", ["not understood", "memory://", ".db"]),
        ("", ["empty"]),
        ("sqlite://host/x.db", ["no host"]),
        ("sqlite:///", ["names no file"]),
        ("sqlite:///:memory:", ["memory://"]),
    ],
)
def test_open_store_refuses_what_it_cannot_serve(url: str, words: list[str]) -> None:
    with pytest.raises(StoreError) as err:
        open_store(url)
    for w in words:
        assert w in str(err.value)
