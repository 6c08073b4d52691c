"""The official Meerkat SDK (``meerkat-sdk`` 0.4.10, unmodified) drives ``rkat-rpc``:
sessions, turns, streaming with typed events, deferred sessions with per-turn overrides that
apply, interrupt, history, listing, archive, event subscriptions, callback tools, config and
the capability checks for what this runtime does not have. Offline model only."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

meerkat = pytest.importorskip("meerkat")

from meerkat import (  # noqa: E402
    CapabilityUnavailableError,
    EventEnvelope,
    MeerkatClient,
    MeerkatError,
    RunCompleted,
    RunStarted,
    TextComplete,
    TextDelta,
    ToolCallRequested,
    ToolExecutionCompleted,
    TurnCompleted,
    TurnStarted,
)

RKAT_RPC = Path(sys.executable).with_name("rkat-rpc")

pytestmark = pytest.mark.skipif(not RKAT_RPC.exists(), reason="rkat-rpc is not installed")


def script(*steps: dict[str, Any]) -> dict[str, Any]:
    """``provider_params`` giving a new offline session this script (see docs/rpc.md)."""
    return {"offline_script": list(steps)}


@pytest.fixture
async def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.delenv("MEERKAT_OFFLINE_SCRIPT", raising=False)
    monkeypatch.delenv("MEERKAT_BIN_PATH", raising=False)
    c = MeerkatClient(rkat_path=str(RKAT_RPC))
    await c.connect(state_root=str(tmp_path / "state"))
    yield c
    await c.close()


async def test_sessions_turns_streaming_history_and_capabilities(
    client: MeerkatClient, tmp_path: Path
) -> None:
    assert client.has_capability("sessions") and client.has_capability("streaming")

    session = await client.create_session("hello meerkat")
    assert session.id and session.text == (
        'offline model: you said "hello meerkat" (1 messages in the conversation)'
    )
    assert session.turns == 1 and session.usage.output_tokens > 0

    result = await session.turn("and again")
    assert result.text.startswith('offline model: you said "and again"')
    assert session.last_result is result

    # streaming creation: typed events, buffered until the response gives the session id
    async with client.create_session_streaming("stream this please") as stream:
        events = [event async for event in stream]
    kinds = [type(e) for e in events]
    assert kinds[0] is RunStarted and kinds[-1] is RunCompleted
    assert TurnStarted in kinds and TextComplete in kinds and TurnCompleted in kinds
    deltas = "".join(e.delta for e in events if isinstance(e, TextDelta))
    assert deltas == stream.result.text and stream.session_id == stream.result.session_id
    completed = next(e for e in events if isinstance(e, TurnCompleted))
    assert completed.stop_reason == "end_turn" and completed.usage.output_tokens > 0

    text, run = await client.create_session_streaming("collect me").collect_text()
    assert text == run.text and text.startswith('offline model: you said "collect me"')

    # session.stream: the turn's typed events, routed by session id
    async with session.stream("streamed turn") as turn_events:
        streamed = [e async for e in turn_events]
    assert "".join(e.delta for e in streamed if isinstance(e, TextDelta)) == turn_events.result.text
    assert isinstance(streamed[-1], RunCompleted)
    assert session.last_result.text == turn_events.result.text

    history = await session.history()
    assert history.message_count == 6 and not history.has_more
    assert [m.role for m in history.messages] == ["user", "assistant"] * 3
    page = await session.history(offset=2, limit=2)
    assert page.has_more and page.messages[0].content == "and again"

    listed = await client.list_sessions()
    assert len(listed) == 3 and listed[0].session_id == session.id
    assert listed[0].message_count == 6 and listed[0].created_at
    info = await client.read_session(session.id)
    assert info["session_id"] == session.id and info["message_count"] == 6

    await session.archive()
    assert session.id not in {s.session_id for s in await client.list_sessions()}
    with pytest.raises(MeerkatError) as err:
        await session.turn("archived")
    assert err.value.code == "-32001"

    # what this runtime does not have: capability checks, clear errors, no crash
    assert not client.has_capability("mob")
    assert not client.has_capability("skills")
    assert not client.has_capability("mcp_live")
    with pytest.raises(CapabilityUnavailableError):
        await client.create_mob(prefab="coding")
    with pytest.raises(CapabilityUnavailableError):
        await session.invoke_skill(meerkat.SkillKey("src", "skill"), "x")
    for call in (
        client.list_mob_prefabs(),
        client.list_skills(),
        client.mcp_add(session.id, "srv", {}),
        client.mob_status("m1"),
    ):
        with pytest.raises(MeerkatError) as err:
            await call
        assert err.value.code == "-32601"
    with pytest.raises(MeerkatError) as err:
        await client.create_session("x", enable_shell=True)
    assert err.value.code == "-32602"
    assert (await client.create_session("still fine")).text


async def test_deferred_overrides_interrupt_and_event_subscription(client: MeerkatClient) -> None:
    deferred = await client.create_deferred_session(
        "Context first.",
        provider_params=script({"type": "text", "text": '{"verdict": "ok"}'}),
    )
    first = await deferred.start_turn(
        "Now answer.",
        system_prompt="one two three four five six",
        output_schema={"type": "object", "required": ["verdict"]},
    )
    assert first.structured_output == {"verdict": "ok"}
    # the system prompt override counted (6 words) beside "Context first.\n\nNow answer."
    assert first.usage.input_tokens == 6 + 4
    plain = await client.create_deferred_session(
        "Context first.", provider_params=script({"type": "text", "text": "x"})
    )
    assert (await plain.start_turn("Now answer.")).usage.input_tokens == 4
    history = await deferred.history()
    assert history.messages[0].content == "Context first.\n\nNow answer."

    session = await client.create_session(
        "quick",
        provider_params=script(
            {"type": "text", "text": "quick answer"},
            {"type": "text", "text": "slow answer", "delay": 30},
        ),
    )
    assert session.text == "quick answer"
    subscription = await session.subscribe_events()
    seen: list[EventEnvelope] = []

    async def watch() -> None:
        async for envelope in subscription:
            seen.append(envelope)

    watcher = asyncio.ensure_future(watch())
    slow = asyncio.ensure_future(session.turn("take your time"))
    for _ in range(500):
        if any(isinstance(e.payload, TurnStarted) for e in seen):
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the slow turn did not start")
    await session.interrupt()
    with pytest.raises(MeerkatError) as err:
        await asyncio.wait_for(slow, 10)
    assert err.value.code == "-32603" and err.value.details["code"] == "cancelled"
    await subscription.close()
    await asyncio.wait_for(watcher, 5)
    seqs = [e.seq for e in seen]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert all(e.source_id == session.id and e.event_id for e in seen)
    assert isinstance(seen[0].payload, meerkat.UnknownEvent)  # input.accepted (runtime event)
    assert seen[0].payload.type == "input.accepted"
    assert any(isinstance(e.payload, RunStarted) for e in seen)


async def test_callback_tools_and_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEERKAT_OFFLINE_SCRIPT", raising=False)
    client = MeerkatClient(rkat_path=str(RKAT_RPC))
    calls: list[dict[str, Any]] = []

    @client.tool(
        "weather",
        description="Weather for a city",
        input_schema={
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    )
    async def weather(arguments: dict[str, Any]) -> str:
        calls.append(arguments)
        return f"sunny in {arguments['city']}"

    await client.connect(realm_id="tests", state_root=str(tmp_path / "state"))
    try:

        @client.tool("broken", description="Always fails")
        async def broken(arguments: dict[str, Any]) -> str:
            raise RuntimeError("no service")

        await asyncio.sleep(0.2)  # the SDK registers post-connect tools in the background
        session = await client.create_session(
            "what's the weather?",
            provider_params=script(
                {"type": "tool", "name": "weather", "args": {"city": "Gaborone"}},
                {"type": "tool", "name": "broken", "args": {}},
                {"type": "text", "text": "It is sunny."},
            ),
        )
        assert session.text == "It is sunny." and session.tool_calls == 2
        assert calls == [{"city": "Gaborone"}]
        history = await session.history()
        results = [r for m in history.messages for r in m.results]
        assert [(r.content, r.is_error) for r in results] == [
            ("sunny in Gaborone", False),
            ("Tool error: no service", True),
        ]

        async with session.stream("again") as events:
            typed = [e async for e in events]
        assert not any(isinstance(e, ToolCallRequested | ToolExecutionCompleted) for e in typed)

        config = await client.get_config()
        assert config["config"] == {"model": "offline"} and config["generation"] == 0
        updated = await client.set_config(
            {"model": "offline", "offline_script": [{"type": "text", "text": "configured"}]}
        )
        assert updated["generation"] == 1
        patched = await client.patch_config({"max_tokens": 100}, expected_generation=1)
        assert patched["config"]["max_tokens"] == 100 and patched["generation"] == 2
        with pytest.raises(MeerkatError) as err:
            await client.patch_config({"max_tokens": 5}, expected_generation=1)
        assert err.value.code == "-32002"
        with pytest.raises(MeerkatError) as err:
            await client.set_config({"nonsense": True})
        assert err.value.code == "-32602"
        assert (await client.create_session("hi")).text == "configured"
    finally:
        await client.close()
    assert (tmp_path / "state" / "realms" / "tests" / "rpc-config.json").exists()
