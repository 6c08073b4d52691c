"""The agent's turn loop: events (pinned against the installed ``meerkat-sdk``), parallel
tool batches, tool problems, cancellation, budgets, structured output, provider retries,
turn metadata and immediate boundaries. Everything runs against ``tests.agent_fakes``."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from meerkat import events as sdk  # type: ignore[import-untyped]

from meerkat_runtime._ids import InputId
from meerkat_runtime.core import events as ev
from meerkat_runtime.core.agent import INTERRUPTED_TOOL_RESULT, AgentConfig, AgentExecutor
from meerkat_runtime.core.lifecycle import (
    ConversationAppend,
    ConversationAppendRole,
    ConversationContextAppend,
    Message,
    RunApplyBoundary,
    RunCancelled,
    RunFailure,
    RunResult,
    RuntimeTurnMetadata,
    StagedInput,
    StagedRunInput,
    TextRenderable,
    ToolCall,
    TurnToolOverlay,
    Usage,
)
from meerkat_runtime.core.tools import ToolRegistry
from meerkat_runtime.llm.base import BadRequestError, ModelError, RateLimitError
from meerkat_runtime.llm.retry import RetryPolicy
from tests.agent_fakes import (
    FakeRun,
    ScriptedModel,
    SpyModel,
    prompt,
    text_response,
    tool_response,
)

FAST_RETRY = RetryPolicy(max_attempts=4, base_delay=0.001, max_delay=0.002)
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"n": {"type": "integer"}},
    "required": ["n"],
    "additionalProperties": False,
}


def _offline(
    script: Any,
    config: AgentConfig | None = None,
    tools: ToolRegistry | None = None,
    primitive: StagedInput | None = None,
    **run_kw: Any,
) -> tuple[AgentExecutor, FakeRun, SpyModel]:
    """An agent on a recording offline model playing ``script``, and a run of ``go``."""
    log: list[str] = []
    holder: list[FakeRun] = []
    model = SpyModel(script, log, holder)
    run = FakeRun(primitive if primitive is not None else prompt("go"), log=log, **run_kw)
    holder.append(run)
    return AgentExecutor(config, model=model, tools=tools), run, model


def _scripted(
    model: ScriptedModel, tools: ToolRegistry | None = None, **config: Any
) -> tuple[AgentExecutor, FakeRun]:
    agent = AgentExecutor(AgentConfig(model=model.name, **config), model=model, tools=tools)
    return agent, FakeRun(prompt("go"))


def _tool_messages(run: FakeRun) -> list[Message]:
    return [m for m in run.conversation() if m.role == "tool"]


async def _apply_ok(agent: AgentExecutor, run: FakeRun) -> RunResult:
    result = await agent.apply(run)
    assert result is not None
    return result


# --- events -------------------------------------------------------------------------------


async def test_plain_text_run_emits_the_sdk_event_sequence_in_order() -> None:
    agent, run, _ = _offline([{"type": "text", "text": "the answer is 42"}])
    result = await _apply_ok(agent, run)
    assert result.text == "the answer is 42"
    deltas = run.of_type("text_delta")
    assert run.types() == [
        "run_started",
        "turn_started",
        *["text_delta"] * len(deltas),
        "text_complete",
        "turn_completed",
        "run_completed",
    ]
    assert len(deltas) == 4  # streamed word by word
    assert "".join(d["delta"] for d in deltas) == "the answer is 42"
    usage = {"input_tokens": 1, "output_tokens": 4}  # "go" in; four words out
    assert run.events[0] == {
        "type": "run_started",
        "session_id": "fake-session",
        "prompt": "go",
        "run_id": str(run.run_id),
    }
    assert run.events[1] == {"type": "turn_started", "turn_number": 1}
    assert run.events[-3] == {"type": "text_complete", "content": "the answer is 42"}
    assert run.events[-2] == {"type": "turn_completed", "stop_reason": "end_turn", "usage": usage}
    assert run.events[-1] == {
        "type": "run_completed",
        "session_id": "fake-session",
        "result": "the answer is 42",
        "usage": usage,
        "run_id": str(run.run_id),
    }


def _rich_tools() -> ToolRegistry:
    registry = ToolRegistry()

    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    async def boom() -> str:
        raise RuntimeError("kaput")

    async def hang() -> str:
        await asyncio.sleep(10)
        return "never"

    registry.register(add)
    registry.register(boom)
    registry.register(hang, timeout=0.05)
    return registry


async def _rich_run_events() -> list[dict[str, Any]]:
    """Events of a run with a retry, a tool batch (ok, error, timeout), a wait, a budget
    warning and a text answer, then of a run that fails."""
    script = [
        {"type": "fail", "error": "flaky provider"},
        {
            "type": "tools",
            "calls": [
                {"name": "add", "args": {"a": 2, "b": 3}},
                {"name": "boom"},
                {"name": "hang"},
            ],
        },
        {"type": "wait", "timeout": 0.01},
        {"type": "text", "text": "all done"},
    ]
    config = AgentConfig(retry=FAST_RETRY, max_tool_calls=5)
    agent, run, _ = _offline(script, config, _rich_tools())
    result = await _apply_ok(agent, run)
    assert result.text == "all done"
    failing, failed_run, _ = _offline([{"type": "fail", "error": "gone", "permanent": True}])
    with pytest.raises(RunFailure):
        await failing.apply(failed_run)
    return [*run.events, *failed_run.events]


def _sdk_value(value: Any) -> Any:
    """A parsed SDK field as wire JSON (its ``Usage`` without the unset cache fields)."""
    if isinstance(value, sdk.Usage):
        return {k: v for k, v in dataclasses.asdict(value).items() if v is not None}
    return value


async def test_every_sdk_event_the_agent_emits_parses_into_its_typed_sdk_class() -> None:
    events = await _rich_run_events()
    seen = {e["type"] for e in events}
    assert seen >= ev.SDK_EVENT_TYPES, f"not exercised: {ev.SDK_EVENT_TYPES - seen}"
    parsed: dict[str, list[Any]] = {}
    for raw in events:
        event = sdk.parse_event(raw)
        if raw["type"] not in ev.SDK_EVENT_TYPES:
            assert isinstance(event, sdk.UnknownEvent)  # ours: the SDK passes them through
            continue
        cls = sdk._EVENT_MAP[raw["type"]]
        assert type(event) is cls, raw
        for f in dataclasses.fields(cls):
            assert _sdk_value(getattr(event, f.name)) == raw[f.name], (raw, f.name)
        parsed.setdefault(raw["type"], []).append(event)

    started = parsed["run_started"]
    assert [(s.session_id, s.prompt) for s in started] == [("fake-session", "go")] * 2
    deltas = [d.delta for d in parsed["text_delta"]]
    assert "".join(deltas) == "all done"
    assert [c.content for c in parsed["text_complete"]] == ["all done"]
    requested = {e.name: e.args for e in parsed["tool_call_requested"]}
    assert requested == {"add": {"a": 2, "b": 3}, "boom": {}, "hang": {}, "wait": {"timeout": 0.01}}
    completed = {e.name: e for e in parsed["tool_execution_completed"]}
    assert (completed["add"].result, completed["add"].is_error) == ("5", False)
    assert completed["boom"].is_error is True
    assert completed["boom"].result == "error: RuntimeError: kaput"
    assert completed["hang"].is_error is True
    assert 40 <= completed["hang"].duration_ms < 1000
    (timed_out,) = parsed["tool_execution_timed_out"]
    assert (timed_out.name, timed_out.timeout_ms) == ("hang", 50)
    received = {e.name: e.is_error for e in parsed["tool_result_received"]}
    assert received == {"add": False, "boom": True, "hang": True, "wait": False}
    turns = parsed["turn_completed"]
    assert [t.stop_reason for t in turns] == ["tool_use", "tool_use", "end_turn"]
    assert turns[0].usage.input_tokens == 1  # "go"
    assert turns[2].usage.output_tokens == 2  # "all done"
    (completed_run,) = parsed["run_completed"]
    assert completed_run.result == "all done"
    assert completed_run.usage.input_tokens == sum(t.usage.input_tokens for t in turns)
    assert completed_run.usage.output_tokens == sum(t.usage.output_tokens for t in turns)
    (warning,) = parsed["budget_warning"]
    assert (warning.budget_type, warning.used, warning.limit) == ("tool_calls", 4, 5)
    assert warning.percent == 80.0
    (retry,) = parsed["retrying"]
    assert (retry.attempt, retry.max_attempts, retry.error) == (1, 4, "flaky provider")
    assert retry.delay_ms in (0, 1, 2)
    (failed,) = parsed["run_failed"]
    assert failed.error == "model 'offline' failed (scripted): gone"


def _samples() -> dict[str, dict[str, Any]]:
    """One event from each builder of an SDK type."""
    usage = Usage(input_tokens=3, output_tokens=4, cache_read_tokens=1)
    return {
        "run_started": ev.run_started("s", "p", "r"),
        "run_completed": ev.run_completed("s", "res", usage, "r"),
        "run_failed": ev.run_failed("s", "err", "budget", "r"),
        "turn_started": ev.turn_started(2),
        "text_delta": ev.text_delta("d"),
        "text_complete": ev.text_complete("c"),
        "tool_call_requested": ev.tool_call_requested("i", "n", {"a": 1}),
        "tool_result_received": ev.tool_result_received("i", "n", True),
        "turn_completed": ev.turn_completed("end_turn", usage),
        "tool_execution_started": ev.tool_execution_started("i", "n"),
        "tool_execution_completed": ev.tool_execution_completed("i", "n", "r", False, 5, "ok"),
        "tool_execution_timed_out": ev.tool_execution_timed_out("i", "n", 50),
        "budget_warning": ev.budget_warning("turns", 4, 5),
        "retrying": ev.retrying(1, 3, "e", 20, "rate_limit"),
    }


def test_sdk_event_types_match_the_sdk_event_map_and_fields() -> None:
    samples = _samples()
    assert set(samples) == ev.SDK_EVENT_TYPES  # a new SDK type needs a sample here
    for kind in sorted(ev.SDK_EVENT_TYPES):
        assert kind in sdk._EVENT_MAP, f"the SDK no longer knows {kind!r}"
        sample = samples[kind]
        assert sample["type"] == kind
        sdk_fields = {f.name for f in dataclasses.fields(sdk._EVENT_MAP[kind])}
        missing = sdk_fields - (set(sample) - {"type"})
        assert not missing, f"{kind}: our event lacks the SDK's fields {missing}"
    # Our own types are not (yet) SDK types; if the SDK adds one, move it to SDK_EVENT_TYPES.
    for ours in ("tool_execution_cancelled", "structured_output_invalid", "context_appended"):
        assert ours not in sdk._EVENT_MAP
    assert sdk.parse_event(samples["run_completed"]) == sdk.RunCompleted(
        session_id="s",
        result="res",
        usage=sdk.Usage(input_tokens=3, output_tokens=4, cache_read_tokens=1),
    )


# --- tools ----------------------------------------------------------------------------------


async def test_a_batch_of_async_tools_runs_in_parallel_and_results_keep_call_order() -> None:
    finished: list[str] = []
    registry = ToolRegistry()

    async def nap(tag: str, seconds: float) -> str:
        await asyncio.sleep(seconds)
        finished.append(tag)
        return f"slept {tag}"

    registry.register(nap)
    calls = [
        {"name": "nap", "args": {"tag": "a", "seconds": 0.3}},
        {"name": "nap", "args": {"tag": "b", "seconds": 0.25}},
        {"name": "nap", "args": {"tag": "c", "seconds": 0.2}},
    ]
    agent, run, _ = _offline(
        [{"type": "tools", "calls": calls}, {"type": "text", "text": "ok"}], tools=registry
    )
    started = time.monotonic()
    result = await _apply_ok(agent, run)
    elapsed = time.monotonic() - started
    assert elapsed < 0.6, f"the batch took {elapsed:.2f} s: not parallel"
    assert finished == ["c", "b", "a"]  # they finished in reverse order...
    assert run.log == [
        "boundary",
        "model:committed=1",
        "checkpoint",
        "checkpoint",
        "model:committed=5",
    ]
    # ...the calls are committed before the batch, the results by one checkpoint after it...
    (calls_message,), batch = run.checkpoint_commits
    assert calls_message.role == "assistant"
    assert [c.id for c in calls_message.tool_calls] == ["call_0_0", "call_0_1", "call_0_2"]
    assert [m.role for m in batch] == ["tool", "tool", "tool"]
    # ...and the results are appended in call order
    assert [(m.tool_call_id, m.content) for m in batch] == [
        ("call_0_0", "slept a"),
        ("call_0_1", "slept b"),
        ("call_0_2", "slept c"),
    ]
    assert (result.turns, result.tool_calls) == (2, 3)


async def test_sync_and_async_tools_and_a_raising_tool_from_offline_steps() -> None:
    threads: list[str] = []
    registry = ToolRegistry()

    def add(a: int, b: int) -> int:
        threads.append(threading.current_thread().name)
        return a + b

    async def shout(text: str) -> str:
        return text.upper()

    def explode() -> str:
        raise ValueError("kaput")

    for fn in (add, shout, explode):
        registry.register(fn)
    script = [
        {"type": "tool", "name": "add", "args": {"a": 2, "b": 3}},
        {"type": "tool", "name": "shout", "args": {"text": "hey"}},
        {"type": "tool", "name": "explode"},
        {"type": "text", "text": "recovered"},
    ]
    agent, run, model = _offline(script, tools=registry)
    result = await _apply_ok(agent, run)
    assert result.text == "recovered"
    assert [(m.content, m.is_error) for m in _tool_messages(run)] == [
        ("5", None),
        ("HEY", None),
        ("error: ValueError: kaput", True),
    ]
    assert threads and threads[0].startswith("meerkat-tool")
    error_result = Message(
        role="tool",
        content="error: ValueError: kaput",
        tool_call_id="call_2",
        name="explode",
        is_error=True,
    )
    assert model.requests[3].messages[-1] == error_result  # the model sees the error
    completed = run.of_type("tool_execution_completed")
    assert [(e["name"], e["status"], e["is_error"]) for e in completed] == [
        ("add", "ok", False),
        ("shout", "ok", False),
        ("explode", "error", True),
    ]
    assert run.types()[-1] == "run_completed"


async def test_bad_arguments_are_invalid_arguments_results_and_the_run_continues() -> None:
    registry = ToolRegistry()
    ran: list[int] = []

    def add(a: int, b: int) -> int:
        ran.append(a + b)
        return a + b

    registry.register(add)
    script = [
        {"type": "tool", "name": "add", "raw_args": "{not json"},
        {"type": "tool", "name": "add", "args": {"a": "x", "b": [1]}},
        {"type": "tool", "name": "simulated", "raw_args": "oops"},
        {"type": "text", "text": "fine"},
    ]
    agent, run, _ = _offline(script, tools=registry)
    result = await _apply_ok(agent, run)
    assert result.text == "fine"
    assert ran == []
    raw_result, typed_result, simulated_result = _tool_messages(run)
    assert raw_result.content.startswith(
        "error: invalid arguments for tool 'add': the arguments are not a JSON object: {not json"
    )
    assert typed_result.content.startswith("error: invalid arguments for tool 'add': a: ")
    assert "b: " in typed_result.content
    assert simulated_result.content == (
        "error: invalid arguments for tool 'simulated': not a JSON object: oops"
    )
    assert all(m.is_error for m in (raw_result, typed_result, simulated_result))
    statuses = [(e["name"], e["status"]) for e in run.of_type("tool_execution_completed")]
    assert statuses == [("add", "invalid_arguments")] * 2 + [("simulated", "invalid_arguments")]
    requested = [e["args"] for e in run.of_type("tool_call_requested")]
    assert requested == ["{not json", {"a": "x", "b": [1]}, "oops"]


async def test_unknown_tool_with_a_real_model_is_an_error_result_and_the_run_continues() -> None:
    registry = ToolRegistry()
    registry.register(lambda: "pong", name="ping")
    model = ScriptedModel(
        [tool_response(ToolCall(id="c1", name="nope", arguments={})), text_response("ok then")]
    )
    agent, run = _scripted(model, registry)
    result = await _apply_ok(agent, run)
    assert result.text == "ok then"
    (unknown,) = _tool_messages(run)
    assert unknown == Message(
        role="tool",
        content="error: unknown tool 'nope'; available tools: ping",
        tool_call_id="c1",
        name="nope",
        is_error=True,
    )
    assert model.requests[1].messages[-1] == unknown
    (completed,) = run.of_type("tool_execution_completed")
    assert (completed["status"], completed["is_error"]) == ("unknown_tool", True)


async def test_a_tool_past_its_timeout_is_a_timed_out_error_result_and_the_run_continues() -> None:
    registry = ToolRegistry()

    async def hang() -> str:
        await asyncio.sleep(10)
        return "never"

    registry.register(hang, timeout=0.05)
    agent, run, _ = _offline(
        [{"type": "tool", "name": "hang"}, {"type": "text", "text": "moving on"}], tools=registry
    )
    started = time.monotonic()
    result = await _apply_ok(agent, run)
    assert time.monotonic() - started < 1.0
    assert result.text == "moving on"
    assert run.of_type("tool_execution_timed_out") == [
        {"type": "tool_execution_timed_out", "id": "call_0", "name": "hang", "timeout_ms": 50}
    ]
    (completed,) = run.of_type("tool_execution_completed")
    assert (completed["status"], completed["is_error"]) == ("timeout", True)
    (timed_out,) = _tool_messages(run)
    assert (timed_out.content, timed_out.is_error) == (
        "error: tool 'hang' timed out after 0.05 s",
        True,
    )


# --- cancellation -----------------------------------------------------------------------------


async def _cancelled_within(run: FakeRun, apply: Callable[[], Any], after: float = 0.1) -> float:
    """Set ``run.cancelled`` after ``after`` seconds; return how long ``apply`` took from
    then to raise ``RunCancelled``."""
    set_at: list[float] = []

    def cancel() -> None:
        set_at.append(time.monotonic())
        run.cancelled.set()

    asyncio.get_running_loop().call_later(after, cancel)
    with pytest.raises(RunCancelled):
        await apply()
    assert set_at, "apply ended before the cancel"
    took = time.monotonic() - set_at[0]
    assert took < 0.5, f"RunCancelled {took:.2f} s after the cancel"
    assert run.events[-1]["type"] == "run_failed"
    assert run.events[-1]["error_kind"] == "cancelled"
    return took


async def test_cancel_during_a_long_async_tool() -> None:
    state: list[str] = []
    registry = ToolRegistry()

    async def slow() -> str:
        state.append("started")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            state.append("cancelled")
            raise
        return "never"

    registry.register(slow)
    agent, run, _ = _offline([{"type": "tool", "name": "slow"}], tools=registry)
    await _cancelled_within(run, lambda: agent.apply(run))
    assert state == ["started", "cancelled"]
    (cancelled,) = run.of_type("tool_execution_cancelled")
    assert cancelled["name"] == "slow"
    assert run.of_type("tool_execution_completed") == []
    # only the checkpoint before the tool ran: the call is committed, no result is
    assert run.log == ["boundary", "model:committed=1", "checkpoint"]
    assert [m.role for m in run.committed] == ["user", "assistant"]
    assert [m.role for m in run.pending] == ["tool"]


async def test_cancel_during_a_long_sync_tool_abandons_its_thread() -> None:
    release = threading.Event()
    state: list[str] = []
    registry = ToolRegistry()

    def blocking() -> str:
        state.append("started")
        release.wait(5)
        state.append("finished")
        return "late"

    registry.register(blocking)
    agent, run, _ = _offline([{"type": "tool", "name": "blocking"}], tools=registry)
    try:
        await _cancelled_within(run, lambda: agent.apply(run))
        assert state == ["started"]  # the thread is still running
        (cancelled,) = run.of_type("tool_execution_cancelled")
        assert cancelled["name"] == "blocking"
    finally:
        release.set()
    for _ in range(100):
        if "finished" in state:
            break
        await asyncio.sleep(0.01)
    assert state == ["started", "finished"]
    # its result is discarded: the call is answered as cancelled
    assert [(m.content, m.is_error) for m in _tool_messages(run)] == [
        ("error: tool 'blocking' was cancelled because the run was cancelled", True)
    ]


async def test_cancel_during_a_long_offline_model_stream() -> None:
    text = " ".join(f"w{i}" for i in range(100))
    agent, run, _ = _offline([{"type": "text", "text": text, "chunk_delay": 0.05}])
    await _cancelled_within(run, lambda: agent.apply(run), after=0.2)
    deltas = run.of_type("text_delta")
    assert 1 <= len(deltas) < 100  # it was streaming, and it stopped
    assert [m.role for m in run.conversation()] == ["user"]
    assert run.of_type("text_complete") == []


async def test_cancel_during_wait() -> None:
    agent, run, _ = _offline([{"type": "wait", "timeout": 30}])
    await _cancelled_within(run, lambda: agent.apply(run))
    assert run.log[-1] == "wait:30.0"
    (cancelled,) = run.of_type("tool_execution_cancelled")
    assert cancelled["name"] == "wait"


# --- the calls are durable before the tools run (S6) -----------------------------------------


async def test_the_tool_call_message_is_committed_before_any_tool_of_the_batch_starts() -> None:
    seen: list[tuple[str, int, Message, list[Message], list[str]]] = []
    holder: list[FakeRun] = []
    registry = ToolRegistry()

    def snapshot(name: str) -> None:
        run = holder[0]
        seen.append((name, len(run.committed), run.committed[-1], list(run.pending), [*run.log]))

    async def probe(x: int) -> str:
        snapshot("probe")
        return f"x={x}"

    def sync_probe() -> str:  # runs in a worker thread
        snapshot("sync_probe")
        return "sync"

    registry.register(probe)
    registry.register(sync_probe)
    calls = [{"name": "probe", "args": {"x": 1}}, {"name": "sync_probe"}]
    agent, run, _ = _offline(
        [{"type": "tools", "calls": calls}, {"type": "text", "text": "ok"}], tools=registry
    )
    holder.append(run)
    result = await _apply_ok(agent, run)
    assert result.text == "ok"
    turn_usage = Usage(**run.of_type("turn_completed")[0]["usage"])
    calls_message = Message(
        role="assistant",
        tool_calls=[
            ToolCall(id="call_0_0", name="probe", arguments={"x": 1}),
            ToolCall(id="call_0_1", name="sync_probe", arguments={}),
        ],
        usage=turn_usage,
    )
    # each tool, when it ran, found the call message committed (user, call) and nothing
    # pending, after exactly one checkpoint
    log_at_start = ["boundary", "model:committed=1", "checkpoint"]
    assert sorted(seen) == [
        ("probe", 2, calls_message, [], log_at_start),
        ("sync_probe", 2, calls_message, [], log_at_start),
    ]
    assert run.checkpoint_commits[0] == [calls_message]
    assert [(m.tool_call_id, m.content) for m in run.checkpoint_commits[1]] == [
        ("call_0_0", "x=1"),
        ("call_0_1", "sync"),
    ]


async def test_a_cancel_during_a_tool_leaves_the_call_committed_and_no_result() -> None:
    started: list[str] = []
    registry = ToolRegistry()

    async def slow(tag: str) -> str:
        started.append(tag)
        await asyncio.sleep(30)
        return "never"

    registry.register(slow)
    script = [
        {"type": "tool", "name": "slow", "args": {"tag": "first"}},
        {"type": "text", "text": "recovered"},
    ]
    agent, run, model = _offline(script, tools=registry)
    await _cancelled_within(run, lambda: agent.apply(run))
    assert started == ["first"]
    call = ToolCall(id="call_0", name="slow", arguments={"tag": "first"})
    assert [m.role for m in run.committed] == ["user", "assistant"]
    assert run.committed[1].tool_calls == [call]
    assert run.checkpoint_commits == [[run.committed[1]]]  # no result was ever committed
    (cancelled,) = run.pending
    assert (cancelled.role, cancelled.tool_call_id, cancelled.is_error) == ("tool", "call_0", True)

    # The runtime drops the uncommitted result with the run. The next run, on the committed
    # history, answers the call at its boundary as interrupted and does not run it again.
    nxt = FakeRun(prompt("again"), history=run.committed)
    model.run[:] = [nxt]
    result = await _apply_ok(agent, nxt)
    assert result.text == "recovered"
    assert nxt.boundary_deltas == [
        [
            Message(
                role="tool",
                content=INTERRUPTED_TOOL_RESULT,
                tool_call_id="call_0",
                name="slow",
                is_error=True,
            ),
            Message(role="user", content="again"),
        ]
    ]
    assert started == ["first"]
    assert nxt.of_type("tool_execution_started") == []


def _news(join_id: InputId) -> StagedRunInput:
    return StagedRunInput(
        boundary=RunApplyBoundary.RUN_CHECKPOINT,
        appends=[
            ConversationAppend(
                role=ConversationAppendRole.USER,
                content=TextRenderable(text="news"),
                input_id=join_id,
            )
        ],
        contributing_input_ids=[join_id],
    )


async def test_an_interrupting_input_joining_before_the_tools_ends_a_wait_and_follows_results() -> (
    None
):
    """An interrupting input that arrived during the model call (``run.interrupt`` set) joins
    at the checkpoint before the batch: the checkpoint keeps the interrupt, so the batch's
    ``wait`` returns at once, and the input is appended after the batch's results."""
    join_id = InputId.new()
    calls = [
        {"name": "wait", "args": {"timeout": 30}},
        {"name": "lookup", "result": "v=1"},
    ]
    agent, run, model = _offline(
        [{"type": "tools", "calls": calls}, {"type": "text", "text": "ok"}],
        joins=[_news(join_id), None],
    )
    run.interrupt.set()  # the interrupting input arrived while the model was called
    started = time.monotonic()
    result = await _apply_ok(agent, run)
    elapsed = time.monotonic() - started
    assert elapsed < 0.5, f"the wait waited: {elapsed:.2f} s"
    assert result.text == "ok"
    assert run.log == [
        "boundary",
        "model:committed=1",
        "checkpoint",
        "wait:30.0",
        "checkpoint",
        "model:committed=5",
    ]
    results_and_joined = [
        Message(role="tool", content="interrupted", tool_call_id="call_0_0", name="wait"),
        Message(role="tool", content="v=1", tool_call_id="call_0_1", name="lookup"),
        Message(role="user", content="news", input_ids=[join_id]),
    ]
    calls_commit, after_commit = run.checkpoint_commits
    assert [m.role for m in calls_commit] == ["assistant"]
    assert [c.id for c in calls_commit[0].tool_calls] == ["call_0_0", "call_0_1"]
    # the joined input comes after the batch's results, and the next call sees it
    assert after_commit == results_and_joined
    assert model.requests[1].messages[2:] == results_and_joined
    completed = {e["name"]: e for e in run.of_type("tool_execution_completed")}
    assert (completed["wait"]["result"], completed["wait"]["status"]) == ("interrupted", "ok")


