"""OpenAIModel with the real ``openai`` SDK client against the loopback server, which speaks
the Chat Completions SSE format (``data: {chunk}`` ... ``data: [DONE]``)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from meerkat_runtime.core.lifecycle import Message, ToolCall
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
from meerkat_runtime.llm.openai import OpenAIModel, parse_retry_after

from .loopback import LoopbackServer, Reply, sse

KEY = "sk-test-0123456789abcdef-SECRET"
ENV_VARS = (
    "OPENAI_API_KEY",
    "RKAT_OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "RKAT_OPENAI_BASE_URL",
    "OPENAI_ORG_ID",
    "OPENAI_PROJECT_ID",
    "OPENAI_ADMIN_KEY",
    "OPENAI_CUSTOM_HEADERS",
)

MakeModel = Callable[..., OpenAIModel]


def chunk(
    delta: dict[str, Any] | None = None,
    finish: str | None = None,
    *,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-test",
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def usage_chunk(prompt: int, completion: int, cached: int | None = None) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return chunk(None, usage=usage)


def stream(*chunks: dict[str, Any] | float, done: bool = True, cut: bool = False) -> Reply:
    """An SSE reply; a float is a pause in seconds."""
    out: list[bytes | str | float] = []
    for c in chunks:
        if isinstance(c, float):
            out.append(c)
        else:
            out.extend(sse((None, c)))
    if done:
        out.extend(sse((None, "[DONE]")))
    return Reply(headers={"content-type": "text/event-stream"}, chunks=out, cut=cut)


def error(status: int, message: str, code: str | None = None, **headers: str) -> Reply:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
    return Reply.json(status, body, {k.replace("_", "-"): v for k, v in headers.items()})


def request(**kw: Any) -> ModelRequest:
    kw.setdefault("messages", [Message(role="user", content="hi")])
    return ModelRequest(**kw)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    with LoopbackServer() as s:
        yield s


@pytest.fixture
async def make(server: LoopbackServer, clean_env: pytest.MonkeyPatch) -> AsyncIterator[MakeModel]:
    models: list[OpenAIModel] = []

    def factory(name: str = "gpt-test", **kw: Any) -> OpenAIModel:
        kw.setdefault("api_key", KEY)
        kw.setdefault("base_url", server.url + "/v1")
        model = OpenAIModel(name, **kw)
        models.append(model)
        return model

    yield factory
    for model in models:
        await model.aclose()


async def streams_closed(server: LoopbackServer, within: float = 2.0) -> None:
    """Poll (the server runs on its own thread) until it has no stream open."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if server.open_streams == 0:
            break
        await asyncio.sleep(0.02)
    assert server.open_streams == 0


async def raises(model: OpenAIModel, req: ModelRequest | None = None) -> ModelError:
    with pytest.raises(ModelError) as info:
        await model.complete(req or request())
    err = info.value
    assert KEY not in str(err)
    assert KEY not in repr(err)
    return err


# --- streaming answers --------------------------------------------------------------------


async def test_text_is_streamed_in_order_with_usage(
    server: LoopbackServer, make: MakeModel
) -> None:
    server.push(
        stream(
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": "Hel"}),
            chunk({"content": "lo, "}),
            chunk({"content": "world"}),
            chunk({}, "stop"),
            usage_chunk(12, 3, cached=8),
        )
    )
    pieces: list[str] = []
    response = await make().complete(request(), on_text=pieces.append)
    assert pieces == ["Hel", "lo, ", "world"]
    assert response.text == "Hello, world"
    assert response.tool_calls == []
    assert response.stop_reason == "end_turn"
    assert response.usage.input_tokens == 12
    assert response.usage.output_tokens == 3
    assert response.usage.cache_read_tokens == 8


