"""The SQLite store (the default): the store protocol of ``base.py`` over one database file,
with the standard library's ``sqlite3`` only.

Threads (the event loop never touches SQLite):

- One **writer thread** owns the only writing connection. It consumes a FIFO queue of jobs
  (submitted transactions, lease and inbox operations, session saves, prune batches) with
  **group commit**: it takes every job waiting in the queue (up to ``max_batch``), opens
  ``BEGIN IMMEDIATE``, runs each job inside its own ``SAVEPOINT`` (a failing job is rolled
  back to its savepoint and only its future fails), then issues one ``COMMIT``. Futures are
  resolved on their event loop with ``loop.call_soon_threadsafe`` only after ``COMMIT``
  returned, in submission order. If SQLite itself abandons the transaction because of one
  job (disk full, I/O error), that job fails and the others run once more in a fresh
  transaction; if ``COMMIT`` fails, every job of the batch fails and nothing of it is written.
- One **reader thread** owns a read-only connection (``query_only``) and serves every read;
  multi-statement reads run in one read transaction, so they see one committed snapshot. With
  WAL, reads never wait for the writer.

Invariants kept here (beyond those of ``base.py``):

- ``submit`` runs on the event loop thread and never blocks: it takes a cheap snapshot of
  the transaction (so the runtime's later changes to its live objects cannot leak in), puts
  it on the queue and returns an ``asyncio.Future``. The writer thread encodes snapshots to
  JSON before it opens the batch's transaction, so the loop never pays for encoding and the
  write lock is not held for it.
- Commit order is submission order: one writer, one FIFO queue, savepoints in queue order.
- Fencing is checked in SQL inside the job's savepoint before it writes anything: the
  runtime row's ``generation`` must equal ``txn.generation`` once the runtime was leased
  (generation 0 means "never leased" and is not fenced). ``txn.next_generation`` (respawn)
  is written after the check.
- Poisoning: once a transaction of (runtime, generation) failed, every transaction of that
  pair submitted after it is refused with ``FencedError`` and writes nothing (it was built
  on the failed one); transactions submitted before it are unaffected, also when they are
  retried after an abandoned batch. The owner recovers under a new generation.
- Idempotency keys are unique per (runtime, key) (a unique index); a transaction's records
  are upserts (the fenced owner decides), ``inbox_push`` never replaces a claim.
- ``stopped`` is never written (S8); conversation rows are only inserted (a trigger refuses
  updates) and only ``conversation_reset`` deletes them; event ``seq`` only grows.
- The file is opened in WAL mode with ``synchronous=FULL`` and a 5 s busy timeout; foreign
  keys are not declared (rows are partitioned by runtime id and runtime rows are created
  lazily, so there is no parent/child invariant for them to enforce).
- ``open`` runs ``PRAGMA quick_check`` and checks the schema version before it writes
  anything: a corrupt file, a file that is not a database, a database of another
  application or one with a newer schema raises ``StoreError`` and is left untouched; an empty
  schema is never created over existing content. Missing migrations are applied in one
  transaction.
- Peer requests (S20, migration 3): ``open_peer_request`` inserts or returns the stored row in
  one write transaction (unique on (requester, request id) and (requester, envelope id)); a
  transaction's closes are conditional updates (``closed_at IS NULL``). Comms names are unique
  among non-archived sessions through a partial unique index on
  ``json_extract(config, '$.comms_name')``; ``save_session`` reports a clash as
  ``CommsNameTakenError``.
- Every failure surfaces as ``StoreError`` (``FencedError`` for a stale generation) whose
  message names the file and the problem, e.g. ``store /x/meerkat.db: disk I/O error (is the
  disk full?)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from .._ids import InputId, RunId
from .._time import utcnow
from ..core.lifecycle import Message
from ..core.session import ConversationRow
from ..runtime.events import RuntimeEventEnvelope
from ..runtime.input_state import CoalescingSource, InputState
from ..runtime.state import RuntimeState
from ._rows import PEER_COLS, RUN_COLS, inbox_input_id, run_record
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

__all__ = ["Migration", "SqliteStore", "load_migrations"]

T = TypeVar("T")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_MIGRATION_NAME = re.compile(r"^(\d{4})_(\w+)\.sql$")
_CHUNK = 500  # ids per IN (...) list, well under SQLite's variable limit


def _us(dt: datetime) -> int:
    """Microseconds since the epoch (exact; naive datetimes are read as UTC)."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // _US


def _dt(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


# ------------------------------------------------------------------------------ migrations


@dataclass(frozen=True, slots=True)
class Migration:
    """One forward migration: ``NNNN_name.sql`` applied when the database is older."""

    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """The packaged migrations (``schema/sqlite/NNNN_name.sql``) in version order."""
    folder = resources.files("meerkat_runtime.store").joinpath("schema", "sqlite")
    out: list[Migration] = []
    for item in folder.iterdir():
        m = _MIGRATION_NAME.match(item.name)
        if m is not None:
            out.append(Migration(int(m.group(1)), m.group(2), item.read_text(encoding="utf-8")))
    out.sort(key=lambda mg: mg.version)
    for i, mg in enumerate(out, start=1):
        if mg.version != i:
            raise StoreError(f"SQLite migrations are not numbered 0001, 0002, ...: {mg.name}")
    return out


def _statements(sql: str) -> list[str]:
    """Split a script into complete statements (trigger bodies included) so they can run
    inside one transaction (``executescript`` would commit first)."""
    out: list[str] = []
    buf = ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            stmt = buf.strip()
            if stmt:
                out.append(stmt)
            buf = ""
    if buf.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in buf.splitlines()
    ):
        raise StoreError(f"SQLite migration ends with an incomplete statement: {buf.strip()!r}")
    return out


# ------------------------------------------------------------------------------ errors


class SchemaRefusedError(Exception):
    """A SQLite file this build must not open: another application's tables, or a schema
    newer than this build knows (the message has no file prefix)."""


def schema_version_of(conn: sqlite3.Connection, known: int) -> int:
    """The schema version of the open SQLite database (0: no tables yet); refuses, with
    ``SchemaRefusedError``, another application's database and a newer schema. Reads only:
    ``meerkat db status`` uses it on a read-only connection."""
    tables = {
        r[0]
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        ).fetchall()
    }
    if "schema_version" not in tables:
        if tables:
            names = ", ".join(sorted(tables)[:5])
            raise SchemaRefusedError(
                f"not a meerkat-runtime database: it holds tables ({names}) but no "
                "schema_version; refusing to add a schema to it"
            )
        return 0
    (current,) = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
    if current > known:
        raise SchemaRefusedError(
            f"schema version {current} is newer than this build of meerkat-runtime knows "
            f"(up to {known}); upgrade meerkat-runtime to open it"
        )
    return int(current)


class _Refused(Exception):
    """A job's own refusal (fenced, duplicate key, ...): the message has no file prefix yet."""

    def __init__(self, message: str, *, fenced: bool = False) -> None:
        super().__init__(message)
        self.fenced = fenced


