"""Lifecycle rules of the spec (S4, S5, S6, S8, S9, S12, S13, S15, S16, S17, S19) against the
in-memory store, driven through the public ``Runtime`` API with scripted executors.

Each test is named after the rule it checks. Runs are made to fail, hang, checkpoint or wait by
``ScriptedExecutor`` (tests/helpers.py) or, where a test needs finer control (gates between the
steps of one run, slow cancellation), by the small ``FnExecutor`` defined here.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from meerkat_runtime import (
    InputLifecycleState,
    InvalidOperationError,
    PolicyRow,
    PolicyTable,
    ProjectedInput,
    PromptInput,
    Rebuilders,
    RunResult,
    Runtime,
    RuntimeConfig,
    RuntimeState,
    SystemGeneratedInput,
)
from meerkat_runtime._ids import InputId, RunId
from meerkat_runtime.core.lifecycle import RunApplyBoundary, RunCancelled, RunContext
from meerkat_runtime.errors import InputRejectedError, RuntimeClosedError
from meerkat_runtime.host import CompletionHandle
from meerkat_runtime.runtime.completion import CompletionRegistry
from meerkat_runtime.runtime.events import RuntimeEventEnvelope
from meerkat_runtime.runtime.input_state import InputAbandonReason, InputState
from meerkat_runtime.runtime.inputs import (
    MessageConvention,
    PeerInput,
    ResponseProgressConvention,
    ResponseProgressPhase,
    ResponseTerminalConvention,
    ResponseTerminalStatus,
)
from meerkat_runtime.runtime.outcomes import (
    AbandonedWait,
    Accepted,
    CancelledWait,
    CompletedWait,
    CompletedWithoutResultWait,
    RejectCode,
    Rejected,
    SupersededWait,
    TerminatedWait,
    wait_outcome_adapter,
)
from meerkat_runtime.store.base import Txn
from tests.helpers import ScriptedExecutor, messages_from, settle

IS = InputLifecycleState
AR = InputAbandonReason


# ----------------------------------------------------------------------------- helpers


def cfg(**kw: Any) -> RuntimeConfig:
    """Fast retries and no shutdown grace unless a test asks for them."""
    base: dict[str, Any] = {"backoff_base": 0.01, "backoff_max": 0.05, "shutdown_grace": 0.0}
    base.update(kw)
    return RuntimeConfig(**base)


@pytest.fixture
async def rt() -> AsyncIterator[Runtime]:
    r = Runtime.open("memory://", config=cfg())
    try:
        yield r
    finally:
        await r.close(grace=0)


async def until(pred: Callable[[], bool], what: str, timeout: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


def prompt(text: str, **header: Any) -> PromptInput:
    return PromptInput.new(text, **header)


def peer_message(body: str) -> PeerInput:
    return PeerInput.new(body, peer_id="peer-a", convention=MessageConvention())


def terminal_response(body: str, request_id: str = "req-1") -> PeerInput:
    conv = ResponseTerminalConvention(
        request_id=request_id, status=ResponseTerminalStatus.COMPLETED
    )
    return PeerInput.new(body, peer_id="peer-a", convention=conv)


def progress_response(body: str, request_id: str = "req-1") -> PeerInput:
    conv = ResponseProgressConvention(
        request_id=request_id, phase=ResponseProgressPhase.IN_PROGRESS
    )
    return PeerInput.new(body, peer_id="peer-a", convention=conv)


async def accept_ok(rt: Runtime, sid: str, inp: Any) -> InputId:
    out = await rt.accept(sid, inp)
    assert isinstance(out, Accepted), out
    return out.input_id


async def submit(rt: Runtime, sid: str, inp: Any) -> CompletionHandle:
    h = await rt.accept_with_completion(sid, inp)
    assert isinstance(h.outcome, Accepted), h.outcome
    return h


def st(rt: Runtime, sid: str, iid: InputId) -> InputState:
    return rt.input_state(sid, iid)


async def applied(rt: Runtime, sid: str, iid: InputId) -> None:
    """Wait until ``iid``'s boundary is committed (it is applied_pending_consumption)."""
    await until(
        lambda: st(rt, sid, iid).current_state is IS.APPLIED_PENDING_CONSUMPTION, "boundary"
    )


def abandon_reason(s: InputState) -> AR | None:
    out = s.terminal_outcome
    return getattr(out, "reason", None)


async def all_events(rt: Runtime, sid: str, after: int = 0) -> list[RuntimeEventEnvelope]:
    return [e async for e in rt.events(sid, after_seq=after)]


def codes(events: list[RuntimeEventEnvelope]) -> list[str]:
    return [e.code for e in events]


def events_now(rt: Runtime, sid: str) -> list[RuntimeEventEnvelope]:
    return list(rt.runtime(sid)._events)


def rows_naming(rt: Runtime, sid: str, iid: InputId) -> list[Any]:
    return [r for r in rt.runtime(sid).conversation.rows if iid in r.input_ids]


def history_to(s: InputState) -> list[str]:
    return [h.to.value for h in s.history]


Step = Callable[[RunContext], Awaitable[RunResult | None]]


async def ok_step(run: RunContext) -> RunResult | None:
    await run.commit_boundary(messages_from(run.primitive))
    return RunResult(text="ok")


class FnExecutor:
    """An executor whose runs are given as coroutine functions (one per run, then ``ok_step``).

    Records each run context, the enter/exit order of ``apply`` and the highest number of
    concurrent ``apply`` calls (the "one run at a time" check)."""

    def __init__(self, *steps: Step, default: Step = ok_step) -> None:
        self.steps = list(steps)
        self.default = default
        self.runs: list[RunContext] = []
        self.log: list[tuple[str, Any]] = []
        self.active = 0
        self.max_active = 0
        self.entered = asyncio.Event()

    async def apply(self, run: RunContext) -> RunResult | None:
        step = self.steps.pop(0) if self.steps else self.default
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.runs.append(run)
        self.log.append(("enter", run.run_id))
        self.entered.set()
        try:
            return await step(run)
        finally:
            self.active -= 1
            self.log.append(("exit", run.run_id))


def contributing(run: RunContext) -> list[InputId]:
    return list(run.primitive.contributing_input_ids)


@dataclass
class TxnRecord:
    """What one store transaction held, snapshotted at submit (the Txn holds live objects)."""

    states: dict[InputId, str]
    reasons: dict[InputId, str | None]
    row_input_ids: list[tuple[InputId, ...]]
    row_roles: list[str]
    receipts: list[tuple[RunId, str, list[InputId]]]
    runs: dict[RunId, str]
    runtime_state: str | None
    conversation_reset: bool
    durable: bool
    events: list[RuntimeEventEnvelope] = field(default_factory=list)

    @property
    def event_codes(self) -> list[str]:
        return [e.code for e in self.events]


def spy_store(rt: Runtime, delay: float = 0.0) -> list[TxnRecord]:
    """Record every transaction handed to the store; with ``delay``, report durability only
    after ``delay`` seconds (the store applies it at once)."""
    store = rt.store
    orig = store.submit
    records: list[TxnRecord] = []

    def submit(txn: Txn) -> Any:
        records.append(
            TxnRecord(
                states={k: v.current_state.value for k, v in txn.states.items()},
                reasons={
                    k: getattr(v.terminal_outcome, "reason", None) for k, v in txn.states.items()
                },
                row_input_ids=[r.input_ids for r in txn.rows],
                row_roles=[r.message.role for r in txn.rows],
                receipts=[
                    (r.run_id, r.boundary.value, list(r.contributing_input_ids))
                    for r in txn.receipts
                ],
                runs={r.run_id: r.status for r in txn.runs},
                runtime_state=txn.runtime_state.value if txn.runtime_state is not None else None,
                conversation_reset=txn.conversation_reset,
                durable=txn.durable,
                events=list(txn.events),
            )
        )
        fut = orig(txn)
        if delay <= 0:
            return fut
        loop = asyncio.get_running_loop()
        late: asyncio.Future[None] = loop.create_future()
        loop.call_later(delay, lambda: late.done() or late.set_result(None))
        return late

    store.submit = submit  # type: ignore[method-assign]
    return records


# ============================================================================ S4 failed runs


