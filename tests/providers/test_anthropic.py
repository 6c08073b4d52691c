"""AnthropicModel against a loopback server speaking the Messages API streaming format, through
the real ``anthropic`` SDK client."""

from __future__ import annotations

import asyncio
import email.utils
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from meerkat_runtime.core.lifecycle import Message, ToolCall
from meerkat_runtime.llm.anthropic import AnthropicModel
from meerkat_runtime.llm.base import (
    AuthenticationError,
    BadRequestError,
    ContextTooLongError,
    ModelError,
    ModelRequest,
    NetworkError,
    OverloadedError,
    RateLimitError,
    ToolSpec,
)

from .loopback import LoopbackServer, Reply, loopback, sse

KEY = "sk-ant-test-SECRET-0123456789"
ENV_VARS = (
    "ANTHROPIC_API_KEY",
    "RKAT_ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "RKAT_ANTHROPIC_BASE_URL",
    "ANTHROPIC_AUTH_TOKEN",
    "ANTHROPIC_CUSTOM_HEADERS",
    "ANTHROPIC_PROFILE",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    with loopback() as srv:
        yield srv


@pytest.fixture
async def make_model(
    server: LoopbackServer,
) -> AsyncIterator[Callable[..., AnthropicModel]]:
    made: list[AnthropicModel] = []

    def make(name: str = "claude-test", **kwargs: Any) -> AnthropicModel:
        kwargs.setdefault("api_key", KEY)
        kwargs.setdefault("base_url", server.url)
        model = AnthropicModel(name, **kwargs)
        made.append(model)
        return model

    yield make
    for model in made:
        await model.aclose()


# --- SSE building -------------------------------------------------------------------------


def message_start(
    input_tokens: int = 11, cache_creation: int | None = None, cache_read: int | None = None
) -> tuple[str, dict[str, Any]]:
    usage: dict[str, Any] = {"input_tokens": input_tokens, "output_tokens": 1}
    if cache_creation is not None:
        usage["cache_creation_input_tokens"] = cache_creation
    if cache_read is not None:
        usage["cache_read_input_tokens"] = cache_read
    message: dict[str, Any] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }
    return ("message_start", {"type": "message_start", "message": message})


def text_start(index: int) -> tuple[str, dict[str, Any]]:
    block = {"type": "text", "text": ""}
    return (
        "content_block_start",
        {"type": "content_block_start", "index": index, "content_block": block},
    )


def tool_start(index: int, call_id: str, name: str) -> tuple[str, dict[str, Any]]:
    block = {"type": "tool_use", "id": call_id, "name": name, "input": {}}
    return (
        "content_block_start",
        {"type": "content_block_start", "index": index, "content_block": block},
    )


def text_delta(index: int, text: str) -> tuple[str, dict[str, Any]]:
    delta = {"type": "text_delta", "text": text}
    return ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


def json_delta(index: int, partial: str) -> tuple[str, dict[str, Any]]:
    delta = {"type": "input_json_delta", "partial_json": partial}
    return ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


def block_stop(index: int) -> tuple[str, dict[str, Any]]:
    return ("content_block_stop", {"type": "content_block_stop", "index": index})


def message_delta(stop_reason: str, output_tokens: int = 5) -> tuple[str, dict[str, Any]]:
    return (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": output_tokens},
        },
    )


MESSAGE_STOP = ("message_stop", {"type": "message_stop"})
PING = ("ping", {"type": "ping"})
SSE_HEADERS = {"content-type": "text/event-stream"}


def stream(*events: tuple[str, Any], cut: bool = False) -> Reply:
    return Reply(headers=SSE_HEADERS, chunks=sse(*events), cut=cut)


def text_reply(text: str = "ok", stop_reason: str = "end_turn") -> Reply:
    return stream(
        message_start(),
        text_start(0),
        text_delta(0, text),
        block_stop(0),
        message_delta(stop_reason),
        MESSAGE_STOP,
    )


def api_error(status: int, error_type: str, message: str, **headers: str) -> Reply:
    body = {"type": "error", "error": {"type": error_type, "message": message}}
    return Reply.json(status, body, headers={k.replace("_", "-"): v for k, v in headers.items()})


async def eventually(condition: Callable[[], bool], timeout: float = 2.0) -> bool:
    """Poll ``condition`` (state of the server thread) until it holds or ``timeout`` passes."""
    for _ in range(int(timeout / 0.02)):
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


def request(*messages: Message, **kwargs: Any) -> ModelRequest:
    return ModelRequest(messages=list(messages) or [Message(role="user", content="hi")], **kwargs)


# --- streaming ----------------------------------------------------------------------------