async def test_a_non_interrupting_input_joining_before_the_tools_does_not_end_a_wait() -> None:
    """A joining input that does not interrupt (e.g. a progress update) rides along: the
    batch's ``wait`` runs to its timeout."""
    join_id = InputId.new()
    agent, run, _model = _offline(
        [
            {"type": "tools", "calls": [{"name": "wait", "args": {"timeout": 0.2}}]},
            {"type": "text", "text": "ok"},
        ],
        joins=[_news(join_id), None],
    )
    started = time.monotonic()
    await _apply_ok(agent, run)
    assert time.monotonic() - started >= 0.2
    completed = {e["name"]: e for e in run.of_type("tool_execution_completed")}
    assert completed["wait"]["result"] == "timeout"
    assert run.checkpoint_commits[1][-1] == Message(
        role="user", content="news", input_ids=[join_id]
    )


# --- budgets ----------------------------------------------------------------------------------


async def test_max_tool_calls_budget_is_a_permanent_failure_naming_it() -> None:
    script = [{"type": "tool", "name": "t"}] * 3 + [{"type": "text", "text": "never"}]
    agent, run, model = _offline(script, AgentConfig(max_tool_calls=2))
    with pytest.raises(RunFailure) as info:
        await agent.apply(run)
    assert info.value.permanent is True
    assert str(info.value) == (
        "budget exhausted: tool_calls limit 2 reached (used 2) before a final answer"
    )
    assert len(model.requests) == 2
    assert run.events[-1]["type"] == "run_failed"
    assert run.events[-1]["error_kind"] == "budget"


