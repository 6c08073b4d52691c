"""Two built-in agents on the offline model talking through their comms tools, on every store:
the coordinator asks the worker (``send_request``), parks (``wait``) and answers the user with
the worker's result; the worker answers with ``respond``. Tool problems come back as error
results the model reads."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from meerkat_runtime import Runtime
from meerkat_runtime.core.lifecycle import ToolCall
from meerkat_runtime.core.tools import ToolRegistry
from meerkat_runtime.runtime.outcomes import CompletedWait
from tests.comms.support import open_runtime, until
from tests.conformance.stores import StoreFactory
from tests.helpers import ScriptedExecutor

WORKER_SCRIPT: list[dict[str, Any]] = [
    {"type": "tool", "name": "respond", "args": {"status": "accepted"}},
    {"type": "tool", "name": "respond", "args": {"status": "completed", "result": {"product": 42}}},
    {"type": "text", "text": "answered the coordinator"},
]


def coordinator_script(wait: float) -> list[dict[str, Any]]:
    # after the wait the script is used up: the offline model echoes the last user message,
    # which is the worker's response (it joined at the checkpoint after the wait)
    return [
        {"type": "tool", "name": "list_peers"},
        {
            "type": "tool",
            "name": "send_request",
            "args": {"to": "worker", "intent": "multiply", "params": {"a": 6, "b": 7}},
        },
        {"type": "wait", "timeout": wait},
    ]


async def messages(rt: Runtime, sid: str) -> list[Any]:
    return list((await rt.history(sid)).messages)


async def test_request_response_round_trip_between_two_agents(
    store_factory: StoreFactory,
) -> None:
    async with open_runtime(store_factory) as rt:
        worker = await rt.create_session(comms_name="worker", offline_script=WORKER_SCRIPT)
        coord = await rt.create_session(comms_name="coord", offline_script=coordinator_script(1.5))
        handle = await rt.turn(coord.id, "What is 6 x 7? Ask the worker.")
        out = await handle.wait(15)
        assert isinstance(out, CompletedWait) and out.result is not None
        answer = out.result.text
        assert "[peer response (completed) to request" in answer
        assert 'from worker] {"product":42}' in answer

        hist = await messages(rt, coord.id)
        tools = {m.name: m.content for m in hist if m.role == "tool"}
        assert json.loads(tools["list_peers"]) == [{"name": "worker", "peer_id": worker.id}]
        rid = tools["send_request"]
        assert tools["wait"] == "timeout"  # a terminal response does not end a wait (S1)
        # the progress update and the terminal response joined the coordinator's run
        users = [m.content for m in hist if m.role == "user"]
        assert users[0] == "What is 6 x 7? Ask the worker."
        assert any(f"[peer response (completed) to request {rid} from worker]" in u for u in users)
        rec = await rt.store.load_peer_request(coord.id, rid)
        assert rec is not None and rec.status == "completed" and rec.intent == "multiply"

        # the worker saw who asked, what and with which params, and answered through its tool
        await until(lambda: rt.runtime(worker.id).active_run_id is None)
        whist = await messages(rt, worker.id)
        assert whist[0].content == (
            f'[peer request {rid} from coord, intent multiply] {{"a":6,"b":7}}'
        )
        wtools = [m.content for m in whist if m.role == "tool"]
        assert wtools == [
            f"response (accepted) to request {rid} sent",
            f"response (completed) to request {rid} sent",
        ]
        assert whist[-1].content == "answered the coordinator"


async def test_comms_tools_are_offered_only_to_named_sessions(
    store_factory: StoreFactory,
) -> None:
    async with open_runtime(store_factory) as rt:
        named = await rt.create_session(comms_name="a")
        plain = await rt.create_session()
        names = set(rt._executors[named.id].tools.names())  # type: ignore[attr-defined]
        assert {"list_peers", "send_message", "send_request", "respond"} <= names
        assert rt._executors[plain.id].tools.names() == []  # type: ignore[attr-defined]


async def call(tools: ToolRegistry, sid: str, name: str, **args: Any) -> tuple[bool, str]:
    call = ToolCall(id="c1", name=name, arguments=args)
    outcome = await tools.execute(call, session_id=sid, cancelled=asyncio.Event())
    return outcome.is_error, outcome.content


async def test_tool_problems_are_error_results_the_model_reads(
    store_factory: StoreFactory,
) -> None:
    async with open_runtime(store_factory) as rt:
        me = await rt.create_session(comms_name="me")
        peer = await rt.create_session(executor=ScriptedExecutor(), comms_name="peer")
        gone = await rt.create_session(executor=ScriptedExecutor(), comms_name="gone")
        await rt.archive_session(gone.id)
        tools = rt._executors[me.id].tools  # type: ignore[attr-defined]
        assert isinstance(tools, ToolRegistry)

        err, text = await call(tools, me.id, "send_message", to="ghost", body="hi")
        assert err and text.startswith("error: to: unknown peer 'ghost'")
        err, text = await call(tools, me.id, "send_request", to="gone", intent="x")
        assert err and "peer 'gone' is archived" in text
        err, text = await call(tools, me.id, "respond", status="completed", result=1)
        assert err and "no request to this session is open" in text
        err, text = await call(tools, me.id, "respond", request_id="r-1", status="completed")
        assert err and "in_reply_to: request 'r-1' is not outstanding" in text
        err, text = await call(tools, me.id, "respond", request_id="r-1", status="done")
        assert err and "invalid arguments" in text
        assert await rt.store.list_peer_requests() == []

        # ok paths: a message, a request (its id comes back), implicit request id ambiguity
        err, text = await call(tools, me.id, "send_message", to="peer", body="hello")
        assert not err and text.startswith("message sent to peer (envelope ")
        peer_tools = rt.comms.rt._comms_tools
        assert peer_tools is not None
        ids = []
        for _ in range(2):
            err, rid = await call(tools, me.id, "send_request", to="peer", intent="x")
            assert not err
            ids.append(rid)
        err, text = await call(peer_tools, peer.id, "respond", status="completed")
        assert err and "2 requests to this session are open" in text and ids[0] in text
        err, text = await call(
            peer_tools, peer.id, "respond", request_id=ids[1], status="completed", result=[1]
        )
        assert not err and text == f"response (completed) to request {ids[1]} sent"
        err, text = await call(peer_tools, peer.id, "respond", status="failed", result="no")
        assert not err and ids[0] in text  # the one still open
        err, text = await call(peer_tools, peer.id, "respond", request_id=ids[0], status="failed")
        assert err and "already closed (failed)" in text


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "comms_coordinator.py"


async def test_the_coordinator_example_runs() -> None:
    example = EXAMPLE
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(example),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    text = out.decode()
    assert 'from worker] {"product":42}' in text.split("coordinator's conversation:")[0]
    assert text.rstrip().endswith("to worker: completed")
