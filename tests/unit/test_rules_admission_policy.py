"""Rules S1, S2, S3, S11, S14 and S17: admission, policy and scheduling, through the public
``Runtime`` API with small application policy tables."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest

from meerkat_runtime import (
    ExternalEventInput,
    InputLifecycleState,
    InvalidOperationError,
    PeerInput,
    PolicyRow,
    PolicyTable,
    ProjectedInput,
    PromptInput,
    RunResult,
    Runtime,
    RuntimeConfig,
    RuntimeState,
    SystemGeneratedInput,
    default_policy_table,
)
from meerkat_runtime._ids import CorrelationId
from meerkat_runtime.core.lifecycle import RunContext
from meerkat_runtime.runtime.input_state import CoalescingSource, ProjectionSource
from meerkat_runtime.runtime.inputs import (
    OperatorOrigin,
    ResponseProgressConvention,
    SystemOrigin,
    content_hash,
)
from meerkat_runtime.runtime.outcomes import (
    Accepted,
    CompletedWait,
    CompletedWithoutResultWait,
    Deduplicated,
    Rejected,
)
from meerkat_runtime.store.memory import MemoryStore
from tests.helpers import ScriptedExecutor, messages_from, settle

IS = InputLifecycleState
D = PolicyTable.decision
CONFIG = RuntimeConfig(backoff_base=0.01, shutdown_grace=0.05)


# ------------------------------------------------------------------------------ helpers


@asynccontextmanager
async def open_runtime(
    policy: PolicyTable | None = None, config: RuntimeConfig | None = None
) -> AsyncIterator[Runtime]:
    rt = Runtime.open("memory://", policy=policy, config=config or CONFIG)
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


def st(rt: Runtime, sid: str, iid: Any) -> InputLifecycleState:
    return rt.input_state(sid, iid).current_state


def mstore(rt: Runtime, sid: str) -> MemoryStore:
    store = rt.runtime(sid).store
    assert isinstance(store, MemoryStore)
    return store


def progress(body: str, request_id: str = "req-1", **header: Any) -> PeerInput:
    return PeerInput.new(
        body,
        peer_id="peer-b",
        convention=ResponseProgressConvention(request_id=request_id, phase="in_progress"),
        **header,
    )


def event(event_type: str, payload: Any, **header: Any) -> ExternalEventInput:
    return ExternalEventInput.new(event_type, payload, **header)


def table(kind: str | tuple[str, str], idle: Any, running: Any | None = None) -> PolicyTable:
    return default_policy_table().with_rows({kind: PolicyRow(idle, running or idle)})


async def parked_run(rt: Runtime, sid: str, text: str = "head") -> Any:
    """Start a run (executor step ``checkpoint_then_ok``) that parks until released."""
    h = await rt.accept_with_completion(sid, PromptInput.new(text))
    await until(lambda: st(rt, sid, h.input_id) is IS.APPLIED_PENDING_CONSUMPTION)
    return h


class GateExecutor:
    """Commits its boundary; the first run then waits for ``gate`` (no checkpoint)."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.runs: list[tuple[Any, list[Any]]] = []

    async def apply(self, run: RunContext) -> RunResult:
        prim = run.primitive
        self.runs.append((run.run_id, list(prim.contributing_input_ids)))
        await run.commit_boundary(messages_from(prim))
        if len(self.runs) == 1:
            await run.guard(self.gate.wait())
        return RunResult(text=f"run {len(self.runs)}")


# ============================================================================== S1


async def test_s1_ignore_is_consumed_at_accept() -> None:
    ignore = D("ignore", "none", "none", "on_accept")
    async with open_runtime(table("prompt", ignore)) as rt:
        ex = ScriptedExecutor()
        s = await rt.create_session(executor=ex)
        h = await rt.accept_with_completion(s.id, PromptInput.new("never applied"))
        assert isinstance(h.outcome, Accepted)
        assert h.outcome.state.current_state is IS.CONSUMED
        assert mstore(rt, s.id).input_states[s.id][h.input_id].current_state is IS.CONSUMED
        assert isinstance(await h.wait(0.5), CompletedWithoutResultWait)
        await settle(rt, s.id)
        assert ex.runs == []
        assert len(rt.runtime(s.id).conversation) == 0


async def test_s1_inject_now_while_idle_is_an_immediate_context_append() -> None:
    inject = D("inject_now", "none", "fifo", "on_apply")
    async with open_runtime(table("external_event", inject)) as rt:
        ex = ScriptedExecutor(default="none")
        s = await rt.create_session(executor=ex)
        e = event("note", {"n": 1})
        h = await rt.accept_with_completion(s.id, e)
        out = await h.wait(1.0)
        await settle(rt, s.id)
        assert len(ex.runs) == 1
        assert ex.runs[0].boundary == "immediate"
        assert ex.runs[0].input_ids == [e.id]
        rows = rt.runtime(s.id).conversation.rows
        assert [r.message.role for r in rows] == ["context"]
        assert rows[0].input_ids == (e.id,)
        assert st(rt, s.id, e.id) is IS.CONSUMED
        assert out.outcome_type in ("completed", "completed_without_result")


