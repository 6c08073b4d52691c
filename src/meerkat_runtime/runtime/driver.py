"""One logical runtime: its inbox, ledger, queue, state machine, runs and waiters.

This is the control plane's heart. Every operation is a synchronous mutation of the in-memory
state that builds one ``Txn``, submits it to the store, then (outside any lock) awaits its
durability. Because no mutation awaits, asyncio's single thread makes each operation atomic
with respect to every other: there is no lock to hold, so the executor is never called while
one is held.

Invariants (the spec's rules, held here):
- An input is in exactly one lifecycle state; terminal states never change (input_state.py).
- At most one run per runtime (``_active``); the next starts only after the executor's
  ``apply`` has returned, even when the run was fenced by reset or destroy.
- Queue order is preserved: inputs leave the queue in order, and inputs of a failed or
  cancelled run return to its front in their original order (S4, S8).
- ``applied`` inputs never return to the queue; a run that fails after its boundary is followed
  by a continuation until they are consumed or their attempts are spent (S5).
- Every waiter is resolved exactly once: at the input's terminal state with the outcome S12
  maps it to, or ``terminated`` when this instance stops.
- S20 (with ``peer_correlation``, set for sessions that have a comms name): a peer response
  is admitted only if its request id is outstanding at this runtime (the requester) and was
  sent to the responding peer; otherwise it is rejected ``invalid`` and nothing is recorded.
  A terminal response closes its request in the transaction that accepts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, TypeVar

from pydantic import TypeAdapter, ValidationError

from .._crash import crashpoint
from .._ids import InputId, RunId
from .._json import compact
from .._time import utcnow
from ..core.lifecycle import (
    ConversationAppend,
    ConversationAppendRole,
    ConversationContextAppend,
    CoreExecutor,
    Message,
    RunApplyBoundary,
    RunBoundaryReceipt,
    RunCancelled,
    RunFailure,
    RunFenced,
    RunResult,
    StagedInput,
    StagedRunInput,
    TextRenderable,
)
from ..core.session import Conversation
from ..errors import InputNotFoundError, InvalidOperationError
from ..store.base import (
    IdempotencyRecord,
    InboxEntry,
    LoadedRuntime,
    PeerRequestClose,
    PeerRequestRecord,
    RunRecord,
    RuntimeStore,
    StoreError,
    Txn,
)
from .completion import CompletionRegistry
from .events import RuntimeEventEnvelope
from .input_state import (
    CoalescingSource,
    InputAbandonReason,
    InputLifecycleState,
    InputState,
    ProjectionSource,
    ReconstructionSource,
)
from .inputs import (
    ExternalEventInput,
    FlowStepInput,
    Input,
    InputDurability,
    InputHeader,
    PeerInput,
    PeerOrigin,
    ProjectedInput,
    PromptInput,
    ResponseProgressConvention,
    ResponseTerminalConvention,
    SystemGeneratedInput,
    SystemOrigin,
    content_hash,
    kind_id,
    parse_input,
    render_input_text,
    validate_durability,
)
from .outcomes import (
    Accepted,
    AcceptOutcome,
    Deduplicated,
    RejectCode,
    Rejected,
    TerminatedWait,
    WaitOutcome,
    outcome_of,
    with_via,
)
from .policy import (
    ApplyMode,
    ConsumePoint,
    PolicyDecision,
    PolicySnapshot,
    PolicyTable,
    QueueMode,
    WakeMode,
)
from .queue import InputQueue
from .state import RuntimeState

__all__ = ["Rebuilders", "RuntimeConfig", "SessionRuntime", "validate_input"]

_INPUT_TYPES = (
    PromptInput,
    PeerInput,
    FlowStepInput,
    ExternalEventInput,
    SystemGeneratedInput,
    ProjectedInput,
)

IS = InputLifecycleState
T = TypeVar("T")


@dataclass(slots=True)
class RuntimeConfig:
    """Limits and timings of a runtime. Defaults are the spec's."""

    max_input_bytes: int = 1 << 20  # S14 too_large
    max_pending_inputs: int = 10_000  # S14 queue_full
    max_attempts: int = 3  # S4
    backoff_base: float = 0.5  # S4: first retry after this many seconds, doubling
    backoff_max: float = 30.0
    idempotency_window: timedelta = field(default_factory=lambda: timedelta(days=7))  # S11
    event_retention: int = 10_000  # S15: events kept per runtime (memory ring and store)
    retention_window: timedelta = field(default_factory=lambda: timedelta(days=7))  # S18
    prune_interval: float = 60.0  # S18: seconds between pruning passes
    recovery_accept_wait: float = 5.0  # S7
    shutdown_grace: float = 10.0  # S19


ProjectionRebuilder = Callable[[ProjectionSource, Input], Input | None]


@dataclass(slots=True)
class Rebuilders:
    """How derived inputs are rebuilt at respawn and recovery (S13): projections by rule id;
    coalescing aggregates from their sources (built in)."""

    projection: dict[str, ProjectionRebuilder] = field(default_factory=dict)


class _Entry:
    __slots__ = ("event_type", "input", "kind", "order", "policy", "priority", "state", "wakes")

    def __init__(
        self, input: Input, state: InputState, policy: PolicyDecision, wakes: bool, kind: str
    ) -> None:
        self.input = input
        self.state = state
        self.policy = policy
        self.wakes = wakes
        self.kind = kind
        self.event_type = input.event_type if isinstance(input, ExternalEventInput) else None
        self.priority = policy.is_priority
        self.order = 0  # queue position persisted with the state (ascending = earlier)


class _Run:
    """One run in flight. ``pending_apply`` are staged ids whose appends the next commit
    carries; ``applied`` are the ids this run will consume when it completes."""

    __slots__ = (
        "applied",
        "boundary_committed",
        "buffer",
        "cancel_reason",
        "cancelled",
        "consumed_early",
        "done",
        "fenced",
        "head",
        "interrupt",
        "is_continuation",
        "next_sequence",
        "pending_apply",
        "pending_join",
        "pre_state",
        "record",
        "run_id",
        "start_ids",
    )

    def __init__(self, run_id: RunId, record: RunRecord, is_continuation: bool) -> None:
        self.run_id = run_id
        self.record = record
        self.is_continuation = is_continuation
        self.head: InputId | None = None
        self.start_ids: list[InputId] = []
        self.pending_apply: list[InputId] = []
        self.pending_join: list[InputId] = []
        self.applied: list[InputId] = []
        self.consumed_early: list[InputId] = []
        self.buffer: list[Message] = []
        self.boundary_committed = False
        self.next_sequence = 0
        self.fenced = False
        self.cancel_reason = ""
        self.cancelled = asyncio.Event()
        self.interrupt = asyncio.Event()
        self.done = asyncio.Event()
        self.pre_state = RuntimeState.IDLE