async def test_text_is_streamed_in_order_with_usage(
    server: LoopbackServer, make_model: Callable[..., AnthropicModel]
) -> None:
    server.push(
        stream(
            message_start(input_tokens=42, cache_creation=5, cache_read=7),
            PING,
            text_start(0),
            text_delta(0, "Hel"),
            text_delta(0, "lo, "),
            PING,
            text_delta(0, "world"),
            text_delta(0, "!"),
            block_stop(0),
            message_delta("end_turn", output_tokens=9),
            MESSAGE_STOP,
        )
    )
    pieces: list[str] = []
    response = await make_model().complete(request(), on_text=pieces.append)
    assert pieces == ["Hel", "lo, ", "world", "!"]
    assert response.text == "Hello, world!"
    assert response.tool_calls == []
    assert response.stop_reason == "end_turn"
    assert response.usage.input_tokens == 42
    assert response.usage.output_tokens == 9
    assert response.usage.cache_creation_tokens == 5
    assert response.usage.cache_read_tokens == 7


async def test_usage_without_cache_fields_leaves_them_unset(
    server: LoopbackServer, make_model: Callable[..., AnthropicModel]
) -> None:
    server.push(text_reply("x"))
    response = await make_model().complete(request())
    assert response.usage.input_tokens == 11
    assert response.usage.output_tokens == 5
    assert response.usage.cache_creation_tokens is None
    assert response.usage.cache_read_tokens is None


@pytest.mark.parametrize(
    ("api_reason", "ours"),
    [
        ("end_turn", "end_turn"),
        ("stop_sequence", "end_turn"),
        ("max_tokens", "max_tokens"),
    ],
)
async def test_stop_reasons_are_mapped(
    server: LoopbackServer,
    make_model: Callable[..., AnthropicModel],
    api_reason: str,
    ours: str,
) -> None:
    server.push(text_reply("partial", stop_reason=api_reason))
    response = await make_model().complete(request())
    assert response.stop_reason == ours
    assert response.text == "partial"


async def test_two_tool_calls_with_fragmented_input(
    server: LoopbackServer, make_model: Callable[..., AnthropicModel]
) -> None:
    server.push(
        stream(
            message_start(),
            text_start(0),
            text_delta(0, "Let me "),
            text_delta(0, "check."),
            block_stop(0),
            tool_start(1, "toolu_1", "search"),
            json_delta(1, ""),
            json_delta(1, '{"que'),
            json_delta(1, 'ry": "weather'),
            json_delta(1, ' in Paris", "limit"'),
            json_delta(1, ": 3}"),
            block_stop(1),
            tool_start(2, "toolu_2", "clock"),
            json_delta(2, '{"tz":'),
            json_delta(2, ' "UTC", "nested": {"a": [1, 2]}}'),
            block_stop(2),
            message_delta("tool_use", output_tokens=30),
            MESSAGE_STOP,
        )
    )
    pieces: list[str] = []
    response = await make_model().complete(request(), on_text=pieces.append)
    assert response.stop_reason == "tool_use"
    assert response.text == "Let me check."
    assert pieces == ["Let me ", "check."]
    assert response.tool_calls == [
        ToolCall(id="toolu_1", name="search", arguments={"query": "weather in Paris", "limit": 3}),
        ToolCall(id="toolu_2", name="clock", arguments={"tz": "UTC", "nested": {"a": [1, 2]}}),
    ]
    assert all(call.raw_arguments is None for call in response.tool_calls)
    assert response.usage.output_tokens == 30


async def test_malformed_and_empty_tool_input(
    server: LoopbackServer, make_model: Callable[..., AnthropicModel]
) -> None:
    server.push(
        stream(
            message_start(),
            tool_start(0, "toolu_bad", "search"),
            json_delta(0, '{"query": '),
            json_delta(0, '"unterminated'),
            block_stop(0),
            tool_start(1, "toolu_list", "search"),
            json_delta(1, "[1, 2]"),
            block_stop(1),
            tool_start(2, "toolu_empty", "ping"),
            block_stop(2),
            message_delta("tool_use"),
            MESSAGE_STOP,
        )
    )
    response = await make_model().complete(request())
    assert response.stop_reason == "tool_use"
    assert response.text is None
    bad, listed, empty = response.tool_calls
    assert (bad.id, bad.arguments, bad.raw_arguments) == (
        "toolu_bad",
        {},
        '{"query": "unterminated',
    )
    assert (listed.arguments, listed.raw_arguments) == ({}, "[1, 2]")
    assert (empty.id, empty.name, empty.arguments, empty.raw_arguments) == (
        "toolu_empty",
        "ping",
        {},
        None,
    )


