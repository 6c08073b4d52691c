"""Conformance cases 5-7 through comms between two processes sharing one SQLite file (S10,
S20): this process runs the requester (``coord``); a child process runs the responder
(``worker``, the built-in agent) and sends its responses on command. Requests reach the worker
through its durable inbox, responses reach the coordinator through its own; the coordinator's
runtime checks every response against its outstanding requests when it ingests it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from meerkat_runtime import InputLifecycleState, Runtime, RuntimeState
from meerkat_runtime.runtime.inputs import ResponseProgressConvention, ResponseTerminalConvention
from meerkat_runtime.runtime.outcomes import CompletedWait
from meerkat_runtime.runtime.policy import default_policy_table
from tests.comms.support import CONFIG, by_envelope, peer_input, until
from tests.helpers import ScriptedExecutor, settle

IS = InputLifecycleState

WORKER = textwrap.dedent(
    """
    import asyncio, json, sys
    from meerkat_runtime import Runtime

    async def main(db):
        rt = Runtime.open("sqlite:///" + db, lease_ttl=1.0, poll_interval=0.02)
        async with rt:
            script = [{"type": "text", "text": f"on it ({i})"} for i in range(20)]
            worker = await rt.create_session(comms_name="worker", offline_script=script)
            print(json.dumps({"ready": worker.id}), flush=True)
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader()
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
            while line := await reader.readline():
                cmd = json.loads(line)
                try:
                    if cmd.pop("op") == "send":
                        out = {"ok": await rt.comms_send(worker.id, **cmd)}
                    else:
                        states = await rt.store.load_input_states(worker.id)
                        out = {"ok": [s.current_state.value for s in states]}
                except Exception as exc:
                    out = {"error": f"{type(exc).__name__}: {exc}"}
                print(json.dumps(out), flush=True)

    asyncio.run(main(sys.argv[1]))
    """
)


class Worker:
    """The child process: ``send(**comms_send kwargs)`` and ``states()`` of the worker."""

    def __init__(self, proc: asyncio.subprocess.Process, session_id: str) -> None:
        self.proc = proc
        self.session_id = session_id

    async def _ask(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), 20)
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def send(self, **kw: Any) -> dict[str, Any]:
        return await self._ask({"op": "send", **kw})

    async def states(self) -> list[str]:
        answer = await self._ask({"op": "states"})
        states: list[str] = answer["ok"]
        return states


@asynccontextmanager
async def two_processes(tmp_path: Path, **coord: Any) -> AsyncIterator[tuple[Runtime, str, Worker]]:
    db = tmp_path / "comms.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WORKER,
        str(db),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if not line.startswith(b'{"ready"'):
            err = await proc.stderr.read() if proc.stderr else b""
            raise AssertionError(f"worker did not start: {line!r} {err.decode()[-2000:]}")
        worker = Worker(proc, json.loads(line)["ready"])
        rt = Runtime.open("sqlite:///" + str(db), config=CONFIG, lease_ttl=1.0, poll_interval=0.02)
        async with rt:
            sid = (await rt.create_session(comms_name="coord", **coord)).id
            yield rt, sid, worker
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def ask_worker(rt: Runtime, coord: str, worker: Worker) -> str:
    """coord -> worker request through the worker's inbox; returns the request id once the
    other process has consumed it (its agent ran on it)."""
    receipt = await rt.comms_send(coord, kind="request", to="worker", intent="sum", params={"n": 3})
    assert receipt["kind"] == "peer_request_sent"
    assert worker.session_id not in rt._runtimes  # the other process runs the worker
    for _ in range(500):
        if await worker.states() == ["consumed"]:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the worker process never consumed the request")
    rec = await rt.store.load_peer_request(coord, receipt["interaction_id"])
    assert rec is not None and rec.outstanding and rec.responder_runtime_id == worker.session_id
    return str(receipt["interaction_id"])


async def arrival(rt: Runtime, coord: str, envelope: str) -> Any:
    """The coordinator's input for ``envelope``, once this process ingested it (S10)."""
    await until(lambda: _has(rt, coord, envelope), timeout=10)
    return by_envelope(rt, coord, envelope)


def _has(rt: Runtime, coord: str, envelope: str) -> bool:
    try:
        by_envelope(rt, coord, envelope)
    except AssertionError:
        return False
    return True