_HINTS: tuple[tuple[str, str], ...] = (
    ("disk i/o error", "is the disk full?"),
    ("database or disk is full", "the disk is full, or the database reached its size limit"),
    ("malformed", "the file is damaged; restore it from a backup"),
    ("file is not a database", "it is not a SQLite database, or it is encrypted"),
    ("readonly database", "check the file's and its directory's permissions"),
    ("database is locked", "another process held the write lock for more than 5 s"),
    ("unable to open database file", "check that the path exists and is writable"),
)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, sqlite3.Error):
        text = str(exc) or getattr(exc, "sqlite_errorname", None) or type(exc).__name__
        low = text.lower()
        for needle, hint in _HINTS:
            if needle in low:
                return f"{text} ({hint})"
        return text
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    return f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------ encoding


@dataclass(slots=True)
class _TxnRows:
    """A ``Txn`` encoded on the event loop thread: plain values only, safe to hand over."""

    runtime_id: str
    generation: int
    now: int
    states: list[tuple[Any, ...]] = field(default_factory=list)
    queue_orders: list[tuple[Any, ...]] = field(default_factory=list)
    idempotency: list[tuple[str, str, str, int]] = field(default_factory=list)
    reset: bool = False
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    receipts: list[tuple[Any, ...]] = field(default_factory=list)
    runs: list[tuple[Any, ...]] = field(default_factory=list)
    state: str | None = None
    recovered: bool = False
    next_generation: int | None = None
    inbox_done: list[tuple[str, int]] = field(default_factory=list)
    peer_closes: list[tuple[Any, ...]] = field(default_factory=list)
    events: list[tuple[Any, ...]] = field(default_factory=list)


def _encode_txn(txn: Txn) -> _TxnRows:
    rid = txn.runtime_id
    now = _us(utcnow())
    t = _TxnRows(rid, txn.generation, now)
    for st in txn.states.values():
        t.states.append(
            (
                rid,
                st.input_id.value,
                st.current_state.value,
                int(st.is_terminal),
                st.last_run_id.value if st.last_run_id is not None else None,
                st.to_json(),
                _us(st.updated_at),
            )
        )
    t.queue_orders = [(order, rid, iid.value) for iid, order in txn.queue_orders.items()]
    t.idempotency = [
        (r.key, r.input_id.value, r.content_hash, _us(r.accepted_at)) for r in txn.idempotency
    ]
    t.reset = txn.conversation_reset
    t.rows = [
        (
            rid,
            r.index,
            r.run_id.value if r.run_id is not None else None,
            json.dumps([i.value for i in r.input_ids]),
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
            json.dumps([i.value for i in rc.contributing_input_ids]),
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
            int(run.is_continuation),
            now,
        )
        for run in txn.runs
    ]
    if txn.runtime_state is not None and txn.runtime_state is not RuntimeState.STOPPED:
        t.state = txn.runtime_state.value
    t.recovered = txn.recovered
    t.next_generation = txn.next_generation
    t.inbox_done = [(rid, seq) for seq in txn.inbox_done]
    t.peer_closes = [
        (c.status, _us(c.closed_at), c.closed_by, rid, c.request_id)
        for c in txn.peer_request_closes
    ]
    last = None
    for ev in txn.events:
        if last is not None and ev.seq <= last:
            raise _Refused(f"event seqs of one transaction are not increasing ({last}, {ev.seq})")
        last = ev.seq
        t.events.append((rid, ev.seq, ev.to_json(), _us(ev.timestamp)))
    return t


def _apply_txn(conn: sqlite3.Connection, t: _TxnRows) -> None:
    """Write one encoded transaction (runs inside its savepoint on the writer thread)."""
    rid = t.runtime_id
    row = conn.execute(
        "SELECT generation, last_event_seq FROM runtimes WHERE runtime_id = ?", (rid,)
    ).fetchone()
    if row is None:
        conn.execute(
            "INSERT INTO runtimes (runtime_id, generation, updated_at) VALUES (?, 0, ?)",
            (rid, t.now),
        )
        last_seq = 0
    else:
        generation, last_seq = row
        if generation != 0 and generation != t.generation:
            raise _Refused(
                f"runtime {rid} is owned by generation {generation}; this writer holds "
                f"generation {t.generation} (fenced, S10)",
                fenced=True,
            )
    if t.events and t.events[0][1] <= last_seq:
        raise _Refused(
            f"event seq {t.events[0][1]} of runtime {rid} is not after the last stored seq "
            f"{last_seq} (S15: seq only grows)"
        )
    if t.reset:
        conn.execute("DELETE FROM conversation_rows WHERE runtime_id = ?", (rid,))
    if t.states:
        conn.executemany(
            "INSERT INTO input_states (runtime_id, input_id, current_state, is_terminal,"
            " last_run_id, state_json, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (runtime_id, input_id) DO UPDATE SET"
            " current_state = excluded.current_state, is_terminal = excluded.is_terminal,"
            " last_run_id = excluded.last_run_id, state_json = excluded.state_json,"
            " updated_at = excluded.updated_at",
            t.states,
        )
    if t.queue_orders:
        conn.executemany(
            "UPDATE input_states SET queue_order = ? WHERE runtime_id = ? AND input_id = ?",
            t.queue_orders,
        )
    if t.idempotency:
        # the fenced owner's claim is authoritative: it may re-claim a key whose window it
        # released (S11); inbox_push, in contrast, never replaces a claim
        conn.executemany(
            "INSERT INTO idempotency (runtime_id, key, input_id, content_hash, accepted_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (runtime_id, key) DO UPDATE SET"
            " input_id = excluded.input_id, content_hash = excluded.content_hash,"
            " accepted_at = excluded.accepted_at",
            [(rid, *rec) for rec in t.idempotency],
        )
    if t.rows:
        try:
            conn.executemany(
                "INSERT INTO conversation_rows (runtime_id, idx, run_id, input_ids, message,"
                " digest) VALUES (?, ?, ?, ?, ?, ?)",
                t.rows,
            )
        except sqlite3.IntegrityError:
            raise _Refused(
                f"a conversation row among {t.rows[0][1]}..{t.rows[-1][1]} of runtime {rid} is "
                "already stored (conversations are append-only)"
            ) from None
    if t.receipts:
        try:
            conn.executemany(
                "INSERT INTO receipts (runtime_id, run_id, sequence, contributing_input_ids,"
                " receipt_json, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                t.receipts,
            )
        except sqlite3.IntegrityError:
            raise _Refused(
                f"a receipt of this transaction is already stored (runtime {rid})"
            ) from None
    if t.runs:
        conn.executemany(
            "INSERT INTO runs (run_id, runtime_id, status, result_json, error, is_continuation,"
            " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (run_id) DO UPDATE SET runtime_id = excluded.runtime_id,"
            " status = excluded.status, result_json = excluded.result_json,"
            " error = excluded.error, is_continuation = excluded.is_continuation,"
            " updated_at = excluded.updated_at",
            t.runs,
        )
    if t.events:
        conn.executemany(
            "INSERT INTO events (runtime_id, seq, event_json, created_at) VALUES (?, ?, ?, ?)",
            t.events,
        )
    if t.inbox_done:
        conn.executemany("DELETE FROM inbox WHERE runtime_id = ? AND seq = ?", t.inbox_done)
    if t.peer_closes:
        conn.executemany(
            "UPDATE peer_requests SET status = ?, closed_at = ?, closed_by = ?"
            " WHERE requester_runtime_id = ? AND request_id = ? AND closed_at IS NULL",
            t.peer_closes,
        )
    if t.next_generation is not None:
        conn.execute(
            "UPDATE runtimes SET generation = ? WHERE runtime_id = ?", (t.next_generation, rid)
        )
    conn.execute(
        "UPDATE runtimes SET state = COALESCE(?, state), recovery_count = recovery_count + ?,"
        " last_event_seq = MAX(last_event_seq, ?), updated_at = ? WHERE runtime_id = ?",
        (t.state, int(t.recovered), t.events[-1][1] if t.events else 0, t.now, rid),
    )


