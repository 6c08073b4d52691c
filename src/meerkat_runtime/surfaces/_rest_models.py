"""The REST surface's documented shapes (OpenAPI only).

The handlers build their answers with ``common.wire_*`` and parse request bodies with
``common.parse_*``; these models describe those documents for ``/openapi.json`` (and for
schemathesis, which checks every answer against them). They are deliberately as loose as the
documents are: optional fields may be absent, and objects the runtime defines elsewhere
(``InputState``, ``AcceptOutcome``, ``WaitOutcome``, event envelopes) are open objects with
their tag fields named.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "REQUEST_MODELS",
    "AcceptOutcomeBody",
    "ArchivedBody",
    "CancelledBody",
    "CommsReceiptBody",
    "CommsSendRequest",
    "CreateSessionRequest",
    "CreatedSession",
    "DeferredSession",
    "ErrorBody",
    "HealthBody",
    "HistoryBody",
    "InputListBody",
    "InputStateBody",
    "InterruptedBody",
    "PeerBody",
    "PeersBody",
    "RecoverBody",
    "RunResultBody",
    "RuntimeReportBody",
    "RuntimeStateBody",
    "SessionInfoBody",
    "SessionListBody",
    "SystemContextBody",
    "SystemContextRequest",
    "TurnAcceptedBody",
    "TurnRequestBody",
    "WaitOutcomeBody",
    "WaitPendingBody",
    "WebhookAcceptedBody",
]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorBody(_Open):
    """Every error: a one-line message, a stable code, and details (``field``, ``input_id``,
    ``reject_code``, ``session_id``, ...) when there are any."""

    error: str
    code: str


class HealthBody(BaseModel):
    status: Literal["ok"]


class UsageBody(_Open):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    cache_creation_tokens: int | None = None
    cache_read_tokens: int | None = None


class RunResultBody(_Open):
    """``WireRunResult``; ``existing_id`` when the request was a duplicate (same idempotency
    key, same content) and this is the original input's result."""

    session_id: str
    text: str
    turns: int
    tool_calls: int
    usage: UsageBody
    structured_output: Any = None
    schema_warnings: list[dict[str, Any]] | None = None
    existing_id: str | None = None


class DeferredSession(_Open):
    """A session created with ``initial_turn: deferred``: no turn ran yet."""

    session_id: str


class CreatedSession(_Open):
    """``WireRunResult`` of the first turn, or just ``{session_id}`` for a deferred session."""

    session_id: str
    text: str | None = None
    turns: int | None = None
    tool_calls: int | None = None
    usage: UsageBody | None = None
    structured_output: Any = None
    schema_warnings: list[dict[str, Any]] | None = None
    existing_id: str | None = None


class SessionSummaryBody(_Open):
    session_id: str
    created_at: str
    updated_at: str
    message_count: int
    total_tokens: int
    is_active: bool
    labels: dict[str, str]


class SessionListBody(BaseModel):
    sessions: list[SessionSummaryBody]


class SessionInfoBody(SessionSummaryBody):
    usage: UsageBody
    model: str
    provider: str | None = None
    last_assistant_text: str | None = None
    state: str | None = None
    archived: bool


class HistoryBody(_Open):
    """``WireSessionHistory``: ``messages`` in the SDK's ``SessionMessage`` shape."""

    session_id: str
    message_count: int
    offset: int
    has_more: bool
    messages: list[dict[str, Any]]
    limit: int | None = None


class TurnAcceptedBody(BaseModel):
    """``?wait=false``: the input's id and its ``AcceptOutcome`` JSON; wait for it with
    ``GET /input/{session_id}/{input_id}/wait``."""

    input_id: str
    outcome: dict[str, Any]


class InterruptedBody(BaseModel):
    session_id: str
    interrupted: bool


class ArchivedBody(BaseModel):
    session_id: str
    archived: bool


class SystemContextBody(BaseModel):
    session_id: str
    status: Literal["applied", "staged", "duplicate"]
    input_id: str


class RuntimeStateBody(BaseModel):
    session_id: str
    state: str


class AcceptOutcomeBody(_Open):
    """``AcceptOutcome`` JSON (``accepted{input_id, policy, state}``,
    ``deduplicated{input_id, existing_id}``, ``rejected{reason, code}``); a 413/429 answer
    adds ``error`` and ``code``."""

    outcome_type: Literal["accepted", "deduplicated", "rejected"]


class RuntimeReportBody(_Open):
    """The operation's report, e.g. ``{inputs_abandoned, inputs_pending_drain}``."""

    session_id: str


class CancelledBody(BaseModel):
    session_id: str
    cancelled: bool


class RecoverBody(BaseModel):
    """``recovery_report`` counts what this process's (re)load of the session found
    (``inputs_recovered``, ``inputs_lost``, ``inputs_rebuilt``, ``continuations``)."""

    session_id: str
    state: str
    recovery_report: dict[str, int] | None = None


class InputListBody(BaseModel):
    input_ids: list[str]
    inputs: list[dict[str, Any]] | None = None