async def test_case_05_across_processes_terminal_response_wakes_the_idle_requester(
    tmp_path: Path,
) -> None:
    cx = ScriptedExecutor()
    async with two_processes(tmp_path, executor=cx) as (rt, coord, worker):
        rid = await ask_worker(rt, coord, worker)
        assert cx.runs == []
        answer = await worker.send(
            kind="response", in_reply_to=rid, status="completed", result={"sum": 6}
        )
        receipt = answer["ok"]
        assert receipt["kind"] == "peer_response_sent" and receipt["in_reply_to"] == rid
        st = await arrival(rt, coord, receipt["envelope_id"])
        out = await rt.wait(coord, st.input_id, timeout=10)
        assert isinstance(out, CompletedWait)
        assert len(cx.runs) == 1 and cx.runs[0].input_ids == [st.input_id]
        assert cx.runs[0].boundary == "run_start"
        conv = peer_input(st).convention
        assert conv == ResponseTerminalConvention(request_id=rid, status="completed")  # type: ignore[arg-type]
        rec = await rt.store.load_peer_request(coord, rid)
        assert rec is not None and rec.status == "completed"

        # the other process is refused a second terminal response; nothing reaches coord
        again = await worker.send(kind="response", in_reply_to=rid, status="completed")
        assert again["error"].startswith("InvalidArgumentError: in_reply_to: request")
        assert "already closed (completed)" in again["error"]
        stranger = await worker.send(kind="response", in_reply_to="nope", status="failed")
        assert "is not outstanding" in stranger["error"]
        unknown = await worker.send(kind="message", to="nobody", body="x")
        assert "unknown peer 'nobody'" in unknown["error"]
        await asyncio.sleep(0.2)
        assert len(rt.list_inputs(coord, include_terminal=True)) == 1
        assert await rt.store.inbox_entries(coord) == []


async def test_case_06_across_processes_terminal_response_joins_the_active_run(
    tmp_path: Path,
) -> None:
    cx = ScriptedExecutor(["checkpoint_then_ok"])
    async with two_processes(tmp_path, executor=cx) as (rt, coord, worker):
        head = await rt.turn(coord, "ask, then think")
        await until(lambda: rt.runtime_state(coord) is RuntimeState.RUNNING)
        rid = await ask_worker(rt, coord, worker)
        receipt = (
            await worker.send(kind="response", in_reply_to=rid, status="completed", result=6)
        )["ok"]
        st = await arrival(rt, coord, receipt["envelope_id"])
        assert st.policy is not None
        assert st.policy.decision.apply_mode.value == "stage_run_boundary"
        assert st.current_state is IS.QUEUED
        cx.release.set()
        assert isinstance(await head.wait(10), CompletedWait)
        await settle(rt, coord)
        assert cx.runs[0].joined == [[st.input_id]]
        assert len(cx.runs) == 1
        assert rt.input_state(coord, st.input_id).current_state is IS.CONSUMED


async def test_case_07_across_processes_progress_response_does_not_wake(tmp_path: Path) -> None:
    cx = ScriptedExecutor()
    async with two_processes(tmp_path, executor=cx) as (rt, coord, worker):
        rid = await ask_worker(rt, coord, worker)
        envelopes = []
        for phase in ("accepted", "in_progress"):
            answer = await worker.send(kind="response", in_reply_to=rid, status=phase, result=1)
            envelopes.append(answer["ok"]["envelope_id"])
        states = [await arrival(rt, coord, e) for e in envelopes]
        await settle(rt, coord)
        await asyncio.sleep(0.1)
        assert cx.runs == []
        assert rt.runtime_state(coord) is RuntimeState.IDLE
        expected = default_policy_table().resolve("peer_response_progress", True)
        for st, phase in zip(states, ("accepted", "in_progress"), strict=True):
            st = rt.input_state(coord, st.input_id)
            assert st.current_state is IS.QUEUED
            assert st.policy is not None and st.policy.decision == expected
            conv = peer_input(st).convention
            assert conv == ResponseProgressConvention(request_id=rid, phase=phase)  # type: ignore[arg-type]
        rec = await rt.store.load_peer_request(coord, rid)
        assert rec is not None and rec.outstanding


@pytest.mark.parametrize("retries", [2])
async def test_a_retried_cross_process_send_delivers_once(tmp_path: Path, retries: int) -> None:
    cx = ScriptedExecutor()
    async with two_processes(tmp_path, executor=cx) as (rt, coord, worker):
        rid = await ask_worker(rt, coord, worker)
        env = "01959d7e-3c4a-7b2e-9f00-1a2b3c4d5e6f"
        answers = [
            await worker.send(
                kind="response", in_reply_to=rid, status="completed", result=6, envelope_id=env
            )
            for _ in range(retries)
        ]
        assert all(a.get("ok") == answers[0]["ok"] for a in answers), answers
        st = await arrival(rt, coord, env)
        await rt.wait(coord, st.input_id, timeout=10)
        await asyncio.sleep(0.2)
        assert len(rt.list_inputs(coord, include_terminal=True)) == 1
        assert len(cx.runs) == 1
