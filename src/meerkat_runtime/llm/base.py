"""The provider protocol: one request in, one complete response out.

Invariants every provider keeps:
- ``complete`` is a coroutine that never blocks the event loop and can be cancelled at any
  await; a cancelled call has no effect the next call can observe.
- One successful call yields exactly one assistant turn: a final text (``stop_reason ==
  "end_turn"``) or one or more tool calls (``stop_reason == "tool_use"``), never neither.
- Provider problems surface as ``ModelError`` (never a bare library exception), marked
  ``transient`` when retrying the same request may succeed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ..core.lifecycle import Message, ToolCall, Usage

__all__ = [
    "Model",
    "ModelError",
    "ModelRequest",
    "ModelResponse",
    "StopReason",
    "ToolSpec",
]

StopReason = Literal["end_turn", "tool_use"]


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
    state; real providers ignore it.
    """

    messages: list[Message]
    system_prompt: str | None = None
    tools: list[ToolSpec] = field(default_factory=list)
    max_tokens: int | None = None
    model: str = "offline"
    session_id: str | None = None


@dataclass
class ModelResponse:
    """One assistant turn. ``text`` is set for ``end_turn``; ``tool_calls`` is non-empty for
    ``tool_use``."""

    text: str | None
    tool_calls: list[ToolCall]
    usage: Usage
    stop_reason: StopReason


class ModelError(Exception):
    """A failed model call. ``transient`` is true when the same request may succeed later
    (rate limit, timeout, overload); false for errors a retry cannot fix (bad request,
    authentication, unknown model)."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class Model(Protocol):
    """A model provider. ``name`` is the model name requests select it by."""

    name: str

    async def complete(self, request: ModelRequest) -> ModelResponse: ...