# --- the request --------------------------------------------------------------------------


async def test_request_shape_with_env_configuration(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RKAT_ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
    model = AnthropicModel("claude-shape")  # key and base URL from the environment only
    server.push(text_reply())
    conversation = [
        Message(role="user", content="What is the weather?"),
        Message(role="context", name="location", content="Paris"),
        Message(role="context", content="unnamed"),
        Message(
            role="assistant",
            content="Checking.",
            tool_calls=[
                ToolCall(id="toolu_a", name="weather", arguments={"city": "Paris"}),
                ToolCall(id="toolu_b", name="clock", arguments={}),
            ],
        ),
        Message(role="tool", tool_call_id="toolu_a", name="weather", content="sunny"),
        Message(role="tool", tool_call_id="toolu_b", name="clock", content="boom", is_error=True),
        Message(role="system_notice", content="budget low"),
        Message(role="assistant", content="", tool_calls=[ToolCall(id="toolu_c", name="x")]),
        Message(role="tool", tool_call_id="toolu_c", content="done"),
    ]
    tools = [
        ToolSpec(
            name="weather",
            description="Current weather",
            parameters={"type": "object", "properties": {"city": {"type": "string"}}},
        ),
        ToolSpec(name="clock", description="The time"),
    ]
    try:
        await model.complete(
            ModelRequest(
                messages=conversation,
                system_prompt="Be brief.",
                tools=tools,
                output_schema={"type": "object"},
                provider_params={"temperature": 0.25, "top_k": 5},
            )
        )
    finally:
        await model.aclose()

    (sent,) = server.requests
    assert sent.method == "POST"
    assert sent.path == "/v1/messages"
    # anthropic 2.x sends the API key as a bearer token (older SDKs used ``x-api-key``).
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.headers["anthropic-version"]
    body = sent.json()
    assert body["model"] == "claude-shape"
    assert body["stream"] is True
    assert body["system"] == "Be brief."
    assert body["max_tokens"] == 4096
    assert body["temperature"] == 0.25
    assert body["top_k"] == 5
    assert "output_schema" not in body
    assert body["tools"] == [
        {
            "name": "weather",
            "description": "Current weather",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
        {"name": "clock", "description": "The time", "input_schema": {"type": "object"}},
    ]
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is the weather?"},
                {"type": "text", "text": "[CONTEXT location] Paris"},
                {"type": "text", "text": "[CONTEXT] unnamed"},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {
                    "type": "tool_use",
                    "id": "toolu_a",
                    "name": "weather",
                    "input": {"city": "Paris"},
                },
                {"type": "tool_use", "id": "toolu_b", "name": "clock", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_a", "content": "sunny"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_b",
                    "content": "boom",
                    "is_error": True,
                },
                {"type": "text", "text": "[SYSTEM NOTICE] budget low"},
            ],
        },
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_c", "name": "x", "input": {}}],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_c", "content": "done"}],
        },
    ]


async def test_explicit_max_tokens_and_no_system_or_tools(
    server: LoopbackServer, make_model: Callable[..., AnthropicModel]
) -> None:
    server.push(text_reply(), text_reply())
    model = make_model(default_max_tokens=777)
    await model.complete(request(max_tokens=123))
    await model.complete(request())
    first, second = (r.json() for r in server.requests)
    assert first["max_tokens"] == 123
    assert second["max_tokens"] == 777
    assert "system" not in first
    assert "tools" not in first
    assert first["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]


async def test_tool_results_are_moved_before_text_in_a_merged_user_message(
    server: LoopbackServer, make_model: Callable[..., AnthropicModel]
) -> None:
    server.push(text_reply())
    await make_model().complete(
        request(
            Message(role="user", content="go"),
            Message(role="assistant", tool_calls=[ToolCall(id="t1", name="a")]),
            Message(role="system_notice", content="note"),
            Message(role="tool", tool_call_id="t1", content="r1"),
        )
    )
    last = server.requests[0].json()["messages"][-1]
    assert last == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": "r1"},
            {"type": "text", "text": "[SYSTEM NOTICE] note"},
        ],
    }


async def test_explicit_key_and_base_url_win_over_env(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "env-key")
    monkeypatch.setenv("RKAT_ANTHROPIC_API_KEY", "rkat-key")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://127.0.0.1:9")
    server.push(text_reply(), text_reply())
    explicit = AnthropicModel("claude-test", api_key="explicit-key", base_url=server.url)
    monkeypatch.delenv("ANTHROPIC_BASE_URL")
    monkeypatch.setenv("RKAT_ANTHROPIC_BASE_URL", server.url)
    from_env = AnthropicModel("claude-test")
    try:
        await explicit.complete(request())
        await from_env.complete(request())
    finally:
        await explicit.aclose()
        await from_env.aclose()
    assert [r.headers["authorization"] for r in server.requests] == [
        "Bearer explicit-key",
        "Bearer env-key",
    ]