async def test_s4_failed_run_puts_head_back_at_front_with_backoff_later_inputs_wait() -> None:
    gate = asyncio.Event()

    async def fail_when_released(run: RunContext) -> RunResult | None:
        await run.guard(gate.wait())
        raise RuntimeError("model unavailable")

    ex = FnExecutor(fail_when_released)
    async with Runtime.open("memory://", config=cfg(backoff_base=0.15, backoff_max=0.15)) as rt:
        sid = (await rt.create_session(executor=ex)).id
        sr = rt.runtime(sid)
        p1 = await accept_ok(rt, sid, prompt("first"))
        await until(lambda: len(ex.runs) == 1, "first run")
        p2 = await accept_ok(rt, sid, prompt("second, accepted during the failing run"))
        assert sr.queued_ids() == [p2]
        gate.set()
        await until(lambda: sr.paused_for is not None, "retry pause")

        # head back at the FRONT, ahead of the input accepted during the failed run
        assert sr.queued_ids() == [p1, p2]
        s1 = st(rt, sid, p1)
        assert s1.current_state is IS.QUEUED
        assert s1.attempt_count == 1
        assert history_to(s1)[-2:] == ["staged", "queued"]
        assert "model unavailable" in (s1.history[-1].reason or "")
        retry = [e for e in events_now(rt, sid) if e.code == "run.retry_scheduled"]
        assert len(retry) == 1
        data = retry[0].event["data"]
        assert data["input_id"] == str(p1)
        assert data["attempt"] == 1
        assert data["delay_ms"] == 150
        assert rt.runtime_state(sid) is RuntimeState.IDLE

        # during the pause nothing runs, p2 included
        await asyncio.sleep(0.05)
        assert len(ex.runs) == 1
        assert st(rt, sid, p2).current_state is IS.QUEUED

        await settle(rt, sid)
        assert [contributing(r) for r in ex.runs] == [[p1], [p1], [p2]]
        assert st(rt, sid, p1).current_state is IS.CONSUMED
        assert st(rt, sid, p2).current_state is IS.CONSUMED
        assert st(rt, sid, p1).attempt_count == 1


async def test_s4_retry_budget_exceeded_after_max_attempts(rt: Runtime) -> None:
    ex = ScriptedExecutor(["fail_before", "fail_before", "fail_before"])
    sid = (await rt.create_session(executor=ex)).id
    h1 = await submit(rt, sid, prompt("doomed"))
    h2 = await submit(rt, sid, prompt("waits behind"))
    out1 = await h1.wait(2)
    assert isinstance(out1, AbandonedWait)
    assert out1.reason is AR.RETRY_BUDGET_EXCEEDED
    assert out1.error == "boom before boundary"
    s1 = st(rt, sid, h1.input_id)
    assert s1.current_state is IS.ABANDONED
    assert s1.attempt_count == 3
    assert "boom before boundary" in (s1.history[-1].reason or "")
    out2 = await h2.wait(2)
    assert isinstance(out2, CompletedWait)
    # three attempts of the head, and only then the later input
    assert [r.input_ids for r in ex.runs] == [[h1.input_id]] * 3 + [[h2.input_id]]
    evs = events_now(rt, sid)
    assert sum(e.code == "run.retry_scheduled" for e in evs) == 2
    assert sum(e.code == "run.failed" for e in evs) == 3


async def test_s4_max_attempts_is_configurable() -> None:
    ex = ScriptedExecutor(["fail_before"] * 5)
    async with Runtime.open("memory://", config=cfg(max_attempts=1)) as rt:
        sid = (await rt.create_session(executor=ex)).id
        h = await submit(rt, sid, prompt("one shot"))
        out = await h.wait(2)
        assert isinstance(out, AbandonedWait)
        assert out.reason is AR.RETRY_BUDGET_EXCEEDED
        assert len(ex.runs) == 1


async def test_s4_permanent_failure_abandons_at_once_with_error(rt: Runtime) -> None:
    ex = ScriptedExecutor(["fail_before_permanent"])
    sid = (await rt.create_session(executor=ex)).id
    h1 = await submit(rt, sid, prompt("bad request"))
    h2 = await submit(rt, sid, prompt("next"))
    out = await h1.wait(2)
    assert isinstance(out, AbandonedWait)
    assert out.reason is AR.FAILED
    assert out.error == "boom before boundary"
    assert out.to_json_dict() == {
        "outcome_type": "abandoned",
        "input_id": str(h1.input_id),
        "reason": "failed",
        "error": "boom before boundary",
    }
    s1 = st(rt, sid, h1.input_id)
    assert s1.attempt_count == 1
    assert s1.history[-1].to is IS.ABANDONED
    assert "boom before boundary" in (s1.history[-1].reason or "")
    assert isinstance(await h2.wait(2), CompletedWait)
    assert [r.input_ids for r in ex.runs] == [[h1.input_id], [h2.input_id]]
    evs = events_now(rt, sid)
    assert not any(e.code == "run.retry_scheduled" for e in evs)
    failed = [e for e in evs if e.code == "run.failed"]
    assert failed[0].event["data"]["recoverable"] is False
    assert failed[0].event["data"]["error"] == "boom before boundary"


async def test_s4_cancel_during_backoff_pause_ends_it() -> None:
    ex = ScriptedExecutor(["fail_before"])
    async with Runtime.open("memory://", config=cfg(backoff_base=5.0, backoff_max=5.0)) as rt:
        sid = (await rt.create_session(executor=ex)).id
        sr = rt.runtime(sid)
        h1 = await submit(rt, sid, prompt("retrying"))
        await until(lambda: sr.paused_for is not None, "retry pause")
        h2 = await submit(rt, sid, prompt("behind it"))
        assert sr.queued_ids() == [h1.input_id, h2.input_id]
        t0 = time.monotonic()
        assert await rt.cancel(sid) is True
        out1 = await h1.wait(1)
        s1 = st(rt, sid, h1.input_id)
        assert s1.current_state is IS.ABANDONED
        assert abandon_reason(s1) is AR.CANCELLED
        assert out1.outcome_type in ("cancelled", "abandoned")
        if isinstance(out1, AbandonedWait):
            assert out1.reason is AR.CANCELLED
        # the pause is over: the later input runs now, not after 5 s
        assert isinstance(await h2.wait(1), CompletedWait)
        assert time.monotonic() - t0 < 1.0
        assert sr.paused_for is None
        assert [r.input_ids for r in ex.runs] == [[h1.input_id], [h2.input_id]]


async def test_s4_cancel_during_pause_targets_the_retrying_input_not_a_priority_newcomer() -> None:
    ex = ScriptedExecutor(["fail_before"])
    async with Runtime.open("memory://", config=cfg(backoff_base=5.0, backoff_max=5.0)) as rt:
        sid = (await rt.create_session(executor=ex)).id
        sr = rt.runtime(sid)
        p1 = await accept_ok(rt, sid, prompt("retrying"))
        await until(lambda: sr.paused_for is not None, "retry pause")
        # a system notice (inject_now, queue mode none = priority lane) arrives in the pause
        sys_in = SystemGeneratedInput.new("scheduler", "it is noon")
        s_id = await accept_ok(rt, sid, sys_in)
        assert await rt.cancel(sid) is True
        assert abandon_reason(st(rt, sid, p1)) is AR.CANCELLED
        assert st(rt, sid, s_id).current_state is not IS.ABANDONED


async def test_s4_reset_during_backoff_pause_ends_it() -> None:
    ex = ScriptedExecutor(["fail_before"])
    async with Runtime.open("memory://", config=cfg(backoff_base=5.0, backoff_max=5.0)) as rt:
        sid = (await rt.create_session(executor=ex)).id
        sr = rt.runtime(sid)
        h1 = await submit(rt, sid, prompt("retrying"))
        await until(lambda: sr.paused_for is not None, "retry pause")
        res = await rt.reset(sid)
        assert res == {"inputs_abandoned": 1}
        out = await h1.wait(1)
        assert isinstance(out, AbandonedWait) and out.reason is AR.RESET
        assert sr.paused_for is None
        h2 = await submit(rt, sid, prompt("after reset"))
        assert isinstance(await h2.wait(1), CompletedWait)
        assert len(ex.runs) == 2


async def test_s4_retire_during_backoff_pause_ends_it() -> None:
    ex = ScriptedExecutor(["fail_before"])
    async with Runtime.open("memory://", config=cfg(backoff_base=5.0, backoff_max=5.0)) as rt:
        sid = (await rt.create_session(executor=ex)).id
        sr = rt.runtime(sid)
        h1 = await submit(rt, sid, prompt("retrying"))
        await until(lambda: sr.paused_for is not None, "retry pause")
        res = await rt.retire(sid)
        assert res["inputs_abandoned"] == 1
        out = await h1.wait(1)
        assert isinstance(out, AbandonedWait) and out.reason is AR.RETIRED
        assert sr.paused_for is None
        assert len(ex.runs) == 1


async def test_s4_retire_for_respawn_during_pause_ends_it_and_the_head_runs_after_respawn() -> None:
    ex = ScriptedExecutor(["fail_before"])
    async with Runtime.open("memory://", config=cfg(backoff_base=5.0, backoff_max=5.0)) as rt:
        sid = (await rt.create_session(executor=ex)).id
        sr = rt.runtime(sid)
        h1 = await submit(rt, sid, prompt("retrying"))
        await until(lambda: sr.paused_for is not None, "retry pause")
        assert (await rt.retire(sid, replacement_planned=True))["inputs_abandoned"] == 0
        assert sr.paused_for is None
        assert st(rt, sid, h1.input_id).current_state is IS.QUEUED
        t0 = time.monotonic()
        await rt.respawn(sid)
        out = await h1.wait(1)
        assert isinstance(out, CompletedWait)
        assert time.monotonic() - t0 < 1.0
        assert st(rt, sid, h1.input_id).attempt_count == 1