class SessionRuntime:
    """The runtime of one logical runtime id (a session's id)."""

    def __init__(
        self,
        runtime_id: str,
        store: RuntimeStore,
        executor: CoreExecutor,
        *,
        policy: PolicyTable,
        config: RuntimeConfig | None = None,
        rebuilders: Rebuilders | None = None,
        on_event: Callable[[RuntimeEventEnvelope], None] | None = None,
    ) -> None:
        self.runtime_id = runtime_id
        self.store = store
        self.executor = executor
        self.policy_table = policy
        self.config = config or RuntimeConfig()
        self.rebuilders = rebuilders or Rebuilders()
        self._on_event = on_event
        self.state = RuntimeState.IDLE
        self.generation = 1
        self.held = False  # retire(replacement_planned=True): nothing runs, accepts refused
        self._ready = asyncio.Event()
        self._ready.set()
        self._entries: dict[InputId, _Entry] = {}
        self._queue = InputQueue()
        self._idem: dict[str, tuple[InputId, str, datetime]] = {}
        self._scopes: dict[tuple[str, str], list[InputId]] = {}
        self._waking = 0  # queued inputs whose as-if-idle policy wakes (S17)
        self._joinable = 0  # queued inputs that may join a boundary (S16, S17)
        self._coalescable = 0  # queued inputs with queue mode coalesce (S3)
        self._order_back = 0  # queue positions: appends count up, returns to the front down
        self._order_front = 0
        self._nonterminal = 0
        self._pending_consumption: dict[InputId, None] = {}
        self._continuation_pending = False
        self._paused_until: float | None = None
        self._retry_input: InputId | None = None  # the head waiting out a retry pause
        self.conversation = Conversation()
        self._events: deque[RuntimeEventEnvelope] = deque(maxlen=self.config.event_retention)
        self._next_seq = 1
        self._event_signal = asyncio.Event()
        self.completions = CompletionRegistry()
        self.runs: dict[RunId, RunRecord] = {}
        self._active: _Run | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed_reason: str | None = None
        self._closing = False
        self._epoch = 0  # bumped by reset and destroy: a respawn waiting across one gives up
        self.failure: BaseException | None = None  # the store error that stopped this instance
        # S20: check peer responses against this runtime's outstanding requests (the host sets
        # it for sessions with a comms name); request ids closed by this instance
        self.peer_correlation = False
        self._closed_requests: set[str] = set()

    # ------------------------------------------------------------------ transactions

    def _txn(self, durable: bool = False) -> Txn:
        return Txn(self.runtime_id, self.generation, durable=durable)

    def _emit(self, txn: Txn, category: str, data: dict[str, Any] | None, now: datetime) -> None:
        env = RuntimeEventEnvelope.make(self._next_seq, now, self.runtime_id, category, data)
        self._next_seq += 1
        txn.events.append(env)

    def _emit_input(self, txn: Txn, code: str, now: datetime, **data: Any) -> None:
        payload: dict[str, Any] = {"code": code}
        for k, v in data.items():
            if v is not None:
                payload[k] = str(v) if isinstance(v, (InputId, RunId)) else v
        self._emit(txn, "input_lifecycle", payload, now)

    def _emit_run(self, txn: Txn, code: str, now: datetime, **data: Any) -> None:
        payload: dict[str, Any] = {"code": code}
        for k, v in data.items():
            if v is None:
                continue
            if isinstance(v, (InputId, RunId)):
                v = str(v)
            elif isinstance(v, list):
                v = [str(x) for x in v]
            payload[k] = v
        self._emit(txn, "run_lifecycle", payload, now)

    def _set_state(self, txn: Txn, to: RuntimeState, now: datetime) -> None:
        if self.state is to:
            return
        src = self.state
        self.state = to
        txn.runtime_state = to
        self._emit(txn, "runtime_state_change", {"from": src.value, "to": to.value}, now)

    def _submit(self, txn: Txn) -> Awaitable[None]:
        """Hand ``txn`` to the store; publish its events now (in seq order) and run its
        after-commit actions (waiter resolution) once it is durable."""
        fut = self.store.submit(txn)
        if isinstance(fut, asyncio.Future):
            fut.add_done_callback(self._check_commit)
        if txn.events:
            self._publish(txn.events)
        if txn.after_commit:
            callbacks = txn.after_commit

            def _run_callbacks(f: Any = None) -> None:
                if f is not None and (f.cancelled() or f.exception() is not None):
                    return
                for cb in callbacks:
                    cb()

            if isinstance(fut, asyncio.Future) and fut.done():
                _run_callbacks(fut)
            elif isinstance(fut, asyncio.Future):
                fut.add_done_callback(_run_callbacks)
            else:
                fut = asyncio.ensure_future(fut)
                fut.add_done_callback(_run_callbacks)
        return fut

    def _publish(self, events: list[RuntimeEventEnvelope]) -> None:
        """Hand events to in-process subscribers (the ring, the signal, ``on_event``)."""
        self._events.extend(events)
        self._event_signal.set()
        self._event_signal = asyncio.Event()
        if self._on_event is not None:
            for e in events:
                self._on_event(e)

    def emit_agent(self, run: _Run, data: dict[str, Any]) -> None:
        """Publish an agent event of ``run`` in the session's event sequence (S15).

        Text deltas get a ``seq`` and live only in the in-memory ring; every other agent event
        is also written, in its own transaction submitted now, so stored events keep ascending
        ``seq`` order whatever commits follow. The write is not awaited (events are reports,
        not state): a crash may lose the last few, never reorder them. A fenced or finished
        run's events are dropped, so nothing it reports outlives its ownership.
        """
        if run.fenced or self._active is not run or self._closed_reason is not None:
            return
        env = RuntimeEventEnvelope.make(self._next_seq, utcnow(), self.runtime_id, "agent", data)
        self._next_seq += 1
        if data.get("type") == "text_delta":
            self._publish([env])
            return
        txn = self._txn()
        txn.events.append(env)
        self._submit(txn)

    def _check_commit(self, fut: asyncio.Future[None]) -> None:
        """A failed commit means memory is ahead of the store: this instance stops (its next
        open recovers from what the store holds, S7/S10) and says why."""
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None and self._closed_reason is None:
            self.failure = exc
            self.stop(f"store write failed, instance stopped: {exc}")

    async def _commit(self, txn: Txn) -> None:
        fut = self._submit(txn)
        # Commits are shielded: a cancelled caller does not cancel its own transaction (S6).
        await self._durable(fut)

    async def _durable(self, fut: Awaitable[None]) -> None:
        """Await a commit; any failure reaches the caller as a ``StoreError`` that names the
        store and the problem (this instance has stopped by then, see ``_check_commit``)."""
        try:
            await asyncio.shield(fut)
        except Exception as exc:
            if self._closed_reason is None:  # stop now, before the caller writes anything else
                self.failure = exc
                self.stop(f"store write failed, instance stopped: {exc}")
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"store {self.store.url}: {exc}") from exc

    # ------------------------------------------------------------------ small helpers

    def _transition(
        self,
        txn: Txn,
        entry: _Entry,
        to: InputLifecycleState,
        now: datetime,
        reason: str | None = None,
    ) -> None:
        was_terminal = entry.state.is_terminal
        entry.state.transition(to, reason, now)
        txn.touch(entry.state)
        if not was_terminal and entry.state.is_terminal:
            self._on_terminal(txn, entry)

    def _on_terminal(self, txn: Txn, entry: _Entry) -> None:
        self._nonterminal -= 1
        self._pending_consumption.pop(entry.state.input_id, None)
        key = entry.input.header.supersession_key
        if key is not None:
            scope = (entry.kind, str(key))
            lst = self._scopes.get(scope)
            if lst is not None:
                with contextlib.suppress(ValueError):
                    lst.remove(entry.state.input_id)
                if not lst:
                    del self._scopes[scope]
        iid = entry.state.input_id
        txn.after_commit.append(lambda: self._resolve_waiters(iid))

    def _abandon(
        self,
        txn: Txn,
        entry: _Entry,
        reason: InputAbandonReason,
        now: datetime,
        error: str | None = None,
    ) -> None:
        st = entry.state
        self._dequeue(entry)
        st.abandon(reason, error, now)
        txn.touch(st)
        self._on_terminal(txn, entry)
        self._emit_input(
            txn, "abandoned", now, input_id=st.input_id, reason=reason.value, error=error
        )

    def _enqueue(self, entry: _Entry, txn: Txn | None = None) -> None:
        self._order_back += 1
        entry.order = self._order_back
        self._queue.push_back(entry.state.input_id, entry.priority)
        if txn is not None:
            txn.queue_orders[entry.state.input_id] = entry.order
        self._count(entry, 1)

    def _dequeue(self, entry: _Entry) -> None:
        if self._queue.remove(entry.state.input_id):
            self._count(entry, -1)

    def _count(self, entry: _Entry, delta: int) -> None:
        """Keep the queue's counters (waking, joinable, coalescable) exact, so starting a
        run and taking a checkpoint scan the queue only when something can join or merge."""
        if entry.wakes:
            self._waking += delta
        if entry.policy.joins_boundaries:
            self._joinable += delta
        if entry.policy.queue_mode is QueueMode.COALESCE:
            self._coalescable += delta

    def _clear_queue(self) -> None:
        self._queue.clear()
        self._waking = self._joinable = self._coalescable = 0

    def _entry(self, input_id: InputId) -> _Entry:
        e = self._entries.get(input_id)
        if e is None:
            raise InputNotFoundError(str(input_id), f"session {self.runtime_id}")
        return e

    # ------------------------------------------------------------------ accept

    def _reject(self, reason: str, code: RejectCode) -> Rejected:
        return Rejected(reason=reason, code=code)

    async def accept(
        self,
        raw: Input | str | bytes | dict[str, Any],
        *,
        reconstruction_source: ReconstructionSource | None = None,
        register_waiter: bool = False,
        from_inbox: int | None = None,
    ) -> tuple[AcceptOutcome, asyncio.Future[Any] | None]:
        """Admit one input (S11, S13, S14, S2). Never raises for input problems.

        Returns the outcome and, with ``register_waiter``, a future that resolves with the
        input's waiter outcome (for ``deduplicated``: the existing input's).
        """
        checked = validate_input(raw, self.config.max_input_bytes, reconstruction_source)
        if isinstance(checked, Rejected):
            return checked, None
        input, reconstruction_source = checked
        durability = input.header.durability

        # -- state gate (S7: accept waits while recovering)
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), self.config.recovery_accept_wait)
            except TimeoutError:
                return self._reject(
                    f"session {self.runtime_id} is still recovering; try again shortly",
                    RejectCode.NOT_READY,
                ), None
        # -- S20: the requester's record of the request (read before the synchronous part)
        response = _peer_response(input) if self.peer_correlation else None
        request: PeerRequestRecord | None = None
        if response is not None:
            request = await self.store.load_peer_request(self.runtime_id, response.request_id)
        if self.held or not self.state.can_accept_input:
            why = "held for a planned respawn" if self.held else f"in state {self.state.value}"
            return self._reject(
                f"session {self.runtime_id} does not accept input: its runtime is {why}",
                RejectCode.NOT_READY,
            ), None

        # -- idempotency (S11)
        now = utcnow()
        key = input.header.idempotency_key
        chash: str | None = None
        if key is not None:
            chash = content_hash(input)
            hit = self._idem.get(key.value) if from_inbox is None else None
            if hit is not None:
                existing_id, existing_hash, at = hit
                if now - at > self.config.idempotency_window:
                    del self._idem[key.value]
                elif existing_hash == chash:
                    txn = self._txn()
                    self._emit_input(
                        txn, "deduplicated", now, input_id=input.id, existing_id=existing_id
                    )
                    self._submit(txn)
                    # an existing input from an earlier process may be terminal and not in
                    # memory: the host then answers from the store
                    known = existing_id in self._entries
                    fut = self.register_waiter(existing_id) if register_waiter and known else None
                    return Deduplicated(input_id=input.id, existing_id=existing_id), fut
                else:
                    return self._reject(
                        f"idempotency key {key.value!r} was already used by input {existing_id} "
                        "with different content; use a new key for a different request",
                        RejectCode.IDEMPOTENCY_CONFLICT,
                    ), None
        if input.id in self._entries:
            return self._reject(
                f"an input with id {input.id} was already accepted; give each input a fresh id "
                "(or an idempotency key to make retries safe)",
                RejectCode.INVALID,
            ), None
        if response is not None:
            assert isinstance(input, PeerInput)
            problem = self._uncorrelated(input, response, request)
            if problem is not None:
                return self._reject(problem, RejectCode.INVALID), None

        # -- admission (S14)
        if self._nonterminal >= self.config.max_pending_inputs:
            return self._reject(
                f"session {self.runtime_id} already holds {self._nonterminal} pending inputs "
                f"(limit {self.config.max_pending_inputs}); wait for some to finish",
                RejectCode.QUEUE_FULL,
            ), None

        # -- policy
        kind = kind_id(input)
        event_type = input.event_type if isinstance(input, ExternalEventInput) else None
        idle = self.state is RuntimeState.IDLE and self._active is None
        policy = self.policy_table.resolve(kind, idle, event_type)
        as_if_idle = policy if idle else self.policy_table.resolve(kind, True, event_type)

        state = InputState.new_accepted(input.id, now)
        state.durability = durability
        state.idempotency_key = key
        state.policy = PolicySnapshot(version=policy.policy_version, decision=policy)
        state.reconstruction_source = reconstruction_source
        state.persisted_input = input
        entry = _Entry(input, state, policy, as_if_idle.wakes, kind)
        self._entries[input.id] = entry
        self._nonterminal += 1
        if key is not None and chash is not None:
            self._idem[key.value] = (input.id, chash, now)

        txn = self._txn(durable=durability is not InputDurability.EPHEMERAL)
        txn.touch(state)
        if key is not None and chash is not None and from_inbox is None:
            txn.idempotency.append(IdempotencyRecord(key.value, input.id, chash, now))
        if from_inbox is not None:
            txn.inbox_done.append(from_inbox)
        if isinstance(response, ResponseTerminalConvention):
            # S20: the terminal response closes its request in its acceptance transaction
            self._closed_requests.add(response.request_id)
            closed_by = key.value if key is not None else str(input.id)
            txn.peer_request_closes.append(
                PeerRequestClose(response.request_id, response.status.value, now, closed_by)
            )
        self._emit_input(txn, "accepted", now, input_id=input.id)
        if policy.consumed_at_accept:
            self._transition(txn, entry, IS.CONSUMED, now, "ignore: consumed at accept")
            self._emit_input(txn, "consumed", now, input_id=input.id)
        else:
            self._supersede_scope(txn, entry, now)
            state.transition(IS.QUEUED, None, now)
            self._enqueue(entry, txn)
            self._emit_input(txn, "queued", now, input_id=input.id)
            if (
                self._active is not None
                and not self._active.fenced
                and policy.wake_mode is WakeMode.INTERRUPT_YIELDING
            ):
                self._active.interrupt.set()

        fut = self.register_waiter(input.id) if register_waiter else None
        outcome = Accepted(input_id=input.id, policy=policy, state=state.clone())
        pending = self._submit(txn)
        self._kick()
        if txn.durable:
            await self._durable(pending)  # durable before ack (S6)
            crashpoint("accept.committed")
        else:
            _ignore_result(pending)  # ephemeral: rides along with the next commit (S6)
        return outcome, fut

    def _uncorrelated(
        self,
        input: PeerInput,
        response: ResponseProgressConvention | ResponseTerminalConvention,
        request: PeerRequestRecord | None,
    ) -> str | None:
        """Why a peer response may not be admitted (S20), or None if it may."""
        rid = response.request_id
        what = f"peer response to request {rid!r} rejected:"
        if request is None:
            return (
                f"{what} no request with that id is outstanding at session {self.runtime_id} "
                "(responses answer requests this session sent)"
            )
        if rid in self._closed_requests or request.closed_at is not None:
            status = request.status or "closed"
            return f"{what} the request is already closed ({status}); it took its terminal response"
        src = input.header.source
        sender_runtime = (
            src.runtime_id.value if isinstance(src, PeerOrigin) and src.runtime_id else None
        )
        sender_name = src.peer_id if isinstance(src, PeerOrigin) else None
        if sender_runtime is not None:
            matches = sender_runtime == request.responder_runtime_id
        else:
            matches = sender_name is not None and sender_name == request.responder_name
        if not matches:
            sender = sender_name or src.type
            return (
                f"{what} it was sent to peer {request.responder_name or '?'} (session "
                f"{request.responder_runtime_id}), not to {sender}"
            )
        return None

    def _supersede_scope(self, txn: Txn, entry: _Entry, now: datetime) -> None:
        """S2: the new input supersedes older accepted/queued inputs of its scope."""
        key = entry.input.header.supersession_key
        if key is None:
            if entry.policy.queue_mode is not QueueMode.SUPERSEDE:
                return
            scope_key = ""  # queue mode supersede without a key: the kind is the scope
        else:
            scope_key = key.value
        scope = (entry.kind, scope_key)
        new_id = entry.state.input_id
        ephemeral = entry.input.header.durability is InputDurability.EPHEMERAL
        older = self._scopes.get(scope, [])
        for old_id in list(older):
            old = self._entries[old_id]
            if old.state.current_state not in (IS.ACCEPTED, IS.QUEUED):
                continue
            if ephemeral and old.input.header.durability is not InputDurability.EPHEMERAL:
                continue
            self._dequeue(old)
            old.state.supersede(new_id, now)
            txn.touch(old.state)
            self._on_terminal(txn, old)
            self._emit_input(txn, "superseded", now, input_id=old_id, superseded_by=new_id)
        self._scopes.setdefault(scope, []).append(new_id)

    # ------------------------------------------------------------------ waiters

    def register_waiter(self, input_id: InputId) -> asyncio.Future[Any]:
        """A future for the input's waiter outcome; already resolved for terminal inputs."""
        entry = self._entries.get(input_id)
        if entry is None:
            raise InputNotFoundError(str(input_id), f"session {self.runtime_id}")
        if entry.state.is_terminal:
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            outcome = self.outcome_for(input_id)
            if outcome is not None:
                fut.set_result(outcome)
                return fut
            out = entry.state.terminal_outcome
            if out is None or out.outcome_type != "coalesced":
                if self._closed_reason is not None:
                    fut.set_result(TerminatedWait(input_id=input_id, reason=self._closed_reason))
                    return fut
                # consumed early in a run still in flight: answered when that run ends
                return self.completions.register(input_id)
            # coalesced into a still-pending aggregate: follow it
            agg = out.aggregate_id
            if self._closed_reason is not None:
                fut.set_result(
                    TerminatedWait(
                        input_id=input_id, via_aggregate_id=agg, reason=self._closed_reason
                    )
                )
                return fut
            return self.completions.register(agg, functools.partial(_via, agg, input_id))
        if self._closed_reason is not None:
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(TerminatedWait(input_id=input_id, reason=self._closed_reason))
            return fut
        return self.completions.register(input_id)

    def outcome_for(self, input_id: InputId) -> WaitOutcome | None:
        """S12: the waiter outcome of a terminal input, from its state and its last run.
        ``None`` for a non-terminal input (or one coalesced into a non-terminal aggregate)."""
        entry = self._entries.get(input_id)
        if entry is None:
            return None
        st = entry.state
        run = self.runs.get(st.last_run_id) if st.last_run_id is not None else None
        out = outcome_of(st, run)
        if isinstance(out, InputId):
            agg = self.outcome_for(out)
            return None if agg is None else with_via(agg, out, input_id)
        return out

    def _resolve_waiters(self, input_id: InputId) -> None:
        if not self.completions.has(input_id):
            return
        entry = self._entries[input_id]
        out = entry.state.terminal_outcome
        if out is not None and out.outcome_type == "coalesced":
            agg = out.aggregate_id
            outcome = self.outcome_for(input_id)
            if outcome is None:
                self.completions.move(input_id, agg, functools.partial(_via, agg, input_id))
                return
            self.completions.resolve(input_id, outcome)
            return
        outcome = self.outcome_for(input_id)
        if outcome is not None:
            self.completions.resolve(input_id, outcome)

    # ------------------------------------------------------------------ queries

    def input_state(self, input_id: InputId) -> InputState:
        return self._entry(input_id).state.clone()

    def input_ids(self, *, include_terminal: bool = False) -> list[InputId]:
        if include_terminal:
            return list(self._entries)
        return [i for i, e in self._entries.items() if not e.state.is_terminal]

    def queued_ids(self) -> list[InputId]:
        return self._queue.ids()

    @property
    def active_run_id(self) -> RunId | None:
        return self._active.run_id if self._active is not None else None

    @property
    def paused_for(self) -> float | None:
        if self._paused_until is None:
            return None
        return max(0.0, self._paused_until - time.monotonic())

    def events_after(self, after_seq: int) -> tuple[int | None, list[RuntimeEventEnvelope]]:
        """Events with ``seq > after_seq`` still kept, and the first missing seq if some
        were pruned (an ``events_gap`` from it to the oldest kept)."""
        evs = self._events
        if not evs:
            return None, []
        first = evs[0].seq
        gap = after_seq + 1 if after_seq + 1 < first else None
        start = max(0, after_seq + 1 - first)
        if start >= len(evs):
            return gap, []
        return gap, [evs[i] for i in range(start, len(evs))]

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    def event_signal(self) -> asyncio.Event:
        return self._event_signal

    # ------------------------------------------------------------------ the loop

    def _has_work(self) -> bool:
        if self._closing or self.held or self._active is not None:
            return False
        if not self.state.can_process_queue:
            return False
        if self._continuation_pending and self._pending_consumption:
            return True
        return self._waking > 0 and self.state is RuntimeState.IDLE

    def _kick(self) -> None:
        """Make sure a loop task runs if there is work; a runtime without work has no task."""
        if self._loop_task is not None:
            self._wake.set()
            return
        if self._has_work() and self._closed_reason is None:
            self._loop_task = asyncio.get_running_loop().create_task(
                self._run_loop(), name=f"meerkat-runtime-{self.runtime_id}"
            )

    async def _run_loop(self) -> None:
        try:
            while True:
                if not self._has_work():
                    return
                if self._paused_until is not None:
                    delay = self._paused_until - time.monotonic()
                    if delay > 0:
                        self._wake.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), delay)
                        continue
                    self._paused_until = None
                    self._retry_input = None
                started = self._start_run()
                if started is None:
                    return
                run, txn = started
                await self._commit(txn)
                await self._execute(run)
        except StoreError:
            if self._closed_reason is None:
                raise
            # the instance stopped on this failure (S8: nothing abandoned); the next owner
            # recovers from the store: nothing left for this task to report
        finally:
            self._loop_task = None
            if self._closed_reason is None and self._has_work():
                self._kick()

    def _start_run(self) -> tuple[_Run, Txn] | None:
        now = utcnow()
        txn = self._txn()
        if self._continuation_pending and self._pending_consumption:
            self._continuation_pending = False
            run = self._new_run(txn, is_continuation=True, now=now)
            run.applied = list(self._pending_consumption)
            if self.state is RuntimeState.IDLE:  # a retired runtime stays retired (no accepts)
                self._set_state(txn, RuntimeState.RUNNING, now)
            self._emit_run(
                txn, "started", now, run_id=run.run_id, is_continuation=True, input_ids=run.applied
            )
            return run, txn
        if self._waking <= 0 or self.state is not RuntimeState.IDLE:
            return None
        if self._coalescable >= 2:
            self._coalesce_queue(txn, now)
        if self._joinable == 0:
            first = self._queue.peek()  # nothing can join: the head runs alone (O(1))
            if first is None:
                return None
            head_id, selected = first, [first]
        else:
            order = self._queue.ids()
            if not order:
                return None
            head_id = next(
                (i for i in order if not self._entries[i].policy.joins_boundaries), order[0]
            )
            selected = [
                i for i in order if i == head_id or self._entries[i].policy.joins_boundaries
            ]
        run = self._new_run(txn, is_continuation=False, now=now)
        run.head = head_id
        for iid in selected:
            self._stage(txn, self._entries[iid], run, now)
        run.start_ids = list(selected)
        run.pending_apply = list(selected)
        self._set_state(txn, RuntimeState.RUNNING, now)
        self._emit_run(txn, "started", now, run_id=run.run_id, input_ids=selected)
        return run, txn

    def _new_run(self, txn: Txn, *, is_continuation: bool, now: datetime) -> _Run:
        run_id = RunId.new()
        record = RunRecord(run_id, self.runtime_id, "running", is_continuation=is_continuation)
        self.runs[run_id] = record
        txn.runs.append(record)
        run = _Run(run_id, record, is_continuation)
        run.pre_state = self.state
        self._active = run
        return run

    def _stage(self, txn: Txn, entry: _Entry, run: _Run, now: datetime) -> None:
        self._dequeue(entry)
        entry.state.last_run_id = run.run_id
        self._transition(txn, entry, IS.STAGED, now)
        self._emit_input(txn, "staged", now, input_id=entry.state.input_id, run_id=run.run_id)

    def _staged_primitive(
        self, ids: Sequence[InputId], boundary: RunApplyBoundary, head: InputId | None
    ) -> StagedRunInput:
        appends: list[ConversationAppend] = []
        contexts: list[ConversationContextAppend] = []
        all_inject = True
        for iid in ids:
            e = self._entries[iid]
            text = render_input_text(e.input)
            if e.policy.apply_mode is ApplyMode.INJECT_NOW:
                key = f"{e.input.input_type.replace('_', '-')}:{iid}"
                contexts.append(
                    ConversationContextAppend(
                        key=key, content=TextRenderable(text=text), input_id=iid
                    )
                )
            else:
                all_inject = False
                appends.append(
                    ConversationAppend(
                        role=ConversationAppendRole.USER,
                        content=TextRenderable(text=text),
                        input_id=iid,
                    )
                )
        if boundary is RunApplyBoundary.RUN_START and all_inject and ids:
            boundary = RunApplyBoundary.IMMEDIATE
        meta = None
        if head is not None:
            hin = self._entries[head].input
            if isinstance(hin, (PromptInput, FlowStepInput)):
                meta = hin.turn_metadata
        return StagedRunInput(
            boundary=boundary,
            appends=appends,
            context_appends=contexts,
            contributing_input_ids=list(ids),
            turn_metadata=meta,
        )

    # ------------------------------------------------------------------ coalescing (S3)

    def _coalesce_queue(self, txn: Txn, now: datetime) -> list[InputId]:
        groups: dict[tuple[str, str | None], list[_Entry]] = {}
        for iid in self._queue:
            e = self._entries[iid]
            if e.policy.queue_mode is QueueMode.COALESCE:
                groups.setdefault((e.kind, e.event_type), []).append(e)
        made: list[InputId] = []
        for sources in groups.values():
            if len(sources) >= 2:
                made.append(self._make_aggregate(txn, sources, now))
        return made

    def _make_aggregate(self, txn: Txn, sources: list[_Entry], now: datetime) -> InputId:
        ids = [s.state.input_id for s in sources]
        agg_input = _aggregate_input([s.input for s in sources])
        agg_id = agg_input.id
        last = sources[-1]
        state = InputState.new_accepted(agg_id, now)
        state.durability = InputDurability.DURABLE
        state.policy = PolicySnapshot(version=last.policy.policy_version, decision=last.policy)
        state.reconstruction_source = CoalescingSource(source_input_ids=ids)
        state.persisted_input = agg_input
        entry = _Entry(agg_input, state, last.policy, any(s.wakes for s in sources), last.kind)
        self._entries[agg_id] = entry
        self._nonterminal += 1
        txn.touch(state)
        self._emit_input(txn, "accepted", now, input_id=agg_id)
        state.transition(IS.QUEUED, "aggregate of coalesced inputs", now)
        # the aggregate takes the queue position of its first source
        first = sources[0]
        order = self._queue.ids()
        pos_ids = order[: order.index(first.state.input_id)]
        for s in sources:
            self._dequeue(s)
            s.state.coalesce(agg_id, now)
            txn.touch(s.state)
            self._on_terminal(txn, s)
            self._emit_input(txn, "coalesced", now, input_id=s.state.input_id, aggregate_id=agg_id)
        self._insert_after(txn, entry, pos_ids)
        self._emit_input(txn, "queued", now, input_id=agg_id)
        return agg_id

    def _insert_after(self, txn: Txn, entry: _Entry, before: list[InputId]) -> None:
        """Queue ``entry`` right after the ids ``before`` (which are at the queue's front)."""
        tail = [i for i in self._queue.ids() if i not in set(before)]
        items = [(i, self._entries[i].priority) for i in tail]
        for i in tail:
            self._dequeue(self._entries[i])
        self._enqueue(entry, txn)
        for i, _ in items:
            self._enqueue(self._entries[i], txn)

    # ------------------------------------------------------------------ run execution

    async def _execute(self, run: _Run) -> None:
        ctx = _RunContext(self, run)
        try:
            try:
                result = await self.executor.apply(ctx)
            except (RunCancelled, RunFenced):
                self._end_cancelled(run)
            except asyncio.CancelledError:
                # this task is being torn down (stop / shutdown): end the run as cancelled
                run.cancelled.set()
                self._end_cancelled(run)
                raise
            except Exception as exc:
                if run.cancelled.is_set():
                    self._end_cancelled(run)
                else:
                    permanent = isinstance(exc, RunFailure) and exc.permanent
                    self._end_failed(run, exc, permanent)
            else:
                if run.cancelled.is_set() and not run.boundary_committed:
                    self._end_cancelled(run)
                else:
                    self._end_completed(run, result)
        finally:
            if self._active is run:
                self._active = None
            run.done.set()

    def _resolve_early(self, txn: Txn, run: _Run) -> None:
        """Waiters of inputs consumed at their boundary are answered when the run ends."""
        for iid in run.consumed_early:
            txn.after_commit.append(functools.partial(self._resolve_waiters, iid))

    def _finish_state(self, txn: Txn, run: _Run, now: datetime) -> None:
        if self.state is RuntimeState.RUNNING:
            self._set_state(txn, run.pre_state, now)

    def _apply_pending(
        self, txn: Txn, run: _Run, ids: list[InputId], now: datetime
    ) -> list[InputId]:
        """Staged -> applied -> applied_pending_consumption (consumed at once for on_apply);
        returns the ids applied."""
        applied: list[InputId] = []
        for iid in ids:
            e = self._entries[iid]
            if e.state.current_state is not IS.STAGED:
                continue
            e.state.last_run_id = run.run_id
            e.state.last_boundary_sequence = run.next_sequence
            self._transition(txn, e, IS.APPLIED, now)
            self._transition(txn, e, IS.APPLIED_PENDING_CONSUMPTION, now)
            self._emit_input(txn, "applied", now, input_id=iid, run_id=run.run_id)
            cp = e.policy.effective_consume_point
            if cp in (ConsumePoint.ON_APPLY, ConsumePoint.ON_RUN_START):
                self._transition(txn, e, IS.CONSUMED, now, f"consumed {cp.value}")
                self._emit_input(txn, "consumed", now, input_id=iid, run_id=run.run_id)
                run.consumed_early.append(iid)
            elif cp is ConsumePoint.ON_RUN_COMPLETE:
                self._pending_consumption[iid] = None
                run.applied.append(iid)
            applied.append(iid)
        return applied

    def _append_rows(self, txn: Txn, run: _Run, delta: Sequence[Message]) -> None:
        msgs = list(run.buffer)
        msgs.extend(delta)
        run.buffer.clear()
        if msgs:
            now = utcnow()
            msgs = [m if m.created_at else m.model_copy(update={"created_at": now}) for m in msgs]
            rows = self.conversation.make_rows(msgs, run.run_id)
            self.conversation.extend(rows)
            txn.rows.extend(rows)

    def _receipt(
        self, txn: Txn, run: _Run, boundary: RunApplyBoundary, ids: list[InputId]
    ) -> RunBoundaryReceipt:
        receipt = RunBoundaryReceipt(
            run_id=run.run_id,
            boundary=boundary,
            contributing_input_ids=ids,
            conversation_digest=self.conversation.digest_hex,
            message_count=len(self.conversation),
            sequence=run.next_sequence,
        )
        run.next_sequence += 1
        txn.receipts.append(receipt)
        return receipt

    def _check_live(self, run: _Run) -> None:
        if run.fenced or self._active is not run:
            raise RunFenced(
                f"run {run.run_id} no longer owns session {self.runtime_id} "
                "(it was reset, destroyed, stopped or replaced); nothing it writes is kept"
            )

    async def commit_boundary(self, run: _Run, delta: Sequence[Message]) -> RunBoundaryReceipt:
        self._check_live(run)
        if run.boundary_committed:
            raise InvalidOperationError(
                f"run {run.run_id} already committed its boundary; "
                "use checkpoint() for later commits"
            )
        if run.cancelled.is_set():
            raise RunCancelled(run.cancel_reason or "run cancelled before its boundary")
        txn = self._boundary_txn(run, delta)
        crashpoint("boundary.before")
        await self._commit(txn)
        crashpoint("boundary.after")
        return txn.receipts[-1]

    def _boundary_txn(self, run: _Run, delta: Sequence[Message]) -> Txn:
        now = utcnow()
        txn = self._txn(durable=True)
        self._append_rows(txn, run, delta)
        primitive_boundary = RunApplyBoundary.RUN_START
        ids = list(run.pending_apply)
        run.pending_apply.clear()
        if ids and all(self._entries[i].policy.apply_mode is ApplyMode.INJECT_NOW for i in ids):
            primitive_boundary = RunApplyBoundary.IMMEDIATE
        receipt = self._receipt(txn, run, primitive_boundary, ids)
        self._apply_pending(txn, run, ids, now)
        run.boundary_committed = True
        self._emit_run(
            txn,
            "boundary_applied",
            now,
            run_id=run.run_id,
            sequence=receipt.sequence,
            input_ids=ids,
        )
        return txn

    async def checkpoint(
        self, run: _Run, delta: Sequence[Message], keep_interrupt: bool = False
    ) -> StagedRunInput | None:
        self._check_live(run)
        if run.cancelled.is_set():
            raise RunCancelled(run.cancel_reason or "run cancelled")
        if not run.boundary_committed:
            raise InvalidOperationError(
                f"run {run.run_id} called checkpoint() before commit_boundary(); the boundary "
                "must be committed first (spec §3)"
            )
        now = utcnow()
        txn = self._txn(durable=True)
        self._append_rows(txn, run, delta)
        applying = list(run.pending_join)
        run.pending_join.clear()
        receipt = self._receipt(txn, run, RunApplyBoundary.RUN_CHECKPOINT, applying)
        self._apply_pending(txn, run, applying, now)
        joined: list[InputId] = []
        if self.state is RuntimeState.RUNNING and not self.held and self._joinable:
            if self._coalescable >= 2:
                self._coalesce_queue(txn, now)
            joined = [i for i in self._queue.ids() if self._entries[i].policy.joins_boundaries]
            for iid in joined:
                self._stage(txn, self._entries[iid], run, now)
            run.pending_join = list(joined)
        if not keep_interrupt:
            run.interrupt.clear()
        self._emit_run(
            txn,
            "checkpoint",
            now,
            run_id=run.run_id,
            sequence=receipt.sequence,
            applied_input_ids=applying,
            joined_input_ids=joined,
        )
        crashpoint("checkpoint.before")
        await self._commit(txn)
        crashpoint("checkpoint.after")
        if not joined:
            return None
        return self._staged_primitive(joined, RunApplyBoundary.RUN_CHECKPOINT, None)

    def _end_completed(self, run: _Run, result: RunResult | None) -> None:
        if run.fenced:
            return
        now = utcnow()
        txn = self._txn(durable=True)
        if not run.boundary_committed:
            # lenient: an executor that never committed its boundary gets it committed now,
            # atomically with its completion
            t2 = self._boundary_txn(run, ())
            _merge(txn, t2)
        self._append_rows(txn, run, ())
        late = list(run.pending_join)
        run.pending_join.clear()
        if late:
            self._receipt(txn, run, RunApplyBoundary.RUN_CHECKPOINT, late)
            self._apply_pending(txn, run, late, now)
        if result is not None and result.session_id is None:
            result = result.model_copy(update={"session_id": self.runtime_id})
        run.record.status = "completed"
        run.record.result = result
        txn.runs.append(run.record)
        for iid in run.applied:
            e = self._entries[iid]
            if e.state.current_state is IS.APPLIED_PENDING_CONSUMPTION:
                e.state.last_run_id = run.run_id
                self._transition(txn, e, IS.CONSUMED, now)
                self._emit_input(txn, "consumed", now, input_id=iid, run_id=run.run_id)
        self._continuation_pending = False
        self._active = None
        self._resolve_early(txn, run)
        self._finish_state(txn, run, now)
        self._emit_run(txn, "completed", now, run_id=run.run_id)
        crashpoint("completion.before")
        txn.after_commit.append(functools.partial(crashpoint, "completion.after"))
        self._submit(txn)

    def _end_failed(self, run: _Run, exc: BaseException, permanent: bool) -> None:
        if run.fenced:
            return
        now = utcnow()
        error = str(exc) or type(exc).__name__
        txn = self._txn(durable=True)
        run.record.status = "failed"
        run.record.error = error
        txn.runs.append(run.record)
        self._emit_run(
            txn, "failed", now, run_id=run.run_id, error=error, recoverable=not permanent
        )
        retired = self.state is RuntimeState.RETIRED and not self.held
        # checkpoint joiners not committed go back to the front of the queue (retired:
        # abandoned, like everything a retired runtime will not run)
        if retired:
            for iid in run.pending_join:
                e = self._entries[iid]
                if e.state.current_state is IS.STAGED:
                    self._abandon(txn, e, InputAbandonReason.RETIRED, now, None)
        self._requeue_front(
            txn, run.pending_join, now, "run failed before the checkpoint was committed"
        )
        run.pending_join.clear()
        delay: float | None = None
        if not run.boundary_committed:
            # S4: nothing applied; the head returns to the front and counts an attempt
            others = [i for i in run.start_ids if i != run.head]
            head = self._entries[run.head] if run.head is not None else None
            if head is not None and head.state.current_state is IS.STAGED:
                head.state.attempt_count += 1
                if retired:
                    self._abandon(txn, head, InputAbandonReason.RETIRED, now, error)
                elif permanent:
                    self._abandon(txn, head, InputAbandonReason.FAILED, now, error)
                elif head.state.attempt_count >= self.config.max_attempts:
                    self._abandon(txn, head, InputAbandonReason.RETRY_BUDGET_EXCEEDED, now, error)
                else:
                    delay = self._backoff(head.state.attempt_count)
                    self._retry_input = head.state.input_id
                    self._emit_run(
                        txn,
                        "retry_scheduled",
                        now,
                        run_id=run.run_id,
                        input_id=head.state.input_id,
                        attempt=head.state.attempt_count,
                        delay_ms=int(delay * 1000),
                    )
            requeue = (
                [head.state.input_id] if (head is not None and not head.state.is_terminal) else []
            )
            requeue += others
            if retired:
                for iid in others:
                    e = self._entries[iid]
                    if e.state.current_state is IS.STAGED:
                        self._abandon(txn, e, InputAbandonReason.RETIRED, now, error)
                requeue = []
            self._requeue_front(txn, requeue, now, f"run failed, rollback: {error}")
            # continuation inputs of a continuation run that failed before its boundary
            if run.is_continuation:
                delay = self._fail_applied(txn, run, error, permanent, now)
        else:
            delay = self._fail_applied(txn, run, error, permanent, now)
        if delay is not None:
            self._paused_until = time.monotonic() + delay
        self._active = None
        self._resolve_early(txn, run)
        self._finish_state(txn, run, now)
        self._submit(txn)

    def _fail_applied(
        self, txn: Txn, run: _Run, error: str, permanent: bool, now: datetime
    ) -> float | None:
        """S5: applied inputs stay applied; count an attempt and schedule a continuation."""
        ids = [
            i
            for i in run.applied
            if self._entries[i].state.current_state is IS.APPLIED_PENDING_CONSUMPTION
        ]
        worst = 0
        for iid in ids:
            e = self._entries[iid]
            e.state.attempt_count += 1
            txn.touch(e.state)
            if permanent:
                self._abandon(txn, e, InputAbandonReason.FAILED, now, error)
            elif e.state.attempt_count >= self.config.max_attempts:
                self._abandon(txn, e, InputAbandonReason.RETRY_BUDGET_EXCEEDED, now, error)
            else:
                worst = max(worst, e.state.attempt_count)
        if self._pending_consumption and worst > 0:
            self._continuation_pending = True
            delay = self._backoff(worst)
            self._emit_run(
                txn, "continuation_scheduled", now, run_id=run.run_id, delay_ms=int(delay * 1000)
            )
            return delay
        self._continuation_pending = bool(self._pending_consumption) and not permanent
        return None

    def _backoff(self, attempt: int) -> float:
        return float(min(self.config.backoff_max, self.config.backoff_base * (2 ** (attempt - 1))))

    def _requeue_front(self, txn: Txn, ids: Iterable[InputId], now: datetime, reason: str) -> None:
        back: list[_Entry] = []
        for iid in ids:
            e = self._entries[iid]
            if e.state.current_state is IS.STAGED:
                self._transition(txn, e, IS.QUEUED, now, reason)
                self._emit_input(
                    txn,
                    "state_transitioned",
                    now,
                    input_id=iid,
                    **{"from": "staged", "to": "queued"},
                )
                back.append(e)
        self._push_front(txn, back)

    def _push_front(self, txn: Txn, entries: list[_Entry]) -> None:
        """Put ``entries`` back at the front of the queue in their order, with persisted
        positions ahead of everything queued (S4, S8, S7)."""
        if not entries:
            return
        self._queue.push_front([(e.state.input_id, e.priority) for e in entries])
        for e in entries:
            self._count(e, 1)
        for e in reversed(entries):
            self._order_front -= 1
            e.order = self._order_front
            txn.queue_orders[e.state.input_id] = e.order

    def _end_cancelled(self, run: _Run) -> None:
        if run.fenced:
            return
        now = utcnow()
        txn = self._txn(durable=True)
        run.record.status = "cancelled"
        txn.runs.append(run.record)
        retired = self.state is RuntimeState.RETIRED and not self.held
        # applied inputs end consumed (their waiters: cancelled, S12)
        for iid in run.applied:
            e = self._entries[iid]
            if e.state.current_state is IS.APPLIED_PENDING_CONSUMPTION:
                e.state.last_run_id = run.run_id
                self._transition(txn, e, IS.CONSUMED, now, "run cancelled after its boundary")
                self._emit_input(txn, "consumed", now, input_id=iid, run_id=run.run_id)
        # run-start inputs never applied end abandoned{cancelled} (retired: {retired})
        reason = InputAbandonReason.RETIRED if retired else InputAbandonReason.CANCELLED
        for iid in run.start_ids:
            e = self._entries[iid]
            if e.state.current_state is IS.STAGED:
                self._abandon(txn, e, reason, now, None)
        # checkpoint joiners not yet committed go back to the front (retired: abandoned)
        if retired:
            for iid in run.pending_join:
                e = self._entries[iid]
                if e.state.current_state is IS.STAGED:
                    self._abandon(txn, e, InputAbandonReason.RETIRED, now, None)
        else:
            self._requeue_front(
                txn, run.pending_join, now, "run cancelled before the checkpoint was committed"
            )
        run.pending_join.clear()
        self._continuation_pending = False
        self._active = None
        self._resolve_early(txn, run)
        self._finish_state(txn, run, now)
        self._emit_run(txn, "cancelled", now, run_id=run.run_id, reason=run.cancel_reason or None)
        self._submit(txn)

    @property
    def ingests_concurrently(self) -> bool:
        """Whether several ``ingest`` calls started in inbox order may run concurrently
        (their transactions then share group commits) and still be admitted in that order:
        ``ingest`` and ``accept`` reach their submission without awaiting anything unless
        the runtime is still recovering (``accept`` waits for it) or a peer response must
        first read its request (S20). So: recovered, and no peer correlation."""
        return self._ready.is_set() and not self.peer_correlation

    async def ingest(self, entry: InboxEntry) -> None:
        """Admit an input another process wrote to the inbox (S10), deleting the inbox row in
        the same transaction. Its idempotency key was claimed in the store when it was pushed.
        An input the runtime can no longer take (retired, destroyed) is recorded and abandoned
        with the reason, never dropped silently."""
        try:
            input = parse_input(entry.input_json)
            source = (
                _source_adapter.validate_json(entry.reconstruction_json)
                if entry.reconstruction_json
                else None
            )
        except (ValueError, ValidationError) as exc:
            txn = self._txn(durable=True)
            txn.inbox_done.append(entry.seq)
            self._emit_input(txn, "rejected", utcnow(), reason=f"unreadable inbox entry: {exc}")
            await self._commit(txn)
            return
        if input.id in self._entries:  # already ingested (a retried ingest)
            txn = self._txn(durable=True)
            txn.inbox_done.append(entry.seq)
            await self._commit(txn)
            return
        outcome, _ = await self.accept(input, reconstruction_source=source, from_inbox=entry.seq)
        if isinstance(outcome, Rejected):
            final = self.state in (RuntimeState.RETIRED, RuntimeState.DESTROYED) and not self.held
            if input.id in self._entries or (outcome.code is RejectCode.NOT_READY and not final):
                return  # admitted meanwhile, or not ready yet: the entry waits for a later pass
        if isinstance(outcome, Rejected):
            now = utcnow()
            txn = self._txn(durable=True)
            txn.inbox_done.append(entry.seq)
            state = InputState.new_accepted(input.id, now)
            state.durability = input.header.durability
            state.idempotency_key = input.header.idempotency_key
            state.persisted_input = input
            placeholder = _placeholder_entry(state)
            placeholder.input = input
            self._entries[input.id] = placeholder
            self._nonterminal += 1
            txn.touch(state)
            self._emit_input(txn, "accepted", now, input_id=input.id)
            reason = {
                RuntimeState.RETIRED: InputAbandonReason.RETIRED,
                RuntimeState.DESTROYED: InputAbandonReason.DESTROYED,
            }.get(self.state, InputAbandonReason.FAILED)
            self._abandon(txn, placeholder, reason, now, outcome.reason)
            await self._commit(txn)

    # ------------------------------------------------------------------ recovery (S7)

    async def recover(self, loaded: LoadedRuntime) -> dict[str, int]:
        """Rebuild this instance from the store, exactly as S7 orders it, then start the loop.

        (0) stored state (running -> idle; retired, destroyed kept); (1) durable input states;
        (2) derived inputs rebuilt (S13); (3) queue, dedup, supersession and coalescing
        indexes; (4) reconcile: accepted -> queued; staged -> applied (a receipt lists it) or
        back to the front of the queue; applied inputs get a continuation (S5); ephemeral
        inputs are lost and reported; every staged or applied input counts an attempt (S4);
        (5) recovery_count bumped and one summary event; (6) the loop starts.
        """
        now = utcnow()
        self._next_seq = loaded.last_seq + 1
        self.generation = loaded.generation or self.generation
        self.conversation = Conversation(rows=list(loaded.conversation))
        self.runs.update(loaded.runs)
        for rec in loaded.idempotency:
            self._idem[rec.key] = (rec.input_id, rec.content_hash, rec.accepted_at)
        stored_state = loaded.state or RuntimeState.IDLE
        died_in_run = any(r.status == "running" for r in loaded.runs.values())
        # S4: inputs found staged or applied count an attempt when the process died during a
        # run (one still "running" in the store; one run at a time, so they were all in it or
        # waiting for its continuation); a graceful stop (S8, S19) recorded its run as
        # cancelled, and costs nothing
        crashed = int(died_in_run)
        if (
            not loaded.inputs
            and not died_in_run
            and stored_state in (RuntimeState.IDLE, RuntimeState.RUNNING)
        ):
            # nothing was pending: there is nothing to reconcile, and nothing to report (a run
            # the process died in must still be closed, below, or its inputs' waiters, e.g.
            # of inputs consumed at its boundary, would wait for it forever)
            self.state = RuntimeState.IDLE
            return {
                "inputs_recovered": 0,
                "inputs_lost": 0,
                "inputs_rebuilt": 0,
                "continuations": 0,
            }
        self._ready.clear()
        txn = self._txn(durable=True)
        txn.recovered = True
        stored = loaded.state or RuntimeState.IDLE
        src = self.state
        self.state = RuntimeState.RECOVERING
        self._emit(txn, "recovery", {"code": "started", "runtime_id": self.runtime_id}, now)
        # (0)
        target: RuntimeState = RuntimeState.IDLE
        if stored in (RuntimeState.RETIRED, RuntimeState.DESTROYED):
            target = stored

        for run in loaded.runs.values():
            if run.status == "running":  # the process died during this run
                run.status = "failed"
                run.error = "the process stopped during this run; recovered"
                txn.runs.append(run)
        # (1) and (3)
        lost = rebuilt = recovered = continuations = 0
        staged_back: list[_Entry] = []
        for st in loaded.inputs:
            if st.input_id in self._entries or st.is_terminal:
                continue
            inp = st.persisted_input
            policy = st.policy.decision if st.policy is not None else None
            if inp is None or policy is None:
                placeholder = _placeholder_entry(st)
                self._entries[st.input_id] = placeholder
                self._nonterminal += 1
                self._abandon(
                    txn,
                    placeholder,
                    InputAbandonReason.RECOVERY_FAILED,
                    now,
                    "stored state has no payload or policy to rebuild it from",
                )
                lost += 1
                continue
            kind = kind_id(inp)
            et = inp.event_type if isinstance(inp, ExternalEventInput) else None
            wakes = self.policy_table.resolve(kind, True, et).wakes
            entry = _Entry(inp, st, policy, wakes, kind)
            entry.order = loaded.queue_orders.get(st.input_id, 0)
            self._entries[st.input_id] = entry
            self._nonterminal += 1
            st.recovery_count += 1
            txn.touch(st)
            recovered += 1
            key = inp.header.supersession_key
            if key is not None and st.current_state in (IS.ACCEPTED, IS.QUEUED):
                self._scopes.setdefault((kind, key.value), []).append(st.input_id)
        # (4) reconcile, in stored queue order
        for entry in sorted(self._entries.values(), key=lambda e: e.order):
            st = entry.state
            if st.is_terminal:
                continue
            iid = st.input_id
            if entry.input.header.durability is InputDurability.EPHEMERAL:
                self._abandon(
                    txn,
                    entry,
                    InputAbandonReason.RECOVERY_FAILED,
                    now,
                    "ephemeral input lost when its process stopped",
                )
                lost += 1
                continue
            cur = st.current_state
            if cur is IS.ACCEPTED:
                self._transition(txn, entry, IS.QUEUED, now, "recovery: accepted -> queued")
                self._enqueue(entry, txn)
            elif cur is IS.QUEUED:
                self._enqueue(entry, txn)
            elif cur is IS.STAGED:
                st.attempt_count += crashed
                if st.last_run_id is not None and (st.last_run_id, iid) in loaded.receipted:
                    self._transition(txn, entry, IS.APPLIED, now, "recovery: receipt found")
                    self._transition(txn, entry, IS.APPLIED_PENDING_CONSUMPTION, now)
                else:
                    self._transition(txn, entry, IS.QUEUED, now, "recovery: staged, no receipt")
                    staged_back.append(entry)
            elif cur is IS.APPLIED:
                st.attempt_count += crashed
                self._transition(txn, entry, IS.APPLIED_PENDING_CONSUMPTION, now)
            elif cur is IS.APPLIED_PENDING_CONSUMPTION:
                st.attempt_count += crashed
            if st.current_state is IS.APPLIED_PENDING_CONSUMPTION:
                cp = entry.policy.effective_consume_point
                if st.attempt_count >= self.config.max_attempts:
                    self._abandon(
                        txn,
                        entry,
                        InputAbandonReason.RETRY_BUDGET_EXCEEDED,
                        now,
                        "the process stopped during its runs too many times",
                    )
                elif cp is not ConsumePoint.EXPLICIT_ACK:
                    self._pending_consumption[iid] = None
            elif cur is IS.STAGED and st.attempt_count >= self.config.max_attempts:
                self._abandon(
                    txn,
                    entry,
                    InputAbandonReason.RETRY_BUDGET_EXCEEDED,
                    now,
                    "the process stopped during its runs too many times",
                )
        if staged_back:
            self._push_front(txn, [e for e in staged_back if not e.state.is_terminal])
        self._order_back = max([self._order_back, *(e.order for e in self._entries.values())])
        self._order_front = min([self._order_front, *(e.order for e in self._entries.values())])
        # (2) derived inputs, now that the queue exists
        rebuilt = self._rebuild_derived(txn, now, loaded.sources)
        if self._pending_consumption:
            self._continuation_pending = True
            continuations = 1
        if target is RuntimeState.DESTROYED:
            self._abandon_all(txn, InputAbandonReason.DESTROYED, now)
        elif target is RuntimeState.RETIRED:
            self._abandon_all(txn, InputAbandonReason.RETIRED, now, {IS.ACCEPTED, IS.QUEUED})
        self.state = target
        txn.runtime_state = target
        if target is not src:
            self._emit(txn, "runtime_state_change", {"from": src.value, "to": target.value}, now)
        report = {
            "inputs_recovered": recovered,
            "inputs_lost": lost,
            "inputs_rebuilt": rebuilt,
            "continuations": continuations,
        }
        self._emit(
            txn, "recovery", {"code": "completed", "runtime_id": self.runtime_id, **report}, now
        )
        try:
            await self._commit(txn)
        finally:
            self._ready.set()
        crashpoint("recovery.after")
        self._kick()
        return report

    # ------------------------------------------------------------------ control (S8)

    def cancel_current_run(self, reason: str = "") -> bool:
        """Cancel the active run (out of band; reaches the executor at its next await).

        With no active run but a retry pause pending, the paused work is cancelled instead:
        the retrying head is abandoned ``{cancelled}`` and continuation inputs are consumed.
        With neither, nothing happens and nothing is remembered.
        """
        run = self._active
        if run is not None:
            run.cancel_reason = reason or "cancelled by request"
            run.cancelled.set()
            return True
        if self._paused_until is None:
            return False
        now = utcnow()
        txn = self._txn(durable=True)
        self._paused_until = None
        retry, self._retry_input = self._retry_input, None
        if self._continuation_pending:
            # the pending continuation is cancelled: a run that never started, recorded as
            # cancelled so its inputs' waiters answer ``cancelled`` (S12)
            self._continuation_pending = False
            record = RunRecord(RunId.new(), self.runtime_id, "cancelled", is_continuation=True)
            self.runs[record.run_id] = record
            txn.runs.append(record)
            for iid in list(self._pending_consumption):
                e = self._entries[iid]
                e.state.last_run_id = record.run_id
                self._transition(txn, e, IS.CONSUMED, now, "continuation cancelled")
                self._emit_input(txn, "consumed", now, input_id=iid, run_id=record.run_id)
            self._emit_run(txn, "cancelled", now, run_id=record.run_id, reason=reason or None)
        elif retry is not None:
            e = self._entries[retry]
            if e.state.current_state in (IS.ACCEPTED, IS.QUEUED):
                self._abandon(txn, e, InputAbandonReason.CANCELLED, now)
        self._submit(txn)
        self._kick()
        return True

    async def cancel_input(self, input_id: InputId) -> InputState:
        entry = self._entry(input_id)
        st = entry.state.current_state
        if st not in (IS.ACCEPTED, IS.QUEUED):
            raise InvalidOperationError(
                f"input {input_id} is {st.value}; only accepted or queued inputs can be "
                "cancelled (cancel the active run to stop a staged or applied one)"
            )
        now = utcnow()
        txn = self._txn(durable=True)
        self._abandon(txn, entry, InputAbandonReason.CANCELLED, now)
        await self._commit(txn)
        return entry.state.clone()

    async def ack(self, input_id: InputId) -> InputState:
        """Consume an ``explicit_ack`` input left applied by its completed run (S1)."""
        entry = self._entry(input_id)
        if entry.state.current_state is not IS.APPLIED_PENDING_CONSUMPTION or (
            self._active is not None and entry.state.last_run_id == self._active.run_id
        ):
            raise InvalidOperationError(
                f"input {input_id} is {entry.state.current_state.value}; only inputs applied by "
                "a finished run and awaiting explicit acknowledgement can be acked"
            )
        if entry.policy.effective_consume_point is not ConsumePoint.EXPLICIT_ACK:
            raise InvalidOperationError(
                f"input {input_id} is consumed by its run (consume point "
                f"{entry.policy.consume_point.value}), not by ack"
            )
        now = utcnow()
        txn = self._txn(durable=True)
        self._transition(txn, entry, IS.CONSUMED, now, "acknowledged")
        self._emit_input(txn, "consumed", now, input_id=input_id)
        await self._commit(txn)
        return entry.state.clone()

    # ------------------------------------------------------------------ lifecycle (S9)

    def _fence_active(self, reason: str) -> _Run | None:
        run = self._active
        if run is None:
            return None
        run.fenced = True
        run.cancel_reason = reason
        run.cancelled.set()
        self._active = None
        return run

    def _abandon_all(
        self,
        txn: Txn,
        reason: InputAbandonReason,
        now: datetime,
        only: set[InputLifecycleState] | None = None,
    ) -> int:
        n = 0
        for e in list(self._entries.values()):
            if e.state.is_terminal:
                continue
            if only is not None and e.state.current_state not in only:
                continue
            self._abandon(txn, e, reason, now)
            n += 1
        return n

    async def retire(self, replacement_planned: bool = False) -> dict[str, int]:
        if self.state.is_terminal:
            raise InvalidOperationError(
                f"session {self.runtime_id} is {self.state.value}; it cannot be retired"
            )
        if self.state is RuntimeState.RETIRED and self.held == replacement_planned:
            return {"inputs_abandoned": 0, "inputs_pending_drain": 0}
        now = utcnow()
        txn = self._txn(durable=True)
        abandoned = 0
        if not replacement_planned:
            abandoned = self._abandon_all(
                txn, InputAbandonReason.RETIRED, now, {IS.ACCEPTED, IS.QUEUED}
            )
        self.held = replacement_planned
        self._paused_until = None
        self._set_state(txn, RuntimeState.RETIRED, now)
        self._emit(
            txn,
            "topology",
            {
                "code": "runtime_retired",
                "runtime_id": self.runtime_id,
                "replacement_planned": replacement_planned,
            },
            now,
        )
        await self._commit(txn)
        self._kick()
        pending = sum(1 for e in self._entries.values() if not e.state.is_terminal)
        return {"inputs_abandoned": abandoned, "inputs_pending_drain": pending}

    async def respawn(self) -> dict[str, int]:
        """A new instance (generation + 1) takes over: waits for the active run to end, keeps
        durable pending inputs, drops ephemeral ones, rebuilds derived ones (S9, S13)."""
        epoch = self._epoch
        while True:
            if self.state.is_terminal or self._closed_reason is not None:
                raise InvalidOperationError(
                    f"session {self.runtime_id} is {self.state.value}; it cannot be respawned"
                )
            if self._epoch != epoch:
                raise InvalidOperationError(
                    f"session {self.runtime_id} was reset while this respawn waited for its "
                    "active run; the reset wins (respawn again if it is still wanted)"
                )
            if self.state is not RuntimeState.RETIRED or not self.held:
                await self.retire(replacement_planned=True)
                continue
            run = self._active
            if run is None:
                break
            await run.done.wait()
        now = utcnow()
        txn = self._txn(durable=True)
        self.generation += 1
        txn.next_generation = self.generation
        dropped = 0
        for e in list(self._entries.values()):
            if e.state.is_terminal or e.state.current_state not in (IS.ACCEPTED, IS.QUEUED):
                continue
            if e.input.header.durability is InputDurability.EPHEMERAL:
                self._abandon(
                    txn, e, InputAbandonReason.RETIRED, now, "ephemeral input dropped at respawn"
                )
                dropped += 1
        rebuilt = self._rebuild_derived(txn, now)
        self.held = False
        self._paused_until = None
        self._set_state(txn, RuntimeState.IDLE, now)
        self._emit(
            txn,
            "topology",
            {
                "code": "runtime_respawned",
                "runtime_id": self.runtime_id,
                "generation": self.generation,
            },
            now,
        )
        await self._commit(txn)
        self._kick()
        kept = sum(1 for e in self._entries.values() if not e.state.is_terminal)
        return {"inputs_transferred": kept, "inputs_dropped": dropped, "inputs_rebuilt": rebuilt}

    def _rebuild_derived(
        self, txn: Txn, now: datetime, sources: dict[InputId, InputState] | None = None
    ) -> int:
        n = 0
        for e in list(self._entries.values()):
            st = e.state
            if st.is_terminal or st.current_state not in (IS.ACCEPTED, IS.QUEUED, IS.STAGED):
                continue
            if e.input.header.durability is not InputDurability.DERIVED:
                continue
            new_input = self._rebuild(e, sources or {})
            if new_input is None:
                self._abandon(
                    txn,
                    e,
                    InputAbandonReason.RECOVERY_FAILED,
                    now,
                    "no rebuilder for its reconstruction source",
                )
                continue
            order = self._queue.ids()
            before = order[: order.index(st.input_id)] if st.input_id in order else order
            new_state = InputState.new_accepted(new_input.id, now)
            new_state.durability = InputDurability.DERIVED
            new_state.policy = st.policy
            new_state.reconstruction_source = st.reconstruction_source
            new_state.persisted_input = new_input
            new_entry = _Entry(new_input, new_state, e.policy, e.wakes, e.kind)
            self._entries[new_input.id] = new_entry
            self._nonterminal += 1
            txn.touch(new_state)
            self._emit_input(txn, "accepted", now, input_id=new_input.id)
            new_state.transition(IS.QUEUED, f"rebuilt from {st.input_id}", now)
            self._dequeue(e)
            st.supersede(new_input.id, now)
            txn.touch(st)
            self._on_terminal(txn, e)
            self._emit_input(
                txn, "superseded", now, input_id=st.input_id, superseded_by=new_input.id
            )
            self._insert_after(txn, new_entry, before)
            self._emit_input(txn, "queued", now, input_id=new_input.id)
            n += 1
        return n

    def _rebuild(self, e: _Entry, stored: dict[InputId, InputState]) -> Input | None:
        src = e.state.reconstruction_source
        if isinstance(src, ProjectionSource):
            fn = self.rebuilders.projection.get(src.rule_id)
            if fn is None:
                return None
            rebuilt = fn(src, e.input)
            if rebuilt is None:
                return None
            if rebuilt.id == e.input.id:
                rebuilt = rebuilt.model_copy(
                    update={"header": rebuilt.header.model_copy(update={"id": InputId.new()})}
                )
            return rebuilt
        if isinstance(src, CoalescingSource):
            sources: list[Input] = []
            for i in src.source_input_ids:
                if i in self._entries:
                    sources.append(self._entries[i].input)
                elif i in stored and stored[i].persisted_input is not None:
                    sources.append(stored[i].persisted_input)  # type: ignore[arg-type]
            if len(sources) != len(src.source_input_ids) or not sources:
                return None
            agg = _aggregate_input(sources)
            return agg.model_copy(
                update={
                    "header": agg.header.model_copy(update={"durability": InputDurability.DERIVED})
                }
            )
        return None

    async def reset(self) -> dict[str, int]:
        """Cancel the active run, abandon every non-terminal input ``{reset}`` and clear the
        conversation, in one transaction; back to idle (S9)."""
        if self.state.is_terminal:
            raise InvalidOperationError(
                f"session {self.runtime_id} is {self.state.value}; it cannot be reset"
            )
        self._epoch += 1
        run = self._fence_active("runtime reset")
        now = utcnow()
        txn = self._txn(durable=True)
        if run is not None:
            run.record.status = "cancelled"
            txn.runs.append(run.record)
            self._resolve_early(txn, run)
            self._emit_run(txn, "cancelled", now, run_id=run.run_id, reason="runtime reset")
        n = self._abandon_all(txn, InputAbandonReason.RESET, now)
        self._clear_queue()
        self._pending_consumption.clear()
        self._continuation_pending = False
        self._paused_until = None
        self.held = False
        self.conversation = Conversation()
        txn.conversation_reset = True
        self._set_state(txn, RuntimeState.IDLE, now)
        await self._commit(txn)
        self._kick()
        return {"inputs_abandoned": n}

    async def destroy(self) -> dict[str, int]:
        if self.state is RuntimeState.DESTROYED:
            return {"inputs_abandoned": 0}
        self._epoch += 1
        run = self._fence_active("runtime destroyed")
        now = utcnow()
        txn = self._txn(durable=True)
        if run is not None:
            run.record.status = "cancelled"
            txn.runs.append(run.record)
            self._resolve_early(txn, run)
            self._emit_run(txn, "cancelled", now, run_id=run.run_id, reason="runtime destroyed")
        self._set_state(txn, RuntimeState.DESTROYED, now)
        n = self._abandon_all(txn, InputAbandonReason.DESTROYED, now)
        self._clear_queue()
        self._pending_consumption.clear()
        self._continuation_pending = False
        self._paused_until = None
        self._emit(
            txn, "topology", {"code": "runtime_destroyed", "runtime_id": self.runtime_id}, now
        )
        await self._commit(txn)
        return {"inputs_abandoned": n}

    def stop(self, reason: str = "runtime stopped") -> None:
        """StopRuntimeExecutor: cancel the active run and leave this instance ``stopped``.
        Nothing is abandoned and ``stopped`` is never stored: the next open recovers (S8).
        In-process waiters resolve ``terminated``."""
        if self._closed_reason is not None:
            return
        self._closed_reason = reason
        run = self._fence_active(reason)
        now = utcnow()
        txn = self._txn()
        if not self.state.is_terminal:
            src = self.state
            self.state = RuntimeState.STOPPED
            self._emit(txn, "runtime_state_change", {"from": src.value, "to": "stopped"}, now)
        if run is not None:
            run.record.status = "cancelled"
            txn.runs.append(run.record)
            self._resolve_early(txn, run)
            self._emit_run(txn, "cancelled", now, run_id=run.run_id, reason=reason)
        self._submit(txn)
        for iid in run.consumed_early if run is not None else ():
            self._resolve_waiters(iid)  # answered now, whatever the store does with the txn
        self.completions.terminate_all(reason)
        self._wake.set()

    async def wait_idle(self, timeout: float | None = None) -> None:
        """Wait until no loop task runs (no work in hand) — for tests and shutdown."""
        task = self._loop_task
        if task is not None:
            await asyncio.wait_for(asyncio.shield(task), timeout)

    async def close(self, grace: float | None = None) -> None:
        """S19: give the active run a grace period, then stop it; resolve waiters."""
        grace = self.config.shutdown_grace if grace is None else grace
        self._closing = True  # no new run starts during the grace period
        run = self._active
        if run is not None and grace > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.done.wait(), grace)
        self.stop("runtime shut down")
        task = self._loop_task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


