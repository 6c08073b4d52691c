"""Conformance cases 17 and 18 (spec §5) with the real turn loop, on every store.

``test_conformance.py`` covers 17 and 18 with offline-scripted delays and simulated tools; here
the long waits are the real thing:

- 17: an ``OpenAIModel`` / ``AnthropicModel`` (the real SDK clients) streams from a loopback
  HTTP server that sends two text deltas and then pauses 30 s. The cancel must close the
  stream (the server sees the client hang up), answer the waiter ``cancelled`` and commit
  nothing of the partial answer.
- 18: registered application tools that take 30 s (an async one and a sync one blocked on a
  ``threading.Event``), and the built-in ``wait`` tool, called by an offline-scripted step.
  The cancel must end the tool promptly (``tool_execution_cancelled``), discard whatever the
  tool produces later, and the next turn must answer the interrupted call with the synthetic
  ``INTERRUPTED_TOOL_RESULT`` before its model call instead of running the tool again (S6).

Every test waits for the agent event that proves the long wait really started (``text_delta``
for a stream, ``tool_execution_started`` for a tool) before it cancels, and reads events
through the public ``Runtime.events``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from meerkat_runtime import InputLifecycleState, Message, Runtime, RuntimeState
from meerkat_runtime.core.agent import INTERRUPTED_TOOL_RESULT, AgentConfig, AgentExecutor
from meerkat_runtime.core.tools import ToolRegistry
from meerkat_runtime.llm.anthropic import AnthropicModel
from meerkat_runtime.llm.base import ModelRequest, ModelResponse, TextSink
from meerkat_runtime.llm.offline import OfflineModel
from meerkat_runtime.llm.openai import OpenAIModel
from meerkat_runtime.runtime.events import RuntimeEventEnvelope
from meerkat_runtime.runtime.outcomes import CancelledWait, CompletedWait
from tests.conformance.stores import StoreFactory
from tests.conformance.test_conformance import flushed, open_runtime, state_of, stored, until
from tests.providers.loopback import LoopbackServer, Reply, sse

IS = InputLifecycleState

PROVIDER_ENV = (
    "OPENAI_API_KEY",
    "RKAT_OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "RKAT_OPENAI_BASE_URL",
    "OPENAI_ORG_ID",
    "OPENAI_PROJECT_ID",
    "OPENAI_CUSTOM_HEADERS",
    "ANTHROPIC_API_KEY",
    "RKAT_ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "RKAT_ANTHROPIC_BASE_URL",
    "ANTHROPIC_AUTH_TOKEN",
    "ANTHROPIC_CUSTOM_HEADERS",
    "ANTHROPIC_PROFILE",
)

LONG = 30.0
"""How long every wait in this file would last if the cancel did not end it."""


# ------------------------------------------------------------------------------ helpers


async def agent_events(rt: Runtime, sid: str) -> list[dict[str, Any]]:
    """The agent events of the session so far (``data`` of category ``agent``), in order."""
    return [e.event["data"] async for e in rt.events(sid) if e.event["category"] == "agent"]


async def all_events(rt: Runtime, sid: str) -> list[RuntimeEventEnvelope]:
    return [e async for e in rt.events(sid)]


async def until_agent_event(
    rt: Runtime, sid: str, pred: Callable[[dict[str, Any]], bool], timeout: float = 5.0
) -> dict[str, Any]:
    """Poll ``rt.events`` until an agent event matching ``pred`` was published."""
    deadline = time.monotonic() + timeout
    while True:
        for data in await agent_events(rt, sid):
            if pred(data):
                return data
        if time.monotonic() > deadline:
            raise AssertionError("agent event not published in time")
        await asyncio.sleep(0.005)


async def until_true(pred: Callable[[], bool], timeout: float) -> None:
    """Like ``until``, for a condition another thread changes (the loopback server's)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


async def cancel_promptly(rt: Runtime, sid: str, handle: Any) -> None:
    """Cancel the session's run now (it is inside a long wait) and check S8: the waiter answers
    ``cancelled`` within 1 s, the input ended consumed (its boundary was applied), in memory
    and in the store, and the runtime returns to idle with nothing left to cancel."""
    assert state_of(rt, sid, handle.input_id) is IS.APPLIED_PENDING_CONSUMPTION
    assert rt.runtime_state(sid) is RuntimeState.RUNNING
    t0 = time.monotonic()
    assert await rt.interrupt(sid) is True
    out = await handle.wait(1.0)
    elapsed = time.monotonic() - t0
    assert isinstance(out, CancelledWait), out
    assert elapsed < 1.0, f"cancel took {elapsed:.3f} s"
    assert state_of(rt, sid, handle.input_id) is IS.CONSUMED
    assert (await stored(rt, sid))[handle.input_id].current_state is IS.CONSUMED
    await until(lambda: rt.runtime_state(sid) is RuntimeState.IDLE, 1.0)
    assert rt.runtime(sid).active_run_id is None
    assert await rt.interrupt(sid) is False  # nothing left to cancel


async def committed(rt: Runtime, sid: str) -> list[Message]:
    """The session's conversation as the store holds it (after every commit is durable)."""
    await flushed(rt)
    return [r.message for r in await rt.store.load_conversation(sid)]


# ------------------------------------------------------------------------------ 17


def openai_stream() -> Reply:
    """Chat Completions SSE: two text deltas, then a 30 s pause before the end."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "gpt-test",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    chunks: list[bytes | str | float] = [
        *sse((None, chunk({"role": "assistant", "content": ""}))),
        *sse((None, chunk({"content": "partial "}))),
        *sse((None, chunk({"content": "answer"}))),
        LONG,
        *sse((None, chunk({"content": " never sent"}))),
        *sse((None, chunk({}, "stop"))),
        *sse((None, "[DONE]")),
    ]
    return Reply(headers={"content-type": "text/event-stream"}, chunks=chunks)


def anthropic_stream() -> Reply:
    """Messages API SSE: a text block with two deltas, then a 30 s pause before the end."""
    message: dict[str, Any] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 5, "output_tokens": 1},
    }

    def delta(text: str) -> tuple[str, dict[str, Any]]:
        body = {"type": "text_delta", "text": text}
        return ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": body})

    block = {"type": "text", "text": ""}
    chunks: list[bytes | str | float] = [
        *sse(
            ("message_start", {"type": "message_start", "message": message}),
            (
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": block},
            ),
            delta("partial "),
            delta("answer"),
        ),
        LONG,
        *sse(
            delta(" never sent"),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": 4},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ),
    ]
    return Reply(headers={"content-type": "text/event-stream"}, chunks=chunks)


def make_openai(server: LoopbackServer) -> OpenAIModel:
    return OpenAIModel("gpt-test", api_key="sk-test-key", base_url=server.url + "/v1")


def make_anthropic(server: LoopbackServer) -> AnthropicModel:
    return AnthropicModel("claude-test", api_key="sk-ant-test-key", base_url=server.url)


PROVIDERS: dict[str, tuple[Callable[[LoopbackServer], Any], Callable[[], Reply]]] = {
    "openai": (make_openai, openai_stream),
    "anthropic": (make_anthropic, anthropic_stream),
}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROVIDER_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    with LoopbackServer() as s:
        yield s


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
async def test_conformance_17_cancel_during_long_model_stream(
    store_factory: StoreFactory, server: LoopbackServer, clean_env: None, provider: str
) -> None:
    make_model, reply = PROVIDERS[provider]
    server.push(reply())
    model = make_model(server)
    try:
        async with open_runtime(store_factory) as rt:
            ex = AgentExecutor(AgentConfig(model=model.name, provider=provider), model=model)
            s = await rt.create_session(model=model.name, provider=provider, executor=ex)
            h = await rt.turn(s.id, "think hard")
            # the stream is really open: its deltas were published. Wait for the last one
            # before the pause, so the client has read every byte sent so far and its
            # hang-up is a FIN (closing with unread bytes would send a TCP reset, which the
            # loopback server does not notice: it would keep the stream open for 30 s)
            first = await until_agent_event(rt, s.id, lambda d: d["type"] == "text_delta")
            assert first["delta"] == "partial "
            await until_agent_event(rt, s.id, lambda d: d.get("delta") == "answer")
            assert server.open_streams == 1
            assert len(server.requests) == 1
            await cancel_promptly(rt, s.id, h)

            # the client hung up: the server's paused reply ended
            await until_true(lambda: server.open_streams == 0, 1.0)
            assert len(server.requests) == 1  # cancelled, not retried

            # the partial text is not committed as an assistant message (memory and store)
            for messages in (rt.runtime(s.id).conversation.messages(), await committed(rt, s.id)):
                assert [m.role for m in messages] == ["user"]
                assert all("partial" not in (m.content or "") for m in messages)
            page = await rt.history(s.id)
            assert [m.role for m in page.messages] == ["user"]

            evs = await agent_events(rt, s.id)
            types = [d["type"] for d in evs]
            assert "text_delta" in types
            assert "text_complete" not in types and "run_completed" not in types
            failed = [d for d in evs if d["type"] == "run_failed"]
            assert len(failed) == 1 and failed[0]["error_kind"] == "cancelled"
            view = await rt.read_session(s.id)
            assert view.is_active is False
            assert view.last_assistant_text is None
    finally:
        await model.aclose()


# ------------------------------------------------------------------------------ 18


class RecordingOffline(OfflineModel):
    """The offline model, recording every request it answers."""

    def __init__(self, script: list[dict[str, Any]]) -> None:
        super().__init__(script)
        self.requests: list[ModelRequest] = []

    async def complete(
        self, request: ModelRequest, *, on_text: TextSink | None = None
    ) -> ModelResponse:
        self.requests.append(request)
        return await super().complete(request, on_text=on_text)


class SlowTools:
    """Two registered tools that take 30 s: ``slow_async`` sleeps, ``slow_sync`` blocks its
    pool thread on ``release``. Counts calls; records what each saw and returned."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {"slow_async": 0, "slow_sync": 0}
        self.async_cancelled = False
        self.release = threading.Event()
        self.sync_returned = threading.Event()
        self.registry = ToolRegistry()
        self.registry.register(self.slow_async)
        self.registry.register(self.slow_sync)

    async def slow_async(self, topic: str) -> str:
        """Look something up slowly."""
        self.calls["slow_async"] += 1
        try:
            await asyncio.sleep(LONG)
        except asyncio.CancelledError:
            self.async_cancelled = True
            raise
        return f"LATE-ASYNC-RESULT {topic}"

    def slow_sync(self, topic: str) -> str:
        """Compute something slowly (blocks a thread)."""
        self.calls["slow_sync"] += 1
        try:
            self.release.wait(LONG)
            return f"LATE-SYNC-RESULT {topic}"
        finally:
            self.sync_returned.set()


@pytest.fixture
def slow_tools() -> Iterator[SlowTools]:
    tools = SlowTools()
    yield tools
    tools.release.set()  # no pool thread outlives the test
    if tools.calls["slow_sync"]:
        assert tools.sync_returned.wait(5)


async def cancel_tool_call(rt: Runtime, model: RecordingOffline, sid: str, name: str) -> None:
    """Start a run whose first answer calls ``name`` (call id ``call_0``), cancel while the tool
    runs and check the cancel: prompt, ``tool_execution_cancelled`` published, nothing of the
    call reported completed, no further model call, the call committed without a result."""
    h = await rt.turn(sid, "use the slow tool")
    started = await until_agent_event(rt, sid, lambda d: d["type"] == "tool_execution_started")
    assert (started["id"], started["name"]) == ("call_0", name)
    await asyncio.sleep(0.05)  # well inside the tool's 30 s
    await cancel_promptly(rt, sid, h)
    evs = await agent_events(rt, sid)
    cancelled = [d for d in evs if d["type"] == "tool_execution_cancelled"]
    assert [(d["id"], d["name"]) for d in cancelled] == [("call_0", name)]
    assert not [d for d in evs if d["type"] == "tool_execution_completed"]
    assert [d["error_kind"] for d in evs if d["type"] == "run_failed"] == ["cancelled"]
    assert len(model.requests) == 1
    # the call was made durable before the tool ran; no result of it was committed (S6)
    kept = await committed(rt, sid)
    calls = [(c.id, c.name) for m in kept if m.role == "assistant" for c in m.tool_calls]
    assert calls == [("call_0", name)]
    assert [m for m in kept if m.role == "tool"] == []


async def next_turn_answers_interrupted_call(
    rt: Runtime, model: RecordingOffline, sid: str, name: str
) -> None:
    """After ``cancel_tool_call``: the next turn's model call sees ``call_0`` answered with
    the synthetic ``INTERRUPTED_TOOL_RESULT`` before the new prompt, and the tool does not
    run again (S6). Fails fast (instead of waiting out a 30 s tool) if the call is re-run."""
    nxt = await rt.turn(sid, "and now?")
    done = asyncio.ensure_future(nxt.wait(5.0))
    while not done.done():
        evs = await agent_events(rt, sid)
        starts = [d for d in evs if d["type"] == "tool_execution_started"]
        if len(starts) > 1:
            done.cancel()
            raise AssertionError(f"the interrupted tool call was run again: {starts}")
        await asyncio.sleep(0.005)
    out = done.result()
    assert isinstance(out, CompletedWait), out
    assert out.result.text == "after the interruption"

    assert len(model.requests) == 2
    seen = model.requests[1].messages
    shape = [(m.role, m.tool_call_id, m.content) for m in seen]
    answer = ("tool", "call_0", INTERRUPTED_TOOL_RESULT)
    assert answer in shape, shape
    assert shape.index(answer) < shape.index(("user", None, "and now?"))
    calls = [c for m in seen if m.role == "assistant" for c in m.tool_calls]
    assert [(c.id, c.name) for c in calls] == [("call_0", name)]
    answers = [m for m in seen if m.role == "tool" and m.tool_call_id == "call_0"]
    assert len(answers) == 1 and answers[0].is_error
    # and so it stays in the store
    stored_answers = [
        m.content
        for m in await committed(rt, sid)
        if m.role == "tool" and m.tool_call_id == "call_0"
    ]
    assert stored_answers == [INTERRUPTED_TOOL_RESULT]
    starts = [d for d in await agent_events(rt, sid) if d["type"] == "tool_execution_started"]
    assert len(starts) == 1


def _script(first: dict[str, Any]) -> list[dict[str, Any]]:
    return [first, {"type": "text", "text": "after the interruption"}]


def _tool_step(name: str) -> dict[str, Any]:
    if name == "wait":
        return {"type": "wait", "timeout": LONG}
    return {"type": "tool", "name": name, "args": {"topic": "cats"}}


@pytest.mark.parametrize("name", ["slow_async", "slow_sync"])
async def test_conformance_18_cancel_during_long_tool_call(
    store_factory: StoreFactory, slow_tools: SlowTools, name: str
) -> None:
    model = RecordingOffline(_script(_tool_step(name)))
    async with open_runtime(store_factory) as rt:
        ex = AgentExecutor(AgentConfig(), model=model, tools=slow_tools.registry)
        s = await rt.create_session(executor=ex)
        await cancel_tool_call(rt, model, s.id, name)
        assert slow_tools.calls == {"slow_async": 0, "slow_sync": 0} | {name: 1}
        if name == "slow_async":
            assert slow_tools.async_cancelled  # the tool task saw CancelledError
        else:
            # the thread cannot be interrupted: let it finish now; its result is discarded
            assert not slow_tools.sync_returned.is_set()
            slow_tools.release.set()
            assert await asyncio.to_thread(slow_tools.sync_returned.wait, 5)
            await asyncio.sleep(0.05)  # give a (wrong) late delivery the chance to land
        late = "LATE-ASYNC-RESULT" if name == "slow_async" else "LATE-SYNC-RESULT"
        for messages in (rt.runtime(s.id).conversation.messages(), await committed(rt, s.id)):
            assert all(late not in (m.content or "") for m in messages)
            assert all(m.role != "tool" or m.content != "ok" for m in messages)
        assert all(late not in str(d) for d in await agent_events(rt, s.id))
        assert rt.runtime_state(s.id) is RuntimeState.IDLE


async def test_conformance_18_cancel_during_builtin_wait(store_factory: StoreFactory) -> None:
    model = RecordingOffline(_script(_tool_step("wait")))
    async with open_runtime(store_factory) as rt:
        s = await rt.create_session(executor=AgentExecutor(AgentConfig(), model=model))
        await cancel_tool_call(rt, model, s.id, "wait")
        assert all(m.role != "tool" for m in await committed(rt, s.id))


@pytest.mark.parametrize("name", ["slow_async", "slow_sync", "wait"])
async def test_conformance_18_next_turn_answers_the_interrupted_call(
    store_factory: StoreFactory, slow_tools: SlowTools, name: str
) -> None:
    model = RecordingOffline(_script(_tool_step(name)))
    async with open_runtime(store_factory) as rt:
        ex = AgentExecutor(AgentConfig(), model=model, tools=slow_tools.registry)
        s = await rt.create_session(executor=ex)
        await cancel_tool_call(rt, model, s.id, name)
        slow_tools.release.set()  # a sync tool's thread ends now; its result stays discarded
        await next_turn_answers_interrupted_call(rt, model, s.id, name)
        if name != "wait":
            assert slow_tools.calls[name] == 1
