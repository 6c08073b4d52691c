"""A stateful model test of the per-session control plane (S1-S5, S8, S9, S12, S17).

Hypothesis drives one or two in-memory sessions with random operations: accepts of every
input kind (with idempotency and supersession keys from tiny pools, durable or ephemeral),
scripted executor outcomes (success, failure before or after the boundary, permanent
failures, hangs until cancelled, checkpoint holds, waits), cancels, ``cancel_input``,
retires (with and without replacement), respawns, resets and "let it run" steps.

The runtime is asyncio based, so each test case owns a fresh event loop; every rule runs one
coroutine that performs the action, checks what must hold at once, then lets the loop settle
(until every session is idle or its run is parked in the executor). Invariants are checked
after every step; the teardown closes the runtime and checks that every waiter resolves.

What a failure means: every assertion names the rule it checks. A failing example is shrunk
by hypothesis; turn it into a plain test (see the xfail tests at the end of the file) and
fix the runtime, never the model, unless the model misreads the spec.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from meerkat_runtime import (
    ExternalEventInput,
    FlowStepInput,
    InvalidOperationError,
    Message,
    PeerInput,
    ProjectedInput,
    PromptInput,
    RunCancelled,
    RunFailure,
    RunFenced,
    RunResult,
    Runtime,
    RuntimeConfig,
    RuntimeState,
    SystemGeneratedInput,
)
from meerkat_runtime._ids import InputId
from meerkat_runtime.core.lifecycle import RunContext
from meerkat_runtime.runtime.input_state import (
    CoalescingSource,
    InputLifecycleState,
    InputState,
)
from meerkat_runtime.runtime.inputs import (
    Input,
    MessageConvention,
    RequestConvention,
    ResponseProgressConvention,
    ResponseProgressPhase,
    ResponseTerminalConvention,
    ResponseTerminalStatus,
    kind_id,
)
from meerkat_runtime.runtime.policy import ApplyMode, QueueMode, default_policy_table
from tests.helpers import messages_from

IS = InputLifecycleState
NON_TERMINAL_PENDING = (IS.ACCEPTED, IS.QUEUED)
MAX_ATTEMPTS = 3
POLICY = default_policy_table()

# --- bugs this machine found ----------------------------------------------------------------
# BUG-1..BUG-5 (fixed in 4fe3494) are kept as plain regression tests at the end of this file.
# When the machine finds a new bug: shrink it into a plain test marked
# ``xfail(strict=True, reason="BUG: ...")``, steer the machine around it only if it must
# (behind a documented flag), and drop both when the fix lands (the xfail then XPASSes,
# which fails the suite).

#: BUG-6 (fixed): after ``close()``, a wait on an input coalesced into a still-pending
#: aggregate never resolved. See ``test_bug6_wait_after_close_on_coalesced``.
TOLERATE_BUG6_WAIT_AFTER_CLOSE_ON_COALESCED = False

# --- inputs -------------------------------------------------------------------------------

#: spec kind -> the policy kind id it resolves to (reference-inputs.md §2.6)
KIND_ID = {
    "prompt": "prompt",
    "peer_none": "peer_message",  # a peer input without convention is a message
    "peer_message": "peer_message",
    "peer_request": "peer_request",
    "peer_progress": "peer_response_progress",
    "peer_terminal": "peer_response_terminal",
    "flow_step": "flow_step",
    "external_build": "external_event",
    "external_deploy": "external_event",
    "system": "system_generated",
    "projected": "projected",
}
KINDS = tuple(KIND_ID)
#: kinds whose policy, resolved as if idle, wakes the runtime (S17; inject_now wakes too)
WAKING_KIND_IDS = frozenset(
    {
        "prompt",
        "peer_message",
        "peer_request",
        "peer_response_terminal",
        "flow_step",
        "external_event",
        "system_generated",
    }
)
IDEM_KEYS = ("idem-1", "idem-2", "idem-3")
SUP_KEYS = ("sup-1", "sup-2")


class Spec(NamedTuple):
    """What an input is made of; two inputs built from equal specs have equal content (S11)."""

    kind: str
    variant: int
    idem: str | None
    sup: str | None
    durability: str


@st.composite
def input_specs(draw: st.DrawFn) -> Spec:
    # progress responses weigh more: coalescing needs two of them queued together (S3)
    kind = draw(st.sampled_from((*KINDS, "peer_progress", "peer_progress")))
    durabilities = ["durable", "ephemeral"]
    if kind in ("projected", "system"):
        durabilities.append("derived")
    return Spec(
        kind=kind,
        variant=draw(st.integers(0, 1)),
        idem=draw(st.sampled_from((None, None, None, None, None, *IDEM_KEYS))),
        sup=draw(st.none() | st.sampled_from(SUP_KEYS)),
        durability=draw(st.sampled_from(durabilities)),
    )


def build_input(spec: Spec) -> Input:
    """A fresh input (new id and timestamp) for ``spec``."""
    v = spec.variant
    hdr: dict[str, Any] = {
        "idempotency_key": spec.idem,
        "supersession_key": spec.sup,
        "durability": spec.durability,
    }
    k = spec.kind
    if k == "prompt":
        return PromptInput.new(f"prompt {v}", **hdr)
    if k == "peer_none":
        return PeerInput.new(f"hello {v}", peer_id="peer-a", **hdr)
    if k == "peer_message":
        return PeerInput.new(f"note {v}", peer_id="peer-a", convention=MessageConvention(), **hdr)
    if k == "peer_request":
        conv = RequestConvention(request_id=f"req-{v}", intent="review")
        return PeerInput.new(f"please {v}", peer_id="peer-b", convention=conv, **hdr)
    if k == "peer_progress":
        conv2 = ResponseProgressConvention(
            request_id="req-0", phase=ResponseProgressPhase.IN_PROGRESS
        )
        return PeerInput.new(f"progress {v}", peer_id="peer-b", convention=conv2, **hdr)
    if k == "peer_terminal":
        conv3 = ResponseTerminalConvention(
            request_id=f"req-{v}", status=ResponseTerminalStatus.COMPLETED
        )
        return PeerInput.new(f"result {v}", peer_id="peer-b", convention=conv3, **hdr)
    if k == "flow_step":
        return FlowStepInput.new(f"step-{v}", f"do {v}", flow_id="flow-1", step_index=v, **hdr)
    if k == "external_build":
        return ExternalEventInput.new("build.finished", {"n": v}, **hdr)
    if k == "external_deploy":
        return ExternalEventInput.new("deploy.started", {"n": v}, **hdr)
    if k == "system":
        return SystemGeneratedInput.new("scheduler", f"tick {v}", **hdr)
    assert k == "projected"
    return ProjectedInput.new("rule-1", f"evt-{v}", f"projected {v}", **hdr)


def joins_boundaries(st_: InputState) -> bool:
    assert st_.policy is not None
    return st_.policy.decision.apply_mode in (ApplyMode.STAGE_RUN_BOUNDARY, ApplyMode.INJECT_NOW)


def is_priority(st_: InputState) -> bool:
    assert st_.policy is not None
    return st_.policy.decision.queue_mode in (QueueMode.PRIORITY, QueueMode.NONE)


def wakes_as_if_idle(st_: InputState) -> bool:
    inp = st_.persisted_input
    assert inp is not None
    return kind_id(inp) in WAKING_KIND_IDS


# --- the executor -------------------------------------------------------------------------

BEHAVIOURS = (
    "ok",  # commit the boundary, return a result
    "none",  # commit, return None (completed without result)
    "fail_before",  # transient failure before the boundary (S4)
    "fail_before_permanent",
    "fail_after",  # transient failure after the boundary (S5)
    "fail_after_permanent",
    "hang_before",  # park until cancelled, boundary not committed (S8)
    "hang",  # commit, then park until cancelled
    "hold",  # commit, gate, checkpoint, gate, checkpoint, ok (S16)
    "hold_fail",  # commit, gate, checkpoint, gate, transient failure
    "wait",  # commit, run.wait() until an interrupt_yielding input or cancel, checkpoint, ok
)
#: what the next run does, as drawn with an accept: mostly runs that end by themselves
NEXT_RUN = ("ok", "ok", "ok", "none", *BEHAVIOURS)
TRANSIENT = "transient failure"
PERMANENT = "permanent failure"


@dataclass
class RunLog:
    run_id: Any
    is_continuation: bool
    behaviour: str
    start_ids: list[InputId]
    joined: list[list[InputId]] = field(default_factory=list)
    pending_join: list[InputId] = field(default_factory=list)
    boundary: bool = False
    head: InputId | None = None
    end: str = "running"
    text: str | None = None


class ChaosExecutor:
    """A CoreExecutor whose behaviour per run comes from a plan the state machine fills
    (``ok`` when the plan is empty). It counts concurrent runs and checks, at run start and
    at each checkpoint, what the runtime hands it (S5, S16, S17)."""

    def __init__(self, machine: RuntimeMachine, sid: str) -> None:
        self.machine = machine
        self.sid = sid
        self.plan: deque[str] = deque()
        self.active = 0
        self.max_active = 0
        self.calls = 0
        self.ended = 0
        self.parked = False
        self.runs: dict[Any, RunLog] = {}
        self.release_event = asyncio.Event()
        self.releases = 0
        self.violations: list[str] = []
        self.retry_head: InputId | None = None

    @property
    def sr(self) -> Any:
        return self.machine.rt.runtime(self.sid)

    def release(self) -> None:
        ev, self.release_event = self.release_event, asyncio.Event()
        self.releases += 1
        ev.set()

    def _bad(self, msg: str) -> None:
        self.violations.append(f"[{self.sid}] {msg}")

    async def _park(self, run: RunContext, awaitable: Any) -> Any:
        self.parked = True
        try:
            return await run.guard(awaitable)
        finally:
            self.parked = False

    def _check_start(self, run: RunContext, log: RunLog) -> None:
        sr = self.sr
        ids = log.start_ids
        if run.is_continuation:
            if ids or run.primitive.appends or run.primitive.context_appends:
                self._bad(f"continuation {run.run_id} carries inputs {ids} (spec §3)")
            return
        if not ids:
            self._bad(f"run {run.run_id} started with no input (S17)")
            return
        states = [sr.input_state(i) for i in ids]
        for s in states:
            if s.current_state is not IS.STAGED:
                self._bad(f"run {run.run_id} got {s.input_id} in state {s.current_state} (S5)")
        in_conv = {i for r in sr.conversation.rows for i in r.input_ids}
        for i in ids:
            if i in in_conv:
                self._bad(f"run {run.run_id} re-applies {i}, already in the conversation (S5)")
        if not any(wakes_as_if_idle(s) for s in states):
            self._bad(f"run {run.run_id} started without a waking input: {ids} (S17)")
        heads = [s.input_id for s in states if not joins_boundaries(s)]
        if len(heads) > 1:
            self._bad(f"run {run.run_id} has several run-start heads {heads} (S17)")
        left = [i for i in sr.queued_ids() if joins_boundaries(sr.input_state(i))]
        if left:
            self._bad(f"run {run.run_id} left joinable inputs {left} queued at its start (S17)")
        self._check_coalesced(states, f"run {run.run_id} start")
        log.head = heads[0] if heads else ids[0]
        # S4: a head that failed before its boundary went back to the front of the queue, so
        # the next run starts with it (unless it ended meanwhile)
        back = self.retry_head
        self.retry_head = None
        if back is not None and sr.input_state(back).current_state is IS.QUEUED:
            self._bad(f"S4: {back} failed before its boundary but run {run.run_id} skipped it")

    def _check_coalesced(self, states: list[InputState], where: str) -> None:
        """S3: at a run start or checkpoint, queued coalesce-mode inputs of one kind (and
        event type) are merged into one aggregate, so at most one of each group is staged."""
        groups: Counter[tuple[str, str | None]] = Counter()
        for s in states:
            assert s.policy is not None and s.persisted_input is not None
            if s.policy.decision.queue_mode is QueueMode.COALESCE:
                inp = s.persisted_input
                et = inp.event_type if isinstance(inp, ExternalEventInput) else None
                groups[(kind_id(inp), et)] += 1
        dup = [g for g, n in groups.items() if n > 1]
        if dup:
            self._bad(f"S3: {where} staged several uncoalesced inputs of {dup}")

    async def _checkpoint(self, run: RunContext, log: RunLog, delta: list[Message]) -> None:
        joined = await run.checkpoint(delta)
        ids = list(joined.contributing_input_ids) if joined is not None else []
        sr = self.sr
        if ids and self.machine.retired[self.sid] is not None:
            self._bad(f"retired run {run.run_id} took {ids} at a checkpoint (S9)")
        for i in ids:
            s = sr.input_state(i)
            if s.current_state is not IS.STAGED or not joins_boundaries(s):
                self._bad(f"checkpoint joined {i} ({s.current_state}, not joinable?) (S16)")
        if self.machine.retired[self.sid] is None:
            left = [i for i in sr.queued_ids() if joins_boundaries(sr.input_state(i))]
            if left:
                self._bad(f"checkpoint of {run.run_id} left joinable inputs {left} queued (S16)")
        self._check_coalesced([sr.input_state(i) for i in ids], f"checkpoint of {run.run_id}")
        log.joined.append(ids)
        log.pending_join = ids
        if joined is not None:
            run.append(*messages_from(joined))

    async def apply(self, run: RunContext) -> RunResult | None:
        beh = self.plan.popleft() if self.plan else "ok"
        prim = run.primitive
        log = RunLog(run.run_id, run.is_continuation, beh, list(prim.contributing_input_ids))
        self.runs[run.run_id] = log
        self.calls += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            self._check_start(run, log)
            msgs = messages_from(prim)
            if beh.startswith("fail_before"):
                perm = beh.endswith("permanent")
                raise RunFailure(
                    f"{PERMANENT if perm else TRANSIENT} before boundary", permanent=perm
                )
            if beh == "hang_before":
                await self._park(run, asyncio.sleep(3600))
            await run.commit_boundary(msgs)
            log.boundary = True
            if beh.startswith("fail_after"):
                perm = beh.endswith("permanent")
                raise RunFailure(
                    f"{PERMANENT if perm else TRANSIENT} after boundary", permanent=perm
                )
            if beh == "hang":
                await self._park(run, asyncio.sleep(3600))
            if beh in ("hold", "hold_fail"):
                await self._park(run, self.release_event.wait())
                await self._checkpoint(run, log, [Message(role="assistant", content="thinking")])
                await self._park(run, self.release_event.wait())
                if beh == "hold_fail":
                    raise RunFailure(f"{TRANSIENT} after checkpoint")
                await self._checkpoint(run, log, [])
            if beh == "wait":
                self.parked = True
                try:
                    await run.wait(3600)
                finally:
                    self.parked = False
                await self._checkpoint(run, log, [])
            if beh == "none":
                log.end = "none"
                return None
            run.append(Message(role="assistant", content="done"))
            log.text = f"{beh}:{run.run_id}"
            log.end = "completed"
            return RunResult(text=log.text)
        except (RunCancelled, RunFenced):
            log.end = "cancelled"
            raise
        except RunFailure as exc:
            log.end = "failed_permanent" if exc.permanent else "failed"
            if not exc.permanent and not log.boundary and not log.is_continuation:
                self.retry_head = log.head
            raise
        except asyncio.CancelledError:
            log.end = "torn_down"
            raise
        finally:
            self.active -= 1
            self.ended += 1


# --- the machine --------------------------------------------------------------------------


def _marks_failure(fn: Any) -> Any:
    """Remember that a step failed, so the teardown does not mask its error with its own."""

    @functools.wraps(fn)
    def wrapper(self: RuntimeMachine, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except BaseException:
            self.failed = True
            raise

    return wrapper


@dataclass
class HandleRec:
    sid: str
    spec: Spec
    sent_id: InputId
    handle: Any  # CompletionHandle
    target: InputId | None  # the input it follows (None: rejected)
    seen: str | None = None  # the outcome's JSON once resolved


class RuntimeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.rt = Runtime.open(
            "memory://",
            config=RuntimeConfig(backoff_base=0.0, backoff_max=0.0, max_attempts=MAX_ATTEMPTS),
        )
        self.sids: list[str] = []
        self.execs: dict[str, ChaosExecutor] = {}
        self.handles: list[HandleRec] = []
        self.specs: dict[InputId, Spec] = {}
        self.sid_of: dict[InputId, str] = {}
        self.seq: dict[InputId, int] = {}
        self.next_seq = 0
        self.idem: dict[str, dict[str, tuple[Spec, InputId]]] = {}
        #: None (idle/running), "held" (retired, replacement planned) or "plain" (retired)
        self.retired: dict[str, str | None] = {}
        self.calls_when_held: dict[str, int] = {}
        self.respawns: dict[str, asyncio.Task[Any]] = {}
        self.before_reset: dict[str, set[InputId]] = {}
        self.resets: dict[str, int] = {}
        self.terminal_json: dict[InputId, str] = {}
        self.violations: list[str] = []
        self.failed = False
        self._view_cache: dict[str, dict[InputId, tuple[InputState, str]]] = {}

    # -- plumbing

    def _run(self, coro: Any) -> Any:
        self._view_cache.clear()
        try:
            return self.loop.run_until_complete(coro)
        finally:
            self._view_cache.clear()

    def _view(self, sid: str) -> dict[InputId, tuple[InputState, str]]:
        """The session's input states and their JSON, computed once per step (invariants)."""
        v = self._view_cache.get(sid)
        if v is None:
            v = {i: (s, s.to_json()) for i, s in self._states(sid).items()}
            self._view_cache[sid] = v
        return v

    def _view_states(self, sid: str) -> dict[InputId, InputState]:
        return {i: s for i, (s, _) in self._view(sid).items()}

    def _sid(self, idx: int) -> str:
        return self.sids[idx % len(self.sids)]

    def _quiet(self) -> bool:
        for sid in self.sids:
            sr = self.rt.runtime(sid)
            if sr._loop_task is not None and not self.execs[sid].parked:
                return False
            task = self.respawns.get(sid)
            if task is not None and not task.done() and not self.execs[sid].parked:
                return False
        return True

    def _fingerprint(self) -> tuple[Any, ...]:
        out: list[Any] = [self.rt.store.commits]
        for sid in self.sids:
            ex = self.execs[sid]
            sr = self.rt.runtime(sid)
            out += [ex.calls, ex.ended, ex.parked, sr.last_seq, sr._loop_task is None]
        out += [t.done() for t in self.respawns.values()]
        return tuple(out)

    async def _settle(self) -> None:
        """Let the loop run until every session is idle or parked in its executor."""
        stable = 0
        for _ in range(500):
            before = self._fingerprint()
            for _ in range(5):
                await asyncio.sleep(0)
            if self._fingerprint() == before and self._quiet():
                stable += 1
                if stable >= 2:
                    return
            else:
                stable = 0
        raise AssertionError("the runtime did not settle (a livelock, or a run that never ends)")

    def _states(self, sid: str) -> dict[InputId, InputState]:
        sr = self.rt.runtime(sid)
        return {i: sr.input_state(i) for i in sr.input_ids(include_terminal=True)}

    def _bad(self, msg: str) -> None:
        self.violations.append(msg)

    # -- setup

    @initialize(n=st.integers(1, 2))
    @_marks_failure
    def open_sessions(self, n: int) -> None:
        async def go() -> None:
            for i in range(n):
                sid = f"session-{i}"
                ex = ChaosExecutor(self, sid)
                await self.rt.create_session(session_id=sid, executor=ex)
                self.sids.append(sid)
                self.execs[sid] = ex
                self.idem[sid] = {}
                self.retired[sid] = None
                self.before_reset[sid] = set()
                self.resets[sid] = 0

        self._run(go())

    # -- accepts

    async def _accept(self, sid: str, spec: Spec) -> None:
        sr = self.rt.runtime(sid)
        inp = build_input(spec)
        n_before = len(sr.input_ids(include_terminal=True))
        known = self.idem[sid]
        # S14 does not order the checks: with several problems, any of their codes will do;
        # idempotency (S11) is judged only for an input the runtime could admit
        codes = set()
        if spec.durability == "derived" and spec.kind == "system":
            codes.add("invalid_durability")
        if self.retired[sid] is not None:
            codes.add("not_ready")
        if codes:
            exp: tuple[str, Any] = ("rejected", codes)
        elif spec.idem is not None and spec.idem in known:
            prev_spec, prev_id = known[spec.idem]
            exp = (
                ("deduplicated", prev_id)
                if prev_spec == spec
                else (
                    "rejected",
                    {"idempotency_conflict"},
                )
            )
        else:
            exp = ("accepted", None)
        kid = KIND_ID[spec.kind]
        scope: dict[InputId, InputState] = {}
        if spec.sup is not None:
            for iid, s in self.specs.items():
                if self.sid_of[iid] == sid and s.sup == spec.sup and KIND_ID[s.kind] == kid:
                    scope[iid] = sr.input_state(iid)
        idle = sr.active_run_id is None and sr.state is RuntimeState.IDLE

        h = await self.rt.accept_with_completion(sid, inp)

        out = h.outcome
        assert out.outcome_type == exp[0], f"accept {spec}: expected {exp}, got {out!r}"
        n_after = len(sr.input_ids(include_terminal=True))
        if out.outcome_type == "rejected":
            assert out.code.value in exp[1], f"accept {spec}: expected {exp}, got {out!r}"
            assert n_after == n_before, "a rejected input created state (S14)"
            self.handles.append(HandleRec(sid, spec, inp.id, h, None))
            return
        if out.outcome_type == "deduplicated":
            assert out.existing_id == exp[1] and out.input_id == inp.id, out
            assert h.input_id == exp[1]
            assert n_after == n_before, "a deduplicated input created state (S11)"
            self.handles.append(HandleRec(sid, spec, inp.id, h, exp[1]))
            return
        assert out.input_id == inp.id
        event_type = inp.event_type if isinstance(inp, ExternalEventInput) else None
        assert out.policy == POLICY.resolve(kid, idle, event_type), (spec, idle, out.policy)
        self.specs[inp.id] = spec
        self.sid_of[inp.id] = sid
        self.seq[inp.id] = self.next_seq
        self.next_seq += 1
        if spec.idem is not None:
            known[spec.idem] = (spec, inp.id)
        self.handles.append(HandleRec(sid, spec, inp.id, h, inp.id))
        now = sr.input_state(inp.id)
        if spec.kind == "projected":
            assert now.current_state is IS.CONSUMED, f"ignore input not consumed at accept: {now}"
            return
        assert now.current_state is IS.QUEUED, now
        # S2: supersession in the acceptance transaction, scope (runtime, kind, key)
        for old_id, old in scope.items():
            cur = sr.input_state(old_id)
            should = old.current_state in NON_TERMINAL_PENDING and not (
                spec.durability == "ephemeral" and self.specs[old_id].durability != "ephemeral"
            )
            if should:
                assert cur.current_state is IS.SUPERSEDED, (
                    f"S2: {old_id} ({old.current_state}) not superseded by {inp.id}"
                )
                assert cur.terminal_outcome.superseded_by == inp.id  # type: ignore[union-attr]
            else:
                assert cur.current_state is old.current_state, (
                    f"S2: {old_id} changed {old.current_state} -> {cur.current_state} "
                    f"when {inp.id} ({spec}) was accepted"
                )

    @rule(sidx=st.integers(0, 1), spec=input_specs(), then=st.none() | st.sampled_from(NEXT_RUN))
    @_marks_failure
    def accept_one(self, sidx: int, spec: Spec, then: str | None) -> None:
        """Accept one input; ``then`` is how the next run of the session behaves."""
        if then is not None:
            self.execs[self._sid(sidx)].plan.append(then)

        async def go() -> None:
            await self._accept(self._sid(sidx), spec)
            await self._settle()

        self._run(go())

    @rule(
        pick=st.integers(0, 1000),
        mode=st.sampled_from(["retry", "retry", "other_content", "newer_in_scope"]),
    )
    @_marks_failure
    def resend(self, pick: int, mode: str) -> None:
        """Send an earlier input again: a client retry (same content, new id: S11 dedup when
        keyed), other content under the same idempotency key (S11 conflict), or a newer input
        of the same supersession scope (S2)."""
        if not self.handles:
            return
        h = self.handles[pick % len(self.handles)]
        if mode == "retry":
            spec = h.spec
        elif mode == "other_content":
            spec = h.spec._replace(variant=1 - h.spec.variant)
        else:
            spec = h.spec._replace(
                variant=1 - h.spec.variant, idem=None, sup=h.spec.sup or SUP_KEYS[0]
            )

        async def go() -> None:
            await self._accept(h.sid, spec)
            await self._settle()

        self._run(go())

    @rule(
        sidx=st.integers(0, 1),
        specs=st.lists(input_specs(), min_size=2, max_size=4),
        then=st.none() | st.sampled_from(NEXT_RUN),
    )
    @_marks_failure
    def accept_burst(self, sidx: int, specs: list[Spec], then: str | None) -> None:
        """Several accepts with no loop progress in between (coalescing, supersession,
        queue order); ``then`` is how the next run of the session behaves."""
        if then is not None:
            self.execs[self._sid(sidx)].plan.append(then)

        async def go() -> None:
            for spec in specs:
                await self._accept(self._sid(sidx), spec)
            await self._settle()

        self._run(go())

    # -- the executor's plan

    @rule(
        sidx=st.integers(0, 1),
        steps=st.lists(st.sampled_from(BEHAVIOURS), min_size=1, max_size=3)
        | st.sampled_from([["fail_before"] * MAX_ATTEMPTS, ["fail_after"] * MAX_ATTEMPTS]),
    )
    @_marks_failure
    def script_runs(self, sidx: int, steps: list[str]) -> None:
        self.execs[self._sid(sidx)].plan.extend(steps)

    @rule(sidx=st.integers(0, 1), times=st.integers(1, 2))
    @_marks_failure
    def release(self, sidx: int, times: int) -> None:
        """Open the gate of a ``hold`` run (on to its next checkpoint), once or twice."""

        async def go() -> None:
            for _ in range(times):
                self.execs[self._sid(sidx)].release()
                await self._settle()

        self._run(go())

    @rule()
    @_marks_failure
    def let_it_run(self) -> None:
        async def go() -> None:
            await self._settle()
            for _ in range(20):
                await asyncio.sleep(0)
            await self._settle()

        self._run(go())

    # -- cancels

    @rule(sidx=st.integers(0, 1))
    @_marks_failure
    def cancel_run(self, sidx: int) -> None:
        sid = self._sid(sidx)

        async def go() -> None:
            sr = self.rt.runtime(sid)
            ex = self.execs[sid]
            active = sr.active_run_id
            paused = sr.paused_for is not None
            log = ex.runs.get(active) if active is not None else None
            before = self._states(sid)
            retired_plain = self.retired[sid] == "plain"
            res = await self.rt.cancel(sid)
            assert res == (active is not None or paused), (res, active, paused)
            await self._settle()
            if active is None:
                if not paused:  # S8: a cancel with no active run does nothing
                    after = self._states(sid)
                    for iid, b in before.items():
                        assert after[iid].to_json() == b.to_json(), f"idle cancel changed {iid}"
                return
            assert log is not None and log.end == "cancelled", (
                f"S8: run {active} not cancelled: {log}"
            )
            after = self._states(sid)
            for iid, b in before.items():
                nxt = after[iid].history[len(b.history) :]
                if b.current_state is IS.STAGED and iid in log.start_ids and not log.boundary:
                    want = "retired" if retired_plain else "cancelled"
                    assert nxt and nxt[0].to is IS.ABANDONED, f"S8: run-start {iid}: {nxt}"
                    assert after[iid].terminal_outcome.reason.value == want  # type: ignore[union-attr]
                elif b.current_state is IS.STAGED and iid in log.pending_join:
                    want_to = IS.ABANDONED if retired_plain else IS.QUEUED
                    assert nxt and nxt[0].to is want_to, f"S8: checkpoint joiner {iid}: {nxt}"
                elif b.current_state is IS.APPLIED_PENDING_CONSUMPTION and (
                    log.is_continuation or b.last_run_id == active
                ):
                    assert nxt and nxt[0].to is IS.CONSUMED, f"S8: applied {iid}: {nxt}"

        self._run(go())

    @rule(sidx=st.integers(0, 1), pick=st.integers(0, 1000))
    @_marks_failure
    def cancel_input(self, sidx: int, pick: int) -> None:
        sid = self._sid(sidx)

        async def go() -> None:
            sr = self.rt.runtime(sid)
            ids = sr.input_ids(include_terminal=True)
            if not ids:
                return
            iid = ids[pick % len(ids)]
            before = sr.input_state(iid)
            try:
                st_ = await self.rt.cancel_input(sid, iid)
            except InvalidOperationError:
                assert before.current_state not in NON_TERMINAL_PENDING, (
                    f"cancel_input refused a {before.current_state} input"
                )
            else:
                assert before.current_state in NON_TERMINAL_PENDING, (
                    f"cancel_input accepted a {before.current_state} input"
                )
                assert st_.current_state is IS.ABANDONED
                assert st_.terminal_outcome.reason.value == "cancelled"  # type: ignore[union-attr]
                assert iid not in sr.queued_ids()
            await self._settle()

        self._run(go())

    # -- lifecycle (S9)

    @rule(
        sidx=st.integers(0, 1),
        op=st.sampled_from(
            ["retire", "retire_for_respawn", "respawn", "respawn", "reset", "reset_and_accept"]
        ),
        spec=input_specs(),
    )
    @_marks_failure
    def lifecycle(self, sidx: int, op: str, spec: Spec) -> None:
        """``reset_and_accept``: a reset followed at once by an accept, while the fenced run
        is still unwinding in its executor (one run at a time, S9)."""
        if op == "retire":
            self.do_retire(sidx, False)
        elif op == "retire_for_respawn":
            self.do_retire(sidx, True)
        elif op == "respawn":
            self.do_respawn(sidx)
        else:
            self.do_reset(sidx, spec if op == "reset_and_accept" else None)

    def do_retire(self, sidx: int, replacement: bool) -> None:
        sid = self._sid(sidx)

        async def go() -> None:
            sr = self.rt.runtime(sid)
            before = self._states(sid)
            prev = self.retired[sid]
            want = "held" if replacement else "plain"
            res = await self.rt.retire(sid, replacement_planned=replacement)
            after = self._states(sid)
            if prev == want:
                assert res["inputs_abandoned"] == 0
            if want == "plain" and prev != want:
                n = 0
                for iid, b in before.items():
                    a = after[iid]
                    if b.current_state in NON_TERMINAL_PENDING:
                        n += 1
                        assert a.current_state is IS.ABANDONED, (
                            f"S9: retire kept {iid} {a.current_state}"
                        )
                        assert a.terminal_outcome.reason.value == "retired"  # type: ignore[union-attr]
                    else:
                        assert a.to_json() == b.to_json(), f"S9: retire changed {iid}"
                assert res["inputs_abandoned"] == n
                assert sr.queued_ids() == []
            else:
                for iid, b in before.items():
                    assert after[iid].to_json() == b.to_json(), f"S9: retire(held) changed {iid}"
            self.retired[sid] = want
            if want == "held":
                self.calls_when_held[sid] = self.execs[sid].calls
            await self._settle()

        self._run(go())

    async def _respawn(self, sid: str) -> dict[str, int] | None:
        sr = self.rt.runtime(sid)
        gen = sr.generation
        resets = self.resets[sid]
        try:
            res: dict[str, int] | None = await self.rt.respawn(sid)
        except InvalidOperationError:
            # a respawn waiting for its run gives up when the instance stops (teardown) or a
            # reset comes first (the reset wins, S9)
            if self.rt._closed or self.resets[sid] != resets:
                return None
            raise
        # no await since respawn's commit: what it left is exactly what it did
        if self.rt._closed:
            return res
        assert sr.generation == gen + 1, "S9/S10: respawn did not bump the generation"
        for iid in sr.input_ids():
            s = sr.input_state(iid)
            if (
                s.durability is not None
                and s.durability.value == "ephemeral"
                and (s.current_state in NON_TERMINAL_PENDING)
            ):
                self._bad(f"S9: respawn kept ephemeral pending input {iid}")
        if sr.active_run_id is not None and sr.state is not RuntimeState.RUNNING:
            self._bad(
                f"respawn of {sid} left state {sr.state.value} "
                f"while run {sr.active_run_id} is active"
            )
        self.retired[sid] = None
        return res

    def do_respawn(self, sidx: int) -> None:
        sid = self._sid(sidx)

        async def go() -> None:
            pending = self.respawns.get(sid)
            if pending is None or pending.done():
                if self.retired[sid] != "held":
                    self.calls_when_held[sid] = self.execs[sid].calls
                self.retired[sid] = "held"
                self.respawns[sid] = asyncio.get_running_loop().create_task(self._respawn(sid))
            await self._settle()

        self._run(go())

    def do_reset(self, sidx: int, then_accept: Spec | None = None) -> None:
        sid = self._sid(sidx)

        async def go() -> None:
            sr = self.rt.runtime(sid)
            before = self._states(sid)
            res = await self.rt.reset(sid)
            after = self._states(sid)
            n = 0
            for iid, b in before.items():
                a = after[iid]
                if b.is_terminal:
                    assert a.to_json() == b.to_json()
                    continue
                n += 1
                assert a.current_state is IS.ABANDONED, f"S9: reset kept {iid} {a.current_state}"
                assert a.terminal_outcome.reason.value == "reset"  # type: ignore[union-attr]
            assert res["inputs_abandoned"] == n
            assert sr.queued_ids() == [] and len(sr.conversation) == 0
            assert sr.state is RuntimeState.IDLE and not sr.held
            self.retired[sid] = None
            self.resets[sid] += 1
            self.before_reset[sid] = set(after)
            if then_accept is not None:
                await self._accept(sid, then_accept)
            await self._settle()

        self._run(go())

    # -- invariants

    @invariant()
    @_marks_failure
    def no_violations(self) -> None:
        for sid in self.sids:
            assert not self.execs[sid].violations, self.execs[sid].violations
        assert not self.violations, self.violations
        for task in self.respawns.values():
            if task.done():
                task.result()  # re-raise a failed respawn

    @invariant()
    @_marks_failure
    def one_run_at_a_time(self) -> None:
        for sid in self.sids:
            ex = self.execs[sid]
            assert ex.max_active <= 1, f"{sid}: {ex.max_active} concurrent runs"

    @invariant()
    @_marks_failure
    def ledger_agrees_with_store(self) -> None:
        for sid in self.sids:
            sr = self.rt.runtime(sid)
            stored = self.rt.store.input_states[sid]
            mem = self._view(sid)
            assert set(stored) == set(mem), "the store and the ledger hold different inputs"
            for iid, (s, j) in mem.items():
                assert stored[iid].current_state is s.current_state, (
                    f"{iid}: ledger {s.current_state}, store {stored[iid].current_state}"
                )
                assert stored[iid].to_json() == j, f"{iid}: store differs from ledger"
            rows = self.rt.store.conversations[sid]
            assert len(rows) == len(sr.conversation.rows)
            assert [r.digest for r in rows] == [r.digest for r in sr.conversation.rows]

    @invariant()
    @_marks_failure
    def terminal_states_never_change(self) -> None:
        for sid in self.sids:
            for iid, (s, j) in self._view(sid).items():
                if not s.is_terminal:
                    assert iid not in self.terminal_json, f"{iid} left its terminal state"
                    continue
                old = self.terminal_json.setdefault(iid, j)
                assert old == j, f"terminal input {iid} changed:\n{old}\n{j}"

    @invariant()
    @_marks_failure
    def lifecycle_shape(self) -> None:
        """Queue membership is the queued state; staged inputs belong to the active run;
        applied* never go back to queued; attempts are bounded; reasons carry their error."""
        for sid in self.sids:
            sr = self.rt.runtime(sid)
            states = self._view_states(sid)
            queued = sr.queued_ids()
            assert len(set(queued)) == len(queued), "an input is queued twice"
            assert set(queued) == {i for i, s in states.items() if s.current_state is IS.QUEUED}, (
                "the queue and the queued state disagree"
            )
            active = sr.active_run_id
            for iid, s in states.items():
                assert s.current_state is not IS.APPLIED, f"{iid} left in transient state applied"
                if s.current_state is IS.STAGED:
                    assert active is not None and s.last_run_id == active, (
                        f"{iid} staged for {s.last_run_id}, active run {active}"
                    )
                for h in s.history:
                    assert not (
                        h.from_ in (IS.APPLIED, IS.APPLIED_PENDING_CONSUMPTION)
                        and h.to is IS.QUEUED
                    ), f"S5: {iid} went back from {h.from_} to queued"
                assert s.attempt_count <= MAX_ATTEMPTS, f"{iid}: {s.attempt_count} attempts (S4)"
                out = s.terminal_outcome
                if s.current_state is IS.ABANDONED:
                    assert out is not None and out.outcome_type == "abandoned"
                    if out.reason.value == "retry_budget_exceeded":
                        assert s.attempt_count == MAX_ATTEMPTS, s
                        assert out.error is not None and TRANSIENT in out.error, out
                    if out.reason.value == "failed":
                        assert out.error is not None and PERMANENT in out.error, out

    @invariant()
    @_marks_failure
    def queue_order(self) -> None:
        """Priority lane first; in each lane, inputs returned to the front after a failed or
        cancelled run (ever staged) come first, then never-staged inputs in acceptance order."""
        for sid in self.sids:
            sr = self.rt.runtime(sid)
            queued = [sr.input_state(i) for i in sr.queued_ids()]
            lanes = [is_priority(s) for s in queued]
            assert lanes == sorted(lanes, reverse=True), "a fifo input is ahead of a priority one"
            for lane in (True, False):
                items = [s for s in queued if is_priority(s) is lane]
                staged_before = [any(h.to is IS.STAGED for h in s.history) for s in items]
                assert staged_before == sorted(staged_before, reverse=True), (
                    "a never-staged input is ahead of a returned one: "
                    f"{[s.input_id for s in items]}"
                )
                fresh = [
                    self._seq(s) for s, was in zip(items, staged_before, strict=True) if not was
                ]
                assert fresh == sorted(fresh), f"queue order is not acceptance order: {fresh}"

    def _seq(self, s: InputState) -> float:
        if s.input_id in self.seq:
            return self.seq[s.input_id]
        src = s.reconstruction_source
        if isinstance(src, CoalescingSource):
            return min(self._seq_id(i) for i in src.source_input_ids)
        return float("inf")

    def _seq_id(self, iid: InputId) -> float:
        return self.seq.get(iid, float("inf"))

    @invariant()
    @_marks_failure
    def applied_once(self) -> None:
        """S5: an input's appends are made once; an input in the conversation is applied."""
        for sid in self.sids:
            sr = self.rt.runtime(sid)
            counts = Counter(i for r in sr.conversation.rows for i in r.input_ids)
            dup = [i for i, n in counts.items() if n > 1]
            assert not dup, f"S5: inputs appended twice: {dup}"
            states = self._view_states(sid)
            for iid in counts:
                assert states[iid].current_state not in (IS.ACCEPTED, IS.QUEUED, IS.STAGED), (
                    f"{iid} is in the conversation but {states[iid].current_state}"
                )
            for iid, s in states.items():
                if iid in self.before_reset[sid]:
                    continue
                if any(h.to is IS.APPLIED for h in s.history):
                    assert counts[iid] == 1, f"applied {iid} has {counts[iid]} conversation rows"

    @invariant()
    @_marks_failure
    def runtime_state_matches_model(self) -> None:
        for sid in self.sids:
            sr = self.rt.runtime(sid)
            model = self.retired[sid]
            if model is None:
                assert sr.state in (RuntimeState.IDLE, RuntimeState.RUNNING), sr.state
                assert not sr.held
                running = sr.active_run_id is not None
                assert (sr.state is RuntimeState.RUNNING) == running, (
                    f"{sid}: state {sr.state.value} with active run {sr.active_run_id}"
                )
            else:
                assert sr.state is RuntimeState.RETIRED, (sid, model, sr.state)
                assert sr.held == (model == "held"), (sid, model, sr.held)
            if model == "held":
                assert self.execs[sid].calls == self.calls_when_held[sid], (
                    f"S9: {sid} started a run while held for a respawn"
                )

    @invariant()
    @_marks_failure
    def settled_work_is_done(self) -> None:
        """Liveness after settling: with no loop task, nothing that should run is left (S4,
        S5, S17), and a retired runtime holds no queue."""
        for sid in self.sids:
            sr = self.rt.runtime(sid)
            if sr._loop_task is not None:
                continue
            model = self.retired[sid]
            states = self._view_states(sid)
            for iid, s in states.items():
                assert s.current_state is not IS.STAGED, f"{iid} staged with no run"
                if model != "held":
                    assert s.current_state is not IS.APPLIED_PENDING_CONSUMPTION, (
                        f"S5: {iid} left applied_pending_consumption with no continuation"
                    )
            if model is None:
                waking = [i for i in sr.queued_ids() if wakes_as_if_idle(states[i])]
                assert not waking, f"S17: {sid} is idle with waking inputs queued: {waking}"
            if model == "plain":
                assert sr.queued_ids() == [], "S9: a retired runtime still holds a queue"

    @invariant()
    @_marks_failure
    def handles_resolve_as_s12_says(self) -> None:
        for sid in self.sids:
            sr = self.rt.runtime(sid)
            states = self._view_states(sid)
            not_done = 0
            for h in self.handles:
                if h.sid != sid:
                    continue
                if h.target is None:
                    assert h.handle._future is None
                    continue
                fut = h.handle._future
                final = self._resolvable(sid, states, h.target)
                if not final:
                    assert not fut.done(), (
                        f"S12: waiter of non-terminal {h.target} resolved: {fut.result()!r}"
                    )
                    not_done += 1
                    continue
                assert fut.done(), f"S12: waiter of terminal {h.target} not resolved"
                res = fut.result()
                j = res.to_json()
                if h.seen is None:
                    self._check_outcome(sid, states, h.target, res)
                    h.seen = j
                assert h.seen == j, "a waiter's outcome changed"
            assert sr.completions.pending_count() == not_done, (
                f"{sid}: registry holds {sr.completions.pending_count()} waiters, "
                f"{not_done} handles pending"
            )
            for iid in sr.completions._waiters:
                assert not self._resolvable(sid, states, iid), (
                    f"registry keeps waiters of answered input {iid}"
                )

    def _root(self, states: dict[InputId, InputState], iid: InputId) -> InputId:
        """The input whose outcome answers ``iid``'s waiters: itself, or (S12) the aggregate
        it was coalesced into, followed to the end."""
        out = states[iid].terminal_outcome
        while out is not None and out.outcome_type == "coalesced":
            iid = out.aggregate_id
            out = states[iid].terminal_outcome
        return iid

    def _resolvable(self, sid: str, states: dict[InputId, InputState], iid: InputId) -> bool:
        """Whether the input's waiters must be answered by now: it is terminal, and (S12) the
        outcome is known: a coalesced input follows its aggregate; an input consumed at its
        boundary (on_apply) is answered when its run ends."""
        s = states[iid]
        if not s.is_terminal:
            return False
        out = s.terminal_outcome
        if out is not None and out.outcome_type == "coalesced":
            return self._resolvable(sid, states, out.aggregate_id)
        if s.current_state is IS.CONSUMED and s.last_run_id is not None:
            log = self.execs[sid].runs.get(s.last_run_id)
            if log is not None and log.end == "running":
                return False
        return True

    def _check_outcome(
        self,
        sid: str,
        states: dict[InputId, InputState],
        iid: InputId,
        res: Any,
        nested: bool = False,
    ) -> None:
        """S12: the waiter outcome is a function of the terminal state and the last run.
        A coalesced input answers with its aggregate's outcome and ``via_aggregate_id``; an
        aggregate can itself be coalesced again (requeued after a failed run), and then the
        waiter names the first aggregate (``nested``: the via of deeper levels is not shown)."""
        s = states[iid]
        out = s.terminal_outcome
        assert out is not None
        got = res.outcome_type
        ctx = f"{iid} {s.current_state.value} ({out.to_json()}) -> {res.to_json()}"
        assert res.input_id == iid, ctx
        if out.outcome_type == "coalesced":
            if not nested:
                assert res.via_aggregate_id == out.aggregate_id, ctx
            inner = res.model_copy(update={"via_aggregate_id": None, "input_id": out.aggregate_id})
            self._check_outcome(sid, states, out.aggregate_id, inner, nested=True)
            return
        if not nested:
            assert res.via_aggregate_id is None, ctx
        if out.outcome_type == "consumed":
            log = self.execs[sid].runs.get(s.last_run_id) if s.last_run_id else None
            record = self.rt.runtime(sid).runs.get(s.last_run_id) if s.last_run_id else None
            if log is None and record is not None and record.status == "cancelled":
                # a cancel during a continuation pause consumes the applied inputs under a
                # cancelled run the executor never saw (S8, S12: cancelled)
                assert got == "cancelled", ctx
            elif log is None or log.end == "none":
                assert got == "completed_without_result", ctx
            elif log.end == "cancelled":
                assert got == "cancelled", ctx
            elif log.end == "completed":
                assert got == "completed" and res.result.text == log.text, ctx
            else:
                assert got in ("completed_without_result", "cancelled"), f"{ctx} ({log.end})"
        elif out.outcome_type == "superseded":
            assert got == "superseded" and res.superseded_by == out.superseded_by, ctx
            by = out.superseded_by
            assert by in self.specs and iid in self.specs, ctx
            assert KIND_ID[self.specs[by].kind] == KIND_ID[self.specs[iid].kind], ctx
            assert self.specs[by].sup == self.specs[iid].sup is not None, ctx
            assert self.seq[by] > self.seq[iid], ctx
        else:
            assert out.outcome_type == "abandoned", ctx
            if out.reason.value == "cancelled":
                assert got == "cancelled" or (got == "abandoned" and res.reason == out.reason), ctx
            else:
                assert got == "abandoned" and res.reason == out.reason, ctx
                assert res.error == out.error, ctx

    # -- teardown (S19)

    def teardown(self) -> None:
        try:
            if self.sids and not self.failed:
                self._run(self._close_and_check())
            elif self.sids:
                self._run(self.rt.close(grace=0))
        finally:
            pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.close()

    async def _close_and_check(self) -> None:
        """S19: close with runs possibly parked; every waiter resolves, none hangs."""
        resolvable: dict[int, bool] = {}
        terminal: dict[int, bool] = {}  # its outcome's root (S12: via aggregates) is terminal
        in_flight: set[InputId] = set()  # answered when a run still in flight ends
        for sid in self.sids:
            states = self._states(sid)
            in_flight |= {
                i
                for i, st_ in states.items()
                if st_.is_terminal
                and not self._resolvable(sid, states, i)
                and states[self._root(states, i)].is_terminal
            }
            for h in self.handles:
                if h.sid == sid and h.target is not None:
                    resolvable[id(h)] = self._resolvable(sid, states, h.target)
                    terminal[id(h)] = states[self._root(states, h.target)].is_terminal
                    fut = h.handle._future
                    if resolvable[id(h)] and h.seen is None:
                        assert fut.done(), f"S12: waiter of terminal {h.target} not resolved"
                        self._check_outcome(sid, states, h.target, fut.result())
                        h.seen = fut.result().to_json()
        await self.rt.close(grace=0)
        for _ in range(20):
            await asyncio.sleep(0)
        for task in self.respawns.values():
            # a respawn still waiting for its run when the instance stops gives up (S9, S19)
            with contextlib.suppress(InvalidOperationError):
                await asyncio.wait_for(asyncio.shield(task), 1.0)
        for h in self.handles:
            if h.target is None:
                continue
            fut = h.handle._future
            assert fut.done(), f"S12/S19: waiter of {h.target} still pending after close"
            res = fut.result()
            if resolvable[id(h)]:
                assert h.seen is not None and res.to_json() == h.seen, res
            elif terminal[id(h)]:
                # consumed at its boundary in the run the close stopped: S8 + S12, cancelled
                assert res.outcome_type == "cancelled", f"S12: {h.target} -> {res!r}"
            else:
                # the input (or the aggregate it was coalesced into) lives on
                assert res.outcome_type == "terminated", f"S19: {h.target} -> {res!r}"
                assert res.input_id == h.target, f"terminated outcome names {res.input_id}"
        for sid in self.sids:
            sr = self.rt.runtime(sid)
            assert sr.state is RuntimeState.STOPPED, f"{sid} is {sr.state.value} after close"
            assert self.execs[sid].max_active <= 1
            # S12: a waiter registered after the close never hangs
            for iid in sr.input_ids(include_terminal=True):
                st_ = sr.input_state(iid)
                if (
                    TOLERATE_BUG6_WAIT_AFTER_CLOSE_ON_COALESCED
                    and st_.current_state is IS.COALESCED
                    and iid not in in_flight
                    and not self._resolvable(sid, self._states(sid), iid)
                ):
                    continue
                fut = sr.register_waiter(iid)
                for _ in range(3):
                    await asyncio.sleep(0)
                assert fut.done(), f"S12: a wait on {iid} after close hangs"
                res = fut.result()
                states = self._states(sid)
                if iid in in_flight:
                    assert res.outcome_type == "cancelled", (iid, res)
                elif states[self._root(states, iid)].is_terminal:
                    assert res.outcome_type != "terminated", (iid, res)
                else:
                    assert res.outcome_type == "terminated", (iid, res)


