"""The PostgreSQL store: the store protocol of ``base.py`` over a PostgreSQL database, with
psycopg 3 (async) and ``psycopg_pool``. Several processes may share one database; the
database, not the processes, enforces ownership.

Connections (the event loop is never blocked: every database call is an awaited psycopg async
call):

- One **writer task** owns the only writing connection. It consumes a FIFO queue of jobs
  (submitted transactions, lease and inbox operations, session saves, peer requests) with
  **group commit**: it takes every job waiting in the queue (up to ``max_batch``), opens one
  transaction, locks the runtime rows the batch will write (``SELECT ... ORDER BY runtime_id
  FOR UPDATE``: sorted, so two processes' batches never deadlock on them), runs each job
  inside its own ``SAVEPOINT`` (a failing job is rolled back to its savepoint and only its
  future fails), bumps the change counter and issues one ``COMMIT``. Futures are resolved in
  submission order, only after ``COMMIT`` returned. ``synchronous_commit`` is forced ``on`` for
  the writer's session, so a resolved future means the commit is flushed to disk. A submitted
  transaction's statements (savepoint, fence, writes, release) go out in one pipeline: one
  round trip each. ``max_batch`` defaults to 60, which keeps a batch's subtransactions within
  PostgreSQL's per-backend cache of 64 (more would slow down every other session's snapshots).
- A **pool** of read connections (``psycopg_pool.AsyncConnectionPool``) serves every read;
  multi-statement reads run in one ``REPEATABLE READ READ ONLY`` transaction, so they see one
  committed snapshot. Retention (``prune``) runs there too, one short transaction per batch,
  so it never holds up the writer.

Invariants kept here (beyond those of ``base.py``):

- ``submit`` runs on the event loop and never blocks: it takes a cheap snapshot of the
  transaction (so the runtime's later changes to its live objects cannot leak in), queues it
  and returns an ``asyncio.Future``. The writer encodes it to JSON just before running it.
- Commit order is submission order: one writer, one FIFO queue, savepoints in queue order.
- Fencing (S10) is decided by the database, in the writing transaction: the first statement
  of a transaction's savepoint is ``meerkat_fence(runtime, generation, first event seq)``
  (a PL/pgSQL function of the schema), which locks the runtime row (``FOR UPDATE``, creating
  it if missing) and raises unless the stored generation equals ``txn.generation``
  (generation 0 means "never leased" and is not fenced); the store turns that into
  ``FencedError``, after rolling the savepoint back. The row stays locked until COMMIT, so no
  lease can move under the writes that follow; leases themselves are conditional ``UPDATE``s
  of the same row (acquiring bumps the generation). ``txn.next_generation`` (respawn) is
  written after the check. Nothing in the process caches a generation.
- Every write of a runtime's rows (transactions, inbox pushes, leases) locks its runtime row
  first, so the fencing check, admission counting (S10, counted in SQL) and idempotency claims
  of one runtime are serialized across processes. Inbox pushes to a runtime that has no row
  yet (never written) serialize on a transaction-level advisory lock of its id instead; a
  push that loses a race on the idempotency index anyway is run again and answers
  deduplicated / conflict.
- Poisoning: once a transaction of (runtime, generation) failed, every transaction of that
  pair submitted after it is refused with ``FencedError`` and writes nothing; transactions
  submitted before it are unaffected, also when they are retried after a lost connection.
- A job that hits a deadlock or a serialization failure (e.g. with another process's prune)
  is rolled back to its savepoint and run again (at most 3 times). If the writer's connection
  is lost before COMMIT was sent, nothing of the batch was written: the batch runs once more on
  a new connection. If it is lost during COMMIT, the outcome is unknown: every job of the batch
  fails (and is poisoned), saying so.
- Idempotency keys are unique per (runtime, key) (primary key); a transaction's records are
  upserts (the fenced owner decides), ``inbox_push`` never replaces a claim.
- ``stopped`` is never written (S8); conversation rows are only inserted (a trigger refuses
  updates) and only ``conversation_reset`` deletes them; event ``seq`` only grows.
- ``change_token`` is the sum of the ``change_counter`` rows; every write transaction adds 1 to
  this store's slot in the same transaction as its writes, so the token changes exactly when
  something committed and a poller that sees the new token also sees the writes.
- Schema versions: ``open`` migrates an empty schema (no tables at all) by itself, and refuses
  with ``StoreError`` a schema of another application, an older version ("run ``meerkat db
  migrate``", i.e. ``migrate_postgres``) and a newer one ("this build knows up to vN"), before
  it writes anything. Migrations run in one transaction under an advisory lock.
- No cross-process deadlock between writers: a batch takes one transaction-level advisory
  lock per runtime it writes, in key order, before any row lock (new runtime rows included);
  ``renew_leases`` locks its rows in runtime_id order. A process frozen or cut off inside a
  transaction holds its locks at most ``idle_txn_timeout`` (5 s): the server ends the
  transaction (``idle_in_transaction_session_timeout``) so others can take over.
- Cancellation is honoured: a read cancelled while it waits for a pooled connection raises
  ``CancelledError`` even where psycopg_pool's wait (``asyncio.wait_for`` on Python < 3.12)
  swallows it; a cancelled ``submit`` awaiter does not undo the transaction (it commits).
- Tables live in the connection's current schema: a URL may pick one with
  ``?options=-csearch_path%3Dmyschema``. Ids are ``COLLATE "C"``: ordering is bytewise.
- Every failure surfaces as ``StoreError`` (``FencedError`` for a stale generation) whose
  message names the store's URL (password redacted) and the problem.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection, errors
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from .._ids import InputId, RunId
from .._time import utcnow
from ..core.session import ConversationRow
from ..runtime.events import RuntimeEventEnvelope
from ..runtime.input_state import CoalescingSource, InputState
from ..runtime.state import RuntimeState
from . import redact_url as redact
from . import scrub
from ._pg_listen import Channels, channels_for, listen
from ._pg_rows import (
    PRUNE,
    SESSION_COLS,
    Refused,
    TxnRows,
    aware,
    conv_row,
    encode_txn,
    peer_request,
    peer_row,
    session_record,
    snapshot,
    state_from_json,
)
from ._pg_schema import (
    PgMigration,
    apply_migrations,
    check_schema,
    current_schema,
    load_pg_migrations,
)
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
    StoreNotice,
    Txn,
)

__all__ = ["PgMigration", "PostgresStore", "load_pg_migrations", "migrate_postgres", "redact"]

T = TypeVar("T")
Conn = AsyncConnection[TupleRow]

_INBOX_LOCK = 0x6D6B6962  # advisory lock class of pushes to a runtime without a row ("mkib"),
# taken by meerkat_inbox_push (migration 0003) as 1835755874
_BATCH_LOCK = 0x6D6B6274  # advisory lock class of a writer batch's runtimes ("mkbt")
_JOB_ATTEMPTS = 3  # a job that deadlocks (or loses a unique-key race) runs at most this often
_SLOTS = 16  # rows of change_counter


# ------------------------------------------------------------------------------ URLs


def _conninfo(url: str) -> str:
    """What libpq understands: ``postgresql+psycopg://`` (SQLAlchemy style) loses its driver."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower().startswith("postgresql+"):
        return f"postgresql://{rest}"
    return url