async def test_max_total_tokens_budget_is_a_permanent_failure_naming_it() -> None:
    words = " ".join(["word"] * 20)
    agent, run, model = _offline(
        [{"type": "tool", "name": "t"}, {"type": "text", "text": "never"}],
        AgentConfig(max_total_tokens=10),
        primitive=prompt(words),
    )
    with pytest.raises(RunFailure) as info:
        await agent.apply(run)
    assert info.value.permanent is True
    assert str(info.value).startswith("budget exhausted: tokens limit 10 reached (used 22)")
    assert len(model.requests) == 1


async def test_max_duration_budget_ends_a_slow_model_call() -> None:
    agent, run, _ = _offline(
        [{"type": "text", "text": "late", "delay": 5}], AgentConfig(max_duration=0.2)
    )
    started = time.monotonic()
    with pytest.raises(RunFailure) as info:
        await agent.apply(run)
    assert 0.15 < time.monotonic() - started < 1.0
    assert info.value.permanent is True
    assert str(info.value) == (
        "budget exhausted: wall_time_ms limit 200 reached during a model call"
    )


async def test_budget_warning_is_emitted_once_at_80_percent_of_max_turns() -> None:
    script = [{"type": "tool", "name": "t"}] * 9 + [{"type": "text", "text": "just in time"}]
    agent, run, _ = _offline(script, AgentConfig(max_turns=10))
    result = await _apply_ok(agent, run)
    assert (result.text, result.turns) == ("just in time", 10)
    warnings = run.of_type("budget_warning")
    assert warnings == [
        {"type": "budget_warning", "budget_type": "turns", "used": 8, "limit": 10, "percent": 80.0}
    ]
    # emitted before the ninth turn starts (8 of 10 turns used), and not again
    index = run.events.index(warnings[0])
    assert run.events[index + 1] == {"type": "turn_started", "turn_number": 9}