_source_adapter: TypeAdapter[ReconstructionSource] = TypeAdapter(ReconstructionSource)


def validate_input(
    raw: Any, max_bytes: int, reconstruction_source: ReconstructionSource | None
) -> tuple[Input, ReconstructionSource | None] | Rejected:
    """The checks of accept that need no runtime state (S13, S14): parse, size, durability.

    Returns the input and its reconstruction source (inferred for projected inputs), or the
    rejection. Pure, so a process that does not own the runtime can run it before writing to
    the inbox.
    """
    if isinstance(raw, (str, bytes)):
        size = len(raw.encode("utf-8") if isinstance(raw, str) else raw)
        if size > max_bytes:
            return _too_large(size, max_bytes)
        try:
            input = parse_input(raw)
        except ValueError as exc:
            return Rejected(reason=str(exc), code=RejectCode.INVALID)
    else:
        if isinstance(raw, _INPUT_TYPES):
            input = raw
        else:
            try:
                input = parse_input(raw)
            except ValueError as exc:
                return Rejected(reason=str(exc), code=RejectCode.INVALID)
        size = len(input.to_json().encode("utf-8"))
        if size > max_bytes:
            return _too_large(size, max_bytes)
    err = validate_durability(input)
    if err is not None:
        return Rejected(reason=str(err), code=RejectCode.INVALID_DURABILITY)
    if input.header.durability is InputDurability.DERIVED and reconstruction_source is None:
        if not isinstance(input, ProjectedInput):
            return Rejected(
                reason="derived inputs must be accepted with a reconstruction_source "
                "(projection{rule_id, source_event_id} or coalescing{source_input_ids})",
                code=RejectCode.INVALID_DURABILITY,
            )
        reconstruction_source = ProjectionSource(
            rule_id=input.rule_id, source_event_id=input.source_event_id
        )
    return input, reconstruction_source