# ============================================================================ S5 applied = applied


async def test_s5_failure_after_boundary_schedules_a_continuation_no_duplicate_rows(
    rt: Runtime,
) -> None:
    ex = ScriptedExecutor(["fail_after", "ok"])
    sid = (await rt.create_session(executor=ex)).id
    h = await submit(rt, sid, prompt("do it once"))
    out = await h.wait(2)
    assert isinstance(out, CompletedWait)
    assert len(ex.runs) == 2
    first, cont = ex.runs
    assert first.is_continuation is False and first.input_ids == [h.input_id]
    assert cont.is_continuation is True
    assert cont.input_ids == []
    assert cont.texts == []  # no appends in a continuation
    s = st(rt, sid, h.input_id)
    assert s.current_state is IS.CONSUMED
    assert s.last_run_id == cont.run_id
    assert s.attempt_count == 1
    # never queued again after being applied
    hist = history_to(s)
    assert hist == ["queued", "staged", "applied", "applied_pending_consumption", "consumed"]
    assert len(rows_naming(rt, sid, h.input_id)) == 1
    stored = [r for r in rt.store.conversations[sid] if h.input_id in r.input_ids]
    assert len(stored) == 1
    evs = codes(events_now(rt, sid))
    assert "run.continuation_scheduled" in evs
    assert "run.retry_scheduled" not in evs


async def test_s5_inputs_stay_applied_pending_consumption_during_the_continuation_pause() -> None:
    ex = ScriptedExecutor(["fail_after", "ok"])
    async with Runtime.open("memory://", config=cfg(backoff_base=0.2, backoff_max=0.2)) as rt:
        sid = (await rt.create_session(executor=ex)).id
        sr = rt.runtime(sid)
        p1 = await accept_ok(rt, sid, prompt("applied"))
        await until(lambda: sr.paused_for is not None, "continuation pause")
        assert st(rt, sid, p1).current_state is IS.APPLIED_PENDING_CONSUMPTION
        assert p1 not in sr.queued_ids()
        # a prompt arriving in the pause waits behind the continuation
        p2 = await accept_ok(rt, sid, prompt("later"))
        await settle(rt, sid)
        assert [(r.is_continuation, r.input_ids) for r in ex.runs] == [
            (False, [p1]),
            (True, []),
            (False, [p2]),
        ]
        assert st(rt, sid, p1).current_state is IS.CONSUMED
        assert len(rows_naming(rt, sid, p1)) == 1
        assert len(rows_naming(rt, sid, p2)) == 1


async def test_s5_repeated_failures_after_boundary_spend_the_attempts(rt: Runtime) -> None:
    ex = ScriptedExecutor(["fail_after", "fail_after", "fail_after", "ok"])
    sid = (await rt.create_session(executor=ex)).id
    h = await submit(rt, sid, prompt("flaky"))
    out = await h.wait(2)
    assert isinstance(out, AbandonedWait)
    assert out.reason is AR.RETRY_BUDGET_EXCEEDED
    assert out.error == "boom after boundary"
    await settle(rt, sid)
    assert [r.is_continuation for r in ex.runs] == [False, True, True]
    s = st(rt, sid, h.input_id)
    assert s.attempt_count == 3
    assert "queued" not in history_to(s)[1:]
    assert len(rows_naming(rt, sid, h.input_id)) == 1
    # a spent input leaves no continuation behind
    assert ex.steps == ["ok"]


async def test_s5_permanent_failure_after_boundary_abandons_failed(rt: Runtime) -> None:
    ex = ScriptedExecutor(["fail_after_permanent"])
    sid = (await rt.create_session(executor=ex)).id
    h = await submit(rt, sid, prompt("bad"))
    out = await h.wait(2)
    assert isinstance(out, AbandonedWait)
    assert out.reason is AR.FAILED and out.error == "boom after boundary"
    await settle(rt, sid)
    assert len(ex.runs) == 1
    assert len(rows_naming(rt, sid, h.input_id)) == 1


async def test_s5_cancel_during_continuation_pause_answers_cancelled() -> None:
    ex = ScriptedExecutor(["fail_after"])
    async with Runtime.open("memory://", config=cfg(backoff_base=5.0, backoff_max=5.0)) as rt:
        sid = (await rt.create_session(executor=ex)).id
        sr = rt.runtime(sid)
        h = await submit(rt, sid, prompt("applied, then failed"))
        await until(lambda: sr.paused_for is not None, "continuation pause")
        assert await rt.cancel(sid) is True
        out = await h.wait(1)
        assert st(rt, sid, h.input_id).current_state is IS.CONSUMED
        assert isinstance(out, CancelledWait), out


# ============================================================================ S6 atomic commits


async def test_s6_durable_accept_is_committed_before_accept_returns(rt: Runtime) -> None:
    ex = ScriptedExecutor()
    sid = (await rt.create_session(executor=ex)).id
    records = spy_store(rt, delay=0.05)
    t0 = time.monotonic()
    out = await rt.accept(sid, prompt("persist me"))
    elapsed = time.monotonic() - t0
    assert isinstance(out, Accepted)
    # accept waited for the store to report durability
    assert elapsed >= 0.04
    first = records[0]
    assert first.durable is True
    assert first.states[out.input_id] == "queued"
    assert first.event_codes == ["input.accepted", "input.queued"]
    assert rt.store.input_states[sid][out.input_id].current_state in (IS.QUEUED, IS.STAGED)


async def test_s6_boundary_checkpoint_and_completion_are_one_transaction_each(rt: Runtime) -> None:
    ex = ScriptedExecutor(["checkpoint_then_ok"])
    sid = (await rt.create_session(executor=ex)).id
    records = spy_store(rt)
    p1 = await accept_ok(rt, sid, prompt("hello"))
    await applied(rt, sid, p1)
    t1 = await accept_ok(rt, sid, terminal_response("answer"))
    ex.release.set()
    await settle(rt, sid)
    run_id = ex.runs[0].run_id

    # boundary: rows + receipt + applied input states + events, one txn
    bnd = [r for r in records if any(b == "run_start" for _, b, _ in r.receipts)]
    assert len(bnd) == 1
    b = bnd[0]
    assert b.durable
    assert b.receipts == [(run_id, "run_start", [p1])]
    assert (p1,) in b.row_input_ids
    assert b.states == {p1: "applied_pending_consumption"}
    assert "input.applied" in b.event_codes and "run.boundary_applied" in b.event_codes

    # checkpoints: the first stages the joiner (and commits the assistant row); the second
    # commits the joiner's rows with its applied state and a receipt naming it
    cps = [r for r in records if any(b == "run_checkpoint" for _, b, _ in r.receipts)]
    assert len(cps) == 2
    assert cps[0].row_roles == ["assistant"]
    assert cps[0].states == {t1: "staged"}
    assert cps[1].receipts == [(run_id, "run_checkpoint", [t1])]
    assert (t1,) in cps[1].row_input_ids
    assert cps[1].states == {t1: "applied_pending_consumption"}
    assert "input.applied" in cps[1].event_codes and "run.checkpoint" in cps[1].event_codes

    # completion: last delta + consumed states + run record + runtime state, one txn
    comp = [r for r in records if r.runs.get(run_id) == "completed"]
    assert len(comp) == 1
    c = comp[0]
    assert c.states == {p1: "consumed", t1: "consumed"}
    assert c.row_roles == ["assistant"]
    assert c.runtime_state == "idle"
    assert {"input.consumed", "run.completed", "runtime.state_changed"} <= set(c.event_codes)
    # the stored copy matches
    assert rt.store.runs[run_id].status == "completed"
    assert rt.store.runtime_states[sid] is RuntimeState.IDLE


def _check_events_ride_with_their_change(records: list[TxnRecord]) -> int:
    checked = 0
    for rec in records:
        for e in rec.events:
            data = e.event.get("data") or {}
            cat = e.event["category"]
            if cat == "input_lifecycle" and data["code"] != "deduplicated":
                assert InputId(data["input_id"]) in rec.states, (e.code, rec)
                checked += 1
            elif cat == "runtime_state_change":
                assert rec.runtime_state == data["to"], (e.event, rec)
                checked += 1
            elif cat == "run_lifecycle" and data["code"] in (
                "started",
                "completed",
                "failed",
                "cancelled",
            ):
                assert RunId(data["run_id"]) in rec.runs, (e.code, rec)
                checked += 1
            elif cat == "run_lifecycle" and data["code"] in ("boundary_applied", "checkpoint"):
                assert any(r[0] == RunId(data["run_id"]) for r in rec.receipts), (e.code, rec)
                checked += 1
    return checked


