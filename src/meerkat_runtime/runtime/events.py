"""Runtime events (reference-runtime.md §7, extended by spec §2 and S15).

Envelope: ``{id, seq, timestamp, runtime_id, event: {category, data: {code, ...}}}``. ``seq`` is
per runtime, strictly increasing, assigned in the transaction of the change it reports.

Categories: ``input_lifecycle``, ``run_lifecycle``, ``runtime_state_change``, ``topology``,
``recovery`` (ours), ``stream`` (ours: ``events_gap`` tells a subscriber that events it
asked for were pruned) and ``agent`` (ours: ``data`` is an agent event of the turn loop in the
``meerkat-sdk`` shape, ``{"type": "text_delta", "delta": ...}``; see ``core/events.py``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .._ids import RuntimeEventId
from .._model import WireModel
from .._time import Timestamp

__all__ = ["RuntimeEventEnvelope", "event_code"]


class RuntimeEventEnvelope(WireModel):
    id: RuntimeEventId
    seq: int
    timestamp: Timestamp
    runtime_id: str
    event: dict[str, Any]
    causation_id: str | None = None
    correlation_id: str | None = None

    @classmethod
    def make(
        cls, seq: int, now: datetime, runtime_id: str, category: str, data: dict[str, Any] | None
    ) -> RuntimeEventEnvelope:
        event: dict[str, Any] = {"category": category}
        if data is not None:
            event["data"] = data
        return cls.model_construct(
            id=RuntimeEventId.new(),
            seq=seq,
            timestamp=now,
            runtime_id=runtime_id,
            event=event,
            causation_id=None,
            correlation_id=None,
        )

    @property
    def code(self) -> str:
        return event_code(self.event)


_CATEGORY_PREFIX = {
    "input_lifecycle": "input",
    "run_lifecycle": "run",
    "topology": "topology",
    "recovery": "recovery",
    "stream": "stream",
}


def event_code(event: dict[str, Any]) -> str:
    """The stable dotted code of an event, e.g. ``input.accepted``, ``run.boundary_applied``."""
    category = event.get("category", "")
    if category == "runtime_state_change":
        return "runtime.state_changed"
    data = event.get("data") or {}
    if category == "agent":
        return f"agent.{data.get('type', '')}"
    prefix = _CATEGORY_PREFIX.get(category, category)
    return f"{prefix}.{data.get('code', '')}"
