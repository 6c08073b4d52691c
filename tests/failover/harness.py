"""What the failover tests share: ``meerkat worker`` processes on one PostgreSQL schema, a client
(the test process) that puts a steady load of inputs into the sessions' durable inboxes, a
database-side partition, and the checks read back from the database.

- ``Worker``: one ``python -m meerkat_runtime worker --json`` process. Its owner id and its
  connections' ``application_name`` are both its name, so its backends can be found in
  ``pg_stat_activity`` and its writes attributed (``install_audit``); a thread collects its
  JSON lines (``acquired`` / ``lost`` / ``released`` / ``status`` ...) as they come.
- ``Load``: accepts prompts round-robin into every session (idempotency key
  ``failover:<session>:<index>``), records each acknowledgement only after ``accept`` returned,
  and waits for each acknowledged input in a task of its own, as a client would.
- ``install_audit``: AFTER INSERT OR UPDATE triggers on the tables a session's transactions
  write (input states, conversation rows, receipts, runs, events) that record, in the same
  transaction, which connection (``application_name``) wrote a row of which runtime, and who
  held that runtime's lease (owner, generation) at that moment (the fence has the runtime row
  locked until COMMIT, so that is the lease the write was checked against). A write the fence
  refuses rolls back with its audit rows: the audit holds exactly the committed writes, which
  is direct evidence, from the database, of who wrote what, under which generation, and when.
- ``Partition``: cuts a worker off the database from the database side: its role may no
  longer log in, and its backends are terminated (by ``application_name``) every 50 ms.
- ``check_all``: the crash kit's invariants (``meerkat_runtime.crashtest.check_invariants``,
  read with its read-only ``PostgresReader``: (a) acknowledged inputs kept and terminal,
  (b) nothing applied twice, conversations contiguous with a valid digest chain, (c) every
  waiter resolved with the outcome the store implies, (e) no tool call executed twice, none
  executed without its call committed) plus stricter ones: every acknowledged input
  ``consumed`` by a ``completed`` run and its waiter ``completed``, nothing rejected, and
  every committed write made by the lease holder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from meerkat_runtime import PromptInput, Runtime
from meerkat_runtime.core.agent import INTERRUPTED_TOOL_RESULT
from meerkat_runtime.crashtest import (
    Ack,
    DbView,
    ToolExecution,
    check_invariants,
    read_db,
    read_tool_log,
)
from meerkat_runtime.host import CompletionHandle
from meerkat_runtime.runtime.outcomes import AcceptOutcome, Deduplicated, Rejected
from meerkat_runtime.store.postgres import PostgresStore
from tests.failover.tools import LOG_ENV, SECONDS_ENV, TOOL_NAME

__all__ = [
    "REPO",
    "AuditRow",
    "Load",
    "Partition",
    "Report",
    "Worker",
    "add_app_name",
    "check_all",
    "create_role",
    "drop_role",
    "fenced_writes",
    "install_audit",
    "interrupted_by",
    "prepare_store",
    "read_audit",
    "read_leases",
    "script",
    "stale_writes",
    "stop_all",
    "tool_starts",
    "wait_for",
    "with_user",
]

REPO = Path(__file__).resolve().parents[2]


def add_app_name(url: str, name: str) -> str:
    """``url`` whose connections carry ``application_name=name`` (a libpq URL parameter)."""
    return f"{url}{'&' if '?' in url else '?'}application_name={name}"


def with_user(url: str, user: str, password: str) -> str:
    """``url`` connecting as ``user`` with ``password`` (URL-safe: hex)."""
    scheme, sep, rest = url.partition("://")
    _, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{user}:{password}@{host if at else rest}"


def script(runs: int) -> list[dict[str, Any]]:
    """The offline script of every session: each run calls the real ``lookup`` tool once (the
    call is committed by a checkpoint before the tool runs), then answers."""
    steps: list[dict[str, Any]] = []
    for i in range(runs):
        steps.append({"type": "tool", "name": TOOL_NAME, "args": {"q": i}})
        steps.append({"type": "text", "text": f"answer {i}"})
    return steps


async def wait_for(
    what: str,
    predicate: Callable[[], bool],
    timeout: float,
    detail: Callable[[], str] | None = None,
) -> None:
    """Poll ``predicate`` every 50 ms until it holds; AssertionError naming ``what`` (and
    ``detail()``, what was seen) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            seen = f": {detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{seen}")
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------------- workers