# --- structured output --------------------------------------------------------------------


async def test_a_valid_json_answer_is_parsed_into_structured_output() -> None:
    agent, run, model = _offline(
        [{"type": "text", "text": '{"n": 3}'}], AgentConfig(output_schema=SCHEMA)
    )
    result = await _apply_ok(agent, run)
    assert result.structured_output == {"n": 3}
    assert result.text == '{"n": 3}'
    assert model.requests[0].output_schema == SCHEMA
    assert run.of_type("structured_output_invalid") == []


async def test_an_invalid_answer_gets_a_correction_and_a_second_attempt() -> None:
    script = [{"type": "text", "text": "the answer is three"}, {"type": "text", "text": '{"n": 4}'}]
    agent, run, model = _offline(script, AgentConfig(output_schema=SCHEMA))
    result = await _apply_ok(agent, run)
    assert result.structured_output == {"n": 4}
    assert result.turns == 2
    (invalid,) = run.of_type("structured_output_invalid")
    assert (invalid["attempt"], invalid["max_attempts"]) == (1, 3)
    assert len(invalid["errors"]) == 1 and invalid["errors"][0].startswith("the answer is not JSON")
    roles = [m.role for m in run.conversation()]
    assert roles == ["user", "assistant", "system_notice", "assistant"]
    notice = run.conversation()[2]
    assert notice.content.startswith("Your final answer must be only a JSON value")
    assert invalid["errors"][0] in notice.content
    assert model.requests[1].messages[-1] == notice  # the model sees the correction
    # the rejected answer and the correction are committed before the corrective turn
    assert run.log == ["boundary", "model:committed=1", "checkpoint", "model:committed=3"]


