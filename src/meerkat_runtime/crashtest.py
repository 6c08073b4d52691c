"""The crash test kit (``meerkat crashtest``): real processes, real SIGKILLs, invariants read
back from the database (spec §5, conformance cases 11-16).

**The child** (``python -m meerkat_runtime.crashtest child SPEC_JSON``, or ``@path`` to a file
holding the JSON) runs a small, deterministic workload against a runtime on the spec's store:
``ChildSpec.store``, any URL ``meerkat_runtime.store.open_store`` accepts (``sqlite:///...``,
``postgresql://...``), by default the SQLite file ``ChildSpec.db``:

1. opens the runtime on that store (recovering whatever a killed predecessor left,
   S7) with the default policy table plus a row that makes projected inputs runnable (they
   wake the runtime or are held), a projection rebuilder (S13) and a small ``RuntimeConfig``
   (fast backoff, short grace);
2. creates the spec's sessions if missing (fixed ids; each with its offline script, so runs
   pass boundaries, checkpoints and completions); every session's agent has the real tools
   ``lookup`` and ``lookup_sync`` (``crash_tools``), which log each execution to the
   side-effect log (``tool_log``) before they do anything else;
3. accepts the spec's inputs in a fixed order, each with the idempotency key
   ``crashtest:<session>:<index>``, so a restarted child re-submits them safely and is answered
   ``deduplicated{existing_id}``;
4. only **after** ``accept`` returned, appends the acknowledged id (the new id, or the existing
   id of a duplicate) to the ack log: one JSON line, written with one ``write`` and
   ``fsync``-ed, so a line in the log is an acknowledgement a client really received;
5. waits (``Runtime.wait`` with a timeout) for every id in the ack log, its predecessors'
   included, and writes one outcome per id to the outcomes file (JSON lines, replaced
   atomically), then appends its recovery reports to the report file and exits 0.

``MEERKAT_CRASH_AT=point:n`` (see ``_crash.py``) makes the child SIGKILL itself the n-th time
it passes ``point``.

**The parent** (``run_crashtest``) runs trials. Each trial picks a kill point (cycling through
every crash point plus ``random``, where the parent itself sends SIGKILL after a random delay)
and a random small ``n``, runs the child with the point armed, checks it died of SIGKILL
(returncode -9) or notes that it finished without reaching the point, snapshots the terminal
input states (read-only, see *Reading the store* below), restarts the child unarmed so it
recovers and finishes, and checks, from the database and the child's files:

(a) every acknowledged input is in the store and terminal, and a durable (or derived) one is
    never ``abandoned{recovery_failed}``; an acknowledged *ephemeral* input may be absent (it
    rides along with the next commit, S6, and a crash may come first) or
    ``abandoned{recovery_failed}`` (S7);
(b) nothing is applied twice: at most one conversation row names an input id, and exactly
    one names an input consumed by a completed run; at most one tool result per tool call id
    and at most one assistant message per tool call id (S6: a committed tool call is never
    run again); every conversation is contiguous and its digest chain verifies (spec §3);
(c) every waiter resolved: the restarted child wrote an outcome for every acknowledged input,
    none ``terminated`` or timed out, each the one S12 derives from the stored state and run
    (an absent ephemeral input answers ``not_found``);
(d) no terminal state changed between a snapshot taken after a kill and the end;
(e) no tool call was executed twice: the child's tools (``lookup``, ``lookup_sync``, see
    ``crash_tools``) append each execution to a side-effect log (``fsync``-ed before the
    tool goes on), and over every process of the trial each (session, call id) appears in it
    at most once; a call answered by a committed result other than the synthetic
    ``interrupted, not re-run`` appears exactly once, one answered by the synthetic result
    at most once (it may have run before the crash, its result lost), and every logged
    execution belongs to a tool call committed in its session's conversation (S6).

(f) peer comms (``check_comms``): every acknowledged comms send (a receipt ``comms_send``
    returned, written to the comms ack log only afterwards) is delivered exactly once at its
    target (one input per envelope id, found by its correlation id in the target's input
    states), terminal, its waiter resolved; every request delivered was recorded at its
    requester first (S20); no response was accepted for a request that was not outstanding
    (unknown, sent to another peer, recorded after the response, or closed before a
    progress response); every request is closed by at most one terminal response, and a
    closed one by exactly the one its record names, in the same transaction; what the
    agents' ``send_request`` / ``respond`` tools returned was delivered (once; an
    interrupted call at most once).

The workload (``_workload``): two sessions, each with two or three durable prompts and, at
random, an ephemeral prompt, a derived projected input, a peer message, progress responses
and a system notice; each session's script makes every run call a real tool (``lookup`` or
``lookup_sync``, now and then both in parallel; a checkpoint) before answering, and now and
then fails transiently before or after the boundary (S4, S5).

A share of the trials (``run_crashtest(comms=...)``, 0.3 by default) runs the comms workload
instead (``_comms_workload``): sessions ``crash-coord`` and ``crash-worker`` with comms names;
the coordinator's inputs include requests and messages to the worker, *sent* with
``comms_send`` (envelope ids fixed per input, so a restarted child re-sends and is
deduplicated, S11), and the child's responder (the application behind the sessions) answers
every request delivered to the worker with a progress and a terminal response (envelope ids
fixed per request and status). At random the worker runs in a second ``Runtime`` of the child
(its own owner id: requests and responses cross the durable inboxes, S10), the worker's agent
answers first with the ``respond`` tool, the coordinator's agent sends a request of its own
with ``send_request``, and a bogus progress response to no request is offered (refused,
S20). After every kill the trial notes what was in flight (``comms_situation``: a request
queued at its target or in its inbox, a terminal response accepted but not applied or in the
requester's inbox, a request recorded but not delivered). The restarted child waits until
comms settle (no pending input, empty inboxes, every delivered request closed) before it
writes its outcomes.

``recovery.after`` is only passed by a recovery that had something to reconcile, so its trials
first kill the child at another point (a *setup* kill), then arm ``recovery.after`` for the
restart. One trial in five also kills the recovering process at a random instant before the
final restart. Trials whose owner id changes between processes (``takeover``) exercise lease
expiry and the durable inbox too (S10).

**Reading the store.** The parent never reads through the runtime or the store it tests (a bug
in their reads must not hide one in their writes): ``read_db(location)`` reads the tables
themselves with a read-only connection, in one snapshot, through a ``DbReader`` for the
location: ``SqliteReader`` (a SQLite file or ``sqlite:///`` URL: a ``mode=ro`` connection, one
read transaction) or ``PostgresReader`` (a ``postgresql://`` URL: a psycopg connection in a
``REPEATABLE READ READ ONLY`` transaction, in the URL's schema). Both fill the same ``DbView``
with the same values (PostgreSQL's ``text[]``, ``jsonb`` and ``timestamptz`` columns become the
lists, dicts and microseconds SQLite stores as JSON text and integers), so every check is the
same on both stores. The side-effect log, the ack logs, the outcomes and reports are files in
the trial's directory, whatever the store.

**PostgreSQL trials** (``run_crashtest(pg_url=...)``, ``meerkat crashtest --pg-url URL``): each
trial gets a fresh, empty schema of that database (``<schema_prefix><index>``, the child's URL
selecting it with ``options=-csearch_path=...``; the store creates its tables there), dropped
once the trial passed; a failing trial's schema is kept, like its directory, and named in its
violations (``Violation.schema``).

Children are started either as fresh interpreters (``launcher="spawn"``: exactly
``python -m meerkat_runtime.crashtest child ...``) or, about fifty times faster, forked by a
*zygote* (``launcher="fork"``): a single-threaded helper process that imported the package
once and forks one child per request (see ``_zygote_main``). Either way each child is a real
process that dies of a real SIGKILL; a forked child re-reads ``MEERKAT_CRASH_AT`` and reseeds
the id generator, as a fresh interpreter would.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import importlib
import json
import logging
import os
import random
import re
import selectors
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from . import _crash, _ids
from ._crash import POINTS as CRASH_POINTS
from ._ids import InputId, RunId
from ._json import canonical_bytes
from .comms import comms_tools
from .core.agent import INTERRUPTED_TOOL_RESULT, AgentConfig, AgentExecutor
from .core.lifecycle import CoreExecutor, RunResult, ToolCall
from .core.tools import ToolContext, ToolRegistry
from .errors import (
    InputNotFoundError,
    InvalidArgumentError,
    InvalidOperationError,
    SessionNotFoundError,
)
from .host import Runtime
from .llm.offline import OfflineModel, ToolBehaviour
from .runtime.driver import Rebuilders, RuntimeConfig
from .runtime.input_state import InputLifecycleState, InputState, ProjectionSource
from .runtime.inputs import (
    Input,
    InputDurability,
    MessageConvention,
    PeerInput,
    PeerOrigin,
    ProjectedInput,
    PromptInput,
    RequestConvention,
    ResponseProgressConvention,
    ResponseProgressPhase,
    ResponseTerminalConvention,
    SystemGeneratedInput,
)
from .runtime.outcomes import Deduplicated, Rejected, outcome_of
from .runtime.policy import PolicyRow, PolicyTable, default_policy_table
from .store import open_store, redact_url
from .store.base import RunRecord, SessionRecord, StoreError
from .store.sqlite import SqliteStore

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "CRASH_POINTS",
    "KILL_POINTS",
    "KIT_TOOLS",
    "RANDOM",
    "Ack",
    "ChildRun",
    "ChildSpec",
    "CommsAck",
    "CrashtestReport",
    "DbReader",
    "DbView",
    "InputSpec",
    "Launcher",
    "PointStats",
    "PostgresReader",
    "SessionSpec",
    "SqliteReader",
    "ToolExecution",
    "TrialResult",
    "Violation",
    "Zygote",
    "answer_envelope",
    "check_comms",
    "check_invariants",
    "check_pg",
    "child_main",
    "comms_situation",
    "crash_policy",
    "crash_rebuilders",
    "crash_tools",
    "create_pg_schema",
    "drop_pg_schema",
    "envelope_for",
    "idempotency_key",
    "input_for",
    "pg_schema_url",
    "read_acks",
    "read_comms_acks",
    "read_db",
    "read_outcomes",
    "read_reports",
    "read_tool_log",
    "reader_for",
    "run_child",
    "run_crashtest",
    "terminal_snapshot",
]

RANDOM = "random"
"""The kill point at which the parent, not the child, sends SIGKILL after a random delay."""

KILL_POINTS: tuple[str, ...] = (*CRASH_POINTS, RANDOM)
RULE_ID = "crashtest.projection"
"""The projection rule id of the workload's derived inputs (rebuilt by ``crash_rebuilders``)."""

KIT_TOOLS: tuple[str, ...] = ("lookup", "lookup_sync")
"""The child's real tools (``crash_tools``): every execution of one is in the side-effect log."""

Launcher = Literal["fork", "spawn"]

# ==================================================================================== spec

InputType = Literal[
    "prompt",
    "ephemeral",
    "projected",
    "peer_message",
    "progress",
    "system",
    "comms_message",
    "comms_request",
]
COMMS_INPUT_TYPES: tuple[str, ...] = ("comms_message", "comms_request")
"""Input types the child sends with ``Runtime.comms_send`` instead of ``accept``."""


@dataclass(slots=True)
class InputSpec:
    """One input of a session's workload: a durable prompt, an ephemeral prompt, a derived
    projected input (system origin, ``projection{RULE_ID, <session>:event:<index>}``), a peer
    message (joins an active run at its next checkpoint, S1/S16), a peer progress response
    (never wakes; coalesced with its like at a run start or checkpoint, S3) or a system notice
    (``inject_now``: a context append with no model call, consumed at its boundary).

    ``comms_message`` and ``comms_request`` are not accepted but *sent*: the child calls
    ``Runtime.comms_send`` from the session (it needs a comms name) to the peer named ``to``,
    with the envelope id ``envelope_for(session, index)`` (the same in every process, so a
    re-send is deduplicated, S11); ``text`` is the message body or the request's intent."""

    type: InputType = "prompt"
    text: str = ""
    to: str = ""  # comms_*: the target's comms name


@dataclass(slots=True)
class SessionSpec:
    """A session with a fixed id, its offline script and its inputs (in acceptance order).

    ``comms_name`` makes it a comms peer (its agent is offered the comms tools; the child's
    responder answers the requests delivered to it, see ``answer_after``). ``secondary``: the
    child runs it in a second ``Runtime`` with its own owner id, so comms between it and the
    other sessions cross the durable inbox (S10) as between two processes.
    ``answer_after``: seconds the child's responder waits, after it first sees a request
    delivered to this session, before it answers it (so the agent, when its script calls
    ``respond``, may answer first); the restarted child's final pass answers at once."""

    id: str
    script: list[dict[str, Any]] = field(default_factory=list)
    inputs: list[InputSpec] = field(default_factory=list)
    comms_name: str | None = None
    secondary: bool = False
    answer_after: float = 0.0