@dataclass
class Worker:
    """A ``meerkat worker --json`` process and the JSON lines it printed so far (each with
    ``at``, the worker's ``time.time()``: the same clock as the test's and the database's)."""

    name: str
    proc: subprocess.Popen[bytes]
    stderr_path: Path
    events: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    reader: threading.Thread | None = None

    @classmethod
    def spawn(
        cls,
        name: str,
        url: str,
        directory: Path,
        tool_log: Path,
        *,
        lease_ttl: float,
        tool_seconds: float,
        extra: Iterable[str] = (),
    ) -> Worker:
        stderr_path = directory / f"{name}.stderr.log"
        env = {
            **os.environ,
            LOG_ENV: str(tool_log),
            SECONDS_ENV: str(tool_seconds),
            "PYTHONUNBUFFERED": "1",
        }
        cmd = [
            sys.executable,
            "-m",
            "meerkat_runtime",
            "worker",
            "--store",
            add_app_name(url, name),
            "--json",
            "--lease-ttl",
            str(lease_ttl),
            "--tools",
            "tests.failover.tools:registry",
            "--status-every",
            "0.2",
            "--owner-id",
            name,
            "--grace",
            "1",
            *extra,
        ]
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL
            )
        w = cls(name, proc, stderr_path)
        w.reader = threading.Thread(target=w._read, name=f"reader-{name}", daemon=True)
        w.reader.start()
        return w

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = {"event": "unparsed", "line": raw.decode(errors="replace"), "at": 0.0}
            with self.lock:
                self.events.append(doc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.events)

    def of(self, kind: str, after: float = 0.0) -> list[dict[str, Any]]:
        """Its ``kind`` events with ``at`` later than ``after``, in order."""
        return [e for e in self.snapshot() if e.get("event") == kind and e["at"] > after]

    def owned_at(self, at: float) -> dict[str, int]:
        """session -> generation of the sessions it held at unix time ``at`` (acquired, not
        yet lost or released, by its own reports)."""
        owned: dict[str, int] = {}
        for e in self.snapshot():
            if e["at"] > at:
                break
            kind = e.get("event")
            if kind == "acquired":
                owned[str(e["session_id"])] = int(e["generation"])
            elif kind in ("lost", "released"):
                owned.pop(str(e["session_id"]), None)
        return owned

    def status_before(self, at: float) -> dict[str, Any] | None:
        before = [e for e in self.of("status") if e["at"] <= at]
        return before[-1] if before else None

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def save(self) -> Path:
        """Its JSON lines so far, to ``<name>.events.jsonl`` next to its stderr log."""
        path = self.stderr_path.with_name(f"{self.name}.events.jsonl")
        path.write_text("".join(json.dumps(e) + "\n" for e in self.snapshot()), encoding="utf-8")
        return path

    def describe(self) -> str:
        return (
            f"worker {self.name} (pid {self.pid}, exit {self.proc.returncode}), stderr tail:\n"
            f"{self.stderr()[-2000:]}"
        )


def stop_all(workers: Iterable[Worker], timeout: float = 20.0) -> dict[str, int | None]:
    """Drain every worker still running at once (SIGCONT, then SIGTERM: none takes over what
    another releases, since all are draining), SIGKILL what is left after ``timeout``;
    name -> exit code."""
    ws = list(workers)
    for w in ws:
        if w.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(signal.SIGCONT)
                w.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for w in ws:
        try:
            w.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()
        if w.reader is not None:
            w.reader.join(5)
        w.save()
    return {w.name: w.proc.returncode for w in ws}


# ---------------------------------------------------------------------------------- store


_AUDIT_SQL = """
CREATE TABLE failover_audit (
    id           bigserial PRIMARY KEY,
    tbl          text        NOT NULL,
    runtime_id   text        NOT NULL,
    app          text        NOT NULL,
    lease_owner  text,
    generation   bigint,
    at           timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION failover_audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO failover_audit (tbl, runtime_id, app, lease_owner, generation)
    SELECT TG_TABLE_NAME, NEW.runtime_id, current_setting('application_name'),
           r.lease_owner, r.generation
    FROM (SELECT 1) AS one LEFT JOIN runtimes r ON r.runtime_id = NEW.runtime_id;
    RETURN NULL;
END
$$;
"""
AUDITED = ("input_states", "conversation_rows", "receipts", "runs", "events")