async def test_s6_every_event_is_in_the_same_transaction_as_its_change(rt: Runtime) -> None:
    ex = ScriptedExecutor(["fail_before", "fail_after", "ok", "hang", "checkpoint_then_ok"])
    sid = (await rt.create_session(executor=ex)).id
    records = spy_store(rt)
    h1 = await submit(rt, sid, prompt("one"))
    await h1.wait(2)
    h2 = await submit(rt, sid, prompt("two (hangs)"))
    await until(lambda: len(ex.runs) == 4, "hanging run")
    await rt.cancel(sid)
    await h2.wait(2)
    h3 = await submit(rt, sid, prompt("three"))
    await until(lambda: len(ex.runs) == 5, "checkpoint run")
    await accept_ok(rt, sid, terminal_response("joins"))
    ex.release.set()
    await h3.wait(2)
    await rt.retire(sid, replacement_planned=True)
    await rt.respawn(sid)
    await accept_ok(rt, sid, prompt("four"))
    await accept_ok(rt, sid, prompt("five"))
    await rt.reset(sid)
    await settle(rt, sid)
    assert _check_events_ride_with_their_change(records) > 40
    # and the store holds exactly the events that were published, in seq order
    stored = [e.seq for e in rt.store.events[sid]]
    assert stored == list(range(1, len(stored) + 1))
    assert stored[-1] == rt.runtime(sid).last_seq


async def test_s6_reset_clears_conversation_in_the_abandoning_transaction(rt: Runtime) -> None:
    ex = ScriptedExecutor(["ok", "hang"])
    sid = (await rt.create_session(executor=ex)).id
    await (await submit(rt, sid, prompt("remember me"))).wait(2)
    p2 = await accept_ok(rt, sid, prompt("hangs"))
    await until(lambda: len(ex.runs) == 2, "second run")
    p3 = await accept_ok(rt, sid, prompt("queued"))
    records = spy_store(rt)
    await rt.reset(sid)
    resets = [r for r in records if r.conversation_reset]
    assert len(resets) == 1
    r = resets[0]
    assert r.states == {p2: "abandoned", p3: "abandoned"}
    assert set(r.reasons.values()) == {AR.RESET}
    assert r.runs.get(ex.runs[1].run_id) == "cancelled"
    assert rt.store.conversations[sid] == []


# ============================================================================ S8 cancel and stop


async def test_s8_cancel_reaches_the_executor_at_its_next_await_without_a_queue_drain(
    rt: Runtime,
) -> None:
    ex = ScriptedExecutor(["hang"])
    sid = (await rt.create_session(executor=ex)).id
    sr = rt.runtime(sid)
    h1 = await submit(rt, sid, prompt("long"))
    await until(lambda: len(ex.runs) == 1, "run start")
    await applied(rt, sid, h1.input_id)
    later = [await accept_ok(rt, sid, prompt(f"queued {i}")) for i in range(5)]
    assert sr.queued_ids() == later
    t0 = time.monotonic()
    assert await rt.cancel(sid, "user pressed stop") is True
    await until(lambda: ex.runs[0].outcome == "RunCancelled", "executor sees cancel", 0.5)
    assert time.monotonic() - t0 < 0.2
    out = await h1.wait(1)
    assert isinstance(out, CancelledWait)
    s1 = st(rt, sid, h1.input_id)
    assert s1.current_state is IS.CONSUMED
    assert rt.runtime(sid).runs[s1.last_run_id].status == "cancelled"  # type: ignore[index]
    evs = events_now(rt, sid)
    cancelled = [e for e in evs if e.code == "run.cancelled"]
    assert cancelled and cancelled[0].event["data"]["reason"] == "user pressed stop"
    # the queued inputs were not drained by the cancel; S17 starts the next run
    await settle(rt, sid)
    assert all(st(rt, sid, i).current_state is IS.CONSUMED for i in later)
    assert [r.input_ids for r in ex.runs[1:]] == [[i] for i in later]
    assert rt.runtime_state(sid) is RuntimeState.IDLE


async def test_s8_cancel_before_boundary_abandons_run_start_input_cancelled(rt: Runtime) -> None:
    ex = ScriptedExecutor(["hang_before"])
    sid = (await rt.create_session(executor=ex)).id
    h = await submit(rt, sid, prompt("not yet applied"))
    await until(lambda: len(ex.runs) == 1, "run start")
    assert st(rt, sid, h.input_id).current_state is IS.STAGED
    assert await rt.cancel(sid) is True
    out = await h.wait(1)
    s = st(rt, sid, h.input_id)
    assert s.current_state is IS.ABANDONED
    assert abandon_reason(s) is AR.CANCELLED
    assert isinstance(out, CancelledWait)
    assert rows_naming(rt, sid, h.input_id) == []
    assert rt.runtime_state(sid) is RuntimeState.IDLE


async def test_s8_uncommitted_checkpoint_joiners_return_to_the_front_of_the_queue(
    rt: Runtime,
) -> None:
    release = asyncio.Event()
    joined: list[list[InputId]] = []

    async def checkpoint_then_hang(run: RunContext) -> RunResult | None:
        await run.commit_boundary(messages_from(run.primitive))
        await run.guard(release.wait())
        staged = await run.checkpoint()
        joined.append(list(staged.contributing_input_ids) if staged else [])
        await run.guard(asyncio.sleep(3600))
        return None

    ex = FnExecutor(checkpoint_then_hang)
    sid = (await rt.create_session(executor=ex)).id
    sr = rt.runtime(sid)
    p1 = await accept_ok(rt, sid, prompt("runs"))
    await until(lambda: len(ex.runs) == 1, "run start")
    t1 = await accept_ok(rt, sid, terminal_response("joins at checkpoint"))
    p2 = await accept_ok(rt, sid, prompt("waits for the next run"))
    release.set()
    await until(lambda: joined == [[t1]], "checkpoint joined t1")
    assert st(rt, sid, t1).current_state is IS.STAGED
    assert sr.queued_ids() == [p2]
    await rt.cancel(sid)
    await settle(rt, sid)
    s_t1 = st(rt, sid, t1)
    assert history_to(s_t1)[:4] == ["queued", "staged", "queued", "staged"]
    # back at the FRONT: the next run lists it before p2
    assert contributing(ex.runs[1]) == [t1, p2]
    assert st(rt, sid, p1).current_state is IS.CONSUMED
    assert s_t1.current_state is IS.CONSUMED
    assert len(rows_naming(rt, sid, t1)) == 1


async def test_s8_cancel_with_no_active_run_does_nothing_and_is_not_remembered(
    rt: Runtime,
) -> None:
    ex = ScriptedExecutor()
    sid = (await rt.create_session(executor=ex)).id
    before = rt.runtime(sid).last_seq
    assert await rt.cancel(sid) is False
    assert rt.runtime(sid).last_seq == before
    h = await submit(rt, sid, prompt("after a stray cancel"))
    out = await h.wait(1)
    assert isinstance(out, CompletedWait)
    assert ex.runs[0].outcome == "completed"
    assert "run.cancelled" not in codes(events_now(rt, sid))


async def test_s8_stop_leaves_instance_stopped_waiters_terminated_inputs_untouched(
    rt: Runtime,
) -> None:
    ex = ScriptedExecutor(["hang"])
    sid = (await rt.create_session(executor=ex)).id
    h1 = await submit(rt, sid, prompt("applied"))
    await applied(rt, sid, h1.input_id)
    h2 = await submit(rt, sid, prompt("queued"))
    rt.stop(sid, "operator stop")
    assert rt.runtime_state(sid) is RuntimeState.STOPPED
    o1, o2 = await h1.wait(1), await h2.wait(1)
    assert isinstance(o1, TerminatedWait) and o1.reason == "operator stop"
    assert isinstance(o2, TerminatedWait) and o2.input_id == h2.input_id
    await until(lambda: ex.runs[0].outcome == "RunCancelled", "executor cancelled")
    await asyncio.sleep(0.01)
    assert st(rt, sid, h1.input_id).current_state is IS.APPLIED_PENDING_CONSUMPTION
    assert st(rt, sid, h2.input_id).current_state is IS.QUEUED
    # stopped is never stored
    assert rt.store.runtime_states[sid] is RuntimeState.RUNNING
    # a later wait on a live input answers terminated at once; accept is refused
    o3 = await rt.wait(sid, h2.input_id, timeout=0.5)
    assert isinstance(o3, TerminatedWait)
    out = await rt.accept(sid, prompt("too late"))
    assert isinstance(out, Rejected) and out.code is RejectCode.NOT_READY
    assert len(ex.runs) == 1


