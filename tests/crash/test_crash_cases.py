"""Conformance crash cases 11-16 (spec §5) against a real process killed with SIGKILL.

Every case runs the crash kit's child (``python -m meerkat_runtime.crashtest child ...``, a
fresh interpreter) on a store of its own, armed with ``MEERKAT_CRASH_AT=point:n`` so it
SIGKILLs itself at the named point; asserts it died of SIGKILL (returncode -9); restarts it
unarmed so it recovers (S7) and finishes; then checks the case's own assertions and the kit's
invariants (``check_invariants``): no acknowledged durable input lost, nothing applied twice,
every waiter resolved, no terminal state changed after the crash, no tool call executed twice
(the child's ``lookup`` / ``lookup_sync`` tools are real registered tools that log every
execution, ``fsync``-ed, to a side-effect log before they go on).

The cases (and the crash tests after them) run on every store a process can share (the
``store`` fixture): a SQLite file in the test's ``tmp_path``, and a fresh schema of the
``MEERKAT_TEST_PG_URL`` PostgreSQL database (dropped afterwards; skipped, saying why, when
that server is unreachable). The parent reads the store with the kit's read-only readers
(``read_db(spec.store_url)``), never through the runtime under test.

After the cases: regression tests for bugs the kit found, a test that the kit's checker flags
each kind of violation, and the kit itself. These run their children forked by the kit's
zygote, which is much faster to start; ``test_crashtest_kit_short_run`` runs the kit itself
(every crash point several times plus random instants; ``MEERKAT_CRASHTEST_KILLS`` sets the
number of trials), ``test_crashtest_kit_short_run_postgres`` a few trials of it on PostgreSQL
(``MEERKAT_CRASHTEST_PG_KILLS``). The kit works on a RAM disk when there is one: a SIGKILL
never loses the page cache, so the verdicts do not depend on the medium, only the fsync cost
does.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from meerkat_runtime import PromptInput, Runtime, crashtest
from meerkat_runtime.core.agent import INTERRUPTED_TOOL_RESULT
from meerkat_runtime.crashtest import (
    CRASH_POINTS,
    KILL_POINTS,
    RANDOM,
    ChildRun,
    ChildSpec,
    DbView,
    InputSpec,
    Launcher,
    SessionSpec,
    ToolExecution,
    check_invariants,
    pg_schema_url,
    read_acks,
    read_db,
    read_outcomes,
    read_reports,
    read_tool_log,
    run_child,
    run_crashtest,
    terminal_snapshot,
)
from meerkat_runtime.runtime.outcomes import Accepted
from tests.conformance.stores import skip_without_postgres
from tests.postgres import support as pg

SID = "crash-session"
FAST: list[dict[str, Any]] = [
    {"type": "tool", "name": "lookup", "args": {"q": 1}, "duration": 0.01, "result": "42"},
    {"type": "text", "text": "the answer is 42"},
    {"type": "tool", "name": "lookup", "args": {"q": 2}, "duration": 0.01, "result": "43"},
    {"type": "text", "text": "the answer is 43"},
    {"type": "tool", "name": "lookup", "args": {"q": 3}, "duration": 0.01, "result": "44"},
    {"type": "text", "text": "the answer is 44"},
]
SIGKILL_RC = -9

AGENT_RERUNS_INTERRUPTED_TOOLS = False
"""Known S6 bug in ``core/agent.py``: a turn's tool calls are committed only together with
their results (at the checkpoint after the tools ran), so a process killed while a tool runs,
or after it ran but before that checkpoint, leaves no trace of the call; the restarted run
makes the same call again and the tool runs twice. The kit's invariant (e) reports it. While
this is True, the tests tolerate exactly those (e) violations (with a warning) and
``test_crash_while_a_tool_runs`` xfails after checking the tool did run twice; once the agent
commits the calls before running them that test fails, saying to set this to False."""


def _rerun_violation(message: str) -> bool:
    """One of the (e) violations the known bug causes: a tool call run twice, or run but its
    call never committed (the restart did not make it again)."""
    return message.startswith("(e)") and (
        "executed 0 times" not in message
        and ("times" in message or "was never committed" in message)
    )


def _unexpected(problems: list[str]) -> list[str]:
    """``problems`` without the known bug's (e) violations while it is known (warned about)."""
    if not AGENT_RERUNS_INTERRUPTED_TOOLS:
        return problems
    known = [p for p in problems if _rerun_violation(p)]
    if known:
        warnings.warn(
            f"known S6 bug tolerated ({len(known)} violation(s)): {known[0]}", stacklevel=3
        )
    return [p for p in problems if not _rerun_violation(p)]


