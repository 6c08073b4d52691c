"""The design's conformance list (spec §5), run against every store.

Cases 1-10, 17 and 18; the crash cases (11-16) live with the crash suite. Every test runs once
per store (``store_factory``: ``[memory]`` and ``[sqlite]``, see ``conftest.py``). Every case goes
through the public ``Runtime`` API and checks both what callers see (outcomes, waiters) and
what the store holds, read back through the store protocol (``load_input_state``,
``load_input_states``, ``load_conversation``, ``load_runtime``), never through one store's
internals.

Reading the store: where the API promises durability when it returns (``accept`` of a durable
input, ``retire``, ``reset``, a waiter's outcome) the store is read at once; where work ends
asynchronously (a run's completion after ``settle``) the test first waits for every
transaction the runtime submitted (``flushed``), since the SQLite store commits on its own
thread. ``test_restart_keeps_pending_input`` closes a Runtime and opens a new one on the same
store.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from meerkat_runtime import (
    ExternalEventInput,
    InputLifecycleState,
    PeerInput,
    PromptInput,
    Rebuilders,
    Runtime,
    RuntimeConfig,
    RuntimeState,
    SystemGeneratedInput,
)
from meerkat_runtime.runtime.input_state import CoalescingSource, InputState, ProjectionSource
from meerkat_runtime.runtime.inputs import (
    InputDurability,
    ResponseProgressConvention,
    ResponseTerminalConvention,
    SystemOrigin,
)
from meerkat_runtime.runtime.outcomes import (
    AbandonedWait,
    Accepted,
    CancelledWait,
    CompletedWait,
    Deduplicated,
    Rejected,
    SupersededWait,
)
from meerkat_runtime.runtime.policy import PolicyRow, PolicyTable, default_policy_table
from tests.conformance.stores import ProbeStore, StoreFactory
from tests.helpers import ScriptedExecutor, settle

IS = InputLifecycleState

CONFIG = RuntimeConfig(backoff_base=0.01, shutdown_grace=0.05)


# ------------------------------------------------------------------------------ helpers


@asynccontextmanager
async def open_runtime(
    store_factory: StoreFactory, store: Any = None, **kw: Any
) -> AsyncIterator[Runtime]:
    """A Runtime over ``store`` (default: a fresh store of the test's kind), wrapped in a
    ``ProbeStore`` so tests can wait for its commits; closed on exit."""
    inner = store if store is not None else store_factory()
    probe = inner if isinstance(inner, ProbeStore) else ProbeStore(inner)
    rt = Runtime(probe, config=kw.pop("config", CONFIG), **kw)  # type: ignore[arg-type]
    try:
        yield rt
    finally:
        await rt.close(grace=0)


async def until(pred: Callable[[], bool], timeout: float = 1.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.002)


def progress(body: str, request_id: str = "req-1", **header: Any) -> PeerInput:
    return PeerInput.new(
        body,
        peer_id="peer-b",
        convention=ResponseProgressConvention(request_id=request_id, phase="in_progress"),
        **header,
    )


def terminal(body: str, request_id: str = "req-1", **header: Any) -> PeerInput:
    return PeerInput.new(
        body,
        peer_id="peer-b",
        convention=ResponseTerminalConvention(request_id=request_id, status="completed"),
        **header,
    )


def state_of(rt: Runtime, sid: str, iid: Any) -> InputLifecycleState:
    return rt.input_state(sid, iid).current_state


def probe(rt: Runtime) -> ProbeStore:
    store = rt.store
    assert isinstance(store, ProbeStore)
    return store


async def flushed(rt: Runtime) -> None:
    """Wait until every transaction the runtime submitted so far is durable."""
    await probe(rt).flushed()


async def stored(rt: Runtime, sid: str) -> dict[Any, InputState]:
    """The session's input states as the store holds them now (through the protocol)."""
    return {st.input_id: st for st in await rt.store.load_input_states(sid)}


async def parked_run(rt: Runtime, ex: ScriptedExecutor, sid: str, text: str = "head", **kw: Any):
    """Start a run that parks (``checkpoint_then_ok``) until ``ex.release`` is set."""
    handle = await rt.accept_with_completion(sid, PromptInput.new(text, **kw))
    await until(lambda: state_of(rt, sid, handle.input_id) is IS.APPLIED_PENDING_CONSUMPTION)
    assert rt.runtime_state(sid) is RuntimeState.RUNNING
    return handle


# ------------------------------------------------------------------------------ 1


async def test_conformance_01_unique_durable_input_persisted_before_ack(
    store_factory: StoreFactory,
) -> None:
    # every commit of the real store completes ``delay`` seconds late: a runtime that
    # acknowledged before its transaction was durable would return before ``synced`` has it
    store = ProbeStore(store_factory(), delay=0.03)
    async with open_runtime(store_factory, store) as rt:
        ex = ScriptedExecutor(default="none")
        s = await rt.create_session(executor=ex)
        prompt = PromptInput.new("hello", idempotency_key="k-1")
        t0 = time.monotonic()
        out = await rt.accept(s.id, prompt)
        elapsed = time.monotonic() - t0
        # at the moment accept returns, the durable transaction holding the input is synced
        assert isinstance(out, Accepted)
        assert out.input_id == prompt.id
        assert prompt.id in store.synced
        assert elapsed >= store.delay * 0.9
        row = await store.load_input_state(s.id, prompt.id)  # no flush: durable at ack
        assert row is not None
        assert row.durability is InputDurability.DURABLE
        assert row.persisted_input == prompt
        assert row.idempotency_key is not None and row.idempotency_key.value == "k-1"
        assert out.state.current_state is IS.QUEUED
        await settle(rt, s.id)
        await flushed(rt)
        assert (await stored(rt, s.id))[prompt.id].current_state is IS.CONSUMED


async def test_conformance_01_store_holds_state_when_accept_returns(
    store_factory: StoreFactory,
) -> None:
    async with open_runtime(store_factory) as rt:
        s = await rt.create_session(executor=ScriptedExecutor())
        store = rt.runtime(s.id).store
        prompt = PromptInput.new("persist me")
        out = await rt.accept(s.id, prompt)
        assert isinstance(out, Accepted)
        row = await store.load_input_state(s.id, prompt.id)  # no flush: durable at ack
        assert row is not None
        assert row.persisted_input is not None
        assert row.persisted_input.to_json_dict() == prompt.to_json_dict()
        assert [h.to for h in row.history][:1] == [IS.QUEUED]
        await settle(rt, s.id)


# ------------------------------------------------------------------------------ 2


async def test_conformance_02_duplicate_ingest_is_deduplicated(store_factory: StoreFactory) -> None:
    async with open_runtime(store_factory) as rt:
        ex = ScriptedExecutor(["checkpoint_then_ok"])
        s = await rt.create_session(executor=ex)
        original = PromptInput.new("do the thing", idempotency_key="idem-1")
        h1 = await rt.accept_with_completion(s.id, original)
        await until(lambda: state_of(rt, s.id, original.id) is IS.APPLIED_PENDING_CONSUMPTION)
        before_ids = rt.runtime(s.id).input_ids(include_terminal=True)
        await flushed(rt)
        before_store = set(await stored(rt, s.id))

        retry = PromptInput.new("do the thing", idempotency_key="idem-1")
        assert retry.id != original.id
        h2 = await rt.accept_with_completion(s.id, retry)
        assert isinstance(h2.outcome, Deduplicated)
        assert h2.outcome.existing_id == original.id
        assert h2.outcome.input_id == retry.id
        assert h2.input_id == original.id
        # no new state, no new store row
        assert rt.runtime(s.id).input_ids(include_terminal=True) == before_ids
        await flushed(rt)  # whatever the duplicate's accept wrote is durable now
        assert set(await stored(rt, s.id)) == before_store
        assert retry.id not in await stored(rt, s.id)
        assert await rt.store.load_input_state(s.id, retry.id) is None

        ex.release.set()
        o1 = await h1.wait(1.0)
        o2 = await h2.wait(1.0)
        assert isinstance(o1, CompletedWait)
        assert o2 == o1  # the duplicate's waiter follows the original
        assert len(ex.runs) == 1


async def test_conformance_02_duplicate_of_terminal_input_answers_at_once(
    store_factory: StoreFactory,
) -> None:
    async with open_runtime(store_factory) as rt:
        ex = ScriptedExecutor()
        s = await rt.create_session(executor=ex)
        first = await rt.accept_with_completion(s.id, PromptInput.new("x", idempotency_key="k"))
        done = await first.wait(1.0)
        again = await rt.accept_with_completion(s.id, PromptInput.new("x", idempotency_key="k"))
        assert isinstance(again.outcome, Deduplicated)
        assert await again.wait(0.5) == done
        await settle(rt, s.id)
        assert len(ex.runs) == 1
        assert len(rt.list_inputs(s.id, include_terminal=True)) == 1


# ------------------------------------------------------------------------------ 3


async def test_conformance_03_supersession_scope_is_runtime_kind_and_key(
    store_factory: StoreFactory,
) -> None:
    async with open_runtime(store_factory) as rt:
        ex = ScriptedExecutor(["checkpoint_then_ok"])
        ex2 = ScriptedExecutor(["checkpoint_then_ok"])
        s = await rt.create_session(executor=ex)
        s2 = await rt.create_session(executor=ex2)
        # the active run's head shares the scope: applied inputs are never superseded
        head = await parked_run(rt, ex, s.id, supersession_key="status")
        await parked_run(rt, ex2, s2.id)

        old = PromptInput.new("status v1", supersession_key="status")
        other_key = PromptInput.new("other v1", supersession_key="other")
        other_kind = ExternalEventInput.new("status", {"v": 1}, supersession_key="status")
        other_session = PromptInput.new("status v1 (s2)", supersession_key="status")
        h_old = await rt.accept_with_completion(s.id, old)
        for inp in (other_key, other_kind):
            assert isinstance(await rt.accept(s.id, inp), Accepted)
        assert isinstance(await rt.accept(s2.id, other_session), Accepted)

        new = PromptInput.new("status v2", supersession_key="status")
        assert isinstance(await rt.accept(s.id, new), Accepted)

        st = rt.input_state(s.id, old.id)
        assert st.current_state is IS.SUPERSEDED
        assert st.terminal_outcome.superseded_by == new.id  # type: ignore[union-attr]
        # the supersession is in the new input's (durable) accept transaction
        assert (await stored(rt, s.id))[old.id].current_state is IS.SUPERSEDED
        w = await h_old.wait(0.5)
        assert isinstance(w, SupersededWait) and w.superseded_by == new.id

        for iid in (other_key.id, other_kind.id, new.id):
            assert state_of(rt, s.id, iid) is IS.QUEUED
        assert state_of(rt, s2.id, other_session.id) is IS.QUEUED
        assert state_of(rt, s.id, head.input_id) is IS.APPLIED_PENDING_CONSUMPTION
        assert old.id not in rt.runtime(s.id).queued_ids()

        ex.release.set()
        ex2.release.set()
        await settle(rt, s.id)
        await settle(rt, s2.id)
        ran = [i for r in ex.runs for i in r.input_ids]
        assert old.id not in ran and new.id in ran
        assert state_of(rt, s.id, head.input_id) is IS.CONSUMED


async def test_conformance_03_staged_input_is_never_superseded(store_factory: StoreFactory) -> None:
    async with open_runtime(store_factory) as rt:
        ex = ScriptedExecutor(["hang_before"])
        s = await rt.create_session(executor=ex)
        staged = PromptInput.new("v1", supersession_key="k")
        await rt.accept(s.id, staged)
        await until(lambda: state_of(rt, s.id, staged.id) is IS.STAGED)
        newer = PromptInput.new("v2", supersession_key="k")
        assert isinstance(await rt.accept(s.id, newer), Accepted)
        assert state_of(rt, s.id, staged.id) is IS.STAGED
        assert state_of(rt, s.id, newer.id) is IS.QUEUED
        assert await rt.cancel(s.id)
        await settle(rt, s.id)
        assert state_of(rt, s.id, newer.id) is IS.CONSUMED


async def test_conformance_03_ephemeral_never_supersedes_durable(
    store_factory: StoreFactory,
) -> None:
    async with open_runtime(store_factory) as rt:
        ex = ScriptedExecutor(["checkpoint_then_ok"])
        s = await rt.create_session(executor=ex)
        await parked_run(rt, ex, s.id)
        durable = PromptInput.new("durable", supersession_key="k")
        await rt.accept(s.id, durable)
        eph = PromptInput.new("ephemeral", supersession_key="k", durability="ephemeral")
        assert isinstance(await rt.accept(s.id, eph), Accepted)
        assert state_of(rt, s.id, durable.id) is IS.QUEUED
        assert state_of(rt, s.id, eph.id) is IS.QUEUED
        # a durable input does supersede both (ephemeral and durable) older ones
        newest = PromptInput.new("durable 2", supersession_key="k")
        await rt.accept(s.id, newest)
        for iid in (durable.id, eph.id):
            st = rt.input_state(s.id, iid)
            assert st.current_state is IS.SUPERSEDED
            assert st.terminal_outcome.superseded_by == newest.id  # type: ignore[union-attr]
        ex.release.set()
        await settle(rt, s.id)


# ------------------------------------------------------------------------------ 4


async def test_conformance_04_coalescing_at_checkpoint(store_factory: StoreFactory) -> None:
    async with open_runtime(store_factory) as rt:
        ex = ScriptedExecutor(["checkpoint_then_ok"])
        s = await rt.create_session(executor=ex)
        head = await parked_run(rt, ex, s.id)
        parts = [progress(f"part {i}") for i in range(3)]
        handles = [await rt.accept_with_completion(s.id, p) for p in parts]
        assert [state_of(rt, s.id, p.id) for p in parts] == [IS.QUEUED] * 3
        ex.release.set()
        head_out = await head.wait(1.0)
        await settle(rt, s.id)

        assert len(ex.runs) == 1
        joined = ex.runs[0].joined
        assert len(joined) == 1 and len(joined[0]) == 1
        agg_id = joined[0][0]
        assert agg_id not in [p.id for p in parts]
        agg = rt.input_state(s.id, agg_id)
        assert agg.reconstruction_source == CoalescingSource(source_input_ids=[p.id for p in parts])
        assert agg.durability is InputDurability.DURABLE
        body = agg.persisted_input
        assert isinstance(body, PeerInput)
        assert json.loads(body.body) == ["part 0", "part 1", "part 2"]
        assert isinstance(body.header.source, SystemOrigin)
        assert body.header.durability is InputDurability.DURABLE
        assert body.convention == parts[-1].convention
        assert agg.current_state is IS.CONSUMED
        assert agg.last_run_id == ex.runs[0].run_id
        await flushed(rt)
        row = (await stored(rt, s.id))[agg_id]
        assert row.reconstruction_source == agg.reconstruction_source

        for p, h in zip(parts, handles, strict=True):
            st = rt.input_state(s.id, p.id)
            assert st.current_state is IS.COALESCED
            assert st.terminal_outcome.aggregate_id == agg_id  # type: ignore[union-attr]
            w = await h.wait(0.5)
            assert isinstance(w, CompletedWait)
            assert w.via_aggregate_id == agg_id
            assert w.input_id == p.id
            assert w.result == head_out.result  # type: ignore[union-attr]


async def test_conformance_04_coalescing_at_run_start(store_factory: StoreFactory) -> None:
    async with open_runtime(store_factory) as rt:
        ex = ScriptedExecutor()
        s = await rt.create_session(executor=ex)
        parts = [progress("a"), progress("b")]
        handles = [await rt.accept_with_completion(s.id, p) for p in parts]
        await settle(rt, s.id)
        assert ex.runs == []  # progress responses do not wake
        prompt = PromptInput.new("go")
        await rt.accept(s.id, prompt)
        await settle(rt, s.id)
        assert len(ex.runs) == 1
        ids = ex.runs[0].input_ids
        assert prompt.id in ids and len(ids) == 2
        (agg_id,) = [i for i in ids if i != prompt.id]
        agg = rt.input_state(s.id, agg_id)
        assert agg.reconstruction_source == CoalescingSource(source_input_ids=[p.id for p in parts])
        assert isinstance(agg.persisted_input, PeerInput)
        assert json.loads(agg.persisted_input.body) == ["a", "b"]
        assert agg.current_state is IS.CONSUMED
        for p, h in zip(parts, handles, strict=True):
            assert state_of(rt, s.id, p.id) is IS.COALESCED
            w = await h.wait(0.5)
            assert isinstance(w, CompletedWait) and w.via_aggregate_id == agg_id


# ------------------------------------------------------------------------------ 5-7


async def test_conformance_05_terminal_peer_response_while_idle_wakes(
    store_factory: StoreFactory,
) -> None:
    async with open_runtime(store_factory) as rt:
        ex = ScriptedExecutor()
        s = await rt.create_session(executor=ex)
        resp = terminal("the answer")
        h = await rt.accept_with_completion(s.id, resp)
        out = await h.wait(1.0)
        assert isinstance(out, CompletedWait)
        assert len(ex.runs) == 1
        assert ex.runs[0].input_ids == [resp.id]
        assert ex.runs[0].boundary == "run_start"
        assert state_of(rt, s.id, resp.id) is IS.CONSUMED


async def test_conformance_06_terminal_peer_response_joins_active_run_at_checkpoint(
    store_factory: StoreFactory,
) -> None:
    async with open_runtime(store_factory) as rt:
        ex = ScriptedExecutor(["checkpoint_then_ok"])
        s = await rt.create_session(executor=ex)
        head = await parked_run(rt, ex, s.id)
        resp = terminal("done over there")
        h = await rt.accept_with_completion(s.id, resp)
        assert isinstance(h.outcome, Accepted)
        assert h.outcome.policy.apply_mode.value == "stage_run_boundary"
        assert state_of(rt, s.id, resp.id) is IS.QUEUED  # waits for the checkpoint
        ex.release.set()
        head_out = await head.wait(1.0)
        out = await h.wait(1.0)
        await settle(rt, s.id)
        assert len(ex.runs) == 1
        assert ex.runs[0].joined == [[resp.id]]
        st = rt.input_state(s.id, resp.id)
        assert st.current_state is IS.CONSUMED
        assert st.last_run_id == ex.runs[0].run_id
        assert out == head_out.model_copy(update={"input_id": resp.id})
        # its append is in the conversation, committed by that run
        rows = [r for r in rt.runtime(s.id).conversation.rows if resp.id in r.input_ids]
        assert len(rows) == 1 and rows[0].run_id == ex.runs[0].run_id


async def test_conformance_07_progress_response_is_peer_input_and_does_not_wake(
    store_factory: StoreFactory,
) -> None:
    async with open_runtime(store_factory) as rt:
        ex = ScriptedExecutor()
        s = await rt.create_session(executor=ex)
        p = progress("working on it")
        out = await rt.accept(s.id, p)
        assert isinstance(out, Accepted)
        expected = default_policy_table().resolve("peer_response_progress", True)
        assert out.policy == expected
        assert out.policy.wake_mode.value == "none"
        await settle(rt, s.id)
        await asyncio.sleep(0.02)
        assert ex.runs == []
        assert rt.runtime(s.id).active_run_id is None
        assert rt.runtime_state(s.id) is RuntimeState.IDLE
        st = rt.input_state(s.id, p.id)
        assert st.current_state is IS.QUEUED
        assert isinstance(st.persisted_input, PeerInput)
        conv = st.persisted_input.convention
        assert isinstance(conv, ResponseProgressConvention)
        assert conv.request_id == "req-1"
        assert rt.runtime(s.id).queued_ids() == [p.id]


# ------------------------------------------------------------------------------ 8-10


async def test_conformance_08_retire_without_replacement_abandons_pending(
    store_factory: StoreFactory,
) -> None:
    async with open_runtime(store_factory) as rt:
        ex = ScriptedExecutor(["checkpoint_then_ok"])
        s = await rt.create_session(executor=ex)
        head = await parked_run(rt, ex, s.id)
        q = [PromptInput.new("q1"), progress("p1")]
        hs = [await rt.accept_with_completion(s.id, i) for i in q]
        report = await rt.retire(s.id)
        assert report["inputs_abandoned"] == 2
        for i, h in zip(q, hs, strict=True):
            st = rt.input_state(s.id, i.id)
            assert st.current_state is IS.ABANDONED
            assert st.terminal_outcome.reason.value == "retired"  # type: ignore[union-attr]
            assert (await stored(rt, s.id))[i.id].current_state is IS.ABANDONED  # retire committed
            w = await h.wait(0.5)
            assert isinstance(w, AbandonedWait) and w.reason.value == "retired"
        assert rt.runtime(s.id).queued_ids() == []
        refused = await rt.accept(s.id, PromptInput.new("too late"))
        assert isinstance(refused, Rejected)
        assert refused.code.value == "not_ready"
        assert refused.reason
        # the active run keeps what it has applied
        ex.release.set()
        assert isinstance(await head.wait(1.0), CompletedWait)
        await settle(rt, s.id)
        assert rt.runtime_state(s.id) is RuntimeState.RETIRED
        assert len(ex.runs) == 1


async def test_conformance_08_retire_idle_runtime(store_factory: StoreFactory) -> None:
    async with open_runtime(store_factory) as rt:
        ex = ScriptedExecutor()
        s = await rt.create_session(executor=ex)
        p = progress("pending")
        await rt.accept(s.id, p)
        await rt.retire(s.id)
        assert rt.input_state(s.id, p.id).terminal_outcome.reason.value == "retired"  # type: ignore[union-attr]
        out = await rt.accept(s.id, terminal("late"))
        assert isinstance(out, Rejected) and out.code.value == "not_ready"
        await settle(rt, s.id)
        assert ex.runs == []


async def test_conformance_09_respawn_keeps_durable_pending_input(
    store_factory: StoreFactory,
) -> None:
    async with open_runtime(store_factory) as rt:
        ex = ScriptedExecutor(["checkpoint_then_ok"])
        s = await rt.create_session(executor=ex)
        head = await parked_run(rt, ex, s.id)
        gen = rt.runtime(s.id).generation
        durable = [PromptInput.new("d1"), PromptInput.new("d2")]
        hs = [await rt.accept_with_completion(s.id, d) for d in durable]
        eph = PromptInput.new("e1", durability="ephemeral")
        he = await rt.accept_with_completion(s.id, eph)

        report = await rt.retire(s.id, replacement_planned=True)
        assert report["inputs_abandoned"] == 0
        refused = await rt.accept(s.id, PromptInput.new("held"))
        assert isinstance(refused, Rejected) and refused.code.value == "not_ready"
        ex.release.set()
        await head.wait(1.0)
        await settle(rt, s.id)
        assert len(ex.runs) == 1  # nothing runs while held
        assert [state_of(rt, s.id, d.id) for d in durable] == [IS.QUEUED, IS.QUEUED]

        await rt.respawn(s.id)
        assert rt.runtime(s.id).generation == gen + 1
        assert rt.runtime_state(s.id) in (RuntimeState.IDLE, RuntimeState.RUNNING)
        outs = [await h.wait(1.0) for h in hs]  # waiters carried over
        assert all(isinstance(o, CompletedWait) for o in outs)
        await settle(rt, s.id)
        ran = [i for r in ex.runs[1:] for i in r.input_ids]
        assert ran == [durable[0].id, durable[1].id]
        assert eph.id not in ran
        assert state_of(rt, s.id, eph.id) is IS.ABANDONED
        assert (await he.wait(0.5)).outcome_type == "abandoned"
        assert isinstance(await rt.accept(s.id, PromptInput.new("after")), Accepted)


async def test_conformance_09_respawn_rebuilds_derived_and_refuses_while_held(
    store_factory: StoreFactory,
) -> None:
    rebuilt_from: list[Any] = []

    def rebuild(src: ProjectionSource, inp: Any) -> Any:
        rebuilt_from.append(inp.id)
        return inp

    async with open_runtime(
        store_factory, rebuilders=Rebuilders(projection={"rule-1": rebuild})
    ) as rt:
        ex = ScriptedExecutor(["checkpoint_then_ok"], default="none")
        s = await rt.create_session(executor=ex)
        head = await parked_run(rt, ex, s.id)
        derived = SystemGeneratedInput.new("gen", "a projected note", durability="derived")
        src = ProjectionSource(rule_id="rule-1", source_event_id="ev-1")
        hd = await rt.accept_with_completion(s.id, derived, reconstruction_source=src)
        assert isinstance(hd.outcome, Accepted)
        await rt.retire(s.id, replacement_planned=True)
        ex.release.set()
        await head.wait(1.0)
        await settle(rt, s.id)
        assert ex.runs[0].joined == []  # a held runtime takes nothing at checkpoints
        assert state_of(rt, s.id, derived.id) is IS.QUEUED

        report = await rt.respawn(s.id)
        assert report["inputs_rebuilt"] == 1
        assert rebuilt_from == [derived.id]
        old = rt.input_state(s.id, derived.id)
        assert old.current_state is IS.SUPERSEDED
        new_id = old.terminal_outcome.superseded_by  # type: ignore[union-attr]
        assert new_id != derived.id
        new = rt.input_state(s.id, new_id)
        assert new.durability is InputDurability.DERIVED
        assert new.reconstruction_source == src
        w = await hd.wait(0.5)
        assert isinstance(w, SupersededWait) and w.superseded_by == new_id
        await settle(rt, s.id)
        assert state_of(rt, s.id, new_id) is IS.CONSUMED
        assert ex.runs[-1].input_ids == [new_id]


async def test_conformance_10_reset_abandons_pending_and_clears_conversation(
    store_factory: StoreFactory,
) -> None:
    async with open_runtime(store_factory) as rt:
        ex = ScriptedExecutor(["ok", "checkpoint_then_ok"])
        s = await rt.create_session(executor=ex)
        first = await rt.accept_with_completion(s.id, PromptInput.new("earlier"))
        await first.wait(1.0)
        head = await parked_run(rt, ex, s.id)
        q = [PromptInput.new("q"), progress("p")]
        hs = [await rt.accept_with_completion(s.id, i) for i in q]
        store = rt.runtime(s.id).store
        assert len(await store.load_conversation(s.id)) > 0

        report = await rt.reset(s.id)
        assert report["inputs_abandoned"] == 3
        for iid in [head.input_id, *(i.id for i in q)]:
            st = rt.input_state(s.id, iid)
            assert st.current_state is IS.ABANDONED
            assert st.terminal_outcome.reason.value == "reset"  # type: ignore[union-attr]
            row = await store.load_input_state(s.id, iid)  # reset committed when it returned
            assert row is not None and row.current_state is IS.ABANDONED
        for h in hs:
            w = await h.wait(0.5)
            assert isinstance(w, AbandonedWait) and w.reason.value == "reset"
        assert len(rt.runtime(s.id).conversation) == 0
        assert await store.load_conversation(s.id) == []
        assert rt.runtime_state(s.id) is RuntimeState.IDLE
        assert state_of(rt, s.id, first.input_id) is IS.CONSUMED  # terminal stays terminal
        # usable again
        again = await rt.accept_with_completion(s.id, PromptInput.new("fresh"))
        assert isinstance(await again.wait(1.0), CompletedWait)
        assert rt.runtime(s.id).conversation.rows[0].message.content == "fresh"


# ------------------------------------------------------------------------------ 17-18


async def _cancel_and_check(rt: Runtime, sid: str, handle: Any, idle_after: bool = True) -> None:
    sr = rt.runtime(sid)
    await until(lambda: state_of(rt, sid, handle.input_id) is IS.APPLIED_PENDING_CONSUMPTION)
    assert sr.active_run_id is not None
    await asyncio.sleep(0.05)  # well inside the long wait
    t0 = time.monotonic()
    assert await rt.cancel(sid)
    out = await handle.wait(1.0)
    elapsed = time.monotonic() - t0
    assert isinstance(out, CancelledWait)
    assert elapsed < 1.0
    st = rt.input_state(sid, handle.input_id)
    assert st.current_state is IS.CONSUMED  # its boundary was applied
    # the waiter answered after the run's end was committed
    assert (await stored(rt, sid))[handle.input_id].current_state is IS.CONSUMED
    if idle_after:
        await until(lambda: rt.runtime_state(sid) is RuntimeState.IDLE, 1.0)
        assert sr.active_run_id is None
        assert await rt.cancel(sid) is False  # nothing left to cancel


async def test_conformance_17_cancel_during_long_model_wait(store_factory: StoreFactory) -> None:
    async with open_runtime(store_factory) as rt:
        s = await rt.create_session(
            model="offline", offline_script=[{"type": "text", "text": "late", "delay": 30}]
        )
        h = await rt.accept_with_completion(s.id, PromptInput.new("think hard"))
        await _cancel_and_check(rt, s.id, h)
        contents = [m.content for m in rt.runtime(s.id).conversation.messages()]
        assert "late" not in contents


async def test_conformance_18_cancel_during_long_tool_wait(store_factory: StoreFactory) -> None:
    async with open_runtime(store_factory) as rt:
        s = await rt.create_session(
            model="offline",
            offline_script=[
                {"type": "tool", "name": "slow", "args": {}, "duration": 30, "result": "x"}
            ],
        )
        h = await rt.accept_with_completion(s.id, PromptInput.new("use the tool"))
        await _cancel_and_check(rt, s.id, h)


async def test_conformance_17_fallback_cancel_long_wait_scripted(
    store_factory: StoreFactory,
) -> None:
    async with open_runtime(store_factory) as rt:
        ex = ScriptedExecutor(["hang"])
        s = await rt.create_session(executor=ex)
        h = await rt.accept_with_completion(s.id, PromptInput.new("long"))
        await _cancel_and_check(rt, s.id, h)
        assert ex.runs[0].outcome == "RunCancelled"


async def test_conformance_18_fallback_cancel_then_next_run_scripted(
    store_factory: StoreFactory,
) -> None:
    async with open_runtime(store_factory) as rt:
        ex = ScriptedExecutor(["hang"])
        s = await rt.create_session(executor=ex)
        h = await rt.accept_with_completion(s.id, PromptInput.new("long"))
        await until(lambda: state_of(rt, s.id, h.input_id) is IS.APPLIED_PENDING_CONSUMPTION)
        nxt = await rt.accept_with_completion(s.id, PromptInput.new("next"))
        await _cancel_and_check(rt, s.id, h, idle_after=False)
        # S8/S17: the queued prompt is answered by the next run
        assert isinstance(await nxt.wait(1.0), CompletedWait)
        assert ex.runs[1].input_ids == [nxt.input_id]


# ------------------------------------------------------------------------------ restart


async def test_s7_restart_keeps_pending_input(store_factory: StoreFactory) -> None:
    """Inputs queued in one Runtime are recovered, in queue order, by the next Runtime on
    the same store (the memory store: the same object; SQLite: a new store on the same file)
    and run once something wakes the runtime."""
    quiet = PolicyTable.decision("stage_run_start", "none", "fifo", "on_run_complete")
    policy = default_policy_table().with_rows({"prompt": PolicyRow(quiet, quiet)})
    prompts = [PromptInput.new(f"p{i}") for i in range(3)]
    # accepted in another order than created: queue order is not input id order
    order = [prompts[2], prompts[0], prompts[1]]
    want = [p.id for p in order]

    store = store_factory()
    ex1 = ScriptedExecutor()
    async with open_runtime(store_factory, store, policy=policy) as rt:
        s = await rt.create_session(executor=ex1)
        for p in order:
            out = await rt.accept(s.id, p)
            assert isinstance(out, Accepted) and out.policy.wake_mode.value == "none"
        await settle(rt, s.id)
        assert ex1.runs == []  # prompts do not wake under this policy
        assert rt.runtime(s.id).queued_ids() == want
    # the first Runtime is closed (its store too); nothing of it runs any more

    ex2 = ScriptedExecutor()
    reopened = store_factory.reopen(store)
    async with open_runtime(
        store_factory, reopened, policy=policy, executor_factory=lambda rec: ex2
    ) as rt2:
        await rt2.start()  # recovers sessions with pending inputs (S7)
        assert rt2.recovery_reports[s.id]["inputs_recovered"] == 3
        assert rt2.recovery_reports[s.id]["inputs_lost"] == 0
        sr = rt2.runtime(s.id)
        assert sr.queued_ids() == want
        for p in order:
            st = rt2.input_state(s.id, p.id)
            assert st.current_state is IS.QUEUED
            assert st.durability is InputDurability.DURABLE
            assert st.persisted_input == p
            assert st.recovery_count == 1
        loaded = await rt2.store.load_runtime(s.id)
        assert [st.input_id for st in loaded.inputs] == want
        assert rt2.runtime_state(s.id) is RuntimeState.IDLE
        await settle(rt2, s.id)
        assert ex2.runs == []  # recovery alone wakes nothing

        wake = ExternalEventInput.new("tick", {"n": 1})
        h = await rt2.accept_with_completion(s.id, wake)
        assert isinstance(h.outcome, Accepted) and h.outcome.policy.wake_mode.value != "none"
        assert isinstance(await h.wait(2.0), CompletedWait)
        await settle(rt2, s.id)
        ran = [i for r in ex2.runs for i in r.input_ids]
        assert ran == [*want, wake.id]  # the recovered inputs first, in their queue order
        assert ex1.runs == []
        await flushed(rt2)
        rows = await stored(rt2, s.id)
        for iid in [*want, wake.id]:
            assert rt2.input_state(s.id, iid).current_state is IS.CONSUMED
            assert rows[iid].current_state is IS.CONSUMED
