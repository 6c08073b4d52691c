"""Core lifecycle contracts: run primitives, receipts, run events, control commands, and the
executor protocol with its RunContext (spec §3, reference-runtime.md §6).

JSON shapes follow reference-runtime.md §6 exactly. Our additive extensions (documents stay
readable by 0.4.10, which ignores unknown fields): ``input_id`` on appends (which input an
append came from, recorded on the conversation row), and the per-turn overrides on
``RuntimeTurnMetadata`` (spec §2).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Mapping, Sequence
from typing import Annotated, Any, Literal, Protocol, TypeVar, runtime_checkable

from pydantic import Field

from .._ids import InputId, RunId
from .._model import WireModel
from .._time import Timestamp

__all__ = [
    "ApplyFailed",
    "BoundaryAppliedEvent",
    "CancelCurrentRun",
    "ControlFailed",
    "ConversationAppend",
    "ConversationAppendRole",
    "ConversationContextAppend",
    "CoreExecutor",
    "CoreExecutorError",
    "CoreRenderable",
    "ExecutorInternalError",
    "ExecutorStopped",
    "ImmediateAppend",
    "ImmediateContextAppend",
    "JsonRenderable",
    "Message",
    "ReferenceRenderable",
    "RunApplyBoundary",
    "RunBoundaryReceipt",
    "RunCancelled",
    "RunCancelledEvent",
    "RunCompletedEvent",
    "RunContext",
    "RunControlCommand",
    "RunEvent",
    "RunFailedEvent",
    "RunFailure",
    "RunFenced",
    "RunPrimitive",
    "RunResult",
    "RunStartedEvent",
    "RuntimeTurnMetadata",
    "SkillKey",
    "StagedInput",
    "StagedRunInput",
    "StopRuntimeExecutor",
    "TextRenderable",
    "ToolCall",
    "TurnToolOverlay",
    "Usage",
]


class RunApplyBoundary(enum.StrEnum):
    IMMEDIATE = "immediate"
    RUN_START = "run_start"
    RUN_CHECKPOINT = "run_checkpoint"


# --- renderables and appends -------------------------------------------------------------


class TextRenderable(WireModel):
    _tag = "type"
    type: Literal["text"] = "text"
    text: str


class JsonRenderable(WireModel):
    _tag = "type"
    _keep_none = frozenset({"value"})
    type: Literal["json"] = "json"
    value: Any = None


class ReferenceRenderable(WireModel):
    _tag = "type"
    _keep_none = frozenset({"label"})
    type: Literal["reference"] = "reference"
    uri: str
    label: str | None = None


CoreRenderable = Annotated[
    TextRenderable | JsonRenderable | ReferenceRenderable, Field(discriminator="type")
]


class ConversationAppendRole(enum.StrEnum):
    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM_NOTICE = "system_notice"
    TOOL = "tool"


class ConversationAppend(WireModel):
    role: ConversationAppendRole
    content: CoreRenderable
    input_id: InputId | None = None  # extension: the input this append renders


class ConversationContextAppend(WireModel):
    key: str
    content: CoreRenderable
    input_id: InputId | None = None  # extension


class SkillKey(WireModel):
    source_uuid: str
    skill_name: str


class TurnToolOverlay(WireModel):
    _keep_none = frozenset({"allowed_tools", "blocked_tools"})
    allowed_tools: list[str] | None = None
    blocked_tools: list[str] | None = None


class RuntimeTurnMetadata(WireModel):
    """Per-turn metadata carried by prompts and flow steps. Every field optional.

    The fields after ``additional_instructions`` are our extensions (spec §2): overrides that
    apply to the one run they arrive with.
    """

    host_mode: bool | None = None
    skill_references: list[SkillKey] | None = None
    flow_tool_overlay: TurnToolOverlay | None = None
    additional_instructions: list[str] | None = None
    model: str | None = None
    provider: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    system_prompt: str | None = None
    output_schema: dict[str, Any] | None = None
    structured_output_retries: int | None = Field(default=None, ge=0)
    provider_params: dict[str, Any] | None = None


class StagedRunInput(WireModel):
    """What the runtime stages for a boundary: appends made from inputs, in queue order."""

    _omit_empty = frozenset({"appends", "context_appends", "contributing_input_ids"})
    boundary: RunApplyBoundary
    appends: list[ConversationAppend] = Field(default_factory=list)
    context_appends: list[ConversationContextAppend] = Field(default_factory=list)
    contributing_input_ids: list[InputId] = Field(default_factory=list)
    turn_metadata: RuntimeTurnMetadata | None = None


class StagedInput(StagedRunInput):
    _tag = "primitive_type"
    primitive_type: Literal["staged_input"] = "staged_input"

    def as_staged(self) -> StagedRunInput:
        return StagedRunInput.model_validate(self.model_dump(exclude={"primitive_type"}))


class ImmediateAppend(ConversationAppend):
    _tag = "primitive_type"
    primitive_type: Literal["immediate_append"] = "immediate_append"

    @property
    def contributing_input_ids(self) -> list[InputId]:
        return []


class ImmediateContextAppend(ConversationContextAppend):
    _tag = "primitive_type"
    primitive_type: Literal["immediate_context_append"] = "immediate_context_append"

    @property
    def contributing_input_ids(self) -> list[InputId]:
        return []


RunPrimitive = Annotated[
    StagedInput | ImmediateAppend | ImmediateContextAppend, Field(discriminator="primitive_type")
]


class RunBoundaryReceipt(WireModel):
    """Proof that a boundary's appends were committed. Identity: (runtime, run_id, sequence)."""

    run_id: RunId
    boundary: RunApplyBoundary
    contributing_input_ids: list[InputId] = Field(default_factory=list)
    conversation_digest: str | None = None
    message_count: int = 0
    sequence: int = 0


