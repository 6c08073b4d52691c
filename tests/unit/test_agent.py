"""AgentExecutor against an in-memory RunContext: boundary, turn loop, checkpoints, waits,
cancellation, failures. (The fakes live in ``tests/agent_fakes.py``; the richer turn-loop
behaviour is covered by ``test_agent_loop.py``.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import pytest

from meerkat_runtime._ids import InputId
from meerkat_runtime.core.agent import (
    INTERRUPTED_TOOL_RESULT,
    AgentConfig,
    AgentExecutor,
    messages_from_staged,
)
from meerkat_runtime.core.lifecycle import (
    ConversationAppend,
    ConversationAppendRole,
    ConversationContextAppend,
    JsonRenderable,
    Message,
    ReferenceRenderable,
    RunApplyBoundary,
    RunCancelled,
    RunContext,
    RunFailure,
    RuntimeTurnMetadata,
    StagedInput,
    StagedRunInput,
    TextRenderable,
    ToolCall,
    Usage,
)
from meerkat_runtime.llm.retry import RetryPolicy
from tests.agent_fakes import FakeRun, SpyModel, prompt

_prompt = prompt


def _harness(
    primitive: StagedInput,
    script: Any = None,
    config: AgentConfig | None = None,
    **run_kw: Any,
) -> tuple[AgentExecutor, FakeRun, SpyModel, list[str]]:
    log: list[str] = []
    holder: list[FakeRun] = []
    model = SpyModel(script, log, holder)
    run = FakeRun(primitive, log=log, **run_kw)
    holder.append(run)
    return AgentExecutor(config, model=model), run, model, log


def _roles(messages: Sequence[Message]) -> list[str]:
    return [m.role for m in messages]


def test_fake_run_satisfies_the_protocol() -> None:
    assert isinstance(FakeRun(_prompt("x")), RunContext)


# --- boundary -----------------------------------------------------------------------------


async def test_boundary_committed_once_before_the_first_model_call() -> None:
    input_id = InputId.new()
    agent, run, _, log = _harness(_prompt("hello", input_id))
    result = await agent.apply(run)
    assert log == ["boundary", "model:committed=1"]
    assert run.boundary_deltas == [[Message(role="user", content="hello", input_ids=[input_id])]]
    assert result is not None
    assert result.text == 'offline model: you said "hello" (1 messages in the conversation)'
    assert (result.turns, result.tool_calls) == (1, 0)
    assert result.usage.input_tokens == 1
    assert result.usage.output_tokens == len(result.text.split())
    # one model call: the assistant message carries exactly that call's usage
    assert run.pending == [Message(role="assistant", content=result.text, usage=result.usage)]


async def test_default_agent_uses_the_offline_model() -> None:
    run = FakeRun(_prompt("ping"), history=[Message(role="user", content="old")])
    result = await AgentExecutor(session_id="sess-1").apply(run)
    assert result is not None
    assert result.text == 'offline model: you said "ping" (2 messages in the conversation)'
    assert result.session_id == "sess-1"


async def test_continuation_commits_an_empty_boundary_and_answers_from_history() -> None:
    history = [Message(role="user", content="q"), Message(role="assistant", content="a")]
    primitive = StagedInput(boundary=RunApplyBoundary.RUN_START)
    agent, run, _, log = _harness(
        primitive,
        [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}],
        history=history,
    )
    result = await agent.apply(run)
    assert run.is_continuation
    assert run.boundary_deltas == [[]]
    assert log == ["boundary", "model:committed=2"]
    assert result is not None and result.text == "second"


async def test_tool_calls_left_without_a_result_are_answered_at_the_boundary() -> None:
    done = ToolCall(id="call_0", name="a")
    dangling = [ToolCall(id="call_2", name="b"), ToolCall(id="call_3", name="wait")]
    history = [
        Message(role="user", content="u"),
        Message(role="assistant", tool_calls=[done]),
        Message(role="tool", content="ok", tool_call_id="call_0", name="a"),
        Message(role="assistant", tool_calls=dangling),
    ]
    agent, run, model, _ = _harness(_prompt("next"), history=history)
    await agent.apply(run)
    assert run.boundary_deltas == [
        [
            Message(
                role="tool",
                content=INTERRUPTED_TOOL_RESULT,
                tool_call_id="call_2",
                name="b",
                is_error=True,
            ),
            Message(
                role="tool",
                content=INTERRUPTED_TOOL_RESULT,
                tool_call_id="call_3",
                name="wait",
                is_error=True,
            ),
            Message(role="user", content="next"),
        ]
    ]
    assert INTERRUPTED_TOOL_RESULT == "interrupted, not re-run"
    assert len(model.requests[0].messages) == 7


async def test_boundary_renders_context_and_non_text_appends() -> None:
    ctx_id = InputId.new()
    staged = StagedRunInput(
        boundary=RunApplyBoundary.RUN_START,
        appends=[
            ConversationAppend(
                role=ConversationAppendRole.SYSTEM_NOTICE, content=JsonRenderable(value={"b": 1})
            ),
            ConversationAppend(
                role=ConversationAppendRole.USER,
                content=ReferenceRenderable(uri="file:///a.txt", label="a"),
            ),
        ],
        context_appends=[
            ConversationContextAppend(
                key="system-generated:1", content=TextRenderable(text="note"), input_id=ctx_id
            )
        ],
    )
    assert messages_from_staged(staged) == [
        Message(role="system_notice", content='{"b":1}'),
        Message(role="user", content="a <file:///a.txt>"),
        Message(role="context", content="note", name="system-generated:1", input_ids=[ctx_id]),
    ]


async def test_immediate_boundary_commits_and_returns_none_without_a_model_call() -> None:
    input_id = InputId.new()
    primitive = StagedInput(
        boundary=RunApplyBoundary.IMMEDIATE,
        context_appends=[
            ConversationContextAppend(
                key="system-generated:x", content=TextRenderable(text="fyi"), input_id=input_id
            )
        ],
        contributing_input_ids=[input_id],
    )
    # Even a pending before-boundary failure does not fire: no model call is made.
    agent, run, model, log = _harness(
        primitive, [{"type": "fail", "phase": "before_boundary", "permanent": True}]
    )
    assert await agent.apply(run) is None
    assert log == ["boundary"]
    assert model.requests == []
    assert run.committed == [
        Message(role="context", content="fyi", name="system-generated:x", input_ids=[input_id])
    ]
    assert run.pending == []


# --- tools, checkpoints, joins ----------------------------------------------------------------


async def test_tool_then_text_message_sequence_with_checkpoints_around_the_tools() -> None:
    script = [
        {"type": "tool", "name": "lookup", "args": {"k": 1}, "duration": 0.01, "result": "v=1"},
        {"type": "text", "text": "done"},
    ]
    agent, run, model, log = _harness(_prompt("go"), script)
    result = await agent.apply(run)
    # one checkpoint before the tool runs (S6), one after its result
    assert log == [
        "boundary",
        "model:committed=1",
        "checkpoint",
        "checkpoint",
        "model:committed=3",
    ]
    call = ToolCall(id="call_0", name="lookup", arguments={"k": 1})
    call_usage = Usage(input_tokens=1, output_tokens=2)  # "go" ; 1 + '{"k":1}'
    answer_usage = Usage(input_tokens=2, output_tokens=1)  # "go" + "v=1" ; "done"
    assert run.checkpoint_commits == [
        [Message(role="assistant", tool_calls=[call], usage=call_usage)],
        [Message(role="tool", content="v=1", tool_call_id="call_0", name="lookup")],
    ]
    assert run.conversation() == [
        Message(role="user", content="go"),
        Message(role="assistant", tool_calls=[call], usage=call_usage),
        Message(role="tool", content="v=1", tool_call_id="call_0", name="lookup"),
        Message(role="assistant", content="done", usage=answer_usage),
    ]
    assert result is not None
    assert (result.text, result.turns, result.tool_calls) == ("done", 2, 1)
    assert model.requests[1].tools[0].name == "wait"
    # usage is the sum over both calls
    assert result.usage == call_usage + answer_usage
    assert result.usage.input_tokens == 1 + 2  # "go" ; "go" + "v=1"
    assert result.usage.output_tokens == (1 + 1) + 1  # call: 1 + '{"k":1}' ; text: "done"


async def test_joined_inputs_from_a_checkpoint_are_appended_and_seen_by_the_next_call() -> None:
    join_id = InputId.new()
    joined = StagedRunInput(
        boundary=RunApplyBoundary.RUN_CHECKPOINT,
        appends=[
            ConversationAppend(
                role=ConversationAppendRole.USER,
                content=TextRenderable(text="also this"),
                input_id=join_id,
            )
        ],
        context_appends=[ConversationContextAppend(key="k", content=TextRenderable(text="ctx"))],
        contributing_input_ids=[join_id],
    )
    # Nothing joins at the checkpoint before the tool; ``joined`` joins at the one after it.
    # (Inputs joining before the tools: test_agent_loop.py.)
    agent, run, model, _ = _harness(
        _prompt("start"), [{"type": "tool", "name": "t"}], joins=[None, joined]
    )
    result = await agent.apply(run)
    joined_messages = [
        Message(role="user", content="also this", input_ids=[join_id]),
        Message(role="context", content="ctx", name="k"),
    ]
    # Not committed at the checkpoint that returned them; pending until the next commit.
    assert [[m.role for m in batch] for batch in run.checkpoint_commits] == [
        ["assistant"],
        ["tool"],
    ]
    assert run.committed == [
        Message(role="user", content="start"),
        *run.checkpoint_commits[0],
        *run.checkpoint_commits[1],
    ]
    assert model.requests[1].messages[3:] == joined_messages
    assert result is not None
    assert result.text == 'offline model: you said "also this" (5 messages in the conversation)'
    # 5 messages in: "start", the call, "ok", "also this", "ctx"
    answer_usage = Usage(input_tokens=5, output_tokens=len(result.text.split()))
    assert run.pending == [
        *joined_messages,
        Message(role="assistant", content=result.text, usage=answer_usage),
    ]


async def test_wait_step_returns_interrupted_when_the_run_is_interrupted() -> None:
    agent, run, _, log = _harness(
        _prompt("wait for it"), [{"type": "wait", "timeout": 5.0}, {"type": "text", "text": "woke"}]
    )
    asyncio.get_running_loop().call_later(0.05, run.interrupt.set)
    started = time.monotonic()
    result = await agent.apply(run)
    assert time.monotonic() - started < 1.0
    assert log == [
        "boundary",
        "model:committed=1",
        "checkpoint",
        "wait:5.0",
        "checkpoint",
        "model:committed=3",
    ]
    assert run.committed[2] == Message(
        role="tool", content="interrupted", tool_call_id="call_0", name="wait"
    )
    assert result is not None and result.text == "woke"


async def test_wait_step_returns_timeout_when_nothing_arrives() -> None:
    agent, run, _, _ = _harness(_prompt("w"), [{"type": "wait", "timeout": 0.01}])
    await agent.apply(run)
    assert run.committed[2].content == "timeout"


async def test_wait_with_a_bad_timeout_returns_an_error_result_without_waiting() -> None:
    agent, run, _, log = _harness(_prompt("w"), [{"type": "tool", "name": "wait", "args": {}}])
    await agent.apply(run)
    assert not any(entry.startswith("wait:") for entry in log)
    assert run.committed[2] == Message(
        role="tool",
        content="error: invalid arguments for tool 'wait': it takes "
        '{"timeout": <finite number of seconds, >= 0>}',
        tool_call_id="call_0",
        name="wait",
        is_error=True,
    )
    completed = run.of_type("tool_execution_completed")
    assert [(e["status"], e["is_error"]) for e in completed] == [("invalid_arguments", True)]


# --- cancellation -----------------------------------------------------------------------------


async def test_cancel_during_a_long_model_delay_ends_apply_promptly() -> None:
    agent, run, _, _ = _harness(_prompt("slow"), [{"type": "text", "text": "late", "delay": 30}])
    asyncio.get_running_loop().call_later(0.05, run.cancelled.set)
    started = time.monotonic()
    with pytest.raises(RunCancelled):
        await agent.apply(run)
    assert time.monotonic() - started < 1.0
    assert _roles(run.conversation()) == ["user"]


async def test_cancel_during_a_long_tool_ends_apply_promptly() -> None:
    agent, run, _, log = _harness(_prompt("t"), [{"type": "tool", "name": "slow", "duration": 30}])
    asyncio.get_running_loop().call_later(0.05, run.cancelled.set)
    started = time.monotonic()
    with pytest.raises(RunCancelled):
        await agent.apply(run)
    assert time.monotonic() - started < 1.0
    # only the checkpoint before the tool: the call is committed, its "cancelled" error
    # result never is, so the next boundary answers the call with INTERRUPTED_TOOL_RESULT
    assert log == ["boundary", "model:committed=1", "checkpoint"]
    call = ToolCall(id="call_0", name="slow")
    assert _roles(run.committed) == ["user", "assistant"]
    assert run.committed[1].tool_calls == [call]
    assert run.checkpoint_commits == [[run.committed[1]]]
    assert _roles(run.pending) == ["tool"]
    assert (run.pending[0].content, run.pending[0].is_error) == ("cancelled", True)
    assert run.of_type("tool_execution_cancelled")[0]["name"] == "slow"


async def test_cancel_during_wait_raises_run_cancelled() -> None:
    agent, run, _, _ = _harness(_prompt("t"), [{"type": "wait", "timeout": 30}])
    asyncio.get_running_loop().call_later(0.05, run.cancelled.set)
    started = time.monotonic()
    with pytest.raises(RunCancelled):
        await agent.apply(run)
    assert time.monotonic() - started < 1.0


async def test_task_cancellation_propagates_as_cancelled_error() -> None:
    agent, run, _, _ = _harness(_prompt("t"), [{"type": "text", "text": "x", "delay": 30}])
    task = asyncio.create_task(agent.apply(run))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("permanent", [False, True])
async def test_fail_step_raises_run_failure_after_the_boundary(permanent: bool) -> None:
    # A transient error is retried inside the call (two attempts here), so it has to fail
    # on every attempt to reach the runtime; a permanent one is not retried.
    agent, run, _, log = _harness(
        _prompt("x"),
        [{"type": "fail", "error": "provider down", "permanent": permanent, "times": 2}],
        AgentConfig(retry=RetryPolicy(max_attempts=2, base_delay=0.001)),
    )
    with pytest.raises(RunFailure) as info:
        await agent.apply(run)
    assert str(info.value) == "model 'offline' failed (scripted): provider down"
    assert info.value.permanent is permanent
    calls = 1 if permanent else 2
    assert log == ["boundary", *["model:committed=1"] * calls]
    assert len(run.of_type("retrying")) == calls - 1


async def test_before_boundary_fail_raises_before_commit_then_the_retry_succeeds() -> None:
    script = [
        {"type": "fail", "error": "not yet", "phase": "before_boundary", "times": 2},
        {"type": "text", "text": "finally"},
    ]
    agent, _, model, _ = _harness(_prompt("x"), script)
    for _ in range(2):
        run = FakeRun(_prompt("x"))
        model.run[:] = [run]
        with pytest.raises(RunFailure) as info:
            await agent.apply(run)
        assert (str(info.value), info.value.permanent) == ("not yet", False)
        assert run.boundary_deltas == []
        assert model.requests == []
    run = FakeRun(_prompt("x"))
    model.run[:] = [run]
    result = await agent.apply(run)
    assert len(run.boundary_deltas) == 1
    assert result is not None and result.text == "finally"


async def test_unknown_model_fails_permanently_before_the_boundary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("RKAT_OPENAI_BASE_URL", raising=False)
    unknown = (
        "cannot tell which provider serves model 'mystery-9': give the provider "
        "(offline, openai, anthropic), or set OPENAI_BASE_URL for an OpenAI-compatible server"
    )
    # in the session config: refused at construction
    with pytest.raises(ValueError) as config_info:
        AgentConfig(model="mystery-9")
    assert str(config_info.value) == unknown
    # as a run's override: a permanent failure before anything durable happens
    run = FakeRun(_prompt("x", turn_metadata=RuntimeTurnMetadata(model="mystery-9")))
    with pytest.raises(RunFailure) as info:
        await AgentExecutor().apply(run)
    assert str(info.value) == unknown
    assert info.value.permanent is True
    assert run.boundary_deltas == []
    assert run.events == []
    bad_provider = FakeRun(_prompt("x", turn_metadata=RuntimeTurnMetadata(provider="nope")))
    with pytest.raises(RunFailure, match="unknown provider 'nope'") as provider_info:
        await AgentExecutor().apply(bad_provider)
    assert provider_info.value.permanent is True
    assert bad_provider.boundary_deltas == []


async def test_turn_metadata_overrides_model_and_system_prompt() -> None:
    agent, run, model, _ = _harness(
        _prompt("x", turn_metadata=RuntimeTurnMetadata(system_prompt="terse", max_tokens=7))
    )
    await agent.apply(run)
    assert (model.requests[0].system_prompt, model.requests[0].max_tokens) == ("terse", 7)
    other = FakeRun(_prompt("x", turn_metadata=RuntimeTurnMetadata(model="big")))
    with pytest.raises(RunFailure, match="cannot tell which provider serves model 'big'"):
        await agent.apply(other)
    assert other.boundary_deltas == []


async def test_max_turns_exceeded_is_a_permanent_failure() -> None:
    log: list[str] = []
    holder: list[FakeRun] = []
    model = SpyModel([{"type": "tool", "name": "t"}] * 5, log, holder)
    agent = AgentExecutor(AgentConfig(max_turns=3), model=model)
    run = FakeRun(_prompt("loop"), log=log)
    holder.append(run)
    with pytest.raises(RunFailure) as info:
        await agent.apply(run)
    assert info.value.permanent is True
    assert str(info.value) == (
        "budget exhausted: turns limit 3 reached (used 3) before a final answer"
    )
    assert len(model.requests) == 3
    # each of the three tool turns checkpoints before and after its tool
    assert log == [
        "boundary",
        *[
            entry
            for n in (1, 3, 5)
            for entry in (f"model:committed={n}", "checkpoint", "checkpoint")
        ],
    ]


def test_config_rejects_a_malformed_script_and_bad_max_turns() -> None:
    with pytest.raises(ValueError, match=r"offline script\[1\]: unknown step type 'sleep'"):
        AgentConfig(offline_script=[{"type": "text", "text": "a"}, {"type": "sleep"}])
    with pytest.raises(ValueError, match="max_turns must be at least 1"):
        AgentConfig(max_turns=0)