async def test_usage_without_cache_details_and_length_stop(
    server: LoopbackServer, make: MakeModel
) -> None:
    server.push(stream(chunk({"content": "trunc"}), chunk({}, "length"), usage_chunk(4, 1)))
    response = await make().complete(request())
    assert response.stop_reason == "max_tokens"
    assert response.text == "trunc"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (4, 1)
    assert response.usage.cache_read_tokens is None


async def test_parallel_tool_calls_joined_from_fragments(
    server: LoopbackServer, make: MakeModel
) -> None:
    def call(index: int, args: str, **first: str) -> dict[str, Any]:
        part: dict[str, Any] = {"index": index, "function": {"arguments": args}}
        if first:
            part["id"] = first["id"]
            part["type"] = "function"
            part["function"]["name"] = first["name"]
        return {"tool_calls": [part]}

    server.push(
        stream(
            chunk({"role": "assistant", "content": "Let me look."}),
            chunk(call(0, "", id="call_a", name="search")),
            chunk(call(0, '{"q": ')),
            chunk(call(1, '{"pa', id="call_b", name="read_file")),
            chunk(call(0, '"cats"}')),
            chunk(call(1, 'th": "/tmp/x"}')),
            chunk({}, "tool_calls"),
            usage_chunk(20, 9),
        )
    )
    pieces: list[str] = []
    response = await make().complete(request(), on_text=pieces.append)
    assert response.stop_reason == "tool_use"
    assert response.text == "Let me look."
    assert pieces == ["Let me look."]
    assert response.tool_calls == [
        ToolCall(id="call_a", name="search", arguments={"q": "cats"}),
        ToolCall(id="call_b", name="read_file", arguments={"path": "/tmp/x"}),
    ]


async def test_malformed_and_empty_tool_arguments(server: LoopbackServer, make: MakeModel) -> None:
    server.push(
        stream(
            chunk({"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "a"}}]}),
            chunk({"tool_calls": [{"index": 1, "id": "c2", "function": {"name": "b"}}]}),
            chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"x": 1,'}}]}),
            chunk({"tool_calls": [{"index": 2, "id": "c3", "function": {"name": "c"}}]}),
            chunk({"tool_calls": [{"index": 2, "function": {"arguments": "[1, 2]"}}]}),
            # a length stop with tool calls is still a tool_use turn
            chunk({}, "length"),
        )
    )
    response = await make().complete(request())
    assert response.stop_reason == "tool_use"
    assert response.text is None
    a, b, c = response.tool_calls
    assert (a.arguments, a.raw_arguments) == ({}, None)
    assert (b.arguments, b.raw_arguments) == ({}, '{"x": 1,')
    assert (c.arguments, c.raw_arguments) == ({}, "[1, 2]")


async def test_concurrent_first_calls_share_one_client(
    server: LoopbackServer, make: MakeModel
) -> None:
    server.push(
        stream(chunk({"content": "one"}), chunk({}, "stop")),
        stream(chunk({"content": "two"}), chunk({}, "stop")),
    )
    model = make()
    a, b = await asyncio.gather(model.complete(request()), model.complete(request()))
    assert sorted([a.text or "", b.text or ""]) == ["one", "two"]
    assert len(server.requests) == 2


# --- request shape ------------------------------------------------------------------------


async def test_request_shape_every_role_tools_and_params(
    server: LoopbackServer, make: MakeModel
) -> None:
    server.push(stream(chunk({"content": "ok"}), chunk({}, "stop")))
    messages = [
        Message(role="user", content="question"),
        Message(
            role="assistant",
            content="",
            tool_calls=[ToolCall(id="call_1", name="search", arguments={"q": "x"})],
        ),
        Message(role="tool", tool_call_id="call_1", content="boom", is_error=True),
        Message(role="assistant", content="partial answer"),
        Message(role="system_notice", content="run resumed"),
        Message(role="context", name="repo", content="main branch"),
        Message(role="context", content="no name"),
    ]
    tool = ToolSpec(
        name="search",
        description="Search things",
        parameters={"type": "object", "properties": {"q": {"type": "string"}}},
    )
    req = ModelRequest(
        messages=messages,
        system_prompt="Be brief.",
        tools=[tool],
        max_tokens=77,
        output_schema={"type": "object"},
        provider_params={"temperature": 0.2, "custom_knob": {"deep": [1, 2]}},
    )
    await make("my-local-model").complete(req)
    (recorded,) = server.requests
    assert recorded.method == "POST"
    assert recorded.path == "/v1/chat/completions"
    assert recorded.headers["authorization"] == f"Bearer {KEY}"
    body = recorded.json()
    assert body["model"] == "my-local-model"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "question"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "search", "arguments": '{"q":"x"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "boom"},
        {"role": "assistant", "content": "partial answer"},
        {"role": "user", "content": "[SYSTEM NOTICE] run resumed"},
        {"role": "user", "content": "[CONTEXT repo] main branch"},
        {"role": "user", "content": "[CONTEXT] no name"},
    ]
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "search",
                "description": "Search things",
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
            },
        }
    ]
    # a custom base URL: max_tokens, and no native structured output unless asked for
    assert body["max_tokens"] == 77
    assert "max_completion_tokens" not in body
    assert "response_format" not in body
    assert body["temperature"] == 0.2
    assert body["custom_knob"] == {"deep": [1, 2]}