# ------------------------------------------------------------------------------ errors

_HINTS: tuple[tuple[str, str], ...] = (
    ("connection refused", "is the PostgreSQL server running and reachable?"),
    ("could not translate host name", "check the host name in the URL"),
    ("password authentication failed", "check the user and password in the URL"),
    ("no password supplied", "the server wants a password; put it in the URL or ~/.pgpass"),
    ("does not exist", "create it first, or fix the URL"),
    ("lock timeout", "another session held the runtime's row lock too long"),
    ("terminating connection", "the server closed the connection"),
    ("server closed the connection", "the server closed the connection"),
)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, PoolTimeout):
        return f"no database connection available ({exc})"
    if isinstance(exc, psycopg.Error):
        text = (str(exc) or type(exc).__name__).strip().splitlines()[0]
        low = text.lower()
        for needle, hint in _HINTS:
            if needle in low and hint not in text:
                return f"{text} ({hint})"
        return text
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


def _retryable(exc: BaseException, unique: bool) -> bool:
    if isinstance(exc, errors.DeadlockDetected | errors.SerializationFailure):
        return True
    return unique and isinstance(exc, errors.UniqueViolation)


def _broken(conn: Conn) -> bool:
    return bool(conn.broken or conn.closed)


# ------------------------------------------------------------------------------ jobs


@dataclass(slots=True, eq=False)
class _Job:
    """Work for the writer; ``fn`` is None for the stop marker.

    ``locks``: runtime ids whose rows the job writes (locked up front in sorted order);
    ``key``/``seq``: a submitted transaction's (runtime, generation) and submission order
    (poisoning); ``unique``: a unique-key violation means a concurrent writer won a race and
    the job runs again (it will find the winner's row); ``own_savepoint``: the job runs in a
    savepoint of its own, rolled back before it raises (a submitted transaction, whose
    statements, savepoint included, go out in one pipeline)."""

    fn: Callable[[Conn], Awaitable[Any]] | None
    future: asyncio.Future[Any]
    locks: tuple[str, ...] = ()
    key: tuple[str, int] | None = None
    seq: int = 0
    unique: bool = False
    own_savepoint: bool = False  # the job opens, releases and rolls back its savepoint itself


Outcome = tuple[_Job, Any, BaseException | None]


def _settle(outcomes: Iterable[Outcome]) -> None:
    for job, result, exc in outcomes:
        fut = job.future
        if fut.done():  # the awaiting side gave up; the work stands
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)


class _LostConnection(Exception):
    """The writer's connection broke; ``committing`` tells whether COMMIT had been sent."""

    def __init__(self, cause: BaseException, committing: bool) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.committing = committing


# ------------------------------------------------------------------------------ job bodies


_FENCED = "MKF01"  # SQLSTATEs raised by meerkat_fence (schema/postgres/0001_initial.sql)
_SEQ_NOT_AFTER = "MKF02"


def _txn_refusal(exc: psycopg.Error, t: TxnRows) -> Exception:
    """What the database's refusal of a transaction means, in the store's words."""
    rid = t.runtime_id
    message = exc.diag.message_primary or str(exc)
    if exc.sqlstate == _FENCED:
        return Refused(message, fenced=True)
    if exc.sqlstate == _SEQ_NOT_AFTER:
        return Refused(message)
    if isinstance(exc, errors.UniqueViolation):
        if exc.diag.table_name == "conversation_rows":
            return Refused(
                f"a conversation row among {t.rows[0][1]}..{t.rows[-1][1]} of runtime {rid} is "
                "already stored (conversations are append-only)"
            )
        if exc.diag.table_name == "receipts":
            return Refused(f"a receipt of this transaction is already stored (runtime {rid})")
    return exc


async def _apply_txn(conn: Conn, t: TxnRows, channel: str) -> None:
    """Write one encoded transaction inside its own savepoint, all statements in one pipeline
    (one round trip): ``meerkat_fence`` first (the row lock and the generation check, in the
    database), then the writes. On any error the savepoint is rolled back before the error
    is raised, so nothing of the transaction stays."""
    rid = t.runtime_id
    try:
        async with conn.pipeline():
            cur = conn.cursor()
            await cur.execute("SAVEPOINT txn")
            await cur.execute(
                "SELECT meerkat_fence(%s, %s, %s, %s)", (rid, t.generation, t.first_seq, t.now)
            )
            if t.reset:
                await cur.execute("DELETE FROM conversation_rows WHERE runtime_id = %s", (rid,))
            if t.states:
                await cur.executemany(
                    "INSERT INTO input_states (runtime_id, input_id, current_state, is_terminal,"
                    " last_run_id, state_json, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (runtime_id, input_id) DO UPDATE SET"
                    " current_state = excluded.current_state, is_terminal = excluded.is_terminal,"
                    " last_run_id = excluded.last_run_id, state_json = excluded.state_json,"
                    " updated_at = excluded.updated_at",
                    t.states,
                )
            if t.queue_orders:
                await cur.executemany(
                    "UPDATE input_states SET queue_order = %s"
                    " WHERE runtime_id = %s AND input_id = %s",
                    t.queue_orders,
                )
            if t.idempotency:
                # the fenced owner's claim is authoritative: it may re-claim a key whose window
                # it released (S11); inbox_push, in contrast, never replaces a claim
                await cur.executemany(
                    "INSERT INTO idempotency (runtime_id, key, input_id, content_hash,"
                    " accepted_at) VALUES (%s, %s, %s, %s, %s)"
                    " ON CONFLICT (runtime_id, key) DO UPDATE SET input_id = excluded.input_id,"
                    " content_hash = excluded.content_hash, accepted_at = excluded.accepted_at",
                    t.idempotency,
                )
            if t.rows:
                await cur.executemany(
                    "INSERT INTO conversation_rows (runtime_id, idx, run_id, input_ids, message,"
                    " digest) VALUES (%s, %s, %s, %s, %s, %s)",
                    t.rows,
                )
            if t.receipts:
                await cur.executemany(
                    "INSERT INTO receipts (runtime_id, run_id, sequence, contributing_input_ids,"
                    " receipt_json, created_at) VALUES (%s, %s, %s, %s, %s, %s)",
                    t.receipts,
                )
            if t.runs:
                await cur.executemany(
                    "INSERT INTO runs (run_id, runtime_id, status, result_json, error,"
                    " is_continuation, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (run_id) DO UPDATE SET runtime_id = excluded.runtime_id,"
                    " status = excluded.status, result_json = excluded.result_json,"
                    " error = excluded.error, is_continuation = excluded.is_continuation,"
                    " updated_at = excluded.updated_at",
                    t.runs,
                )
            if t.events:
                await cur.executemany(
                    "INSERT INTO events (runtime_id, seq, event_json, created_at)"
                    " VALUES (%s, %s, %s, %s)",
                    t.events,
                )
            if t.inbox_done:
                await cur.execute(
                    "DELETE FROM inbox WHERE runtime_id = %s AND seq = ANY(%s)",
                    (rid, t.inbox_done),
                )
            if t.peer_closes:
                await cur.executemany(
                    "UPDATE peer_requests SET status = %s, closed_at = %s, closed_by = %s"
                    " WHERE requester_runtime_id = %s AND request_id = %s AND closed_at IS NULL",
                    t.peer_closes,
                )
            # the row is locked by meerkat_fence since the check: its generation is ours
            await cur.execute(
                "UPDATE runtimes SET state = COALESCE(%s, state),"
                " recovery_count = recovery_count + %s,"
                " last_event_seq = GREATEST(last_event_seq, %s),"
                " generation = COALESCE(%s, generation), updated_at = %s"
                " WHERE runtime_id = %s",
                (t.state, int(t.recovered), t.last_seq, t.next_generation, t.now, rid),
            )
            # waiters and event followers in other processes (LISTEN, _pg_listen.py); a
            # notification is delivered at COMMIT, and dropped if the savepoint rolls back
            await cur.execute("SELECT pg_notify(%s, %s)", (channel, rid))
            await cur.execute("RELEASE SAVEPOINT txn")
    except psycopg.Error as exc:
        if _broken(conn):
            raise
        await conn.execute("ROLLBACK TO SAVEPOINT txn")
        await conn.execute("RELEASE SAVEPOINT txn")
        refusal = _txn_refusal(exc, t)
        if refusal is exc:
            raise
        raise refusal from None