# --- errors -------------------------------------------------------------------------------


async def test_missing_key_is_an_authentication_error(server: LoopbackServer) -> None:
    model = AnthropicModel("claude-test", base_url=server.url)  # construction never fails
    with pytest.raises(AuthenticationError) as caught:
        await model.complete(request())
    assert "ANTHROPIC_API_KEY" in str(caught.value)
    assert caught.value.transient is False
    assert server.requests == []


async def test_401_is_an_authentication_error(
    server: LoopbackServer, make_model: Callable[..., AnthropicModel]
) -> None:
    server.push(api_error(401, "authentication_error", "invalid x-api-key"))
    with pytest.raises(AuthenticationError) as caught:
        await make_model().complete(request())
    err = caught.value
    assert err.status == 401
    assert err.transient is False
    assert err.kind == "authentication"
    assert "ANTHROPIC_API_KEY" in str(err)
    assert "invalid x-api-key" in str(err)
    assert "claude-test" in str(err)


async def test_key_never_appears_in_errors_or_repr(
    server: LoopbackServer, make_model: Callable[..., AnthropicModel]
) -> None:
    # A hostile server echoes the key back in its error messages.
    server.push(
        api_error(401, "authentication_error", f"invalid x-api-key {KEY}"),
        api_error(400, "invalid_request_error", f"bad key {KEY}"),
    )
    model = make_model()
    assert KEY not in repr(model)
    assert KEY not in str(model)
    for expected in (AuthenticationError, BadRequestError):
        with pytest.raises(expected) as caught:
            await model.complete(request())
        assert KEY not in str(caught.value)
        assert KEY not in repr(caught.value)
        assert "[redacted]" in str(caught.value)
    assert KEY not in repr(model)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [({"retry_after": "3"}, 3.0), ({"retry_after_ms": "1500", "retry_after": "9"}, 1.5)],
)
async def test_429_is_a_rate_limit_with_retry_after(
    server: LoopbackServer,
    make_model: Callable[..., AnthropicModel],
    headers: dict[str, str],
    expected: float,
) -> None:
    server.push(api_error(429, "rate_limit_error", "slow down", **headers))
    with pytest.raises(RateLimitError) as caught:
        await make_model().complete(request())
    err = caught.value
    assert err.retry_after == expected
    assert err.transient is True
    assert err.status == 429
    assert "slow down" in str(err)


async def test_429_retry_after_as_http_date(
    server: LoopbackServer, make_model: Callable[..., AnthropicModel]
) -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    server.push(api_error(429, "rate_limit_error", "slow down", retry_after=when))
    with pytest.raises(RateLimitError) as caught:
        await make_model().complete(request())
    assert caught.value.retry_after is not None
    assert 25.0 <= caught.value.retry_after <= 31.0


async def test_429_without_hint(
    server: LoopbackServer, make_model: Callable[..., AnthropicModel]
) -> None:
    server.push(api_error(429, "rate_limit_error", "slow down"))
    with pytest.raises(RateLimitError) as caught:
        await make_model().complete(request())
    assert caught.value.retry_after is None


@pytest.mark.parametrize(
    ("status", "error_type"),
    [(529, "overloaded_error"), (500, "api_error"), (502, "api_error"), (503, "api_error")],
)
async def test_overload_and_server_errors_are_transient(
    server: LoopbackServer,
    make_model: Callable[..., AnthropicModel],
    status: int,
    error_type: str,
) -> None:
    server.push(api_error(status, error_type, "try again later"))
    with pytest.raises(OverloadedError) as caught:
        await make_model().complete(request())
    err = caught.value
    assert err.transient is True
    assert err.status == status
    assert err.kind == "overloaded"
    assert "try again later" in str(err)