def _snapshot(txn: Txn) -> Txn:
    """What ``txn`` holds now, safe from the runtime's later changes to its live objects."""
    return Txn(
        txn.runtime_id,
        txn.generation,
        durable=txn.durable,
        states={k: v.clone() for k, v in txn.states.items()},
        queue_orders=dict(txn.queue_orders),
        idempotency=list(txn.idempotency),
        rows=list(txn.rows),
        conversation_reset=txn.conversation_reset,
        receipts=list(txn.receipts),
        runs=[replace(r) for r in txn.runs],
        runtime_state=txn.runtime_state,
        recovered=txn.recovered,
        next_generation=txn.next_generation,
        inbox_done=list(txn.inbox_done),
        peer_request_closes=list(txn.peer_request_closes),
        events=list(txn.events),
    )


class _TxnJob:
    """A submitted transaction: encoded by ``prepare`` (writer thread, before BEGIN), then
    applied inside its savepoint."""

    __slots__ = ("rows", "txn")

    def __init__(self, txn: Txn) -> None:
        self.txn = txn
        self.rows: _TxnRows | None = None

    def prepare(self) -> None:
        if self.rows is None:
            self.rows = _encode_txn(self.txn)

    def __call__(self, conn: sqlite3.Connection) -> None:
        self.prepare()
        assert self.rows is not None
        _apply_txn(conn, self.rows)  # looked up at run time (tests inject faults here)


def _poison_key(job: Any) -> tuple[str, int] | None:
    fn = getattr(job, "fn", None)
    if isinstance(fn, _TxnJob):
        return (fn.txn.runtime_id, fn.txn.generation)
    return None


def _poisoned_error(path: Any, key: tuple[str, int]) -> FencedError:
    return FencedError(
        f"store {path}: an earlier write of runtime {key[0]} (generation {key[1]}) failed; "
        "this instance's later writes are refused until it recovers under a new generation"
    )


# ------------------------------------------------------------------------------ decoding


def _state(text: str) -> InputState:
    return InputState.from_json(text)


def _conv_row(row: Sequence[Any]) -> ConversationRow:
    idx, run_id, input_ids, message, digest = row
    return ConversationRow(
        idx,
        RunId(run_id) if run_id is not None else None,
        tuple(InputId(i) for i in json.loads(input_ids)),
        Message.from_json(message),
        bytes(digest),
    )


def _session(row: Sequence[Any]) -> SessionRecord:
    sid, created, updated, config, labels, archived = row
    return SessionRecord(
        sid, _dt(created), _dt(updated), json.loads(config), json.loads(labels), bool(archived)
    )


def _peer_request(row: Sequence[Any]) -> PeerRequestRecord:
    req, rid, resp, env, req_name, resp_name, intent, created, status, closed, by = row
    return PeerRequestRecord(
        req,
        rid,
        resp,
        env,
        _dt(created),
        req_name,
        resp_name,
        intent,
        status,
        _dt(closed) if closed is not None else None,
        by,
    )


def _open_peer_request(conn: sqlite3.Connection, row: tuple[Any, ...]) -> tuple[Any, ...]:
    """Insert the request unless the requester has one with its envelope or request id; the
    stored row either way (one write transaction)."""
    found = conn.execute(
        f"SELECT {PEER_COLS} FROM peer_requests WHERE requester_runtime_id = ?"
        " AND (envelope_id = ? OR request_id = ?) LIMIT 1",
        (row[0], row[3], row[1]),
    ).fetchone()
    if found is not None:
        return tuple(found)
    conn.execute(
        f"INSERT INTO peer_requests ({PEER_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row
    )
    return row


_SESSION_COLS = "session_id, created_at, updated_at, config, labels, archived"