class _TxnJob:
    """A submitted transaction: encoded when the writer reaches it, then applied in its own
    savepoint (``_Job.own_savepoint``)."""

    __slots__ = ("channel", "txn")

    def __init__(self, txn: Txn, channel: str) -> None:
        self.txn = txn
        self.channel = channel

    async def __call__(self, conn: Conn) -> None:
        await _apply_txn(conn, encode_txn(self.txn), self.channel)


async def _acquire(conn: Conn, rid: str, owner: str, ttl: float) -> int | None:
    """Take the lease if free, expired or ``owner``'s: one conditional UPDATE (which waits for
    a concurrent holder of the row lock and re-checks), else create the row."""
    now = utcnow()
    cur = await conn.execute(
        "UPDATE runtimes SET generation = generation + 1, lease_owner = %s,"
        " lease_expiry = clock_timestamp() + make_interval(secs => %s), updated_at = %s"
        " WHERE runtime_id = %s AND (lease_owner IS NULL OR lease_owner = %s"
        "  OR lease_expiry IS NULL OR lease_expiry <= clock_timestamp())"
        " RETURNING generation",
        (owner, ttl, now, rid, owner),
    )
    row = await cur.fetchone()
    if row is not None:
        return int(row[0])
    cur = await conn.execute(
        "INSERT INTO runtimes (runtime_id, state, generation, lease_owner, lease_expiry,"
        " updated_at) VALUES (%s, 'idle', 1, %s,"
        " clock_timestamp() + make_interval(secs => %s), %s)"
        " ON CONFLICT (runtime_id) DO NOTHING RETURNING generation",
        (rid, owner, ttl, now),
    )
    row = await cur.fetchone()
    return 1 if row is not None else None  # a conflict: the row exists, another owner holds it


async def _inbox_push(
    conn: Conn,
    entry: tuple[str, str, str | None, datetime],
    idem: tuple[str, str, str, datetime] | None,
    max_pending: int,
    channel: str,
) -> tuple[str, str | None, int]:
    """One round trip: ``meerkat_inbox_push`` (migration 0003) locks the runtime row (or, with
    none, the advisory lock ``_INBOX_LOCK``), checks the key, counts admission, inserts the key
    and the entry and notifies ``channel``. A concurrent claim of the key fails on its primary
    key; the caller (``unique=True``) runs the push again."""
    rid, input_json, recon_json, now = entry
    key, iid, chash, at = idem if idem is not None else (None, None, None, None)
    cur = await conn.execute(
        "SELECT verdict, existing_input_id, inbox_seq"
        " FROM meerkat_inbox_push(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (rid, iid, input_json, recon_json, now, key, chash, at, max_pending, channel),
    )
    row = await cur.fetchone()
    if row is None:  # pragma: no cover - the function always returns one row
        raise StoreError(f"meerkat_inbox_push returned nothing for runtime {rid}")
    verdict, existing, seq = row
    return (str(verdict), str(existing) if existing is not None else None, int(seq))


async def _open_peer_request(conn: Conn, row: tuple[Any, ...]) -> tuple[Any, ...]:
    """Insert the request unless the requester has one with its envelope or request id; the
    stored row either way. A concurrent insert of the same request makes the insert do nothing
    (or fail on the other unique index: the job then runs again and finds it)."""
    find = (
        f"SELECT {PEER_COLS} FROM peer_requests WHERE requester_runtime_id = %s"
        " AND (envelope_id = %s OR request_id = %s) LIMIT 1"
    )
    cur = await conn.execute(find, (row[0], row[3], row[1]))
    found = await cur.fetchone()
    if found is not None:
        return tuple(found)
    marks = ", ".join(["%s"] * len(row))
    cur = await conn.execute(
        f"INSERT INTO peer_requests ({PEER_COLS}) VALUES ({marks})"
        " ON CONFLICT (requester_runtime_id, request_id) DO NOTHING RETURNING 1",
        row,
    )
    if await cur.fetchone() is not None:
        return row
    cur = await conn.execute(find, (row[0], row[3], row[1]))
    found = await cur.fetchone()
    if found is None:
        raise errors.SerializationFailure("peer request changed concurrently")  # run again
    return tuple(found)