async def test_s1_inject_now_while_running_joins_next_checkpoint() -> None:
    inject = D("inject_now", "none", "fifo", "on_apply")
    async with open_runtime(table("external_event", inject)) as rt:
        ex = ScriptedExecutor(["checkpoint_then_ok"])
        s = await rt.create_session(executor=ex)
        head = await parked_run(rt, s.id)
        e = event("note", {"n": 2})
        await rt.accept(s.id, e)
        assert st(rt, s.id, e.id) is IS.QUEUED
        ex.release.set()
        await head.wait(1.0)
        await settle(rt, s.id)
        assert len(ex.runs) == 1
        assert ex.runs[0].joined == [[e.id]]
        rows = [r for r in rt.runtime(s.id).conversation.rows if e.id in r.input_ids]
        assert [r.message.role for r in rows] == ["context"]
        assert st(rt, s.id, e.id) is IS.CONSUMED


async def test_s1_priority_queue_mode_goes_ahead_of_fifo() -> None:
    prio = PolicyRow(
        D("stage_run_start", "wake_if_idle", "priority", "on_run_complete"),
        D("stage_run_start", "none", "priority", "on_run_complete"),
    )
    policy = default_policy_table().with_rows({"external_event": prio})
    async with open_runtime(policy) as rt:
        ex = ScriptedExecutor(["checkpoint_then_ok"])
        s = await rt.create_session(executor=ex)
        head = await parked_run(rt, s.id)
        p1, p2 = PromptInput.new("p1"), PromptInput.new("p2")
        e1, e2 = event("urgent", 1), event("urgent", 2)
        for i in (p1, p2, e1, e2):
            await rt.accept(s.id, i)
        assert rt.runtime(s.id).queued_ids() == [e1.id, e2.id, p1.id, p2.id]
        ex.release.set()
        await head.wait(1.0)
        await settle(rt, s.id)
        assert [r.input_ids for r in ex.runs[1:]] == [[e1.id], [e2.id], [p1.id], [p2.id]]


async def test_s1_wake_none_waits_and_rides_along_with_a_run_started_by_another() -> None:
    ride = D("stage_run_boundary", "none", "fifo", "on_run_complete")
    async with open_runtime(table("external_event", ride)) as rt:
        ex = ScriptedExecutor()
        s = await rt.create_session(executor=ex)
        e = event("fyi", {"x": 1})
        await rt.accept(s.id, e)
        await settle(rt, s.id)
        await asyncio.sleep(0.02)
        assert ex.runs == []
        assert st(rt, s.id, e.id) is IS.QUEUED
        p = PromptInput.new("now")
        hp = await rt.accept_with_completion(s.id, p)
        await hp.wait(1.0)
        await settle(rt, s.id)
        assert len(ex.runs) == 1
        assert set(ex.runs[0].input_ids) == {e.id, p.id}
        assert rt.input_state(s.id, e.id).last_run_id == ex.runs[0].run_id
        assert st(rt, s.id, e.id) is IS.CONSUMED


async def test_s1_wake_none_run_start_input_never_starts_a_run_itself() -> None:
    quiet = D("stage_run_start", "none", "fifo", "on_run_complete")
    async with open_runtime(table("external_event", quiet)) as rt:
        ex = ScriptedExecutor()
        s = await rt.create_session(executor=ex)
        e = event("quiet", 1)
        await rt.accept(s.id, e)
        await settle(rt, s.id)
        assert ex.runs == []
        p = PromptInput.new("wake up")
        await rt.accept(s.id, p)
        await settle(rt, s.id)
        # the prompt's wake processes the queue; both get applied
        assert sorted(i for r in ex.runs for i in r.input_ids) == sorted([e.id, p.id])
        assert st(rt, s.id, e.id) is IS.CONSUMED and st(rt, s.id, p.id) is IS.CONSUMED


async def test_s1_interrupt_yielding_ends_a_wait_early() -> None:
    running = D("stage_run_boundary", "interrupt_yielding", "fifo", "on_run_complete")
    idle = D("stage_run_start", "wake_if_idle", "fifo", "on_run_complete")
    async with open_runtime(table("external_event", idle, running)) as rt:
        ex = ScriptedExecutor(["wait"])
        s = await rt.create_session(executor=ex)
        h = await rt.accept_with_completion(s.id, PromptInput.new("wait for news"))
        await until(lambda: st(rt, s.id, h.input_id) is IS.APPLIED_PENDING_CONSUMPTION)
        await asyncio.sleep(0.02)
        t0 = time.monotonic()
        e = event("news", {"headline": "x"})
        he = await rt.accept_with_completion(s.id, e)
        out = await h.wait(1.0)
        assert time.monotonic() - t0 < 1.0
        assert isinstance(out, CompletedWait)
        assert out.result.text == "wait:interrupted"
        assert ex.runs[0].joined == [[e.id]]
        assert isinstance(await he.wait(0.5), CompletedWait)


async def test_s1_wake_none_does_not_interrupt_a_wait() -> None:
    async with open_runtime() as rt:  # prompts while running: wake none
        ex = ScriptedExecutor(["wait"])
        s = await rt.create_session(executor=ex)
        h = await rt.accept_with_completion(s.id, PromptInput.new("wait"))
        await until(lambda: st(rt, s.id, h.input_id) is IS.APPLIED_PENDING_CONSUMPTION)
        await rt.accept(s.id, PromptInput.new("not urgent"))
        with pytest.raises(TimeoutError):
            await h.wait(0.15)
        assert rt.runtime(s.id).active_run_id is not None
        await rt.cancel(s.id)
        await settle(rt, s.id)


