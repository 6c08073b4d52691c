"""The provider protocol: one request in, one streamed and then complete response out.

Invariants every provider keeps:
- ``complete`` is a coroutine that never blocks the event loop and can be cancelled at any
  await (including in the middle of a stream); a cancelled call has no effect the next call
  can observe, and closes its HTTP stream.
- Text is streamed: every piece of answer text is passed to ``on_text`` as it arrives, in
  order, before ``complete`` returns; the returned ``text`` is the concatenation of the
  pieces (a retried call may stream its pieces again, see ``llm/retry.py``).
- One successful call yields exactly one assistant turn: a final text (``stop_reason`` in
  ``end_turn`` / ``max_tokens``) or one or more tool calls (``stop_reason == "tool_use"``).
- Provider problems surface as ``ModelError`` or one of its subclasses (never a bare library
  exception), with ``kind`` naming the problem and ``transient`` true when retrying the same
  request may succeed. ``retry_after`` carries the server's hint (seconds) when it gave one.
- API keys are read from the environment by the provider and never logged, stored, or put
  into an error message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ..core.lifecycle import Message, ToolCall, Usage

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "ContextTooLongError",
    "ErrorKind",
    "Model",
    "ModelError",
    "ModelRequest",
    "ModelResponse",
    "NetworkError",
    "OverloadedError",
    "RateLimitError",
    "StopReason",
    "TextSink",
    "ToolSpec",
]

StopReason = Literal["end_turn", "tool_use", "max_tokens"]

ErrorKind = Literal[
    "authentication",
    "rate_limit",
    "overloaded",
    "context_too_long",
    "bad_request",
    "network",
    "server",
    "scripted",
    "unknown",
]

TextSink = Callable[[str], None]
"""Receives answer text pieces as the provider streams them."""


@dataclass(frozen=True)
class ToolSpec:
    """A tool offered to the model; ``parameters`` is a JSON Schema object for its arguments."""

    name: str
    description: str
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object"})


@dataclass(frozen=True)
class ModelRequest:
    """Everything a provider needs for one call.

    ``messages`` is the whole conversation as it stands (committed and pending), oldest first;
    providers must not mutate it. ``session_id`` lets stateful test providers keep per-session
    state; real providers ignore it. ``output_schema`` (a JSON Schema object) asks for a JSON
    final answer; providers that support a native structured-output mode may use it, and the
    agent validates the answer either way. ``provider_params`` are passed through to the
    provider's API as extra request fields (e.g. ``temperature``).
    """

    messages: list[Message]
    system_prompt: str | None = None
    tools: list[ToolSpec] = field(default_factory=list)
    max_tokens: int | None = None
    model: str = "offline"
    session_id: str | None = None
    output_schema: dict[str, Any] | None = None
    provider_params: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelResponse:
    """One assistant turn. ``text`` is set for a final answer; ``tool_calls`` is non-empty
    for ``tool_use`` (``text`` may then hold what the model said before calling)."""

    text: str | None
    tool_calls: list[ToolCall]
    usage: Usage
    stop_reason: StopReason


class ModelError(Exception):
    """A failed model call.

    ``transient`` is true when the same request may succeed later (rate limit, overload,
    network, 5xx); false for errors a retry cannot fix (bad request, authentication, context
    too long). ``kind`` names the problem for events and surfaces; ``status`` is the HTTP
    status when there was one; ``retry_after`` is the server's wait hint in seconds.
    """

    kind: ErrorKind = "unknown"
    transient: bool
    status: int | None
    retry_after: float | None

    def __init__(
        self,
        message: str,
        *,
        transient: bool = False,
        status: int | None = None,
        retry_after: float | None = None,
        kind: ErrorKind | None = None,
    ) -> None:
        super().__init__(message)
        self.transient = transient
        self.status = status
        self.retry_after = retry_after
        if kind is not None:
            self.kind = kind


class AuthenticationError(ModelError):
    """The key is missing, wrong or not allowed to use the model (401/403). Permanent."""

    kind: ErrorKind = "authentication"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message, transient=False, status=status)


class RateLimitError(ModelError):
    """Too many requests (429); ``retry_after`` says how long the server asked to wait."""

    kind: ErrorKind = "rate_limit"

    def __init__(
        self, message: str, *, status: int | None = 429, retry_after: float | None = None
    ) -> None:
        super().__init__(message, transient=True, status=status, retry_after=retry_after)


class OverloadedError(ModelError):
    """The provider is overloaded or failing on its side (Anthropic 529, 5xx). Transient."""

    kind: ErrorKind = "overloaded"

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, transient=True, status=status, retry_after=retry_after)


class ContextTooLongError(ModelError):
    """The conversation does not fit the model's context window. Permanent for this request."""

    kind: ErrorKind = "context_too_long"

    def __init__(self, message: str, *, status: int | None = 400) -> None:
        super().__init__(message, transient=False, status=status)


class BadRequestError(ModelError):
    """The provider refused the request as malformed (400/404/422: unknown model, bad
    parameter). Permanent."""

    kind: ErrorKind = "bad_request"

    def __init__(self, message: str, *, status: int | None = 400) -> None:
        super().__init__(message, transient=False, status=status)


class NetworkError(ModelError):
    """The connection failed, timed out, or the stream was cut before it ended. Transient."""

    kind: ErrorKind = "network"

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True)


class Model(Protocol):
    """A model provider. ``name`` is the model name requests select it by."""

    name: str

    async def complete(
        self, request: ModelRequest, *, on_text: TextSink | None = None
    ) -> ModelResponse: ...
