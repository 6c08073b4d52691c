"""What callers get back: accept outcomes (with rejection codes, S14) and waiter outcomes (S12).

Accept outcome JSON is the reference's (tag ``outcome_type``: accepted / deduplicated /
rejected) with ``code`` added to ``rejected``. Waiter outcome JSON (ours, S12) is tagged
``outcome_type`` too: completed, completed_without_result, cancelled, superseded, abandoned,
terminated; a coalesced input answers with its aggregate's outcome plus ``via_aggregate_id``.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter

from .._ids import InputId
from .._model import WireModel
from ..core.lifecycle import RunResult
from .input_state import InputAbandonReason, InputState
from .policy import PolicyDecision

__all__ = [
    "AbandonedWait",
    "AcceptOutcome",
    "Accepted",
    "CancelledWait",
    "CompletedWait",
    "CompletedWithoutResultWait",
    "Deduplicated",
    "RejectCode",
    "Rejected",
    "SupersededWait",
    "TerminatedWait",
    "WaitOutcome",
    "accept_outcome_adapter",
    "wait_outcome_adapter",
]


class RejectCode(enum.StrEnum):
    INVALID = "invalid"
    INVALID_DURABILITY = "invalid_durability"
    TOO_LARGE = "too_large"
    QUEUE_FULL = "queue_full"
    NOT_READY = "not_ready"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"


class Accepted(WireModel):
    _tag = "outcome_type"
    outcome_type: Literal["accepted"] = "accepted"
    input_id: InputId
    policy: PolicyDecision
    state: InputState


class Deduplicated(WireModel):
    _tag = "outcome_type"
    outcome_type: Literal["deduplicated"] = "deduplicated"
    input_id: InputId
    existing_id: InputId


class Rejected(WireModel):
    _tag = "outcome_type"
    outcome_type: Literal["rejected"] = "rejected"
    reason: str
    code: RejectCode


AcceptOutcome = Annotated[Accepted | Deduplicated | Rejected, Field(discriminator="outcome_type")]
accept_outcome_adapter: TypeAdapter[AcceptOutcome] = TypeAdapter(AcceptOutcome)


class _WaitBase(WireModel):
    _tag = "outcome_type"
    input_id: InputId
    via_aggregate_id: InputId | None = None


class CompletedWait(_WaitBase):
    outcome_type: Literal["completed"] = "completed"
    result: RunResult


class CompletedWithoutResultWait(_WaitBase):
    outcome_type: Literal["completed_without_result"] = "completed_without_result"


class CancelledWait(_WaitBase):
    outcome_type: Literal["cancelled"] = "cancelled"


class SupersededWait(_WaitBase):
    outcome_type: Literal["superseded"] = "superseded"
    superseded_by: InputId


class AbandonedWait(_WaitBase):
    outcome_type: Literal["abandoned"] = "abandoned"
    reason: InputAbandonReason
    error: str | None = None


class TerminatedWait(_WaitBase):
    """The only resolution of a non-terminal input: this instance stopped; wait again."""

    outcome_type: Literal["terminated"] = "terminated"
    reason: str


WaitOutcome = Annotated[
    CompletedWait
    | CompletedWithoutResultWait
    | CancelledWait
    | SupersededWait
    | AbandonedWait
    | TerminatedWait,
    Field(discriminator="outcome_type"),
]
wait_outcome_adapter: TypeAdapter[WaitOutcome] = TypeAdapter(WaitOutcome)


def outcome_of(state: InputState, run: Any) -> WaitOutcome | InputId | None:
    """S12 as a pure function: the waiter outcome of ``state`` given the record of its last run
    (``RunRecord`` or None). Returns the aggregate's id for a coalesced input (its outcome is
    the aggregate's), and None while the input (or the run that consumed it) is unfinished.
    The same function answers in process and from the store, so both agree."""
    if not state.is_terminal:
        return None
    iid = state.input_id
    out = state.terminal_outcome
    status = getattr(run, "status", None)
    if out is None or out.outcome_type == "consumed":
        if status == "running":
            return None  # consumed at its boundary; answered when its run ends
        if status == "cancelled":
            return CancelledWait(input_id=iid)
        result = getattr(run, "result", None)
        if result is not None:
            return CompletedWait(input_id=iid, result=result)
        return CompletedWithoutResultWait(input_id=iid)
    if out.outcome_type == "superseded":
        return SupersededWait(input_id=iid, superseded_by=out.superseded_by)
    if out.outcome_type == "coalesced":
        return out.aggregate_id
    if out.reason is InputAbandonReason.CANCELLED and status in (None, "cancelled"):
        return CancelledWait(input_id=iid)
    return AbandonedWait(input_id=iid, reason=out.reason, error=out.error)


def with_via(outcome: Any, aggregate_id: InputId, input_id: InputId) -> Any:
    """The aggregate's outcome as seen by one of its coalesced sources."""
    return outcome.model_copy(update={"via_aggregate_id": aggregate_id, "input_id": input_id})