async def _load_runtime(conn: Conn, rid: str) -> LoadedRuntime:
    out = LoadedRuntime(runtime_id=rid)
    cur = await conn.execute(
        "SELECT state, generation, last_event_seq, recovery_count FROM runtimes"
        " WHERE runtime_id = %s",
        (rid,),
    )
    row = await cur.fetchone()
    if row is not None:
        state, generation, last_seq, recoveries = row
        out.state = RuntimeState(state) if state is not None else None
        out.generation, out.last_seq, out.recovery_count = (
            int(generation),
            int(last_seq),
            int(recoveries),
        )
    cur = await conn.execute(
        "SELECT queue_order, state_json FROM input_states"
        " WHERE runtime_id = %s AND NOT is_terminal"
        " ORDER BY queue_order IS NOT NULL, queue_order, input_id",
        (rid,),
    )
    for order, text in await cur.fetchall():
        st = state_from_json(text)
        out.inputs.append(st)
        if order is not None:
            out.queue_orders[st.input_id] = int(order)
    cur = await conn.execute(
        "SELECT key, input_id, content_hash, accepted_at FROM idempotency"
        " WHERE runtime_id = %s ORDER BY accepted_at, key",
        (rid,),
    )
    out.idempotency = [
        IdempotencyRecord(key, InputId(iid), chash, at)
        for key, iid, chash, at in await cur.fetchall()
    ]
    cur = await conn.execute(
        "SELECT idx, run_id, input_ids, message, digest FROM conversation_rows"
        " WHERE runtime_id = %s ORDER BY idx",
        (rid,),
    )
    out.conversation = [conv_row(r) for r in await cur.fetchall()]
    pending_runs = (
        "SELECT last_run_id FROM input_states"
        " WHERE runtime_id = %(rid)s AND NOT is_terminal AND last_run_id IS NOT NULL"
    )
    cur = await conn.execute(
        "SELECT run_id, contributing_input_ids FROM receipts"
        f" WHERE runtime_id = %(rid)s AND run_id IN ({pending_runs})",
        {"rid": rid},
    )
    for run_id, ids in await cur.fetchall():
        out.receipted.update((RunId(run_id), InputId(i)) for i in ids)
    cur = await conn.execute(
        f"SELECT {RUN_COLS} FROM runs WHERE run_id IN ({pending_runs})"
        f" UNION SELECT {RUN_COLS} FROM runs WHERE runtime_id = %(rid)s AND status = 'running'",
        {"rid": rid},
    )
    for r in await cur.fetchall():
        rec = run_record(r)
        out.runs[rec.run_id] = rec
    wanted: set[str] = set()
    for st in out.inputs:
        src = st.reconstruction_source
        if isinstance(src, CoalescingSource):
            wanted.update(i.value for i in src.source_input_ids)
    if wanted:
        cur = await conn.execute(
            "SELECT state_json FROM input_states WHERE runtime_id = %s AND input_id = ANY(%s)",
            (rid, sorted(wanted)),
        )
        for (text,) in await cur.fetchall():
            st = state_from_json(text)
            out.sources[st.input_id] = st
    return out


# ------------------------------------------------------------------------------ the store