# --- run events ---------------------------------------------------------------------------


class RunStartedEvent(WireModel):
    @property
    def contributing_input_ids(self) -> list[InputId]:
        return []

    _tag = "event_type"
    event_type: Literal["run_started"] = "run_started"
    run_id: RunId


class BoundaryAppliedEvent(WireModel):
    _tag = "event_type"
    event_type: Literal["boundary_applied"] = "boundary_applied"
    run_id: RunId
    receipt: RunBoundaryReceipt
    session_snapshot: list[Annotated[int, Field(ge=0, le=255)]] | None = None

    @property
    def contributing_input_ids(self) -> list[InputId]:
        return list(self.receipt.contributing_input_ids)


class RunCompletedEvent(WireModel):
    _tag = "event_type"
    event_type: Literal["run_completed"] = "run_completed"
    run_id: RunId
    consumed_input_ids: list[InputId] = Field(default_factory=list)

    @property
    def contributing_input_ids(self) -> list[InputId]:
        return list(self.consumed_input_ids)


class RunFailedEvent(WireModel):
    @property
    def contributing_input_ids(self) -> list[InputId]:
        return []

    _tag = "event_type"
    event_type: Literal["run_failed"] = "run_failed"
    run_id: RunId
    error: str
    recoverable: bool


class RunCancelledEvent(WireModel):
    @property
    def contributing_input_ids(self) -> list[InputId]:
        return []

    _tag = "event_type"
    event_type: Literal["run_cancelled"] = "run_cancelled"
    run_id: RunId


RunEvent = Annotated[
    RunStartedEvent | BoundaryAppliedEvent | RunCompletedEvent | RunFailedEvent | RunCancelledEvent,
    Field(discriminator="event_type"),
]


# --- control ------------------------------------------------------------------------------


class CancelCurrentRun(WireModel):
    _tag = "command"
    command: Literal["cancel_current_run"] = "cancel_current_run"
    reason: str = ""


class StopRuntimeExecutor(WireModel):
    _tag = "command"
    command: Literal["stop_runtime_executor"] = "stop_runtime_executor"
    reason: str = ""


RunControlCommand = Annotated[
    CancelCurrentRun | StopRuntimeExecutor, Field(discriminator="command")
]


class CoreExecutorError(Exception):
    """Errors with the display strings of reference-runtime.md §6.5."""


class ApplyFailed(CoreExecutorError):
    def __init__(self, reason: str) -> None:
        super().__init__(f"Apply failed: {reason}")
        self.reason = reason


class ControlFailed(CoreExecutorError):
    def __init__(self, reason: str) -> None:
        super().__init__(f"Control failed: {reason}")
        self.reason = reason


class ExecutorStopped(CoreExecutorError):
    def __init__(self) -> None:
        super().__init__("Executor is stopped")


class ExecutorInternalError(CoreExecutorError):
    def __init__(self, message: str) -> None:
        super().__init__(f"Internal error: {message}")
        self.message = message


# --- conversation and results -------------------------------------------------------------


class ToolCall(WireModel):
    """A tool call the model made. ``raw_arguments`` is set (and ``arguments`` empty) only
    when the model's arguments were not a JSON object; the agent answers such a call with an
    error result instead of running the tool."""

    id: str
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    raw_arguments: str | None = None