@pytest.mark.parametrize(
    "message",
    [
        "prompt is too long: 210000 tokens > 200000 maximum",
        "input length and `max_tokens` exceed context limit: 190000 + 20000 > 200000",
    ],
)
async def test_400_prompt_too_long_is_context_too_long(
    server: LoopbackServer, make_model: Callable[..., AnthropicModel], message: str
) -> None:
    server.push(api_error(400, "invalid_request_error", message))
    with pytest.raises(ContextTooLongError) as caught:
        await make_model().complete(request())
    assert caught.value.transient is False
    assert caught.value.kind == "context_too_long"
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("status", "error_type", "message"),
    [
        (400, "invalid_request_error", "temperature: range is 0 to 1"),
        (404, "not_found_error", "model: claude-nope"),
        (413, "request_too_large", "Request exceeds the maximum allowed number of bytes"),
        (422, "invalid_request_error", "unprocessable"),
    ],
)
async def test_other_client_errors_are_bad_requests(
    server: LoopbackServer,
    make_model: Callable[..., AnthropicModel],
    status: int,
    error_type: str,
    message: str,
) -> None:
    server.push(api_error(status, error_type, message))
    with pytest.raises(BadRequestError) as caught:
        await make_model().complete(request())
    err = caught.value
    assert type(err) is BadRequestError
    assert err.transient is False
    assert err.status == status
    assert message in str(err)


async def test_error_event_mid_stream_is_overloaded(
    server: LoopbackServer, make_model: Callable[..., AnthropicModel]
) -> None:
    server.push(
        stream(
            message_start(),
            text_start(0),
            text_delta(0, "Hal"),
            (
                "error",
                {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            ),
        )
    )
    pieces: list[str] = []
    with pytest.raises(OverloadedError) as caught:
        await make_model().complete(request(), on_text=pieces.append)
    assert caught.value.transient is True
    assert "Overloaded" in str(caught.value)
    assert pieces == ["Hal"]


async def test_other_error_event_mid_stream_is_mapped_by_type(
    server: LoopbackServer, make_model: Callable[..., AnthropicModel]
) -> None:
    server.push(
        stream(
            message_start(),
            ("error", {"type": "error", "error": {"type": "api_error", "message": "internal"}}),
        )
    )
    with pytest.raises(OverloadedError):
        await make_model().complete(request())


async def test_cut_stream_is_a_network_error(
    server: LoopbackServer, make_model: Callable[..., AnthropicModel]
) -> None:
    server.push(stream(message_start(), text_start(0), text_delta(0, "Hel"), cut=True))
    pieces: list[str] = []
    with pytest.raises(NetworkError) as caught:
        await make_model().complete(request(), on_text=pieces.append)
    assert caught.value.transient is True
    assert "stream ended before the model finished" in str(caught.value)
    assert pieces == ["Hel"]


async def test_stream_ending_without_a_stop_is_a_network_error(
    server: LoopbackServer, make_model: Callable[..., AnthropicModel]
) -> None:
    server.push(stream(message_start(), text_start(0), text_delta(0, "Hel"), block_stop(0)))
    with pytest.raises(NetworkError) as caught:
        await make_model().complete(request())
    assert "stream ended before the model finished" in str(caught.value)


async def test_connection_refused_is_a_network_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    model = AnthropicModel("claude-test", api_key=KEY, base_url=f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(NetworkError) as caught:
            await model.complete(request())
    finally:
        await model.aclose()
    assert caught.value.transient is True
    assert "claude-test" in str(caught.value)
    assert KEY not in str(caught.value)


async def test_errors_are_model_errors_not_sdk_exceptions(
    server: LoopbackServer, make_model: Callable[..., AnthropicModel]
) -> None:
    server.push(Reply(status=500, chunks=["<html>not json</html>"]))
    with pytest.raises(ModelError) as caught:
        await make_model().complete(request())
    assert type(caught.value) is OverloadedError
    assert caught.value.__cause__ is None


# --- cancellation -------------------------------------------------------------------------


async def test_cancel_mid_stream_returns_at_once_and_closes_the_stream(
    server: LoopbackServer, make_model: Callable[..., AnthropicModel]
) -> None:
    server.push(
        Reply(
            headers=SSE_HEADERS,
            chunks=[*sse(message_start(), text_start(0), text_delta(0, "thinking")), 30.0],
        )
    )
    first_piece = asyncio.Event()
    task = asyncio.create_task(
        make_model().complete(request(), on_text=lambda _: first_piece.set())
    )
    await asyncio.wait_for(first_piece.wait(), 5)
    assert server.open_streams == 1
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 1.0
    assert await eventually(lambda: server.open_streams == 0), "the HTTP stream stayed open"


async def test_model_is_reusable_after_a_cancelled_call(
    server: LoopbackServer, make_model: Callable[..., AnthropicModel]
) -> None:
    server.push(
        Reply(headers=SSE_HEADERS, chunks=[*sse(message_start()), 30.0]), text_reply("again")
    )
    model = make_model()
    task = asyncio.create_task(model.complete(request()))
    assert await eventually(lambda: bool(server.requests))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    response = await asyncio.wait_for(model.complete(request()), 5)
    assert response.text == "again"
