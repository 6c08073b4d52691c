"""The OpenAI provider (and OpenAI-compatible servers: vLLM, llama.cpp, Ollama, ...), through
the official ``openai`` SDK's streaming Chat Completions API.

Invariants (on top of those of ``llm/base.py``):
- Construction does no I/O, reads no key and never fails for a missing key. The base URL is
  resolved at construction (explicit, else ``OPENAI_BASE_URL``, else ``RKAT_OPENAI_BASE_URL``,
  else the SDK default); the key at the first call on an event loop (explicit, else
  ``OPENAI_API_KEY``, else ``RKAT_OPENAI_API_KEY``). A custom base URL without a key uses a
  placeholder key (local servers need none); the default URL without a key makes ``complete``
  raise ``AuthenticationError`` naming the variables to set, before any I/O.
- The key never appears in an error message, a ``repr`` or a log line: server messages are
  scrubbed of it, and errors made from a server answer do not chain the SDK exception.
- The SDK (slow to import) is imported, and its client built, on a worker thread at the first
  call on each event loop; the client is reused on that loop and never retries
  (``max_retries=0``): retries belong to ``llm/retry.py``.
- One ``complete`` is one streaming ``chat.completions.create`` call. Every content delta is
  passed to ``on_text`` in order as it arrives; tool call deltas are joined by ``index``.
  Arguments that are not a JSON object give ``ToolCall(arguments={}, raw_arguments=text)``;
  empty arguments are ``{}``. Any tool call makes ``stop_reason == "tool_use"``; otherwise
  ``length`` is ``max_tokens`` and every other finish reason ``end_turn``.
- A stream that ends or breaks before a finish reason arrives is a ``NetworkError``; one that
  breaks after it (e.g. before the usage chunk) still yields the answer.
- Every failure is a ``ModelError`` subclass of ``llm/base.py`` naming the provider and model,
  never a bare SDK or transport exception. ``on_text`` exceptions propagate unchanged.
- ``complete`` is cancellable at every await; on any exit (cancellation included) the HTTP
  stream is closed before the exception propagates.
- Request shape: ``request.system_prompt`` is a leading system message; ``system_notice`` and
  ``context`` messages become user messages tagged ``[SYSTEM NOTICE]`` / ``[CONTEXT name]``;
  ``max_tokens`` is sent as ``max_completion_tokens`` to OpenAI and as ``max_tokens`` to other
  servers; ``output_schema`` becomes a ``json_schema`` ``response_format`` only when native
  structured output is on (default: on for OpenAI, off elsewhere); ``provider_params`` are
  merged into the top level of the request body last (they win), except that they may not
  set ``model``, ``messages`` or ``stream``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import inspect
import json
import math
import os
import re
import ssl
import time
import uuid
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .._json import compact
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
)

if TYPE_CHECKING:
    import openai
    from openai.types.chat import ChatCompletionChunk

__all__ = ["OpenAIModel", "convert_message", "parse_retry_after"]

KEY_ENV_VARS = ("OPENAI_API_KEY", "RKAT_OPENAI_API_KEY")
BASE_URL_ENV_VARS = ("OPENAI_BASE_URL", "RKAT_OPENAI_BASE_URL")
PLACEHOLDER_KEY = "no-key-required"
"""Sent to custom base URLs when no key is configured (local servers ignore it)."""

_RESERVED_PARAMS = frozenset({"model", "messages", "stream"})
_CONTEXT_PATTERN = re.compile(
    r"context[ _-]?(length|window|size)|maximum context|prompt is too long|too many tokens",
    re.IGNORECASE,
)
_STOP_REASONS: dict[str, StopReason] = {"length": "max_tokens"}


def _env(names: tuple[str, ...]) -> str | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def _display_url(url: str) -> str:
    """``url`` without credentials, query or fragment (safe for messages)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid base URL>"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _is_openai_url(url: str) -> bool:
    try:
        return (urlsplit(url).hostname or "").lower() == "api.openai.com"
    except ValueError:
        return False