class InputStateBody(_Open):
    """``InputState`` JSON."""

    input_id: str
    current_state: str


class WaitOutcomeBody(_Open):
    """``WaitOutcome`` JSON (S12): ``completed{result}``, ``completed_without_result``,
    ``cancelled``, ``superseded{superseded_by}``, ``abandoned{reason, error?}``,
    ``terminated{reason}`` (the instance stopped: wait again)."""

    outcome_type: str
    input_id: str


class WaitPendingBody(BaseModel):
    """The input did not finish within the timeout: its current lifecycle state."""

    input_id: str
    state: str
    done: Literal[False]


class WebhookAcceptedBody(BaseModel):
    """A webhook delivery's input: 202 ``accepted``; 200 ``deduplicated`` for a redelivery
    (``input_id`` and ``existing_id`` are then the first delivery's input)."""

    session_id: str
    event_type: str
    input_id: str
    outcome_type: Literal["accepted", "deduplicated"]
    delivery_id: str | None = None
    existing_id: str | None = None


class CommsReceiptBody(_Open):
    """A peer send's receipt: ``peer_message_sent{envelope_id, acked}``,
    ``peer_request_sent{envelope_id, interaction_id (the request id), stream_reserved}`` or
    ``peer_response_sent{envelope_id, in_reply_to}``."""

    kind: Literal["peer_message_sent", "peer_request_sent", "peer_response_sent"]
    envelope_id: str
    acked: bool | None = None
    interaction_id: str | None = None
    stream_reserved: bool | None = None
    in_reply_to: str | None = None


class PeerBody(_Open):
    """A peer: another named, non-archived session of the store."""

    name: str
    peer_id: str = Field(description="the peer's session id")
    address: str
    source: str
    sendable_kinds: list[str]
    capabilities: dict[str, Any]
    meta: dict[str, Any]


class PeersBody(BaseModel):
    peers: list[PeerBody]


# ------------------------------------------------------------------ request bodies


class CreateSessionRequest(_Open):
    """Meerkat 0.4.10's create payload. Features this runtime lacks (``enable_shell``,
    ``hooks_override``, ...) are refused when set to a truthy value."""

    prompt: str | None = Field(None, description="required unless initial_turn is deferred")
    initial_turn: Literal["run_immediately", "deferred"] = "run_immediately"
    model: str | None = None
    provider: str | None = None
    system_prompt: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    output_schema: dict[str, Any] | None = None
    structured_output_retries: int | None = Field(None, ge=0)
    provider_params: dict[str, Any] | None = None
    budget_limits: dict[str, float] | None = None
    labels: dict[str, str] | None = None
    additional_instructions: list[str] | None = None
    idempotency_key: str | None = None
    comms_name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="makes the session a comms peer; unique among non-archived sessions",
    )
    peer_meta: dict[str, Any] | None = Field(
        None, description="not kept by this runtime: refused unless empty"
    )


class TurnRequestBody(_Open):
    """A turn: the prompt plus per-turn overrides, applied to this run only."""

    prompt: str
    session_id: str | None = Field(None, description="if given, must equal the path's id")
    idempotency_key: str | None = None
    model: str | None = None
    provider: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    system_prompt: str | None = None
    output_schema: dict[str, Any] | None = None
    structured_output_retries: int | None = Field(None, ge=0)
    provider_params: dict[str, Any] | None = None
    additional_instructions: list[str] | None = None


class SystemContextRequest(BaseModel):
    text: str = Field(min_length=1)
    source: str | None = Field(None, description="who generated it (default: rest)")
    idempotency_key: str | None = None


class CommsSendRequest(_Open):
    """A peer message, request or response from ``session_id`` (it needs a comms name). What
    each kind takes: message ``to, body``; request ``to, intent, params?``; response
    ``in_reply_to, status, result?, to?``. 0.4.10's ``peer_*`` kind names are accepted."""

    session_id: str = Field(min_length=1, description="the sending session")
    kind: Literal["message", "request", "response", "peer_message", "peer_request", "peer_response"]
    to: str | None = Field(None, description="the peer's comms name")
    body: str | None = Field(None, description="message text")
    intent: str | None = Field(None, description="what a request asks for")
    params: dict[str, Any] | None = Field(None, description="a request's parameters")
    in_reply_to: str | None = Field(None, description="the request id a response answers")
    status: (
        Literal["accepted", "in_progress", "partial_result", "completed", "failed", "cancelled"]
        | None
    ) = None
    result: Any = Field(None, description="a response's result: any JSON value")
    envelope_id: str | None = Field(
        None, description="a UUID; the idempotency key of the send (minted when left out)"
    )


class InputRequest(_Open):
    """An ``Input`` JSON document (tag ``input_type``: prompt, peer, flow_step,
    external_event, system_generated, projected), as in Meerkat 0.4.10."""

    input_type: str
    header: dict[str, Any]


REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    CreateSessionRequest,
    TurnRequestBody,
    SystemContextRequest,
    InputRequest,
    CommsSendRequest,
)
