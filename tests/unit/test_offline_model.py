"""OfflineModel: the default echo, script cursor semantics, failures, delays, validation."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from meerkat_runtime.core.lifecycle import Message, ToolCall
from meerkat_runtime.llm.base import ModelError, ModelRequest
from meerkat_runtime.llm.offline import (
    FailStep,
    OfflineModel,
    TextStep,
    ToolBehaviour,
    parse_script,
)


def _user(text: str) -> Message:
    return Message(role="user", content=text)


def _assistant(text: str = "") -> Message:
    return Message(role="assistant", content=text)


def _req(*messages: Message, session_id: str | None = None) -> ModelRequest:
    return ModelRequest(messages=list(messages), session_id=session_id)


# --- default behaviour ----------------------------------------------------------------------


async def test_echo_quotes_last_user_message_and_counts_messages() -> None:
    model = OfflineModel()
    response = await model.complete(
        _req(_user("first"), _assistant("a"), _user("second"), Message(role="context", content="c"))
    )
    assert response.text == 'offline model: you said "second" (4 messages in the conversation)'
    assert response.tool_calls == []
    assert response.stop_reason == "end_turn"


async def test_echo_without_user_message() -> None:
    response = await OfflineModel().complete(_req(Message(role="context", content="x")))
    assert response.text == "offline model: nothing to answer (1 messages in the conversation)"


async def test_echo_usage_is_a_word_count_estimate() -> None:
    response = await OfflineModel().complete(
        ModelRequest(messages=[_user("one two three")], system_prompt="be brief")
    )
    assert (
        response.text == 'offline model: you said "one two three" (1 messages in the conversation)'
    )
    assert response.usage.input_tokens == 5  # "be brief" + "one two three"
    assert response.usage.output_tokens == 12


async def test_exhausted_script_falls_back_to_echo() -> None:
    model = OfflineModel([{"type": "text", "text": "scripted"}])
    first = await model.complete(_req(_user("hi")))
    assert first.text == "scripted"
    second = await model.complete(_req(_user("hi"), _assistant("scripted"), _user("again")))
    assert second.text == 'offline model: you said "again" (3 messages in the conversation)'


# --- cursor -----------------------------------------------------------------------------------


async def test_cursor_is_the_number_of_assistant_messages() -> None:
    script = [{"type": "text", "text": t} for t in ("zero", "one", "two")]
    history = [_user("u"), _assistant(), _user("u"), _assistant(), _user("u")]
    # Each call is answered from the conversation alone, in any order and by a fresh instance
    # (restarts, continuations).
    assert (await OfflineModel(script).complete(_req(*history))).text == "two"
    assert (await OfflineModel(script).complete(_req(*history[:3]))).text == "one"
    assert (await OfflineModel(script).complete(_req(*history[:1]))).text == "zero"
    # Non-assistant messages do not move the cursor.
    more = [*history[:1], Message(role="context", content="c"), _user("again")]
    assert (await OfflineModel(script).complete(_req(*more))).text == "zero"


async def test_tool_step_call_id_arguments_and_behaviour() -> None:
    model = OfflineModel(
        [
            {"type": "text", "text": "t"},
            {
                "type": "tool",
                "name": "search",
                "args": {"q": "x"},
                "duration": 0.25,
                "result": "3 hits",
            },
        ]
    )
    response = await model.complete(_req(_user("u"), _assistant("t"), _user("v")))
    assert response.stop_reason == "tool_use"
    assert response.text is None
    assert response.tool_calls == [ToolCall(id="call_1", name="search", arguments={"q": "x"})]
    assert model.tool_behaviour(response.tool_calls[0]) == ToolBehaviour(0.25, "3 hits")
    # The script's own args are not shared with the emitted call.
    response.tool_calls[0].arguments["q"] = "mutated"
    again = await model.complete(_req(_user("u"), _assistant("t"), _user("v")))
    assert again.tool_calls[0].arguments == {"q": "x"}


async def test_tool_behaviour_defaults_for_unscripted_calls() -> None:
    model = OfflineModel([{"type": "tool", "name": "search"}])
    assert model.tool_behaviour(ToolCall(id="call_0", name="search")) == ToolBehaviour(0.0, "ok")
    assert model.tool_behaviour(ToolCall(id="call_0", name="other")) == ToolBehaviour(0.0, "ok")
    assert model.tool_behaviour(ToolCall(id="call_7", name="search")) == ToolBehaviour(0.0, "ok")
    assert model.tool_behaviour(ToolCall(id="xyz", name="search")) == ToolBehaviour(0.0, "ok")
    scripted = OfflineModel([{"type": "tool", "name": "search", "duration": 1.5, "result": "r"}])
    assert scripted.tool_behaviour(ToolCall(id="call_0", name="search")) == ToolBehaviour(1.5, "r")


async def test_wait_step_calls_the_builtin_wait_tool() -> None:
    response = await OfflineModel([{"type": "wait", "timeout": 2.5}]).complete(_req(_user("u")))
    assert response.tool_calls == [ToolCall(id="call_0", name="wait", arguments={"timeout": 2.5})]
    assert response.stop_reason == "tool_use"


# --- failures ---------------------------------------------------------------------------------


async def test_fail_step_fails_times_per_session_then_is_passed_over() -> None:
    model = OfflineModel(
        [{"type": "fail", "error": "boom", "times": 2}, {"type": "text", "text": "recovered"}]
    )
    request = _req(_user("u"), session_id="s1")
    for _ in range(2):
        with pytest.raises(ModelError) as info:
            await model.complete(request)
        assert str(info.value) == "boom"
        assert info.value.transient is True
    assert model.failures("s1", 0) == 2
    assert (await model.complete(request)).text == "recovered"
    # Another session has its own count.
    with pytest.raises(ModelError):
        await model.complete(_req(_user("u"), session_id="s2"))
    assert model.failures("s2", 0) == 1


async def test_permanent_fail_step_is_not_transient() -> None:
    model = OfflineModel([{"type": "fail", "error": "bad request", "permanent": True}])
    with pytest.raises(ModelError) as info:
        await model.complete(_req(_user("u")))
    assert info.value.transient is False
    # Trailing fail steps belong to the echo after the script.
    assert (await model.complete(_req(_user("u")))).text == (
        'offline model: you said "u" (1 messages in the conversation)'
    )


async def test_fail_step_belongs_to_the_answer_after_it() -> None:
    model = OfflineModel(
        [
            {"type": "text", "text": "a"},
            {"type": "fail", "error": "second call fails"},
            {"type": "text", "text": "b"},
        ]
    )
    assert (await model.complete(_req(_user("u")))).text == "a"
    with pytest.raises(ModelError, match="second call fails"):
        await model.complete(_req(_user("u"), _assistant("a"), _user("v")))
    assert (await model.complete(_req(_user("u"), _assistant("a"), _user("v")))).text == "b"


async def test_before_boundary_fail_fires_only_in_before_boundary() -> None:
    model = OfflineModel(
        [
            {"type": "fail", "error": "early", "phase": "before_boundary", "permanent": True},
            {"type": "text", "text": "ok"},
        ]
    )
    request = _req(_user("u"))
    # complete passes over it without counting it.
    assert (await model.complete(request)).text == "ok"
    assert model.failures(None, 0) == 0
    with pytest.raises(ModelError, match="early") as info:
        await model.before_boundary(_req())
    assert info.value.transient is False
    await model.before_boundary(_req())  # spent: returns
    assert model.failures(None, 0) == 1


async def test_before_boundary_waits_for_an_earlier_model_phase_fail() -> None:
    model = OfflineModel(
        [
            {"type": "fail", "error": "m"},
            {"type": "fail", "error": "b", "phase": "before_boundary"},
            {"type": "text", "text": "ok"},
        ]
    )
    await model.before_boundary(_req())  # the first step with failures left is model-phase
    assert model.failures(None, 1) == 0
    with pytest.raises(ModelError, match=r"^m$"):
        await model.complete(_req(_user("u")))
    with pytest.raises(ModelError, match=r"^b$"):
        await model.before_boundary(_req())
    assert (await model.complete(_req(_user("u")))).text == "ok"


# --- delays -----------------------------------------------------------------------------------


async def test_delay_does_not_block_the_event_loop() -> None:
    model = OfflineModel([{"type": "text", "text": "slow", "delay": 0.2}])
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    tick_task = asyncio.create_task(ticker())
    started = time.monotonic()
    response = await model.complete(_req(_user("u")))
    tick_task.cancel()
    assert response.text == "slow"
    assert time.monotonic() - started >= 0.19
    assert ticks >= 5


async def test_delay_is_cancellable_and_a_cancelled_fail_counts_nothing() -> None:
    model = OfflineModel([{"type": "fail", "error": "late", "delay": 30}])
    task = asyncio.create_task(model.complete(_req(_user("u"))))
    await asyncio.sleep(0.02)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 0.5
    assert model.failures(None, 0) == 0


# --- validation -------------------------------------------------------------------------------


def test_parse_script_accepts_json_text_and_applies_defaults() -> None:
    steps = parse_script('[{"type": "text", "text": "hi"}, {"type": "fail"}]')
    assert steps[0] == TextStep(type="text", text="hi")
    assert isinstance(steps[1], FailStep)
    assert (steps[1].times, steps[1].permanent, steps[1].phase, steps[1].delay) == (
        1,
        False,
        "model",
        0.0,
    )


@pytest.mark.parametrize(
    ("script", "fragments"),
    [
        (
            [{"type": "text", "text": "a"}, {"type": "nope"}],
            ["script[1]", "unknown step type 'nope'"],
        ),
        ([{"text": "a"}], ["script[0]", 'missing "type"']),
        ([{"type": "tool"}], ["script[0]", "invalid 'tool' step", "name: Field required"]),
        ([{"type": "text", "text": "a", "delay": -1}], ["script[0]", "delay:"]),
        ([{"type": "fail", "times": 0}], ["script[0]", "times:"]),
        ([{"type": "fail", "phase": "later"}], ["script[0]", "phase:"]),
        ([{"type": "wait", "timeout": 1, "tmeout": 2}], ["script[0]", "tmeout: Extra inputs"]),
        (["text"], ["script[0]", "expected an object, got str"]),
        ([{"type": ["text"]}], ["script[0]", "unknown step type ['text']"]),
    ],
)
def test_malformed_step_names_the_step_and_the_accepted_types(
    script: list[Any], fragments: list[str]
) -> None:
    with pytest.raises(ValueError) as info:
        OfflineModel(script)
    message = str(info.value)
    for fragment in [
        *fragments,
        "accepted step types: text{text, chunk_delay?}",
        "tool{name, args?",
    ]:
        assert fragment in message, message


@pytest.mark.parametrize(
    ("script", "fragment"),
    [
        ('{"type": "text"}', "must be a list of step objects, got dict"),
        ("[{", "not valid JSON"),
        (42, "must be a list of step objects, got int"),
    ],
)
def test_malformed_script_container(script: Any, fragment: str) -> None:
    with pytest.raises(ValueError, match="offline script") as info:
        parse_script(script)
    assert fragment in str(info.value)