def parse_retry_after(
    headers: Mapping[str, str] | None, *, now: float | None = None
) -> float | None:
    """The server's wait hint in seconds: ``retry-after-ms`` (milliseconds), else
    ``retry-after`` as seconds or an HTTP date. ``None`` when absent or unreadable; never
    negative."""
    if headers is None:
        return None
    for header, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(header)
        if value is None:
            continue
        try:
            seconds = float(value.strip()) / divisor
        except ValueError:
            continue
        if math.isfinite(seconds):
            return max(0.0, seconds)
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        when = email.utils.mktime_tz(parsed)
    except (TypeError, ValueError, OverflowError):
        return None
    return max(0.0, float(when - (time.time() if now is None else now)))


# --- request building ---------------------------------------------------------------------


def _tool_call_param(call: ToolCall) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": compact(call.arguments)},
    }


def convert_message(message: Message) -> dict[str, Any]:
    """One of our messages as a Chat Completions message."""
    role = message.role
    if role == "assistant":
        out: dict[str, Any] = {"role": "assistant"}
        if message.tool_calls:
            out["content"] = message.content or None
            out["tool_calls"] = [_tool_call_param(c) for c in message.tool_calls]
        else:
            out["content"] = message.content
        return out
    if role == "tool":
        if message.tool_call_id:
            return {
                "role": "tool",
                "tool_call_id": message.tool_call_id,
                "content": message.content,
            }
        # A result that answers no call id cannot be a tool message; keep its text visible.
        label = f"[TOOL RESULT {message.name}]" if message.name else "[TOOL RESULT]"
        return {"role": "user", "content": f"{label} {message.content}"}
    if role == "system_notice":
        return {"role": "user", "content": f"[SYSTEM NOTICE] {message.content}"}
    if role == "context":
        label = f"[CONTEXT {message.name}]" if message.name else "[CONTEXT]"
        return {"role": "user", "content": f"{label} {message.content}"}
    return {"role": "user", "content": message.content}


# --- stream accumulation ------------------------------------------------------------------


@dataclass
class _PendingCall:
    id: str | None = None
    name: str = ""
    arguments: list[str] = field(default_factory=list)

    def build(self) -> ToolCall:
        call_id = self.id or f"call_{uuid.uuid4().hex[:24]}"
        text = "".join(self.arguments)
        if not text.strip():
            return ToolCall(id=call_id, name=self.name, arguments={})
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if isinstance(value, dict):
            return ToolCall(id=call_id, name=self.name, arguments=value)
        return ToolCall(id=call_id, name=self.name, arguments={}, raw_arguments=text)


@dataclass
class _Accumulator:
    text: list[str] = field(default_factory=list)
    calls: dict[int, _PendingCall] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)

    def add(self, chunk: ChatCompletionChunk, on_text: TextSink | None) -> None:
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            details = getattr(usage, "prompt_tokens_details", None)
            cached = getattr(details, "cached_tokens", None) if details is not None else None
            self.usage = Usage(
                input_tokens=getattr(usage, "prompt_tokens", None) or 0,
                output_tokens=getattr(usage, "completion_tokens", None) or 0,
                cache_read_tokens=cached if isinstance(cached, int) else None,
            )
        for choice in getattr(chunk, "choices", None) or []:
            if (getattr(choice, "index", None) or 0) != 0:
                continue  # we ask for one choice; ignore any other
            delta = getattr(choice, "delta", None)
            if delta is not None:
                for piece in (getattr(delta, "content", None), getattr(delta, "refusal", None)):
                    if piece:
                        self.text.append(piece)
                        if on_text is not None:
                            on_text(piece)
                for part in getattr(delta, "tool_calls", None) or []:
                    self._add_call(part)
            reason = getattr(choice, "finish_reason", None)
            if reason:
                self.finish_reason = reason

    def _add_call(self, part: Any) -> None:
        index = getattr(part, "index", None) or 0
        pending = self.calls.setdefault(index, _PendingCall())
        call_id = getattr(part, "id", None)
        if call_id and not pending.id:
            pending.id = call_id
        function = getattr(part, "function", None)
        if function is None:
            return
        name = getattr(function, "name", None)
        if name and not pending.name:
            pending.name = name
        arguments = getattr(function, "arguments", None)
        if arguments:
            pending.arguments.append(arguments)

    def response(self) -> ModelResponse:
        calls = [self.calls[i].build() for i in sorted(self.calls)]
        text = "".join(self.text)
        stop_reason: StopReason
        if calls:
            stop_reason = "tool_use"
        else:
            stop_reason = _STOP_REASONS.get(self.finish_reason or "", "end_turn")
        return ModelResponse(
            text=(text or None) if calls else text,
            tool_calls=calls,
            usage=self.usage,
            stop_reason=stop_reason,
        )