async def prepare_store(url: str) -> None:
    """Create the store's tables in the fresh schema (the first open migrates it)."""
    store = PostgresStore(url)
    await store.open()
    await store.close()


def install_audit(url: str) -> None:
    """The audit table and its triggers (see the module docstring), in the URL's schema."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(_AUDIT_SQL)
        for table in AUDITED:
            conn.execute(
                sql.SQL(
                    "CREATE TRIGGER failover_audit AFTER INSERT OR UPDATE ON {}"
                    " FOR EACH ROW EXECUTE FUNCTION failover_audit_row()"
                ).format(sql.Identifier(table))
            )


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One committed write of a runtime's row: by which connection, under which lease."""

    table: str
    runtime_id: str
    app: str
    lease_owner: str | None
    generation: int | None
    at: float  # unix time of the write (the database server's clock, on this machine)


def read_audit(url: str) -> list[AuditRow]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT tbl, runtime_id, app, lease_owner, generation, extract(epoch FROM at)::float8"
            " FROM failover_audit ORDER BY id"
        ).fetchall()
    return [
        AuditRow(str(t), str(r), str(a), o, None if g is None else int(g), float(at))
        for t, r, a, o, g, at in rows
    ]


def read_leases(url: str) -> dict[str, tuple[str | None, int]]:
    """runtime id -> (lease owner, generation), from the ``runtimes`` table."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT runtime_id, lease_owner, generation FROM runtimes").fetchall()
    return {str(r): (o, int(g)) for r, o, g in rows}


def create_role(url: str, schema: str) -> tuple[str, str]:
    """A new login role (not a superuser, so a partition can refuse its logins) with what a
    worker needs on ``schema``: its tables (the audit table too) and sequences; (name,
    password)."""
    role = f"meerkat_fo_{uuid.uuid4().hex[:10]}"
    password = uuid.uuid4().hex
    ident, sch = sql.Identifier(role), sql.Identifier(schema)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(ident, sql.Literal(password))
        )
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sch, ident))
        conn.execute(sql.SQL("GRANT ALL ON ALL TABLES IN SCHEMA {} TO {}").format(sch, ident))
        conn.execute(sql.SQL("GRANT ALL ON ALL SEQUENCES IN SCHEMA {} TO {}").format(sch, ident))
    return role, password


def drop_role(url: str, role: str) -> None:
    with contextlib.suppress(psycopg.Error), psycopg.connect(url, autocommit=True) as conn:
        ident = sql.Identifier(role)
        conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(ident))
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,)
        )
        conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
        conn.execute(sql.SQL("DROP ROLE {}").format(ident))


class Partition:
    """Cuts the worker whose connections carry ``application_name=app`` (and log in as
    ``role``) off the database, from the database side, until ``heal()``: the role may no
    longer log in, and every ~50 ms each backend with that application name is terminated
    (``pg_terminate_backend``). Terminating alone leaks: a connection made between two sweeps
    can commit a lease renewal in a few milliseconds; refusing logins closes that gap."""

    def __init__(self, url: str, app: str, role: str, every: float = 0.05) -> None:
        self.url = add_app_name(url, "failover-partitioner")
        self.app = app
        self.role = role
        self.every = every
        self.sweeps = 0
        self.terminated = 0
        self.started_at = 0.0
        self.healed_at = 0.0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="partition", daemon=True)
        self._error: BaseException | None = None

    def start(self) -> float:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self.started_at

    def heal(self) -> float:
        self._stop.set()
        self._thread.join(10)
        if self._error is not None:
            raise self._error
        return self.healed_at

    def _run(self) -> None:
        try:
            with psycopg.connect(self.url, autocommit=True) as conn:
                ident = sql.Identifier(self.role)
                conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(ident))
                self.started_at = time.time()
                self._ready.set()
                try:
                    while not self._stop.is_set():
                        row = conn.execute(
                            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                            " WHERE application_name = %s",
                            (self.app,),
                        ).fetchone()
                        self.sweeps += 1
                        self.terminated += int(row[0]) if row is not None else 0
                        self._stop.wait(self.every)
                finally:
                    conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(ident))
                    self.healed_at = time.time()
        except BaseException as exc:
            self._error = exc
            self._ready.set()


# ---------------------------------------------------------------------------------- load


@dataclass
class Load:
    """Prompts accepted round-robin into ``sessions`` at ``rate`` per second by ``rt``, a
    client ``Runtime`` that owns no session (every accept goes to the durable inbox, S10)."""

    rt: Runtime
    sessions: list[str]
    rate: float
    wait_timeout: float = 60.0
    acks: list[Ack] = field(default_factory=list)
    ack_times: dict[str, float] = field(default_factory=dict)  # input id -> unix time of ack
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)
    resolved_at: dict[str, float] = field(default_factory=dict)  # input id -> waiter answered
    rejected: list[str] = field(default_factory=list)
    _waiters: list[asyncio.Task[None]] = field(default_factory=list)
    _next: int = 0
    _extra: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def prompt(session: str, index: int) -> PromptInput:
        """The ``index``-th prompt of ``session``: the same content and key every time, so a
        retry is deduplicated (S11)."""
        return PromptInput.new(
            f"{session} input {index}", idempotency_key=f"failover:{session}:{index}"
        )

    async def send(self, session: str, index: int) -> None:
        handle = await self.rt.accept_with_completion(session, self.prompt(session, index))
        outcome = handle.outcome
        if isinstance(outcome, Rejected):
            self.rejected.append(f"{session}#{index}: {outcome.code.value}: {outcome.reason}")
            return
        # acknowledged: recorded only now that accept returned
        iid = str(handle.input_id)
        kind = "deduplicated" if isinstance(outcome, Deduplicated) else "accepted"
        self.acks.append(Ack(session, index, iid, kind, "durable", os.getpid()))
        self.ack_times[iid] = time.time()
        self._waiters.append(asyncio.create_task(self._wait(handle, iid)))

    async def send_extra(self, sessions: Iterable[str]) -> None:
        """One more prompt for each of ``sessions`` (indexes from 10000 on, apart from the
        round-robin's), so that each has work in hand and needs an owner now."""
        for session in sessions:
            index = self._extra.get(session, 10_000)
            self._extra[session] = index + 1
            await self.send(session, index)

    async def resend(self, ack: Ack) -> AcceptOutcome:
        """A client's retry of an acknowledged input (same key, same content)."""
        return await self.rt.accept(ack.session, self.prompt(ack.session, ack.index))

    async def _wait(self, handle: CompletionHandle, iid: str) -> None:
        try:
            outcome = await handle.wait(self.wait_timeout)
            self.outcomes[iid] = outcome.to_json_dict()
        except TimeoutError:
            self.outcomes[iid] = {"outcome_type": "timeout"}
        except Exception as exc:  # reported by check (c) as an unresolved waiter
            self.outcomes[iid] = {"outcome_type": "terminated", "error": repr(exc)}
        self.resolved_at[iid] = time.time()

    async def run(self, stop: asyncio.Event) -> None:
        """Send at ``rate`` until ``stop`` is set."""
        period = 1.0 / self.rate
        start = time.monotonic()
        while not stop.is_set():
            n = self._next
            self._next += 1
            await self.send(self.sessions[n % len(self.sessions)], n // len(self.sessions))
            delay = start + self._next * period - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)

    async def settle(self) -> None:
        """Wait for every waiter (each has its own timeout)."""
        await asyncio.gather(*self._waiters)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Callable[[], Awaitable[None]]]:
        """Send in the background; yields ``finish``, which stops sending and waits for every
        waiter. Leaving early (a failed assertion) cancels the sender and the waiters."""
        stop = asyncio.Event()
        sender = asyncio.create_task(self.run(stop))

        async def finish() -> None:
            stop.set()
            await sender
            await self.settle()

        try:
            yield finish
        finally:
            stop.set()
            for task in (sender, *self._waiters):
                task.cancel()
            await asyncio.gather(sender, *self._waiters, return_exceptions=True)