# --- the tests ----------------------------------------------------------------------------


def test_runtime_state_machine() -> None:
    run_state_machine_as_test(
        RuntimeMachine,
        settings=settings(
            max_examples=100,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("MEERKAT_SLOW_TESTS") != "1", reason="set MEERKAT_SLOW_TESTS=1 to run"
)
def test_runtime_state_machine_slow() -> None:
    run_state_machine_as_test(
        RuntimeMachine,
        settings=settings(
            max_examples=500,
            stateful_step_count=60,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


# --- bugs found by the machine, as minimal examples ----------------------------------------
# Each is the shrunk path of a run the machine failed, written as a plain test. They were
# strict xfails until the fixes of commit 4fe3494; now they guard against regressions.

CFG = RuntimeConfig(backoff_base=0.0, backoff_max=0.0, max_attempts=MAX_ATTEMPTS)


class GateExecutor:
    """Run 1: commit, wait at the gate, [checkpoint (joining what is queued), wait at the gate
    again], then fail (transient). Later runs: commit and park until cancelled."""

    def __init__(self, checkpoint: bool) -> None:
        self.checkpoint = checkpoint
        self.calls = 0
        self.gate = asyncio.Event()
        self.parked = asyncio.Event()

    async def _wait_gate(self, run: RunContext) -> None:
        self.parked.set()
        await run.guard(self.gate.wait())
        self.gate = asyncio.Event()

    async def open_gate_and_wait_parked(self) -> None:
        self.parked.clear()
        self.gate.set()
        await asyncio.wait_for(self.parked.wait(), 2)

    async def apply(self, run: RunContext) -> RunResult | None:
        self.calls += 1
        await run.commit_boundary(messages_from(run.primitive))
        if self.calls > 1:
            self.parked.set()
            await run.guard(asyncio.sleep(3600))
        await self._wait_gate(run)
        if self.checkpoint:
            joined = await run.checkpoint()
            if joined is not None:
                run.append(*messages_from(joined))
            await self._wait_gate(run)
        raise RunFailure(f"{TRANSIENT} after the boundary")


async def _spin(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_regression_bug1_respawn_pending_at_close_leaves_runtime_stopped() -> None:
    """BUG-1: a respawn waiting for the active run completed after ``close()`` and revived
    the stopped runtime (state idle, generation bumped: a write by a stopped instance)."""
    from tests.helpers import ScriptedExecutor

    rt = Runtime.open("memory://", config=CFG)
    ex = ScriptedExecutor(["hang"])
    s = await rt.create_session(executor=ex)
    await rt.accept(s.id, PromptInput.new("work"))
    await asyncio.wait_for(ex.started.wait(), 2)
    respawn = asyncio.create_task(rt.respawn(s.id))  # waits for the hanging run
    await _spin()
    generation = rt.runtime(s.id).generation
    await rt.close(grace=0)
    with pytest.raises(InvalidOperationError):
        await asyncio.wait_for(respawn, 2)
    assert rt.runtime_state(s.id) is RuntimeState.STOPPED
    assert rt.runtime(s.id).generation == generation


async def test_regression_bug2_stop_answers_boundary_consumed_input() -> None:
    """BUG-2: stop/close fenced the active run without recording it cancelled, so an input it
    had consumed at its boundary was answered ``terminated`` and a later wait hung (S12)."""
    from tests.helpers import ScriptedExecutor

    rt = Runtime.open("memory://", config=CFG)
    ex = ScriptedExecutor(["hang"])
    s = await rt.create_session(executor=ex)
    # system_generated is inject_now / on_accept (read as on_apply): consumed at the boundary
    h = await rt.accept_with_completion(s.id, SystemGeneratedInput.new("scheduler", "tick"))
    await asyncio.wait_for(ex.started.wait(), 2)
    await _spin()
    assert rt.input_state(s.id, h.input_id).current_state is IS.CONSUMED
    await rt.close(grace=0)
    out = await h.wait(1)
    assert out.outcome_type == "cancelled", out
    later = await rt.wait(s.id, h.input_id, timeout=0.5)
    assert later.outcome_type == "cancelled", later


async def test_regression_bug3_retired_run_failure_abandons_checkpoint_joiners() -> None:
    """BUG-3: a run failing after a checkpoint put its staged joiners back in the queue of a
    runtime retired meanwhile (stranded ``queued``); S9: they end ``{retired}``."""
    rt = Runtime.open("memory://", config=CFG)
    ex = GateExecutor(checkpoint=True)
    s = await rt.create_session(executor=ex)
    await rt.accept(s.id, PromptInput.new("work"))
    await asyncio.wait_for(ex.parked.wait(), 2)
    joiner = await rt.accept(s.id, PeerInput.new("note", peer_id="peer-a"))
    await ex.open_gate_and_wait_parked()  # checkpoint: the peer message joins (staged)
    assert rt.input_state(s.id, joiner.input_id).current_state is IS.STAGED
    await rt.retire(s.id)  # no replacement
    ex.gate.set()  # the run fails
    await _spin()
    st_ = rt.input_state(s.id, joiner.input_id)
    queued = rt.runtime(s.id).queued_ids()
    await rt.close(grace=0)
    assert st_.current_state is IS.ABANDONED, st_.current_state
    assert st_.terminal_outcome.reason.value == "retired"  # type: ignore[union-attr]
    assert queued == []


async def test_regression_bug4_retired_continuation_refuses_input() -> None:
    """BUG-4: a continuation in a retired runtime set its state to ``running``, so the retired
    runtime accepted input while it ran (S9: refused) and stranded it in its queue."""
    rt = Runtime.open("memory://", config=CFG)
    ex = GateExecutor(checkpoint=False)
    s = await rt.create_session(executor=ex)
    await rt.accept(s.id, PromptInput.new("work"))
    await asyncio.wait_for(ex.parked.wait(), 2)
    await rt.retire(s.id)  # no replacement; the prompt is applied, so it is kept
    await ex.open_gate_and_wait_parked()  # fails after its boundary: a continuation runs
    state = rt.runtime_state(s.id)
    late = await rt.accept(s.id, PromptInput.new("late"))
    await rt.close(grace=0)
    assert state is RuntimeState.RETIRED, state
    assert late.outcome_type == "rejected" and late.code.value == "not_ready", late


async def test_regression_bug5_reset_during_respawn_wins() -> None:
    """BUG-5: a respawn waiting for the active run, then reset + accept: the new input's run
    started first and the resuming respawn set state ``idle`` (and bumped the generation)
    under it. Now the reset wins and the respawn gives up."""
    from tests.helpers import ScriptedExecutor

    rt = Runtime.open("memory://", config=CFG)
    ex = ScriptedExecutor(["hang", "hang"])
    s = await rt.create_session(executor=ex)
    await rt.accept(s.id, PromptInput.new("one"))
    await asyncio.wait_for(ex.started.wait(), 2)
    respawn = asyncio.create_task(rt.respawn(s.id))  # waits for the hanging run
    await _spin(5)
    await rt.reset(s.id)  # fences the run; the respawn is still waiting for it to end
    await rt.accept(s.id, PromptInput.new("two"))
    with pytest.raises(InvalidOperationError):
        await asyncio.wait_for(respawn, 2)
    await _spin()
    sr = rt.runtime(s.id)
    active, state = sr.active_run_id, sr.state
    await rt.close(grace=0)
    assert active is not None
    assert state is RuntimeState.RUNNING, state


async def test_bug6_wait_after_close_on_coalesced() -> None:
    from tests.helpers import ScriptedExecutor

    def progress(n: int) -> PeerInput:
        conv = ResponseProgressConvention(request_id="r", phase=ResponseProgressPhase.IN_PROGRESS)
        return PeerInput.new(f"progress {n}", peer_id="peer-b", convention=conv)

    rt = Runtime.open("memory://", config=CFG)
    ex = ScriptedExecutor(["hang"])
    s = await rt.create_session(executor=ex)
    source = await rt.accept(s.id, progress(1))
    await rt.accept(s.id, progress(2))
    await rt.accept(s.id, PromptInput.new("go"))  # the run start coalesces the two (S3)
    await asyncio.wait_for(ex.started.wait(), 2)
    out = rt.input_state(s.id, source.input_id).terminal_outcome
    assert out is not None and out.outcome_type == "coalesced"
    await rt.close(grace=0)
    agg = await rt.wait(s.id, out.aggregate_id, timeout=0.5)
    assert agg.outcome_type == "terminated"
    later = await rt.wait(s.id, source.input_id, timeout=0.5)  # today: TimeoutError
    assert later.outcome_type == "terminated" and later.via_aggregate_id == out.aggregate_id