async def test_minimal_request_omits_optional_fields(
    server: LoopbackServer, make: MakeModel
) -> None:
    server.push(stream(chunk({"content": "ok"}), chunk({}, "stop")))
    await make().complete(request())
    body = server.requests[0].json()
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    for absent in ("tools", "max_tokens", "max_completion_tokens", "response_format"):
        assert absent not in body


async def test_response_format_when_native_structured_output_enabled(
    server: LoopbackServer, make: MakeModel
) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    server.push(stream(chunk({"content": '{"n": 1}'}), chunk({}, "stop")))
    response = await make(native_structured_output=True).complete(request(output_schema=schema))
    assert response.text == '{"n": 1}'
    body = server.requests[0].json()
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema},
    }


def test_default_openai_url_uses_max_completion_tokens_and_native_schema(
    clean_env: pytest.MonkeyPatch,
) -> None:
    model = OpenAIModel("gpt-4o", api_key=KEY)
    params = model.request_params(request(max_tokens=5, output_schema={"type": "object"}))
    assert params["max_completion_tokens"] == 5
    assert "max_tokens" not in params
    assert params["response_format"]["json_schema"]["name"] == "output"
    off = OpenAIModel("gpt-4o", api_key=KEY, native_structured_output=False)
    assert "response_format" not in off.request_params(request(output_schema={"type": "object"}))


def test_provider_params_may_not_override_the_call(clean_env: pytest.MonkeyPatch) -> None:
    model = OpenAIModel("gpt-4o", api_key=KEY)
    with pytest.raises(BadRequestError, match="stream"):
        model.request_params(request(provider_params={"stream": False}))