# ---------------------------------------------------------------------------------- checks


def fenced_writes(audit: Iterable[AuditRow], apps: set[str]) -> list[str]:
    """S10, from the database: every committed write of a session's rows came from a known
    worker that held that session's lease when it committed."""
    out: list[str] = []
    for a in audit:
        if a.app not in apps:
            out.append(f"{a.table} row of {a.runtime_id} written by unknown connection {a.app!r}")
        elif a.lease_owner != a.app:
            out.append(
                f"{a.table} row of {a.runtime_id} committed by {a.app} at {a.at:.3f} while the "
                f"lease was {a.lease_owner!r}'s (generation {a.generation}): a fenced write"
            )
    return out


def stale_writes(audit: Iterable[AuditRow], worker: Worker) -> list[AuditRow]:
    """Writes ``worker`` committed under a (session, generation) after it reported that lease
    ``lost`` (it said it stopped the session; nothing of it may reach the store after)."""
    lost = {(str(e["session_id"]), int(e["generation"])): float(e["at"]) for e in worker.of("lost")}
    return [
        a
        for a in audit
        if a.app == worker.name
        and a.generation is not None
        and (a.runtime_id, a.generation) in lost
        and a.at > lost[(a.runtime_id, a.generation)]
    ]


def tool_starts(tool_log: Path, pid: int) -> list[float]:
    """When process ``pid`` started each of its tool executions (unix times, from the
    side-effect log's ``at``)."""
    if not tool_log.exists():
        return []
    out: list[float] = []
    for line in tool_log.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            doc = json.loads(line)
            if int(doc["pid"]) == pid:
                out.append(float(doc["at"]))
    return out


