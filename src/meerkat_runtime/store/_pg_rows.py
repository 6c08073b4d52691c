"""Rows of the PostgreSQL store: a ``Txn`` snapshot and its encoding into statement
parameters, the decoders of stored rows, and the SQL text the store runs (``postgres.py``).

Everything here is plain and synchronous; ``postgres.py`` runs it on its connections.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from .._ids import InputId, RunId
from .._time import utcnow
from ..core.lifecycle import Message
from ..core.session import ConversationRow
from ..runtime.input_state import InputState
from ..runtime.state import RuntimeState
from .base import PeerRequestRecord, SessionRecord, Txn

__all__ = [
    "PRUNE",
    "SESSION_COLS",
    "Refused",
    "TxnRows",
    "aware",
    "conv_row",
    "encode_txn",
    "peer_request",
    "peer_row",
    "session_record",
    "snapshot",
]


class Refused(Exception):
    """A job's own refusal (fenced, duplicate key, ...): the message has no store prefix yet."""

    def __init__(self, message: str, *, fenced: bool = False) -> None:
        super().__init__(message)
        self.fenced = fenced


def aware(dt: datetime) -> datetime:
    """``dt`` with a time zone (naive datetimes are read as UTC, as in the SQLite store)."""
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


# ------------------------------------------------------------------------------ Txn


def snapshot(txn: Txn) -> Txn:
    """What ``txn`` holds now, safe from the runtime's later changes to its live objects.

    Every field is copied one level deep (lists and dicts are new containers), so fields added
    to ``Txn`` later are snapshotted too; the objects the runtime keeps changing (input states,
    run records) are cloned. ``after_commit`` callbacks are the runtime's, not the store's.
    """
    values: dict[str, Any] = {}
    for f in dataclasses.fields(txn):
        value = getattr(txn, f.name)
        if f.name == "after_commit":
            value = []
        elif f.name == "states":
            value = {k: v.clone() for k, v in value.items()}
        elif f.name == "runs":
            value = [replace(r) for r in value]
        elif isinstance(value, list | dict | set):
            value = copy.copy(value)
        values[f.name] = value
    return Txn(**values)


@dataclass(slots=True)
class TxnRows:
    """A ``Txn`` encoded to statement parameters (plain values only)."""

    runtime_id: str
    generation: int
    now: datetime
    states: list[tuple[Any, ...]] = field(default_factory=list)
    queue_orders: list[tuple[Any, ...]] = field(default_factory=list)
    idempotency: list[tuple[Any, ...]] = field(default_factory=list)
    reset: bool = False
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    receipts: list[tuple[Any, ...]] = field(default_factory=list)
    runs: list[tuple[Any, ...]] = field(default_factory=list)
    state: str | None = None
    recovered: bool = False
    next_generation: int | None = None
    inbox_done: list[int] = field(default_factory=list)
    peer_closes: list[tuple[Any, ...]] = field(default_factory=list)
    events: list[tuple[Any, ...]] = field(default_factory=list)

    @property
    def first_seq(self) -> int | None:
        return self.events[0][1] if self.events else None

    @property
    def last_seq(self) -> int:
        return int(self.events[-1][1]) if self.events else 0


def encode_txn(txn: Txn) -> TxnRows:
    rid = txn.runtime_id
    now = utcnow()
    t = TxnRows(rid, txn.generation, now)
    for st in txn.states.values():
        t.states.append(
            (
                rid,
                st.input_id.value,
                st.current_state.value,
                st.is_terminal,
                st.last_run_id.value if st.last_run_id is not None else None,
                st.to_json(),
                aware(st.updated_at),
            )
        )
    t.queue_orders = [(order, rid, iid.value) for iid, order in txn.queue_orders.items()]
    t.idempotency = [
        (rid, r.key, r.input_id.value, r.content_hash, aware(r.accepted_at))
        for r in txn.idempotency
    ]
    t.reset = txn.conversation_reset
    t.rows = [
        (
            rid,
            r.index,
            r.run_id.value if r.run_id is not None else None,
            [i.value for i in r.input_ids],
            r.message.to_json(),
            bytes(r.digest),
        )
        for r in txn.rows
    ]
    t.receipts = [
        (
            rid,
            rc.run_id.value,
            rc.sequence,
            [i.value for i in rc.contributing_input_ids],
            rc.to_json(),
            now,
        )
        for rc in txn.receipts
    ]
    t.runs = [
        (
            run.run_id.value,
            run.runtime_id,
            run.status,
            run.result.to_json() if run.result is not None else None,
            run.error,
            run.is_continuation,
            now,
        )
        for run in txn.runs
    ]
    if txn.runtime_state is not None and txn.runtime_state is not RuntimeState.STOPPED:
        t.state = txn.runtime_state.value
    t.recovered = txn.recovered
    t.next_generation = txn.next_generation
    t.inbox_done = list(txn.inbox_done)
    t.peer_closes = [
        (c.status, aware(c.closed_at), c.closed_by, rid, c.request_id)
        for c in txn.peer_request_closes
    ]
    last = None
    for ev in txn.events:
        if last is not None and ev.seq <= last:
            raise Refused(f"event seqs of one transaction are not increasing ({last}, {ev.seq})")
        last = ev.seq
        t.events.append((rid, ev.seq, ev.to_json(), aware(ev.timestamp)))
    return t


# ------------------------------------------------------------------------------ decoding