async def test_s8_cancel_input_abandons_one_queued_input_and_refuses_staged(rt: Runtime) -> None:
    ex = ScriptedExecutor(["hang_before"])
    sid = (await rt.create_session(executor=ex)).id
    sr = rt.runtime(sid)
    h1 = await submit(rt, sid, prompt("staged"))
    await until(lambda: len(ex.runs) == 1, "run start")
    h2 = await submit(rt, sid, prompt("queued a"))
    h3 = await submit(rt, sid, prompt("queued b"))
    s2 = await rt.cancel_input(sid, h2.input_id)
    assert s2.current_state is IS.ABANDONED
    assert abandon_reason(s2) is AR.CANCELLED
    out2 = await h2.wait(1)
    assert out2.outcome_type in ("cancelled", "abandoned")
    assert sr.queued_ids() == [h3.input_id]
    assert st(rt, sid, h3.input_id).current_state is IS.QUEUED
    with pytest.raises(InvalidOperationError) as err:
        await rt.cancel_input(sid, h1.input_id)
    msg = str(err.value)
    assert "staged" in msg and "cancel the active run" in msg
    assert st(rt, sid, h1.input_id).current_state is IS.STAGED
    with pytest.raises(InvalidOperationError):
        await rt.cancel_input(sid, h2.input_id)  # already terminal


async def test_s8_cancel_input_refuses_applied_input(rt: Runtime) -> None:
    ex = ScriptedExecutor(["hang"])
    sid = (await rt.create_session(executor=ex)).id
    p1 = await accept_ok(rt, sid, prompt("applied"))
    await applied(rt, sid, p1)
    with pytest.raises(InvalidOperationError, match="applied_pending_consumption"):
        await rt.cancel_input(sid, p1)


# ============================================================================ S9 lifecycle


async def test_s9_retire_during_active_run_keeps_applied_and_completes(rt: Runtime) -> None:
    ex = ScriptedExecutor(["checkpoint_then_ok"])
    sid = (await rt.create_session(executor=ex)).id
    h1 = await submit(rt, sid, prompt("in flight"))
    await applied(rt, sid, h1.input_id)
    h2 = await submit(rt, sid, terminal_response("would join"))
    h3 = await submit(rt, sid, prompt("queued"))
    res = await rt.retire(sid)
    assert res == {"inputs_abandoned": 2, "inputs_pending_drain": 1}
    for h in (h2, h3):
        o = await h.wait(1)
        assert isinstance(o, AbandonedWait) and o.reason is AR.RETIRED
    out = await rt.accept(sid, prompt("refused"))
    assert isinstance(out, Rejected) and out.code is RejectCode.NOT_READY
    ex.release.set()
    o1 = await h1.wait(1)
    assert isinstance(o1, CompletedWait)
    assert ex.runs[0].joined == []
    await settle(rt, sid)
    assert rt.runtime_state(sid) is RuntimeState.RETIRED
    assert len(ex.runs) == 1


async def test_s9_retire_then_cancel_ends_unapplied_run_inputs_retired(rt: Runtime) -> None:
    ex = ScriptedExecutor(["hang_before"])
    sid = (await rt.create_session(executor=ex)).id
    h1 = await submit(rt, sid, prompt("staged"))
    await until(lambda: len(ex.runs) == 1, "run start")
    await rt.retire(sid)
    assert st(rt, sid, h1.input_id).current_state is IS.STAGED
    await rt.cancel(sid)
    out = await h1.wait(1)
    assert isinstance(out, AbandonedWait) and out.reason is AR.RETIRED
    assert rt.runtime_state(sid) is RuntimeState.RETIRED


async def test_s9_retire_for_replacement_holds_everything_and_respawn_resumes(
    rt: Runtime,
) -> None:
    ex = ScriptedExecutor(["checkpoint_then_ok"])
    sid = (await rt.create_session(executor=ex)).id
    sr = rt.runtime(sid)
    h1 = await submit(rt, sid, prompt("in flight"))
    await applied(rt, sid, h1.input_id)
    h2 = await submit(rt, sid, terminal_response("would join at a checkpoint"))
    h3 = await submit(rt, sid, prompt("queued"))
    res = await rt.retire(sid, replacement_planned=True)
    assert res == {"inputs_abandoned": 0, "inputs_pending_drain": 3}
    out = await rt.accept(sid, prompt("refused"))
    assert isinstance(out, Rejected) and out.code is RejectCode.NOT_READY
    assert "respawn" in out.reason
    ex.release.set()
    assert isinstance(await h1.wait(1), CompletedWait)
    await settle(rt, sid)
    # the run took nothing at its checkpoints and nothing else ran
    assert ex.runs[0].joined == []
    assert len(ex.runs) == 1
    assert sr.queued_ids() == [h2.input_id, h3.input_id]
    assert not h2._future.done() and not h3._future.done()  # type: ignore[union-attr]
    gen = sr.generation
    r = await rt.respawn(sid)
    assert r["inputs_transferred"] == 2 and r["inputs_dropped"] == 0
    assert sr.generation == gen + 1
    o2, o3 = await h2.wait(1), await h3.wait(1)
    assert isinstance(o2, CompletedWait) and isinstance(o3, CompletedWait)
    assert ex.runs[1].input_ids == [h2.input_id, h3.input_id]
    assert rt.runtime_state(sid) is RuntimeState.IDLE


async def test_s9_respawn_keeps_durable_pending_inputs_and_drops_ephemeral(rt: Runtime) -> None:
    ex = ScriptedExecutor(["hang"])
    sid = (await rt.create_session(executor=ex)).id
    p1 = await accept_ok(rt, sid, prompt("running"))
    await applied(rt, sid, p1)
    he = await submit(rt, sid, prompt("ephemeral", durability="ephemeral"))
    hd = await submit(rt, sid, prompt("durable"))
    await rt.retire(sid, replacement_planned=True)
    await rt.cancel(sid)
    await settle(rt, sid)
    assert st(rt, sid, p1).current_state is IS.CONSUMED
    res = await rt.respawn(sid)
    assert res["inputs_dropped"] == 1
    oe = await he.wait(1)
    assert isinstance(oe, AbandonedWait)
    assert st(rt, sid, he.input_id).current_state is IS.ABANDONED
    od = await hd.wait(1)
    assert isinstance(od, CompletedWait)
    assert [r.input_ids for r in ex.runs] == [[p1], [hd.input_id]]


async def test_s9_respawn_waits_for_the_active_run() -> None:
    gate = asyncio.Event()

    async def gated(run: RunContext) -> RunResult | None:
        await run.commit_boundary(messages_from(run.primitive))
        await run.guard(gate.wait())
        return RunResult(text="finished")

    ex = FnExecutor(gated)
    async with Runtime.open("memory://", config=cfg()) as rt:
        sid = (await rt.create_session(executor=ex)).id
        sr = rt.runtime(sid)
        h = await submit(rt, sid, prompt("long"))
        await until(lambda: len(ex.runs) == 1, "run start")
        gen = sr.generation
        task = asyncio.create_task(rt.respawn(sid))
        await asyncio.sleep(0.05)
        assert not task.done()
        assert sr.generation == gen
        assert sr.held is True
        assert rt.runtime_state(sid) is RuntimeState.RETIRED
        gate.set()
        await asyncio.wait_for(task, 1)
        assert ex.log[-1] == ("exit", ex.runs[0].run_id)
        assert sr.generation == gen + 1
        out = await h.wait(1)
        assert isinstance(out, CompletedWait) and out.result.text == "finished"
        assert rt.runtime_state(sid) is RuntimeState.IDLE


async def test_s9_reset_during_active_run_cancels_abandons_clears_and_runs_again() -> None:
    cleanup_started = asyncio.Event()

    async def slow_to_cancel(run: RunContext) -> RunResult | None:
        await run.commit_boundary(messages_from(run.primitive))
        try:
            await run.guard(asyncio.sleep(3600))
        except RunCancelled:
            cleanup_started.set()
            await asyncio.sleep(0.1)  # the executor takes a while to unwind
            raise
        return None

    ex = FnExecutor(slow_to_cancel)
    async with Runtime.open("memory://", config=cfg()) as rt:
        sid = (await rt.create_session(executor=ex)).id
        h1 = await submit(rt, sid, prompt("applied then reset"))
        await applied(rt, sid, h1.input_id)
        h2 = await submit(rt, sid, prompt("queued then reset"))
        assert len(rt.runtime(sid).conversation.rows) == 1
        res = await rt.reset(sid)
        assert res == {"inputs_abandoned": 2}
        for h in (h1, h2):
            o = await h.wait(1)
            assert isinstance(o, AbandonedWait) and o.reason is AR.RESET
        assert rt.runtime(sid).conversation.rows == []
        assert rt.store.conversations[sid] == []
        assert rt.runtime_state(sid) is RuntimeState.IDLE
        assert rt.runtime(sid).runs[ex.runs[0].run_id].status == "cancelled"
        # a new prompt runs normally, but only after the old apply has returned
        h3 = await submit(rt, sid, prompt("fresh start"))
        o3 = await h3.wait(2)
        assert isinstance(o3, CompletedWait)
        assert cleanup_started.is_set()
        assert ex.max_active == 1
        assert [k for k, _ in ex.log] == ["enter", "exit", "enter", "exit"]
        assert [m.role for m in rt.runtime(sid).conversation.messages()] == ["user"]
        assert rows_naming(rt, sid, h3.input_id)[0].index == 0


