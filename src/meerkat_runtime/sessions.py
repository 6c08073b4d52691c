"""The session service's value types: what a session is configured with, how it reads back,
and a page of its history.

Invariants:
- A session's agent settings live in its ``SessionRecord.config`` JSON (``AGENT_KEYS``); they
  are validated once, when the session is created, by building the ``AgentConfig`` they
  describe, so a stored session always rebuilds.
- Everything derived from the conversation (message count, last assistant text, usage totals,
  last activity) is computed from the committed conversation rows, so it is exactly as
  durable as the conversation: nothing is counted for a run whose commits were lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ._time import format_ts
from .core.agent import AgentConfig
from .core.lifecycle import Message, Usage
from .store.base import SessionRecord

__all__ = [
    "AGENT_KEYS",
    "HistoryPage",
    "SessionView",
    "agent_config_from",
    "summarize",
]

AGENT_KEYS = (
    "model",
    "provider",
    "system_prompt",
    "offline_script",
    "max_turns",
    "max_tokens",
    "max_total_tokens",
    "max_tool_calls",
    "max_duration",
    "output_schema",
    "structured_output_retries",
    "provider_params",
    "base_url",
)
"""Keys of ``SessionRecord.config`` that configure the built-in agent."""


def agent_config_from(config: dict[str, Any]) -> AgentConfig:
    """The agent settings a session's stored config describes (``ValueError`` when invalid)."""
    kwargs = {k: config[k] for k in AGENT_KEYS if config.get(k) is not None}
    return AgentConfig(**kwargs)


@dataclass(slots=True)
class _Summary:
    message_count: int = 0
    last_assistant_text: str | None = None
    usage: Usage = field(default_factory=Usage)


def summarize(messages: list[Message]) -> _Summary:
    out = _Summary(message_count=len(messages))
    for m in messages:
        if m.role == "assistant":
            if m.usage is not None:
                out.usage = out.usage + m.usage
            if m.content:
                out.last_assistant_text = m.content
    return out


@dataclass(slots=True)
class SessionView:
    """What ``Runtime.read_session`` returns (the reference's SessionInfo + SessionUsage)."""

    session_id: str
    created_at: datetime
    updated_at: datetime
    message_count: int
    is_active: bool
    labels: dict[str, str]
    model: str
    provider: str | None
    system_prompt: str | None
    usage: Usage
    last_assistant_text: str | None = None
    archived: bool = False
    state: str | None = None

    @property
    def total_tokens(self) -> int:
        return self.usage.total_tokens

    @classmethod
    def build(
        cls,
        record: SessionRecord,
        messages: list[Message],
        *,
        is_active: bool,
        state: str | None,
        updated_at: datetime | None = None,
    ) -> SessionView:
        s = summarize(messages)
        cfg = record.config
        return cls(
            session_id=record.session_id,
            created_at=record.created_at,
            updated_at=max(record.updated_at, updated_at) if updated_at else record.updated_at,
            message_count=s.message_count,
            is_active=is_active,
            labels=dict(record.labels),
            model=str(cfg.get("model", "offline")),
            provider=cfg.get("provider"),
            system_prompt=cfg.get("system_prompt"),
            usage=s.usage,
            last_assistant_text=s.last_assistant_text,
            archived=record.archived,
            state=state,
        )

    def to_json_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "session_id": self.session_id,
            "created_at": format_ts(self.created_at),
            "updated_at": format_ts(self.updated_at),
            "message_count": self.message_count,
            "is_active": self.is_active,
            "labels": dict(self.labels),
            "model": self.model,
            "total_tokens": self.total_tokens,
            "usage": self.usage.to_json_dict(),
            "archived": self.archived,
        }
        if self.provider is not None:
            out["provider"] = self.provider
        if self.last_assistant_text is not None:
            out["last_assistant_text"] = self.last_assistant_text
        if self.state is not None:
            out["state"] = self.state
        return out


@dataclass(slots=True)
class HistoryPage:
    """One page of a session's conversation: ``messages[offset : offset + limit]``;
    ``offset`` is clamped to the message count, ``has_more`` says whether later messages
    exist."""

    session_id: str
    message_count: int
    offset: int
    limit: int | None
    has_more: bool
    messages: list[Message]

    @classmethod
    def slice(
        cls, session_id: str, messages: list[Message], offset: int, limit: int | None
    ) -> HistoryPage:
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        total = len(messages)
        start = min(offset, total)
        end = total if limit is None else min(total, start + limit)
        return cls(session_id, total, start, limit, end < total, messages[start:end])

    def to_json_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "session_id": self.session_id,
            "message_count": self.message_count,
            "offset": self.offset,
            "has_more": self.has_more,
            "messages": [m.to_json_dict() for m in self.messages],
        }
        if self.limit is not None:
            out["limit"] = self.limit
        return out