STORES = ("sqlite", "postgres")


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest) -> Iterator[str]:
    """The store URL of a crash test's child: "" for a SQLite file next to the spec's other
    files (``ChildSpec.db``), else a fresh, empty schema of the ``MEERKAT_TEST_PG_URL``
    database (dropped afterwards; the test is skipped, saying why, without the server)."""
    if request.param == "sqlite":
        yield ""
        return
    skip_without_postgres()
    url, schema = pg.fresh_schema()
    try:
        yield url
    finally:
        pg.drop_schema(schema)


def _spec(
    tmp_path: Path, inputs: list[InputSpec], script: Any = None, *, store: str, **opts: Any
) -> ChildSpec:
    session = SessionSpec(SID, list(FAST if script is None else script), inputs)
    return ChildSpec.in_dir(tmp_path, [session], store=store, **opts)


def _db(spec: ChildSpec) -> DbView:
    """What the spec's store holds (the kit's read-only reader for its kind)."""
    return read_db(spec.store_url)


def _terminal(spec: ChildSpec) -> dict[str, str]:
    return terminal_snapshot(spec.store_url)


def _killed(spec: ChildSpec, crash_at: str, launcher: Launcher = "spawn") -> ChildRun:
    run = run_child(spec, crash_at, timeout=60.0, launcher=launcher)
    assert run.returncode == SIGKILL_RC, (
        f"the child armed with {crash_at} did not die of SIGKILL "
        f"(returncode {run.returncode}):\n{run.log_tail()}"
    )
    return run


def _finished(
    spec: ChildSpec, crash_at: str | None = None, launcher: Launcher = "spawn"
) -> ChildRun:
    run = run_child(spec, crash_at, timeout=60.0, launcher=launcher, log_name="child-restart.log")
    assert run.returncode == 0, f"the restarted child failed:\n{run.log_tail()}"
    return run


def _invariants(spec: ChildSpec, snapshots: list[dict[str, str]]) -> DbView:
    db = _db(spec)
    problems = check_invariants(
        db,
        read_acks(spec.ack_log),
        read_outcomes(spec.outcomes),
        snapshots,
        read_tool_log(spec.tool_log_path),
    )
    problems = _unexpected(problems)
    assert problems == [], "\n".join(problems)
    return db


def _executions(spec: ChildSpec) -> Counter[str]:
    """Call id -> how many times a tool executed it (the side-effect log, every process)."""
    return Counter(e.call_id for e in read_tool_log(spec.tool_log_path) if e.session == SID)


def _with_tool(script: list[dict[str, Any]], name: str, **changes: Any) -> list[dict[str, Any]]:
    """``script`` with every tool step calling ``name`` (and ``changes`` applied)."""
    return [dict(s, name=name, **changes) if s["type"] == "tool" else s for s in script]


@pytest.fixture(scope="module")
def result_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> int:
    """Which ``checkpoint.*`` pass of a run making one tool call commits the call's result:
    the run's last checkpoint (1 when the agent commits a turn's calls with their results, 2
    when it commits the calls at a checkpoint of their own before running them)."""
    spec = _spec(tmp_path_factory.mktemp("probe"), [InputSpec("prompt")], FAST[:2], store="")
    _finished(spec, launcher="fork")
    codes = [(e["event"].get("data") or {}).get("code") for e in _db(spec).events]
    return codes.count("checkpoint")