SESSION_COLS = "session_id, created_at, updated_at, config, labels, archived"


def conv_row(row: Sequence[Any]) -> ConversationRow:
    idx, run_id, input_ids, message, digest = row
    return ConversationRow(
        int(idx),
        RunId(run_id) if run_id is not None else None,
        tuple(InputId(i) for i in input_ids),
        Message.from_json(message),
        bytes(digest),
    )


def session_record(row: Sequence[Any]) -> SessionRecord:
    sid, created, updated, config, labels, archived = row
    return SessionRecord(sid, created, updated, config, labels, bool(archived))


def peer_row(record: PeerRequestRecord) -> tuple[Any, ...]:
    return (
        record.requester_runtime_id,
        record.request_id,
        record.responder_runtime_id,
        record.envelope_id,
        record.requester_name,
        record.responder_name,
        record.intent,
        aware(record.created_at),
        record.status,
        aware(record.closed_at) if record.closed_at is not None else None,
        record.closed_by,
    )


def peer_request(row: Sequence[Any]) -> PeerRequestRecord:
    req, rid, resp, env, req_name, resp_name, intent, created, status, closed, by = row
    return PeerRequestRecord(
        req, rid, resp, env, created, req_name, resp_name, intent, status, closed, by
    )


def state_from_json(text: str) -> InputState:
    return InputState.from_json(text)


# ------------------------------------------------------------------------------ retention

# Prune statements (S18), each deleting at most one batch (%(batch)s rows) in its own
# transaction. Nothing non-terminal is deleted, nor what recovery or a waiter still needs:
# receipts of pending inputs' last runs, runs named by any kept input, sources of pending
# coalesced aggregates, keys of pending or inboxed inputs. The outer conditions repeat the
# inner ones so that a row changed concurrently is re-checked before it is deleted.
PRUNE: tuple[tuple[str, str], ...] = (
    (
        "input_states",
        "WITH protected AS MATERIALIZED ("
        " SELECT p.runtime_id, j.v AS input_id FROM input_states p CROSS JOIN LATERAL"
        "  jsonb_array_elements_text(p.state_json::jsonb -> 'reconstruction_source'"
        "   -> 'source_input_ids') AS j(v)"
        " WHERE NOT p.is_terminal"
        "  AND p.state_json::jsonb -> 'reconstruction_source' ->> 'source_type' = 'coalescing'),"
        " doomed AS ("
        " SELECT s.runtime_id, s.input_id FROM input_states s"
        " WHERE s.is_terminal AND s.updated_at < %(cutoff)s"
        " AND NOT EXISTS (SELECT 1 FROM protected x"
        "  WHERE x.runtime_id = s.runtime_id AND x.input_id = s.input_id)"
        " LIMIT %(batch)s)"
        " DELETE FROM input_states d USING doomed"
        " WHERE d.runtime_id = doomed.runtime_id AND d.input_id = doomed.input_id"
        " AND d.is_terminal AND d.updated_at < %(cutoff)s",
    ),
    (
        "receipts",
        "WITH doomed AS ("
        " SELECT r.runtime_id, r.run_id, r.sequence FROM receipts r"
        " WHERE r.created_at < %(cutoff)s"
        " AND NOT EXISTS (SELECT 1 FROM input_states s WHERE s.last_run_id = r.run_id"
        "  AND s.runtime_id = r.runtime_id AND NOT s.is_terminal)"
        " LIMIT %(batch)s)"
        " DELETE FROM receipts d USING doomed"
        " WHERE d.runtime_id = doomed.runtime_id AND d.run_id = doomed.run_id"
        " AND d.sequence = doomed.sequence",
    ),
    (
        "runs",
        "WITH doomed AS ("
        " SELECT u.run_id FROM runs u WHERE u.status <> 'running' AND u.updated_at < %(cutoff)s"
        " AND NOT EXISTS (SELECT 1 FROM input_states s WHERE s.last_run_id = u.run_id)"
        " LIMIT %(batch)s)"
        " DELETE FROM runs d USING doomed WHERE d.run_id = doomed.run_id"
        " AND d.status <> 'running' AND d.updated_at < %(cutoff)s",
    ),
    (
        "idempotency",
        "WITH doomed AS ("
        " SELECT i.runtime_id, i.key FROM idempotency i WHERE i.accepted_at < %(cutoff)s"
        " AND NOT EXISTS (SELECT 1 FROM input_states s WHERE s.runtime_id = i.runtime_id"
        "  AND s.input_id = i.input_id AND NOT s.is_terminal)"
        " AND NOT EXISTS (SELECT 1 FROM inbox b WHERE b.runtime_id = i.runtime_id"
        "  AND b.input_id = i.input_id)"
        " LIMIT %(batch)s)"
        " DELETE FROM idempotency d USING doomed"
        " WHERE d.runtime_id = doomed.runtime_id AND d.key = doomed.key"
        " AND d.accepted_at < %(cutoff)s",
    ),
    (
        "events",
        "WITH doomed AS ("
        " SELECT e.runtime_id, e.seq FROM runtimes r JOIN events e"
        "  ON e.runtime_id = r.runtime_id AND e.seq <= r.last_event_seq - %(keep)s"
        " LIMIT %(batch)s)"
        " DELETE FROM events d USING doomed"
        " WHERE d.runtime_id = doomed.runtime_id AND d.seq = doomed.seq",
    ),
)