async def test_env_base_url_and_rkat_key(
    server: LoopbackServer, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("OPENAI_BASE_URL", server.url + "/v1")
    clean_env.setenv("RKAT_OPENAI_API_KEY", "rkat-only-key")
    model = OpenAIModel("gpt-test")
    server.push(stream(chunk({"content": "ok"}), chunk({}, "stop")))
    try:
        assert (await model.complete(request())).text == "ok"
    finally:
        await model.aclose()
    assert server.requests[0].path == "/v1/chat/completions"
    assert server.requests[0].headers["authorization"] == "Bearer rkat-only-key"


async def test_openai_key_wins_over_rkat_key_and_rkat_base_url(
    server: LoopbackServer, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("RKAT_OPENAI_BASE_URL", server.url + "/v1")
    clean_env.setenv("OPENAI_API_KEY", "openai-key")
    clean_env.setenv("RKAT_OPENAI_API_KEY", "rkat-key")
    model = OpenAIModel("gpt-test")
    server.push(stream(chunk({"content": "ok"}), chunk({}, "stop")))
    try:
        await model.complete(request())
    finally:
        await model.aclose()
    assert server.requests[0].headers["authorization"] == "Bearer openai-key"


async def test_custom_base_url_without_key_uses_a_placeholder(
    server: LoopbackServer, make: MakeModel
) -> None:
    server.push(stream(chunk({"content": "ok"}), chunk({}, "stop")))
    assert (await make(api_key=None).complete(request())).text == "ok"
    auth = server.requests[0].headers["authorization"]
    assert auth.startswith("Bearer ") and len(auth) > len("Bearer ")


async def test_missing_key_with_default_url(clean_env: pytest.MonkeyPatch) -> None:
    model = OpenAIModel("gpt-4o")  # construction never fails for a missing key
    with pytest.raises(AuthenticationError) as info:
        await model.complete(request())
    message = str(info.value)
    assert "OPENAI_API_KEY" in message and "RKAT_OPENAI_API_KEY" in message
    assert "gpt-4o" in message
    assert "sk-" not in message and "Bearer" not in message
    assert info.value.transient is False


async def test_key_never_in_repr_or_errors(server: LoopbackServer, make: MakeModel) -> None:
    model = make()
    assert KEY not in repr(model) and KEY not in str(model)
    server.push(error(401, f"Incorrect API key provided: {KEY}.", "invalid_api_key"))
    err = await raises(model)
    assert isinstance(err, AuthenticationError)
    assert err.status == 401 and err.transient is False
    assert "Incorrect API key provided" in str(err)
    assert "OPENAI_API_KEY" in str(err)
    assert err.__cause__ is None


# --- errors -------------------------------------------------------------------------------


async def test_permission_denied_is_authentication(server: LoopbackServer, make: MakeModel) -> None:
    server.push(error(403, "You are not allowed to sample from this model"))
    err = await raises(make())
    assert isinstance(err, AuthenticationError)
    assert err.status == 403
    assert "not allowed to sample" in str(err)


async def test_rate_limit_with_retry_after_seconds(server: LoopbackServer, make: MakeModel) -> None:
    server.push(error(429, "Rate limit reached", "rate_limit_exceeded", retry_after="7"))
    err = await raises(make("gpt-x"))
    assert isinstance(err, RateLimitError)
    assert err.retry_after == 7.0
    assert err.transient is True and err.status == 429
    assert "gpt-x" in str(err) and "Rate limit reached" in str(err)


async def test_rate_limit_with_retry_after_ms(server: LoopbackServer, make: MakeModel) -> None:
    server.push(error(429, "slow down", retry_after_ms="1500", retry_after="9"))
    err = await raises(make())
    assert isinstance(err, RateLimitError)
    assert err.retry_after == 1.5


async def test_insufficient_quota_is_not_transient(server: LoopbackServer, make: MakeModel) -> None:
    server.push(error(429, "You exceeded your current quota", "insufficient_quota"))
    err = await raises(make())
    assert isinstance(err, RateLimitError)
    assert err.transient is False


def test_parse_retry_after_forms() -> None:
    now = 1_700_000_000.0
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 30))
    assert parse_retry_after({"retry-after": date}, now=now) == pytest.approx(30.0)
    assert parse_retry_after({"retry-after": "2.5"}) == 2.5
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


async def test_context_length_exceeded_by_code(server: LoopbackServer, make: MakeModel) -> None:
    server.push(error(400, "Your messages resulted in 9000 tokens.", "context_length_exceeded"))
    err = await raises(make())
    assert isinstance(err, ContextTooLongError)
    assert err.transient is False and err.status == 400


