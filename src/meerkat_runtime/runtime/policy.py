"""Policy: what the runtime does with an input (S1, S17; reference-inputs.md §5).

A ``PolicyTable`` is data: rows keyed by kind id and, for external events, optionally by
``event_type``; each row holds the decision while idle and while running. Resolution is a pure
function of (kind, event_type, runtime_idle); the header is never consulted.

The default table is 0.4.10's with the spec's three corrections: ``peer_response_terminal``,
``peer_message`` and ``peer_request`` arriving while a run is active use apply mode
``stage_run_boundary`` (message and request keep wake mode ``interrupt_yielding``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from .._model import WireModel

__all__ = [
    "DEFAULT_POLICY_VERSION",
    "ApplyMode",
    "ConsumePoint",
    "PolicyDecision",
    "PolicyRow",
    "PolicySnapshot",
    "PolicyTable",
    "QueueMode",
    "WakeMode",
    "default_policy_table",
]

DEFAULT_POLICY_VERSION = 1


class ApplyMode(enum.StrEnum):
    STAGE_RUN_START = "stage_run_start"
    STAGE_RUN_BOUNDARY = "stage_run_boundary"
    INJECT_NOW = "inject_now"
    IGNORE = "ignore"


class WakeMode(enum.StrEnum):
    WAKE_IF_IDLE = "wake_if_idle"
    INTERRUPT_YIELDING = "interrupt_yielding"
    NONE = "none"


class QueueMode(enum.StrEnum):
    NONE = "none"
    FIFO = "fifo"
    COALESCE = "coalesce"
    SUPERSEDE = "supersede"
    PRIORITY = "priority"


class ConsumePoint(enum.StrEnum):
    ON_ACCEPT = "on_accept"
    ON_APPLY = "on_apply"
    ON_RUN_START = "on_run_start"
    ON_RUN_COMPLETE = "on_run_complete"
    EXPLICIT_ACK = "explicit_ack"


class PolicyDecision(WireModel):
    apply_mode: ApplyMode
    wake_mode: WakeMode
    queue_mode: QueueMode
    consume_point: ConsumePoint
    record_transcript: bool = True
    emit_operator_content: bool = True
    policy_version: int

    model_config = {"frozen": True, "extra": "ignore"}

    # --- how the runtime reads each dimension (S1) ---

    @property
    def consumed_at_accept(self) -> bool:
        """``ignore`` inputs (and queue mode ``none`` with ``ignore``) never reach a run."""
        return self.apply_mode is ApplyMode.IGNORE

    @property
    def joins_boundaries(self) -> bool:
        """May join a run at its run-start boundary or at a checkpoint (S16, S17)."""
        return self.apply_mode in (ApplyMode.STAGE_RUN_BOUNDARY, ApplyMode.INJECT_NOW)

    @property
    def wakes(self) -> bool:
        """Starts a run when the runtime is idle (read on the as-if-idle decision, S17)."""
        return self.wake_mode is WakeMode.WAKE_IF_IDLE or self.apply_mode is ApplyMode.INJECT_NOW

    @property
    def effective_consume_point(self) -> ConsumePoint:
        """``on_accept`` is honoured with ``ignore`` only; otherwise it reads as ``on_apply``."""
        if self.consume_point is ConsumePoint.ON_ACCEPT and self.apply_mode is not ApplyMode.IGNORE:
            return ConsumePoint.ON_APPLY
        return self.consume_point

    @property
    def is_priority(self) -> bool:
        """Priority inputs (and queue mode ``none``, which is not ordered behind others) go
        ahead of all fifo inputs, FIFO among themselves."""
        return self.queue_mode in (QueueMode.PRIORITY, QueueMode.NONE)


class PolicySnapshot(WireModel):
    version: int
    decision: PolicyDecision


@dataclass(frozen=True, slots=True)
class PolicyRow:
    idle: PolicyDecision
    running: PolicyDecision


def _d(
    apply: str, wake: str, queue: str, consume: str, transcript: bool = True, version: int = 1
) -> PolicyDecision:
    return PolicyDecision(
        apply_mode=ApplyMode(apply),
        wake_mode=WakeMode(wake),
        queue_mode=QueueMode(queue),
        consume_point=ConsumePoint(consume),
        record_transcript=transcript,
        emit_operator_content=transcript,
        policy_version=version,
    )


class PolicyTable:
    """Rows keyed by ``kind`` or ``(kind, event_type)``; a fallback for unknown kinds.

    Lookup order: ``(kind, event_type)`` (external events only), then ``kind``, then the
    fallback row.
    """

    __slots__ = ("_fallback", "_rows", "version")

    def __init__(
        self,
        rows: Mapping[str | tuple[str, str], PolicyRow],
        *,
        fallback: PolicyRow | None = None,
        version: int = DEFAULT_POLICY_VERSION,
    ) -> None:
        self._rows: dict[str | tuple[str, str], PolicyRow] = dict(rows)
        default_fallback = PolicyRow(
            _d("stage_run_start", "none", "fifo", "on_run_complete", version=version),
            _d("stage_run_start", "none", "fifo", "on_run_complete", version=version),
        )
        self._fallback = fallback or default_fallback
        self.version = version

    def resolve(
        self, kind: str, runtime_idle: bool, event_type: str | None = None
    ) -> PolicyDecision:
        row = None
        if event_type is not None:
            row = self._rows.get((kind, event_type))
        if row is None:
            row = self._rows.get(kind, self._fallback)
        return row.idle if runtime_idle else row.running

    def with_rows(self, rows: Mapping[str | tuple[str, str], PolicyRow]) -> PolicyTable:
        """A copy of this table with ``rows`` added or replaced (an application's overrides)."""
        merged = dict(self._rows)
        merged.update(rows)
        return PolicyTable(merged, fallback=self._fallback, version=self.version)

    def rows(self) -> dict[str | tuple[str, str], PolicyRow]:
        return dict(self._rows)

    @staticmethod
    def decision(
        apply: str,
        wake: str,
        queue: str,
        consume: str,
        *,
        record_transcript: bool = True,
        version: int = DEFAULT_POLICY_VERSION,
    ) -> PolicyDecision:
        """Build one decision from its four dimension names (for application tables)."""
        return _d(apply, wake, queue, consume, record_transcript, version)


def default_policy_table() -> PolicyTable:
    """The spec's default table (0.4.10 §5.3 with the three corrections of S1)."""
    src = "stage_run_start"
    bnd = "stage_run_boundary"
    orc = "on_run_complete"
    rows: dict[str | tuple[str, str], PolicyRow] = {
        "prompt": PolicyRow(_d(src, "wake_if_idle", "fifo", orc), _d(src, "none", "fifo", orc)),
        "peer_message": PolicyRow(
            _d(src, "wake_if_idle", "fifo", orc), _d(bnd, "interrupt_yielding", "fifo", orc)
        ),
        "peer_request": PolicyRow(
            _d(src, "wake_if_idle", "fifo", orc), _d(bnd, "interrupt_yielding", "fifo", orc)
        ),
        "peer_response_progress": PolicyRow(
            _d(bnd, "none", "coalesce", orc), _d(bnd, "none", "coalesce", orc)
        ),
        "peer_response_terminal": PolicyRow(
            _d(src, "wake_if_idle", "fifo", orc), _d(bnd, "none", "fifo", orc)
        ),
        "flow_step": PolicyRow(_d(src, "wake_if_idle", "fifo", orc), _d(src, "none", "fifo", orc)),
        "external_event": PolicyRow(
            _d(src, "wake_if_idle", "fifo", orc), _d(src, "none", "fifo", orc)
        ),
        "system_generated": PolicyRow(
            _d("inject_now", "none", "none", "on_accept"),
            _d("inject_now", "none", "none", "on_accept"),
        ),
        "projected": PolicyRow(
            _d("ignore", "none", "none", "on_accept", False),
            _d("ignore", "none", "coalesce", "on_accept", False),
        ),
    }
    return PolicyTable(rows)
