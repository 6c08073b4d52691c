"""Inputs: the six variants, their header, origins, peer conventions and kind ids
(reference-inputs.md §2), durability validation (§3, S13) and content hashes (S11).

The JSON of every model is exactly the reference's: internally tagged unions with the tag
first, optional fields omitted when unset, unknown fields ignored, unknown tags refused.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError

from .._ids import CorrelationId, IdempotencyKey, InputId, LogicalRuntimeId, SupersessionKey
from .._json import canonical_bytes, compact, sha256_hex
from .._model import WireModel
from .._time import Timestamp, utcnow
from ..core.lifecycle import RuntimeTurnMetadata

__all__ = [
    "KIND_IDS",
    "DurabilityError",
    "ExternalEventInput",
    "ExternalOrigin",
    "FlowOrigin",
    "FlowStepInput",
    "Input",
    "InputDurability",
    "InputHeader",
    "InputOrigin",
    "InputVisibility",
    "MessageConvention",
    "OperatorOrigin",
    "PeerConvention",
    "PeerInput",
    "PeerOrigin",
    "ProjectedInput",
    "PromptInput",
    "RequestConvention",
    "ResponseProgressConvention",
    "ResponseProgressPhase",
    "ResponseTerminalConvention",
    "ResponseTerminalStatus",
    "SystemGeneratedInput",
    "SystemOrigin",
    "content_hash",
    "input_adapter",
    "kind_id",
    "parse_input",
    "render_input_text",
    "validate_durability",
]


# --- header -------------------------------------------------------------------------------


class OperatorOrigin(WireModel):
    _tag = "type"
    type: Literal["operator"] = "operator"


class PeerOrigin(WireModel):
    _tag = "type"
    type: Literal["peer"] = "peer"
    peer_id: str
    runtime_id: LogicalRuntimeId | None = None


class FlowOrigin(WireModel):
    _tag = "type"
    type: Literal["flow"] = "flow"
    flow_id: str
    step_index: int = Field(ge=0)


class SystemOrigin(WireModel):
    _tag = "type"
    type: Literal["system"] = "system"


class ExternalOrigin(WireModel):
    _tag = "type"
    type: Literal["external"] = "external"
    source_name: str


InputOrigin = Annotated[
    OperatorOrigin | PeerOrigin | FlowOrigin | SystemOrigin | ExternalOrigin,
    Field(discriminator="type"),
]


class InputDurability(enum.StrEnum):
    DURABLE = "durable"
    EPHEMERAL = "ephemeral"
    DERIVED = "derived"


class InputVisibility(WireModel):
    transcript_eligible: bool
    operator_eligible: bool


class InputHeader(WireModel):
    id: InputId
    timestamp: Timestamp
    source: InputOrigin
    durability: InputDurability
    visibility: InputVisibility
    idempotency_key: IdempotencyKey | None = None
    supersession_key: SupersessionKey | None = None
    correlation_id: CorrelationId | None = None

    @classmethod
    def new(
        cls,
        *,
        source: InputOrigin | None = None,
        durability: InputDurability | str = InputDurability.DURABLE,
        idempotency_key: str | None = None,
        supersession_key: str | None = None,
        correlation_id: CorrelationId | None = None,
        visibility: InputVisibility | None = None,
    ) -> InputHeader:
        """A header with a fresh v7 id, now, operator origin and full visibility by default."""
        return cls(
            id=InputId.new(),
            timestamp=utcnow(),
            source=source if source is not None else OperatorOrigin(),
            durability=InputDurability(durability),
            visibility=visibility
            or InputVisibility(transcript_eligible=True, operator_eligible=True),
            idempotency_key=IdempotencyKey(idempotency_key) if idempotency_key else None,
            supersession_key=SupersessionKey(supersession_key) if supersession_key else None,
            correlation_id=correlation_id,
        )


# --- peer conventions ---------------------------------------------------------------------


class ResponseProgressPhase(enum.StrEnum):
    ACCEPTED = "accepted"
    IN_PROGRESS = "in_progress"
    PARTIAL_RESULT = "partial_result"


class ResponseTerminalStatus(enum.StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class MessageConvention(WireModel):
    _tag = "convention_type"
    convention_type: Literal["message"] = "message"


class RequestConvention(WireModel):
    _tag = "convention_type"
    convention_type: Literal["request"] = "request"
    request_id: str
    intent: str


class ResponseProgressConvention(WireModel):
    _tag = "convention_type"
    convention_type: Literal["response_progress"] = "response_progress"
    request_id: str
    phase: ResponseProgressPhase


class ResponseTerminalConvention(WireModel):
    _tag = "convention_type"
    convention_type: Literal["response_terminal"] = "response_terminal"
    request_id: str
    status: ResponseTerminalStatus


PeerConvention = Annotated[
    MessageConvention | RequestConvention | ResponseProgressConvention | ResponseTerminalConvention,
    Field(discriminator="convention_type"),
]


# --- the variants -------------------------------------------------------------------------


class _InputBase(WireModel):
    _tag = "input_type"
    header: InputHeader

    @property
    def id(self) -> InputId:
        return self.header.id

    @property
    def kind_id(self) -> str:
        return kind_id(self)  # type: ignore[arg-type]


class PromptInput(_InputBase):
    input_type: Literal["prompt"] = "prompt"
    text: str
    turn_metadata: RuntimeTurnMetadata | None = None

    @classmethod
    def new(
        cls, text: str, turn_metadata: RuntimeTurnMetadata | None = None, **header: Any
    ) -> PromptInput:
        """A durable operator prompt with a fresh id (reference "new prompt")."""
        return cls(header=InputHeader.new(**header), text=text, turn_metadata=turn_metadata)


class PeerInput(_InputBase):
    input_type: Literal["peer"] = "peer"
    convention: PeerConvention | None = None
    body: str

    @classmethod
    def new(
        cls,
        body: str,
        *,
        peer_id: str,
        convention: PeerConvention | None = None,
        runtime_id: str | None = None,
        **header: Any,
    ) -> PeerInput:
        header.setdefault(
            "source",
            PeerOrigin(
                peer_id=peer_id, runtime_id=LogicalRuntimeId(runtime_id) if runtime_id else None
            ),
        )
        return cls(header=InputHeader.new(**header), convention=convention, body=body)


class FlowStepInput(_InputBase):
    input_type: Literal["flow_step"] = "flow_step"
    step_id: str
    instructions: str
    turn_metadata: RuntimeTurnMetadata | None = None

    @classmethod
    def new(
        cls,
        step_id: str,
        instructions: str,
        *,
        flow_id: str,
        step_index: int,
        turn_metadata: RuntimeTurnMetadata | None = None,
        **header: Any,
    ) -> FlowStepInput:
        header.setdefault("source", FlowOrigin(flow_id=flow_id, step_index=step_index))
        return cls(
            header=InputHeader.new(**header),
            step_id=step_id,
            instructions=instructions,
            turn_metadata=turn_metadata,
        )


class ExternalEventInput(_InputBase):
    _keep_none = frozenset({"payload"})
    input_type: Literal["external_event"] = "external_event"
    event_type: str
    payload: Any = Field(...)

    @classmethod
    def new(
        cls, event_type: str, payload: Any, *, source_name: str = "api", **header: Any
    ) -> ExternalEventInput:
        header.setdefault("source", ExternalOrigin(source_name=source_name))
        return cls(header=InputHeader.new(**header), event_type=event_type, payload=payload)


class SystemGeneratedInput(_InputBase):
    input_type: Literal["system_generated"] = "system_generated"
    generator: str
    content: str

    @classmethod
    def new(cls, generator: str, content: str, **header: Any) -> SystemGeneratedInput:
        header.setdefault("source", SystemOrigin())
        return cls(header=InputHeader.new(**header), generator=generator, content=content)


class ProjectedInput(_InputBase):
    input_type: Literal["projected"] = "projected"
    rule_id: str
    source_event_id: str
    content: str

    @classmethod
    def new(cls, rule_id: str, source_event_id: str, content: str, **header: Any) -> ProjectedInput:
        header.setdefault("source", SystemOrigin())
        header.setdefault("durability", InputDurability.DERIVED)
        return cls(
            header=InputHeader.new(**header),
            rule_id=rule_id,
            source_event_id=source_event_id,
            content=content,
        )


Input = Annotated[
    PromptInput
    | PeerInput
    | FlowStepInput
    | ExternalEventInput
    | SystemGeneratedInput
    | ProjectedInput,
    Field(discriminator="input_type"),
]

input_adapter: TypeAdapter[Input] = TypeAdapter(Input)

KIND_IDS: tuple[str, ...] = (
    "prompt",
    "peer_message",
    "peer_request",
    "peer_response_progress",
    "peer_response_terminal",
    "flow_step",
    "external_event",
    "system_generated",
    "projected",
)

_CONVENTION_KIND = {
    "message": "peer_message",
    "request": "peer_request",
    "response_progress": "peer_response_progress",
    "response_terminal": "peer_response_terminal",
}


def kind_id(input: Input) -> str:
    """The policy-resolution kind (reference-inputs.md §2.6)."""
    if isinstance(input, PeerInput):
        if input.convention is None:
            return "peer_message"
        return _CONVENTION_KIND[input.convention.convention_type]
    return input.input_type


def parse_input(data: Any) -> Input:
    """Read an input document (JSON text or bytes, or an already-decoded value); raises
    ``ValueError`` with a readable message when malformed."""
    try:
        if isinstance(data, (str, bytes, bytearray)):
            return input_adapter.validate_json(data)
        return input_adapter.validate_python(data)
    except ValidationError as exc:
        raise ValueError(_describe_validation_error(exc)) from None


def _describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "function-plain")
        msg = err.get("msg", "invalid")
        if err.get("type") == "union_tag_invalid":
            ctx = err.get("ctx", {})
            msg = (
                f"unknown {ctx.get('discriminator', 'tag')} {ctx.get('tag')!r}; "
                f"expected one of {ctx.get('expected_tags')}"
            )
        elif err.get("type") == "union_tag_not_found":
            ctx = err.get("ctx", {})
            msg = f"missing the tag field {ctx.get('discriminator')}"
        elif err.get("type") == "json_invalid":
            msg = f"malformed JSON ({err.get('ctx', {}).get('error', 'parse error')})"
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = len(exc.errors()) - 3
    if more > 0:
        parts.append(f"and {more} more problem(s)")
    return "invalid input: " + "; ".join(parts)


# --- durability ---------------------------------------------------------------------------


class DurabilityError(ValueError):
    """A derived input that its origin or variant may not submit (reference-inputs.md §3)."""


def validate_durability(input: Input) -> DurabilityError | None:
    """Fixed validation; no policy table overrides it (S13).

    Order matters: the external-ingress check runs first, so it wins even for variants that
    would also fail the per-variant check.
    """
    header = input.header
    if header.durability is not InputDurability.DERIVED:
        return None
    if header.source.type in ("operator", "peer", "external"):
        return DurabilityError("External ingress cannot submit derived inputs")
    if isinstance(input, PromptInput):
        return DurabilityError("Derived durability forbidden for prompt")
    if isinstance(input, FlowStepInput):
        return DurabilityError("Derived durability forbidden for flow_step")
    if isinstance(input, PeerInput):
        # S13: peer messages (with or without a convention), requests and terminal responses
        # may not be derived; only progress responses may. Our texts name the kind once
        # (spec §2: no doubled ``peer_peer_`` prefix).
        ct = input.convention.convention_type if input.convention is not None else "message"
        if ct != "response_progress":
            return DurabilityError(f"Derived durability forbidden for {_CONVENTION_KIND[ct]}")
    return None


# --- content hash -------------------------------------------------------------------------

_HASH_EXCLUDE = {"header": {"id", "timestamp", "correlation_id"}}


def content_hash(input: Input) -> str:
    """SHA-256 of the canonical JSON of the input without header id, timestamp and
    correlation id (S11): the same request retried with a fresh id hashes the same."""
    doc = input.model_dump(mode="json", exclude=_HASH_EXCLUDE)
    return sha256_hex(canonical_bytes(doc))


# --- rendering ----------------------------------------------------------------------------


def render_input_text(input: Input) -> str:
    """The text the agent sees for an input.

    Unlike 0.4.10, peer inputs name the sender, the convention and (for requests) the intent,
    not only the bare body (reference-loop-and-surfaces.md §9 item 5).
    """
    if isinstance(input, PromptInput):
        return input.text
    if isinstance(input, PeerInput):
        src = input.header.source
        sender = src.peer_id if isinstance(src, PeerOrigin) else src.type
        conv = input.convention
        if conv is None or conv.convention_type == "message":
            return f"[peer message from {sender}] {input.body}"
        if isinstance(conv, RequestConvention):
            return (
                f"[peer request {conv.request_id} from {sender}, intent {conv.intent}] {input.body}"
            )
        if isinstance(conv, ResponseProgressConvention):
            return (
                f"[peer response progress ({conv.phase.value}) to request {conv.request_id} "
                f"from {sender}] {input.body}"
            )
        assert isinstance(conv, ResponseTerminalConvention)
        return (
            f"[peer response ({conv.status.value}) to request {conv.request_id} from {sender}] "
            f"{input.body}"
        )
    if isinstance(input, FlowStepInput):
        return input.instructions
    if isinstance(input, ExternalEventInput):
        return f"[External Event: {input.event_type}] {compact(input.payload)}"
    return input.content