async def test_an_always_invalid_answer_fails_permanently_after_the_retries() -> None:
    script = [{"type": "text", "text": '{"n": "x"}'}] * 3
    agent, run, model = _offline(
        script, AgentConfig(output_schema=SCHEMA, structured_output_retries=1)
    )
    with pytest.raises(RunFailure) as info:
        await agent.apply(run)
    assert info.value.permanent is True
    assert str(info.value).startswith("structured output invalid after 2 attempt(s): n: ")
    assert len(model.requests) == 2  # retries + 1
    attempts = [(e["attempt"], e["max_attempts"]) for e in run.of_type("structured_output_invalid")]
    assert attempts == [(1, 2), (2, 2)]


async def test_a_fenced_json_answer_is_accepted() -> None:
    agent, run, _ = _offline(
        [{"type": "text", "text": '```json\n{"n": 5}\n```'}], AgentConfig(output_schema=SCHEMA)
    )
    result = await _apply_ok(agent, run)
    assert result.structured_output == {"n": 5}
    assert run.of_type("structured_output_invalid") == []


def test_an_invalid_output_schema_is_refused_at_configuration() -> None:
    with pytest.raises(ValueError, match="output_schema is not a valid JSON Schema"):
        AgentConfig(output_schema={"type": "not-a-type"})


