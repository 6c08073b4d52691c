"""Peer comms under SIGKILL (issue 6): a crash while a peer request is queued at its target,
and while a response is in flight, loses nothing and delivers nothing twice.

The crash kit's child runs two comms sessions, ``crash-coord`` (comms name ``coord``) and
``crash-worker`` (``worker``): the coordinator sends requests with ``Runtime.comms_send``
(fixed envelope ids, so a restarted child re-sends and is deduplicated, S11), and the child's
responder answers each request delivered to the worker with a progress and a terminal response
(fixed envelope ids too). Every receipt goes to the comms ack log only after ``comms_send``
returned. With ``secondary`` the worker runs in a second ``Runtime`` of the child, so requests
and responses cross the durable inboxes (S10), as between two processes; one SIGKILL kills
both. After the restart the kit's invariants are checked, (f) the comms ones among them
(``check_comms``): every acknowledged send delivered exactly once, one terminal response per
request, no response accepted for a request that was not outstanding (S20).

Children are forked by the kit's zygote (fast); the kills are at named crash points
(``MEERKAT_CRASH_AT``) or at a moment the parent picks by watching the database.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meerkat_runtime import Runtime
from meerkat_runtime.crashtest import (
    ChildRun,
    ChildSpec,
    CommsAck,
    DbView,
    InputSpec,
    SessionSpec,
    answer_envelope,
    check_comms,
    check_invariants,
    envelope_for,
    read_acks,
    read_comms_acks,
    read_db,
    read_outcomes,
    read_tool_log,
    run_child,
    terminal_snapshot,
)

COORD, WORKER = "crash-coord", "crash-worker"
SIGKILL_RC = -9


def _script(runs: int, first_tool_duration: float = 0.01) -> list[dict[str, Any]]:
    """A lookup then a text answer per run; the first lookup takes ``first_tool_duration``."""
    steps: list[dict[str, Any]] = []
    for i in range(runs):
        duration = first_tool_duration if i == 0 else 0.01
        steps.append({"type": "tool", "name": "lookup", "args": {"q": i}, "duration": duration})
        steps.append({"type": "text", "text": f"answer {i}"})
    return steps


REQUEST = InputSpec("comms_request", to="worker")


def _spec(
    tmp_path: Path,
    coord: list[InputSpec],
    worker: list[InputSpec],
    *,
    coord_script: list[dict[str, Any]] | None = None,
    worker_script: list[dict[str, Any]] | None = None,
    secondary: bool = False,
    answer_after: float = 0.0,
    **options: Any,
) -> ChildSpec:
    """The worker first, so the accept order (index by index, session by session) puts the
    worker's ``i``-th input before the coordinator's."""
    sessions = [
        SessionSpec(
            WORKER,
            _script(6) if worker_script is None else worker_script,
            worker,
            comms_name="worker",
            secondary=secondary,
            answer_after=answer_after,
        ),
        SessionSpec(COORD, _script(6) if coord_script is None else coord_script, coord, "coord"),
    ]
    tmp_path.mkdir(parents=True, exist_ok=True)
    return ChildSpec.in_dir(tmp_path, sessions, **options)


def _killed(spec: ChildSpec, crash_at: str | None = None, **kw: Any) -> ChildRun:
    run = run_child(spec, crash_at, timeout=60.0, launcher="fork", **kw)
    assert run.returncode == SIGKILL_RC, (
        f"the child ({crash_at or 'parent kill'}) did not die of SIGKILL "
        f"(returncode {run.returncode}):\n{run.log_tail()}"
    )
    return run


def _finished(spec: ChildSpec) -> None:
    run = run_child(spec, timeout=60.0, launcher="fork", log_name="child-restart.log")
    assert run.returncode == 0, f"the restarted child failed:\n{run.log_tail()}"


def _invariants(spec: ChildSpec, snapshots: list[dict[str, str]]) -> DbView:
    db = read_db(spec.db)
    problems = check_invariants(
        db,
        read_acks(spec.ack_log),
        read_outcomes(spec.outcomes),
        snapshots,
        read_tool_log(spec.tool_log_path),
        read_comms_acks(spec.comms_log_path),
    )
    assert problems == [], "\n".join(problems)
    return db


def _peer_states(db: DbView, runtime_id: str, convention: str) -> list[dict[str, Any]]:
    """Stored states of the peer inputs of ``convention`` at ``runtime_id`` (peer origin)."""
    out = []
    for s in db.inputs.values():
        doc: dict[str, Any] = json.loads(s.state_json)
        inp = doc.get("persisted_input") or {}
        conv = inp.get("convention") or {}
        source = (inp.get("header") or {}).get("source") or {}
        if (
            s.runtime_id == runtime_id
            and conv.get("convention_type") == convention
            and source.get("type") == "peer"
        ):
            out.append(doc)
    return out


def _inbox_holds(db: str, runtime_id: str, convention: str) -> Callable[[], bool]:
    """A ``kill_when`` predicate: the inbox of ``runtime_id`` holds an entry of that
    convention (sent, not yet ingested by the owner)."""
    needle = f'%"convention_type":"{convention}"%'

    def check() -> bool:
        try:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
        except sqlite3.Error:
            return False
        try:
            row = conn.execute(
                "SELECT count(*) FROM inbox WHERE runtime_id = ? AND input_json LIKE ?",
                (runtime_id, needle),
            ).fetchone()
            return bool(row and row[0])
        except sqlite3.Error:
            return False  # no schema yet
        finally:
            conn.close()

    return check


def _acks(spec: ChildSpec, **match: Any) -> list[CommsAck]:
    return [
        a
        for a in read_comms_acks(spec.comms_log_path)
        if all(getattr(a, k) == v for k, v in match.items())
    ]


# ----------------------------------------------------------------- a request queued


def test_crash_while_a_request_is_queued_at_its_target(tmp_path: Path) -> None:
    """The worker is busy in a slow tool; the coordinator's request is accepted into it
    (queued behind the run) and the process is killed right after that commit, before
    ``comms_send`` returned: the request is durable at the worker and recorded as outstanding,
    but unacknowledged. The restarted child re-sends it with the same envelope id: the same
    request id comes back, the worker holds one request input, runs it once, and the request
    is closed by exactly one terminal response."""
    spec = _spec(
        tmp_path,
        [REQUEST],
        [InputSpec("prompt")],
        worker_script=_script(6, 0.5),
        accept_gap=0.1,  # the worker's run is in its slow tool when the request arrives
    )
    _killed(spec, "accept.committed:2")  # 1: the worker's prompt, 2: the request at the worker
    db = read_db(spec.db)
    (request,) = _peer_states(db, WORKER, "request")
    # queued behind the run (or, on a loaded machine, staged by a run start that shared the
    # request's group commit): not run, nothing of it applied
    assert request["current_state"] in ("queued", "staged")
    assert db.rows_naming(request["input_id"]) == []
    (record,) = db.peer_requests.values()
    assert record.outstanding and record.envelope_id == envelope_for(COORD, 0)
    assert read_comms_acks(spec.comms_log_path) == []  # the sender never got its receipt
    snap = terminal_snapshot(spec.db)
    spec.sessions[0].script = _script(6)
    _finished(spec)
    db = _invariants(spec, [snap])
    (ack,) = _acks(spec, by="child")
    assert ack.request_id == record.request_id  # the re-send found the request again
    (request,) = _peer_states(db, WORKER, "request")
    assert request["current_state"] == "consumed"
    (closed,) = db.peer_requests.values()
    assert closed.closed_by == answer_envelope(record.request_id, "completed")
    assert len(_peer_states(db, COORD, "response_terminal")) == 1


# ---------------------------------------------------------------- a response in flight


def test_crash_while_a_response_is_in_flight(tmp_path: Path) -> None:
    """The coordinator is busy in a slow tool when the worker's terminal response arrives:
    the response is accepted into it (closing the request in the same transaction) and the
    process is killed before ``comms_send`` returned to the responder. After the restart the
    request is closed by that response, the responder's re-send is deduplicated (its receipt
    names the same envelope), the coordinator applies the response once, and nothing else
    closes the request."""
    spec = _spec(
        tmp_path,
        [InputSpec("prompt"), REQUEST],
        [],
        coord_script=_script(6, 0.5),
    )
    # 1: the coordinator's prompt, 2: the request at the worker, 3: the responder's progress
    # response at the coordinator, 4: its terminal response
    _killed(spec, "accept.committed:4")
    db = read_db(spec.db)
    (record,) = db.peer_requests.values()
    assert record.closed_by == answer_envelope(record.request_id, "completed")
    (terminal,) = _peer_states(db, COORD, "response_terminal")
    assert terminal["current_state"] == "queued"  # accepted, not yet applied
    assert [a.status for a in _acks(spec, by="responder")] == ["accepted"]
    snap = terminal_snapshot(spec.db)
    spec.sessions[1].script = _script(6)
    _finished(spec)
    db = _invariants(spec, [snap])
    (terminal,) = _peer_states(db, COORD, "response_terminal")
    assert terminal["current_state"] == "consumed"
    assert [a.envelope_id for a in _acks(spec, by="responder", status="completed")] == [
        record.closed_by
    ]
    (closed,) = db.peer_requests.values()
    assert (closed.closed_by, closed.closed_us) == (record.closed_by, record.closed_us)


@pytest.mark.parametrize(
    ("inbox_of", "convention"),
    [(WORKER, "request"), (COORD, "response_terminal")],
    ids=["request-in-the-targets-inbox", "response-in-the-requesters-inbox"],
)
def test_crash_while_comms_wait_in_an_inbox(tmp_path: Path, inbox_of: str, convention: str) -> None:
    """The worker runs in the child's second ``Runtime``: requests reach it through its
    durable inbox, responses reach the coordinator through the coordinator's (S10). The parent
    kills the child while a request, or a terminal response, sits in an inbox, acknowledged
    but not yet ingested by the owner (a slow poll keeps it there). After the restart it is
    ingested exactly once; a terminal response closes its request then (not before), once."""
    spec = _spec(tmp_path, [InputSpec("prompt"), REQUEST], [], secondary=True, poll_interval=0.25)
    run = _killed(spec, kill_when=_inbox_holds(spec.db, inbox_of, convention))
    assert run.parent_killed
    db = read_db(spec.db)
    assert any(
        e.runtime_id == inbox_of and f'"convention_type":"{convention}"' in e.input_json
        for e in db.inbox
    )
    (record,) = db.peer_requests.values()
    assert record.outstanding  # a response closes its request when the owner ingests it
    snap = terminal_snapshot(spec.db)
    _finished(spec)
    db = _invariants(spec, [snap])
    assert db.inbox == []
    assert len(_peer_states(db, WORKER, "request")) == 1
    assert len(_peer_states(db, COORD, "response_terminal")) == 1
    (closed,) = db.peer_requests.values()
    assert closed.closed_by == answer_envelope(closed.request_id, "completed")


# ---------------------------------------------------------------------- the checker


def _clone(db: DbView, iid: str, envelope: str | None = None) -> str:
    """A copy of a stored input under a new id (a second delivery), with another envelope id
    if given."""
    stored = db.inputs[iid]
    doc: dict[str, Any] = json.loads(stored.state_json)
    new_id = str(uuid.uuid4())
    doc["input_id"] = new_id
    doc["persisted_input"]["header"]["id"] = new_id
    if envelope is not None:
        doc["persisted_input"]["header"]["correlation_id"] = envelope
        doc["persisted_input"]["header"]["idempotency_key"] = envelope
        doc["idempotency_key"] = envelope
    db.inputs[new_id] = type(stored)(
        stored.runtime_id,
        new_id,
        stored.current_state,
        stored.is_terminal,
        stored.last_run_id,
        json.dumps(doc, separators=(",", ":")),
    )
    return new_id


def _input_id(db: DbView, runtime_id: str, convention: str) -> str:
    (doc, *_) = _peer_states(db, runtime_id, convention)
    return str(doc["input_id"])


def _rewrite(db: DbView, iid: str, change: Callable[[dict[str, Any]], None]) -> None:
    doc: dict[str, Any] = json.loads(db.inputs[iid].state_json)
    change(doc)
    db.inputs[iid].state_json = json.dumps(doc, separators=(",", ":"))


def test_check_comms_flags_each_kind_of_violation(tmp_path: Path) -> None:
    """The comms checks (f) are not vacuous: from clean runs (the responder answers in one,
    the worker's agent with ``respond`` in the other), each tampering with the evidence is
    reported."""
    spec = _spec(tmp_path / "responder", [REQUEST], [])
    _finished(spec)
    acks = read_comms_acks(spec.comms_log_path)
    outcomes = read_outcomes(spec.outcomes)
    assert outcomes is not None
    assert [(a.by, a.kind, a.status) for a in acks] == [
        ("child", "request", ""),
        ("responder", "response", "accepted"),
        ("responder", "response", "completed"),
    ]
    assert check_comms(read_db(spec.db), acks, outcomes) == []

    def flagged(db: DbView, outs: dict[str, Any] | None = outcomes) -> str:
        problems = check_comms(db, acks, outs)
        assert all(p.startswith("(f)") for p in problems), problems
        return "\n".join(problems)

    twice = read_db(spec.db)
    _clone(twice, _input_id(twice, WORKER, "request"))
    assert "delivered 2 times" in flagged(twice)
    lost = read_db(spec.db)
    del lost.inputs[_input_id(lost, WORKER, "request")]
    assert "acknowledged request" in flagged(lost) and "never delivered" in flagged(lost)
    second = read_db(spec.db)
    _clone(second, _input_id(second, COORD, "response_terminal"), str(uuid.uuid4()))
    assert "took 2 terminal responses" in flagged(second)
    unasked = read_db(spec.db)
    unasked.peer_requests.clear()
    assert "has no such request" in flagged(unasked)
    assert "has no record at its requester" in flagged(unasked)
    late = read_db(spec.db)
    (record,) = late.peer_requests.values()
    assert record.closed_us is not None

    def after_close(doc: dict[str, Any]) -> None:
        doc["created_at"] = "2099-01-01T00:00:00Z"

    _rewrite(late, _input_id(late, COORD, "response_progress"), after_close)
    assert "accepted after the request was closed" in flagged(late)
    other = read_db(spec.db)
    next(iter(other.peer_requests.values())).closed_by = str(uuid.uuid4())
    assert "but its terminal response is" in flagged(other)
    still_open = read_db(spec.db)
    next(iter(still_open.peer_requests.values())).closed_us = None
    assert "still outstanding after the restart" in flagged(still_open)
    refused = read_db(spec.db)

    def placeholder(doc: dict[str, Any]) -> None:  # refused at ingestion
        doc["history"] = [{"timestamp": doc["created_at"], "from": "accepted", "to": "abandoned"}]

    _rewrite(refused, _input_id(refused, COORD, "response_terminal"), placeholder)
    assert "was refused when its target took it" in flagged(refused)
    clean = read_db(spec.db)
    terminal = _input_id(clean, COORD, "response_terminal")
    unanswered = {k: v for k, v in outcomes.items() if k != terminal}
    assert "no waiter outcome" in flagged(clean, unanswered)
    assert "did not resolve" in flagged(clean, {**outcomes, terminal: {"outcome_type": "timeout"}})

    # the worker's agent answers with `respond` (the responder waits long enough not to)
    answering = [
        {"type": "tool", "name": "respond", "args": {"status": "completed", "result": 42}},
        {"type": "text", "text": "answered"},
    ]
    spec = _spec(tmp_path / "agent", [REQUEST], [], worker_script=answering, answer_after=30.0)
    _finished(spec)
    acks = read_comms_acks(spec.comms_log_path)
    outcomes = read_outcomes(spec.outcomes)
    db = _invariants(spec, [])
    (record,) = db.peer_requests.values()
    assert record.closed_by != answer_envelope(record.request_id, "completed")  # the agent's
    assert [a.by for a in acks] == ["child"]
    undelivered = read_db(spec.db)
    del undelivered.inputs[_input_id(undelivered, COORD, "response_terminal")]
    assert "the agent of crash-worker sent 1 completed responses" in flagged(undelivered)
    assert "took no terminal response" in flagged(undelivered)


# ---------------------------------------------------------------- adopting orphaned sessions


async def test_request_to_a_session_whose_owner_died_runs_once_the_lease_expires(
    tmp_path: Path,
) -> None:
    """A process that ran the worker died (its lease still valid for a moment); the
    coordinator's request goes to the worker's durable inbox. Once the dead owner's lease has
    expired, a live process that has the worker's pending work in its store should run it;
    the only thing touching the worker here is the request itself."""
    url = f"sqlite:///{tmp_path / 'lease.db'}"
    async with Runtime.open(url) as rt:
        worker = await rt.create_session(comms_name="worker")
        coord = await rt.create_session(comms_name="coord")
    async with Runtime.open(url) as dead:
        assert await dead.store.acquire_lease(worker.id, "a-dead-process", 0.3) is not None
    async with Runtime.open(url, lease_ttl=0.3, poll_interval=0.05) as rt:
        await rt.comms_send(coord.id, kind="request", to="worker", intent="x")
        await asyncio.sleep(1.2)  # the dead owner's lease expired 0.9 s ago
        states = await rt.store.load_input_states(worker.id)
        assert await rt.store.inbox_entries(worker.id) == []
        assert [s.current_state.value for s in states] == ["consumed"]