def _transport_errors() -> tuple[type[BaseException], ...]:
    import anyio
    import httpx2

    return (
        httpx2.TransportError,
        httpx2.StreamError,
        anyio.EndOfStream,
        anyio.BrokenResourceError,
        ssl.SSLError,
        ConnectionError,
        TimeoutError,
    )


# --- the model ----------------------------------------------------------------------------


class OpenAIModel:
    """A ``Model`` served by the OpenAI Chat Completions API or a server that speaks it."""

    def __init__(
        self,
        name: str,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = 600.0,
        native_structured_output: bool | None = None,
    ) -> None:
        self.name = name
        self._explicit_key = api_key or None
        self.base_url: str | None = (base_url or "").strip() or _env(BASE_URL_ENV_VARS)
        self.timeout = timeout
        self.is_openai = self.base_url is None or _is_openai_url(self.base_url)
        self.native_structured_output = (
            self.is_openai if native_structured_output is None else native_structured_output
        )
        self._client: openai.AsyncOpenAI | None = None
        self._client_key: str | None = None
        self._client_loop: weakref.ref[asyncio.AbstractEventLoop] | None = None

    def __repr__(self) -> str:
        where = "default" if self.base_url is None else _display_url(self.base_url)
        return f"OpenAIModel(name={self.name!r}, base_url={where!r})"

    @property
    def provider_label(self) -> str:
        if self.base_url is None:
            return "OpenAI"
        if self.is_openai:
            return f"OpenAI ({_display_url(self.base_url)})"
        return f"OpenAI-compatible server {_display_url(self.base_url)}"

    # --- public API ---

    async def complete(
        self, request: ModelRequest, *, on_text: TextSink | None = None
    ) -> ModelResponse:
        params = self.request_params(request)
        client = await self._get_client()
        import openai

        try:
            stream: openai.AsyncStream[ChatCompletionChunk] = await client.chat.completions.create(
                **params
            )
        except openai.OpenAIError as err:
            raise self._convert_error(err) from None
        except _transport_errors() as err:
            raise NetworkError(self._msg(f"the connection failed ({_describe(err)})")) from err
        try:
            return await self._consume(stream, on_text)
        finally:
            await _close_stream(stream)

    async def aclose(self) -> None:
        """Close the HTTP client (a later call builds a new one). A client made on another
        event loop is only dropped: its connections cannot be closed from this loop."""
        client, owner = self._client, self._client_loop
        self._client = self._client_loop = None
        if client is not None and owner is not None and owner() is asyncio.get_running_loop():
            await client.close()

    def request_params(self, request: ModelRequest) -> dict[str, Any]:
        """The keyword arguments of the ``chat.completions.create`` call for ``request``."""
        reserved = sorted(_RESERVED_PARAMS & request.provider_params.keys())
        if reserved:
            raise BadRequestError(
                self._msg(f"provider_params may not set {', '.join(reserved)}"), status=None
            )
        messages: list[dict[str, Any]] = []
        if request.system_prompt:
            messages.append({"role": "system", "content": request.system_prompt})
        messages.extend(convert_message(m) for m in request.messages)
        params: dict[str, Any] = {
            "model": self.name,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.tools:
            params["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.parameters,
                    },
                }
                for t in request.tools
            ]
        if request.max_tokens is not None:
            field_name = "max_completion_tokens" if self.is_openai else "max_tokens"
            params[field_name] = request.max_tokens
        if request.output_schema is not None and self.native_structured_output:
            params["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": request.output_schema},
            }
        if request.provider_params:
            params["extra_body"] = dict(request.provider_params)
        return params

    # --- internals ---

    def _msg(self, text: str) -> str:
        return self._redact(f"{self.provider_label} model {self.name!r}: {text}")

    def _redact(self, text: str) -> str:
        for key in (self._explicit_key, self._client_key, *(_env((v,)) for v in KEY_ENV_VARS)):
            if key and key != PLACEHOLDER_KEY:
                text = text.replace(key, "[redacted]")
        return text

    def _resolve_key(self) -> str:
        key = self._explicit_key or _env(KEY_ENV_VARS)
        if key:
            return key
        if self.is_openai:
            raise AuthenticationError(
                self._msg(
                    "no API key; set OPENAI_API_KEY (or RKAT_OPENAI_API_KEY), or set "
                    "OPENAI_BASE_URL to use a local OpenAI-compatible server instead"
                )
            )
        return PLACEHOLDER_KEY

    async def _get_client(self) -> openai.AsyncOpenAI:
        loop = asyncio.get_running_loop()
        client = self._client
        if client is not None and self._client_loop is not None and self._client_loop() is loop:
            return client
        key = self._resolve_key()
        client = await asyncio.to_thread(self._build_client, key)
        current, owner = self._client, self._client_loop
        if current is not None and owner is not None and owner() is loop:
            await client.close()  # a concurrent first call on this loop won the race
            return current
        self._client, self._client_key, self._client_loop = client, key, weakref.ref(loop)
        return client

    def _build_client(self, key: str) -> openai.AsyncOpenAI:
        import openai

        return openai.AsyncOpenAI(
            api_key=key,
            base_url=self.base_url,
            max_retries=0,
            timeout=self.timeout,
        )

    async def _consume(
        self, stream: openai.AsyncStream[ChatCompletionChunk], on_text: TextSink | None
    ) -> ModelResponse:
        import openai

        acc = _Accumulator()
        broken: tuple[type[BaseException], ...] = (openai.APIConnectionError, *_transport_errors())
        while True:
            try:
                chunk = await stream.__anext__()
            except StopAsyncIteration:
                break
            except broken as err:
                if acc.finish_reason is not None:
                    break  # the answer is complete; only the trailer (usage) was lost
                raise NetworkError(
                    self._msg(f"the stream ended before the model finished ({_describe(err)})")
                ) from err
            except openai.OpenAIError as err:
                raise self._convert_error(err) from None
            except (ValueError, UnicodeDecodeError) as err:
                raise ModelError(
                    self._msg(f"the server sent a malformed stream event ({_describe(err)})"),
                    transient=True,
                    kind="server",
                ) from None
            acc.add(chunk, on_text)
        if acc.finish_reason is None:
            raise NetworkError(
                self._msg("the stream ended before the model finished (no finish_reason)")
            )
        return acc.response()

    def _convert_error(self, err: Exception) -> ModelError:
        import openai

        if isinstance(err, openai.APITimeoutError):
            return NetworkError(self._msg(f"the request timed out after {self.timeout:g} s"))
        if isinstance(err, openai.APIConnectionError):
            return NetworkError(self._msg(f"the connection failed ({_describe(err)})"))
        if isinstance(err, openai.APIStatusError):
            return self._convert_status(err)
        if isinstance(err, openai.APIError):
            return self._convert_stream_error(err)
        return ModelError(self._msg(f"the SDK failed: {_describe(err)}"))

    def _convert_status(self, err: openai.APIStatusError) -> ModelError:
        status = err.status_code
        detail = _server_message(err)
        code = (err.code or "").lower()
        suffix = f": {detail}" if detail else ""
        if status in (401, 403):
            hint = (
                "check OPENAI_API_KEY (or RKAT_OPENAI_API_KEY)"
                if self.is_openai
                else "check the key the server expects (OPENAI_API_KEY or RKAT_OPENAI_API_KEY)"
            )
            what = "authentication failed" if status == 401 else "permission denied"
            return AuthenticationError(
                self._msg(f"{what} ({status}){suffix}; {hint}"), status=status
            )
        if status == 429:
            retry_after = parse_retry_after(err.response.headers)
            if code == "insufficient_quota" or (err.type or "") == "insufficient_quota":
                quota = RateLimitError(
                    self._msg(f"quota exceeded (429){suffix}; check the plan and billing"),
                    retry_after=retry_after,
                )
                quota.transient = False  # waiting does not refill a quota
                return quota
            return RateLimitError(self._msg(f"rate limited (429){suffix}"), retry_after=retry_after)
        if status == 413 or (
            status == 400 and (code == "context_length_exceeded" or _CONTEXT_PATTERN.search(detail))
        ):
            return ContextTooLongError(
                self._msg(f"the conversation is too long for the model ({status}){suffix}"),
                status=status,
            )
        if status == 404:
            return BadRequestError(
                self._msg(f"not found (404){suffix}; check the model name and base URL"),
                status=status,
            )
        if status in (408, 409):
            return ModelError(
                self._msg(f"the request failed ({status}){suffix}"),
                transient=True,
                status=status,
                kind="server",
            )
        if 400 <= status < 500:
            return BadRequestError(
                self._msg(f"the request was refused ({status}){suffix}"), status=status
            )
        if status >= 500:
            return OverloadedError(
                self._msg(f"the server failed ({status}){suffix}; retrying may help"),
                status=status,
                retry_after=parse_retry_after(err.response.headers),
            )
        return ModelError(self._msg(f"unexpected HTTP status {status}{suffix}"), status=status)

    def _convert_stream_error(self, err: openai.APIError) -> ModelError:
        """An error event inside a 200 stream."""
        detail = self._redact(err.message)
        kind = f"{err.code or ''} {err.type or ''}".lower()
        if "context_length" in kind or _CONTEXT_PATTERN.search(detail):
            return ContextTooLongError(self._msg(f"the conversation is too long: {detail}"))
        if "rate_limit" in kind:
            return RateLimitError(self._msg(f"rate limited mid-stream: {detail}"))
        if "invalid_request" in kind:
            return BadRequestError(self._msg(f"the request was refused mid-stream: {detail}"))
        return ModelError(
            self._msg(f"the server reported an error mid-stream: {detail}"),
            transient=True,
            kind="server",
        )


def _server_message(err: openai.APIStatusError) -> str:
    body = err.body
    if isinstance(body, Mapping):
        message = body.get("message")
        if isinstance(message, str) and message:
            return message.strip()
    elif isinstance(body, str) and body.strip():
        return body.strip()[:500]
    return ""


def _describe(err: BaseException) -> str:
    """``Type: message`` of the innermost cause an SDK connection error wraps."""
    seen = 0
    while err.__cause__ is not None and seen < 5 and type(err).__module__.startswith("openai"):
        err, seen = err.__cause__, seen + 1
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


async def _close_stream(stream: openai.AsyncStream[ChatCompletionChunk]) -> None:
    """Close the HTTP response and the SDK's stream generator; cleanup errors are dropped so
    they never hide the outcome (a cancellation still propagates)."""
    with contextlib.suppress(Exception):
        await stream.close()
    iterator = getattr(stream, "_iterator", None)
    if inspect.isasyncgen(iterator):
        with contextlib.suppress(Exception):
            await iterator.aclose()