async def test_s9_destroy_is_terminal_and_abandons_destroyed(rt: Runtime) -> None:
    ex = ScriptedExecutor(["hang"])
    sid = (await rt.create_session(executor=ex)).id
    h1 = await submit(rt, sid, prompt("applied"))
    await applied(rt, sid, h1.input_id)
    h2 = await submit(rt, sid, prompt("queued"))
    assert await rt.destroy(sid) == {"inputs_abandoned": 2}
    for h in (h1, h2):
        o = await h.wait(1)
        assert isinstance(o, AbandonedWait) and o.reason is AR.DESTROYED
    assert rt.runtime_state(sid) is RuntimeState.DESTROYED
    assert rt.store.runtime_states[sid] is RuntimeState.DESTROYED
    out = await rt.accept(sid, prompt("after destroy"))
    assert isinstance(out, Rejected) and out.code is RejectCode.NOT_READY
    for op in (rt.reset, rt.retire, rt.respawn):
        with pytest.raises(InvalidOperationError, match="destroyed"):
            await op(sid)
    assert await rt.destroy(sid) == {"inputs_abandoned": 0}
    await until(lambda: ex.runs[0].outcome == "RunCancelled", "executor cancelled")
    await settle(rt, sid)
    assert len(ex.runs) == 1


# ============================================================================ S12 waiter outcomes


async def test_s12_completed_with_result_and_without(rt: Runtime) -> None:
    ex = ScriptedExecutor(["ok", "none"])
    sid = (await rt.create_session(executor=ex)).id
    h1 = await submit(rt, sid, prompt("hello"))
    o1 = await h1.wait(1)
    assert isinstance(o1, CompletedWait)
    assert o1.result.text == "done:hello"
    assert o1.result.session_id == sid
    j = o1.to_json_dict()
    assert j["outcome_type"] == "completed" and j["result"]["text"] == "done:hello"
    h2 = await submit(rt, sid, prompt("quiet"))
    o2 = await h2.wait(1)
    assert isinstance(o2, CompletedWithoutResultWait)
    assert o2.to_json_dict() == {
        "outcome_type": "completed_without_result",
        "input_id": str(h2.input_id),
    }


async def test_s12_ignored_at_accept_is_completed_without_result(rt: Runtime) -> None:
    ex = ScriptedExecutor()
    sid = (await rt.create_session(executor=ex)).id
    h = await submit(rt, sid, ProjectedInput.new("rule-1", "ev-1", "a projection"))
    assert h.outcome.state.current_state is IS.CONSUMED  # type: ignore[union-attr]
    o = await h.wait(0.5)
    assert isinstance(o, CompletedWithoutResultWait)
    await settle(rt, sid)
    assert ex.runs == []


async def test_s12_superseded_outcome(rt: Runtime) -> None:
    ex = ScriptedExecutor(["hang"])
    sid = (await rt.create_session(executor=ex)).id
    await accept_ok(rt, sid, prompt("busy"))
    await until(lambda: len(ex.runs) == 1, "run start")
    h1 = await submit(rt, sid, prompt("draft 1", supersession_key="draft"))
    h2 = await submit(rt, sid, prompt("draft 2", supersession_key="draft"))
    o1 = await h1.wait(1)
    assert isinstance(o1, SupersededWait)
    assert o1.superseded_by == h2.input_id
    assert o1.to_json_dict()["outcome_type"] == "superseded"
    assert o1.to_json_dict()["superseded_by"] == str(h2.input_id)
    assert not h2._future.done()  # type: ignore[union-attr]


async def test_s12_coalesced_sources_answer_with_the_aggregate_outcome(rt: Runtime) -> None:
    ex = ScriptedExecutor()
    sid = (await rt.create_session(executor=ex)).id
    g1 = await submit(rt, sid, progress_response("10%"))
    g2 = await submit(rt, sid, progress_response("50%"))
    await settle(rt, sid)
    assert ex.runs == []  # progress never starts a run on its own (S17)
    hp = await submit(rt, sid, prompt("what is the status?"))
    await hp.wait(1)
    s1 = st(rt, sid, g1.input_id)
    assert s1.current_state is IS.COALESCED
    agg = s1.terminal_outcome.aggregate_id  # type: ignore[union-attr]
    assert st(rt, sid, agg).current_state is IS.CONSUMED
    for g in (g1, g2):
        o = await g.wait(1)
        assert isinstance(o, CompletedWait)
        assert o.input_id == g.input_id
        assert o.via_aggregate_id == agg
        assert o.to_json_dict()["via_aggregate_id"] == str(agg)
    # waiting after the fact answers the same, at once
    late = await rt.wait(sid, g1.input_id, timeout=0.1)
    assert isinstance(late, CompletedWait) and late.via_aggregate_id == agg


async def test_s12_wait_on_a_terminal_input_answers_at_once(rt: Runtime) -> None:
    ex = ScriptedExecutor()
    sid = (await rt.create_session(executor=ex)).id
    h = await submit(rt, sid, prompt("done soon"))
    first = await h.wait(1)
    fut = rt.runtime(sid).register_waiter(h.input_id)
    assert fut.done()
    assert fut.result() == first
    again = await rt.wait(sid, h.input_id, timeout=0.05)
    assert again == first


async def test_s12_every_waiter_resolves_exactly_once(rt: Runtime) -> None:
    ex = ScriptedExecutor(["fail_before_permanent"])
    sid = (await rt.create_session(executor=ex)).id
    sr = rt.runtime(sid)
    resolved: list[tuple[InputId, str]] = []

    class CountingRegistry(CompletionRegistry):
        def resolve(self, input_id: InputId, outcome: Any) -> bool:
            ok = super().resolve(input_id, outcome)
            if ok:
                resolved.append((input_id, outcome.outcome_type))
            return ok

    sr.completions = CountingRegistry()
    h = await rt.accept_with_completion(sid, prompt("many eyes"))
    iid = h.input_id
    waits = [asyncio.create_task(rt.wait(sid, iid, timeout=2)) for _ in range(4)]
    outs = [await h.wait(2), *(await asyncio.gather(*waits))]
    assert all(isinstance(o, AbandonedWait) and o.reason is AR.FAILED for o in outs)
    assert len({o.to_json() for o in outs}) == 1
    await settle(rt, sid)
    assert resolved == [(iid, "abandoned")]
    assert sr.completions.pending_count() == 0


def test_s12_waiter_outcome_json_is_tagged_outcome_type() -> None:
    iid = InputId.new()
    samples = [
        CompletedWait(input_id=iid, result=RunResult(text="x")),
        CompletedWithoutResultWait(input_id=iid),
        CancelledWait(input_id=iid),
        SupersededWait(input_id=iid, superseded_by=InputId.new()),
        AbandonedWait(input_id=iid, reason=AR.RETRY_BUDGET_EXCEEDED, error="boom"),
        TerminatedWait(input_id=iid, reason="runtime shut down"),
    ]
    tags = []
    for o in samples:
        doc = o.to_json_dict()
        assert next(iter(doc)) == "outcome_type"  # tag first
        assert "via_aggregate_id" not in doc  # unset optional omitted
        tags.append(doc["outcome_type"])
        assert wait_outcome_adapter.validate_python(doc) == o
    assert tags == [
        "completed",
        "completed_without_result",
        "cancelled",
        "superseded",
        "abandoned",
        "terminated",
    ]


async def test_s12_close_resolves_non_terminal_waiters_terminated() -> None:
    ex = ScriptedExecutor(["hang"])
    rt = Runtime.open("memory://", config=cfg())
    sid = (await rt.create_session(executor=ex)).id
    h1 = await submit(rt, sid, prompt("running"))
    await until(lambda: len(ex.runs) == 1, "run start")
    h2 = await submit(rt, sid, prompt("queued"))
    w = asyncio.create_task(rt.wait(sid, h2.input_id, timeout=2))
    await asyncio.sleep(0)
    await rt.close(grace=0)
    for o, h in ((await h1.wait(1), h1), (await h2.wait(1), h2), (await w, h2)):
        assert isinstance(o, TerminatedWait)
        assert o.input_id == h.input_id
        assert o.reason == "runtime shut down"
    assert st(rt, sid, h2.input_id).current_state is IS.QUEUED


async def test_s12_terminated_waiter_of_a_coalesced_source_names_its_own_input() -> None:
    ex = ScriptedExecutor(["hang"])
    rt = Runtime.open("memory://", config=cfg())
    sid = (await rt.create_session(executor=ex)).id
    g1 = await submit(rt, sid, progress_response("10%"))
    await submit(rt, sid, progress_response("20%"))
    await accept_ok(rt, sid, prompt("start"))
    await until(lambda: len(ex.runs) == 1, "run start")
    assert st(rt, sid, g1.input_id).current_state is IS.COALESCED
    await rt.close(grace=0)
    o = await g1.wait(1)
    assert isinstance(o, TerminatedWait)
    assert o.input_id == g1.input_id