def interrupted_by(db: DbView, log: Iterable[ToolExecution], pid: int) -> list[tuple[str, str]]:
    """Tool calls that process ``pid`` started (side-effect log) and that ended with the
    synthetic ``interrupted, not re-run`` result: runs that were in flight in that process
    when it died or lost the session, and whose tool the new owner did not run again."""
    interrupted = {
        (r.runtime_id, str(r.message.get("tool_call_id")))
        for r in db.rows
        if r.message.get("role") == "tool" and r.message.get("content") == INTERRUPTED_TOOL_RESULT
    }
    return sorted({(e.session, e.call_id) for e in log if e.pid == pid} & interrupted)


@dataclass
class Report:
    """What ``check_all`` found: the violations and what the tests print or check further."""

    violations: list[str]
    db: DbView
    log: list[ToolExecution]
    audit: list[AuditRow]

    def summary(self) -> str:
        return (
            f"{len(self.db.inputs)} inputs, {len(self.db.runs)} runs, {len(self.db.rows)} "
            f"conversation rows, {len(self.log)} tool executions, {len(self.audit)} audited "
            "writes"
        )


def check_all(url: str, load: Load, tool_log: Path, worker_names: set[str]) -> Report:
    """The invariants over the database, the acknowledgements, the waiters' outcomes and the
    side-effect log (see the module docstring)."""
    db = read_db(url)
    log = read_tool_log(tool_log)
    out = check_invariants(db, load.acks, load.outcomes, (), log)
    for a in load.acks:
        stored = db.inputs.get(a.input_id)
        if stored is None:
            continue  # reported by (a)
        run = db.runs.get(stored.last_run_id) if stored.last_run_id else None
        if stored.current_state != "consumed" or run is None or run.status != "completed":
            out.append(
                f"input {a.input_id} ({a.session}#{a.index}) ended {stored.current_state}, its "
                f"last run {stored.last_run_id} {None if run is None else run.status}; every "
                f"prompt should be consumed by a completed run: {stored.state_json[:300]}"
            )
    unresolved = [i for i in load.ack_times if i not in load.outcomes]
    out.extend(f"waiter of {i} never returned" for i in unresolved)
    for iid, doc in load.outcomes.items():
        if doc.get("outcome_type") != "completed":
            out.append(f"waiter of {iid} answered {json.dumps(doc)} (expected completed)")
    out.extend(f"rejected: {r}" for r in load.rejected)
    audit = read_audit(url)
    out.extend(fenced_writes(audit, worker_names))
    return Report(out, db, log, audit)