async def test_s1_interrupt_yielding_never_cancels_model_or_tool_work() -> None:
    async with open_runtime() as rt:  # peer messages while running: interrupt_yielding
        ex = ScriptedExecutor(["hang"])
        s = await rt.create_session(executor=ex)
        h = await rt.accept_with_completion(s.id, PromptInput.new("busy"))
        await until(lambda: st(rt, s.id, h.input_id) is IS.APPLIED_PENDING_CONSUMPTION)
        msg = PeerInput.new("hello", peer_id="peer-c")
        out = await rt.accept(s.id, msg)
        assert isinstance(out, Accepted)
        assert out.policy.wake_mode.value == "interrupt_yielding"
        await asyncio.sleep(0.1)
        assert ex.runs[0].outcome == "running"
        assert rt.runtime(s.id).active_run_id == ex.runs[0].run_id
        await rt.cancel(s.id)
        await settle(rt, s.id)


@pytest.mark.parametrize("consume", ["on_apply", "on_run_start"])
async def test_s1_consume_on_apply_consumed_in_boundary_before_run_ends(consume: str) -> None:
    row = PolicyRow(
        D("stage_run_start", "wake_if_idle", "fifo", consume),
        D("stage_run_start", "none", "fifo", consume),
    )
    async with open_runtime(default_policy_table().with_rows({"prompt": row})) as rt:
        ex = ScriptedExecutor(["checkpoint_then_ok"])
        s = await rt.create_session(executor=ex)
        h = await rt.accept_with_completion(s.id, PromptInput.new("eager"))
        await until(lambda: st(rt, s.id, h.input_id) is not IS.QUEUED)
        await until(lambda: st(rt, s.id, h.input_id) is not IS.STAGED)
        # consumed by the boundary's transaction while the run is still active
        assert st(rt, s.id, h.input_id) is IS.CONSUMED
        with pytest.raises(TimeoutError):  # S12: answered when the run ends
            await h.wait(0.05)
        assert rt.runtime(s.id).active_run_id == ex.runs[0].run_id
        assert mstore(rt, s.id).input_states[s.id][h.input_id].current_state is IS.CONSUMED
        hist = [e.to for e in rt.input_state(s.id, h.input_id).history]
        assert hist[-3:] == [IS.APPLIED, IS.APPLIED_PENDING_CONSUMPTION, IS.CONSUMED]
        ex.release.set()
        await settle(rt, s.id)
        assert len(ex.runs) == 1


@pytest.mark.parametrize("step", ["checkpoint_then_ok", "hang"])
async def test_s1_s12_on_apply_waiter_matches_a_later_wait(step: str) -> None:
    row = PolicyRow(
        D("stage_run_start", "wake_if_idle", "fifo", "on_apply"),
        D("stage_run_start", "none", "fifo", "on_apply"),
    )
    async with open_runtime(default_policy_table().with_rows({"prompt": row})) as rt:
        ex = ScriptedExecutor([step])
        s = await rt.create_session(executor=ex)
        h = await rt.accept_with_completion(s.id, PromptInput.new("eager"))
        await until(lambda: st(rt, s.id, h.input_id) is IS.CONSUMED)
        if step == "hang":
            await rt.cancel(s.id)
        else:
            ex.release.set()
        await settle(rt, s.id)
        first = await h.wait(0.5)
        later = await rt.wait(s.id, h.input_id, 0.5)
        assert first == later


async def test_s1_default_consume_on_run_complete_waits_for_the_run() -> None:
    async with open_runtime() as rt:
        ex = ScriptedExecutor(["checkpoint_then_ok"])
        s = await rt.create_session(executor=ex)
        h = await parked_run(rt, s.id)
        assert st(rt, s.id, h.input_id) is IS.APPLIED_PENDING_CONSUMPTION
        ex.release.set()
        await h.wait(1.0)
        assert st(rt, s.id, h.input_id) is IS.CONSUMED


async def test_s1_explicit_ack_stays_pending_until_ack() -> None:
    row = PolicyRow(
        D("stage_run_start", "wake_if_idle", "fifo", "explicit_ack"),
        D("stage_run_start", "none", "fifo", "explicit_ack"),
    )
    async with open_runtime(default_policy_table().with_rows({"prompt": row})) as rt:
        ex = ScriptedExecutor()
        s = await rt.create_session(executor=ex)
        h = await rt.accept_with_completion(s.id, PromptInput.new("needs ack"))
        await until(lambda: len(ex.runs) == 1 and ex.runs[0].outcome == "completed")
        await settle(rt, s.id)
        await asyncio.sleep(0.02)
        assert st(rt, s.id, h.input_id) is IS.APPLIED_PENDING_CONSUMPTION
        assert (
            mstore(rt, s.id).input_states[s.id][h.input_id].current_state
            is IS.APPLIED_PENDING_CONSUMPTION
        )
        assert len(ex.runs) == 1  # no continuation
        assert rt.runtime_state(s.id) is RuntimeState.IDLE
        with pytest.raises(TimeoutError):
            await h.wait(0.05)
        acked = await rt.ack(s.id, h.input_id)
        assert acked.current_state is IS.CONSUMED
        out = await h.wait(0.5)
        assert isinstance(out, CompletedWait)
        assert out.result.text.startswith("done:")
        with pytest.raises(InvalidOperationError):
            await rt.ack(s.id, h.input_id)
        await settle(rt, s.id)
        assert len(ex.runs) == 1