async def test_context_length_exceeded_by_message(server: LoopbackServer, make: MakeModel) -> None:
    server.push(error(400, "This model's maximum context length is 4096 tokens. However..."))
    err = await raises(make())
    assert isinstance(err, ContextTooLongError)


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_other_client_errors_are_bad_requests(
    server: LoopbackServer, make: MakeModel, status: int
) -> None:
    server.push(error(status, f"Unrecognized request argument supplied: foo{status}"))
    err = await raises(make())
    assert type(err) is BadRequestError
    assert err.status == status and err.transient is False
    assert f"Unrecognized request argument supplied: foo{status}" in str(err)


@pytest.mark.parametrize("status", [500, 503])
async def test_server_errors_are_transient_overload(
    server: LoopbackServer, make: MakeModel, status: int
) -> None:
    server.push(error(status, "The server is overloaded", retry_after="3"))
    err = await raises(make())
    assert isinstance(err, OverloadedError)
    assert err.transient is True and err.status == status
    assert err.retry_after == 3.0


async def test_error_event_inside_the_stream(server: LoopbackServer, make: MakeModel) -> None:
    server.push(
        stream(
            chunk({"content": "par"}),
            {"error": {"message": "upstream hiccup", "type": "server_error"}},
        )
    )
    err = await raises(make())
    assert err.transient is True and err.kind == "server"
    assert "upstream hiccup" in str(err)


async def test_stream_cut_in_the_middle(server: LoopbackServer, make: MakeModel) -> None:
    server.push(stream(chunk({"content": "half"}), done=False, cut=True))
    pieces: list[str] = []
    model = make()
    with pytest.raises(NetworkError) as info:
        await model.complete(request(), on_text=pieces.append)
    assert pieces == ["half"]
    assert info.value.transient is True
    assert "stream ended before the model finished" in str(info.value)
    # the model still works after a broken stream
    server.push(stream(chunk({"content": "again"}), chunk({}, "stop")))
    assert (await model.complete(request())).text == "again"


async def test_stream_ending_without_finish_reason(server: LoopbackServer, make: MakeModel) -> None:
    server.push(stream(chunk({"content": "no end"})))
    with pytest.raises(NetworkError, match="stream ended before the model finished"):
        await make().complete(request())


async def test_cut_after_finish_reason_keeps_the_answer(
    server: LoopbackServer, make: MakeModel
) -> None:
    server.push(stream(chunk({"content": "done"}), chunk({}, "stop"), done=False, cut=True))
    response = await make().complete(request())
    assert response.text == "done" and response.stop_reason == "end_turn"


async def test_connection_refused(make: MakeModel) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = await raises(make(base_url=f"http://127.0.0.1:{port}/v1"))
    assert isinstance(err, NetworkError)
    assert err.transient is True
    assert f"127.0.0.1:{port}" in str(err)


# --- cancellation -------------------------------------------------------------------------


async def test_cancel_mid_stream_returns_fast_and_closes_the_stream(
    server: LoopbackServer, make: MakeModel
) -> None:
    server.push(stream(chunk({"content": "start"}), 30.0, chunk({}, "stop")))
    started = asyncio.Event()
    pieces: list[str] = []

    def on_text(piece: str) -> None:
        pieces.append(piece)
        started.set()

    task = asyncio.create_task(make().complete(request(), on_text=on_text))
    await asyncio.wait_for(started.wait(), 5)
    assert server.open_streams == 1
    begin = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - begin < 1.0
    assert pieces == ["start"]
    await streams_closed(server)


async def test_on_text_error_propagates_and_closes_the_stream(
    server: LoopbackServer, make: MakeModel
) -> None:
    server.push(stream(chunk({"content": "start"}), 30.0, chunk({}, "stop")))

    def on_text(piece: str) -> None:
        raise RuntimeError(f"sink failed on {piece!r}")

    with pytest.raises(RuntimeError, match="sink failed on 'start'"):
        await asyncio.wait_for(make().complete(request(), on_text=on_text), 5)
    await streams_closed(server)