def _peer_response(
    input: Input,
) -> ResponseProgressConvention | ResponseTerminalConvention | None:
    """The response convention of a peer response input (S20), else None."""
    if isinstance(input, PeerInput) and isinstance(
        input.convention, (ResponseProgressConvention, ResponseTerminalConvention)
    ):
        return input.convention
    return None


def _too_large(size: int, limit: int) -> Rejected:
    return Rejected(
        reason=f"input is {size} bytes; the limit is {limit} bytes", code=RejectCode.TOO_LARGE
    )


def _placeholder_entry(st: InputState) -> _Entry:
    """An entry for a stored state that cannot be rebuilt (no payload or policy)."""
    inp = PromptInput.new("")
    policy = PolicyDecision(
        apply_mode=ApplyMode.IGNORE,
        wake_mode=WakeMode.NONE,
        queue_mode=QueueMode.NONE,
        consume_point=ConsumePoint.ON_ACCEPT,
        policy_version=0,
    )
    return _Entry(inp, st, policy, False, "unknown")


def _ignore_result(fut: Awaitable[None]) -> None:
    if isinstance(fut, asyncio.Future):
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())


def _via(aggregate_id: InputId, input_id: InputId, outcome: Any) -> Any:
    return with_via(outcome, aggregate_id, input_id)