async def test_s1_explicit_ack_refused_while_its_run_is_active() -> None:
    row = PolicyRow(
        D("stage_run_start", "wake_if_idle", "fifo", "explicit_ack"),
        D("stage_run_start", "none", "fifo", "explicit_ack"),
    )
    async with open_runtime(default_policy_table().with_rows({"prompt": row})) as rt:
        ex = ScriptedExecutor(["checkpoint_then_ok"])
        s = await rt.create_session(executor=ex)
        h = await parked_run(rt, s.id)
        try:
            with pytest.raises(InvalidOperationError):
                await rt.ack(s.id, h.input_id)
            assert st(rt, s.id, h.input_id) is IS.APPLIED_PENDING_CONSUMPTION
        finally:
            ex.release.set()
            await settle(rt, s.id)


async def test_s1_s12_explicit_ack_waiter_never_hangs() -> None:
    row = PolicyRow(
        D("stage_run_start", "wake_if_idle", "fifo", "explicit_ack"),
        D("stage_run_start", "none", "fifo", "explicit_ack"),
    )
    async with open_runtime(default_policy_table().with_rows({"prompt": row})) as rt:
        ex = ScriptedExecutor(["checkpoint_then_ok"])
        s = await rt.create_session(executor=ex)
        h = await parked_run(rt, s.id)
        acked = True
        try:
            await rt.ack(s.id, h.input_id)  # early ack: refusing it is fine too
        except InvalidOperationError:
            acked = False
        ex.release.set()
        await settle(rt, s.id)
        if not acked:
            await rt.ack(s.id, h.input_id)
        out = await h.wait(0.5)
        assert isinstance(out, CompletedWait)
        assert out == await rt.wait(s.id, h.input_id, 0.5)


async def test_s1_ack_refused_for_inputs_not_awaiting_ack() -> None:
    async with open_runtime() as rt:
        ex = ScriptedExecutor(["checkpoint_then_ok"])
        s = await rt.create_session(executor=ex)
        h = await parked_run(rt, s.id)
        with pytest.raises(InvalidOperationError):  # on_run_complete, not explicit_ack
            await rt.ack(s.id, h.input_id)
        assert st(rt, s.id, h.input_id) is IS.APPLIED_PENDING_CONSUMPTION
        ex.release.set()
        await settle(rt, s.id)


async def test_s1_rows_keyed_by_external_event_type() -> None:
    ignore = D("ignore", "none", "none", "on_accept")
    policy = default_policy_table().with_rows(
        {("external_event", "heartbeat"): PolicyRow(ignore, ignore)}
    )
    assert policy.resolve("external_event", True, "heartbeat").apply_mode.value == "ignore"
    assert policy.resolve("external_event", True, "order").apply_mode.value == "stage_run_start"
    async with open_runtime(policy) as rt:
        ex = ScriptedExecutor()
        s = await rt.create_session(executor=ex)
        hb = await rt.accept_with_completion(s.id, event("heartbeat", {}))
        assert isinstance(hb.outcome, Accepted)
        assert hb.outcome.state.current_state is IS.CONSUMED
        await settle(rt, s.id)
        assert ex.runs == []
        order = await rt.accept_with_completion(s.id, event("order", {"id": 7}))
        assert isinstance(await order.wait(1.0), CompletedWait)
        assert [r.input_ids for r in ex.runs] == [[order.input_id]]


async def test_s1_on_accept_without_ignore_reads_as_on_apply() -> None:
    row = PolicyRow(
        D("stage_run_start", "wake_if_idle", "fifo", "on_accept"),
        D("stage_run_start", "none", "fifo", "on_accept"),
    )
    async with open_runtime(default_policy_table().with_rows({"prompt": row})) as rt:
        ex = ScriptedExecutor(["checkpoint_then_ok"])
        s = await rt.create_session(executor=ex)
        h = await rt.accept_with_completion(s.id, PromptInput.new("x"))
        assert isinstance(h.outcome, Accepted)
        assert h.outcome.state.current_state is IS.QUEUED  # not consumed at accept
        await until(lambda: st(rt, s.id, h.input_id) is IS.CONSUMED)
        assert rt.runtime(s.id).active_run_id is not None  # consumed at apply
        assert len(ex.runs) == 1
        ex.release.set()
        await settle(rt, s.id)


# ============================================================================== S2


async def test_s2_supersession_is_in_the_acceptance_transaction() -> None:
    async with open_runtime() as rt:
        ex = ScriptedExecutor(["checkpoint_then_ok"])
        s = await rt.create_session(executor=ex)
        await parked_run(rt, s.id)
        old = PromptInput.new("v1", supersession_key="k")
        await rt.accept(s.id, old)
        store = mstore(rt, s.id)
        commits = store.commits
        n_events = len(store.events[s.id])
        new = PromptInput.new("v2", supersession_key="k")
        await rt.accept(s.id, new)
        assert store.commits == commits + 1
        codes = [e.code for e in store.events[s.id][n_events:]]
        assert codes == ["input.accepted", "input.superseded", "input.queued"]
        assert store.input_states[s.id][old.id].current_state is IS.SUPERSEDED
        ex.release.set()
        await settle(rt, s.id)


async def test_s2_supersession_key_wins_whatever_the_queue_mode() -> None:
    coalesce = D("stage_run_boundary", "none", "coalesce", "on_run_complete")
    async with open_runtime(table("external_event", coalesce)) as rt:
        ex = ScriptedExecutor()
        s = await rt.create_session(executor=ex)
        a = event("temp", 1, supersession_key="sensor-1")
        b = event("temp", 2, supersession_key="sensor-1")
        await rt.accept(s.id, a)
        await rt.accept(s.id, b)
        assert st(rt, s.id, a.id) is IS.SUPERSEDED
        assert rt.input_state(s.id, a.id).terminal_outcome.superseded_by == b.id  # type: ignore[union-attr]
        p = PromptInput.new("go")
        await rt.accept(s.id, p)
        await settle(rt, s.id)
        assert set(ex.runs[0].input_ids) == {b.id, p.id}  # nothing left to coalesce