@dataclass(slots=True)
class ChildSpec:
    """Everything one child process needs; the same spec is given to every process of a trial
    (a restarted child re-submits the same inputs and gets ``deduplicated``).

    ``owner_id`` is the lease owner: a fixed id lets a restarted child take the lease over at
    once, ``None`` gives every process its own id, so a restarted child waits for the dead
    one's lease to expire (``lease_ttl``) and meanwhile accepts through the inbox (S10).
    ``derived_policy``: projected inputs wake the runtime (``wake``) or wait in the queue for
    a run something else starts (``hold``). ``tool_log``: the side-effect log of the child's
    tools (``read_tool_log``), shared by every process of a trial.

    ``store``: the URL of the store the child opens (any URL ``open_store`` accepts, e.g.
    ``postgresql://.../db?options=-csearch_path%3Dschema``); empty for the SQLite file ``db``.
    ``db`` names the trial's directory in any case: the logs (and the ``spawn`` launcher's
    spec file) live next to it; ``store_url`` is what the child opens and the parent reads.
    """

    db: str
    ack_log: str
    outcomes: str
    report: str
    sessions: list[SessionSpec]
    owner_id: str | None = "crashtest-child"
    lease_ttl: float = 2.0
    poll_interval: float = 0.05
    wait_timeout: float = 30.0
    derived_policy: Literal["wake", "hold"] = "wake"
    backoff_base: float = 0.01
    backoff_max: float = 0.05
    max_attempts: int = 3
    shutdown_grace: float = 1.0
    accept_gap: float = 0.0
    tool_log: str = ""  # the side-effect log; "" = ``tools.jsonl`` next to the database
    comms_log: str = ""  # the comms ack log; "" = ``comms.jsonl`` next to the database
    store: str = ""  # the store URL; "" = the SQLite file ``db``

    @classmethod
    def in_dir(cls, directory: Path, sessions: list[SessionSpec], **options: Any) -> ChildSpec:
        """A spec whose database and files live in ``directory``."""
        d = directory.absolute()
        options.setdefault("tool_log", str(d / "tools.jsonl"))
        options.setdefault("comms_log", str(d / "comms.jsonl"))
        return cls(
            db=str(d / "crash.db"),
            ack_log=str(d / "acks.jsonl"),
            outcomes=str(d / "outcomes.jsonl"),
            report=str(d / "reports.jsonl"),
            sessions=sessions,
            **options,
        )

    @property
    def store_url(self) -> str:
        """The store the child opens and the parent reads (``read_db(spec.store_url)``):
        ``store``, else ``sqlite:///`` + the absolute path of ``db``."""
        return self.store or f"sqlite:///{Path(self.db).absolute()}"

    @property
    def tool_log_path(self) -> Path:
        """Where the child's tools log their executions (see ``read_tool_log``)."""
        return Path(self.tool_log) if self.tool_log else Path(self.db).with_name("tools.jsonl")

    @property
    def comms_log_path(self) -> Path:
        """Where the child logs the receipts of its comms sends (see ``read_comms_acks``)."""
        return Path(self.comms_log) if self.comms_log else Path(self.db).with_name("comms.jsonl")

    @property
    def uses_comms(self) -> bool:
        return any(s.comms_name for s in self.sessions)

    def session_named(self, comms_name: str) -> str | None:
        """The id of the spec's session with that comms name."""
        return next((s.id for s in self.sessions if s.comms_name == comms_name), None)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ChildSpec:
        doc: dict[str, Any] = json.loads(text)
        sessions = [
            SessionSpec(
                id=str(s["id"]),
                script=list(s.get("script", [])),
                inputs=[InputSpec(**i) for i in s.get("inputs", [])],
                comms_name=s.get("comms_name"),
                secondary=bool(s.get("secondary", False)),
                answer_after=float(s.get("answer_after", 0.0)),
            )
            for s in doc.pop("sessions")
        ]
        return cls(sessions=sessions, **doc)

    def accept_order(self) -> Iterator[tuple[str, int, InputSpec]]:
        """(session id, index, input) round-robin over the sessions, each in its own order."""
        longest = max((len(s.inputs) for s in self.sessions), default=0)
        for index in range(longest):
            for s in self.sessions:
                if index < len(s.inputs):
                    yield s.id, index, s.inputs[index]


def idempotency_key(session_id: str, index: int) -> str:
    """The key of the ``index``-th input of a session: the same in every process (S11)."""
    return f"crashtest:{session_id}:{index}"


_ENVELOPES = uuid.UUID("6f1c2a8e-4d0b-5e7a-9c3f-2b8d1e6a0c57")


def envelope_for(session_id: str, index: int) -> str:
    """The envelope id of the ``index``-th input of a session when it is a comms send: a
    UUIDv5 of its idempotency key, the same in every process (S11)."""
    return str(uuid.uuid5(_ENVELOPES, idempotency_key(session_id, index)))


def answer_envelope(request_id: str, status: str) -> str:
    """The envelope id of the child's responder's ``status`` response to ``request_id``: the
    same in every process, so a responder restarted after a crash re-sends, never sends anew."""
    return str(uuid.uuid5(_ENVELOPES, f"crashtest:answer:{request_id}:{status}"))


def input_for(session_id: str, index: int, spec: InputSpec) -> Input:
    """The input for ``spec``: a fresh id, but content (and so content hash) that depends only
    on the session, the index and the spec, so a re-submission is a duplicate."""
    if spec.type in COMMS_INPUT_TYPES:
        raise ValueError(f"a {spec.type} is sent with comms_send, not accepted as an input")
    key = idempotency_key(session_id, index)
    text = spec.text or f"{session_id} input {index} ({spec.type})"
    if spec.type == "prompt":
        return PromptInput.new(text, idempotency_key=key)
    if spec.type == "ephemeral":
        return PromptInput.new(text, idempotency_key=key, durability=InputDurability.EPHEMERAL)
    if spec.type == "system":
        return SystemGeneratedInput.new("crashtest", text, idempotency_key=key)
    if spec.type == "peer_message":
        return PeerInput.new(
            text, peer_id="crash-peer", convention=MessageConvention(), idempotency_key=key
        )
    if spec.type == "progress":
        progress = ResponseProgressConvention(
            request_id=f"{session_id}:request", phase=ResponseProgressPhase.IN_PROGRESS
        )
        return PeerInput.new(text, peer_id="crash-peer", convention=progress, idempotency_key=key)
    return ProjectedInput.new(RULE_ID, f"{session_id}:event:{index}", text, idempotency_key=key)


def crash_policy(derived_policy: Literal["wake", "hold"] = "wake") -> PolicyTable:
    """The default table with a row for ``projected`` inputs that makes them runnable
    (stage at run start, consumed on run completion); they wake the runtime, or with
    ``hold`` stay queued until another input starts a run."""
    d = PolicyTable.decision
    wake = "wake_if_idle" if derived_policy == "wake" else "none"
    row = PolicyRow(
        d("stage_run_start", wake, "fifo", "on_run_complete"),
        d("stage_run_start", "none", "fifo", "on_run_complete"),
    )
    return default_policy_table().with_rows({"projected": row})


def _rebuild_projection(source: ProjectionSource, old: Input) -> Input | None:
    content = old.content if isinstance(old, ProjectedInput) else ""
    return ProjectedInput.new(source.rule_id, source.source_event_id, content)


def crash_rebuilders() -> Rebuilders:
    """Rebuilds the workload's projected inputs from their projection source (S13)."""
    return Rebuilders(projection={RULE_ID: _rebuild_projection})


# =================================================================================== files


@dataclass(frozen=True, slots=True)
class Ack:
    """One line of the ack log: an acknowledgement the child received from ``accept``."""

    session: str
    index: int
    input_id: str
    ack: str  # accepted | deduplicated
    durability: str
    pid: int


def read_acks(path: Path | str) -> list[Ack]:
    """The ack log's lines in order. A torn last line (killed mid-write) is not an
    acknowledgement anyone received and is skipped."""
    p = Path(path)
    if not p.exists():
        return []
    out: list[Ack] = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            doc = json.loads(line)
            out.append(
                Ack(
                    str(doc["session"]),
                    int(doc["index"]),
                    str(doc["input_id"]),
                    str(doc["ack"]),
                    str(doc["durability"]),
                    int(doc["pid"]),
                )
            )
        except (ValueError, KeyError, TypeError):
            continue
    return out


@dataclass(frozen=True, slots=True)
class CommsAck:
    """One line of the comms ack log: a receipt ``comms_send`` returned to the child, written
    (one ``write``, ``fsync``-ed) only after the call returned. ``by`` is ``child`` for the
    workload's sends (``index`` is the input's index) and ``responder`` for the child's
    answers to requests (``index`` -1). ``target`` is the receiving session's id;
    ``request_id`` the request's id (a request's receipt, or the request a response answers);
    ``status`` a response's status."""

    by: str
    sender: str
    target: str
    kind: str  # message | request | response
    envelope_id: str
    request_id: str
    status: str
    index: int
    pid: int


def read_comms_acks(path: Path | str) -> list[CommsAck]:
    """The comms ack log's lines in order (a torn last line is skipped, as in ``read_acks``)."""
    p = Path(path)
    if not p.exists():
        return []
    out: list[CommsAck] = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            doc = json.loads(line)
            out.append(
                CommsAck(
                    str(doc["by"]),
                    str(doc["sender"]),
                    str(doc["target"]),
                    str(doc["kind"]),
                    str(doc["envelope_id"]),
                    str(doc.get("request_id") or ""),
                    str(doc.get("status") or ""),
                    int(doc["index"]),
                    int(doc["pid"]),
                )
            )
        except (ValueError, KeyError, TypeError):
            continue
    return out


@dataclass(frozen=True, slots=True)
class ToolExecution:
    """One line of the side-effect log: a kit tool (``lookup`` / ``lookup_sync``) started
    executing ``call_id`` of ``session`` in process ``pid``. The tool writes and ``fsync``-s
    the line before it does anything else, so an execution is on disk even if the process is
    killed right after it started."""

    session: str
    call_id: str
    tool: str
    pid: int


def read_tool_log(path: Path | str) -> list[ToolExecution]:
    """The side-effect log's lines in order, over every process of a trial. A torn last line
    (killed mid-write) is skipped: the tool had not yet done anything past logging."""
    p = Path(path)
    if not p.exists():
        return []
    out: list[ToolExecution] = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            doc = json.loads(line)
            out.append(
                ToolExecution(
                    str(doc["session"]), str(doc["call_id"]), str(doc["tool"]), int(doc["pid"])
                )
            )
        except (ValueError, KeyError, TypeError):
            continue
    return out


def read_outcomes(path: Path | str) -> dict[str, dict[str, Any]] | None:
    """Input id -> waiter outcome document, or None if the file is missing."""
    p = Path(path)
    if not p.exists():
        return None
    out: dict[str, dict[str, Any]] = {}
    for line in p.read_text(encoding="utf-8").splitlines():
        if line.strip():
            doc = json.loads(line)
            out[str(doc["input_id"])] = dict(doc["outcome"])
    return out