# --- provider retries -----------------------------------------------------------------------


async def test_transient_model_errors_are_retried_with_retrying_events() -> None:
    model = ScriptedModel(
        [
            ModelError("flaky 1", transient=True),
            ModelError("flaky 2", transient=True, kind="network"),
            text_response("third time lucky"),
        ]
    )
    agent, run = _scripted(model, retry=FAST_RETRY)
    result = await _apply_ok(agent, run)
    assert result.text == "third time lucky"
    assert len(model.requests) == 3
    retries = run.of_type("retrying")
    assert [(r["attempt"], r["max_attempts"], r["error"], r["error_kind"]) for r in retries] == [
        (1, 4, "flaky 1", "unknown"),
        (2, 4, "flaky 2", "network"),
    ]
    assert run.types().count("turn_started") == 1  # retries happen inside one turn


async def test_a_rate_limit_retry_waits_the_servers_retry_after() -> None:
    model = ScriptedModel([RateLimitError("slow down", retry_after=0.05), text_response("ok")])
    agent, run = _scripted(model, retry=FAST_RETRY)
    started = time.monotonic()
    result = await _apply_ok(agent, run)
    assert time.monotonic() - started >= 0.045
    assert result.text == "ok"
    (retry,) = run.of_type("retrying")
    assert (retry["delay_ms"], retry["error_kind"]) == (50, "rate_limit")