async def test_s2_chain_and_ephemeral_scopes() -> None:
    async with open_runtime() as rt:
        ex = ScriptedExecutor(["checkpoint_then_ok"])
        s = await rt.create_session(executor=ex)
        await parked_run(rt, s.id)
        e1 = PromptInput.new("e1", supersession_key="k", durability="ephemeral")
        e2 = PromptInput.new("e2", supersession_key="k", durability="ephemeral")
        await rt.accept(s.id, e1)
        await rt.accept(s.id, e2)  # ephemeral supersedes an older ephemeral
        assert rt.input_state(s.id, e1.id).terminal_outcome.superseded_by == e2.id  # type: ignore[union-attr]
        d1 = PromptInput.new("d1", supersession_key="k")
        await rt.accept(s.id, d1)  # durable supersedes ephemeral
        assert rt.input_state(s.id, e2.id).terminal_outcome.superseded_by == d1.id  # type: ignore[union-attr]
        e3 = PromptInput.new("e3", supersession_key="k", durability="ephemeral")
        await rt.accept(s.id, e3)
        assert st(rt, s.id, d1.id) is IS.QUEUED  # never by an ephemeral one
        d2 = PromptInput.new("d2", supersession_key="k")
        await rt.accept(s.id, d2)
        assert st(rt, s.id, d1.id) is IS.SUPERSEDED and st(rt, s.id, e3.id) is IS.SUPERSEDED
        assert rt.runtime(s.id).queued_ids() == [d2.id]
        ex.release.set()
        await settle(rt, s.id)


async def test_s2_terminal_inputs_are_out_of_scope() -> None:
    async with open_runtime() as rt:
        ex = ScriptedExecutor()
        s = await rt.create_session(executor=ex)
        h = await rt.accept_with_completion(s.id, PromptInput.new("v1", supersession_key="k"))
        await h.wait(1.0)
        h2 = await rt.accept_with_completion(s.id, PromptInput.new("v2", supersession_key="k"))
        await h2.wait(1.0)
        assert st(rt, s.id, h.input_id) is IS.CONSUMED
        assert st(rt, s.id, h2.input_id) is IS.CONSUMED
        assert len(ex.runs) == 2


# ============================================================================== S3


async def test_s3_external_events_coalesce_per_event_type_under_a_custom_table() -> None:
    coalesce = D("stage_run_boundary", "none", "coalesce", "on_run_complete")
    async with open_runtime(table("external_event", coalesce)) as rt:
        ex = ScriptedExecutor()
        s = await rt.create_session(executor=ex)
        a1, b1, a2, b2, c1 = (
            event("a", {"n": 1}),
            event("b", {"n": 1}),
            event("a", {"n": 2}),
            event("b", {"n": 2}),
            event("c", {"n": 1}),
        )
        hs = {i.id: await rt.accept_with_completion(s.id, i) for i in (a1, b1, a2, b2, c1)}
        await settle(rt, s.id)
        assert ex.runs == []
        p = PromptInput.new("go")
        await rt.accept(s.id, p)
        await settle(rt, s.id)
        assert len(ex.runs) == 1
        ids = ex.runs[0].input_ids
        assert p.id in ids and c1.id in ids and len(ids) == 4
        aggs = {}
        for iid in ids:
            inp = rt.input_state(s.id, iid).persisted_input
            if iid not in (p.id, c1.id):
                assert isinstance(inp, ExternalEventInput)
                aggs[inp.event_type] = rt.input_state(s.id, iid)
        assert set(aggs) == {"a", "b"}
        assert aggs["a"].persisted_input.payload == [{"n": 1}, {"n": 2}]  # type: ignore[union-attr]
        assert aggs["a"].reconstruction_source == CoalescingSource(source_input_ids=[a1.id, a2.id])
        assert aggs["b"].reconstruction_source == CoalescingSource(source_input_ids=[b1.id, b2.id])
        assert aggs["a"].persisted_input.header.source.type == "system"  # type: ignore[union-attr]
        for src, agg in ((a1, "a"), (a2, "a"), (b1, "b"), (b2, "b")):
            state = rt.input_state(s.id, src.id)
            assert state.current_state is IS.COALESCED
            assert state.terminal_outcome.aggregate_id == aggs[agg].input_id  # type: ignore[union-attr]
            w = await hs[src.id].wait(0.5)
            assert w.via_aggregate_id == aggs[agg].input_id
        assert st(rt, s.id, c1.id) is IS.CONSUMED  # a single input is not aggregated
        assert rt.input_state(s.id, c1.id).reconstruction_source is None


async def test_s3_default_table_does_not_coalesce_external_events() -> None:
    async with open_runtime() as rt:
        ex = ScriptedExecutor(["checkpoint_then_ok"])
        s = await rt.create_session(executor=ex)
        head = await parked_run(rt, s.id)
        e1, e2 = event("a", 1), event("a", 2)
        await rt.accept(s.id, e1)
        await rt.accept(s.id, e2)
        ex.release.set()
        await head.wait(1.0)
        await settle(rt, s.id)
        assert [r.input_ids for r in ex.runs[1:]] == [[e1.id], [e2.id]]
        states = rt.list_inputs(s.id, include_terminal=True)
        assert all(x.current_state is not IS.COALESCED for x in states)
        assert len(states) == 3


