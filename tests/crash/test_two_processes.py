"""S10 across processes on one SQLite file: one process owns and runs a session, another
accepts into it (through the durable inbox) and waits (by polling the store); when the owner
is killed with SIGKILL, the other takes the lease over after it expires and recovers the
session without losing or re-applying anything."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from meerkat_runtime import PromptInput, Runtime
from meerkat_runtime.runtime.outcomes import CompletedWait
from meerkat_runtime.store.sqlite import SqliteStore

OWNER = textwrap.dedent(
    """
    import asyncio, sys
    from meerkat_runtime import Runtime

    async def main(db, sid, delay):
        rt = Runtime.open("sqlite:///" + db, lease_ttl=1.0, poll_interval=0.05)
        async with rt:
            try:
                await rt.get_session(sid)
            except Exception:
                script = [
                    {"type": "text", "text": f"answer {i}", "delay": delay} for i in range(50)
                ]
                await rt.create_session(session_id=sid, offline_script=script)
            print("ready", flush=True)
            await asyncio.Event().wait()

    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
    """
)


def _spawn_owner(db: Path, sid: str, delay: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(db), sid, str(delay)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(
            f"owner did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}"
        )
    return proc


async def _user_rows(db: Path, sid: str) -> Counter[str]:
    store = SqliteStore(db)
    await store.open()
    try:
        rows = await store.load_conversation(sid)
    finally:
        await store.close()
    return Counter(str(i) for r in rows if r.message.role == "user" for i in r.input_ids)


async def test_s10_second_process_accepts_and_waits_through_the_inbox(tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    sid = "shared-session"
    owner = _spawn_owner(db, sid, delay=0.0)
    try:
        rt = Runtime.open("sqlite:///" + str(db), lease_ttl=1.0, poll_interval=0.05)
        async with rt:
            handles = [
                await rt.accept_with_completion(sid, PromptInput.new(f"q{i}")) for i in range(3)
            ]
            assert all(h.outcome.outcome_type == "accepted" for h in handles)
            # this process does not own the session: nothing runs here
            assert sid not in {s.id for s in rt.sessions() if rt._runtimes.get(s.id)}
            outcomes = [await h.wait(timeout=20) for h in handles]
            assert all(isinstance(o, CompletedWait) for o in outcomes), outcomes
            texts = sorted(o.result.text for o in outcomes if isinstance(o, CompletedWait))
            assert texts == ["answer 0", "answer 1", "answer 2"]
            # a retry with the same key from this process is deduplicated by the store
            key_input = PromptInput.new("once", idempotency_key="k-1")
            first = await rt.accept(sid, key_input)
            again = await rt.accept(sid, PromptInput.new("once", idempotency_key="k-1"))
            assert first.outcome_type == "accepted"
            assert again.outcome_type == "deduplicated"
            assert again.existing_id == key_input.id
            await rt.wait(sid, key_input.id, timeout=20)
    finally:
        owner.kill()
        owner.wait()
    counts = await _user_rows(db, sid)
    assert counts and max(counts.values()) == 1


async def test_s10_owner_killed_the_other_process_takes_over(tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    sid = "takeover-session"
    owner = _spawn_owner(db, sid, delay=2.0)  # every answer takes 2 s: runs are in flight
    try:
        rt = Runtime.open("sqlite:///" + str(db), lease_ttl=1.0, poll_interval=0.05)
        async with rt:
            handles = [
                await rt.accept_with_completion(sid, PromptInput.new(f"q{i}")) for i in range(3)
            ]
            # let the owner ingest them and start a run, then kill it mid-run
            for _ in range(400):  # up to 20 s: the machine may be loaded
                st = await rt.get_input_state(sid, handles[0].input_id)
                if st.current_state.value in ("staged", "applied_pending_consumption"):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the owner never started a run")
            owner.send_signal(signal.SIGKILL)
            owner.wait()
            assert owner.returncode == -signal.SIGKILL
            # waiting here follows the inputs: after the lease expires this process takes the
            # session over, recovers it (S7) and runs what is left
            outcomes = [await h.wait(timeout=30) for h in handles]
            assert all(isinstance(o, CompletedWait) for o in outcomes), outcomes
            assert rt.runtime(sid).generation >= 2
            report = rt.recovery_reports[sid]
            assert report["inputs_recovered"] >= 1
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    counts = await _user_rows(db, sid)
    assert set(counts) == {str(h.input_id) for h in handles}
    assert max(counts.values()) == 1, f"an input was applied twice: {json.dumps(counts)}"


@pytest.mark.parametrize("ttl", [1.0])
async def test_s10_stale_owner_cannot_write(tmp_path: Path, ttl: float) -> None:
    """A fenced-out instance's writes are refused by the store and its loop stops."""
    db = tmp_path / "fence.db"
    a = Runtime.open("sqlite:///" + str(db), lease_ttl=ttl, poll_interval=0.05)
    b = Runtime.open("sqlite:///" + str(db), lease_ttl=ttl, poll_interval=0.05)
    async with a:
        s = await a.create_session(offline_script=[{"type": "text", "text": "hi"}])
        rt_a = a.runtime(s.id)
        # pretend a's lease expired: b takes the session over (bumps the generation)
        await a.store.release_lease(s.id, a.owner_id, rt_a.generation)
        async with b:
            taken = await b._owned(s.id)
            assert taken is not None and taken.generation > rt_a.generation
            # a still believes it owns the session; its next write is refused
            try:
                await rt_a.accept(PromptInput.new("from the stale owner"))
            except Exception as exc:
                assert "fenced" in str(exc).lower() or "generation" in str(exc)
            await asyncio.sleep(0.05)
            assert rt_a.failure is not None
            assert rt_a.state.value == "stopped"


def test_s10_cli_goes_through_the_inbox_while_another_process_owns_the_session(
    tmp_path: Path,
) -> None:
    """`meerkat run --session` against a session a running process owns: the CLI accepts
    into the inbox, the owner runs the turn, and the CLI prints the owner's answer."""
    db = tmp_path / "cli.db"
    sid = "cli-session"
    owner = _spawn_owner(db, sid, delay=0.0)
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "meerkat_runtime.cli",
                "run",
                "--session",
                sid,
                "--store",
                f"sqlite:///{db}",
                "--json",
                "--timeout",
                "30",
                "from the cli",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        owner.kill()
        owner.wait()
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["outcome_type"] == "completed"
    assert doc["result"]["text"] == "answer 0"  # scripted by the owner: it ran the turn