# ============================================================================ S13 derived inputs


def _queue_projected_table() -> PolicyTable:
    d = PolicyTable.decision("stage_run_boundary", "none", "fifo", "on_run_complete")
    from meerkat_runtime import default_policy_table

    return default_policy_table().with_rows({"projected": PolicyRow(d, d)})


async def test_s13_projected_input_is_consumed_at_accept_by_default(rt: Runtime) -> None:
    ex = ScriptedExecutor()
    sid = (await rt.create_session(executor=ex)).id
    out = await rt.accept(sid, ProjectedInput.new("rule-1", "ev-9", "derived"))
    assert isinstance(out, Accepted)
    assert out.policy.apply_mode.value == "ignore"
    assert out.state.current_state is IS.CONSUMED
    s = st(rt, sid, out.input_id)
    assert s.durability is not None and s.durability.value == "derived"
    assert s.reconstruction_source is not None
    assert s.reconstruction_source.to_json_dict() == {
        "source_type": "projection",
        "rule_id": "rule-1",
        "source_event_id": "ev-9",
    }
    await settle(rt, sid)
    assert ex.runs == []


async def test_s13_respawn_rebuilds_a_queued_derived_input_with_a_new_id() -> None:
    calls: list[tuple[str, str, InputId]] = []

    def rebuild(src: Any, old: Any) -> Any:
        calls.append((src.rule_id, src.source_event_id, old.id))
        return ProjectedInput.new(src.rule_id, src.source_event_id, old.content + " (rebuilt)")

    ex = ScriptedExecutor()
    rt = Runtime.open(
        "memory://",
        config=cfg(),
        policy=_queue_projected_table(),
        rebuilders=Rebuilders(projection={"rule-1": rebuild}),
    )
    async with rt:
        sid = (await rt.create_session(executor=ex)).id
        h_old = await submit(rt, sid, ProjectedInput.new("rule-1", "ev-1", "derived"))
        old = h_old.input_id
        assert st(rt, sid, old).current_state is IS.QUEUED
        await rt.retire(sid, replacement_planned=True)
        res = await rt.respawn(sid)
        assert res["inputs_rebuilt"] == 1
        assert calls == [("rule-1", "ev-1", old)]
        s_old = st(rt, sid, old)
        assert s_old.current_state is IS.SUPERSEDED
        new = s_old.terminal_outcome.superseded_by  # type: ignore[union-attr]
        assert new != old
        o = await h_old.wait(1)
        assert isinstance(o, SupersededWait) and o.superseded_by == new
        s_new = st(rt, sid, new)
        assert s_new.current_state is IS.QUEUED
        assert s_new.durability is not None and s_new.durability.value == "derived"
        assert s_new.reconstruction_source == s_old.reconstruction_source
        assert rt.runtime(sid).queued_ids() == [new]
        # the rebuilt input rides along with the next run
        hp = await submit(rt, sid, prompt("go"))
        await hp.wait(1)
        assert ex.runs[0].input_ids == [new, hp.input_id]
        assert "derived (rebuilt)" in ex.runs[0].texts


async def test_s13_derived_input_without_rebuilder_is_abandoned_recovery_failed() -> None:
    ex = ScriptedExecutor()
    async with Runtime.open("memory://", config=cfg(), policy=_queue_projected_table()) as rt:
        sid = (await rt.create_session(executor=ex)).id
        h = await submit(rt, sid, ProjectedInput.new("rule-x", "ev-1", "derived"))
        await rt.retire(sid, replacement_planned=True)
        res = await rt.respawn(sid)
        assert res["inputs_rebuilt"] == 0
        o = await h.wait(1)
        assert isinstance(o, AbandonedWait)
        assert o.reason is AR.RECOVERY_FAILED
        assert o.error and "rebuild" in o.error
        assert rt.runtime(sid).queued_ids() == []


# ============================================================================ S15 events


async def test_s15_every_transition_emits_an_event_with_increasing_seq(rt: Runtime) -> None:
    ex = ScriptedExecutor(["fail_before", "ok"])
    sid = (await rt.create_session(executor=ex)).id
    h = await submit(rt, sid, prompt("x"))
    await h.wait(1)
    await settle(rt, sid)
    evs = await all_events(rt, sid)
    seqs = [e.seq for e in evs]
    assert seqs == list(range(1, len(evs) + 1))
    assert all(e.runtime_id == sid for e in evs)
    mine = [
        e.event["data"]["code"]
        for e in evs
        if e.event["category"] == "input_lifecycle"
        and e.event["data"].get("input_id") == str(h.input_id)
    ]
    assert mine == [
        "accepted",
        "queued",
        "staged",
        "state_transitioned",  # staged -> queued after the failure
        "staged",
        "applied",
        "consumed",
    ]
    assert history_to(st(rt, sid, h.input_id)) == [
        "queued",
        "staged",
        "queued",
        "staged",
        "applied",
        "applied_pending_consumption",
        "consumed",
    ]
    run_codes = [e.code for e in evs if e.event["category"] == "run_lifecycle"]
    assert run_codes == [
        "run.started",
        "run.failed",
        "run.retry_scheduled",
        "run.started",
        "run.boundary_applied",
        "run.completed",
    ]
    changes = [
        (e.event["data"]["from"], e.event["data"]["to"])
        for e in evs
        if e.event["category"] == "runtime_state_change"
    ]
    assert changes == [("idle", "running"), ("running", "idle")] * 2


async def test_s15_resume_after_seq(rt: Runtime) -> None:
    ex = ScriptedExecutor()
    sid = (await rt.create_session(executor=ex)).id
    for i in range(3):
        await (await submit(rt, sid, prompt(f"m{i}"))).wait(1)
    evs = await all_events(rt, sid)
    n = len(evs) // 2
    tail = await all_events(rt, sid, after=n)
    assert [e.seq for e in tail] == [e.seq for e in evs[n:]]
    assert tail[0].seq == n + 1
    assert [e.id for e in tail] == [e.id for e in evs[n:]]
    assert await all_events(rt, sid, after=evs[-1].seq) == []


async def test_s15_resume_past_retention_yields_events_gap_first() -> None:
    ex = ScriptedExecutor()
    async with Runtime.open("memory://", config=cfg(event_retention=20)) as rt:
        sid = (await rt.create_session(executor=ex)).id
        for i in range(6):
            await (await submit(rt, sid, prompt(f"m{i}"))).wait(1)
        last = rt.runtime(sid).last_seq
        assert last > 40
        # the store keeps every event until a pruning pass (S18) applies the retention
        assert (await all_events(rt, sid))[0].seq == 1
        await rt.prune()
        evs = await all_events(rt, sid)
        gap = evs[0]
        assert gap.event["category"] == "stream"
        assert gap.event["data"] == {"code": "events_gap", "from": 1, "to": last - 20}
        assert gap.code == "stream.events_gap"
        assert [e.seq for e in evs[1:]] == list(range(last - 19, last + 1))
        # a resume inside the kept window has no gap
        inside = await all_events(rt, sid, after=last - 5)
        assert [e.seq for e in inside] == list(range(last - 4, last + 1))
        # a resume from the middle of the pruned part: gap from there
        mid = await all_events(rt, sid, after=10)
        assert mid[0].event["data"] == {"code": "events_gap", "from": 11, "to": last - 20}
        assert mid[1].seq == last - 19


async def test_s15_follow_delivers_later_events(rt: Runtime) -> None:
    ex = ScriptedExecutor()
    sid = (await rt.create_session(executor=ex)).id
    start = rt.runtime(sid).last_seq
    got: list[RuntimeEventEnvelope] = []

    async def follow() -> None:
        async for e in rt.events(sid, after_seq=start, follow=True):
            got.append(e)
            if e.code == "run.completed":
                return

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.02)
    assert not task.done() and got == []
    h = await submit(rt, sid, prompt("later"))
    await asyncio.wait_for(task, 1)
    await h.wait(1)
    assert got[0].seq == start + 1
    assert got[0].code == "input.accepted"
    assert [e.seq for e in got] == list(range(start + 1, start + 1 + len(got)))
    assert "run.boundary_applied" in codes(got)


# ============================================================================ S16 checkpoints