async def test_s3_progress_responses_of_one_kind_merge_across_request_ids() -> None:
    async with open_runtime() as rt:
        ex = ScriptedExecutor()
        s = await rt.create_session(executor=ex)
        ps = [progress("x", "r1"), progress("y", "r2"), progress("z", "r1")]
        for p in ps:
            await rt.accept(s.id, p)
        await rt.accept(s.id, PromptInput.new("go"))
        await settle(rt, s.id)
        aggs = [x for x in rt.list_inputs(s.id, include_terminal=True) if x.reconstruction_source]
        assert len(aggs) == 1
        agg = aggs[0]
        assert agg.reconstruction_source == CoalescingSource(source_input_ids=[p.id for p in ps])
        assert json.loads(agg.persisted_input.body) == ["x", "y", "z"]  # type: ignore[union-attr]
        assert agg.persisted_input.convention == ps[-1].convention  # type: ignore[union-attr]


async def test_s3_projected_inputs_coalesce_under_a_custom_table() -> None:
    coalesce = D("stage_run_boundary", "none", "coalesce", "on_run_complete")
    async with open_runtime(table("projected", coalesce)) as rt:
        ex = ScriptedExecutor()
        s = await rt.create_session(executor=ex)
        srcs = [ProjectedInput.new("rule-1", f"ev-{i}", f"fact {i}") for i in range(2)]
        for x in srcs:
            out = await rt.accept(s.id, x)
            assert isinstance(out, Accepted)
            assert out.state.reconstruction_source == ProjectionSource(
                rule_id="rule-1", source_event_id=x.source_event_id
            )
        await rt.accept(s.id, PromptInput.new("go"))
        await settle(rt, s.id)
        assert len(ex.runs) == 1 and len(ex.runs[0].input_ids) == 2
        aggs = [
            x
            for x in rt.list_inputs(s.id, include_terminal=True)
            if x.current_state is IS.CONSUMED
            and isinstance(x.reconstruction_source, CoalescingSource)
        ]
        assert len(aggs) == 1
        agg = aggs[0]
        assert agg.reconstruction_source == CoalescingSource(source_input_ids=[x.id for x in srcs])
        assert isinstance(agg.persisted_input, ProjectedInput)
        assert agg.persisted_input.header.source.type == "system"
        assert agg.durability is not None and agg.durability.value == "durable"
        assert json.loads(agg.persisted_input.content) == ["fact 0", "fact 1"]
        assert [st(rt, s.id, x.id) for x in srcs] == [IS.COALESCED, IS.COALESCED]


# ============================================================================== S11


def _snapshot(rt: Runtime, sid: str) -> Any:
    return (
        [x.to_json_dict() for x in rt.list_inputs(sid, include_terminal=True)],
        mstore(rt, sid).snapshot(sid),
        rt.runtime(sid).queued_ids(),
        rt.runtime_state(sid),
    )


async def test_s11_same_key_other_content_is_rejected_and_changes_nothing() -> None:
    async with open_runtime() as rt:
        s = await rt.create_session(executor=ScriptedExecutor())
        first = progress("one", idempotency_key="idem")
        assert isinstance(await rt.accept(s.id, first), Accepted)
        before = _snapshot(rt, s.id)
        other = progress("two", idempotency_key="idem")
        out = await rt.accept(s.id, other)
        assert isinstance(out, Rejected)
        assert out.code.value == "idempotency_conflict"
        assert "idem" in out.reason
        assert _snapshot(rt, s.id) == before


def test_s11_content_hash_ignores_header_id_timestamp_and_correlation() -> None:
    a = PromptInput.new("same", idempotency_key="k")
    b = PromptInput.new("same", idempotency_key="k", correlation_id=CorrelationId.new())
    b = b.model_copy(
        update={
            "header": b.header.model_copy(
                update={"timestamp": a.header.timestamp + timedelta(days=1)}
            )
        }
    )
    assert a.id != b.id
    assert content_hash(a) == content_hash(b)
    assert content_hash(a) != content_hash(PromptInput.new("other", idempotency_key="k"))
    assert content_hash(a) != content_hash(PromptInput.new("same", idempotency_key="k2"))
    assert content_hash(a) != content_hash(
        PromptInput.new("same", idempotency_key="k", durability="ephemeral")
    )


async def test_s11_retry_with_new_id_timestamp_and_correlation_is_deduplicated() -> None:
    async with open_runtime() as rt:
        ex = ScriptedExecutor()
        s = await rt.create_session(executor=ex)
        a = PromptInput.new("same", idempotency_key="k")
        await rt.accept(s.id, a)
        await asyncio.sleep(0.002)
        b = PromptInput.new("same", idempotency_key="k", correlation_id=CorrelationId.new())
        out = await rt.accept(s.id, b)
        assert isinstance(out, Deduplicated) and out.existing_id == a.id
        await settle(rt, s.id)
        assert len(ex.runs) == 1


async def test_s11_key_is_released_after_the_window() -> None:
    cfg = RuntimeConfig(backoff_base=0.01, shutdown_grace=0.05, idempotency_window=timedelta(0))
    async with open_runtime(config=cfg) as rt:
        s = await rt.create_session(executor=ScriptedExecutor())
        await rt.accept(s.id, PromptInput.new("x", idempotency_key="k"))
        await asyncio.sleep(0.01)
        out = await rt.accept(s.id, PromptInput.new("x", idempotency_key="k"))
        assert isinstance(out, Accepted)
        await settle(rt, s.id)