def read_reports(path: Path | str) -> list[dict[str, Any]]:
    """One entry per child that finished: its pid, recovery reports and rejections."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line]


def _append_durably(fd: int, doc: dict[str, Any]) -> None:
    os.write(fd, (json.dumps(doc, separators=(",", ":")) + "\n").encode("utf-8"))
    os.fsync(fd)


def _replace_file(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# =================================================================================== child


def child_main(spec: ChildSpec) -> int:
    """Run the child workload (see the module docstring); returns the exit code."""
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    return asyncio.run(_child(spec))


def crash_tools(
    scripts: Mapping[str, Sequence[dict[str, Any]]], tool_log: Path | str
) -> ToolRegistry:
    """The child's real application tools, ``lookup`` (async) and ``lookup_sync`` (run on
    the agent's tool threads), each with a ``q: int`` argument. Each execution first appends
    one line ``{"session", "call_id", "tool", "pid"}`` to ``tool_log`` (one ``write``,
    ``fsync``-ed before the tool goes on), then takes the duration its session's offline
    script (``scripts[session id]``) gives the call and returns the scripted result. So the
    log holds every execution of every process, including one killed while its tool ran."""
    # offline models only for ``tool_behaviour``: a pure lookup by call id
    behaviours = {sid: OfflineModel(script) for sid, script in scripts.items()}
    path = str(tool_log)

    def started(context: ToolContext, name: str) -> ToolBehaviour:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            _append_durably(
                fd,
                {
                    "session": context.session_id,
                    "call_id": context.call_id,
                    "tool": name,
                    "pid": os.getpid(),
                },
            )
        finally:
            os.close(fd)
        model = behaviours.get(context.session_id)
        if model is None:
            return ToolBehaviour(0.0, "ok")
        return model.tool_behaviour(ToolCall(id=context.call_id, name=name))

    async def lookup(q: int, context: ToolContext) -> str:
        """Look ``q`` up (the crash kit's async tool: logs its execution, then takes the
        scripted time)."""
        found = started(context, "lookup")
        await asyncio.sleep(found.duration)
        return found.result

    def lookup_sync(q: int, context: ToolContext) -> str:
        """Look ``q`` up (the crash kit's sync tool, run on a tool thread)."""
        found = started(context, "lookup_sync")
        time.sleep(found.duration)
        return found.result

    registry = ToolRegistry()
    registry.register(lookup)
    registry.register(lookup_sync)
    return registry


def _executor_factory(
    rt: Runtime, scripts: Mapping[str, list[dict[str, Any]]], tools: ToolRegistry
) -> Callable[[SessionRecord], CoreExecutor | None]:
    """Builds a session's agent from the spec's script (it wins over the stored one, so a
    restart may change timings), with the kit's tools and, for a session with a comms name,
    the comms tools over ``rt`` (as ``create_session`` builds it)."""
    comms: list[ToolRegistry] = []

    def factory(record: SessionRecord) -> CoreExecutor | None:
        script = scripts.get(record.session_id)
        if script is None:
            return None
        session_tools = tools
        if record.config.get("comms_name"):
            if not comms:
                comms.append(comms_tools(rt))
            session_tools = tools.merged(comms[0])
        return AgentExecutor(
            AgentConfig(offline_script=script), session_id=record.session_id, tools=session_tools
        )

    return factory


async def _child(spec: ChildSpec) -> int:
    scripts = {s.id: s.script for s in spec.sessions}
    # every session's agent gets them: the one create_session builds (through the Runtime)
    # and the executor factory's
    tools = crash_tools(scripts, spec.tool_log_path)
    config = RuntimeConfig(
        max_attempts=spec.max_attempts,
        backoff_base=spec.backoff_base,
        backoff_max=spec.backoff_max,
        shutdown_grace=spec.shutdown_grace,
    )

    def runtime(owner_id: str | None, recover_on_open: bool) -> Runtime:
        rt = Runtime(
            open_store(spec.store_url),
            policy=crash_policy(spec.derived_policy),
            config=config,
            rebuilders=crash_rebuilders(),
            lease_ttl=spec.lease_ttl,
            poll_interval=spec.poll_interval,
            owner_id=owner_id,
            recover_on_open=recover_on_open,
            tools=tools,
        )
        rt.executor_factory = _executor_factory(rt, scripts, tools)
        return rt

    primary = runtime(spec.owner_id, True)
    second: Runtime | None = None
    if any(s.secondary for s in spec.sessions):
        # a second owner in the same process: what it sends to the primary's sessions, and
        # they to it, crosses the durable inbox (S10); one SIGKILL kills both
        second = runtime(None if spec.owner_id is None else f"{spec.owner_id}.second", False)
    owners = {s.id: (second if s.secondary and second else primary) for s in spec.sessions}
    # every id acknowledged to any process of this trial is waited for (S12: also after a
    # restart); dict keeps first-ack order
    waiting: dict[str, str] = {a.input_id: a.session for a in read_acks(spec.ack_log)}
    rejected: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []
    unsettled: str | None = None
    async with contextlib.AsyncExitStack() as stack:
        if second is not None:
            # the second runtime takes its sessions first (the primary recovers every session
            # with pending inputs when it opens, and would take them too)
            await stack.enter_async_context(second)
            await _claim(second, [s for s in spec.sessions if s.secondary], spec)
        await stack.enter_async_context(primary)
        for s in spec.sessions:
            if not s.secondary or second is None:
                await _ensure_session(primary, s)
        fd = os.open(spec.ack_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        comms_fd = os.open(spec.comms_log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        stack.callback(os.close, comms_fd)
        final = asyncio.Event()
        stop = asyncio.Event()
        responder: asyncio.Task[None] | None = None
        if spec.uses_comms:
            responder = asyncio.create_task(
                _responder(spec, owners, comms_fd, final, stop, refused), name="crash-responder"
            )
            # stopped before the ack log's descriptor is closed (the stack unwinds in reverse)
            stack.push_async_callback(_cancel, responder)
        try:
            for sid, index, ispec in spec.accept_order():
                if ispec.type in COMMS_INPUT_TYPES:
                    await _send(spec, owners[sid], sid, index, ispec, comms_fd, refused)
                    if spec.accept_gap > 0:
                        await asyncio.sleep(spec.accept_gap)
                    continue
                inp = input_for(sid, index, ispec)
                outcome = await owners[sid].accept(sid, inp)
                if isinstance(outcome, Rejected):
                    rejected.append(
                        {
                            "session": sid,
                            "index": index,
                            "code": outcome.code.value,
                            "reason": outcome.reason,
                        }
                    )
                    continue
                iid = outcome.existing_id if isinstance(outcome, Deduplicated) else outcome.input_id
                # the acknowledgement is recorded only after accept returned
                _append_durably(
                    fd,
                    {
                        "session": sid,
                        "index": index,
                        "input_id": str(iid),
                        "ack": outcome.outcome_type,
                        "durability": inp.header.durability.value,
                        "pid": os.getpid(),
                    },
                )
                waiting.setdefault(str(iid), sid)
                if spec.accept_gap > 0:
                    await asyncio.sleep(spec.accept_gap)
        finally:
            os.close(fd)
        docs = await asyncio.gather(
            *(
                _outcome_doc(owners.get(sid, primary), sid, iid, spec.wait_timeout)
                for iid, sid in waiting.items()
            )
        )
        lines = [
            json.dumps({"session": sid, "input_id": iid, "outcome": doc}, separators=(",", ":"))
            for (iid, sid), doc in zip(waiting.items(), docs, strict=True)
        ]
        if responder is not None:
            final.set()  # answer every open request at once
            unsettled = await _settle(spec, primary, responder)
            stop.set()
            await responder
            lines.extend(await _comms_outcomes(spec, owners, primary))
        _replace_file(Path(spec.outcomes), "".join(line + "\n" for line in lines))
        fd = os.open(spec.report, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            _append_durably(
                fd,
                {
                    "pid": os.getpid(),
                    "recovery_reports": {
                        **(second.recovery_reports if second is not None else {}),
                        **primary.recovery_reports,
                    },
                    "rejected": rejected,
                    "comms_refused": refused,
                    "comms_unsettled": unsettled,
                },
            )
        finally:
            os.close(fd)
    return 0


async def _cancel(task: asyncio.Task[None]) -> None:
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _ensure_session(rt: Runtime, s: SessionSpec) -> None:
    try:
        await rt.get_session(s.id)
    except SessionNotFoundError:
        await rt.create_session(session_id=s.id, offline_script=s.script, comms_name=s.comms_name)


async def _claim(rt: Runtime, sessions: Sequence[SessionSpec], spec: ChildSpec) -> None:
    """Create (or load) the second runtime's sessions and take their leases, waiting for a
    killed predecessor's to expire (an owner id of its own: a ``takeover`` trial)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2 * spec.lease_ttl + 1.0
    for s in sessions:
        await _ensure_session(rt, s)
        while loop.time() < deadline:
            if await rt.load(s.id) is not None:
                break
            await asyncio.sleep(spec.poll_interval)


async def _send(
    spec: ChildSpec,
    rt: Runtime,
    sid: str,
    index: int,
    ispec: InputSpec,
    fd: int,
    refused: list[dict[str, Any]],
) -> None:
    """A workload comms send (``comms_message`` / ``comms_request``) with the same envelope id
    in every process; the receipt goes to the comms ack log after ``comms_send`` returned."""
    kind = "message" if ispec.type == "comms_message" else "request"
    target = spec.session_named(ispec.to) or ""
    envelope = envelope_for(sid, index)
    text = ispec.text or f"{sid} {kind} {index}"
    for attempt in range(5):
        try:
            if kind == "message":
                receipt = await rt.comms_send(
                    sid, kind="message", to=ispec.to, body=text, envelope_id=envelope
                )
            else:
                receipt = await rt.comms_send(
                    sid,
                    kind="request",
                    to=ispec.to,
                    intent=text,
                    params={"index": index},
                    envelope_id=envelope,
                )
        except InvalidArgumentError as exc:  # the caller's fault: never expected here
            refused.append(_refusal("child", sid, index, kind, envelope, exc))
            return
        except InvalidOperationError as exc:  # not ready (recovering) or queue full: retry
            if attempt == 4:
                refused.append(_refusal("child", sid, index, kind, envelope, exc))
                return
            await asyncio.sleep(spec.poll_interval)
            continue
        _append_durably(
            fd,
            {
                "by": "child",
                "sender": sid,
                "target": target,
                "kind": kind,
                "envelope_id": envelope,
                "request_id": receipt.get("interaction_id"),
                "status": None,
                "index": index,
                "pid": os.getpid(),
            },
        )
        return


def _refusal(
    by: str, sid: str, index: int, kind: str, envelope: str, exc: Exception
) -> dict[str, Any]:
    return {
        "by": by,
        "session": sid,
        "index": index,
        "kind": kind,
        "envelope_id": envelope,
        "error": type(exc).__name__,
        "reason": str(exc),
    }


def _requests_at(states: Iterable[InputState]) -> Iterator[tuple[str, str]]:
    """(request id, requester session id) of every request input among ``states``."""
    for st in states:
        inp = st.persisted_input
        if isinstance(inp, PeerInput) and isinstance(inp.convention, RequestConvention):
            src = inp.header.source
            if isinstance(src, PeerOrigin) and src.runtime_id is not None:
                yield inp.convention.request_id, src.runtime_id.value


async def _responder(
    spec: ChildSpec,
    owners: Mapping[str, Runtime],
    fd: int,
    final: asyncio.Event,
    stop: asyncio.Event,
    refused: list[dict[str, Any]],
) -> None:
    """The application behind every comms session: it answers each request delivered to the
    session (once its input is in the session's states) with a progress response
    (``accepted``) and a terminal one (``completed``), each with ``answer_envelope(...)`` and
    its receipt in the comms ack log. It skips a request something else (the session's agent)
    already closed, and re-sends its own after a restart (deduplicated); a refusal is
    recorded. Runs until ``stop``; after ``final`` it answers without ``answer_after``."""
    loop = asyncio.get_running_loop()
    answered: set[str] = set()
    seen: dict[str, float] = {}
    sessions = [s for s in spec.sessions if s.comms_name]
    while not stop.is_set():
        for s in sessions:
            rt = owners[s.id]
            # keep the session loaded, as the application running it would: a killed
            # predecessor's lease (a takeover trial) expires meanwhile, and a session only
            # its inbox feeds is otherwise taken over by nobody (the next process to touch it
            # does; see the README)
            await rt.load(s.id)
            for rid, requester in _requests_at(await rt.store.load_input_states(s.id)):
                if rid in answered:
                    continue
                first = seen.setdefault(rid, loop.time())
                if not final.is_set() and loop.time() - first < s.answer_after:
                    continue
                rec = await rt.store.load_peer_request(requester, rid)
                mine = answer_envelope(rid, "completed")
                closed = rec is not None and rec.closed_at is not None
                if closed and rec is not None and rec.closed_by != mine:
                    answered.add(rid)  # answered by the session's agent
                    continue
                # closed by its own terminal response (before a crash): re-send only that one
                # (deduplicated; progress after the close would be refused)
                statuses = ("completed",) if closed else ("accepted", "completed")
                if await _answer(rt, s.id, rid, requester, statuses, fd, refused):
                    answered.add(rid)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), spec.poll_interval)


async def _answer(
    rt: Runtime,
    sid: str,
    rid: str,
    requester: str,
    statuses: Sequence[str],
    fd: int,
    refused: list[dict[str, Any]],
) -> bool:
    """Send the responder's responses to ``rid``; False to try again later."""
    for status in statuses:
        envelope = answer_envelope(rid, status)
        result = {"answered_by": "responder"} if status == "completed" else None
        try:
            await rt.comms_send(
                sid,
                kind="response",
                in_reply_to=rid,
                status=status,
                result=result,
                envelope_id=envelope,
            )
        except InvalidArgumentError as exc:
            # progress after the request closed (its terminal response was accepted before a
            # crash, or the agent answered meanwhile) is refused: expected; recorded
            refused.append(_refusal("responder", sid, -1, f"response:{status}", envelope, exc))
            continue
        except InvalidOperationError:
            return False  # not ready: the next pass tries again
        _append_durably(
            fd,
            {
                "by": "responder",
                "sender": sid,
                "target": requester,
                "kind": "response",
                "envelope_id": envelope,
                "request_id": rid,
                "status": status,
                "index": -1,
                "pid": os.getpid(),
            },
        )
    return True


async def _settle(spec: ChildSpec, rt: Runtime, responder: asyncio.Task[None]) -> str | None:
    """Wait until comms are quiet: every input of the comms sessions terminal, their inboxes
    empty, every request delivered to them closed (twice in a row, ``wait_timeout`` at most).
    None when they settled, else what was still busy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + spec.wait_timeout
    sessions = [s.id for s in spec.sessions if s.comms_name]
    quiet = 0
    busy: str | None = None
    while loop.time() < deadline and not responder.done():
        busy = await _busy(rt, sessions)
        quiet = 0 if busy else quiet + 1
        if quiet >= 2:
            return None
        await asyncio.sleep(spec.poll_interval)
    if responder.done():
        responder.result()  # a fault of the responder: raised, the child fails
    return busy


async def _busy(rt: Runtime, sessions: Sequence[str]) -> str | None:
    for sid in sessions:
        states = await rt.store.load_input_states(sid)
        pending = [f"{st.input_id} {st.current_state.value}" for st in states if not st.is_terminal]
        if pending:
            return f"{sid} has pending inputs ({', '.join(pending)})"
        if await rt.store.inbox_entries(sid):
            return f"the inbox of {sid} is not empty"
        for rid, requester in _requests_at(states):
            rec = await rt.store.load_peer_request(requester, rid)
            if rec is not None and rec.outstanding:
                return f"request {rid} delivered to {sid} is not closed"
    return None


async def _comms_outcomes(spec: ChildSpec, owners: Mapping[str, Runtime], rt: Runtime) -> list[str]:
    """Outcome lines for the inputs every acknowledged comms send delivered (found at the
    target by its envelope id), from every process of the trial."""
    acked: dict[tuple[str, str], CommsAck] = {}
    for a in read_comms_acks(spec.comms_log_path):
        acked.setdefault((a.target, a.envelope_id), a)
    found: dict[tuple[str, str], str] = {}
    for target in {t for t, _ in acked}:
        for st in await rt.store.load_input_states(target):
            inp = st.persisted_input
            if inp is not None and inp.header.correlation_id is not None:
                found.setdefault((target, str(inp.header.correlation_id)), str(st.input_id))
    keys = [k for k in acked if k in found]
    docs = await asyncio.gather(
        *(_outcome_doc(owners.get(t, rt), t, found[(t, e)], spec.wait_timeout) for t, e in keys)
    )
    return [
        json.dumps(
            {"session": t, "input_id": found[(t, e)], "envelope_id": e, "outcome": doc},
            separators=(",", ":"),
        )
        for (t, e), doc in zip(keys, docs, strict=True)
    ]


async def _outcome_doc(rt: Runtime, sid: str, iid: str, timeout: float) -> dict[str, Any]:
    try:
        outcome = await rt.wait(sid, iid, timeout)
    except TimeoutError:
        return {"outcome_type": "timeout", "after_seconds": timeout}
    except InputNotFoundError as exc:
        return {"outcome_type": "not_found", "error": str(exc)}
    return outcome.to_json_dict()


# ============================================================================ launching


class _Child(Protocol):
    pid: int | None

    def wait(self, timeout: float | None) -> int | None: ...

    def kill(self) -> None: ...


def _child_env(crash_at: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MEERKAT_CRASH_AT", None)
    if crash_at:
        env["MEERKAT_CRASH_AT"] = crash_at
    return env


class _SpawnedChild:
    """``python -m meerkat_runtime.crashtest child @spec.json`` in a fresh interpreter."""

    def __init__(self, spec_path: Path, crash_at: str | None, log_path: Path) -> None:
        with open(log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "meerkat_runtime.crashtest", "child", f"@{spec_path}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_child_env(crash_at),
            )
        self.pid: int | None = self._proc.pid

    def wait(self, timeout: float | None) -> int | None:
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGKILL)


def _arm(crash_at: str | None) -> None:
    """In a forked child: what a fresh interpreter does at import, i.e. read the crash point
    from ``MEERKAT_CRASH_AT`` and seed the id generator (a fork copies its state)."""
    if crash_at:
        os.environ["MEERKAT_CRASH_AT"] = crash_at
    else:
        os.environ.pop("MEERKAT_CRASH_AT", None)
    _crash._target = _crash._parse(crash_at)
    _crash._seen = 0
    _ids._rand.seed(os.urandom(16))
    random.seed()


def _zygote_child(spec_json: str, crash_at: str | None, log_path: str) -> int:
    """Runs in the freshly forked child of the zygote; never returns (``os._exit``)."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        _arm(crash_at)
        code = child_main(ChildSpec.from_json(spec_json))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _zygote_main() -> int:
    """The zygote: a single-threaded process that has imported the runtime once and forks a
    child per request, so children start in milliseconds instead of half a second.

    Protocol (JSON lines): it writes ``{"ready": pid}``; then reads
    ``{"start": id, "spec": json, "crash_at": str|null, "log": path}`` (answered
    ``{"started": id, "pid": pid}``) and ``{"kill": pid}`` (SIGKILL, sent only while the child
    is not reaped, so a recycled pid is never hit); it reports every child's end as
    ``{"exited": pid, "code": returncode}`` (-9: SIGKILL). At end of input it kills the
    children still running, reaps them and exits.
    """
    # what the children's stores need, imported once here rather than in every child (no
    # connection is made before the fork: each child connects on its own)
    importlib.import_module("meerkat_runtime.store.sqlite")
    with contextlib.suppress(ImportError):
        importlib.import_module("meerkat_runtime.store.postgres")
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    live: set[int] = set()

    def send(doc: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()

    def reap() -> None:
        while live:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            live.discard(pid)
            send({"exited": pid, "code": os.waitstatus_to_exitcode(status)})

    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ, "in")
    sel.register(wake_r, selectors.EVENT_READ, "chld")
    send({"ready": os.getpid()})
    buf = b""
    eof = False
    while not eof or live:
        for key, _ in sel.select(timeout=0.5):
            if key.data == "chld":
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
                continue
            data = os.read(0, 1 << 20)
            if not data:
                eof = True
                sel.unregister(0)
                for pid in live:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                continue
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                cmd = json.loads(line)
                if "kill" in cmd:
                    if cmd["kill"] in live:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(cmd["kill"]), signal.SIGKILL)
                    continue
                pid = os.fork()
                if pid == 0:
                    sel.close()
                    os.close(wake_r)
                    os.close(wake_w)
                    _zygote_child(str(cmd["spec"]), cmd.get("crash_at"), str(cmd["log"]))
                live.add(pid)
                send({"started": cmd["start"], "pid": pid})
        reap()
    return 0


class Zygote:
    """The parent's handle on a zygote process (see ``_zygote_main``); thread-safe."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "meerkat_runtime.crashtest", "zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=_child_env(None),
        )
        self._write_lock = threading.Lock()
        self._cond = threading.Condition()
        self._started: dict[int, int] = {}
        self._exited: dict[int, int] = {}
        self._ready = False
        self._dead = False
        self._next = 0
        self._reader = threading.Thread(target=self._read, name="crashtest-zygote", daemon=True)
        self._reader.start()
        with self._cond:
            self._cond.wait_for(lambda: self._ready or self._dead, 60.0)
            if not self._ready:
                raise RuntimeError("the crashtest zygote did not start")

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            doc = json.loads(line)
            with self._cond:
                if "started" in doc:
                    self._started[int(doc["started"])] = int(doc["pid"])
                elif "exited" in doc:
                    self._exited[int(doc["exited"])] = int(doc["code"])
                elif "ready" in doc:
                    self._ready = True
                self._cond.notify_all()
        with self._cond:
            self._dead = True
            self._cond.notify_all()

    @property
    def alive(self) -> bool:
        return not self._dead and self._proc.poll() is None

    def _send(self, doc: dict[str, Any]) -> None:
        assert self._proc.stdin is not None
        with self._write_lock:
            self._proc.stdin.write((json.dumps(doc) + "\n").encode("utf-8"))
            self._proc.stdin.flush()

    def start(self, spec: ChildSpec, crash_at: str | None, log_path: Path) -> int:
        with self._write_lock:
            rid = self._next
            self._next += 1
        self._send(
            {"start": rid, "spec": spec.to_json(), "crash_at": crash_at, "log": str(log_path)}
        )
        with self._cond:
            self._cond.wait_for(lambda: rid in self._started or self._dead, 60.0)
            if rid not in self._started:
                raise RuntimeError("the crashtest zygote died")
            return self._started.pop(rid)

    def wait(self, pid: int, timeout: float | None) -> int | None:
        with self._cond:
            self._cond.wait_for(lambda: pid in self._exited or self._dead, timeout)
            return self._exited.get(pid)

    def kill(self, pid: int) -> None:
        with contextlib.suppress(OSError):
            self._send({"kill": pid})

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self._proc.stdin is not None:
                self._proc.stdin.close()
        try:
            self._proc.wait(15.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


_zygote_lock = threading.Lock()
_zygote: Zygote | None = None


def _shared_zygote() -> Zygote:
    global _zygote
    with _zygote_lock:
        if _zygote is None or not _zygote.alive:
            _zygote = Zygote()
            atexit.register(_zygote.close)
        return _zygote


class _ForkedChild:
    """A child forked by the zygote: a real process, started in milliseconds."""

    def __init__(self, spec: ChildSpec, crash_at: str | None, log_path: Path) -> None:
        self._zygote = _shared_zygote()
        self.pid: int | None = self._zygote.start(spec, crash_at, log_path)

    def wait(self, timeout: float | None) -> int | None:
        assert self.pid is not None
        return self._zygote.wait(self.pid, timeout)

    def kill(self) -> None:
        assert self.pid is not None
        self._zygote.kill(self.pid)


def _launch(spec: ChildSpec, crash_at: str | None, launcher: Launcher, log_path: Path) -> _Child:
    if launcher == "spawn":
        spec_path = Path(spec.db).with_name("spec.json")
        spec_path.write_text(spec.to_json(), encoding="utf-8")  # this launch's spec
        return _SpawnedChild(spec_path, crash_at, log_path)
    return _ForkedChild(spec, crash_at, log_path)


@dataclass(slots=True)
class ChildRun:
    """How one child process ended: ``returncode`` (-9: SIGKILL), whether the parent sent
    the kill, whether it hung (killed after ``timeout``), its log and how long it ran."""

    returncode: int
    parent_killed: bool
    hung: bool
    elapsed: float
    log: Path

    @property
    def sigkilled(self) -> bool:
        return self.returncode == -signal.SIGKILL

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def run_child(
    spec: ChildSpec,
    crash_at: str | None = None,
    *,
    kill_after: float | None = None,
    kill_when: Callable[[], bool] | None = None,
    timeout: float = 60.0,
    launcher: Launcher = "spawn",
    log_name: str = "child.log",
) -> ChildRun:
    """Run one child to its end: armed with ``crash_at`` (``point:n``), killed by the parent
    with SIGKILL after ``kill_after`` seconds, or as soon as ``kill_when()`` (polled about
    every millisecond, e.g. on the side-effect log) is true, or none of these; a child still
    running after ``timeout`` is killed and reported ``hung``."""
    log_path = Path(spec.db).with_name(log_name)
    start = time.monotonic()
    child = _launch(spec, crash_at, launcher, log_path)
    parent_killed = hung = False
    code: int | None = None
    if kill_after is not None:
        code = child.wait(kill_after)
        if code is None:
            child.kill()
            parent_killed = True
    elif kill_when is not None:
        while code is None and time.monotonic() - start < timeout:
            if kill_when():
                child.kill()
                parent_killed = True
                break
            code = child.wait(0.001)
    if code is None:
        code = child.wait(timeout)
    if code is None:
        child.kill()
        hung = True
        code = child.wait(10.0)
    return ChildRun(
        returncode=-999 if code is None else code,
        parent_killed=parent_killed,
        hung=hung,
        elapsed=time.monotonic() - start,
        log=log_path,
    )


# =============================================================================== reading


@dataclass(slots=True)
class StoredInput:
    runtime_id: str
    input_id: str
    current_state: str
    is_terminal: bool
    last_run_id: str | None
    state_json: str

    def state(self) -> InputState:
        return InputState.from_json(self.state_json)


@dataclass(slots=True)
class StoredRow:
    runtime_id: str
    index: int
    run_id: str | None
    input_ids: list[str]
    message: dict[str, Any]
    digest: bytes


@dataclass(slots=True)
class StoredPeerRequest:
    """A row of ``peer_requests`` (S20); times in microseconds since the epoch."""

    requester: str
    request_id: str
    responder: str
    envelope_id: str
    created_us: int
    status: str | None = None
    closed_us: int | None = None
    closed_by: str | None = None

    @property
    def outstanding(self) -> bool:
        return self.closed_us is None


@dataclass(slots=True)
class StoredInboxEntry:
    seq: int
    runtime_id: str
    input_json: str


@dataclass(slots=True)
class DbView:
    """What the store holds, read with a read-only connection by a ``DbReader`` (never
    through the runtime or the store under test, so a bug in their reads cannot hide one in
    their writes); the same values whatever the store (see ``_build_view``)."""

    inputs: dict[str, StoredInput] = field(default_factory=dict)
    rows: list[StoredRow] = field(default_factory=list)
    runs: dict[str, RunRecord] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    comms_names: dict[str, str] = field(default_factory=dict)  # session id -> comms name
    peer_requests: dict[tuple[str, str], StoredPeerRequest] = field(default_factory=dict)
    inbox: list[StoredInboxEntry] = field(default_factory=list)

    def rows_naming(self, input_id: str) -> list[StoredRow]:
        return [r for r in self.rows if input_id in r.input_ids]

    def tool_results(self, runtime_id: str | None = None) -> Counter[str]:
        """tool_call_id -> number of tool result rows."""
        return Counter(
            str(r.message.get("tool_call_id"))
            for r in self.rows
            if r.message.get("role") == "tool" and runtime_id in (None, r.runtime_id)
        )

    def tool_calls(self, runtime_id: str | None = None) -> Counter[str]:
        """tool call id -> number of assistant messages making that call."""
        return Counter(
            str(call.get("id"))
            for r in self.rows
            if r.message.get("role") == "assistant" and runtime_id in (None, r.runtime_id)
            for call in r.message.get("tool_calls", [])
        )

    def recovery_reports(self, runtime_id: str | None = None) -> list[dict[str, Any]]:
        """The data of every stored ``recovery.completed`` event, in order."""
        out = []
        for ev in self.events:
            body = ev.get("event", {})
            data = body.get("data") or {}
            if (
                body.get("category") == "recovery"
                and data.get("code") == "completed"
                and runtime_id in (None, ev.get("runtime_id"))
            ):
                out.append(dict(data))
        return out

    def terminal_states(self) -> dict[str, str]:
        return {i: s.state_json for i, s in self.inputs.items() if s.is_terminal}


def _connect_ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)


def _connect_query_only(path: Path) -> sqlite3.Connection:
    """For a file a read-only connection cannot open: a killed writer can leave a WAL whose
    index must be rebuilt first, which SQLite does only on a connection that may write. The
    rebuild changes no data; ``query_only`` keeps this connection from writing any."""
    conn = sqlite3.connect(str(path), timeout=10.0)
    conn.execute("PRAGMA query_only = ON")
    return conn


class DbReader(Protocol):
    """Reads a store's tables into a ``DbView``: read-only, in one snapshot, never through the
    runtime or the store under test (a bug in their reads must not hide one in their writes).

    Invariant: every reader fills the view with the same values for the same stored data
    (``_build_view`` does it for all of them), so the checks are the same on every store; and
    ``read`` returns an empty view only when there are no tables to read yet (a child killed
    before the store created its schema), never to hide a failed read."""

    def read(self) -> DbView: ...


_SqliteRows = list[tuple[Any, ...]]


class SqliteReader:
    """The SQLite file ``path``: a ``mode=ro`` connection (``query_only`` when a killed writer
    left a WAL index that only a connection that may write can rebuild), one read
    transaction. A missing file reads as an empty view."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"SqliteReader({str(self.path)!r})"

    def read(self) -> DbView:
        if not self.path.exists():
            return DbView()
        try:
            return self._read(_connect_ro(self.path))
        except sqlite3.OperationalError as exc:
            if "readonly" not in str(exc) and "read-only" not in str(exc):
                raise
        return self._read(_connect_query_only(self.path))

    @staticmethod
    def _read(conn: sqlite3.Connection) -> DbView:
        try:
            conn.execute("BEGIN")  # one snapshot
            try:
                inputs = conn.execute(_SELECT_INPUTS).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return DbView()
                raise
            rows = [
                (rid, idx, run_id, json.loads(ids), message, digest)
                for rid, idx, run_id, ids, message, digest in conn.execute(_SELECT_ROWS).fetchall()
            ]
            runs = conn.execute(_SELECT_RUNS).fetchall()
            events = conn.execute(_SELECT_EVENTS).fetchall()
            inbox = conn.execute(_SELECT_INBOX).fetchall()
            sessions = [(sid, json.loads(c)) for sid, c in conn.execute(_SELECT_SESSIONS)]
            try:
                requests: _SqliteRows = conn.execute(_SELECT_PEER_REQUESTS).fetchall()
            except sqlite3.OperationalError as exc:  # a database from before schema 3
                if "no such table" not in str(exc):
                    raise
                requests = []
            conn.execute("COMMIT")
        finally:
            conn.close()
        # times are stored as microseconds since the epoch already
        return _build_view(inputs, rows, runs, events, inbox, sessions, requests)


class PostgresReader:
    """The PostgreSQL database of ``url``, in the schema its ``search_path`` selects (the
    store's tables live in the connection's current schema): one psycopg connection, one
    ``REPEATABLE READ READ ONLY`` transaction (one snapshot), rolled back. A schema without
    the store's tables reads as an empty view; a URL whose ``search_path`` names no existing
    schema raises ``StoreError`` (it would read as empty too). What PostgreSQL types
    differently from SQLite is converted to SQLite's values: ``text[]`` input ids are lists
    already, ``jsonb`` session configs dicts already, ``timestamptz`` times become
    microseconds since the epoch.

    A killed child's last transactions are decided by the server: one whose ``COMMIT`` was
    sent may land just after a read made right after the kill (never one the child was told
    had committed: a crash point after a commit passes once it returned, one before a commit
    before it was submitted; but another session's commit, or one in flight at a ``random``
    kill, may). Such a snapshot holds fewer terminal states, so (d) checks less at that kill;
    it never reports a violation that is not one."""

    def __init__(self, url: str, *, connect_timeout: float = 10.0) -> None:
        self.url = url
        self.connect_timeout = connect_timeout

    def __repr__(self) -> str:
        return f"PostgresReader({redact_url(self.url)!r})"

    def read(self) -> DbView:
        import psycopg

        with psycopg.connect(
            _libpq_url(self.url), connect_timeout=max(1, int(self.connect_timeout))
        ) as conn:
            conn.read_only = True
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            try:
                return self._read(conn)
            finally:
                conn.rollback()

    def _read(self, conn: psycopg.Connection[tuple[Any, ...]]) -> DbView:
        schema = conn.execute("SELECT current_schema()").fetchone()
        if schema is None or schema[0] is None:
            raise StoreError(
                f"store {redact_url(self.url)}: no schema of its search_path exists, nothing "
                "to read"
            )
        found = conn.execute(
            "SELECT to_regclass('input_states') IS NOT NULL,"
            " to_regclass('peer_requests') IS NOT NULL"
        ).fetchone()
        if found is None or not found[0]:
            return DbView()
        inputs = conn.execute(_SELECT_INPUTS).fetchall()
        rows = conn.execute(_SELECT_ROWS).fetchall()
        runs = conn.execute(_SELECT_RUNS).fetchall()
        events = conn.execute(_SELECT_EVENTS).fetchall()
        inbox = conn.execute(_SELECT_INBOX).fetchall()
        sessions = conn.execute(_SELECT_SESSIONS).fetchall()
        requests = [
            (req, rid, resp, env, _us(created), status, None if closed is None else _us(closed), by)
            for req, rid, resp, env, created, status, closed, by in (
                conn.execute(_SELECT_PEER_REQUESTS).fetchall() if found[1] else []
            )
        ]
        return _build_view(inputs, rows, runs, events, inbox, sessions, requests)


# the same statements on every store: ids sort bytewise on both (SQLite's BINARY collation,
# PostgreSQL's COLLATE "C" columns)
_SELECT_INPUTS = (
    "SELECT runtime_id, input_id, current_state, is_terminal, last_run_id, state_json"
    " FROM input_states ORDER BY runtime_id, input_id"
)
_SELECT_ROWS = (
    "SELECT runtime_id, idx, run_id, input_ids, message, digest FROM conversation_rows"
    " ORDER BY runtime_id, idx"
)
_SELECT_RUNS = (
    "SELECT run_id, runtime_id, status, result_json, error, is_continuation FROM runs"
    " ORDER BY run_id"
)
_SELECT_EVENTS = "SELECT event_json FROM events ORDER BY runtime_id, seq"
_SELECT_INBOX = "SELECT seq, runtime_id, input_json FROM inbox ORDER BY seq"
_SELECT_SESSIONS = "SELECT session_id, config FROM sessions ORDER BY session_id"
_SELECT_PEER_REQUESTS = (
    "SELECT requester_runtime_id, request_id, responder_runtime_id, envelope_id,"
    " created_at, status, closed_at, closed_by FROM peer_requests"
    " ORDER BY requester_runtime_id, request_id"
)


def _build_view(
    inputs: Iterable[Sequence[Any]],
    rows: Iterable[Sequence[Any]],
    runs: Iterable[Sequence[Any]],
    events: Iterable[Sequence[Any]],
    inbox: Iterable[Sequence[Any]],
    sessions: Iterable[Sequence[Any]],
    requests: Iterable[Sequence[Any]],
) -> DbView:
    """The view of the rows a reader selected (``_SELECT_*``, in that column order), with
    conversation input ids as lists, session configs as dicts and peer request times as
    microseconds since the epoch (each reader converts its database's types to these)."""
    view = DbView()
    for rid, iid, cur, term, last, js in inputs:
        view.inputs[iid] = StoredInput(rid, iid, cur, bool(term), last, js)
    for rid, idx, run_id, ids, message, digest in rows:
        view.rows.append(
            StoredRow(rid, int(idx), run_id, [str(i) for i in ids], json.loads(message), digest)
        )
    for run_id, rid, status, result_json, error, cont in runs:
        view.runs[run_id] = RunRecord(
            RunId(run_id),
            rid,
            status,
            RunResult.from_json(result_json) if result_json is not None else None,
            error,
            bool(cont),
        )
    view.events = [json.loads(js) for (js,) in events]
    for seq, rid, js in inbox:
        view.inbox.append(StoredInboxEntry(int(seq), rid, js))
    for sid, config in sessions:
        name = config.get("comms_name") if isinstance(config, dict) else None
        if isinstance(name, str) and name:
            view.comms_names[sid] = name
    for req, rid, resp, env, created, status, closed, closed_by in requests:
        view.peer_requests[(req, rid)] = StoredPeerRequest(
            req, rid, resp, env, int(created), status, closed, closed_by
        )
    return view


def _is_pg_url(location: str) -> bool:
    scheme, sep, _ = location.partition("://")
    scheme = scheme.lower()
    return bool(sep) and (scheme in ("postgresql", "postgres") or scheme.startswith("postgresql+"))


def reader_for(location: Path | str) -> DbReader:
    """The reader of a store location: a ``postgresql://`` URL (also ``postgres://`` and
    ``postgresql+psycopg://``) reads PostgreSQL; a ``sqlite:///`` URL (as ``open_store``
    parses it) or a file path reads SQLite. Raises ``ValueError`` for a store no other
    process can read (``memory://``) or a URL ``open_store`` does not accept."""
    if isinstance(location, Path) or "://" not in location:
        return SqliteReader(location)
    if _is_pg_url(location):
        return PostgresReader(location)
    try:
        store = open_store(location)  # parses the URL; opens nothing
    except StoreError as exc:
        raise ValueError(str(exc)) from exc
    if isinstance(store, SqliteStore):
        return SqliteReader(store.path)
    raise ValueError(
        f"the crash kit cannot read {redact_url(location)!r} from another process; use a "
        "sqlite:/// or postgresql:// store"
    )


def read_db(location: Path | str) -> DbView:
    """Everything the checks need from the store at ``location`` (a SQLite file path, a
    ``sqlite:///`` or a ``postgresql://`` URL, e.g. ``spec.store_url``; see ``reader_for``),
    read-only, in one snapshot; empty if it does not exist yet, or its child was killed
    before the schema was created."""
    return reader_for(location).read()


def terminal_snapshot(location: Path | str) -> dict[str, str]:
    """input id -> stored state JSON of every terminal input (read-only, see ``read_db``)."""
    return read_db(location).terminal_states()


# ============================================================================ PostgreSQL


def _libpq_url(url: str) -> str:
    """What libpq understands: a ``postgresql+driver://`` URL (SQLAlchemy style) loses its
    driver."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower().startswith("postgresql+"):
        return f"postgresql://{rest}"
    return url


def pg_schema_url(url: str, schema: str) -> str:
    """``url`` whose connections use ``schema`` (and only it): libpq's
    ``options=-csearch_path=<schema>``, appended to any ``options`` the URL has (the last
    setting wins)."""
    parts = urlsplit(url)
    option = f"-csearch_path={schema}"
    query: list[tuple[str, str]] = []
    added = False
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "options" and not added:
            value, added = f"{value} {option}".strip(), True
        query.append((key, value))
    if not added:
        query.append(("options", option))
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))


def _pg_error(url: str, what: str, exc: Exception) -> StoreError:
    text = (str(exc) or type(exc).__name__).strip().splitlines()[0]
    return StoreError(f"store {redact_url(url)}: {what}: {text}")


def check_pg(url: str) -> None:
    """Raise ``StoreError`` (naming the server, password redacted) unless ``url`` is a
    PostgreSQL URL whose database answers."""
    import psycopg

    if not _is_pg_url(url):
        raise StoreError(f"{redact_url(url)!r} is not a postgresql:// URL")
    try:
        with psycopg.connect(_libpq_url(url), autocommit=True, connect_timeout=10) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        raise _pg_error(url, "cannot connect", exc) from exc


def create_pg_schema(url: str, schema: str) -> str:
    """Create the empty schema ``schema`` in the database of ``url`` and return the URL
    selecting it (``pg_schema_url``), where a store creates its tables when it is first
    opened. Raises ``StoreError`` if it cannot (e.g. the schema exists)."""
    import psycopg
    from psycopg import sql

    try:
        with psycopg.connect(_libpq_url(url), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    except psycopg.Error as exc:
        raise _pg_error(url, f"cannot create schema {schema}", exc) from exc
    return pg_schema_url(url, schema)


def drop_pg_schema(url: str, schema: str, *, lock_timeout: float = 30.0) -> str | None:
    """Drop ``schema`` and everything in it from the database of ``url`` (nothing if it does
    not exist). None when done, else why not (it is left as it was then): waits at most
    ``lock_timeout`` seconds for a connection still using its tables."""
    import psycopg
    from psycopg import sql

    try:
        with psycopg.connect(_libpq_url(url), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f"SET lock_timeout = {max(1, int(lock_timeout * 1000))}")
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    except psycopg.Error as exc:
        return str(_pg_error(url, f"cannot drop schema {schema}", exc))
    return None


# ================================================================================ checks


def _expected_outcome(db: DbView, iid: str, depth: int = 0) -> dict[str, Any] | None:
    """S12's outcome for a stored input, from its stored state and its last run."""
    stored = db.inputs.get(iid)
    if stored is None or depth > 8:
        return None
    st = stored.state()
    run = db.runs.get(str(st.last_run_id)) if st.last_run_id is not None else None
    out = outcome_of(st, run)
    if out is None:
        return None
    if isinstance(out, InputId):
        return _expected_outcome(db, str(out), depth + 1)
    return out.to_json_dict()


def _chain_ok(rows: list[StoredRow]) -> str | None:
    prev = bytes(32)
    for n, r in enumerate(rows):
        if r.index != n:
            return f"row index {r.index} where {n} was expected (rows not contiguous)"
        prev = hashlib.sha256(prev + canonical_bytes(r.message)).digest()
        if prev != bytes(r.digest):
            return f"digest of row {n} does not chain onto row {n - 1}"
    return None


def _check_tool_log(db: DbView, log: Sequence[ToolExecution]) -> list[str]:
    """(e): the side-effect log against the committed conversations."""
    out: list[str] = []
    executed = Counter((e.session, e.call_id) for e in log)
    for (sid, cid), n in sorted(executed.items()):
        if n > 1:
            pids = sorted({e.pid for e in log if (e.session, e.call_id) == (sid, cid)})
            out.append(f"(e) tool call {cid} of {sid} was executed {n} times (by processes {pids})")
    calls: dict[tuple[str, str], str] = {}
    for r in db.rows:
        if r.message.get("role") == "assistant":
            for call in r.message.get("tool_calls", []):
                calls[(r.runtime_id, str(call.get("id")))] = str(call.get("name"))
    for r in db.rows:
        if r.message.get("role") != "tool":
            continue
        key = (r.runtime_id, str(r.message.get("tool_call_id")))
        if calls.get(key, r.message.get("name")) not in KIT_TOOLS:
            continue
        n = executed.get(key, 0)
        if r.message.get("content") != INTERRUPTED_TOOL_RESULT and n != 1:
            out.append(
                f"(e) tool call {key[1]} of {key[0]} has a committed result but was executed "
                f"{n} times"
            )
    for sid, cid in sorted(executed.keys() - calls.keys()):
        out.append(
            f"(e) tool call {cid} of {sid} was executed but its call was never committed "
            "(a tool must not run before its call is durable, or a crash runs it again)"
        )
    return out


@dataclass(slots=True)
class _Peer:
    """A stored peer input, as the comms checks (f) see it."""

    stored: StoredInput
    state: InputState
    input: PeerInput
    envelope: str | None  # the correlation id (a comms send's envelope id)
    sender: str | None  # the origin's runtime id (the sending session)

    @property
    def target(self) -> str:
        return self.stored.runtime_id

    @property
    def admitted(self) -> bool:
        """False for the placeholder an inbox entry refused at ingestion leaves behind
        (``accepted -> abandoned`` at once, S10); an admitted input was queued first."""
        h = self.state.history
        return not (h and h[0].from_ is InputLifecycleState.ACCEPTED and h[0].to is _ABANDONED)

    @property
    def accepted_us(self) -> int:
        return _us(self.state.created_at)

    @property
    def request_id(self) -> str | None:
        conv = self.input.convention
        if isinstance(
            conv, RequestConvention | ResponseProgressConvention | ResponseTerminalConvention
        ):
            return conv.request_id
        return None

    @property
    def status(self) -> str | None:
        conv = self.input.convention
        if isinstance(conv, ResponseTerminalConvention):
            return conv.status.value
        if isinstance(conv, ResponseProgressConvention):
            return conv.phase.value
        return None

    def describe(self) -> str:
        conv = self.input.convention
        kind = conv.convention_type if conv is not None else "peer"
        status = f" ({self.status})" if self.status else ""
        return f"{kind}{status} {self.envelope or self.stored.input_id} from {self.sender}"


_ABANDONED = InputLifecycleState.ABANDONED
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _us(dt: datetime) -> int:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // timedelta(microseconds=1)


def _peer_inputs(db: DbView) -> list[_Peer]:
    out: list[_Peer] = []
    for stored in db.inputs.values():
        if '"input_type":"peer"' not in stored.state_json:
            continue
        st = stored.state()
        inp = st.persisted_input
        if not isinstance(inp, PeerInput):
            continue
        src = inp.header.source
        sender = src.runtime_id.value if isinstance(src, PeerOrigin) and src.runtime_id else None
        cid = inp.header.correlation_id
        out.append(_Peer(stored, st, inp, None if cid is None else str(cid), sender))
    return out


def _check_waiter(db: DbView, iid: str, what: str, outcomes: Mapping[str, Any]) -> str | None:
    doc = outcomes.get(iid)
    if doc is None:
        return f"(f) no waiter outcome for input {iid} ({what})"
    kind = doc.get("outcome_type")
    if kind in ("timeout", "terminated", "not_found"):
        return f"(f) waiter of input {iid} ({what}) did not resolve: {json.dumps(doc)}"
    want = _expected_outcome(db, iid)
    if want is not None and (
        want.get("outcome_type") != kind or want.get("reason") != doc.get("reason")
    ):
        return (
            f"(f) waiter of input {iid} ({what}) answered {json.dumps(doc)}; the store implies "
            f"{json.dumps(want)}"
        )
    return None


def check_comms(
    db: DbView,
    acks: Sequence[CommsAck],
    outcomes: Mapping[str, dict[str, Any]] | None = None,
) -> list[str]:
    """(f) peer comms (S10, S11, S20), from the database and the comms ack log:

    - nothing delivered twice: at most one input per envelope id at a session;
    - every acknowledged send (a receipt the child logged) is delivered exactly once: its
      input is at the target, from the sender, with the convention and request id the receipt
      names, terminal, not ``abandoned{recovery_failed}``, its waiter resolved as S12 derives
      from the store; it was admitted (a response refused at ingestion is allowed only when
      another terminal response had closed its request); an acknowledged request is recorded
      at its requester and closed at the end (the child's responder answers every request);
    - every delivered request was recorded at its requester (before delivery, S20) for that
      responder and envelope;
    - no response accepted for a request that was not outstanding: every admitted response at
      a comms session names a request that session recorded, for the responder that sent it,
      recorded before the response was accepted; progress is not accepted after the close;
    - every request is closed by at most one terminal response, and a closed request by
      exactly one: the one its record names (``closed_by``, status), accepted in the closing
      transaction (same instant);
    - the agents' comms tools: a ``send_request`` that returned a request id delivered it
      exactly once; per session and status, the responses the agent's ``respond`` delivered
      number at least the calls that returned and at most those plus the interrupted ones.
    """
    out: list[str] = []
    peers = _peer_inputs(db)
    by_env: dict[tuple[str, str], list[_Peer]] = {}
    for p in peers:
        if p.envelope is not None:
            by_env.setdefault((p.target, p.envelope), []).append(p)
    for (target, env), group in sorted(by_env.items()):
        if len(group) > 1:
            ids = ", ".join(sorted(g.stored.input_id for g in group))
            out.append(f"(f) envelope {env} was delivered {len(group)} times to {target} ({ids})")
    # acknowledged sends: delivered exactly once
    first: dict[tuple[str, str], CommsAck] = {}
    for a in acks:
        first.setdefault((a.target, a.envelope_id), a)
    for (target, env), a in first.items():
        status = f" ({a.status})" if a.status else ""
        what = f"{a.kind}{status} {env} from {a.sender} to {target}, sent by the {a.by}"
        group = by_env.get((target, env), [])
        if not group:
            inboxed = any(e.runtime_id == target and env in e.input_json for e in db.inbox)
            where = " (still in the target's inbox)" if inboxed else ""
            out.append(f"(f) acknowledged {what} was never delivered{where}")
            continue
        p = group[0]
        conv = p.input.convention
        kind_ok = (
            isinstance(conv, MessageConvention)
            if a.kind == "message"
            else isinstance(conv, RequestConvention)
            if a.kind == "request"
            else isinstance(conv, ResponseProgressConvention | ResponseTerminalConvention)
            and p.status == a.status
        )
        if p.sender != a.sender or not kind_ok or (a.request_id and p.request_id != a.request_id):
            out.append(f"(f) acknowledged {what} was delivered as {p.describe()}")
        if not p.stored.is_terminal:
            out.append(f"(f) acknowledged {what} is still {p.stored.current_state} at the end")
            continue
        term = p.state.terminal_outcome
        if term is not None and getattr(term, "reason", None) == "recovery_failed":
            out.append(f"(f) acknowledged {what} ended abandoned{{recovery_failed}}: lost")
        if not p.admitted:
            req = db.peer_requests.get((target, a.request_id))
            closed_by_other = (
                a.kind == "response"
                and req is not None
                and req.closed_us is not None
                and req.closed_by != env
            )
            if not closed_by_other:
                why = getattr(term, "error", None)
                out.append(f"(f) acknowledged {what} was refused when its target took it: {why}")
        if a.kind == "request":
            req = db.peer_requests.get((a.sender, a.request_id))
            if req is None:
                out.append(f"(f) acknowledged {what} (request {a.request_id}) has no record")
            elif req.outstanding:
                out.append(
                    f"(f) acknowledged {what} (request {a.request_id}) is still outstanding "
                    "after the restart finished"
                )
        if outcomes is not None:
            problem = _check_waiter(db, p.stored.input_id, what, outcomes)
            if problem is not None:
                out.append(problem)
    # requests: recorded at the requester, for this responder and envelope
    for p in peers:
        if not isinstance(p.input.convention, RequestConvention) or p.sender is None:
            continue
        rid = p.input.convention.request_id
        req = db.peer_requests.get((p.sender, rid))
        if req is None:
            out.append(
                f"(f) request {rid} delivered to {p.target} has no record at its requester "
                f"{p.sender} (S20: recorded before it is delivered)"
            )
        elif req.responder != p.target or req.envelope_id != p.envelope:
            out.append(
                f"(f) request {rid} was delivered to {p.target} with envelope {p.envelope}, "
                f"but recorded for {req.responder} with envelope {req.envelope_id}"
            )
    # responses: only to outstanding requests; at most one terminal response per request
    terminals: dict[tuple[str, str], list[_Peer]] = {}
    for p in peers:
        answered = p.request_id
        if answered is None or p.status is None or not p.admitted or p.sender is None:
            continue  # (a coalescing aggregate of progress responses has a system origin)
        if p.target not in db.comms_names:
            continue  # a runtime without a comms name keeps no requests (S20)
        what = f"{p.describe()} to request {answered} of {p.target}"
        req = db.peer_requests.get((p.target, answered))
        if req is None:
            out.append(f"(f) {what} was accepted, but {p.target} has no such request")
            continue
        if p.sender != req.responder:
            out.append(f"(f) {what} was accepted, but the request was sent to {req.responder}")
        if p.accepted_us < req.created_us:
            out.append(f"(f) {what} was accepted before the request was recorded")
        if isinstance(p.input.convention, ResponseTerminalConvention):
            terminals.setdefault((p.target, answered), []).append(p)
        elif req.closed_us is not None and p.accepted_us > req.closed_us:
            out.append(f"(f) {what} was accepted after the request was closed ({req.status})")
    for key, req in sorted(db.peer_requests.items()):
        closers = terminals.get(key, [])
        name = f"request {req.request_id} of {req.requester}"
        if len(closers) > 1:
            envs = ", ".join(str(c.envelope) for c in closers)
            out.append(f"(f) {name} took {len(closers)} terminal responses ({envs})")
        elif closers:
            c = closers[0]
            closer = str(c.state.idempotency_key or c.stored.input_id)
            if req.closed_us is None:
                out.append(f"(f) {name} took terminal response {closer} but is still outstanding")
            elif (req.closed_by, req.status, req.closed_us) != (closer, c.status, c.accepted_us):
                out.append(
                    f"(f) {name} was closed by {req.closed_by} ({req.status}) at "
                    f"{req.closed_us}, but its terminal response is {closer} ({c.status}), "
                    f"accepted at {c.accepted_us}"
                )
        elif req.closed_us is not None:
            out.append(f"(f) {name} is closed (by {req.closed_by}) but took no terminal response")
    out.extend(_check_agent_sends(db, peers))
    return out


_AGENT_SENT = re.compile(r"response \((\w+)\) to request (\S+) sent")


def _check_agent_sends(db: DbView, peers: Sequence[_Peer]) -> list[str]:
    """(f) what the agents' ``send_request`` and ``respond`` tools delivered."""
    out: list[str] = []
    calls: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
    for r in db.rows:
        if r.message.get("role") == "assistant":
            for call in r.message.get("tool_calls", []):
                args = call.get("arguments")
                calls[(r.runtime_id, str(call.get("id")))] = (
                    str(call.get("name")),
                    args if isinstance(args, dict) else {},
                )
    returned: Counter[tuple[str, str]] = Counter()  # (session, status) -> respond calls ok
    interrupted: Counter[tuple[str, str]] = Counter()
    for r in db.rows:
        if r.message.get("role") != "tool":
            continue
        key = (r.runtime_id, str(r.message.get("tool_call_id")))
        name, args = calls.get(key, (str(r.message.get("name")), {}))
        content = str(r.message.get("content"))
        ok = not r.message.get("is_error")
        if name == "send_request" and ok:
            rid = content.strip()
            n = sum(
                1
                for p in peers
                if p.sender == r.runtime_id
                and isinstance(p.input.convention, RequestConvention)
                and p.input.convention.request_id == rid
            )
            if n != 1:
                out.append(
                    f"(f) the agent of {r.runtime_id} sent request {rid} (tool call {key[1]} "
                    f"returned) but it was delivered {n} times"
                )
        elif name == "respond":
            m = _AGENT_SENT.fullmatch(content) if ok else None
            if m is not None:
                returned[(r.runtime_id, m.group(1))] += 1
            elif content == INTERRUPTED_TOOL_RESULT:
                interrupted[(r.runtime_id, str(args.get("status")))] += 1
    delivered: Counter[tuple[str, str]] = Counter(
        (str(p.sender), str(p.status))
        for p in peers
        if p.status is not None
        and p.request_id is not None
        and p.envelope != answer_envelope(p.request_id, p.status)  # the child's responder
    )
    for key in sorted(set(returned) | set(interrupted)):
        low, high = returned[key], returned[key] + interrupted[key]
        if not low <= delivered[key] <= high:
            out.append(
                f"(f) the agent of {key[0]} sent {low} {key[1]} responses ({interrupted[key]} "
                f"more calls interrupted) but {delivered[key]} were delivered"
            )
    return out


def check_invariants(
    db: DbView,
    acks: Sequence[Ack],
    outcomes: dict[str, dict[str, Any]] | None,
    snapshots: Iterable[dict[str, str]] = (),
    tool_log: Sequence[ToolExecution] | None = None,
    comms: Sequence[CommsAck] | None = None,
) -> list[str]:
    """The violations of (a)-(f) (see the module docstring), one message each; empty when
    every invariant holds. (e) is checked only when the side-effect log is given; (f) when
    the comms ack log is given or a session has a comms name (``check_comms``)."""
    out: list[str] = []
    first: dict[str, Ack] = {}
    for a in acks:
        first.setdefault(a.input_id, a)
    # (a) acknowledged inputs are kept and end terminal
    for iid, a in first.items():
        stored = db.inputs.get(iid)
        ephemeral = a.durability == InputDurability.EPHEMERAL.value
        if stored is None:
            if not ephemeral:
                out.append(
                    f"(a) acknowledged {a.durability} input {iid} ({a.session}#{a.index}) "
                    "is not in the store"
                )
            continue
        if not stored.is_terminal:
            out.append(
                f"(a) acknowledged input {iid} ({a.session}#{a.index}) is still "
                f"{stored.current_state} after the restart finished"
            )
            continue
        term = json.loads(stored.state_json).get("terminal_outcome") or {}
        if not ephemeral and term.get("reason") == "recovery_failed":
            out.append(
                f"(a) {a.durability} input {iid} ({a.session}#{a.index}) ended "
                "abandoned{recovery_failed}: a durable input was lost"
            )
    # (b) nothing applied twice
    named: Counter[tuple[str, str]] = Counter()
    by_runtime: dict[str, list[StoredRow]] = {}
    for r in db.rows:
        by_runtime.setdefault(r.runtime_id, []).append(r)
        for i in r.input_ids:
            named[(r.runtime_id, i)] += 1
    for (rid, iid), n in sorted(named.items()):
        if n > 1:
            out.append(f"(b) input {iid} of {rid} is named by {n} conversation rows")
    for iid, stored in db.inputs.items():
        if stored.current_state != "consumed" or stored.last_run_id is None:
            continue
        run = db.runs.get(stored.last_run_id)
        if run is None or run.status != "completed":
            continue
        n = named.get((stored.runtime_id, iid), 0)
        if n != 1:
            out.append(
                f"(b) input {iid} of {stored.runtime_id} was consumed by completed run "
                f"{stored.last_run_id} but is named by {n} conversation rows"
            )
    for rid, rows in sorted(by_runtime.items()):
        problem = _chain_ok(rows)
        if problem is not None:
            out.append(f"(b) conversation of {rid}: {problem}")
        for call_id, n in sorted(db.tool_results(rid).items()):
            if n > 1:
                out.append(f"(b) tool call {call_id} of {rid} has {n} result rows (run twice)")
        for call_id, n in sorted(db.tool_calls(rid).items()):
            if n > 1:
                out.append(f"(b) tool call {call_id} of {rid} was made by {n} assistant rows")
    # (c) every waiter resolved, with the outcome the store implies
    if outcomes is None:
        out.append("(c) the restarted child wrote no outcomes")
    else:
        for iid, a in first.items():
            doc = outcomes.get(iid)
            if doc is None:
                out.append(f"(c) no waiter outcome for acknowledged input {iid}")
                continue
            kind = doc.get("outcome_type")
            if kind == "not_found":
                if db.inputs.get(iid) is not None or a.durability != "ephemeral":
                    out.append(f"(c) waiter of {iid} answered not_found: {doc.get('error')}")
                continue
            if kind in ("timeout", "terminated"):
                out.append(f"(c) waiter of {iid} did not resolve: {json.dumps(doc)}")
                continue
            want = _expected_outcome(db, iid)
            if want is None:
                continue  # non-terminal: reported under (a)
            same = want.get("outcome_type") == kind and want.get("reason") == doc.get("reason")
            if not same:
                out.append(
                    f"(c) waiter of {iid} answered {json.dumps(doc)}; the store implies "
                    f"{json.dumps(want)}"
                )
    # (d) terminal states never change
    for snap in snapshots:
        for iid, before in snap.items():
            now = db.inputs.get(iid)
            if now is None:
                out.append(f"(d) terminal input {iid} disappeared from the store")
            elif now.state_json != before:
                out.append(
                    f"(d) terminal input {iid} changed after the crash: "
                    f"{json.loads(before).get('current_state')} -> {now.current_state}"
                )
    # (e) tool side effects: no tool call executed twice
    if tool_log is not None:
        out.extend(_check_tool_log(db, tool_log))
    # (f) peer comms: delivered exactly once, one terminal response per request
    if comms is not None or db.comms_names:
        out.extend(check_comms(db, comms or [], outcomes))
    return out


# ================================================================================ trials


def _script(rng: random.Random, runs: int) -> list[dict[str, Any]]:
    """A tool call (``lookup`` and ``lookup_sync`` in turn, now and then both at once) then a
    text answer per run (so every run passes its boundary, a checkpoint and its completion),
    now and then a transient scripted failure (before the boundary, S4, or after it, S5)."""
    steps: list[dict[str, Any]] = []
    for i in range(runs + 1):
        if rng.random() < 0.12:
            steps.append(
                {
                    "type": "fail",
                    "error": "crashtest: scripted transient failure",
                    "phase": rng.choice(["model", "before_boundary"]),
                }
            )
        call = {
            "name": KIT_TOOLS[i % 2],
            "args": {"q": i},
            "duration": round(rng.uniform(0.001, 0.01), 4),
            "result": f"tool result {i}",
        }
        if rng.random() < 0.2:  # a batch: both tools at once
            other = dict(call, name=KIT_TOOLS[(i + 1) % 2], result=f"tool result {i}b")
            steps.append({"type": "tools", "calls": [call, other]})
        else:
            steps.append({"type": "tool", **call})
        steps.append({"type": "text", "text": f"answer {i}"})
    return steps


def _workload(rng: random.Random, directory: Path, takeover: bool) -> ChildSpec:
    """Two sessions, each with two or three durable prompts and, at random, an ephemeral
    prompt, a derived projected input, a peer message, progress responses and a system
    notice. The last input
    of a session is always a prompt, so inputs that do not wake the runtime (progress) are
    always followed by a run they can ride along with (S17)."""
    sessions: list[SessionSpec] = []
    for s in range(2):
        inputs = [InputSpec("prompt") for _ in range(rng.randint(2, 3))]
        extras: list[InputType] = []
        if rng.random() < 0.5:
            extras.append("ephemeral")
        if rng.random() < 0.5:
            extras.append("projected")
        if rng.random() < 0.4:
            extras.append("peer_message")
        if rng.random() < 0.3:
            extras.extend(["progress"] * rng.randint(1, 2))
        if rng.random() < 0.3:
            extras.append("system")
        for kind in extras:
            inputs.insert(rng.randint(0, len(inputs) - 1), InputSpec(kind))
        sessions.append(SessionSpec(f"crash-s{s}", _script(rng, len(inputs)), inputs))
    options: dict[str, Any] = {"wait_timeout": 20.0}
    if takeover:
        options.update(owner_id=None, lease_ttl=0.5)
    return ChildSpec.in_dir(directory, sessions, **options)


COORD, WORKER = "crash-coord", "crash-worker"
"""The comms workload's sessions (comms names ``coord`` and ``worker``)."""


def _comms_workload(rng: random.Random, directory: Path, takeover: bool) -> ChildSpec:
    """Two comms sessions: ``coord`` (one or two prompts) sends ``worker`` one to three
    requests and now and then a message, interleaved with its prompts; ``worker`` has a prompt
    now and then. The child's responder answers every request delivered to ``worker`` with a
    progress and a terminal response (``_responder``); so the terminal responses wake
    ``coord`` and its runs consume them. At random: the worker runs in the child's second
    ``Runtime`` (``secondary``: requests and responses cross the durable inboxes, S10); the
    worker's agent answers too (its script calls ``respond``, the responder waits a moment
    before it steps in); the coordinator's agent sends a request of its own
    (``send_request``); a bogus progress response to a request nobody sent (refused, S20)."""
    split = rng.random() < 0.5
    agent_answers = rng.random() < 0.4
    coord = [InputSpec("prompt") for _ in range(rng.randint(1, 2))]
    requests = rng.randint(1, 3)
    sends = [InputSpec("comms_request", to="worker") for _ in range(requests)]
    if rng.random() < 0.5:
        sends.append(InputSpec("comms_message", to="worker"))
    rng.shuffle(sends)
    for send in sends:
        coord.insert(rng.randint(0, len(coord)), send)
    if rng.random() < 0.2:
        coord.insert(rng.randint(0, len(coord) - 1), InputSpec("progress"))
    worker = [InputSpec("prompt") for _ in range(rng.randint(0, 1))]
    if rng.random() < 0.3:
        worker.insert(0, InputSpec("peer_message"))
    if worker and worker[-1].type != "prompt":
        worker.append(InputSpec("prompt"))
    coord_script = _script(rng, len(coord) + requests)
    if rng.random() < 0.3:
        tool_steps = [n for n, st in enumerate(coord_script) if st["type"] == "tool"]
        n = rng.choice(tool_steps)
        coord_script[n] = {
            "type": "tool",
            "name": "send_request",
            "args": {"to": "worker", "intent": "agent-ask", "params": {"step": n}},
        }
    worker_runs = len(worker) + len(sends) + 1
    worker_script = _script(rng, worker_runs)
    if agent_answers:
        worker_script = _answering_script(rng, worker_runs)
    sessions = [
        SessionSpec(COORD, coord_script, coord, comms_name="coord"),
        SessionSpec(
            WORKER,
            worker_script,
            worker,
            comms_name="worker",
            secondary=split,
            answer_after=0.2 if agent_answers else 0.0,
        ),
    ]
    options: dict[str, Any] = {"wait_timeout": 20.0}
    if takeover:
        options.update(owner_id=None, lease_ttl=0.5)
    return ChildSpec.in_dir(directory, sessions, **options)


def _answering_script(rng: random.Random, runs: int) -> list[dict[str, Any]]:
    """A worker's script whose runs answer the open request with the ``respond`` tool (no
    request id: it answers when exactly one request to the session is open, else reads the
    error), now and then with a progress response first, or look something up instead."""
    steps: list[dict[str, Any]] = []
    for i in range(runs + 1):
        if rng.random() < 0.25:
            steps.append(
                {"type": "tool", "name": KIT_TOOLS[i % 2], "args": {"q": i}, "duration": 0.005}
            )
        else:
            if rng.random() < 0.4:
                steps.append({"type": "tool", "name": "respond", "args": {"status": "accepted"}})
            steps.append(
                {
                    "type": "tool",
                    "name": "respond",
                    "args": {"status": "completed", "result": {"answered_by": "agent", "run": i}},
                }
            )
        steps.append({"type": "text", "text": f"answer {i}"})
    return steps


def _bound(point: str, spec: ChildSpec) -> int:
    """About how many times a clean run of ``spec`` passes ``point``: once per durable
    acceptance; per run for boundaries and completions (progress responses and peer messages
    may ride along with another input's run); per model-driven run for checkpoints (a system
    notice's immediate run has none); once per session for a recovery."""
    kinds = Counter(i.type for s in spec.sessions for i in s.inputs)
    requests, messages = kinds["comms_request"], kinds["comms_message"]
    if point == "accept.committed":
        # a request is accepted at the worker, then its two responses at the requester
        return max(1, kinds.total() - kinds["ephemeral"] + 2 * requests)
    if point == "recovery.after":
        return len(spec.sessions)
    # a request runs the worker, its terminal response the requester; a message the worker
    runs = kinds["prompt"] + kinds["ephemeral"] + kinds["projected"] + 2 * requests + messages
    if point.startswith("checkpoint."):
        return max(1, runs)
    return max(1, runs + kinds["system"])


@dataclass(slots=True)
class _Stage:
    crash_at: str | None  # point:n, or None for a parent kill / a clean run
    kill_fraction: float | None  # random: kill after this fraction of a clean run's time


@dataclass(slots=True)
class _Plan:
    index: int
    point: str
    stages: list[_Stage]
    target: int  # the stage armed with ``point``
    spec: ChildSpec
    takeover: bool


def _plan(index: int, point: str, seed: int, trial_dir: Path, comms: float = 0.0) -> _Plan:
    rng = random.Random(f"{seed}:{index}")
    takeover = rng.random() < 0.15
    # drawn apart, so the trials without comms are the same for a seed whatever ``comms`` is
    with_comms = random.Random(f"{seed}:{index}:comms").random() < comms
    spec = (_comms_workload if with_comms else _workload)(rng, trial_dir, takeover)

    def stage(p: str) -> _Stage:
        if p == RANDOM:
            return _Stage(None, rng.random())
        return _Stage(f"{p}:{rng.randint(1, _bound(p, spec))}", None)

    stages: list[_Stage] = []
    if point == "recovery.after":  # needs a predecessor that left something to recover
        stages.append(stage(rng.choice([p for p in KILL_POINTS if p != "recovery.after"])))
    target = len(stages)
    stages.append(stage(point))
    if rng.random() < 0.2:  # now and then the recovering process is killed too
        stages.append(stage(RANDOM))
    return _Plan(index, point, stages, target, spec, takeover)


@dataclass(slots=True)
class TrialResult:
    """One trial: its kill point, what ``MEERKAT_CRASH_AT`` said, whether the child died of
    SIGKILL at that point (``killed``), how many SIGKILLs the trial delivered in all (a
    setup kill included), and the violations found. ``schema``: on PostgreSQL, the trial's
    schema (its data; its files are in ``directory``)."""

    index: int
    point: str
    crash_at: str
    killed: bool
    sigkills: int
    violations: list[str]
    elapsed: float
    directory: str
    notes: list[str] = field(default_factory=list)
    schema: str = ""


@dataclass(slots=True)
class Violation:
    """One violation of one trial; its files are kept in ``directory`` and, on PostgreSQL,
    its data in ``schema`` (empty on SQLite: the database is a file in ``directory``)."""

    trial: int
    point: str
    crash_at: str
    message: str
    directory: str
    schema: str = ""


class _Clock:
    """A running estimate of the wall time of a child that runs the whole workload without
    being killed, to spread ``random`` kills over it."""

    def __init__(self, initial: float) -> None:
        self.value = initial
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self.value = 0.8 * self.value + 0.2 * min(seconds, 5.0)


def _run_trial(
    plan: _Plan,
    launcher: Launcher,
    clock: _Clock,
    timeout: float,
    pg_url: str | None = None,
    schema_prefix: str = "",
) -> TrialResult:
    """Run one trial; with ``pg_url``, first create its schema ``<schema_prefix><index>``
    there and point the spec's store at it (named in the result, dropped by the caller)."""
    started = time.monotonic()
    schema = ""
    try:
        if pg_url is not None:
            name = f"{schema_prefix}{plan.index:05d}"
            plan.spec.store = create_pg_schema(pg_url, name)
            schema = name
        result = _trial(plan, launcher, clock, timeout, started)
    except Exception:  # a fault of the kit itself: reported, never swallowed
        result = TrialResult(
            index=plan.index,
            point=plan.point,
            crash_at="",
            killed=False,
            sigkills=0,
            violations=[f"kit error (not a runtime violation):\n{traceback.format_exc()}"],
            elapsed=time.monotonic() - started,
            directory=str(Path(plan.spec.db).parent),
        )
    result.schema = schema
    return result


def _trial(
    plan: _Plan, launcher: Launcher, clock: _Clock, timeout: float, started: float
) -> TrialResult:
    spec = plan.spec
    directory = Path(spec.db).parent
    directory.mkdir(parents=True, exist_ok=True)
    violations: list[str] = []
    notes: list[str] = []
    snapshots: list[dict[str, str]] = []
    sigkills = 0
    killed = False
    crash_at = ""
    if plan.takeover:
        notes.append("takeover")
    if spec.uses_comms:
        notes.append("comms")
        if any(s.secondary for s in spec.sessions):
            notes.append("comms across the inbox")
    for n, st in enumerate(plan.stages):
        last = n == plan.target
        kill_after = None if st.kill_fraction is None else st.kill_fraction * clock.value
        run = run_child(
            spec,
            st.crash_at,
            kill_after=kill_after,
            timeout=timeout,
            launcher=launcher,
            log_name=f"child-{n}.log",
        )
        label = st.crash_at or f"random@{kill_after:.3f}s"
        if last:
            crash_at = label
        if run.sigkilled and not run.hung:
            sigkills += 1
            killed = killed or last
        elif run.hung:
            violations.append(
                f"(c) child armed with {label} hung for {timeout:.0f}s; log:\n{run.log_tail()}"
            )
        elif run.returncode == 0:
            if not plan.takeover:
                clock.observe(run.elapsed)
            if last:
                notes.append(f"{label}: finished without reaching the point")
        else:
            violations.append(
                f"child armed with {label} exited with code {run.returncode}; log:\n"
                f"{run.log_tail()}"
            )
        view = read_db(spec.store_url)
        snapshots.append(view.terminal_states())
        if spec.uses_comms and run.sigkilled:
            notes.extend(comms_situation(view))
    # the clean restart: recovers, finishes, answers every waiter
    with contextlib.suppress(FileNotFoundError):
        os.unlink(spec.outcomes)
    final = run_child(spec, None, timeout=timeout, launcher=launcher, log_name="child-final.log")
    if final.returncode != 0:
        what = f"hung for {timeout:.0f}s" if final.hung else f"exited with {final.returncode}"
        violations.append(f"(c) the restarted child {what}; log:\n{final.log_tail()}")
    acks = read_acks(spec.ack_log)
    db = read_db(spec.store_url)
    comms = read_comms_acks(spec.comms_log_path) if spec.uses_comms else None
    violations.extend(
        check_invariants(
            db,
            acks,
            read_outcomes(spec.outcomes),
            snapshots,
            read_tool_log(spec.tool_log_path),
            comms,
        )
    )
    for a in {a.input_id: a for a in acks}.values():
        if a.durability == "ephemeral" and db.inputs.get(a.input_id) is None:
            notes.append("ephemeral input lost before any commit")
    for report in read_reports(spec.report):
        notes.extend(f"accept rejected ({r.get('code')})" for r in report.get("rejected", []))
        for r in report.get("comms_refused", []):
            if r.get("by") == "child":  # the workload's own sends are always valid
                violations.append(
                    f"(f) the child's {r.get('kind')} #{r.get('index')} from {r.get('session')} "
                    f"was refused: {r.get('error')}: {r.get('reason')}"
                )
            else:
                notes.append(f"responder's {r.get('kind')} refused (request closed)")
        if report.get("comms_unsettled"):
            violations.append(
                f"(f) comms did not settle within {spec.wait_timeout:.0f}s in process "
                f"{report.get('pid')}: {report['comms_unsettled']}"
            )
    if comms is not None:
        notes.extend(_comms_notes(db))
    return TrialResult(
        index=plan.index,
        point=plan.point,
        crash_at=crash_at,
        killed=killed,
        sigkills=sigkills,
        violations=violations,
        elapsed=time.monotonic() - started,
        directory=str(directory),
        notes=notes,
    )


def comms_situation(db: DbView) -> list[str]:
    """What was in flight between the comms sessions in ``db`` (read right after a kill):
    ``killed with a request ...`` / ``killed with a response ...``, one note per kind."""
    found: set[str] = set()
    peers = _peer_inputs(db)
    delivered = {
        (p.sender, p.request_id) for p in peers if isinstance(p.input.convention, RequestConvention)
    }
    for p in peers:
        if p.sender is None or p.stored.is_terminal:
            continue
        if isinstance(p.input.convention, RequestConvention):
            found.add("killed with a request queued at its target, not yet run")
        elif isinstance(p.input.convention, ResponseTerminalConvention):
            found.add("killed with a terminal response accepted, not yet applied")
    for e in db.inbox:
        if '"convention_type":"request"' in e.input_json:
            found.add("killed with a request in its target's inbox, not yet ingested")
        elif '"convention_type":"response_terminal"' in e.input_json:
            found.add("killed with a terminal response in the requester's inbox, not ingested")
    for req in db.peer_requests.values():
        inboxed = any(req.envelope_id in e.input_json for e in db.inbox)
        if req.outstanding and (req.requester, req.request_id) not in delivered and not inboxed:
            found.add("killed with a request recorded, not yet delivered")
    return sorted(found)


def _comms_notes(db: DbView) -> list[str]:
    """What a comms trial did that is not a violation: requests the agents sent or answered,
    requests left outstanding because their send was interrupted before delivery."""
    notes: list[str] = []
    delivered = {
        (p.sender, p.request_id)
        for p in _peer_inputs(db)
        if isinstance(p.input.convention, RequestConvention)
    }
    for req in db.peer_requests.values():
        if req.outstanding and (req.requester, req.request_id) not in delivered:
            notes.append("request recorded but never delivered (its send was cut short)")
        if req.closed_by is not None and req.closed_by != answer_envelope(
            req.request_id, str(req.status)
        ):
            notes.append("request answered by the agent")
    for r in db.rows:
        calls = r.message.get("tool_calls", []) if r.message.get("role") == "assistant" else []
        notes.extend("agent sent a request" for c in calls if c.get("name") == "send_request")
    return notes


@dataclass(slots=True)
class PointStats:
    """Per kill point: trials run, trials whose child died of SIGKILL at the point, trials in
    which it finished without reaching it, and trials with at least one violation."""

    point: str
    runs: int = 0
    killed: int = 0
    not_reached: int = 0
    violations: int = 0


@dataclass(slots=True)
class CrashtestReport:
    """The outcome of ``run_crashtest``: per-point statistics, every violation (with the
    directory where its trial's files were kept), the SIGKILLs delivered in all (setup and
    chained kills included) and notes on what happened that is not a violation (takeovers,
    points not reached, ephemeral inputs lost before any commit, rejected accepts).

    ``store``: ``sqlite``, or the PostgreSQL URL the trials ran in (password redacted), where
    trial ``i``'s schema was ``schema_prefix`` + ``i`` (five digits); ``schemas_kept``: the
    schemas left in that database (failing trials', every one with ``keep``)."""

    seed: int
    trials: int
    sigkills: int
    elapsed: float
    workdir: str
    launcher: str
    points: dict[str, PointStats]
    violations: list[Violation]
    notes: Counter[str] = field(default_factory=Counter)  # what happened, not violations
    store: str = "sqlite"
    schema_prefix: str = ""
    schemas_kept: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def killed(self) -> int:
        return sum(p.killed for p in self.points.values())

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "seed": self.seed,
            "trials": self.trials,
            "killed_at_point": self.killed,
            "sigkills": self.sigkills,
            "elapsed_seconds": round(self.elapsed, 2),
            "workdir": self.workdir,
            "launcher": self.launcher,
            "store": self.store,
            "schema_prefix": self.schema_prefix,
            "schemas_kept": list(self.schemas_kept),
            "points": [asdict(p) for p in self.points.values()],
            "violations": [asdict(v) for v in self.violations],
            "notes": dict(self.notes),
        }


ProgressCallback = Callable[[int, int, TrialResult], None]


def run_crashtest(
    kills: int = 50,
    seed: int = 0,
    workdir: Path | None = None,
    points: Sequence[str] | None = None,
    progress: ProgressCallback | None = None,
    *,
    jobs: int | None = None,
    launcher: Launcher = "fork",
    timeout: float = 60.0,
    keep: bool = False,
    comms: float = 0.3,
    pg_url: str | None = None,
) -> CrashtestReport:
    """Run ``kills`` trials (see the module docstring), ``jobs`` at a time, cycling through
    ``points`` (default: every crash point and ``random``). Each trial works in its own
    directory under ``workdir`` (default: a new temporary directory); passing trials' files
    are deleted unless ``keep``, failing ones are kept and named in the violations.

    ``progress(done, total, trial)`` is called in the calling thread after each trial.
    ``comms``: the share of trials that run the comms workload (``_comms_workload``: two
    sessions with comms names exchanging requests, responses and messages) instead of the
    plain one; the others are the same for a seed whatever it is.

    ``pg_url``: run every trial on PostgreSQL instead of SQLite, each in a fresh schema of
    that database (``report.schema_prefix`` + the trial's index), dropped when the trial
    passed (unless ``keep``); a failing trial's schema is kept and named in its violations
    and ``report.schemas_kept``. Raises ``StoreError`` before any trial if the database does
    not answer.

    Deterministic for a seed, except where timing decides (``random`` kills, the interleaving
    of concurrent runs).
    """
    chosen = list(points) if points else list(KILL_POINTS)
    unknown = [p for p in chosen if p not in KILL_POINTS]
    if unknown:
        raise ValueError(f"unknown kill point(s) {unknown}; known: {', '.join(KILL_POINTS)}")
    if kills < 0:
        raise ValueError("kills must not be negative")
    if not 0.0 <= comms <= 1.0:
        raise ValueError("comms must be a share between 0 and 1")
    schema_prefix = ""
    if pg_url is not None:
        check_pg(pg_url)
        schema_prefix = f"meerkat_crash_{str(seed).replace('-', 'm')}_{uuid.uuid4().hex[:8]}_"
    own_dir = workdir is None
    root = Path(tempfile.mkdtemp(prefix="meerkat-crashtest-")) if workdir is None else workdir
    root.mkdir(parents=True, exist_ok=True)
    jobs = jobs or max(1, min(4, os.cpu_count() or 1))
    clock = _Clock(0.4 if launcher == "fork" else 1.2)
    stats = {p: PointStats(p) for p in chosen}
    report = CrashtestReport(seed, kills, 0, 0.0, str(root), launcher, stats, [])
    if pg_url is not None:
        report.store, report.schema_prefix = redact_url(pg_url), schema_prefix
    started = time.monotonic()
    plans = [
        _plan(i, chosen[i % len(chosen)], seed, root / f"trial-{i:05d}", comms)
        for i in range(kills)
    ]
    done = 0
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="crashtest") as pool:
        pending: set[Future[TrialResult]] = set()
        queue = iter(plans)

        def submit_next() -> None:
            plan = next(queue, None)
            if plan is not None:
                pending.add(
                    pool.submit(_run_trial, plan, launcher, clock, timeout, pg_url, schema_prefix)
                )

        for _ in range(jobs):
            submit_next()
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                pending.discard(fut)
                result = fut.result()
                submit_next()
                done += 1
                st = stats[result.point]
                st.runs += 1
                st.killed += int(result.killed)
                st.not_reached += int(not result.killed)
                st.violations += int(bool(result.violations))
                report.sigkills += result.sigkills
                for note in result.notes:
                    report.notes[note.split(": ", 1)[-1] if ": " in note else note] += 1
                for message in result.violations:
                    report.violations.append(
                        Violation(
                            result.index,
                            result.point,
                            result.crash_at,
                            message,
                            result.directory,
                            result.schema,
                        )
                    )
                if not result.violations and not keep:
                    shutil.rmtree(result.directory, ignore_errors=True)
                    problem = (
                        drop_pg_schema(pg_url, result.schema)
                        if pg_url is not None and result.schema
                        else None
                    )
                    if problem is not None:
                        report.schemas_kept.append(result.schema)
                        report.notes[problem] += 1
                elif result.schema:
                    report.schemas_kept.append(result.schema)
                if progress is not None:
                    progress(done, kills, result)
    report.violations.sort(key=lambda v: v.trial)
    report.schemas_kept.sort()
    report.elapsed = time.monotonic() - started
    if own_dir and report.ok and not keep:
        shutil.rmtree(root, ignore_errors=True)
    return report


# ================================================================================== main


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m meerkat_runtime.crashtest child SPEC_JSON`` (or ``child @spec.json``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["zygote"] and (len(args) != 2 or args[0] != "child"):
        print(
            "usage: python -m meerkat_runtime.crashtest child SPEC_JSON | child @SPEC_FILE\n"
            "(the parent side is `meerkat crashtest`)",
            file=sys.stderr,
        )
        return 2
    if args == ["zygote"]:
        return _zygote_main()
    text = args[1]
    if text.startswith("@"):
        text = Path(text[1:]).read_text(encoding="utf-8")
    return child_main(ChildSpec.from_json(text))


if __name__ == "__main__":
    sys.exit(main())