def _merge(dst: Txn, src: Txn) -> None:
    dst.states.update(src.states)
    dst.rows.extend(src.rows)
    dst.receipts.extend(src.receipts)
    dst.runs.extend(src.runs)
    dst.events.extend(src.events)
    dst.after_commit.extend(src.after_commit)
    if src.runtime_state is not None:
        dst.runtime_state = src.runtime_state


def _aggregate_input(sources: list[Input]) -> Input:
    """S3: a new input of the same variant; external events carry the array of payloads,
    string bodies become a JSON array of the sources' bodies; the last source's convention."""
    last = sources[-1]
    header = InputHeader.new(source=SystemOrigin(), durability=InputDurability.DURABLE)
    if isinstance(last, ExternalEventInput):
        return ExternalEventInput(
            header=header,
            event_type=last.event_type,
            payload=[s.payload for s in sources if isinstance(s, ExternalEventInput)],
        )
    if isinstance(last, PeerInput):
        return PeerInput(
            header=header,
            convention=last.convention,
            body=compact([s.body for s in sources if isinstance(s, PeerInput)]),
        )
    if isinstance(last, PromptInput):
        return PromptInput(
            header=header,
            text=compact([s.text for s in sources if isinstance(s, PromptInput)]),
            turn_metadata=last.turn_metadata,
        )
    if isinstance(last, FlowStepInput):
        return FlowStepInput(
            header=header,
            step_id=last.step_id,
            instructions=compact([s.instructions for s in sources if isinstance(s, FlowStepInput)]),
            turn_metadata=last.turn_metadata,
        )
    if isinstance(last, ProjectedInput):
        return ProjectedInput(
            header=header,
            rule_id=last.rule_id,
            source_event_id=last.source_event_id,
            content=compact([s.content for s in sources if isinstance(s, ProjectedInput)]),
        )
    return last.model_copy(
        update={
            "header": header,
            "content": compact([getattr(s, "content", "") for s in sources]),
        }
    )