# ============================================================================== S14


async def _assert_rejected(
    rt: Runtime, sid: str, raw: Any, code: str, *words: str, **kw: Any
) -> None:
    before = _snapshot(rt, sid)
    out = await rt.accept(sid, raw, **kw)
    assert isinstance(out, Rejected), out
    assert out.code.value == code
    assert out.reason and len(out.reason) > 10
    for w in words:
        assert w.lower() in out.reason.lower(), out.reason
    assert _snapshot(rt, sid) == before
    # the same through accept_with_completion: nothing to wait for
    h = await rt.accept_with_completion(sid, raw, **kw)
    assert isinstance(h.outcome, Rejected) and h.outcome.code.value == code
    assert _snapshot(rt, sid) == before


async def test_s14_invalid_inputs_are_rejected_without_state_change() -> None:
    async with open_runtime() as rt:
        ex = ScriptedExecutor()
        s = await rt.create_session(executor=ex)
        await rt.accept(s.id, progress("keep me"))  # something already accepted
        good = PromptInput.new("ok").to_json_dict()
        await _assert_rejected(rt, s.id, '{"input_type": "prompt", ', "invalid", "malformed json")
        await _assert_rejected(rt, s.id, b"\xff\xfe\x00", "invalid")
        await _assert_rejected(rt, s.id, "[1, 2]", "invalid")
        await _assert_rejected(
            rt, s.id, json.dumps({**good, "input_type": "telepathy"}), "invalid", "telepathy"
        )
        await _assert_rejected(
            rt, s.id, {**good, "input_type": "telepathy"}, "invalid", "telepathy"
        )
        no_text = {k: v for k, v in good.items() if k != "text"}
        await _assert_rejected(rt, s.id, no_text, "invalid", "text")
        await settle(rt, s.id)
        assert ex.runs == []


async def test_s14_invalid_durability() -> None:
    async with open_runtime() as rt:
        s = await rt.create_session(executor=ScriptedExecutor(default="none"))
        await _assert_rejected(
            rt, s.id, PromptInput.new("x", durability="derived"), "invalid_durability", "derived"
        )
        sys_from_operator = SystemGeneratedInput.new(
            "gen", "c", source=OperatorOrigin(), durability="derived"
        )
        await _assert_rejected(rt, s.id, sys_from_operator, "invalid_durability", "derived")
        derived_prompt = PromptInput.new("x", durability="derived", source=SystemOrigin())
        await _assert_rejected(rt, s.id, derived_prompt, "invalid_durability", "prompt")
        no_source = SystemGeneratedInput.new("gen", "c", durability="derived")
        await _assert_rejected(rt, s.id, no_source, "invalid_durability", "reconstruction_source")
        # with its reconstruction source the same input is accepted
        src = ProjectionSource(rule_id="r", source_event_id="ev")
        out = await rt.accept(s.id, no_source, reconstruction_source=src)
        assert isinstance(out, Accepted)
        assert rt.input_state(s.id, no_source.id).reconstruction_source == src
        await settle(rt, s.id)


async def test_s14_invalid_durability_derived_peer_message_without_convention() -> None:
    async with open_runtime() as rt:
        s = await rt.create_session(executor=ScriptedExecutor())
        msg = PeerInput.new("hi", peer_id="p", source=SystemOrigin(), durability="derived")
        src = ProjectionSource(rule_id="r", source_event_id="ev")
        await _assert_rejected(
            rt, s.id, msg, "invalid_durability", "peer_message", reconstruction_source=src
        )


async def test_s14_derived_progress_response_from_system_is_allowed() -> None:
    async with open_runtime() as rt:
        s = await rt.create_session(executor=ScriptedExecutor())
        p = PeerInput.new(
            "p",
            peer_id="p",
            source=SystemOrigin(),
            durability="derived",
            convention=ResponseProgressConvention(request_id="r", phase="accepted"),
        )
        src = ProjectionSource(rule_id="r", source_event_id="ev")
        out = await rt.accept(s.id, p, reconstruction_source=src)
        assert isinstance(out, Accepted)
        assert rt.input_state(s.id, p.id).durability.value == "derived"  # type: ignore[union-attr]


@pytest.mark.parametrize("raw", [[1, 2], 42, None])
async def test_s14_non_object_document_is_rejected_not_raised(raw: Any) -> None:
    async with open_runtime() as rt:
        s = await rt.create_session(executor=ScriptedExecutor())
        await _assert_rejected(rt, s.id, raw, "invalid")


async def test_s14_too_large() -> None:
    async with open_runtime() as rt:
        s = await rt.create_session(executor=ScriptedExecutor())
        big = PromptInput.new("x" * (1 << 20))
        await _assert_rejected(rt, s.id, big, "too_large", "1048576")
        await _assert_rejected(rt, s.id, big.to_json(), "too_large")
        await _assert_rejected(rt, s.id, big.to_json_dict(), "too_large")
        just_under = PromptInput.new("x" * ((1 << 20) - 1024))
        assert isinstance(await rt.accept(s.id, just_under), Accepted)
        await settle(rt, s.id)