async def test_a_permanent_model_error_fails_at_once_without_retries() -> None:
    model = ScriptedModel([BadRequestError("no such model"), text_response("unused")])
    agent, run = _scripted(model, retry=FAST_RETRY)
    with pytest.raises(RunFailure) as info:
        await agent.apply(run)
    assert info.value.permanent is True
    assert str(info.value) == "model 'gpt-test' failed (bad_request): no such model"
    assert len(model.requests) == 1
    assert run.of_type("retrying") == []
    assert run.events[-1]["error_kind"] == "failed"


# --- turn metadata ----------------------------------------------------------------------------


async def test_blocked_tools_are_not_offered_and_a_call_to_one_is_an_error() -> None:
    ran: list[str] = []
    registry = ToolRegistry()

    def secret() -> str:
        ran.append("secret")
        return "classified"

    def public() -> str:
        return "hello"

    registry.register(secret)
    registry.register(public)
    meta = RuntimeTurnMetadata(flow_tool_overlay=TurnToolOverlay(blocked_tools=["secret"]))
    agent, run, model = _offline(
        [{"type": "tool", "name": "secret"}, {"type": "text", "text": "denied"}],
        tools=registry,
        primitive=prompt("go", turn_metadata=meta),
    )
    result = await _apply_ok(agent, run)
    assert result.text == "denied"
    assert [t.name for t in model.requests[0].tools] == ["wait", "public"]
    assert ran == []
    (blocked,) = _tool_messages(run)
    assert (blocked.content, blocked.is_error) == (
        "error: tool 'secret' is not available in this turn",
        True,
    )
    (completed,) = run.of_type("tool_execution_completed")
    assert completed["status"] == "unknown_tool"