class _RunContext:
    """The ``RunContext`` handed to the executor (spec §3)."""

    def __init__(self, rt: SessionRuntime, run: _Run) -> None:
        self._rt = rt
        self._run = run
        self.run_id = run.run_id
        self.is_continuation = run.is_continuation
        self.cancelled = run.cancelled
        self.session_id = rt.runtime_id
        staged = (
            StagedRunInput(boundary=RunApplyBoundary.RUN_START)
            if run.is_continuation
            else rt._staged_primitive(run.start_ids, RunApplyBoundary.RUN_START, run.head)
        )
        self.primitive = StagedInput.model_construct(  # already validated: no re-validation
            primitive_type="staged_input",
            boundary=staged.boundary,
            appends=staged.appends,
            context_appends=staged.context_appends,
            contributing_input_ids=staged.contributing_input_ids,
            turn_metadata=staged.turn_metadata,
        )

    @property
    def interrupted(self) -> asyncio.Event:
        return self._run.interrupt

    async def commit_boundary(self, delta: Sequence[Message] = ()) -> RunBoundaryReceipt:
        return await self._rt.commit_boundary(self._run, delta)

    async def checkpoint(
        self, delta: Sequence[Message] = (), *, keep_interrupt: bool = False
    ) -> StagedRunInput | None:
        return await self._rt.checkpoint(self._run, delta, keep_interrupt)

    def append(self, *messages: Message) -> None:
        self._run.buffer.extend(messages)

    def emit(self, event: Mapping[str, Any]) -> None:
        """Publish an agent event (a dict with ``type``) in the session's sequence."""
        self._rt.emit_agent(self._run, dict(event))

    def conversation(self) -> list[Message]:
        msgs = self._rt.conversation.messages()
        msgs.extend(self._run.buffer)
        return msgs

    async def guard(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable`` unless the run is cancelled first (then raise RunCancelled)."""
        if self._run.cancelled.is_set():
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise RunCancelled(self._run.cancel_reason)
        task = asyncio.ensure_future(awaitable)
        cancel_wait = asyncio.ensure_future(self._run.cancelled.wait())
        try:
            done, _ = await asyncio.wait({task, cancel_wait}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            cancel_wait.cancel()
            raise
        if task in done:
            cancel_wait.cancel()
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise RunCancelled(self._run.cancel_reason)

    async def wait(self, timeout: float) -> Literal["interrupted", "timeout"]:
        """Park until an ``interrupt_yielding`` input arrives ("interrupted") or ``timeout``
        passes ("timeout"); raise RunCancelled on cancel (S1, S8)."""
        run = self._run
        if run.interrupt.is_set():
            return "interrupted"
        try:
            await self.guard(asyncio.wait_for(run.interrupt.wait(), timeout))
        except TimeoutError:
            return "timeout"
        return "interrupted"
