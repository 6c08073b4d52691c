"""The input lifecycle: states, the legal transitions, history, terminal outcomes
(reference-inputs.md §6-§7, extended by spec §2).

Invariants:
- Exactly the 17 transitions of reference-inputs.md §7.1 are legal; a terminal state never
  changes (``TerminalStateError`` is checked before legality, so it wins).
- Every successful transition appends exactly one history entry and moves ``updated_at``;
  a failed transition changes nothing.
- ``applied`` and ``applied_pending_consumption`` never return to ``queued`` (S5): the table
  has no such edge, so no code path can do it.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field

from .._ids import IdempotencyKey, InputId, RunId
from .._model import WireModel
from .._time import Timestamp, utcnow
from .inputs import Input, InputDurability
from .policy import PolicySnapshot

__all__ = [
    "AbandonedOutcome",
    "CoalescedOutcome",
    "CoalescingSource",
    "ConsumedOutcome",
    "InputAbandonReason",
    "InputLifecycleState",
    "InputState",
    "InputStateHistoryEntry",
    "InputTerminalOutcome",
    "InvalidTransitionError",
    "ProjectionSource",
    "ReconstructionSource",
    "SupersededOutcome",
    "TerminalStateError",
    "is_valid_transition",
]


class InputLifecycleState(enum.StrEnum):
    ACCEPTED = "accepted"
    QUEUED = "queued"
    STAGED = "staged"
    APPLIED = "applied"
    APPLIED_PENDING_CONSUMPTION = "applied_pending_consumption"
    CONSUMED = "consumed"
    SUPERSEDED = "superseded"
    COALESCED = "coalesced"
    ABANDONED = "abandoned"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


S = InputLifecycleState
_TERMINAL = frozenset({S.CONSUMED, S.SUPERSEDED, S.COALESCED, S.ABANDONED})

_LEGAL: frozenset[tuple[InputLifecycleState, InputLifecycleState]] = frozenset(
    {
        (S.ACCEPTED, S.QUEUED),
        (S.ACCEPTED, S.CONSUMED),
        (S.ACCEPTED, S.SUPERSEDED),
        (S.ACCEPTED, S.COALESCED),
        (S.ACCEPTED, S.ABANDONED),
        (S.QUEUED, S.STAGED),
        (S.QUEUED, S.SUPERSEDED),
        (S.QUEUED, S.COALESCED),
        (S.QUEUED, S.ABANDONED),
        (S.STAGED, S.QUEUED),
        (S.STAGED, S.APPLIED),
        (S.STAGED, S.SUPERSEDED),
        (S.STAGED, S.ABANDONED),
        (S.APPLIED, S.APPLIED_PENDING_CONSUMPTION),
        (S.APPLIED, S.ABANDONED),
        (S.APPLIED_PENDING_CONSUMPTION, S.CONSUMED),
        (S.APPLIED_PENDING_CONSUMPTION, S.ABANDONED),
    }
)


def is_valid_transition(src: InputLifecycleState, dst: InputLifecycleState) -> bool:
    return (src, dst) in _LEGAL


class InputAbandonReason(enum.StrEnum):
    RETIRED = "retired"
    RESET = "reset"
    DESTROYED = "destroyed"
    CANCELLED = "cancelled"
    # extensions (spec §2)
    RECOVERY_FAILED = "recovery_failed"
    RETRY_BUDGET_EXCEEDED = "retry_budget_exceeded"
    FAILED = "failed"


class ConsumedOutcome(WireModel):
    _tag = "outcome_type"
    outcome_type: Literal["consumed"] = "consumed"


class SupersededOutcome(WireModel):
    _tag = "outcome_type"
    outcome_type: Literal["superseded"] = "superseded"
    superseded_by: InputId


class CoalescedOutcome(WireModel):
    _tag = "outcome_type"
    outcome_type: Literal["coalesced"] = "coalesced"
    aggregate_id: InputId


class AbandonedOutcome(WireModel):
    _tag = "outcome_type"
    outcome_type: Literal["abandoned"] = "abandoned"
    reason: InputAbandonReason
    error: str | None = None  # extension: the failure text for reason ``failed``


InputTerminalOutcome = Annotated[
    ConsumedOutcome | SupersededOutcome | CoalescedOutcome | AbandonedOutcome,
    Field(discriminator="outcome_type"),
]


class InputStateHistoryEntry(WireModel):
    timestamp: Timestamp
    from_: InputLifecycleState = Field(alias="from")
    to: InputLifecycleState
    reason: str | None = None


class ProjectionSource(WireModel):
    _tag = "source_type"
    source_type: Literal["projection"] = "projection"
    rule_id: str
    source_event_id: str


class CoalescingSource(WireModel):
    _tag = "source_type"
    source_type: Literal["coalescing"] = "coalescing"
    source_input_ids: list[InputId]


ReconstructionSource = Annotated[
    ProjectionSource | CoalescingSource, Field(discriminator="source_type")
]


class InvalidTransitionError(ValueError):
    def __init__(self, src: InputLifecycleState, dst: InputLifecycleState) -> None:
        super().__init__(f"Invalid transition: {src.value} -> {dst.value}")
        self.src = src
        self.dst = dst


class TerminalStateError(ValueError):
    def __init__(self, input_id: InputId, state: InputLifecycleState) -> None:
        super().__init__(f"Input {input_id} is in terminal state {state.value}")
        self.input_id = input_id
        self.state = state


class InputState(WireModel):
    _omit_empty = frozenset({"history"})

    input_id: InputId
    current_state: InputLifecycleState
    policy: PolicySnapshot | None = None
    terminal_outcome: InputTerminalOutcome | None = None
    durability: InputDurability | None = None
    idempotency_key: IdempotencyKey | None = None
    attempt_count: int = 0
    recovery_count: int = 0
    history: list[InputStateHistoryEntry] = Field(default_factory=list)
    reconstruction_source: ReconstructionSource | None = None
    persisted_input: Input | None = None
    last_run_id: RunId | None = None
    last_boundary_sequence: int | None = None
    created_at: Timestamp
    updated_at: Timestamp

    @classmethod
    def new_accepted(cls, input_id: InputId, now: datetime | None = None) -> InputState:
        ts = now or utcnow()
        return cls(
            input_id=input_id,
            current_state=InputLifecycleState.ACCEPTED,
            created_at=ts,
            updated_at=ts,
        )

    @property
    def is_terminal(self) -> bool:
        return self.current_state in _TERMINAL

    def clone(self) -> InputState:
        """An independent copy (history entries are immutable in practice, so the list is
        copied and its entries shared)."""
        c = self.model_copy()
        c.history = list(self.history)
        return c

    def transition(
        self, to: InputLifecycleState, reason: str | None = None, now: datetime | None = None
    ) -> None:
        """Move to ``to`` or raise, changing nothing on error (reference-inputs.md §7.2)."""
        src = self.current_state
        to = InputLifecycleState(to)
        if src in _TERMINAL:
            raise TerminalStateError(self.input_id, src)
        if (src, to) not in _LEGAL:
            raise InvalidTransitionError(src, to)
        ts = now or utcnow()
        self.history.append(
            InputStateHistoryEntry.model_construct(timestamp=ts, from_=src, to=to, reason=reason)
        )
        self.current_state = to
        self.updated_at = ts
        if self.terminal_outcome is None:
            if to is InputLifecycleState.CONSUMED:
                self.terminal_outcome = ConsumedOutcome()
            elif to is InputLifecycleState.ABANDONED:
                self.terminal_outcome = AbandonedOutcome(reason=InputAbandonReason.CANCELLED)

    def abandon(
        self, reason: InputAbandonReason, error: str | None = None, now: datetime | None = None
    ) -> None:
        text = f"abandoned: {reason.value}" + (f": {error}" if error else "")
        self.transition(InputLifecycleState.ABANDONED, text, now)
        self.terminal_outcome = AbandonedOutcome(reason=reason, error=error)

    def supersede(self, by: InputId, now: datetime | None = None) -> None:
        self.transition(InputLifecycleState.SUPERSEDED, f"superseded by {by}", now)
        self.terminal_outcome = SupersededOutcome(superseded_by=by)

    def coalesce(self, into: InputId, now: datetime | None = None) -> None:
        self.transition(InputLifecycleState.COALESCED, f"coalesced into {into}", now)
        self.terminal_outcome = CoalescedOutcome(aggregate_id=into)