async def test_allowed_tools_limit_the_offered_tools() -> None:
    registry = ToolRegistry()
    registry.register(lambda: "a", name="alpha")
    registry.register(lambda: "b", name="beta")
    meta = RuntimeTurnMetadata(flow_tool_overlay=TurnToolOverlay(allowed_tools=["beta"]))
    agent, run, model = _offline(
        [{"type": "text", "text": "x"}], tools=registry, primitive=prompt("go", turn_metadata=meta)
    )
    await agent.apply(run)
    assert [t.name for t in model.requests[0].tools] == ["beta"]


async def test_additional_instructions_become_system_notices_before_the_user_message() -> None:
    meta = RuntimeTurnMetadata(additional_instructions=["be brief", "use metric units"])
    agent, run, model = _offline(
        [{"type": "text", "text": "ok"}], primitive=prompt("hi", turn_metadata=meta)
    )
    await agent.apply(run)
    assert run.boundary_deltas == [
        [
            Message(role="system_notice", content="be brief"),
            Message(role="system_notice", content="use metric units"),
            Message(role="user", content="hi"),
        ]
    ]
    assert model.requests[0].messages == run.boundary_deltas[0]


async def test_provider_params_reach_the_model_request() -> None:
    meta = RuntimeTurnMetadata(provider_params={"temperature": 0.5, "seed": 7})
    agent, run, model = _offline(
        [{"type": "text", "text": "ok"}],
        AgentConfig(provider_params={"temperature": 0.1, "top_p": 0.9}),
        primitive=prompt("hi", turn_metadata=meta),
    )
    await agent.apply(run)
    assert model.requests[0].provider_params == {"temperature": 0.5, "top_p": 0.9, "seed": 7}


async def test_an_output_schema_override_applies_to_its_run_only() -> None:
    script = [{"type": "text", "text": '{"n": 1}'}, {"type": "text", "text": "plain words"}]
    meta = RuntimeTurnMetadata(output_schema=SCHEMA)
    agent, first, model = _offline(script, primitive=prompt("one", turn_metadata=meta))
    result = await _apply_ok(agent, first)
    assert result.structured_output == {"n": 1}
    assert model.requests[0].output_schema == SCHEMA
    second = FakeRun(prompt("two"), history=first.conversation())
    model.run[:] = [second]
    result = await _apply_ok(agent, second)
    assert (result.text, result.structured_output) == ("plain words", None)
    assert model.requests[1].output_schema is None
    assert second.of_type("structured_output_invalid") == []


# --- immediate boundary -----------------------------------------------------------------------


async def test_an_immediate_boundary_appends_context_without_a_model_call() -> None:
    input_id = InputId.new()
    primitive = StagedInput(
        boundary=RunApplyBoundary.IMMEDIATE,
        context_appends=[
            ConversationContextAppend(
                key="system-generated:1", content=TextRenderable(text="fyi"), input_id=input_id
            )
        ],
        contributing_input_ids=[input_id],
    )
    agent, run, model = _offline([{"type": "text", "text": "unused"}], primitive=primitive)
    assert await agent.apply(run) is None
    assert model.requests == []
    assert run.log == ["boundary"]
    assert run.committed == [
        Message(role="context", content="fyi", name="system-generated:1", input_ids=[input_id])
    ]
    assert run.events == [{"type": "context_appended", "count": 1}]
