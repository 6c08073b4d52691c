"""The Anthropic provider: one streaming Messages API call per ``complete``, through the
official ``anthropic`` SDK.

Invariants (on top of those in ``llm/base.py``):
- Construction does no I/O, reads no environment and never fails. The key (explicit, else
  ``ANTHROPIC_API_KEY``, else ``RKAT_ANTHROPIC_API_KEY``) and the base URL (explicit, else
  ``ANTHROPIC_BASE_URL``, else ``RKAT_ANTHROPIC_BASE_URL``, else the SDK default) are resolved
  when the SDK client is first built, at the first ``complete``. No key there is an
  ``AuthenticationError`` naming the variables to set, raised before any request is made.
- The key is kept in one private attribute and handed only to the SDK client. It never appears
  in ``repr``, in a log line of ours, or in an error message (server texts are scrubbed of it).
- The SDK client is built lazily with ``max_retries=0`` (``llm/retry.py`` retries) and one per
  event loop (a connection pool cannot cross loops); ``aclose`` closes it.
- One call is one ``POST /v1/messages`` with ``stream: true``. Conversation mapping: ``user`` →
  user text; ``assistant`` → a text block (when the content is not blank) and then one
  ``tool_use`` block per call; ``tool`` → a user ``tool_result`` block (``is_error`` when set);
  ``system_notice`` → user text ``"[SYSTEM NOTICE] …"``; ``context`` → user text
  ``"[CONTEXT <name>] …"``. Blank text blocks are dropped (the API refuses them), consecutive
  messages of one role are merged into one message, and within a merged user message the
  ``tool_result`` blocks come first (the API requires it). ``provider_params`` are sent as extra
  top-level body fields (``stream`` excepted); ``output_schema`` is not sent.
- Streaming: every ``text_delta`` reaches ``on_text`` as it is parsed, in order; the returned
  text is their concatenation. Tool input JSON is accumulated per content block; JSON that is
  not an object becomes ``ToolCall(arguments={}, raw_arguments=<text>)``, empty input ``{}``.
  A stream that ends before a stop reason (or ``message_stop``) is a ``NetworkError``.
- ``stop_reason``: ``tool_use`` (or any turn with tool calls) → ``"tool_use"``; ``max_tokens``
  and ``model_context_window_exceeded`` → ``"max_tokens"`` (incomplete tool calls dropped);
  anything else (``end_turn``, ``stop_sequence``, ``refusal``, …) → ``"end_turn"``.
- Every failure is a typed ``ModelError``: 401/403 authentication; 429 rate limit with
  ``retry_after`` from ``retry-after-ms`` / ``retry-after`` (seconds or HTTP date); 529,
  ``overloaded_error`` and 5xx overloaded (transient); 400 "prompt too long" context too long;
  other 4xx bad request; connection failures, timeouts and broken streams network errors.
  Mid-stream ``error`` events are mapped by their error type the same way.
- Cancellation at any await (connect, headers, mid-stream) closes the HTTP response and
  re-raises ``CancelledError``; so does every other exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import anthropic
import httpx2
from anthropic.types import (
    InputJSONDelta,
    MessageParam,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    RawMessageStreamEvent,
    TextBlock,
    TextDelta,
    ToolParam,
    ToolUseBlock,
)

from ..core.lifecycle import Message, ToolCall, Usage
from .base import (
    AuthenticationError,
    BadRequestError,
    ContextTooLongError,
    ModelError,
    ModelRequest,
    ModelResponse,
    NetworkError,
    OverloadedError,
    RateLimitError,
    StopReason,
    TextSink,
    ToolSpec,
)

__all__ = ["AnthropicModel"]

KEY_ENV_VARS = ("ANTHROPIC_API_KEY", "RKAT_ANTHROPIC_API_KEY")
BASE_URL_ENV_VARS = ("ANTHROPIC_BASE_URL", "RKAT_ANTHROPIC_BASE_URL")

# Error ``type`` values of the Anthropic API and the HTTP status each one goes with; used to
# map ``error`` events that arrive in the middle of a (200) stream.
_ERROR_TYPE_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}

_CONTEXT_TOO_LONG = re.compile(
    r"prompt(_| is )too(_| )long|context(_| )(window|length|limit)"
    r"|exceeds? the (model'?s? )?(maximum )?context",
    re.IGNORECASE,
)


def _env(names: tuple[str, ...]) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


# --- request building ---------------------------------------------------------------------


def _text_block(text: str) -> dict[str, Any] | None:
    return {"type": "text", "text": text} if text.strip() else None


def _blocks(message: Message) -> tuple[str, list[dict[str, Any]]]:
    """The API role and content blocks of one of our messages."""
    if message.role == "assistant":
        blocks: list[dict[str, Any]] = []
        text = _text_block(message.content)
        if text is not None:
            blocks.append(text)
        blocks.extend(
            {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments}
            for call in message.tool_calls
        )
        return "assistant", blocks
    if message.role == "tool":
        result: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.tool_call_id or ""}
        if message.content:
            result["content"] = message.content
        if message.is_error:
            result["is_error"] = True
        return "user", [result]
    if message.role == "system_notice":
        content = f"[SYSTEM NOTICE] {message.content}"
    elif message.role == "context":
        label = f"[CONTEXT {message.name}]" if message.name else "[CONTEXT]"
        content = f"{label} {message.content}"
    else:
        content = message.content
    block = _text_block(content)
    return "user", [block] if block is not None else []


def convert_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Our conversation as Messages API ``messages`` (see the module docstring)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role, blocks = _blocks(message)
        if not blocks:
            continue
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    for entry in out:
        if entry["role"] == "user":
            content = entry["content"]
            entry["content"] = [b for b in content if b["type"] == "tool_result"] + [
                b for b in content if b["type"] != "tool_result"
            ]
    return out


def convert_tools(tools: list[ToolSpec]) -> list[dict[str, Any]]:
    return [
        {"name": t.name, "description": t.description, "input_schema": t.parameters} for t in tools
    ]


# --- response parsing ---------------------------------------------------------------------


@dataclass
class _ToolBlock:
    id: str
    name: str
    json_parts: list[str] = field(default_factory=list)

    def call(self) -> ToolCall:
        raw = "".join(self.json_parts)
        if not raw.strip():
            return ToolCall(id=self.id, name=self.name, arguments={})
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        if isinstance(value, dict):
            return ToolCall(id=self.id, name=self.name, arguments=value)
        return ToolCall(id=self.id, name=self.name, arguments={}, raw_arguments=raw)


@dataclass
class _Turn:
    """What the stream has said so far."""

    text: list[str] = field(default_factory=list)
    tools: dict[int, _ToolBlock] = field(default_factory=dict)
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation: int | None = None
    cache_read: int | None = None
    stop_reason: str | None = None
    stopped: bool = False

    def usage(self) -> Usage:
        return Usage(
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cache_creation_tokens=self.cache_creation,
            cache_read_tokens=self.cache_read,
        )

    def response(self) -> ModelResponse:
        calls = [self.tools[i].call() for i in sorted(self.tools)]
        text = "".join(self.text)
        stop: StopReason
        if self.stop_reason in ("max_tokens", "model_context_window_exceeded"):
            stop, calls = "max_tokens", []
        elif calls:
            stop = "tool_use"
        else:
            stop = "end_turn"
        return ModelResponse(
            text=text if text or stop != "tool_use" else None,
            tool_calls=calls,
            usage=self.usage(),
            stop_reason=stop,
        )


# --- errors -------------------------------------------------------------------------------


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class AnthropicModel:
    """A ``Model`` served by the Anthropic Messages API (see the module docstring)."""

    provider = "anthropic"

    def __init__(
        self,
        name: str,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = 600.0,
        default_max_tokens: int = 4096,
    ) -> None:
        self.name = name
        self.timeout = timeout
        self.default_max_tokens = default_max_tokens
        self._explicit_key = api_key
        self._explicit_base_url = base_url
        self._key: str | None = None
        self._client: anthropic.AsyncAnthropic | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"AnthropicModel(name={self.name!r}, base_url={self.base_url!r})"

    @property
    def base_url(self) -> str | None:
        """The configured base URL (``None``: the SDK default)."""
        return self._explicit_base_url or _env(BASE_URL_ENV_VARS)

    # --- client ---------------------------------------------------------------------------

    def _get_client(self) -> anthropic.AsyncAnthropic:
        loop = asyncio.get_running_loop()
        if self._client is not None and self._client_loop is loop:
            return self._client
        key = self._explicit_key or _env(KEY_ENV_VARS)
        if not key:
            raise AuthenticationError(
                f"{self._who()}: no API key; set ANTHROPIC_API_KEY "
                "(or RKAT_ANTHROPIC_API_KEY) in the environment"
            )
        self._key = key
        self._client = anthropic.AsyncAnthropic(
            api_key=key,
            base_url=self.base_url,
            timeout=self.timeout,
            max_retries=0,
            open_telemetry=False,
        )
        self._client_loop = loop
        return self._client

    async def aclose(self) -> None:
        """Close the SDK client's connections (a later call builds a new client)."""
        client, self._client, self._client_loop = self._client, None, None
        if client is not None:
            await client.close()

    # --- the call -------------------------------------------------------------------------

    async def complete(
        self, request: ModelRequest, *, on_text: TextSink | None = None
    ) -> ModelResponse:
        client = self._get_client()
        messages = cast("list[MessageParam]", convert_messages(request.messages))
        tools = cast("list[ToolParam]", convert_tools(request.tools))
        extra = {k: v for k, v in request.provider_params.items() if k != "stream"}

        stream: anthropic.AsyncStream[RawMessageStreamEvent] | None = None
        turn = _Turn()
        try:
            stream = await client.messages.create(
                model=self.name,
                max_tokens=request.max_tokens or self.default_max_tokens,
                messages=messages,
                system=request.system_prompt
                if request.system_prompt is not None
                else anthropic.omit,
                tools=tools if tools else anthropic.omit,
                stream=True,
                extra_body=extra or None,
            )
            async for event in stream:
                self._on_event(event, turn, on_text)
        except anthropic.APIStatusError as err:
            raise self._status_error(err) from None
        except anthropic.APIConnectionError as err:
            raise self._network_error(err) from None
        except (httpx2.TransportError, httpx2.StreamError) as err:
            raise self._network_error(err) from None
        except anthropic.AnthropicError as err:
            raise ModelError(f"{self._who()}: {self._scrub(str(err))}", kind="unknown") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:  # an event that is not JSON
            raise ModelError(
                f"{self._who()}: the server sent a malformed stream event: {self._scrub(str(err))}",
                transient=True,
                kind="server",
            ) from None
        finally:
            if stream is not None:
                await _close_quietly(stream)
        if not turn.stopped and turn.stop_reason is None:
            raise NetworkError(
                f"{self._who()}: the stream ended before the model finished its answer; "
                "retrying may succeed"
            )
        return turn.response()

    def _on_event(self, event: object, turn: _Turn, on_text: TextSink | None) -> None:
        if isinstance(event, RawContentBlockDeltaEvent):
            delta = event.delta
            if isinstance(delta, TextDelta):
                if delta.text:
                    turn.text.append(delta.text)
                    if on_text is not None:
                        on_text(delta.text)
            elif isinstance(delta, InputJSONDelta):
                block = turn.tools.get(event.index)
                if block is not None:
                    block.json_parts.append(delta.partial_json)
        elif isinstance(event, RawContentBlockStartEvent):
            content = event.content_block
            if isinstance(content, ToolUseBlock):
                block = _ToolBlock(content.id, content.name)
                # A start event may carry the whole input (non-empty) instead of deltas.
                if isinstance(content.input, dict) and content.input:
                    block.json_parts.append(json.dumps(content.input))
                turn.tools[event.index] = block
            elif isinstance(content, TextBlock) and content.text:
                turn.text.append(content.text)
                if on_text is not None:
                    on_text(content.text)
        elif isinstance(event, RawMessageStartEvent):
            # Read defensively: the SDK builds events without validation.
            start = getattr(event.message, "usage", None)
            turn.input_tokens = getattr(start, "input_tokens", None) or 0
            turn.output_tokens = getattr(start, "output_tokens", None) or 0
            turn.cache_creation = getattr(start, "cache_creation_input_tokens", None)
            turn.cache_read = getattr(start, "cache_read_input_tokens", None)
        elif isinstance(event, RawMessageDeltaEvent):
            reason = getattr(event.delta, "stop_reason", None)
            if reason is not None:
                turn.stop_reason = reason
            usage = getattr(event, "usage", None)
            output = getattr(usage, "output_tokens", None)
            if output is not None:
                turn.output_tokens = output
            # message_delta counts are cumulative: when present they replace the start's.
            for attr, value in (
                ("input_tokens", getattr(usage, "input_tokens", None)),
                ("cache_creation", getattr(usage, "cache_creation_input_tokens", None)),
                ("cache_read", getattr(usage, "cache_read_input_tokens", None)),
            ):
                if value is not None:
                    setattr(turn, attr, value)
        elif isinstance(event, RawMessageStopEvent):
            turn.stopped = True

    # --- error mapping --------------------------------------------------------------------

    def _who(self) -> str:
        return f"anthropic model {self.name!r}"

    def _scrub(self, text: str) -> str:
        for secret in (self._key, self._explicit_key):
            if secret:
                text = text.replace(secret, "[redacted]")
        return text

    def _network_error(self, err: BaseException) -> NetworkError:
        if isinstance(err, anthropic.APITimeoutError | httpx2.TimeoutException):
            what = f"the request timed out (timeout {self.timeout:g} s)"
        elif isinstance(err, anthropic.APIConnectionError):
            cause = err.__cause__
            detail = f": {cause}" if cause is not None and str(cause) else ""
            what = f"could not connect to {self.base_url or 'api.anthropic.com'}{detail}"
        else:
            what = f"the stream ended before the model finished its answer ({err})"
        return NetworkError(f"{self._who()}: {self._scrub(what)}; retrying may succeed")

    def _status_error(self, err: anthropic.APIStatusError) -> ModelError:
        error_type = err.type if isinstance(err.type, str) else None
        status = err.status_code
        if status == 200:  # an ``error`` event in the middle of the stream
            status = _ERROR_TYPE_STATUS.get(error_type or "", 500)
            mid = " (in the middle of the stream)"
            http_status: int | None = None
        else:
            mid = ""
            http_status = status
        server = err.api_message if isinstance(err.api_message, str) else None
        if server is None:
            server = err.message
        detail = self._scrub(server)
        who = f"{self._who()}{mid}"
        headers = err.response.headers if err.response is not None else None
        retry_after = _retry_after(headers) if mid == "" else None

        if status in (401, 403) or error_type in ("authentication_error", "permission_error"):
            return AuthenticationError(
                f"{who}: the API key was refused ({status}: {detail}); check ANTHROPIC_API_KEY "
                "and that the key may use this model",
                status=http_status,
            )
        if status == 429 or error_type == "rate_limit_error":
            hint = (
                f"; the server asked to wait {retry_after:g} s" if retry_after is not None else ""
            )
            return RateLimitError(
                f"{who}: rate limited (429: {detail}){hint}",
                status=http_status,
                retry_after=retry_after,
            )
        if status == 529 or error_type == "overloaded_error":
            return OverloadedError(
                f"{who}: the API is overloaded ({status}: {detail}); retry later",
                status=http_status,
                retry_after=retry_after,
            )
        if status >= 500:
            return OverloadedError(
                f"{who}: the API failed on its side ({status}: {detail}); retry later",
                status=http_status,
                retry_after=retry_after,
            )
        code = err.error_code if isinstance(err.error_code, str) else ""
        if status in (400, 413) and _CONTEXT_TOO_LONG.search(f"{detail} {code}"):
            return ContextTooLongError(
                f"{who}: the conversation does not fit the model's context window ({detail})",
                status=http_status,
            )
        if status == 404:
            return BadRequestError(
                f"{who}: not found ({detail}); check the model name and the base URL",
                status=http_status,
            )
        return BadRequestError(
            f"{who}: the request was refused ({status}: {detail})", status=http_status
        )


async def _close_quietly(stream: anthropic.AsyncStream[RawMessageStreamEvent]) -> None:
    """Close the HTTP response; never raises (except when cancelled while closing)."""
    with contextlib.suppress(Exception):  # closing a broken connection may fail: nothing to do
        await stream.close()