def _chunks(items: Sequence[T]) -> Iterable[Sequence[T]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


def _load_runtime(conn: sqlite3.Connection, rid: str) -> LoadedRuntime:
    out = LoadedRuntime(runtime_id=rid)
    row = conn.execute(
        "SELECT state, generation, last_event_seq, recovery_count FROM runtimes"
        " WHERE runtime_id = ?",
        (rid,),
    ).fetchone()
    if row is not None:
        state, out.generation, out.last_seq, out.recovery_count = row
        out.state = RuntimeState(state) if state is not None else None
    for order, text in conn.execute(
        "SELECT queue_order, state_json FROM input_states"
        " WHERE runtime_id = ? AND is_terminal = 0"
        " ORDER BY queue_order IS NOT NULL, queue_order, input_id",
        (rid,),
    ).fetchall():
        st = _state(text)
        out.inputs.append(st)
        if order is not None:
            out.queue_orders[st.input_id] = order
    out.idempotency = [
        IdempotencyRecord(key, InputId(iid), chash, _dt(at))
        for key, iid, chash, at in conn.execute(
            "SELECT key, input_id, content_hash, accepted_at FROM idempotency"
            " WHERE runtime_id = ? ORDER BY accepted_at, key",
            (rid,),
        ).fetchall()
    ]
    out.conversation = [
        _conv_row(r)
        for r in conn.execute(
            "SELECT idx, run_id, input_ids, message, digest FROM conversation_rows"
            " WHERE runtime_id = ? ORDER BY idx",
            (rid,),
        ).fetchall()
    ]
    pending_runs = (
        "SELECT last_run_id FROM input_states"
        " WHERE runtime_id = ? AND is_terminal = 0 AND last_run_id IS NOT NULL"
    )
    for run_id, ids in conn.execute(
        f"SELECT run_id, contributing_input_ids FROM receipts"
        f" WHERE runtime_id = ? AND run_id IN ({pending_runs})",
        (rid, rid),
    ).fetchall():
        out.receipted.update((RunId(run_id), InputId(i)) for i in json.loads(ids))
    for r in conn.execute(
        f"SELECT {RUN_COLS} FROM runs WHERE run_id IN ({pending_runs})"
        f" UNION SELECT {RUN_COLS} FROM runs WHERE runtime_id = ? AND status = 'running'",
        (rid, rid),
    ).fetchall():
        rec = run_record(r)
        out.runs[rec.run_id] = rec
    wanted: list[str] = []
    for st in out.inputs:
        src = st.reconstruction_source
        if isinstance(src, CoalescingSource):
            wanted.extend(i.value for i in src.source_input_ids)
    for part in _chunks(sorted(set(wanted))):
        marks = ",".join("?" * len(part))
        for (text,) in conn.execute(
            f"SELECT state_json FROM input_states WHERE runtime_id = ? AND input_id IN ({marks})",
            (rid, *part),
        ).fetchall():
            st = _state(text)
            out.sources[st.input_id] = st
    return out


def _inbox_push(
    conn: sqlite3.Connection,
    entry: tuple[str, str, str | None, int],
    idem: tuple[str, str, str, int] | None,
    max_pending: int,
) -> tuple[str, str | None, int]:
    rid, input_json, recon_json, now = entry
    if idem is not None:
        key, _iid, chash, _at = idem
        prior = conn.execute(
            "SELECT input_id, content_hash FROM idempotency WHERE runtime_id = ? AND key = ?",
            (rid, key),
        ).fetchone()
        if prior is not None:
            return ("deduplicated" if prior[1] == chash else "conflict", prior[0], 0)
    (pending,) = conn.execute(
        "SELECT (SELECT count(*) FROM input_states WHERE runtime_id = ? AND is_terminal = 0)"
        " + (SELECT count(*) FROM inbox WHERE runtime_id = ?)",
        (rid, rid),
    ).fetchone()
    if pending >= max_pending:
        return ("queue_full", None, 0)
    if idem is not None:
        conn.execute(
            "INSERT INTO idempotency (runtime_id, key, input_id, content_hash, accepted_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (rid, *idem),
        )
    cur = conn.execute(
        "INSERT INTO inbox (runtime_id, input_id, input_json, reconstruction_json, created_at)"
        " VALUES (?, ?, ?, ?, ?)",
        (rid, idem[1] if idem is not None else None, input_json, recon_json, now),
    )
    return ("accepted", None, int(cur.lastrowid or 0))


def _acquire(conn: sqlite3.Connection, rid: str, owner: str, ttl: float) -> int | None:
    now = time.time()
    row = conn.execute(
        "SELECT generation, lease_owner, lease_expiry FROM runtimes WHERE runtime_id = ?", (rid,)
    ).fetchone()
    if row is None:
        conn.execute(
            "INSERT INTO runtimes (runtime_id, state, generation, lease_owner, lease_expiry,"
            " updated_at) VALUES (?, 'idle', 1, ?, ?, ?)",
            (rid, owner, now + ttl, _us(utcnow())),
        )
        return 1
    generation, holder, expiry = row
    if holder is not None and holder != owner and expiry is not None and expiry > now:
        return None
    conn.execute(
        "UPDATE runtimes SET generation = ?, lease_owner = ?, lease_expiry = ?, updated_at = ?"
        " WHERE runtime_id = ?",
        (generation + 1, owner, now + ttl, _us(utcnow()), rid),
    )
    return int(generation) + 1


# Prune statements (S18), each deleting at most one batch. Nothing non-terminal is deleted, nor
# what recovery or a waiter still needs: receipts of pending inputs' last runs, runs named by
# any kept input, sources of pending coalesced aggregates, keys of pending or inboxed inputs.
_PRUNE: tuple[tuple[str, str], ...] = (
    (
        "input_states",
        "DELETE FROM input_states WHERE rowid IN ("
        " SELECT s.rowid FROM input_states s"
        " WHERE s.is_terminal = 1 AND s.updated_at < :cutoff"
        " AND (s.runtime_id, s.input_id) NOT IN ("
        "  SELECT p.runtime_id, j.value FROM input_states p,"
        "   json_each(p.state_json, '$.reconstruction_source.source_input_ids') j"
        "  WHERE p.is_terminal = 0"
        "   AND json_extract(p.state_json, '$.reconstruction_source.source_type') = 'coalescing')"
        " LIMIT :batch)",
    ),
    (
        "receipts",
        "DELETE FROM receipts WHERE rowid IN ("
        " SELECT r.rowid FROM receipts r WHERE r.created_at < :cutoff"
        " AND NOT EXISTS (SELECT 1 FROM input_states s WHERE s.last_run_id = r.run_id"
        "  AND s.runtime_id = r.runtime_id AND s.is_terminal = 0)"
        " LIMIT :batch)",
    ),
    (
        "runs",
        "DELETE FROM runs WHERE rowid IN ("
        " SELECT u.rowid FROM runs u WHERE u.status <> 'running' AND u.updated_at < :cutoff"
        " AND NOT EXISTS (SELECT 1 FROM input_states s WHERE s.last_run_id = u.run_id)"
        " LIMIT :batch)",
    ),
    (
        "idempotency",
        "DELETE FROM idempotency WHERE rowid IN ("
        " SELECT i.rowid FROM idempotency i WHERE i.accepted_at < :cutoff"
        " AND NOT EXISTS (SELECT 1 FROM input_states s WHERE s.runtime_id = i.runtime_id"
        "  AND s.input_id = i.input_id AND s.is_terminal = 0)"
        " AND NOT EXISTS (SELECT 1 FROM inbox b WHERE b.runtime_id = i.runtime_id"
        "  AND b.input_id = i.input_id)"
        " LIMIT :batch)",
    ),
    (
        "events",
        "DELETE FROM events WHERE rowid IN ("
        " SELECT e.rowid FROM runtimes r JOIN events e ON e.runtime_id = r.runtime_id"
        " AND e.seq <= r.last_event_seq - :keep"
        " LIMIT :batch)",
    ),
)


def _execute_count(sql: str, params: dict[str, int], conn: sqlite3.Connection) -> int:
    return int(conn.execute(sql, params).rowcount)


# ------------------------------------------------------------------------------ threads


@dataclass(slots=True, eq=False)
class _Job:
    """Work for a store thread; ``fn`` is None for the stop marker."""

    fn: Callable[[sqlite3.Connection], Any] | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    is_txn: bool = False
    prepare: Callable[[], None] | None = None  # CPU work done before BEGIN (encoding)
    seq: int = 0  # submission order of transactions (for poisoning)


def _settle(items: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for fut, result, exc in items:
        if fut.done():  # the awaiting side gave up; the work stands
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)


def _deliver(jobs: list[tuple[_Job, Any, BaseException | None]]) -> None:
    """Resolve futures on their loops, in order, from a store thread."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, Any]]] = {}
    for job, result, exc in jobs:
        by_loop.setdefault(job.loop, []).append((job.future, result, exc))
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(_settle, items)


class SqliteStore:
    """The store protocol over a SQLite file (see the module docstring for the design).

    ``commits`` counts COMMITs (group-committed batches) and ``transactions`` the submitted
    transactions they made durable, so ``commits < transactions`` shows batching at work.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        url: str | None = None,
        max_batch: int = 256,
        migrations: Sequence[Migration] | None = None,
    ) -> None:
        self.path = Path(path).expanduser().absolute()
        self.url = url or f"sqlite:///{self.path}"
        # (runtime, generation) -> submission seq of its first failed transaction (poisoning)
        self._poisoned: dict[tuple[str, int], int] = {}
        self._txn_seq = 0
        self.max_batch = max(1, max_batch)
        self.commits = 0
        self.transactions = 0
        self._migrations = list(migrations) if migrations is not None else None
        self._state = "new"  # new -> open -> closing -> closed
        self._wq: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._rq: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._reader: threading.Thread | None = None
        self._open_lock = asyncio.Lock()
        self._dead: StoreError | None = None  # set if a store thread stopped unexpectedly

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r}, {self._state})"

    # ---------------------------------------------------------------- errors

    def _error(self, exc: BaseException) -> StoreError:
        """``exc`` as a StoreError naming this file (StoreErrors pass through)."""
        if isinstance(exc, StoreError):
            return exc
        if isinstance(exc, _Refused):
            cls = FencedError if exc.fenced else StoreError
            return cls(f"store {self.path}: {exc}")
        err = StoreError(f"store {self.path}: {_describe(exc)}")
        err.__cause__ = exc
        return err

    # ---------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        """Start the threads, check the file (quick_check, schema version) and migrate it.

        Raises ``StoreError`` naming the file when it cannot be used; nothing is left running
        then, and the file is not modified.
        """
        async with self._open_lock:
            if self._state == "open":
                return
            if self._state != "new":
                raise StoreError(f"store {self.path}: a closed store cannot be opened again")
            loop = asyncio.get_running_loop()
            wready: asyncio.Future[None] = loop.create_future()
            self._writer = threading.Thread(
                target=self._writer_main,
                args=(_Job(None, loop, wready),),
                name=f"meerkat-sqlite-writer:{self.path.name}",
                daemon=True,
            )
            self._writer.start()
            await wready
            rready: asyncio.Future[None] = loop.create_future()
            self._reader = threading.Thread(
                target=self._reader_main,
                args=(_Job(None, loop, rready),),
                name=f"meerkat-sqlite-reader:{self.path.name}",
                daemon=True,
            )
            self._reader.start()
            try:
                await rready
            except BaseException:
                await self._stop(self._wq)
                raise
            self._state = "open"

    async def close(self) -> None:
        """Commit every transaction submitted so far, then stop the threads (each closes its
        own connection). Later calls do nothing; later submits fail."""
        if self._state != "open":
            self._state = "closed" if self._state == "new" else self._state
            return
        self._state = "closing"
        try:
            await self._stop(self._wq)
            await self._stop(self._rq)
        finally:
            self._state = "closed"

    async def _stop(self, q: queue.SimpleQueue[_Job]) -> None:
        thread = self._writer if q is self._wq else self._reader
        if thread is None or not thread.is_alive() or self._dead is not None:
            return  # gone or going (a store thread failed): nothing would acknowledge
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        q.put(_Job(None, loop, done))
        await done

    def _connect(self, *, writer: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(
            str(self.path),
            timeout=5.0,
            isolation_level=None,  # we issue BEGIN / COMMIT ourselves
            check_same_thread=True,
            cached_statements=256,
        )
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            if not writer:
                conn.execute("PRAGMA query_only = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Check the file, then switch to WAL and migrate (writer thread, at open)."""
        problems = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            shown = "; ".join(str(p) for p in problems[:3])
            raise _Refused(f"database disk image is malformed (quick_check: {shown})")
        migrations = self._migrations if self._migrations is not None else load_migrations()
        known = max((m.version for m in migrations), default=0)
        current = self._schema_version(conn, known)  # refuses before anything is written
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise _Refused(
                f"cannot switch to WAL mode (journal_mode is {mode!r}); is the file on a "
                "network filesystem?"
            )
        conn.execute("PRAGMA synchronous = FULL")
        if current >= known:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            current = self._schema_version(conn, known)  # another process may have migrated
            for m in migrations:
                if m.version <= current:
                    continue
                for stmt in _statements(m.sql):
                    conn.execute(stmt)
                conn.execute(
                    "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                    (m.version, m.name, _us(utcnow())),
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _schema_version(conn: sqlite3.Connection, known: int) -> int:
        try:
            return schema_version_of(conn, known)
        except SchemaRefusedError as exc:
            raise _Refused(str(exc)) from None

    # ---------------------------------------------------------------- the writer thread

    def _writer_main(self, ready: _Job) -> None:
        conn: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._connect(writer=True)
            self._prepare(conn)
        except BaseException as exc:
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            _deliver([(ready, None, self._error(exc))])
            return
        _deliver([(ready, None, None)])
        stop: _Job | None = None
        batch: list[_Job] = []
        try:
            while stop is None:
                job = self._wq.get()
                if job.fn is None:
                    stop = job
                    break
                batch = [job]
                while len(batch) < self.max_batch:
                    try:
                        nxt = self._wq.get_nowait()
                    except queue.Empty:
                        break
                    if nxt.fn is None:
                        stop = nxt
                        break
                    batch.append(nxt)
                self._run_batch(conn, batch)
                batch = []
        except BaseException as exc:  # a bug: never leave a future hanging
            err = self._error(exc)
            self._dead = StoreError(f"{err} (the store's writer thread stopped)")
            leftover: list[tuple[_Job, Any, BaseException | None]] = [
                (j, None, self._dead)
                for j in batch  # in flight: never committed
            ]
            while True:
                try:
                    j = self._wq.get_nowait()
                except queue.Empty:
                    break
                if j.fn is None:
                    stop = j
                else:
                    leftover.append((j, None, err))
            _deliver(leftover)
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            if stop is not None:
                _deliver([(stop, None, None)])

    def _poison(self, jobs: Iterable[_Job]) -> None:
        """Record failed transactions: later ones of the same (runtime, generation) must not
        become durable without them (base.py: order), so they are refused."""
        for job in jobs:
            key = _poison_key(job)
            if key is not None and job.seq < self._poisoned.get(key, job.seq + 1):
                self._poisoned[key] = job.seq

    def _refused(self, job: _Job) -> FencedError | None:
        """The error for a transaction submitted after a failed one of its (runtime,
        generation), else None. Earlier transactions (e.g. retried after an abort) pass."""
        key = _poison_key(job)
        if key is None or key not in self._poisoned or self._poisoned[key] >= job.seq:
            return None
        return _poisoned_error(self.path, key)

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        """Commit ``batch`` as one group and resolve its futures in submission order."""
        _deliver(self._commit_batch(conn, batch, retry=True))

    def _commit_batch(
        self, conn: sqlite3.Connection, batch: list[_Job], retry: bool
    ) -> list[tuple[_Job, Any, BaseException | None]]:
        """One group commit: BEGIN IMMEDIATE, a savepoint per job, one COMMIT. Returns each
        job's outcome in batch order.

        A job that fails is rolled back to its savepoint; only its future fails. When SQLite
        abandons the whole transaction because of one job (disk full, I/O error), that job
        fails and the others, whose work was lost with the transaction, run once more in a
        fresh transaction (jobs are pure database work, so running one again is safe); if
        that one is abandoned too, or COMMIT fails, every job of it fails.
        """
        unprepared: dict[int, BaseException] = {}
        for job in batch:
            if job.prepare is not None:
                try:
                    job.prepare()
                except BaseException as exc:  # e.g. cannot encode: only this job fails
                    unprepared[id(job)] = self._error(exc)
        out: list[tuple[_Job, Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
        except BaseException as exc:
            err = self._error(exc)
            self._poison(batch)
            return [(j, None, unprepared.get(id(j), err)) for j in batch]
        aborted: BaseException | None = None
        culprit: _Job | None = None
        for job in batch:
            assert job.fn is not None
            if aborted is not None:
                out.append((job, None, None))  # not run; settled below
                continue
            refused = self._refused(job)
            if refused is not None:
                out.append((job, None, refused))
                continue
            if id(job) in unprepared:
                out.append((job, None, unprepared[id(job)]))
                self._poison([job])
                continue
            try:
                conn.execute("SAVEPOINT job")
                result = job.fn(conn)
                conn.execute("RELEASE job")
            except BaseException as exc:
                err = self._error(exc)
                out.append((job, None, err))
                self._poison([job])
                if not conn.in_transaction:  # SQLite abandoned the whole transaction
                    aborted, culprit = err, job
                    continue
                try:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                except BaseException as exc2:
                    aborted, culprit = self._error(exc2), job
            else:
                out.append((job, result, None))
        if aborted is None:
            try:
                conn.execute("COMMIT")
            except BaseException as exc:
                aborted = self._error(exc)
        if aborted is None:
            self.commits += 1
            self.transactions += sum(1 for j, _, exc in out if j.is_txn and exc is None)
            return out
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        innocent = [j for j, _, exc in out if exc is None]
        if culprit is not None and retry and innocent:
            again = {id(o[0]): o for o in self._commit_batch(conn, innocent, retry=False)}
            return [again.get(id(o[0]), o) for o in out]
        lost = StoreError(
            f"{aborted} (the transaction was rolled back with its batch; nothing of it was written)"
        )
        self._poison([j for j, _, _ in out])
        return [(j, None, exc if exc is not None else lost) for j, _, exc in out]

    # ---------------------------------------------------------------- the reader thread

    def _reader_main(self, ready: _Job) -> None:
        try:
            conn = self._connect(writer=False)
        except BaseException as exc:
            _deliver([(ready, None, self._error(exc))])
            return
        _deliver([(ready, None, None)])
        stop: _Job | None = None
        try:
            while True:
                job = self._rq.get()
                if job.fn is None:
                    stop = job
                    break
                try:
                    result = job.fn(conn)
                except BaseException as exc:
                    if conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                    _deliver([(job, None, self._error(exc))])
                else:
                    _deliver([(job, result, None)])
        except BaseException as exc:  # a bug: never leave a future hanging
            self._dead = StoreError(f"{self._error(exc)} (the store's reader thread stopped)")
            leftover: list[tuple[_Job, Any, BaseException | None]] = []
            while True:
                try:
                    j = self._rq.get_nowait()
                except queue.Empty:
                    break
                if j.fn is None:
                    stop = j
                else:
                    leftover.append((j, None, self._dead))
            _deliver(leftover)
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            if stop is not None:
                _deliver([(stop, None, None)])

    # ---------------------------------------------------------------- handoff

    def _check_open(self) -> None:
        if self._dead is not None:
            raise self._dead
        if self._state != "open":
            what = "is not open (call open() first)" if self._state == "new" else "is closed"
            raise StoreError(f"store {self.path}: the store {what}")

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self._check_open()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._wq.put(_Job(fn, loop, fut))
        return await fut

    async def _read(self, fn: Callable[[sqlite3.Connection], T], *, snapshot: bool = False) -> T:
        """Run ``fn`` on the reader thread; with ``snapshot`` inside one read transaction."""
        self._check_open()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        if snapshot:

            def run(conn: sqlite3.Connection) -> T:
                conn.execute("BEGIN")
                try:
                    return fn(conn)
                finally:
                    conn.execute("COMMIT")

            self._rq.put(_Job(run, loop, fut))
        else:
            self._rq.put(_Job(fn, loop, fut))
        return await fut

    # ---------------------------------------------------------------- commit

    def submit(self, txn: Txn) -> asyncio.Future[None]:
        """Snapshot ``txn`` and queue it for the writer; the future resolves after the COMMIT
        that made it durable, or fails with FencedError / StoreError.

        Cheap on the event loop: the snapshot clones the input states and run records (the
        objects the runtime keeps changing) and copies the lists; conversation rows, receipts,
        idempotency records and events are immutable once handed over. The writer thread
        encodes the snapshot to JSON before it opens the batch's transaction.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        try:
            self._check_open()
            job = _TxnJob(_snapshot(txn))
        except BaseException as exc:
            fut.set_exception(self._error(exc))
            return fut
        self._txn_seq += 1
        self._wq.put(_Job(job, loop, fut, is_txn=True, prepare=job.prepare, seq=self._txn_seq))
        return fut

    # ---------------------------------------------------------------- sessions

    async def save_session(self, record: SessionRecord) -> None:
        params = (
            record.session_id,
            _us(record.created_at),
            _us(record.updated_at),
            json.dumps(record.config),
            json.dumps(record.labels),
            int(record.archived),
        )

        name = record.config.get("comms_name")

        def run(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    f"INSERT INTO sessions ({_SESSION_COLS}) VALUES (?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (session_id) DO UPDATE SET created_at = excluded.created_at,"
                    " updated_at = excluded.updated_at, config = excluded.config,"
                    " labels = excluded.labels, archived = excluded.archived",
                    params,
                )
            except sqlite3.IntegrityError:
                if name is None:
                    raise
                holder = conn.execute(
                    "SELECT session_id FROM sessions WHERE archived = 0"
                    " AND json_extract(config, '$.comms_name') = ?",
                    (name,),
                ).fetchone()
                raise CommsNameTakenError(
                    f"store {self.path}: comms name {name!r} is already taken by session "
                    f"{holder[0] if holder else '(unknown)'}",
                    str(name),
                ) from None

        await self._write(run)

    async def load_session(self, session_id: str) -> SessionRecord | None:
        def run(conn: sqlite3.Connection) -> SessionRecord | None:
            row = conn.execute(
                f"SELECT {_SESSION_COLS} FROM sessions WHERE session_id = ?", (session_id,)
            ).fetchone()
            return _session(row) if row is not None else None

        return await self._read(run)

    async def list_sessions(self, *, include_archived: bool = False) -> list[SessionRecord]:
        where = "" if include_archived else " WHERE archived = 0"

        def run(conn: sqlite3.Connection) -> list[SessionRecord]:
            rows = conn.execute(
                f"SELECT {_SESSION_COLS} FROM sessions{where} ORDER BY created_at, session_id"
            ).fetchall()
            return [_session(r) for r in rows]

        return await self._read(run)

    # ---------------------------------------------------------------- reads

    async def runtimes_with_pending_inputs(self) -> list[str]:
        """One query over the partial index of non-terminal inputs and the inbox index."""

        def run(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT runtime_id FROM input_states WHERE is_terminal = 0"
                " UNION SELECT runtime_id FROM inbox ORDER BY 1"
            ).fetchall()
            return [r[0] for r in rows]

        return await self._read(run)

    async def runtimes_needing_owner(self, limit: int = 1000) -> list[str]:
        """Pending runtimes whose lease is free or expired (one query)."""

        def run(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT p.runtime_id FROM (SELECT runtime_id FROM input_states"
                " WHERE is_terminal = 0 UNION SELECT runtime_id FROM inbox) p"
                " LEFT JOIN runtimes r ON r.runtime_id = p.runtime_id"
                " WHERE r.runtime_id IS NULL OR r.lease_owner IS NULL"
                " OR r.lease_expiry IS NULL OR r.lease_expiry <= ? ORDER BY 1 LIMIT ?",
                (time.time(), limit),
            ).fetchall()
            return [r[0] for r in rows]

        return await self._read(run)

    async def load_runtime(self, runtime_id: str) -> LoadedRuntime:
        return await self._read(lambda conn: _load_runtime(conn, runtime_id), snapshot=True)

    async def load_input_state(self, runtime_id: str, input_id: InputId) -> InputState | None:
        def run(conn: sqlite3.Connection) -> InputState | None:
            row = conn.execute(
                "SELECT state_json FROM input_states WHERE runtime_id = ? AND input_id = ?",
                (runtime_id, input_id.value),
            ).fetchone()
            return _state(row[0]) if row is not None else None

        return await self._read(run)

    async def load_input_states(
        self, runtime_id: str, *, include_terminal: bool = True, limit: int | None = None
    ) -> list[InputState]:
        sql = "SELECT state_json FROM input_states WHERE runtime_id = ?"
        if not include_terminal:
            sql += " AND is_terminal = 0"
        sql += " ORDER BY input_id LIMIT ?"
        lim = -1 if limit is None else max(limit, 0)

        def run(conn: sqlite3.Connection) -> list[InputState]:
            return [_state(r[0]) for r in conn.execute(sql, (runtime_id, lim)).fetchall()]

        return await self._read(run)

    async def load_run(self, run_id: RunId) -> RunRecord | None:
        def run(conn: sqlite3.Connection) -> RunRecord | None:
            row = conn.execute(
                f"SELECT {RUN_COLS} FROM runs WHERE run_id = ?", (run_id.value,)
            ).fetchone()
            return run_record(row) if row is not None else None

        return await self._read(run)

    async def load_conversation(self, runtime_id: str) -> list[ConversationRow]:
        def run(conn: sqlite3.Connection) -> list[ConversationRow]:
            rows = conn.execute(
                "SELECT idx, run_id, input_ids, message, digest FROM conversation_rows"
                " WHERE runtime_id = ? ORDER BY idx",
                (runtime_id,),
            ).fetchall()
            return [_conv_row(r) for r in rows]

        return await self._read(run)

    async def load_events(
        self, runtime_id: str, after_seq: int = 0, limit: int = 1000
    ) -> list[RuntimeEventEnvelope]:
        def run(conn: sqlite3.Connection) -> list[RuntimeEventEnvelope]:
            rows = conn.execute(
                "SELECT event_json FROM events WHERE runtime_id = ? AND seq > ?"
                " ORDER BY seq LIMIT ?",
                (runtime_id, after_seq, max(limit, 0)),
            ).fetchall()
            return [RuntimeEventEnvelope.from_json(r[0]) for r in rows]

        return await self._read(run)

    async def last_event_seq(self, runtime_id: str) -> int:
        def run(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT last_event_seq FROM runtimes WHERE runtime_id = ?", (runtime_id,)
            ).fetchone()
            return int(row[0]) if row is not None else 0

        return await self._read(run)

    async def first_event_seq(self, runtime_id: str) -> int | None:
        def run(conn: sqlite3.Connection) -> int | None:
            row = conn.execute(
                "SELECT MIN(seq) FROM events WHERE runtime_id = ?", (runtime_id,)
            ).fetchone()
            return int(row[0]) if row[0] is not None else None

        return await self._read(run)

    async def change_token(self) -> int:
        """``PRAGMA data_version`` of the reader connection (it changes when any other
        connection, ours or another process's, commits) combined with the local commit
        counter."""
        version = await self._read(
            lambda conn: int(conn.execute("PRAGMA data_version").fetchone()[0])
        )
        return (version << 32) | (self.commits & 0xFFFFFFFF)

    # ---------------------------------------------------------------- ownership (S10)

    async def acquire_lease(self, runtime_id: str, owner: str, ttl: float) -> int | None:
        return await self._write(lambda conn: _acquire(conn, runtime_id, owner, ttl))

    async def renew_lease(self, runtime_id: str, owner: str, generation: int, ttl: float) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE runtimes SET lease_expiry = ? WHERE runtime_id = ? AND lease_owner = ?"
                " AND generation = ?",
                (time.time() + ttl, runtime_id, owner, generation),
            )
            return cur.rowcount == 1

        return await self._write(run)

    async def renew_leases(self, owner: str, leases: dict[str, int], ttl: float) -> set[str]:
        """One write job for all leases (SQLite has one writer; its jobs are short)."""
        items = list(leases.items())

        def run(conn: sqlite3.Connection) -> set[str]:
            expiry = time.time() + ttl
            renewed: set[str] = set()
            for rid, gen in items:
                cur = conn.execute(
                    "UPDATE runtimes SET lease_expiry = ? WHERE runtime_id = ?"
                    " AND lease_owner = ? AND generation = ?",
                    (expiry, rid, owner, gen),
                )
                if cur.rowcount == 1:
                    renewed.add(rid)
            return renewed

        return await self._write(run) if items else set()

    def abandon_generation(self, runtime_id: str, generation: int) -> None:
        key = (runtime_id, generation)
        self._poisoned[key] = min(self._poisoned.get(key, self._txn_seq), self._txn_seq)

    async def release_lease(self, runtime_id: str, owner: str, generation: int) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE runtimes SET lease_owner = NULL, lease_expiry = NULL"
                " WHERE runtime_id = ? AND lease_owner = ? AND generation = ?",
                (runtime_id, owner, generation),
            )

        await self._write(run)

    async def lease_owner(self, runtime_id: str) -> tuple[str | None, float | None, int]:
        def run(conn: sqlite3.Connection) -> tuple[str | None, float | None, int]:
            row = conn.execute(
                "SELECT lease_owner, lease_expiry, generation FROM runtimes WHERE runtime_id = ?",
                (runtime_id,),
            ).fetchone()
            if row is None:
                return (None, None, 0)
            return (row[0], row[1], int(row[2]))

        return await self._read(run)

    # ---------------------------------------------------------------- inbox (S10)

    async def inbox_push(
        self, entry: InboxEntry, idempotency: IdempotencyRecord | None, max_pending: int
    ) -> tuple[str, InputId | None]:
        """One write transaction: key check through the unique index, admission counted in
        SQL, then the key and the entry inserted. Sets ``entry.seq`` and ``entry.created_at``
        when accepted."""
        now = utcnow()
        row = (entry.runtime_id, entry.input_json, entry.reconstruction_json, _us(now))
        idem = (
            (
                idempotency.key,
                idempotency.input_id.value,
                idempotency.content_hash,
                _us(idempotency.accepted_at),
            )
            if idempotency is not None
            else None
        )
        verdict, existing, seq = await self._write(
            lambda conn: _inbox_push(conn, row, idem, max_pending)
        )
        if verdict == "accepted":
            entry.seq = seq
            entry.created_at = now
        return (verdict, InputId(existing) if existing is not None else None)

    async def inbox_entries(self, runtime_id: str, limit: int = 100) -> list[InboxEntry]:
        def run(conn: sqlite3.Connection) -> list[InboxEntry]:
            rows = conn.execute(
                "SELECT seq, runtime_id, input_json, reconstruction_json, created_at FROM inbox"
                " WHERE runtime_id = ? ORDER BY seq LIMIT ?",
                (runtime_id, max(limit, 0)),
            ).fetchall()
            return [InboxEntry(rid, ij, rj, seq, _dt(at)) for seq, rid, ij, rj, at in rows]

        return await self._read(run)

    async def find_input_runtime(self, input_id: InputId) -> str | None:
        """Indexed lookup in the ledger (``input_states_by_input``, migration 2), then the
        inbox, whose entries name their input only inside the document."""
        iid = input_id.value

        def run(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT runtime_id FROM input_states WHERE input_id = ? LIMIT 1", (iid,)
            ).fetchone()
            if row is not None:
                return str(row[0])
            rows = conn.execute(
                "SELECT runtime_id, input_json FROM inbox"
                " WHERE input_id = ? OR instr(input_json, ?) ORDER BY seq",
                (iid, iid),
            ).fetchall()
            for rid, input_json in rows:
                if inbox_input_id(input_json) == iid:
                    return str(rid)
            return None

        return await self._read(run)

    # ---------------------------------------------------------------- peer requests (S20)

    async def open_peer_request(self, record: PeerRequestRecord) -> PeerRequestRecord:
        row = (
            record.requester_runtime_id,
            record.request_id,
            record.responder_runtime_id,
            record.envelope_id,
            record.requester_name,
            record.responder_name,
            record.intent,
            _us(record.created_at),
            record.status,
            _us(record.closed_at) if record.closed_at is not None else None,
            record.closed_by,
        )
        stored = await self._write(lambda conn: _open_peer_request(conn, row))
        return _peer_request(stored)

    async def load_peer_request(
        self, requester_runtime_id: str, request_id: str
    ) -> PeerRequestRecord | None:
        def run(conn: sqlite3.Connection) -> PeerRequestRecord | None:
            row = conn.execute(
                f"SELECT {PEER_COLS} FROM peer_requests"
                " WHERE requester_runtime_id = ? AND request_id = ?",
                (requester_runtime_id, request_id),
            ).fetchone()
            return _peer_request(row) if row is not None else None

        return await self._read(run)

    async def find_peer_requests(self, request_id: str) -> list[PeerRequestRecord]:
        def run(conn: sqlite3.Connection) -> list[PeerRequestRecord]:
            rows = conn.execute(
                f"SELECT {PEER_COLS} FROM peer_requests WHERE request_id = ? ORDER BY created_at",
                (request_id,),
            ).fetchall()
            return [_peer_request(r) for r in rows]

        return await self._read(run)

    async def list_peer_requests(
        self,
        *,
        requester_runtime_id: str | None = None,
        responder_runtime_id: str | None = None,
        outstanding_only: bool = False,
    ) -> list[PeerRequestRecord]:
        where: list[str] = []
        args: list[Any] = []
        if requester_runtime_id is not None:
            where.append("requester_runtime_id = ?")
            args.append(requester_runtime_id)
        if responder_runtime_id is not None:
            where.append("responder_runtime_id = ?")
            args.append(responder_runtime_id)
        if outstanding_only:
            where.append("closed_at IS NULL")
        sql = f"SELECT {PEER_COLS} FROM peer_requests"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at, request_id"

        def run(conn: sqlite3.Connection) -> list[PeerRequestRecord]:
            return [_peer_request(r) for r in conn.execute(sql, args).fetchall()]

        return await self._read(run)

    async def discard_peer_request(self, requester_runtime_id: str, request_id: str) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "DELETE FROM peer_requests WHERE requester_runtime_id = ? AND request_id = ?"
                " AND closed_at IS NULL",
                (requester_runtime_id, request_id),
            )

        await self._write(run)

    async def prune_peer_requests(self, *, older_than: datetime, batch: int = 1000) -> int:
        sql = (
            "DELETE FROM peer_requests WHERE rowid IN (SELECT rowid FROM peer_requests"
            " WHERE closed_at IS NOT NULL AND closed_at < :cutoff LIMIT :batch)"
        )
        params = {"cutoff": _us(older_than), "batch": max(batch, 1)}
        total = 0
        while True:
            n = await self._write(functools.partial(_execute_count, sql, params))
            total += n
            if n < params["batch"]:
                return total

    # ---------------------------------------------------------------- retention (S18)

    async def prune(
        self, *, older_than: datetime, keep_events: int, batch: int = 1000
    ) -> dict[str, int]:
        """Delete in batches (one write transaction each, so commits of live runtimes
        interleave); see ``_PRUNE`` for what is kept."""
        params = {"cutoff": _us(older_than), "batch": max(batch, 1), "keep": max(keep_events, 0)}
        counts: dict[str, int] = {}
        for name, sql in _PRUNE:
            total = 0
            while True:
                n = await self._write(functools.partial(_execute_count, sql, params))
                total += n
                if n < params["batch"]:
                    break
            counts[name] = total
        return counts

    # ---------------------------------------------------------------- introspection

    async def schema_version(self) -> int:
        """The schema version recorded in the database."""
        return await self._read(
            lambda conn: int(conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0])
        )

    async def pragmas(self) -> dict[str, Any]:
        """The settings in force on the writer connection (for tests and ``doctor``)."""

        def run(conn: sqlite3.Connection) -> dict[str, Any]:
            return {
                name: conn.execute(f"PRAGMA {name}").fetchone()[0]
                for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
            }

        return await self._write(run)