def _doc(db: DbView, input_id: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(db.inputs[input_id].state_json)
    return doc


def _outcome(spec: ChildSpec, input_id: str) -> dict[str, Any]:
    outcomes = read_outcomes(spec.outcomes)
    assert outcomes is not None and input_id in outcomes, f"no outcome for {input_id}"
    return outcomes[input_id]


def _user_rows(db: DbView, input_id: str) -> int:
    return sum(1 for r in db.rows_naming(input_id) if r.message.get("role") == "user")


def _first_ids(spec: ChildSpec) -> list[str]:
    """Acknowledged ids by input index (first acknowledgement of each)."""
    by_index: dict[int, str] = {}
    for a in read_acks(spec.ack_log):
        by_index.setdefault(a.index, a.input_id)
    return [by_index[i] for i in sorted(by_index)]


def _assert_no_tool_rerun(db: DbView) -> None:
    results = db.tool_results(SID)
    calls = db.tool_calls(SID)
    assert all(n <= 1 for n in results.values()), f"a tool result was written twice: {results}"
    assert all(n <= 1 for n in calls.values()), f"a tool call was made twice: {calls}"


# ------------------------------------------------------------------------------ case 11


def test_conformance_11_crash_while_queued(tmp_path: Path, store: str) -> None:
    """A second prompt arrives while the first one's run is busy in a tool call, so it is
    queued; the process is killed right after its acceptance committed (durable, but the
    client never got the acknowledgement). The restart finds it queued, runs it exactly once,
    and the client's retry with the same idempotency key is answered ``deduplicated`` and its
    waiter resolves ``completed``."""
    slow = [dict(FAST[0], duration=0.5), *FAST[1:]]
    spec = _spec(tmp_path, [InputSpec("prompt"), InputSpec("prompt")], slow, store=store)
    _killed(spec, "accept.committed:2")
    (first_ack,) = read_acks(spec.ack_log)  # the kill came before the 2nd accept returned
    queued = _db(spec)
    (iid,) = [i for i in queued.inputs if i != first_ack.input_id]
    assert queued.inputs[iid].current_state == "queued"
    snap = _terminal(spec)
    spec.sessions[0].script = FAST
    _finished(spec)
    db = _invariants(spec, [snap])
    retry = [a for a in read_acks(spec.ack_log) if a.index == 1]
    assert [(a.input_id, a.ack) for a in retry] == [(iid, "deduplicated")]
    for done in (first_ack.input_id, iid):
        assert db.inputs[done].current_state == "consumed"
        assert _user_rows(db, done) == 1
    out = _outcome(spec, iid)
    assert out["outcome_type"] == "completed"
    assert out["result"]["text"] == "the answer is 43"


# ------------------------------------------------------------------------------ case 12


def test_conformance_12_crash_while_staged(tmp_path: Path, store: str) -> None:
    """Killed after the run-start transaction staged the input, before its boundary committed:
    recovery finds no receipt listing it, puts it back at the front of the queue counting an
    attempt (S4, S7), and it is applied exactly once."""
    spec = _spec(tmp_path, [InputSpec("prompt"), InputSpec("prompt")], store=store)
    _killed(spec, "boundary.before:1")
    first = _db(spec)
    staged = [i for i, s in first.inputs.items() if s.current_state == "staged"]
    assert len(staged) == 1
    (iid,) = staged
    assert first.rows_naming(iid) == []  # nothing of it was applied
    snap = _terminal(spec)
    _finished(spec)
    db = _invariants(spec, [snap])
    doc = _doc(db, iid)
    reasons = [h.get("reason") for h in doc["history"]]
    assert "recovery: staged, no receipt" in reasons
    assert doc["current_state"] == "consumed"
    assert doc["attempt_count"] >= 1 and doc["recovery_count"] == 1
    assert _user_rows(db, iid) == 1
    assert _outcome(spec, iid)["outcome_type"] == "completed"


# ------------------------------------------------------------------------------ case 13


@pytest.mark.parametrize("point", ["boundary.after", "checkpoint.after"])
def test_conformance_13_crash_while_applied_pending_consumption(
    tmp_path: Path, point: str, result_checkpoint: int, store: str
) -> None:
    """Killed after the boundary (or the checkpoint that committed the tool call and its
    result) committed: the input stays applied (S5), the restart runs a continuation, the user
    message is never appended again and a committed tool call is never run again (S6): the
    side-effect log shows ``lookup`` ran call_0 exactly once, before the crash or after it."""
    spec = _spec(tmp_path, [InputSpec("prompt")], store=store)
    after_result = point == "checkpoint.after"
    _killed(spec, f"{point}:{result_checkpoint if after_result else 1}")
    first = _db(spec)
    (iid,) = first.inputs
    assert first.inputs[iid].current_state == "applied_pending_consumption"
    assert _user_rows(first, iid) == 1
    committed_tools = set(first.tool_results(SID))
    assert committed_tools == ({"call_0"} if after_result else set())
    assert _executions(spec) == (Counter(call_0=1) if after_result else Counter())
    snap = _terminal(spec)
    _finished(spec)
    db = _invariants(spec, [snap])
    assert db.inputs[iid].current_state == "consumed"
    assert _user_rows(db, iid) == 1
    _assert_no_tool_rerun(db)
    assert set(db.tool_results(SID)) == {"call_0"}  # run exactly once, before or after
    assert _executions(spec) == Counter(call_0=1)
    continuations = [r for r in db.runs.values() if r.is_continuation]
    assert [r.status for r in continuations] == ["completed"]
    (report,) = read_reports(spec.report)
    assert report["recovery_reports"][SID]["continuations"] == 1
    out = _outcome(spec, iid)
    assert out["outcome_type"] == "completed"
    assert out["result"]["text"] == "the answer is 42"


# ------------------------------------------------------------------------------ case 14


def test_conformance_14_repeated_failures_while_applied_pending_consumption(
    tmp_path: Path, result_checkpoint: int, store: str
) -> None:
    """Killed after the checkpoint that committed the tool result (the sync tool
    ``lookup_sync``, run on a tool thread), then killed again at the boundary of every
    continuation: each recovery counts an attempt (S4), so the third restart abandons the
    input ``retry_budget_exceeded`` instead of looping forever; its user message and its tool
    call were written once and never again, and the tool executed once in all."""
    spec = _spec(tmp_path, [InputSpec("prompt")], _with_tool(FAST, "lookup_sync"), store=store)
    _killed(spec, f"checkpoint.after:{result_checkpoint}")
    assert _executions(spec) == Counter(call_0=1)
    snapshots = [_terminal(spec)]
    iid = next(iter(_db(spec).inputs))
    attempts = []
    for _ in range(2):  # the continuations of the 1st and 2nd restarts die at their boundary
        _killed(spec, "boundary.after:1")
        doc = _doc(_db(spec), iid)
        assert doc["current_state"] == "applied_pending_consumption"
        attempts.append(doc["attempt_count"])
        snapshots.append(_terminal(spec))
    assert attempts == [1, 2]
    # the 3rd restart, armed the same way, never reaches a boundary: recovery spends the budget
    _finished(spec, "boundary.after:1")
    _finished(spec)  # and one more plain restart changes nothing
    db = _invariants(spec, snapshots)
    doc = _doc(db, iid)
    assert doc["current_state"] == "abandoned"
    assert doc["terminal_outcome"]["reason"] == "retry_budget_exceeded"
    assert doc["attempt_count"] == 3
    assert _user_rows(db, iid) == 1
    _assert_no_tool_rerun(db)
    assert set(db.tool_results(SID)) == {"call_0"}
    assert _executions(spec) == Counter(call_0=1)
    assert {e.tool for e in read_tool_log(spec.tool_log_path)} == {"lookup_sync"}
    out = _outcome(spec, iid)
    assert (out["outcome_type"], out["reason"]) == ("abandoned", "retry_budget_exceeded")


# ------------------------------------------------------------- crash while a tool runs


@pytest.mark.parametrize("tool", ["lookup", "lookup_sync"])
def test_crash_while_a_tool_runs(tmp_path: Path, tool: str, store: str) -> None:
    """The parent kills the process as soon as the side-effect log shows the tool started
    call_0 (it would run 30 s). The restart does not run it again (S6): the call is answered
    with the synthetic ``interrupted, not re-run`` result, the model goes on to its next
    answer, the run completes and call_0 is in the side-effect log exactly once."""
    script = _with_tool(FAST, tool, duration=30.0)
    spec = _spec(tmp_path, [InputSpec("prompt")], script, store=store)
    run = run_child(spec, kill_when=lambda: "call_0" in _executions(spec), timeout=60.0)
    assert run.parent_killed and run.returncode == SIGKILL_RC, run.log_tail()
    assert _executions(spec) == Counter(call_0=1)
    first = _db(spec)
    (iid,) = first.inputs
    assert first.inputs[iid].current_state == "applied_pending_consumption"
    assert "call_0" not in first.tool_results(SID)  # killed before its result was committed
    snap = _terminal(spec)
    spec.sessions[0].script = _with_tool(FAST, tool)  # were it run again, it would be quick
    _finished(spec)
    if AGENT_RERUNS_INTERRUPTED_TOOLS:
        assert _executions(spec) == Counter(call_0=2), (
            "the tool was not run again: the agent is fixed, set "
            "AGENT_RERUNS_INTERRUPTED_TOOLS to False"
        )
        pytest.xfail("known S6 bug: the agent commits a tool call only with its result")
    db = _invariants(spec, [snap])
    assert _executions(spec) == Counter(call_0=1)
    (result,) = [r.message for r in db.rows if r.message.get("tool_call_id") == "call_0"]
    assert (result["content"], result.get("is_error")) == (INTERRUPTED_TOOL_RESULT, True)
    _assert_no_tool_rerun(db)
    assert db.inputs[iid].current_state == "consumed"
    assert _user_rows(db, iid) == 1
    out = _outcome(spec, iid)
    assert out["outcome_type"] == "completed"
    assert out["result"]["text"] == "the answer is 42"  # the model went on past the call


# ------------------------------------------------------------------------------ case 15


def test_conformance_15_ephemeral_input_lost_and_reported(tmp_path: Path, store: str) -> None:
    """An ephemeral prompt waits in the queue behind a run busy in a long tool call; the
    process is killed when the next durable prompt's acceptance commits (the ephemeral one
    rode along with that commit, S6). After the restart it is ``abandoned{recovery_failed}``,
    counted in the recovery report and the ``recovery.completed`` event (``inputs_lost``), and
    both durable prompts are kept and run."""
    slow = [dict(FAST[0], duration=30.0), *FAST[1:]]
    inputs = [InputSpec("prompt"), InputSpec("ephemeral"), InputSpec("prompt")]
    spec = _spec(tmp_path, inputs, slow, store=store)
    _killed(spec, "accept.committed:2")
    first = _db(spec)
    acked = _first_ids(spec)  # p0 and the ephemeral one; p1's kill came before its ack
    assert len(acked) == 2
    p0, eph = acked
    assert first.inputs[eph].current_state == "queued"
    p1 = next(i for i in first.inputs if i not in (p0, eph))
    snap = _terminal(spec)
    spec.sessions[0].script = FAST  # the restarted agent's tool is quick
    _finished(spec)
    db = _invariants(spec, [snap])
    lost = _doc(db, eph)
    assert lost["current_state"] == "abandoned"
    assert lost["terminal_outcome"]["reason"] == "recovery_failed"
    assert db.rows_naming(eph) == []
    out = _outcome(spec, eph)
    assert (out["outcome_type"], out["reason"]) == ("abandoned", "recovery_failed")
    (report,) = read_reports(spec.report)
    assert report["recovery_reports"][SID]["inputs_lost"] >= 1
    (event,) = db.recovery_reports(SID)
    assert event["inputs_lost"] >= 1
    for durable in (p0, p1):
        assert db.inputs[durable].current_state == "consumed"
        assert _user_rows(db, durable) == 1
        assert _outcome(spec, durable)["outcome_type"] == "completed"


# ------------------------------------------------------------------------------ case 16


@pytest.mark.parametrize("derived_policy", ["hold", "wake"])
def test_conformance_16_derived_input_rebuilt_after_crash(
    tmp_path: Path, derived_policy: str, store: str
) -> None:
    """A derived projected input (custom policy makes it runnable; ``hold``: it waits in the
    queue, ``wake``: it starts a run) is killed right after its acceptance committed. The
    restart rebuilds it through the registered projection rebuilder (S13): the old id ends
    ``superseded{superseded_by: new}``, the new input has a new id, the same reconstruction
    source and content; with ``wake`` the new one runs and is consumed once."""
    spec = _spec(tmp_path, [InputSpec("projected")], derived_policy=derived_policy, store=store)
    _killed(spec, "accept.committed:1")
    (old,) = _db(spec).inputs
    snap = _terminal(spec)
    _finished(spec)
    db = _invariants(spec, [snap])
    old_doc = _doc(db, old)
    assert old_doc["current_state"] == "superseded"
    new = old_doc["terminal_outcome"]["superseded_by"]
    assert new != old and new in db.inputs
    new_doc = _doc(db, new)
    assert new_doc["durability"] == "derived"
    assert new_doc["reconstruction_source"] == old_doc["reconstruction_source"]
    assert new_doc["reconstruction_source"]["source_type"] == "projection"
    for key in ("rule_id", "source_event_id", "content"):
        assert new_doc["persisted_input"][key] == old_doc["persisted_input"][key]
    assert db.rows_naming(old) == []
    out = _outcome(spec, old)
    assert (out["outcome_type"], out["superseded_by"]) == ("superseded", new)
    (event,) = db.recovery_reports(SID)
    assert event["inputs_rebuilt"] == 1
    if derived_policy == "wake":
        assert new_doc["current_state"] == "consumed"
        assert _user_rows(db, new) == 1
    else:
        assert new_doc["current_state"] == "queued"


# ------------------------------------------------------------------------------ regressions


def test_waiter_of_input_coalesced_before_the_crash_follows_its_aggregate(
    tmp_path: Path, store: str
) -> None:
    """Found by the kit: two progress responses arrive during a run's tool call and are
    coalesced into an aggregate that joins the run at its checkpoint; the process dies right
    after that checkpoint committed. After the restart the sources are terminal (coalesced)
    and not loaded, while the aggregate is pending again; waiting on a source used to answer
    ``not_found``. It must follow the aggregate (S12)."""
    slow = [dict(FAST[0], duration=0.5), *FAST[1:]]
    inputs = [InputSpec("prompt"), InputSpec("progress"), InputSpec("progress")]
    inputs.append(InputSpec("prompt"))
    spec = _spec(tmp_path, inputs, slow, store=store)
    _killed(spec, "checkpoint.after:1", "fork")
    first = _db(spec)
    coalesced = [i for i, s in first.inputs.items() if s.current_state == "coalesced"]
    assert len(coalesced) == 2
    agg = _doc(first, coalesced[0])["terminal_outcome"]["aggregate_id"]
    assert first.inputs[agg].current_state == "staged"
    snap = _terminal(spec)
    spec.sessions[0].script = FAST
    _finished(spec, launcher="fork")
    db = _invariants(spec, [snap])
    assert db.inputs[agg].current_state == "consumed"
    for source in coalesced:
        out = _outcome(spec, source)
        assert out["outcome_type"] == "completed", out
        assert out["via_aggregate_id"] == agg


def test_run_killed_after_consuming_its_inputs_at_the_boundary_is_closed(
    tmp_path: Path, store: str
) -> None:
    """Found by the kit: a system notice (``inject_now``: consumed at its boundary) is killed
    right after its boundary; nothing is pending afterwards, and recovery used to skip the
    runtime entirely, leaving the run ``running`` forever, so the notice's waiter could never
    resolve. Recovery must close the run (failed) and the waiter answer."""
    spec = _spec(tmp_path, [InputSpec("system")], store=store)
    _killed(spec, "boundary.after:1", "fork")
    first = _db(spec)
    (iid,) = first.inputs
    assert first.inputs[iid].current_state == "consumed"
    (run,) = first.runs.values()
    assert run.status == "running"
    snap = _terminal(spec)
    _finished(spec, launcher="fork")
    db = _invariants(spec, [snap])
    assert db.runs[str(run.run_id)].status == "failed"
    assert _outcome(spec, iid)["outcome_type"] == "completed_without_result"


# ------------------------------------------------------------------------------ the kit


KIT_KILLS = int(os.environ.get("MEERKAT_CRASHTEST_KILLS", "144"))


@pytest.fixture
def kit_dir(tmp_path: Path) -> Iterator[Path]:
    """A RAM disk directory if the machine has one (removed afterwards), else ``tmp_path``."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="meerkat-crashtest-", dir=shm))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_crashtest_kit_short_run(kit_dir: Path) -> None:
    """The kit with real SIGKILLs: every crash point at least ``KIT_KILLS // 9`` times plus
    random instants, zero violations. Failing trials' files are kept: on a RAM disk they are
    removed with the test, so rerun with ``--basetemp`` or the ``meerkat crashtest`` command
    (same seed) to inspect them."""
    started = time.monotonic()
    report = run_crashtest(KIT_KILLS, seed=20261126, workdir=kit_dir, jobs=3)
    elapsed = time.monotonic() - started
    unexpected = _unexpected([v.message for v in report.violations])
    assert unexpected == [], "\n\n".join(
        f"trial {v.trial} ({v.crash_at}, kept in {v.directory}): {v.message}"
        for v in report.violations
        if v.message in unexpected
    )
    assert set(report.points) == set(KILL_POINTS) == {*CRASH_POINTS, RANDOM}
    for stats in report.points.values():
        assert stats.runs >= KIT_KILLS // len(KILL_POINTS)
        if stats.point != RANDOM:  # a random instant may fall after the child finished
            assert stats.killed >= 1, stats
    assert report.sigkills >= KIT_KILLS * 3 // 4
    print(f"crash kit: {report.trials} trials, {report.sigkills} SIGKILLs in {elapsed:.1f}s")


KIT_PG_KILLS = int(os.environ.get("MEERKAT_CRASHTEST_PG_KILLS", "27"))


def _kit_schemas(prefix: str) -> list[str]:
    """The schemas of the test database whose names start with ``prefix`` (a kit run's)."""
    with psycopg.connect(pg.base_url(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, %s) ORDER BY 1",
            (prefix,),
        ).fetchall()
    return [str(r[0]) for r in rows]


def test_crashtest_kit_short_run_postgres(kit_dir: Path) -> None:
    """The kit on PostgreSQL (``run_crashtest(pg_url=...)``): every trial's child runs on a
    fresh schema of the test database, the parent reads it with the PostgreSQL reader; every
    crash point ``KIT_PG_KILLS // 9`` times plus random instants, zero violations, and every
    trial's schema dropped afterwards. A failing trial's schema is kept and named."""
    skip_without_postgres()
    started = time.monotonic()
    report = run_crashtest(
        KIT_PG_KILLS, seed=20261127, workdir=kit_dir, jobs=3, pg_url=pg.base_url()
    )
    elapsed = time.monotonic() - started
    unexpected = _unexpected([v.message for v in report.violations])
    assert unexpected == [], "\n\n".join(
        f"trial {v.trial} ({v.crash_at}, schema {v.schema} kept in {report.store}): {v.message}"
        for v in report.violations
        if v.message in unexpected
    )
    assert report.store.startswith("postgresql://") and report.schema_prefix
    assert set(report.points) == set(KILL_POINTS)
    for stats in report.points.values():
        assert stats.runs >= KIT_PG_KILLS // len(KILL_POINTS)
    assert report.killed >= KIT_PG_KILLS * 2 // 3, report.points
    assert report.sigkills >= KIT_PG_KILLS * 3 // 4
    if report.ok:
        assert report.schemas_kept == []
        assert _kit_schemas(report.schema_prefix) == []  # every passing trial's was dropped
    else:  # only the known bug's tolerated violations (see above): nothing to inspect
        for name in report.schemas_kept:
            pg.drop_schema(name)
    done = f"{report.trials} trials, {report.sigkills} SIGKILLs in {elapsed:.1f}s"
    print(f"crash kit (PostgreSQL): {done}")


def test_crashtest_keeps_a_failing_trials_schema(
    kit_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL, a failing trial (trial 0 here, with a violation made up by the test)
    keeps its schema, with the child's data in it, and the report names it, in the trial's
    violations and ``schemas_kept``; the passing trial's schema is dropped."""
    skip_without_postgres()
    real = crashtest._trial

    def first_fails(plan: Any, *args: Any) -> crashtest.TrialResult:
        result = real(plan, *args)
        if plan.index == 0:
            result.violations.append("(x) made up by the test")
        return result

    monkeypatch.setattr(crashtest, "_trial", first_fails)
    base = pg.base_url()
    report = run_crashtest(
        2, seed=7, workdir=kit_dir, jobs=2, points=["boundary.after"], comms=0.0, pg_url=base
    )
    try:
        assert [(v.trial, v.message) for v in report.violations] == [(0, "(x) made up by the test")]
        kept = [f"{report.schema_prefix}00000"]
        assert report.schemas_kept == kept and report.violations[0].schema == kept[0]
        assert _kit_schemas(report.schema_prefix) == kept  # trial 1's was dropped
        held = read_db(pg_schema_url(base, kept[0]))
        assert held.inputs and held.rows  # the child's data, for a post-mortem
    finally:
        for name in _kit_schemas(report.schema_prefix):
            pg.drop_schema(name)


async def test_concurrent_inbox_passes_during_recovery_admit_an_input_once(
    tmp_path: Path,
) -> None:
    """Found while running the crash suite under load (the two-process takeover test): while a
    runtime recovers, ``accept`` waits (S7), and two inbox passes (the maintainer's and a
    waiter's) could both read the same inbox entry; the second admission was refused as a
    duplicate id and ``ingest`` then replaced the admitted input with an abandoned placeholder,
    so an acknowledged input ended ``abandoned{failed}``. It must be admitted exactly once."""
    url = f"sqlite:///{tmp_path / 'inbox.db'}"
    script = [{"type": "text", "text": "done"}]
    async with Runtime.open(url, lease_ttl=30.0) as owner, Runtime.open(url) as other:
        session = await owner.create_session(offline_script=script)
        rt = owner.runtime(session.id)
        rt._ready.clear()  # as while recovering: accept waits for the instance to be ready
        pushed = await other.accept(session.id, PromptInput.new("through the inbox"))
        assert isinstance(pushed, Accepted)  # into the durable inbox: the owner holds the lease
        passes = asyncio.gather(owner._ingest(rt), owner._ingest(rt))
        await asyncio.sleep(0.3)  # the maintainer's pass joins in
        rt._ready.set()
        await passes
        state = await owner.get_input_state(session.id, pushed.input_id)
        assert state.current_state.value != "abandoned", state.terminal_outcome
        outcome = await owner.wait(session.id, pushed.input_id, timeout=10)
        assert outcome.outcome_type == "completed", outcome


def test_check_invariants_flags_each_kind_of_violation(tmp_path: Path, store: str) -> None:
    """The kit's checker is not vacuous: starting from a clean run's database (no violation),
    each tampering with the evidence is reported under its invariant."""
    inputs = [InputSpec("prompt"), InputSpec("ephemeral"), InputSpec("prompt")]
    spec = _spec(tmp_path, inputs, store=store)
    _finished(spec, launcher="fork")
    acks = read_acks(spec.ack_log)
    outcomes = read_outcomes(spec.outcomes)
    assert outcomes is not None
    clean = _db(spec)
    snap = clean.terminal_states()
    log = read_tool_log(spec.tool_log_path)
    assert [e.call_id for e in log] == sorted(clean.tool_results(SID)) and len(log) == 3
    assert check_invariants(clean, acks, outcomes, [snap], log) == []
    p0 = acks[0].input_id

    def flagged(
        db: DbView,
        outs: dict[str, Any] | None = outcomes,
        tools: list[ToolExecution] = log,
    ) -> list[str]:
        return [v[:3] for v in check_invariants(db, acks, outs, [snap], tools)]

    lost = _db(spec)
    del lost.inputs[p0]
    assert "(a)" in flagged(lost)
    pending = _db(spec)
    pending.inputs[p0].is_terminal = False
    pending.inputs[p0].current_state = "queued"
    assert "(a)" in flagged(pending)
    twice = _db(spec)
    twice.rows.append(twice.rows_naming(p0)[0])
    assert "(b)" in flagged(twice)
    rerun = _db(spec)
    rerun.rows.extend(r for r in list(rerun.rows) if r.message.get("role") == "tool")
    assert "(b)" in flagged(rerun)
    forged = _db(spec)
    forged.rows[1].message["content"] = "rewritten"
    assert "(b)" in flagged(forged)
    assert "(c)" in flagged(clean, {k: v for k, v in outcomes.items() if k != p0})
    assert "(c)" in flagged(clean, {**outcomes, p0: {"outcome_type": "terminated"}})
    assert "(c)" in flagged(clean, {**outcomes, p0: {"outcome_type": "cancelled"}})
    assert "(c)" in flagged(clean, None)
    changed = _db(spec)
    changed.inputs[p0].state_json = changed.inputs[p0].state_json.replace(
        '"attempt_count":0', '"attempt_count":1'
    )
    assert flagged(changed) == ["(d)"]
    # (e) the side-effect log: a tool call executed twice (once per process, say)...
    again = ToolExecution(log[0].session, log[0].call_id, log[0].tool, log[0].pid + 1)
    assert set(flagged(clean, tools=[*log, again])) == {"(e)"}
    # ...a committed result no execution produced, an execution of a call never committed
    assert flagged(clean, tools=log[1:]) == ["(e)"]
    ghost = ToolExecution(SID, "call_99", "lookup", log[0].pid)
    assert flagged(clean, tools=[*log, ghost]) == ["(e)"]
    # a call answered "interrupted, not re-run" may have run once (its result lost), not twice
    interrupted = _db(spec)
    (row,) = [r for r in interrupted.rows if r.message.get("tool_call_id") == log[0].call_id]
    row.message["content"] = INTERRUPTED_TOOL_RESULT
    assert flagged(interrupted) == ["(b)"]  # the rewritten row breaks the digest chain only
    assert flagged(interrupted, tools=log[1:]) == ["(b)"]
    assert flagged(interrupted, tools=[*log, again]) == ["(b)", "(e)"]
