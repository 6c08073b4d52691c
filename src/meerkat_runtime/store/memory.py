"""The in-memory store: the reference implementation of the store protocol (``base.py``), for
tests and throwaway runs in one process.

It behaves as a disk would, so the conformance suite can hold it and the SQLite store to the
same rules:

- Copies: ``submit`` copies everything it keeps, and every load hands out fresh copies, so
  what the runtime holds in memory and what the store holds can be compared and can never
  alias.
- Atomicity: a transaction is checked whole (fencing, conversation indexes, receipt keys,
  event sequence numbers) before anything is applied; a refused transaction
  changes nothing. The returned future is already resolved (a memory "commit" is immediate),
  and commit order is submission order.
- Fencing (S10): a runtime's generation is 0 until a lease is first acquired; from then on a
  transaction whose generation differs from the stored one is refused with ``FencedError``.
  A transaction with ``next_generation`` (respawn, S9) passes the check with its own
  generation and leaves the new one stored.
- Poisoning: once a transaction of (runtime, generation) failed, later ones of that pair are
  refused with ``FencedError`` (they were built on the failed one, and base.py's order rule
  forbids them becoming durable without it); the owner recovers under a new generation.
- Idempotency keys are unique per (runtime, key). A transaction's records are upserts: the
  fenced owner decides (it may re-claim a key whose window it released, S11); ``inbox_push``
  never replaces a claim, it answers deduplicated or conflict.
- ``stopped`` is never stored (S8). Conversations are append-only: a row index is stored once
  per runtime; only ``conversation_reset`` deletes rows. Event ``seq`` only grows per runtime.
- Peer requests (S20): one per (requester, request id) and per (requester, envelope id);
  ``open_peer_request`` returns the stored one on a retry; a transaction's closes apply only to
  outstanding ones. ``save_session`` refuses a second non-archived session with the same
  ``comms_name`` (``CommsNameTakenError``).
- Retention (``prune``) never deletes anything non-terminal, nor what recovery or a waiter
  still needs (receipts of pending inputs' runs, runs named by kept inputs, sources of pending
  coalesced aggregates, idempotency keys of pending or inboxed inputs).

Fault injection for tests: ``fail_next`` (the next ``submit`` fails with that exception) and
``fail_on(method, exc)`` (the next call of that method fails).

Public attributes (read by tests): ``input_states``, ``conversations``, ``receipts``, ``runs``,
``runtime_states``, ``events``, ``commits`` (committed transactions), ``sessions``, ``inbox``,
``idempotency``, ``queue_orders``, ``peer_requests``.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from .._ids import InputId, RunId
from .._time import utcnow
from ..core.lifecycle import RunBoundaryReceipt
from ..core.session import ConversationRow
from ..runtime.events import RuntimeEventEnvelope
from ..runtime.input_state import CoalescingSource, InputState
from ..runtime.state import RuntimeState
from ._rows import inbox_input_id
from .base import (
    CommsNameTakenError,
    FencedError,
    IdempotencyRecord,
    InboxEntry,
    LoadedRuntime,
    PeerRequestRecord,
    RunRecord,
    SessionRecord,
    StoreError,
    Txn,
)

__all__ = ["MemoryStore"]


@dataclass(slots=True)
class _RuntimeRow:
    """The runtime row: ownership (S10) and counters. The state lives in ``runtime_states``."""

    generation: int = 0  # 0: never leased, not fenced
    lease_owner: str | None = None
    lease_expiry: float | None = None
    last_seq: int = 0
    recovery_count: int = 0


def _copy_run(run: RunRecord) -> RunRecord:
    result = run.result.model_copy(deep=True) if run.result is not None else None
    return replace(run, result=result)


def _copy_row(row: ConversationRow) -> ConversationRow:
    return replace(row, message=row.message.model_copy(deep=True))


def _copy_session(rec: SessionRecord) -> SessionRecord:
    return replace(rec, config=_deep_json(rec.config), labels=dict(rec.labels))


def _deep_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_json(v) for v in value]
    return value


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


class MemoryStore:
    """The full store protocol in memory (see the module docstring for its invariants)."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self.input_states: dict[str, dict[InputId, InputState]] = defaultdict(dict)
        self.queue_orders: dict[str, dict[InputId, int]] = defaultdict(dict)
        self.conversations: dict[str, list[ConversationRow]] = defaultdict(list)
        self.receipts: dict[tuple[str, RunId, int], RunBoundaryReceipt] = {}
        self.runs: dict[RunId, RunRecord] = {}
        self.runtime_states: dict[str, RuntimeState] = {}
        self.events: dict[str, list[RuntimeEventEnvelope]] = defaultdict(list)
        self.idempotency: dict[str, dict[str, IdempotencyRecord]] = defaultdict(dict)
        self.sessions: dict[str, SessionRecord] = {}
        self.inbox: dict[str, list[InboxEntry]] = defaultdict(list)
        self.peer_requests: dict[tuple[str, str], PeerRequestRecord] = {}
        self.commits = 0  # committed transactions (submit)
        self._poisoned: set[tuple[str, int]] = set()  # (runtime, generation) whose write failed
        self.fail_next: BaseException | None = None  # fault injection: the next submit fails
        self._faults: dict[str, list[BaseException]] = {}
        self._rows: dict[str, _RuntimeRow] = {}
        self._receipt_at: dict[tuple[str, RunId, int], datetime] = {}
        self._run_at: dict[RunId, datetime] = {}
        self._inbox_seq = 0
        self._inbox_ids: dict[int, InputId] = {}  # inbox seq -> its idempotency key's input
        self._writes = 0  # every committed write of any kind: the change token

    # ---------------------------------------------------------------- fault injection

    def fail_on(self, call_name: str, exc: BaseException, times: int = 1) -> None:
        """Make the next ``times`` calls of method ``call_name`` (``submit``, ``load_runtime``,
        ``inbox_push``, ...) fail with ``exc``. ``submit`` fails through its future."""
        if not callable(getattr(self, call_name, None)):
            raise ValueError(f"MemoryStore has no method {call_name!r}")
        self._faults.setdefault(call_name, []).extend([exc] * times)

    def _fault(self, name: str) -> None:
        pending = self._faults.get(name)
        if pending:
            exc = pending.pop(0)
            if not pending:
                del self._faults[name]
            raise exc

    # ---------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        self._fault("open")

    async def close(self) -> None:
        self._fault("close")

    # ---------------------------------------------------------------- commit

    def submit(self, txn: Txn) -> asyncio.Future[None]:
        """Apply ``txn`` whole or not at all; the returned future is already resolved."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            if self.fail_next is not None:
                exc, self.fail_next = self.fail_next, None
                raise exc
            key = (txn.runtime_id, txn.generation)
            if key in self._poisoned:
                raise FencedError(
                    f"store {self.url}: an earlier write of runtime {key[0]} (generation "
                    f"{key[1]}) failed; this instance's later writes are refused until it "
                    "recovers under a new generation"
                )
            self._fault("submit")
            self._check(txn)
            self._apply(txn)
        except BaseException as exc:  # the failure belongs to the awaitable
            self._poisoned.add((txn.runtime_id, txn.generation))
            fut.set_exception(exc)
            return fut
        fut.set_result(None)
        return fut

    def _refuse(self, message: str) -> StoreError:
        return StoreError(f"store {self.url}: {message}")

    def _check(self, txn: Txn) -> None:
        """Every reason to refuse ``txn``, checked before anything is written."""
        rid = txn.runtime_id
        row = self._rows.get(rid)
        if row is not None and row.generation != 0 and row.generation != txn.generation:
            raise FencedError(
                f"store {self.url}: runtime {rid} is owned by generation {row.generation}; "
                f"this writer holds generation {txn.generation} (fenced, S10)"
            )
        if txn.rows:
            # rows are appended densely: the next index is the stored count (O(1) check)
            expected = 0 if txn.conversation_reset else len(self.conversations[rid])
            for r in txn.rows:
                if r.index < expected:
                    raise self._refuse(
                        f"conversation row {r.index} of runtime {rid} is already stored "
                        "(conversations are append-only)"
                    )
                expected = r.index + 1
        keys: set[tuple[str, RunId, int]] = set()
        for rc in txn.receipts:
            key = (rid, rc.run_id, rc.sequence)
            if key in self.receipts or key in keys:
                raise self._refuse(
                    f"receipt {rc.sequence} of run {rc.run_id} (runtime {rid}) is already stored"
                )
            keys.add(key)
        last = row.last_seq if row is not None else 0
        for ev in txn.events:
            if ev.seq <= last:
                raise self._refuse(
                    f"event seq {ev.seq} of runtime {rid} is not after the last stored seq "
                    f"{last} (S15: seq only grows)"
                )
            last = ev.seq

    def _apply(self, txn: Txn) -> None:
        rid = txn.runtime_id
        now = utcnow()
        row = self._rows.setdefault(rid, _RuntimeRow())
        if txn.conversation_reset:
            self.conversations[rid] = []
        states = self.input_states[rid]
        for st in txn.states.values():
            states[st.input_id] = st.clone()
        orders = self.queue_orders[rid]
        for iid, order in txn.queue_orders.items():
            if iid not in states:
                continue
            if order is None:
                orders.pop(iid, None)
            else:
                orders[iid] = order
        claimed = self.idempotency[rid]
        for rec in txn.idempotency:
            claimed[rec.key] = rec  # the fenced owner's claim is authoritative (upsert)
        if txn.rows:
            self.conversations[rid].extend(_copy_row(r) for r in txn.rows)
        for rc in txn.receipts:
            key = (rid, rc.run_id, rc.sequence)
            self.receipts[key] = rc.model_copy(deep=True)
            self._receipt_at[key] = now
        for run in txn.runs:
            self.runs[run.run_id] = _copy_run(run)
            self._run_at[run.run_id] = now
        if txn.runtime_state is not None and txn.runtime_state is not RuntimeState.STOPPED:
            self.runtime_states[rid] = txn.runtime_state
        if txn.recovered:
            row.recovery_count += 1
        if txn.next_generation is not None:
            row.generation = txn.next_generation
        if txn.events:
            self.events[rid].extend(txn.events)  # envelopes never change once emitted
            row.last_seq = max(row.last_seq, txn.events[-1].seq)
        for close in txn.peer_request_closes:
            req = self.peer_requests.get((rid, close.request_id))
            if req is not None and req.closed_at is None:
                req.status = close.status
                req.closed_at = close.closed_at
                req.closed_by = close.closed_by
        if txn.inbox_done:
            done = set(txn.inbox_done)
            self.inbox[rid] = [e for e in self.inbox[rid] if e.seq not in done]
            for seq in done:
                self._inbox_ids.pop(seq, None)
        self.commits += 1
        self._writes += 1

    # ---------------------------------------------------------------- sessions

    async def save_session(self, record: SessionRecord) -> None:
        self._fault("save_session")
        name = record.config.get("comms_name")
        if name is not None and not record.archived:
            for other in self.sessions.values():
                if (
                    other.session_id != record.session_id
                    and not other.archived
                    and other.config.get("comms_name") == name
                ):
                    raise CommsNameTakenError(
                        f"store {self.url}: comms name {name!r} is already taken by session "
                        f"{other.session_id}",
                        str(name),
                    )
        self.sessions[record.session_id] = _copy_session(record)
        self._writes += 1

    async def load_session(self, session_id: str) -> SessionRecord | None:
        self._fault("load_session")
        rec = self.sessions.get(session_id)
        return _copy_session(rec) if rec is not None else None

    async def list_sessions(self, *, include_archived: bool = False) -> list[SessionRecord]:
        self._fault("list_sessions")
        recs = [r for r in self.sessions.values() if include_archived or not r.archived]
        recs.sort(key=lambda r: (_aware(r.created_at), r.session_id))
        return [_copy_session(r) for r in recs]

    # ---------------------------------------------------------------- reads

    async def runtimes_with_pending_inputs(self) -> list[str]:
        self._fault("runtimes_with_pending_inputs")
        ids = {
            rid
            for rid, states in self.input_states.items()
            if any(not s.is_terminal for s in states.values())
        }
        ids.update(rid for rid, entries in self.inbox.items() if entries)
        return sorted(ids)

    async def runtimes_needing_owner(self, limit: int = 1000) -> list[str]:
        self._fault("runtimes_needing_owner")
        now = time.time()
        out = []
        for rid in await self.runtimes_with_pending_inputs():
            row = self._rows.get(rid)
            if (
                row is None
                or row.lease_owner is None
                or row.lease_expiry is None
                or row.lease_expiry <= now
            ):
                out.append(rid)
        return out[:limit]

    async def load_runtime(self, runtime_id: str) -> LoadedRuntime:
        self._fault("load_runtime")
        rid = runtime_id
        row = self._rows.get(rid, _RuntimeRow())
        orders = self.queue_orders.get(rid, {})
        pending = [s for s in self.input_states.get(rid, {}).values() if not s.is_terminal]

        def position(s: InputState) -> tuple[bool, int, str]:
            order = orders.get(s.input_id)
            return (order is not None, order or 0, s.input_id.value)

        pending.sort(key=position)
        last_runs = {s.last_run_id for s in pending if s.last_run_id is not None}
        receipted: set[tuple[RunId, InputId]] = set()
        for (r, run_id, _), rc in self.receipts.items():
            if r == rid and run_id in last_runs:
                receipted.update((run_id, iid) for iid in rc.contributing_input_ids)
        runs = {
            run_id: _copy_run(rec)
            for run_id, rec in self.runs.items()
            if run_id in last_runs or (rec.runtime_id == rid and rec.status == "running")
        }
        stored = self.input_states.get(rid, {})
        sources: dict[InputId, InputState] = {}
        for s in pending:
            src = s.reconstruction_source
            if isinstance(src, CoalescingSource):
                for iid in src.source_input_ids:
                    if iid in stored:
                        sources[iid] = stored[iid].clone()
        return LoadedRuntime(
            runtime_id=rid,
            state=self.runtime_states.get(rid),
            generation=row.generation,
            inputs=[s.clone() for s in pending],
            queue_orders={s.input_id: orders[s.input_id] for s in pending if s.input_id in orders},
            idempotency=sorted(
                self.idempotency.get(rid, {}).values(), key=lambda r: (r.accepted_at, r.key)
            ),
            conversation=[_copy_row(r) for r in self.conversations.get(rid, [])],
            receipted=receipted,
            runs=runs,
            sources=sources,
            last_seq=row.last_seq,
            recovery_count=row.recovery_count,
        )

    async def load_input_state(self, runtime_id: str, input_id: InputId) -> InputState | None:
        self._fault("load_input_state")
        st = self.input_states.get(runtime_id, {}).get(input_id)
        return st.clone() if st is not None else None

    async def load_input_states(
        self, runtime_id: str, *, include_terminal: bool = True, limit: int | None = None
    ) -> list[InputState]:
        self._fault("load_input_states")
        states = sorted(self.input_states.get(runtime_id, {}).values(), key=lambda s: s.input_id)
        if not include_terminal:
            states = [s for s in states if not s.is_terminal]
        if limit is not None:
            states = states[: max(limit, 0)]
        return [s.clone() for s in states]

    async def load_run(self, run_id: RunId) -> RunRecord | None:
        self._fault("load_run")
        rec = self.runs.get(run_id)
        return _copy_run(rec) if rec is not None else None

    async def load_conversation(self, runtime_id: str) -> list[ConversationRow]:
        self._fault("load_conversation")
        return [_copy_row(r) for r in self.conversations.get(runtime_id, [])]

    async def load_events(
        self, runtime_id: str, after_seq: int = 0, limit: int = 1000
    ) -> list[RuntimeEventEnvelope]:
        self._fault("load_events")
        out = [e for e in self.events.get(runtime_id, []) if e.seq > after_seq][: max(limit, 0)]
        return [e.model_copy(deep=True) for e in out]

    async def last_event_seq(self, runtime_id: str) -> int:
        self._fault("last_event_seq")
        evs = self.events.get(runtime_id)
        return evs[-1].seq if evs else 0

    async def first_event_seq(self, runtime_id: str) -> int | None:
        self._fault("first_event_seq")
        evs = self.events.get(runtime_id)
        return evs[0].seq if evs else None

    async def change_token(self) -> int:
        self._fault("change_token")
        return self._writes

    # ---------------------------------------------------------------- ownership (S10)

    async def acquire_lease(self, runtime_id: str, owner: str, ttl: float) -> int | None:
        self._fault("acquire_lease")
        now = time.time()
        row = self._rows.get(runtime_id)
        if row is None:
            row = self._rows[runtime_id] = _RuntimeRow()
            self.runtime_states.setdefault(runtime_id, RuntimeState.IDLE)
        live = row.lease_expiry is not None and row.lease_expiry > now
        if row.lease_owner is not None and row.lease_owner != owner and live:
            return None
        row.generation += 1
        row.lease_owner = owner
        row.lease_expiry = now + ttl
        self._writes += 1
        return row.generation

    async def renew_lease(self, runtime_id: str, owner: str, generation: int, ttl: float) -> bool:
        self._fault("renew_lease")
        row = self._rows.get(runtime_id)
        if row is None or row.lease_owner != owner or row.generation != generation:
            return False
        row.lease_expiry = time.time() + ttl
        self._writes += 1
        return True

    async def renew_leases(self, owner: str, leases: dict[str, int], ttl: float) -> set[str]:
        self._fault("renew_leases")
        now = time.time()
        renewed = set()
        for rid, gen in leases.items():
            row = self._rows.get(rid)
            if row is not None and row.lease_owner == owner and row.generation == gen:
                row.lease_expiry = now + ttl
                renewed.add(rid)
        self._writes += 1
        return renewed

    def abandon_generation(self, runtime_id: str, generation: int) -> None:
        self._poisoned.add((runtime_id, generation))

    async def release_lease(self, runtime_id: str, owner: str, generation: int) -> None:
        self._fault("release_lease")
        row = self._rows.get(runtime_id)
        if row is not None and row.lease_owner == owner and row.generation == generation:
            row.lease_owner = None
            row.lease_expiry = None
            self._writes += 1

    async def lease_owner(self, runtime_id: str) -> tuple[str | None, float | None, int]:
        self._fault("lease_owner")
        row = self._rows.get(runtime_id)
        if row is None:
            return (None, None, 0)
        return (row.lease_owner, row.lease_expiry, row.generation)

    # ---------------------------------------------------------------- inbox (S10)

    async def inbox_push(
        self, entry: InboxEntry, idempotency: IdempotencyRecord | None, max_pending: int
    ) -> tuple[str, InputId | None]:
        self._fault("inbox_push")
        rid = entry.runtime_id
        claimed = self.idempotency[rid]
        if idempotency is not None:
            prior = claimed.get(idempotency.key)
            if prior is not None:
                same = prior.content_hash == idempotency.content_hash
                return ("deduplicated" if same else "conflict", prior.input_id)
        pending = sum(1 for s in self.input_states.get(rid, {}).values() if not s.is_terminal)
        if pending + len(self.inbox[rid]) >= max_pending:
            return ("queue_full", None)
        self._inbox_seq += 1
        if idempotency is not None:
            claimed[idempotency.key] = idempotency
            self._inbox_ids[self._inbox_seq] = idempotency.input_id
        entry.seq = self._inbox_seq
        entry.created_at = utcnow()
        self.inbox[rid].append(replace(entry))
        self._writes += 1
        return ("accepted", None)

    async def inbox_entries(self, runtime_id: str, limit: int = 100) -> list[InboxEntry]:
        self._fault("inbox_entries")
        return [replace(e) for e in self.inbox.get(runtime_id, [])[: max(limit, 0)]]

    async def find_input_runtime(self, input_id: InputId) -> str | None:
        self._fault("find_input_runtime")
        for rid, states in self.input_states.items():
            if input_id in states:
                return rid
        for rid, entries in self.inbox.items():
            if any(inbox_input_id(e.input_json) == input_id.value for e in entries):
                return rid
        return None

    # ---------------------------------------------------------------- peer requests (S20)

    async def open_peer_request(self, record: PeerRequestRecord) -> PeerRequestRecord:
        self._fault("open_peer_request")
        rid = record.requester_runtime_id
        for req in self.peer_requests.values():
            if req.requester_runtime_id == rid and (
                req.envelope_id == record.envelope_id or req.request_id == record.request_id
            ):
                return replace(req)
        self.peer_requests[(rid, record.request_id)] = replace(record)
        self._writes += 1
        return replace(record)

    async def load_peer_request(
        self, requester_runtime_id: str, request_id: str
    ) -> PeerRequestRecord | None:
        self._fault("load_peer_request")
        req = self.peer_requests.get((requester_runtime_id, request_id))
        return replace(req) if req is not None else None

    async def find_peer_requests(self, request_id: str) -> list[PeerRequestRecord]:
        self._fault("find_peer_requests")
        found = [r for r in self.peer_requests.values() if r.request_id == request_id]
        return [replace(r) for r in sorted(found, key=lambda r: _aware(r.created_at))]

    async def list_peer_requests(
        self,
        *,
        requester_runtime_id: str | None = None,
        responder_runtime_id: str | None = None,
        outstanding_only: bool = False,
    ) -> list[PeerRequestRecord]:
        self._fault("list_peer_requests")
        found = [
            r
            for r in self.peer_requests.values()
            if (requester_runtime_id is None or r.requester_runtime_id == requester_runtime_id)
            and (responder_runtime_id is None or r.responder_runtime_id == responder_runtime_id)
            and (not outstanding_only or r.closed_at is None)
        ]
        found.sort(key=lambda r: (_aware(r.created_at), r.request_id))
        return [replace(r) for r in found]

    async def discard_peer_request(self, requester_runtime_id: str, request_id: str) -> None:
        self._fault("discard_peer_request")
        req = self.peer_requests.get((requester_runtime_id, request_id))
        if req is not None and req.closed_at is None:
            del self.peer_requests[(requester_runtime_id, request_id)]
            self._writes += 1

    async def prune_peer_requests(self, *, older_than: datetime, batch: int = 1000) -> int:
        self._fault("prune_peer_requests")
        cutoff = _aware(older_than)
        doomed = [
            k
            for k, r in self.peer_requests.items()
            if r.closed_at is not None and _aware(r.closed_at) < cutoff
        ]
        for k in doomed:
            del self.peer_requests[k]
        if doomed:
            self._writes += 1
        return len(doomed)

    # ---------------------------------------------------------------- retention (S18)

    async def prune(
        self, *, older_than: datetime, keep_events: int, batch: int = 1000
    ) -> dict[str, int]:
        """Same rules as the SQLite store (``batch`` only bounds its transactions there)."""
        self._fault("prune")
        cutoff = _aware(older_than)
        counts = dict.fromkeys(("input_states", "receipts", "runs", "idempotency", "events"), 0)
        for rid, states in self.input_states.items():
            protected: set[InputId] = set()
            for s in states.values():
                src = s.reconstruction_source
                if not s.is_terminal and isinstance(src, CoalescingSource):
                    protected.update(src.source_input_ids)
            doomed = [
                iid
                for iid, s in states.items()
                if s.is_terminal and _aware(s.updated_at) < cutoff and iid not in protected
            ]
            for iid in doomed:
                del states[iid]
                self.queue_orders[rid].pop(iid, None)
            counts["input_states"] += len(doomed)
        pending_runs = {
            (rid, s.last_run_id)
            for rid, states in self.input_states.items()
            for s in states.values()
            if not s.is_terminal and s.last_run_id is not None
        }
        for key in [k for k, at in self._receipt_at.items() if at < cutoff]:
            if (key[0], key[1]) not in pending_runs:
                del self.receipts[key], self._receipt_at[key]
                counts["receipts"] += 1
        named = {
            s.last_run_id
            for states in self.input_states.values()
            for s in states.values()
            if s.last_run_id is not None
        }
        for run_id, rec in list(self.runs.items()):
            at = self._run_at.get(run_id)
            if rec.status != "running" and at is not None and at < cutoff and run_id not in named:
                del self.runs[run_id], self._run_at[run_id]
                counts["runs"] += 1
        for rid, claimed in self.idempotency.items():
            states = self.input_states.get(rid, {})
            inboxed = {
                self._inbox_ids[e.seq] for e in self.inbox.get(rid, []) if e.seq in self._inbox_ids
            }
            for ikey, claim in list(claimed.items()):
                st = states.get(claim.input_id)
                live = st is not None and not st.is_terminal
                if (
                    _aware(claim.accepted_at) < cutoff
                    and not live
                    and claim.input_id not in inboxed
                ):
                    del claimed[ikey]
                    counts["idempotency"] += 1
        for rid, evs in self.events.items():
            floor = self._rows.get(rid, _RuntimeRow()).last_seq - keep_events
            kept = [e for e in evs if e.seq > floor]
            counts["events"] += len(evs) - len(kept)
            self.events[rid] = kept
        if any(counts.values()):
            self._writes += 1
        return counts

    # ---------------------------------------------------------------- debugging

    def snapshot(self, runtime_id: str) -> dict[str, Any]:
        """A plain view of one runtime's stored rows (for tests and debugging)."""
        return {
            "input_states": {
                str(k): v.to_json_dict() for k, v in self.input_states[runtime_id].items()
            },
            "conversation": [r.message.to_json_dict() for r in self.conversations[runtime_id]],
            "runtime_state": self.runtime_states.get(runtime_id),
        }