async def test_s16_checkpoint_hands_in_joining_inputs_consumed_at_completion(
    rt: Runtime,
) -> None:
    ex = ScriptedExecutor(["checkpoint_then_ok"])
    sid = (await rt.create_session(executor=ex)).id
    hp = await submit(rt, sid, prompt("start"))
    await applied(rt, sid, hp.input_id)
    hm = await submit(rt, sid, peer_message("fyi"))
    ht = await submit(rt, sid, terminal_response("the answer"))
    hg = await submit(rt, sid, progress_response("halfway"))
    joiners = [hm.input_id, ht.input_id, hg.input_id]
    for i in joiners:
        assert st(rt, sid, i).policy.decision.apply_mode.value == "stage_run_boundary"  # type: ignore[union-attr]
    ex.release.set()
    await hp.wait(1)
    await settle(rt, sid)
    run = ex.runs[0]
    assert run.joined == [joiners]
    assert len(ex.runs) == 1  # nothing left over for another run
    for h in (hm, ht, hg):
        o = await h.wait(1)
        assert isinstance(o, CompletedWait)
        s = st(rt, sid, h.input_id)
        assert s.current_state is IS.CONSUMED
        assert s.last_run_id == run.run_id
        assert len(rows_naming(rt, sid, h.input_id)) == 1
    # they were applied at a checkpoint boundary, after the first checkpoint's row
    receipts = [
        r for (rid, rr, _), r in rt.store.receipts.items() if rid == sid and rr == run.run_id
    ]
    by_seq = sorted(receipts, key=lambda r: r.sequence)
    assert [r.boundary for r in by_seq] == [
        RunApplyBoundary.RUN_START,
        RunApplyBoundary.RUN_CHECKPOINT,
        RunApplyBoundary.RUN_CHECKPOINT,
    ]
    assert by_seq[2].contributing_input_ids == joiners


async def test_s16_run_without_checkpoint_leaves_joiners_queued_for_the_next_run(
    rt: Runtime,
) -> None:
    gate = asyncio.Event()

    async def no_checkpoint(run: RunContext) -> RunResult | None:
        await run.commit_boundary(messages_from(run.primitive))
        await run.guard(gate.wait())
        return RunResult(text="first")

    ex = FnExecutor(no_checkpoint)
    sid = (await rt.create_session(executor=ex)).id
    sr = rt.runtime(sid)
    h1 = await submit(rt, sid, prompt("first"))
    await until(lambda: len(ex.runs) == 1, "run start")
    hg = await submit(rt, sid, progress_response("10%"))
    gate.set()
    await h1.wait(1)
    await settle(rt, sid)
    # progress does not wake: still queued, untouched by the finished run
    s = st(rt, sid, hg.input_id)
    assert s.current_state is IS.QUEUED
    assert s.last_run_id is None
    assert sr.queued_ids() == [hg.input_id]
    assert len(ex.runs) == 1
    h2 = await submit(rt, sid, prompt("second"))
    await h2.wait(1)
    assert contributing(ex.runs[1]) == [hg.input_id, h2.input_id]
    assert isinstance(await hg.wait(1), CompletedWait)


async def test_s16_wakeable_joiner_missed_by_a_run_starts_the_next_run(rt: Runtime) -> None:
    gate = asyncio.Event()

    async def no_checkpoint(run: RunContext) -> RunResult | None:
        await run.commit_boundary(messages_from(run.primitive))
        await run.guard(gate.wait())
        return RunResult(text="first")

    ex = FnExecutor(no_checkpoint)
    sid = (await rt.create_session(executor=ex)).id
    h1 = await submit(rt, sid, prompt("first"))
    await until(lambda: len(ex.runs) == 1, "run start")
    ht = await submit(rt, sid, terminal_response("done"))
    gate.set()
    o = await ht.wait(1)
    assert isinstance(o, CompletedWait)
    assert (await h1.wait(1)).outcome_type == "completed"
    assert [contributing(r) for r in ex.runs] == [[h1.input_id], [ht.input_id]]
    assert st(rt, sid, ht.input_id).last_run_id == ex.runs[1].run_id


# ============================================================================ S19 shutdown


async def test_s19_exit_stops_accepting_grace_then_terminated() -> None:
    ex = ScriptedExecutor(["hang"])
    rt = Runtime.open("memory://", config=cfg())
    async with rt:
        sid = (await rt.create_session(executor=ex)).id
        h1 = await submit(rt, sid, prompt("hangs"))
        await applied(rt, sid, h1.input_id)
        h2 = await submit(rt, sid, prompt("queued"))
        t0 = time.monotonic()
        closing = asyncio.create_task(rt.close(grace=0.2))
        await asyncio.sleep(0.05)
        # during the grace period accepts are refused, clearly
        out = await rt.accept(sid, prompt("during shutdown"))
        assert isinstance(out, Rejected)
        assert out.code is RejectCode.NOT_READY
        assert "shutting down" in out.reason
        assert not closing.done()
        await asyncio.wait_for(closing, 1.0)
        elapsed = time.monotonic() - t0
    assert 0.15 <= elapsed < 1.0
    for h in (h1, h2):
        o = await h.wait(0.5)
        assert isinstance(o, TerminatedWait) and o.reason == "runtime shut down"
    # nothing durable lost: the inputs live on in the store
    stored = rt.store.input_states[sid]
    assert stored[h1.input_id].current_state is IS.APPLIED_PENDING_CONSUMPTION
    assert stored[h2.input_id].current_state is IS.QUEUED
    # the executor was stopped (told through run.cancelled, then its task torn down)
    assert ex.runs[0].outcome in ("RunCancelled", "CancelledError")
    # after close: accept is rejected not_ready, waiting on it raises, new sessions raise
    out = await rt.accept(sid, prompt("after close"))
    assert isinstance(out, Rejected) and out.code is RejectCode.NOT_READY
    h3 = await rt.accept_with_completion(sid, prompt("after close"))
    assert isinstance(h3.outcome, Rejected)
    with pytest.raises(InputRejectedError, match="not_ready"):
        await h3.wait(0.1)
    with pytest.raises(RuntimeClosedError, match="closed"):
        await rt.create_session(executor=ScriptedExecutor())


async def test_s19_a_run_that_finishes_within_grace_completes() -> None:
    async def quick(run: RunContext) -> RunResult | None:
        await run.commit_boundary(messages_from(run.primitive))
        await run.guard(asyncio.sleep(0.05))
        return RunResult(text="made it")

    ex = FnExecutor(quick)
    async with Runtime.open("memory://", config=cfg(shutdown_grace=0.5)) as rt:
        sid = (await rt.create_session(executor=ex)).id
        h = await submit(rt, sid, prompt("finish me"))
        await until(lambda: len(ex.runs) == 1, "run start")
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 0.4
    o = await h.wait(0.5)
    assert isinstance(o, CompletedWait) and o.result.text == "made it"


async def test_s19_no_new_run_starts_during_the_grace_period() -> None:
    async def quick(run: RunContext) -> RunResult | None:
        await run.commit_boundary(messages_from(run.primitive))
        await run.guard(asyncio.sleep(0.05))
        return RunResult(text="made it")

    ex = FnExecutor(default=quick)
    rt = Runtime.open("memory://", config=cfg())
    sid = (await rt.create_session(executor=ex)).id
    h1 = await submit(rt, sid, prompt("active"))
    h2 = await submit(rt, sid, prompt("queued at shutdown"))
    await until(lambda: len(ex.runs) == 1, "run start")
    await rt.close(grace=0.5)
    assert isinstance(await h1.wait(0.5), CompletedWait)
    assert isinstance(await h2.wait(0.5), TerminatedWait)
    assert len(ex.runs) == 1
    assert st(rt, sid, h2.input_id).current_state is IS.QUEUED


# ============================================================================ one run at a time


async def test_s17_at_most_one_run_per_session_under_accepts_cancels_and_resets() -> None:
    rng = random.Random(1234)

    async def busy(run: RunContext) -> RunResult | None:
        await run.commit_boundary(messages_from(run.primitive))
        try:
            await run.guard(asyncio.sleep(rng.uniform(0.0, 0.01)))
        except RunCancelled:
            await asyncio.sleep(rng.uniform(0.0, 0.01))  # slow unwinding
            raise
        return RunResult(text="ok")

    ex = FnExecutor(default=busy)
    async with Runtime.open("memory://", config=cfg()) as rt:
        sid = (await rt.create_session(executor=ex)).id
        handles: list[CompletionHandle] = []
        for _ in range(60):
            r = rng.random()
            if r < 0.6:
                handles.append(await submit(rt, sid, prompt("p")))
            elif r < 0.8:
                await rt.cancel(sid)
            elif r < 0.9:
                await rt.reset(sid)
            else:
                handles.append(await submit(rt, sid, terminal_response("t")))
            await asyncio.sleep(rng.uniform(0.0, 0.004))
        await settle(rt, sid)
        assert ex.max_active == 1
        kinds = [k for k, _ in ex.log]
        assert kinds == ["enter", "exit"] * (len(kinds) // 2)
        assert len(ex.runs) >= 10
        outs = [await h.wait(1) for h in handles]
        assert all(o.outcome_type != "terminated" for o in outs)
        assert not rt.runtime(sid).input_ids()