class Usage(WireModel):
    """Token counts; the cache fields are set only by providers that report them."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_tokens: int | None = None
    cache_read_tokens: int | None = None

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        def _opt(a: int | None, b: int | None) -> int | None:
            return None if a is None and b is None else (a or 0) + (b or 0)

        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cache_creation_tokens=_opt(self.cache_creation_tokens, other.cache_creation_tokens),
            cache_read_tokens=_opt(self.cache_read_tokens, other.cache_read_tokens),
        )


class Message(WireModel):
    """One conversation message as the executor writes it.

    ``input_ids`` names the inputs this message renders (set for appends made from inputs);
    the runtime stores it on the conversation row so "applied twice" can be counted.
    ``is_error`` marks a tool result that reports a failure; ``usage`` on an assistant message
    is what the model call that produced it cost (session usage totals are their sum, so they
    are exactly as durable as the conversation). ``created_at`` is stamped by the runtime
    when the message is committed, if the executor left it unset.
    """

    _omit_empty = frozenset({"tool_calls", "input_ids"})
    role: Literal["user", "assistant", "system_notice", "tool", "context"]
    content: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None
    input_ids: list[InputId] = Field(default_factory=list)
    is_error: bool | None = None
    usage: Usage | None = None
    created_at: Timestamp | None = None


class RunResult(WireModel):
    """What a completed run hands to its waiters (``completed{result}``, S12)."""

    text: str = ""
    session_id: str | None = None
    usage: Usage = Field(default_factory=Usage)
    turns: int = 0
    tool_calls: int = 0
    structured_output: Any = None
    schema_warnings: list[str] | None = None


# --- the executor contract ----------------------------------------------------------------


class RunCancelled(Exception):
    """Raised inside an executor when its run was cancelled (``run.cancelled`` is set)."""


class RunFenced(Exception):
    """The run no longer owns its runtime (reset, destroyed, stopped or replaced): every
    commit it attempts is refused, so nothing it does after this point becomes durable."""


class RunFailure(Exception):
    """An executor failure. ``permanent`` failures abandon the head input at once (S4) with
    reason ``failed``; transient ones are retried with backoff until the budget is spent."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


T = TypeVar("T")


@runtime_checkable
class RunContext(Protocol):
    """The runtime's side of one run, handed to ``CoreExecutor.apply``.

    Contract (spec §3): call ``commit_boundary`` exactly once, before any model or tool work,
    with the appends made from ``primitive``; call ``checkpoint`` between model calls; watch
    ``cancelled`` at every await. Messages passed to ``append`` are committed with the next
    commit (boundary, checkpoint, or the completion when ``apply`` returns), ahead of that
    commit's ``delta``. ``emit`` publishes an agent event (``{"type": ..., ...}``, the
    ``meerkat-sdk`` event shapes) in the session's event sequence; it never blocks.
    ``guard`` closes a coroutine it does not await (when the run is already cancelled).
    """

    run_id: RunId
    session_id: str
    primitive: StagedInput
    is_continuation: bool
    cancelled: asyncio.Event

    async def commit_boundary(self, delta: Sequence[Message] = ()) -> RunBoundaryReceipt: ...

    async def checkpoint(
        self, delta: Sequence[Message] = (), *, keep_interrupt: bool = False
    ) -> StagedRunInput | None:
        """Commit, and take in joining inputs (S16). An interrupt (an ``interrupt_yielding``
        input arriving during the run) is cleared here, since the inputs that join are handed
        to the executor now; ``keep_interrupt=True`` keeps it, so a ``wait`` the model asked
        for before it saw that input still returns at once (the agent's checkpoint before a
        tool batch)."""
        ...

    def append(self, *messages: Message) -> None: ...

    def emit(self, event: Mapping[str, Any]) -> None: ...

    def conversation(self) -> list[Message]: ...

    async def wait(self, timeout: float) -> Literal["interrupted", "timeout"]: ...

    async def guard(self, awaitable: Awaitable[T]) -> T: ...


@runtime_checkable
class CoreExecutor(Protocol):
    """Anything that can apply a run. ``apply`` returns the run's result (or ``None`` for a
    run without one, e.g. a context append) and raises ``RunFailure`` / any exception on
    failure, ``RunCancelled`` when it stopped because of ``run.cancelled``."""

    async def apply(self, run: RunContext) -> RunResult | None: ...