class PostgresStore:
    """The store protocol over a PostgreSQL database (see the module docstring).

    ``commits`` counts COMMITs of the writer (group-committed batches) and ``transactions``
    the submitted transactions they made durable, so ``commits < transactions`` shows batching
    at work. ``url`` is the URL with its password redacted (it appears in messages).
    """

    def __init__(
        self,
        url: str,
        *,
        max_batch: int = 60,
        pool_size: int = 4,
        migrations: Sequence[PgMigration] | None = None,
        lock_timeout: float = 10.0,
        idle_txn_timeout: float = 5.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self._dsn = url
        self.url = redact(url)
        self.max_batch = max(1, max_batch)
        self.pool_size = max(1, pool_size)
        self.lock_timeout = lock_timeout
        self.idle_txn_timeout = idle_txn_timeout
        self.connect_timeout = connect_timeout
        self.commits = 0
        self.transactions = 0
        self.applied_migrations: list[int] = []  # what open() applied to an empty schema
        self._migrations = list(migrations) if migrations is not None else None
        self._slot = random.randrange(_SLOTS)
        # (runtime, generation) -> submission seq of its first failed transaction (poisoning)
        self._poisoned: dict[tuple[str, int], int] = {}
        self._txn_seq = 0
        self._state = "new"  # new -> open -> closing -> closed
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._wconn: Conn | None = None
        self._pool: AsyncConnectionPool[Conn] | None = None
        self._open_lock = asyncio.Lock()
        self._dead: StoreError | None = None  # set if the writer task stopped unexpectedly
        # LISTEN/NOTIFY channels of this store's schema (set at open)
        self.channels: Channels = channels_for("public")

    def __repr__(self) -> str:
        return f"PostgresStore({self.url!r}, {self._state})"

    # ---------------------------------------------------------------- errors

    def _error(self, exc: BaseException) -> StoreError:
        """``exc`` as a StoreError naming this store (StoreErrors pass through)."""
        if isinstance(exc, StoreError):
            return exc
        if isinstance(exc, Refused):
            cls = FencedError if exc.fenced else StoreError
            return cls(f"store {self.url}: {exc}")
        err = StoreError(f"store {self.url}: {scrub(_describe(exc), self._dsn)}")
        err.__cause__ = exc
        return err

    def _migration_list(self) -> list[PgMigration]:
        return self._migrations if self._migrations is not None else load_pg_migrations()

    # ---------------------------------------------------------------- lifecycle

    async def _connect(self) -> Conn:
        """A new autocommit connection with the session settings every connection uses."""
        conn = await AsyncConnection.connect(
            _conninfo(self._dsn), autocommit=True, connect_timeout=max(1, int(self.connect_timeout))
        )
        try:
            await self._configure(conn)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _configure(self, conn: Conn) -> None:
        """Every connection: UTC timestamps, and a bounded wait for locks (a row lock held by
        a hung process fails the waiting job with a clear error instead of stalling)."""
        await conn.execute("SET TIME ZONE 'UTC'")
        await conn.execute(f"SET lock_timeout = {max(1, int(self.lock_timeout * 1000))}")
        # a process frozen or cut off in the middle of a transaction must not hold its row
        # locks (and so every other process's takeover of its sessions) until the server
        # notices the dead connection, which may take hours: the server ends the transaction
        await conn.execute(
            f"SET idle_in_transaction_session_timeout = {max(1, int(self.idle_txn_timeout * 1000))}"
        )

    async def _connect_writer(self) -> Conn:
        conn = await self._connect()
        try:
            await conn.execute("SET synchronous_commit = on")
        except BaseException:
            await conn.close()
            raise
        return conn

    async def open(self) -> None:
        """Connect, check the schema (migrating an empty one), start the pool and the writer.

        Raises ``StoreError`` naming the store when it cannot be used; nothing is left running
        then, and nothing was written.
        """
        async with self._open_lock:
            if self._state == "open":
                return
            if self._state != "new":
                raise StoreError(f"store {self.url}: a closed store cannot be opened again")
            conn: Conn | None = None
            pool: AsyncConnectionPool[Conn] | None = None
            try:
                conn = await self._connect_writer()
                self.applied_migrations = await check_schema(conn, self._migration_list())
                self.channels = channels_for(await current_schema(conn))
                pool = AsyncConnectionPool(
                    _conninfo(self._dsn),
                    min_size=1,
                    max_size=self.pool_size,
                    open=False,
                    kwargs={"autocommit": True},
                    configure=self._configure,
                    check=AsyncConnectionPool.check_connection,
                    timeout=max(self.connect_timeout, 1.0),
                    name=f"meerkat-pg:{self.url}",
                )
                await pool.open(wait=True, timeout=max(self.connect_timeout, 1.0))
            except BaseException as exc:
                if pool is not None:
                    with contextlib.suppress(Exception):
                        await pool.close()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                if isinstance(exc, Exception):
                    raise self._error(exc) from exc
                raise
            self._wconn, self._pool = conn, pool
            self._writer = asyncio.create_task(
                self._writer_main(), name=f"meerkat-pg-writer:{self.url}"
            )
            self._state = "open"

    async def migrate(self) -> list[int]:
        """Apply the missing migrations (all in one transaction); the versions applied. Works
        on a store that is not open (``meerkat db migrate``). Refuses a schema of another
        application or a newer one."""
        conn = None
        try:
            conn = await self._connect()
            return await apply_migrations(conn, self._migration_list())
        except StoreError:
            raise
        except Exception as exc:
            raise self._error(exc) from exc
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()

    async def close(self) -> None:
        """Commit every transaction submitted so far, then close the connections. Later calls
        do nothing; later submits fail."""
        if self._state != "open":
            self._state = "closed" if self._state == "new" else self._state
            return
        self._state = "closing"
        try:
            writer = self._writer
            if writer is not None and not writer.done() and self._dead is None:
                done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._queue.put_nowait(_Job(None, done))
                await asyncio.shield(done)
            if writer is not None:
                with contextlib.suppress(BaseException):
                    await writer
        finally:
            self._state = "closed"
            if self._wconn is not None:
                with contextlib.suppress(Exception):
                    await self._wconn.close()
                self._wconn = None
            if self._pool is not None:
                with contextlib.suppress(Exception):
                    await self._pool.close()
                self._pool = None

    # ---------------------------------------------------------------- the writer

    async def _writer_main(self) -> None:
        stop: _Job | None = None
        batch: list[_Job] = []
        try:
            while stop is None:
                job = await self._queue.get()
                if job.fn is None:
                    stop = job
                    break
                batch = [job]
                while len(batch) < self.max_batch and not self._queue.empty():
                    nxt = self._queue.get_nowait()
                    if nxt.fn is None:
                        stop = nxt
                        break
                    batch.append(nxt)
                _settle(await self._commit_batch(batch, retry=True))
                batch = []
        except BaseException as exc:  # a bug or a cancelled loop: never leave a future hanging
            err = self._error(exc)
            self._dead = StoreError(f"{err} (the store's writer task stopped)")
            leftover: list[Outcome] = [(j, None, self._dead) for j in batch]
            while not self._queue.empty():
                j = self._queue.get_nowait()
                if j.fn is None:
                    stop = j
                else:
                    leftover.append((j, None, self._dead))
            _settle(leftover)
            if not isinstance(exc, Exception):
                raise
        finally:
            if stop is not None and not stop.future.done():
                stop.future.set_result(None)

    def _poison(self, jobs: Iterable[_Job]) -> None:
        """Record failed transactions: later ones of the same (runtime, generation) must not
        become durable without them (base.py: order), so they are refused."""
        for job in jobs:
            if job.key is not None and job.seq < self._poisoned.get(job.key, job.seq + 1):
                self._poisoned[job.key] = job.seq

    def _refused(self, job: _Job) -> FencedError | None:
        """The error for a transaction submitted after a failed one of its (runtime,
        generation), else None. Earlier transactions (e.g. run again after a lost
        connection) pass."""
        key = job.key
        if key is None or key not in self._poisoned or self._poisoned[key] >= job.seq:
            return None
        return FencedError(
            f"store {self.url}: an earlier write of runtime {key[0]} (generation {key[1]}) "
            "failed; this instance's later writes are refused until it recovers under a new "
            "generation"
        )

    async def _writer_conn(self) -> Conn:
        conn = self._wconn
        if conn is None or _broken(conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
            self._wconn = None
            conn = self._wconn = await self._connect_writer()
        return conn

    async def _commit_batch(self, batch: list[_Job], retry: bool) -> list[Outcome]:
        """One group commit: BEGIN, the batch's runtime rows locked in sorted order, a
        savepoint per job, the change counter, one COMMIT. Returns each job's outcome in
        batch order. A lost connection before COMMIT runs the batch's innocent jobs once more
        on a new connection; one lost during COMMIT fails them all (the outcome is unknown)."""
        out: list[Outcome] = []  # filled job by job: what ran before a failure stays known
        try:
            conn = await self._writer_conn()
            await self._run_batch(conn, batch, out)
        except _LostConnection as lost:
            self._wconn = None
            failed = {id(j): exc for j, _, exc in out if exc is not None}
            innocent = [j for j in batch if id(j) not in failed]
            if retry and not lost.committing and innocent:
                again = {id(o[0]): o for o in await self._commit_batch(innocent, retry=False)}
                return [again.get(id(j), (j, None, failed.get(id(j)))) for j in batch]
            what = (
                "the connection was lost during COMMIT; the batch may or may not have been written"
                if lost.committing
                else "the transaction was rolled back with its batch; nothing of it was written"
            )
            err = StoreError(
                f"store {self.url}: {scrub(_describe(lost.cause), self._dsn)} ({what})"
            )
            err.__cause__ = lost.cause
            self._poison(batch)
            return [(j, None, failed.get(id(j), err)) for j in batch]
        except Exception as exc:  # cannot connect, or BEGIN / COMMIT refused
            err = self._error(exc)
            self._poison(batch)
            failed = {id(j): e for j, _, e in out if e is not None}
            return [(j, None, failed.get(id(j), err)) for j in batch]
        return out

    async def _run_batch(self, conn: Conn, batch: list[_Job], out: list[Outcome]) -> None:
        committing = False
        try:
            await conn.execute("BEGIN")
            locks = sorted({rid for j in batch for rid in j.locks})
            if locks:
                try:
                    # one transaction-level advisory lock per runtime the batch writes,
                    # taken in key order before any row lock: two processes' batches that
                    # share runtimes serialize here, never in a cycle (new runtime rows,
                    # which the row locks below cannot cover, included)
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock(%s, k) FROM (SELECT DISTINCT"
                        " hashtext(id) AS k FROM unnest(%s::text[]) AS id) t ORDER BY k",
                        (_BATCH_LOCK, locks),
                    )
                    await conn.execute(
                        "SELECT 1 FROM runtimes WHERE runtime_id = ANY(%s)"
                        " ORDER BY runtime_id FOR UPDATE",
                        (locks,),
                    )
                except psycopg.Error:
                    if _broken(conn):
                        raise
                    # e.g. a lock timeout: go on without; each job locks its own row
                    await conn.execute("ROLLBACK")
                    await conn.execute("BEGIN")
            for job in batch:
                refused = self._refused(job)
                if refused is not None:
                    out.append((job, None, refused))
                    continue
                result, exc = await self._run_job(conn, job)
                if exc is not None:
                    self._poison([job])
                out.append((job, result, exc))
            if any(exc is None for _, _, exc in out):
                await conn.execute(
                    "UPDATE change_counter SET n = n + 1 WHERE slot = %s", (self._slot,)
                )
            committing = True
            await conn.execute("COMMIT")
        except psycopg.Error as exc:
            if _broken(conn):
                raise _LostConnection(exc, committing) from exc
            with contextlib.suppress(psycopg.Error):
                await conn.execute("ROLLBACK")
            raise
        except BaseException:
            # cancelled (or a bug) mid-batch: the connection's state is unknown, drop it
            with contextlib.suppress(Exception):
                await conn.close()
            raise
        self.commits += 1
        self.transactions += sum(1 for j, _, exc in out if j.key is not None and exc is None)

    async def _run_job(self, conn: Conn, job: _Job) -> tuple[Any, BaseException | None]:
        assert job.fn is not None
        for attempt in range(1, _JOB_ATTEMPTS + 1):
            if not job.own_savepoint:
                await conn.execute("SAVEPOINT job")
            try:
                result = await job.fn(conn)
            except Exception as exc:
                if _broken(conn):
                    raise
                if not job.own_savepoint:
                    await conn.execute("ROLLBACK TO SAVEPOINT job")
                    await conn.execute("RELEASE SAVEPOINT job")
                if attempt < _JOB_ATTEMPTS and _retryable(exc, job.unique):
                    continue
                return None, self._error(exc)
            if not job.own_savepoint:
                await conn.execute("RELEASE SAVEPOINT job")
            return result, None
        raise AssertionError("unreachable")

    # ---------------------------------------------------------------- handoff

    def _check_open(self) -> None:
        if self._dead is not None:
            raise self._dead
        if self._state != "open":
            what = "is not open (call open() first)" if self._state == "new" else "is closed"
            raise StoreError(f"store {self.url}: the store {what}")

    async def _write(
        self,
        fn: Callable[[Conn], Awaitable[T]],
        *,
        locks: tuple[str, ...] = (),
        unique: bool = False,
    ) -> T:
        self._check_open()
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(fn, fut, locks, unique=unique))
        return await fut

    async def _read(self, fn: Callable[[Conn], Awaitable[T]], *, snapshot: bool = False) -> T:
        """Run ``fn`` on a pooled connection; with ``snapshot`` inside one read-only
        repeatable-read transaction."""
        self._check_open()
        assert self._pool is not None
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            async with self._pool.connection() as conn:
                if snapshot:
                    await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    result = await fn(conn)
                    await conn.execute("COMMIT")
                else:
                    result = await fn(conn)
        except StoreError:
            raise
        except Exception as exc:
            raise self._error(exc) from exc
        if task is not None and task.cancelling() > cancels:
            # Python < 3.12: psycopg_pool waits for a free connection with asyncio.wait_for,
            # which swallows a cancellation that arrives as the connection does; a caller
            # that was cancelled (e.g. a maintenance task being stopped) must not go on.
            raise asyncio.CancelledError
        return result

    # ---------------------------------------------------------------- commit

    def submit(self, txn: Txn) -> asyncio.Future[None]:
        """Snapshot ``txn`` and queue it for the writer; the future resolves after the COMMIT
        that made it durable, or fails with FencedError / StoreError."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            self._check_open()
            job = _TxnJob(snapshot(txn), self.channels.changes)
        except BaseException as exc:
            fut.set_exception(self._error(exc))
            return fut
        self._txn_seq += 1
        self._queue.put_nowait(
            _Job(
                job,
                fut,
                (txn.runtime_id,),
                key=(txn.runtime_id, txn.generation),
                seq=self._txn_seq,
                own_savepoint=True,
            )
        )
        return fut

    # ---------------------------------------------------------------- sessions

    async def save_session(self, record: SessionRecord) -> None:
        params = (
            record.session_id,
            aware(record.created_at),
            aware(record.updated_at),
            Jsonb(record.config),
            Jsonb(record.labels),
            record.archived,
        )
        name = record.config.get("comms_name")
        check = name is not None and not record.archived

        async def run(conn: Conn) -> None:
            if check:
                cur = await conn.execute(
                    "SELECT session_id FROM sessions WHERE NOT archived"
                    " AND config ->> 'comms_name' = %s AND session_id <> %s LIMIT 1",
                    (str(name), record.session_id),
                )
                holder = await cur.fetchone()
                if holder is not None:
                    raise CommsNameTakenError(
                        f"store {self.url}: comms name {name!r} is already taken by session "
                        f"{holder[0]}",
                        str(name),
                    )
            await conn.execute(
                f"INSERT INTO sessions ({SESSION_COLS}) VALUES (%s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (session_id) DO UPDATE SET created_at = excluded.created_at,"
                " updated_at = excluded.updated_at, config = excluded.config,"
                " labels = excluded.labels, archived = excluded.archived",
                params,
            )

        await self._write(run, unique=check)

    async def load_session(self, session_id: str) -> SessionRecord | None:
        async def run(conn: Conn) -> SessionRecord | None:
            cur = await conn.execute(
                f"SELECT {SESSION_COLS} FROM sessions WHERE session_id = %s", (session_id,)
            )
            row = await cur.fetchone()
            return session_record(row) if row is not None else None

        return await self._read(run)

    async def list_sessions(self, *, include_archived: bool = False) -> list[SessionRecord]:
        where = "" if include_archived else " WHERE NOT archived"

        async def run(conn: Conn) -> list[SessionRecord]:
            cur = await conn.execute(
                f"SELECT {SESSION_COLS} FROM sessions{where} ORDER BY created_at, session_id"
            )
            return [session_record(r) for r in await cur.fetchall()]

        return await self._read(run)

    # ---------------------------------------------------------------- reads

    async def runtimes_with_pending_inputs(self) -> list[str]:
        """One query over the partial index of non-terminal inputs and the inbox index."""

        async def run(conn: Conn) -> list[str]:
            cur = await conn.execute(
                "SELECT runtime_id FROM input_states WHERE NOT is_terminal"
                " UNION SELECT runtime_id FROM inbox ORDER BY 1"
            )
            return [str(r[0]) for r in await cur.fetchall()]

        return await self._read(run)

    async def runtimes_needing_owner(self, limit: int = 1000) -> list[str]:
        """Pending runtimes whose lease is free or expired on the database's clock."""

        async def run(conn: Conn) -> list[str]:
            cur = await conn.execute(
                "SELECT p.runtime_id FROM (SELECT runtime_id FROM input_states"
                " WHERE NOT is_terminal UNION SELECT runtime_id FROM inbox) p"
                " LEFT JOIN runtimes r ON r.runtime_id = p.runtime_id"
                " WHERE r.runtime_id IS NULL OR r.lease_owner IS NULL"
                " OR r.lease_expiry IS NULL OR r.lease_expiry <= clock_timestamp()"
                " ORDER BY 1 LIMIT %s",
                (limit,),
            )
            return [str(r[0]) for r in await cur.fetchall()]

        return await self._read(run)

    async def load_runtime(self, runtime_id: str) -> LoadedRuntime:
        return await self._read(lambda conn: _load_runtime(conn, runtime_id), snapshot=True)

    async def load_input_state(self, runtime_id: str, input_id: InputId) -> InputState | None:
        async def run(conn: Conn) -> InputState | None:
            cur = await conn.execute(
                "SELECT state_json FROM input_states WHERE runtime_id = %s AND input_id = %s",
                (runtime_id, input_id.value),
            )
            row = await cur.fetchone()
            return state_from_json(row[0]) if row is not None else None

        return await self._read(run)

    async def load_input_states(
        self, runtime_id: str, *, include_terminal: bool = True, limit: int | None = None
    ) -> list[InputState]:
        where = "" if include_terminal else " AND NOT is_terminal"
        sql = (
            f"SELECT state_json FROM input_states WHERE runtime_id = %s{where}"
            " ORDER BY input_id LIMIT %s"
        )
        lim = None if limit is None else max(limit, 0)

        async def run(conn: Conn) -> list[InputState]:
            cur = await conn.execute(sql, (runtime_id, lim))
            return [state_from_json(r[0]) for r in await cur.fetchall()]

        return await self._read(run)

    async def load_run(self, run_id: RunId) -> RunRecord | None:
        async def run(conn: Conn) -> RunRecord | None:
            cur = await conn.execute(
                f"SELECT {RUN_COLS} FROM runs WHERE run_id = %s", (run_id.value,)
            )
            row = await cur.fetchone()
            return run_record(row) if row is not None else None

        return await self._read(run)

    async def load_conversation(self, runtime_id: str) -> list[ConversationRow]:
        async def run(conn: Conn) -> list[ConversationRow]:
            cur = await conn.execute(
                "SELECT idx, run_id, input_ids, message, digest FROM conversation_rows"
                " WHERE runtime_id = %s ORDER BY idx",
                (runtime_id,),
            )
            return [conv_row(r) for r in await cur.fetchall()]

        return await self._read(run)

    async def load_events(
        self, runtime_id: str, after_seq: int = 0, limit: int = 1000
    ) -> list[RuntimeEventEnvelope]:
        async def run(conn: Conn) -> list[RuntimeEventEnvelope]:
            cur = await conn.execute(
                "SELECT event_json FROM events WHERE runtime_id = %s AND seq > %s"
                " ORDER BY seq LIMIT %s",
                (runtime_id, after_seq, max(limit, 0)),
            )
            return [RuntimeEventEnvelope.from_json(r[0]) for r in await cur.fetchall()]

        return await self._read(run)

    async def last_event_seq(self, runtime_id: str) -> int:
        async def run(conn: Conn) -> int:
            cur = await conn.execute(
                "SELECT last_event_seq FROM runtimes WHERE runtime_id = %s", (runtime_id,)
            )
            row = await cur.fetchone()
            return int(row[0]) if row is not None else 0

        return await self._read(run)

    async def first_event_seq(self, runtime_id: str) -> int | None:
        async def run(conn: Conn) -> int | None:
            cur = await conn.execute(
                "SELECT MIN(seq) FROM events WHERE runtime_id = %s", (runtime_id,)
            )
            row = await cur.fetchone()
            return int(row[0]) if row is not None and row[0] is not None else None

        return await self._read(run)

    async def change_token(self) -> int:
        """The sum of the change counter: every write transaction of every store on this
        schema adds 1 in the transaction that writes, so it moves exactly when something
        committed (one indexed read of 16 rows)."""

        async def run(conn: Conn) -> int:
            cur = await conn.execute("SELECT COALESCE(SUM(n), 0)::bigint FROM change_counter")
            row = await cur.fetchone()
            return int(row[0]) if row is not None else 0

        return await self._read(run)

    def notifications(self) -> AsyncIterator[StoreNotice]:
        """Inbox arrivals, lease releases and committed changes of every process on this
        database, as they commit (LISTEN on a connection of its own; see ``_pg_listen``).
        Hints only: consumers keep a slow poll for what a lost connection misses."""
        self._check_open()
        return listen(self._connect, self.channels, self.url, lambda: self._state == "open")

    # ---------------------------------------------------------------- ownership (S10)

    async def acquire_lease(self, runtime_id: str, owner: str, ttl: float) -> int | None:
        return await self._write(
            lambda conn: _acquire(conn, runtime_id, owner, ttl), locks=(runtime_id,)
        )

    async def renew_lease(self, runtime_id: str, owner: str, generation: int, ttl: float) -> bool:
        async def run(conn: Conn) -> bool:
            cur = await conn.execute(
                "UPDATE runtimes SET lease_expiry = clock_timestamp() + make_interval(secs => %s)"
                " WHERE runtime_id = %s AND lease_owner = %s AND generation = %s",
                (ttl, runtime_id, owner, generation),
            )
            return cur.rowcount == 1

        return await self._write(run, locks=(runtime_id,))

    async def renew_leases(self, owner: str, leases: dict[str, int], ttl: float) -> set[str]:
        """One UPDATE for every lease, on a pooled connection, not the writer's: renewals
        never queue behind a backlog of commits. It may wait for a runtime row that a writer
        batch holds locked, at most one batch long."""
        if not leases:
            return set()
        ids = sorted(leases)
        gens = [leases[r] for r in ids]

        async def run(conn: Conn) -> set[str]:
            # rows locked in runtime_id order, as every writer batch locks them: no deadlock
            cur = await conn.execute(
                "WITH mine AS (SELECT r.runtime_id FROM runtimes r"
                " JOIN unnest(%s::text[], %s::bigint[]) AS l(id, gen)"
                " ON r.runtime_id = l.id AND r.generation = l.gen"
                " WHERE r.lease_owner = %s ORDER BY r.runtime_id FOR UPDATE OF r)"
                " UPDATE runtimes r SET lease_expiry = clock_timestamp()"
                " + make_interval(secs => %s) FROM mine WHERE r.runtime_id = mine.runtime_id"
                " RETURNING r.runtime_id",
                (ids, gens, owner, ttl),
            )
            return {str(row[0]) for row in await cur.fetchall()}

        return await self._read(run)

    def abandon_generation(self, runtime_id: str, generation: int) -> None:
        key = (runtime_id, generation)
        self._poisoned[key] = min(self._poisoned.get(key, self._txn_seq), self._txn_seq)

    async def release_lease(self, runtime_id: str, owner: str, generation: int) -> None:
        async def run(conn: Conn) -> None:
            cur = await conn.execute(
                "UPDATE runtimes SET lease_owner = NULL, lease_expiry = NULL"
                " WHERE runtime_id = %s AND lease_owner = %s AND generation = %s",
                (runtime_id, owner, generation),
            )
            if cur.rowcount == 1:  # a drained session: a worker may take it over now
                await conn.execute("SELECT pg_notify(%s, %s)", (self.channels.released, runtime_id))

        await self._write(run, locks=(runtime_id,))

    async def lease_owner(self, runtime_id: str) -> tuple[str | None, float | None, int]:
        async def run(conn: Conn) -> tuple[str | None, float | None, int]:
            cur = await conn.execute(
                "SELECT lease_owner, extract(epoch FROM lease_expiry)::float8, generation"
                " FROM runtimes WHERE runtime_id = %s",
                (runtime_id,),
            )
            row = await cur.fetchone()
            if row is None:
                return (None, None, 0)
            return (row[0], row[1], int(row[2]))

        return await self._read(run)

    # ---------------------------------------------------------------- inbox (S10)

    async def inbox_push(
        self, entry: InboxEntry, idempotency: IdempotencyRecord | None, max_pending: int
    ) -> tuple[str, InputId | None]:
        """One write: the runtime row locked, the key checked, admission counted in SQL, then
        the key and the entry inserted. Sets ``entry.seq`` and ``entry.created_at`` when
        accepted."""
        now = utcnow()
        row = (entry.runtime_id, entry.input_json, entry.reconstruction_json, now)
        idem = (
            (
                idempotency.key,
                idempotency.input_id.value,
                idempotency.content_hash,
                aware(idempotency.accepted_at),
            )
            if idempotency is not None
            else None
        )
        verdict, existing, seq = await self._write(
            lambda conn: _inbox_push(conn, row, idem, max_pending, self.channels.inbox),
            locks=(entry.runtime_id,),
            unique=True,
        )
        if verdict == "accepted":
            entry.seq = seq
            entry.created_at = now
        return (verdict, InputId(existing) if existing is not None else None)

    async def inbox_entries(self, runtime_id: str, limit: int = 100) -> list[InboxEntry]:
        async def run(conn: Conn) -> list[InboxEntry]:
            cur = await conn.execute(
                "SELECT seq, runtime_id, input_json, reconstruction_json, created_at FROM inbox"
                " WHERE runtime_id = %s ORDER BY seq LIMIT %s",
                (runtime_id, max(limit, 0)),
            )
            return [
                InboxEntry(rid, ij, rj, int(seq), at)
                for seq, rid, ij, rj, at in await cur.fetchall()
            ]

        return await self._read(run)

    async def find_input_runtime(self, input_id: InputId) -> str | None:
        """Indexed lookup in the ledger, then the inbox, whose entries name their input only
        inside the document (checked in Python: only the header id counts)."""
        iid = input_id.value

        async def run(conn: Conn) -> str | None:
            cur = await conn.execute(
                "SELECT runtime_id FROM input_states WHERE input_id = %s LIMIT 1", (iid,)
            )
            row = await cur.fetchone()
            if row is not None:
                return str(row[0])
            cur = await conn.execute(
                "SELECT runtime_id, input_json FROM inbox"
                " WHERE input_id = %s OR strpos(input_json, %s) > 0 ORDER BY seq",
                (iid, iid),
            )
            for rid, input_json in await cur.fetchall():
                if inbox_input_id(input_json) == iid:
                    return str(rid)
            return None

        return await self._read(run)

    # ---------------------------------------------------------------- peer requests (S20)

    async def open_peer_request(self, record: PeerRequestRecord) -> PeerRequestRecord:
        row = peer_row(record)
        stored = await self._write(lambda conn: _open_peer_request(conn, row), unique=True)
        return peer_request(stored)

    async def load_peer_request(
        self, requester_runtime_id: str, request_id: str
    ) -> PeerRequestRecord | None:
        async def run(conn: Conn) -> PeerRequestRecord | None:
            cur = await conn.execute(
                f"SELECT {PEER_COLS} FROM peer_requests"
                " WHERE requester_runtime_id = %s AND request_id = %s",
                (requester_runtime_id, request_id),
            )
            row = await cur.fetchone()
            return peer_request(row) if row is not None else None

        return await self._read(run)

    async def find_peer_requests(self, request_id: str) -> list[PeerRequestRecord]:
        async def run(conn: Conn) -> list[PeerRequestRecord]:
            cur = await conn.execute(
                f"SELECT {PEER_COLS} FROM peer_requests WHERE request_id = %s"
                " ORDER BY created_at, requester_runtime_id",
                (request_id,),
            )
            return [peer_request(r) for r in await cur.fetchall()]

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
            where.append("requester_runtime_id = %s")
            args.append(requester_runtime_id)
        if responder_runtime_id is not None:
            where.append("responder_runtime_id = %s")
            args.append(responder_runtime_id)
        if outstanding_only:
            where.append("closed_at IS NULL")
        sql = f"SELECT {PEER_COLS} FROM peer_requests"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at, request_id"

        async def run(conn: Conn) -> list[PeerRequestRecord]:
            cur = await conn.execute(sql, args)
            return [peer_request(r) for r in await cur.fetchall()]

        return await self._read(run)

    async def discard_peer_request(self, requester_runtime_id: str, request_id: str) -> None:
        async def run(conn: Conn) -> None:
            await conn.execute(
                "DELETE FROM peer_requests WHERE requester_runtime_id = %s AND request_id = %s"
                " AND closed_at IS NULL",
                (requester_runtime_id, request_id),
            )

        await self._write(run)

    async def prune_peer_requests(self, *, older_than: datetime, batch: int = 1000) -> int:
        sql = (
            "WITH doomed AS (SELECT requester_runtime_id, request_id FROM peer_requests"
            " WHERE closed_at IS NOT NULL AND closed_at < %(cutoff)s LIMIT %(batch)s)"
            " DELETE FROM peer_requests d USING doomed"
            " WHERE d.requester_runtime_id = doomed.requester_runtime_id"
            " AND d.request_id = doomed.request_id"
        )
        params = {"cutoff": aware(older_than), "batch": max(batch, 1), "keep": 0}
        return await self._prune_statement(sql, params)

    # ---------------------------------------------------------------- retention (S18)

    async def _prune_batch(self, sql: str, params: dict[str, Any]) -> int:
        """One batch in its own short transaction on a pooled connection (the change counter
        moves with it)."""

        async def run(conn: Conn) -> int:
            async with conn.transaction():
                cur = await conn.execute(sql, params)
                n = cur.rowcount
                if n > 0:
                    await conn.execute(
                        "UPDATE change_counter SET n = n + 1 WHERE slot = %s", (self._slot,)
                    )
            return max(n, 0)

        for attempt in range(1, _JOB_ATTEMPTS + 1):
            try:
                return await self._read(run)
            except StoreError as exc:
                if attempt < _JOB_ATTEMPTS and _retryable(exc.__cause__ or exc, False):
                    continue
                raise
        raise AssertionError("unreachable")

    async def _prune_statement(self, sql: str, params: dict[str, Any]) -> int:
        total = 0
        while True:
            n = await self._prune_batch(sql, params)
            total += n
            if n < params["batch"]:
                return total

    async def prune(
        self, *, older_than: datetime, keep_events: int, batch: int = 1000
    ) -> dict[str, int]:
        """Delete in batches, one short transaction each, beside the writer (so commits of
        live runtimes go on); see ``_pg_rows.PRUNE`` for what is kept."""
        params = {
            "cutoff": aware(older_than),
            "batch": max(batch, 1),
            "keep": max(keep_events, 0),
        }
        counts: dict[str, int] = {}
        for name, sql in PRUNE:
            counts[name] = await self._prune_statement(sql, params)
        return counts

    # ---------------------------------------------------------------- introspection

    async def schema_version(self) -> int:
        """The schema version recorded in the database."""

        async def run(conn: Conn) -> int:
            cur = await conn.execute("SELECT MAX(version) FROM schema_version")
            row = await cur.fetchone()
            return int(row[0]) if row is not None and row[0] is not None else 0

        return await self._read(run)

    async def settings(self) -> dict[str, str]:
        """The settings in force on the writer connection (for tests and ``doctor``)."""

        async def run(conn: Conn) -> dict[str, str]:
            out: dict[str, str] = {}
            for name in ("synchronous_commit", "lock_timeout", "TimeZone", "server_version"):
                cur = await conn.execute(f"SHOW {name}")
                row = await cur.fetchone()
                out[name] = str(row[0]) if row is not None else ""
            return out

        return await self._write(run)


async def migrate_postgres(url: str) -> list[int]:
    """``meerkat db migrate``: bring the schema at ``url`` to this build's version; returns the
    versions applied (empty when it was current). Refuses a schema of another application or
    a newer one with ``StoreError``."""
    return await PostgresStore(url).migrate()
