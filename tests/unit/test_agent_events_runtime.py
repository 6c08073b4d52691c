"""Agent events through the Runtime, and the session service, end to end.

- S15: agent events (category ``agent``) share the session's event sequence with the
  runtime's own events: strictly increasing ``seq``, interleaved in the order things
  happened, and every ``data`` is an event of the installed ``meerkat-sdk``
  (``meerkat.events.parse_event`` gives its typed class), except our own three types, which
  the SDK reads as ``UnknownEvent``.
- S15: on SQLite every agent event but ``text_delta`` is stored (deltas live only in the
  in-memory ring): a reopened Runtime reads the same events with the same seqs.
- The session service: labels and listing, ``read_session``, ``history`` paging,
  ``archive_session``, the deferred prompt, per-turn overrides and refused settings.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import meerkat.events as sdk  # type: ignore[import-untyped]
import pytest

from meerkat_runtime import (
    InvalidOperationError,
    Message,
    Runtime,
    RuntimeTurnMetadata,
    SystemGeneratedInput,
)
from meerkat_runtime.core.agent import AgentConfig, AgentExecutor
from meerkat_runtime.core.lifecycle import Usage
from meerkat_runtime.core.tools import ToolRegistry
from meerkat_runtime.llm.base import ModelRequest, ModelResponse, TextSink
from meerkat_runtime.runtime.events import RuntimeEventEnvelope
from meerkat_runtime.runtime.outcomes import CompletedWait
from meerkat_runtime.runtime.state import RuntimeState

OUR_TYPES = frozenset({"tool_execution_cancelled", "structured_output_invalid", "context_appended"})

SDK_CLASSES: dict[str, type] = {
    "run_started": sdk.RunStarted,
    "run_completed": sdk.RunCompleted,
    "run_failed": sdk.RunFailed,
    "turn_started": sdk.TurnStarted,
    "turn_completed": sdk.TurnCompleted,
    "text_delta": sdk.TextDelta,
    "text_complete": sdk.TextComplete,
    "tool_call_requested": sdk.ToolCallRequested,
    "tool_execution_started": sdk.ToolExecutionStarted,
    "tool_execution_completed": sdk.ToolExecutionCompleted,
    "tool_execution_timed_out": sdk.ToolExecutionTimedOut,
    "tool_result_received": sdk.ToolResultReceived,
    "budget_warning": sdk.BudgetWarning,
    "retrying": sdk.Retrying,
}

LOOKUP_SCRIPT: list[dict[str, Any]] = [
    {"type": "tool", "name": "lookup", "args": {"key": "colour"}},
    {"type": "text", "text": "the colour is blue"},
]


def lookup_tools() -> tuple[ToolRegistry, list[str]]:
    calls: list[str] = []
    reg = ToolRegistry()

    @reg.tool
    def lookup(key: str) -> str:
        """Look a key up."""
        calls.append(key)
        return f"{key}=blue"

    return reg, calls


async def events_of(rt: Runtime, sid: str) -> list[RuntimeEventEnvelope]:
    return [e async for e in rt.events(sid)]


def agent_data(events: Sequence[RuntimeEventEnvelope]) -> list[dict[str, Any]]:
    return [e.event["data"] for e in events if e.event["category"] == "agent"]


async def completed(rt: Runtime, sid: str, prompt: str, **kw: Any) -> CompletedWait:
    out = await (await rt.turn(sid, prompt, **kw)).wait(5.0)
    assert isinstance(out, CompletedWait), out
    return out


@pytest.fixture
async def rt() -> AsyncIterator[Runtime]:
    runtime = Runtime.open("memory://")
    async with runtime:
        yield runtime


# ------------------------------------------------------------------------------ agent events


async def test_agent_events_interleave_with_runtime_events_and_parse_with_the_sdk() -> None:
    reg, calls = lookup_tools()
    async with Runtime.open("memory://", tools=reg) as rt:
        s = await rt.create_session(offline_script=LOOKUP_SCRIPT)
        out = await completed(rt, s.id, "what colour?")
        assert out.result.text == "the colour is blue"
        assert calls == ["colour"]
        evs = await events_of(rt, s.id)

    seqs = [e.seq for e in evs]
    assert seqs == sorted(set(seqs)), "seq must strictly increase"
    codes = [e.code for e in evs]

    def at(code: str, nth: int = 0) -> int:
        return [i for i, c in enumerate(codes) if c == code][nth]

    # the agent's story sits inside the runtime's, in the order things happened
    assert (
        at("run.started")
        < at("agent.run_started")
        < at("run.boundary_applied")
        < at("agent.turn_started")
        < at("agent.tool_call_requested")
        < at("run.checkpoint")  # the call is durable before the tool runs (S6)
        < at("agent.tool_execution_started")
        < at("agent.tool_execution_completed")
        < at("agent.tool_result_received")
        < at("run.checkpoint", 1)  # its result
        < at("agent.turn_started", 1)
        < at("agent.text_delta")
        < at("agent.text_complete")
        < at("agent.run_completed")
        < at("run.completed")
    )
    data = agent_data(evs)
    assert {d["type"] for d in data} >= {
        "run_started",
        "turn_started",
        "tool_call_requested",
        "tool_execution_started",
        "tool_execution_completed",
        "tool_result_received",
        "turn_completed",
        "text_delta",
        "text_complete",
        "run_completed",
    }
    for d in data:
        parsed = sdk.parse_event(d)
        assert type(parsed) is SDK_CLASSES[d["type"]], d
    deltas = [d["delta"] for d in data if d["type"] == "text_delta"]
    assert "".join(deltas) == "the colour is blue"
    done = next(sdk.parse_event(d) for d in data if d["type"] == "tool_execution_completed")
    assert isinstance(done, sdk.ToolExecutionCompleted)
    assert (done.name, done.result, done.is_error) == ("lookup", "colour=blue", False)
    final = next(sdk.parse_event(d) for d in data if d["type"] == "run_completed")
    assert isinstance(final, sdk.RunCompleted)
    assert final.session_id == s.id and final.result == "the colour is blue"
    assert final.usage.input_tokens == out.result.usage.input_tokens
    assert final.usage.output_tokens == out.result.usage.output_tokens


async def test_our_own_event_types_are_unknown_to_the_sdk_and_the_rest_typed(
    rt: Runtime,
) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    s = await rt.create_session(
        offline_script=[{"type": "text", "text": "not json"}, {"type": "text", "text": '{"a": 1}'}],
        output_schema=schema,
    )
    out = await completed(rt, s.id, "answer in JSON")
    assert out.result.structured_output == {"a": 1}
    # a system-generated input is consumed on accept; its immediate boundary follows
    await rt.accept(s.id, SystemGeneratedInput.new("gen", "fyi"))
    deadline = time.monotonic() + 10.0
    while True:
        data = agent_data(await events_of(rt, s.id))
        if any(d["type"] == "context_appended" for d in data) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.005)
    types = [d["type"] for d in data]
    assert "structured_output_invalid" in types
    assert "context_appended" in types
    for d in data:
        parsed = sdk.parse_event(d)
        if d["type"] in OUR_TYPES:
            assert isinstance(parsed, sdk.UnknownEvent)
            assert parsed.type == d["type"]
        else:
            assert type(parsed) is SDK_CLASSES[d["type"]], d


async def test_sqlite_stores_agent_events_but_text_deltas_across_a_reopen(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    reg, _ = lookup_tools()
    async with Runtime.open(url, tools=reg) as rt:
        s = await rt.create_session(offline_script=LOOKUP_SCRIPT)
        await completed(rt, s.id, "what colour?")
        before = [e for e in await events_of(rt, s.id) if e.event["category"] == "agent"]
    assert any(e.event["data"]["type"] == "text_delta" for e in before)
    want = [(e.seq, e.event["data"]) for e in before if e.event["data"]["type"] != "text_delta"]
    assert len(want) >= 8

    async with Runtime.open(url, tools=reg) as again:
        after = await events_of(again, s.id)
        got = [(e.seq, e.event["data"]) for e in after if e.event["category"] == "agent"]
        assert got == want
        # a resume from the middle reads on from there
        mid = want[len(want) // 2][0]
        resumed = [(e.seq, e.event["data"]) async for e in again.events(s.id, mid)]
        assert [x for x in resumed if x[0] in {w[0] for w in want}] == [
            w for w in want if w[0] > mid
        ]
        assert [e.seq for e in after] == sorted({e.seq for e in after})
        # and the runtime's own events are still around them
        codes = [e.code for e in after]
        assert "run.boundary_applied" in codes and "run.completed" in codes


# ------------------------------------------------------------------------------ sessions


async def test_labels_filter_listings_every_label_must_match(rt: Runtime) -> None:
    a = await rt.create_session(labels={"team": "a", "env": "prod"})
    b = await rt.create_session(labels={"team": "a", "env": "dev"})
    c = await rt.create_session(labels={"team": "b", "env": "prod"})

    async def ids(**labels: str) -> list[str]:
        return [x.id for x in await rt.list_sessions(labels=labels)]

    assert await ids(team="a") == [a.id, b.id]
    assert await ids(env="prod") == [a.id, c.id]
    assert await ids(team="a", env="prod") == [a.id]
    assert await ids(team="b", env="dev") == []
    assert await ids(team="a", missing="x") == []
    assert await ids(team="c") == []
    assert [x.id for x in await rt.list_sessions()] == [a.id, b.id, c.id]
    assert [x.id for x in await rt.list_sessions(offset=1, limit=1)] == [b.id]
    listed = (await rt.list_sessions(labels={"team": "b"}))[0]
    assert listed.labels == {"team": "b", "env": "prod"}


async def test_read_session_sums_usage_and_reports_the_last_answer() -> None:
    reg, _ = lookup_tools()
    async with Runtime.open("memory://", tools=reg) as rt:
        s = await rt.create_session(
            offline_script=[*LOOKUP_SCRIPT, {"type": "text", "text": "still blue"}],
            system_prompt="be brief",
            labels={"k": "v"},
        )
        fresh = await rt.read_session(s.id)
        assert fresh.message_count == 0 and fresh.usage == Usage()
        assert fresh.last_assistant_text is None and fresh.is_active is False

        results = [(await completed(rt, s.id, p)).result for p in ("colour?", "and now?")]
        view = await rt.read_session(s.id)
        history = await rt.history(s.id)
        assert view.message_count == len(history.messages) == 6  # u, a(call), tool, a, u, a
        total = results[0].usage + results[1].usage
        assert total.total_tokens > 0
        assert view.usage == total
        assert view.total_tokens == total.total_tokens
        assert view.last_assistant_text == "still blue" == results[1].text
        assert view.is_active is False
        assert view.updated_at >= view.created_at
        assert (view.model, view.system_prompt, view.labels) == ("offline", "be brief", {"k": "v"})
        assert view.to_json_dict()["total_tokens"] == total.total_tokens


async def test_read_session_is_active_during_a_run(rt: Runtime) -> None:
    s = await rt.create_session(offline_script=[{"type": "wait", "timeout": 30}])
    h = await rt.turn(s.id, "wait")
    for _ in range(500):
        if (await rt.read_session(s.id)).is_active:
            break
        await asyncio.sleep(0.005)
    assert (await rt.read_session(s.id)).is_active is True
    assert await rt.interrupt(s.id)
    await h.wait(2.0)
    assert (await rt.read_session(s.id)).is_active is False


async def test_history_pages(rt: Runtime) -> None:
    s = await rt.create_session()
    for p in ("one", "two", "three"):
        await completed(rt, s.id, p)
    full = await rt.history(s.id)
    assert full.message_count == 6 and len(full.messages) == 6 and not full.has_more
    assert [m.role for m in full.messages] == ["user", "assistant"] * 3

    pages: list[Message] = []
    offset = 0
    while True:
        page = await rt.history(s.id, offset=offset, limit=4)
        assert page.offset == offset and page.limit == 4
        pages.extend(page.messages)
        offset += len(page.messages)
        if not page.has_more:
            break
        assert len(page.messages) == 4
    assert pages == full.messages

    first = await rt.history(s.id, limit=2)
    assert first.messages[0].content == "one" and len(first.messages) == 2 and first.has_more
    last = await rt.history(s.id, offset=5, limit=10)
    assert len(last.messages) == 1 and not last.has_more
    past = await rt.history(s.id, offset=50, limit=3)
    assert (past.offset, past.messages, past.has_more, past.message_count) == (6, [], False, 6)
    empty = await rt.history(s.id, offset=2, limit=0)
    assert empty.messages == [] and empty.has_more
    with pytest.raises(InvalidOperationError, match="offset"):
        await rt.history(s.id, offset=-1)
    with pytest.raises(InvalidOperationError, match="limit"):
        await rt.history(s.id, limit=-1)


async def test_archive_retires_hides_refuses_turns_and_keeps_history(rt: Runtime) -> None:
    s = await rt.create_session(labels={"team": "a"})
    other = await rt.create_session(labels={"team": "a"})
    await completed(rt, s.id, "remember this")
    before = (await rt.history(s.id)).messages

    await rt.archive_session(s.id)
    assert rt.runtime_state(s.id) is RuntimeState.RETIRED
    assert [x.id for x in await rt.list_sessions()] == [other.id]
    assert [x.id for x in await rt.list_sessions(labels={"team": "a"})] == [other.id]
    listed = await rt.list_sessions(include_archived=True)
    assert [(x.id, x.archived) for x in listed] == [(s.id, True), (other.id, False)]
    with pytest.raises(InvalidOperationError, match="archived"):
        await rt.turn(s.id, "more")
    assert (await rt.history(s.id)).messages == before
    view = await rt.read_session(s.id)
    assert view.archived is True and view.message_count == 2 and view.is_active is False
    assert await rt.archive_session(s.id) == {}  # again: nothing more to do
    await completed(rt, other.id, "still works")


async def test_deferred_prompt_is_prepended_to_the_first_turn_only(rt: Runtime) -> None:
    s = await rt.create_session(deferred_prompt="Context: the user likes cats.")
    first = await completed(rt, s.id, "hello")
    await completed(rt, s.id, "again")
    users = [m.content for m in (await rt.history(s.id)).messages if m.role == "user"]
    assert users == ["Context: the user likes cats.\n\nhello", "again"]
    assert "likes cats" in first.result.text  # the offline model echoes what it was sent
    record = await rt.store.load_session(s.id)
    assert record is not None and "deferred_prompt" not in record.config


class RecordingModel:
    """A ``Model`` answering every call with ``ok``, recording the requests it gets."""

    def __init__(self, name: str = "gpt-recording") -> None:
        self.name = name
        self.requests: list[ModelRequest] = []

    async def complete(
        self, request: ModelRequest, *, on_text: TextSink | None = None
    ) -> ModelResponse:
        self.requests.append(request)
        if on_text is not None:
            on_text("ok")
        return ModelResponse(
            text="ok",
            tool_calls=[],
            usage=Usage(input_tokens=1, output_tokens=1),
            stop_reason="end_turn",
        )


async def test_turn_overrides_reach_the_model_for_that_run_only(rt: Runtime) -> None:
    model = RecordingModel()
    config = AgentConfig(model=model.name, system_prompt="base prompt", max_tokens=100)
    s = await rt.create_session(executor=AgentExecutor(config, model=model))
    await completed(rt, s.id, "plain")
    meta = RuntimeTurnMetadata(system_prompt="override prompt", max_tokens=7)
    await completed(rt, s.id, "special", turn_metadata=meta)
    await completed(rt, s.id, "plain again")
    seen = [(r.system_prompt, r.max_tokens) for r in model.requests]
    assert seen == [("base prompt", 100), ("override prompt", 7), ("base prompt", 100)]
    assert [r.messages[-1].content for r in model.requests] == ["plain", "special", "plain again"]


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"max_turns": 0}, "max_turns"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_duration": 0}, "max_duration"),
        ({"temperature_of_the_sun": 9}, "temperature_of_the_sun"),
        ({"output_schema": {"type": "no-such-type"}}, "output_schema"),
        ({"output_schema": "not a schema"}, "output_schema"),
        ({"offline_script": [{"type": "dance"}]}, "offline script"),
        ({"model": "mystery-model"}, "mystery-model"),
        ({"model": "gpt-4o", "provider": "carrier-pigeon"}, "carrier-pigeon"),
    ],
)
async def test_invalid_settings_are_refused_and_store_nothing(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch, settings: dict[str, Any], needle: str
) -> None:
    for name in ("OPENAI_BASE_URL", "RKAT_OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(InvalidOperationError, match=needle):
        await rt.create_session(session_id="s-bad", **settings)
    assert await rt.store.load_session("s-bad") is None
    assert await rt.list_sessions(include_archived=True) == []
    assert rt.sessions() == []
    # the id is still free, and a valid session takes it
    ok = await rt.create_session(session_id="s-bad")
    assert [x.id for x in await rt.list_sessions()] == [ok.id]