async def test_s14_queue_full_drops_nothing() -> None:
    cfg = RuntimeConfig(backoff_base=0.01, shutdown_grace=0.05, max_pending_inputs=3)
    async with open_runtime(config=cfg) as rt:
        ex = ScriptedExecutor()
        s = await rt.create_session(executor=ex)
        held = [progress(f"p{i}") for i in range(3)]
        for p in held:
            assert isinstance(await rt.accept(s.id, p), Accepted)
        await _assert_rejected(rt, s.id, PromptInput.new("one too many"), "queue_full", "3")
        assert [st(rt, s.id, p.id) for p in held] == [IS.QUEUED] * 3
        await settle(rt, s.id)
        assert ex.runs == []


async def test_s14_not_ready_when_retired_or_destroyed() -> None:
    async with open_runtime() as rt:
        s1 = await rt.create_session(executor=ScriptedExecutor())
        s2 = await rt.create_session(executor=ScriptedExecutor())
        await rt.accept(s1.id, progress("before"))
        await rt.retire(s1.id)
        await _assert_rejected(rt, s1.id, PromptInput.new("x"), "not_ready", "retired")
        await rt.accept(s2.id, progress("before"))
        await rt.destroy(s2.id)
        await _assert_rejected(rt, s2.id, PromptInput.new("x"), "not_ready", "destroyed")
        assert rt.runtime_state(s2.id) is RuntimeState.DESTROYED


async def test_s14_idempotency_conflict() -> None:
    async with open_runtime() as rt:
        ex = ScriptedExecutor()
        s = await rt.create_session(executor=ex)
        h = await rt.accept_with_completion(s.id, PromptInput.new("a", idempotency_key="key-1"))
        await h.wait(1.0)
        await _assert_rejected(
            rt, s.id, PromptInput.new("b", idempotency_key="key-1"), "idempotency_conflict", "key-1"
        )
        await settle(rt, s.id)
        assert len(ex.runs) == 1


# ============================================================================== S17


async def test_s17_prompt_sent_during_a_run_is_answered_by_the_next_run() -> None:
    async with open_runtime() as rt:
        ex = ScriptedExecutor(["checkpoint_then_ok"])
        s = await rt.create_session(executor=ex)
        head = await parked_run(rt, s.id)
        follow = await rt.accept_with_completion(s.id, PromptInput.new("follow-up"))
        ex.release.set()
        await head.wait(1.0)
        out = await follow.wait(1.0)
        assert ex.runs[0].joined == []  # not joined at the checkpoints
        assert ex.runs[1].input_ids == [follow.input_id]
        assert isinstance(out, CompletedWait) and out.result.text == "done:follow-up"
        assert rt.input_state(s.id, follow.input_id).last_run_id == ex.runs[1].run_id


async def test_s17_progress_response_never_starts_a_run_on_its_own() -> None:
    async with open_runtime() as rt:
        ex = GateExecutor()
        s = await rt.create_session(executor=ex)
        head = await rt.accept_with_completion(s.id, PromptInput.new("first"))
        await until(lambda: len(ex.runs) == 1)
        p = progress("halfway")
        await rt.accept(s.id, p)
        ex.gate.set()
        await head.wait(1.0)
        await settle(rt, s.id)
        await asyncio.sleep(0.02)
        assert len(ex.runs) == 1  # the run ended; the progress response alone starts none
        assert st(rt, s.id, p.id) is IS.QUEUED
        assert rt.runtime_state(s.id) is RuntimeState.IDLE


async def test_s17_stage_run_boundary_inputs_join_the_next_run_start_boundary() -> None:
    async with open_runtime() as rt:
        ex = GateExecutor()
        ex.gate.set()
        s = await rt.create_session(executor=ex)
        p = progress("queued progress")
        await rt.accept(s.id, p)
        await settle(rt, s.id)
        assert ex.runs == []
        prompt = PromptInput.new("go")
        await rt.accept(s.id, prompt)
        await settle(rt, s.id)
        assert len(ex.runs) == 1
        run_id, ids = ex.runs[0]
        assert set(ids) == {p.id, prompt.id}
        receipt = mstore(rt, s.id).receipts[(s.id, run_id, 0)]
        assert receipt.boundary.value == "run_start"
        assert set(receipt.contributing_input_ids) == {p.id, prompt.id}
        assert st(rt, s.id, p.id) is IS.CONSUMED


async def test_s17_as_if_idle_wake_starts_the_next_run() -> None:
    async with open_runtime() as rt:
        ex = GateExecutor()
        s = await rt.create_session(executor=ex)
        head = await rt.accept_with_completion(s.id, PromptInput.new("first"))
        await until(lambda: len(ex.runs) == 1)
        msg = PeerInput.new("ping", peer_id="peer-c")  # running: no wake; idle: wakes
        hm = await rt.accept_with_completion(s.id, msg)
        assert st(rt, s.id, msg.id) is IS.QUEUED
        ex.gate.set()
        await head.wait(1.0)
        out = await hm.wait(1.0)
        assert isinstance(out, CompletedWait)
        assert [ids for _, ids in ex.runs] == [[head.input_id], [msg.id]]


async def test_s17_one_head_per_run() -> None:
    async with open_runtime() as rt:
        ex = ScriptedExecutor(["checkpoint_then_ok"])
        s = await rt.create_session(executor=ex)
        head = await parked_run(rt, s.id)
        ps = [PromptInput.new(f"p{i}") for i in range(3)]
        for p in ps:
            await rt.accept(s.id, p)
        ex.release.set()
        await head.wait(1.0)
        await settle(rt, s.id)
        assert [r.input_ids for r in ex.runs[1:]] == [[p.id] for p in ps]
