"""The built-in agent: the turn loop that applies a run (spec §3, S4-S6, S8, S16).

What ``AgentExecutor.apply`` guarantees, in order:
1. Nothing durable happens before the boundary: the run's settings and model are resolved (an
   unknown model or provider is a permanent ``RunFailure``) and a scripted ``before_boundary``
   failure of the offline model is raised before ``commit_boundary``, so the runtime re-queues
   the head input (S4). An ``immediate`` boundary (system-generated or ``inject_now`` input
   only) skips all of this: its appends are committed as context, no model is called, and
   ``apply`` returns ``None``.
2. ``commit_boundary`` is called exactly once, before any model or tool work, with: a
   synthetic ``INTERRUPTED_TOOL_RESULT`` for every tool call in the conversation that has no
   result (a cancelled or crashed run's; S6: answered, never run again), the turn's
   ``additional_instructions`` as a system notice, and the primitive's appends.
3. Then turns: each streams one model call (text pieces become ``text_delta`` events; provider
   retries of transient errors happen inside the call, each announced by a ``retrying``
   event). A final answer (validated against the output schema when one is set, with a
   bounded number of corrective turns) is appended and ends the run. Tool calls are appended
   as one assistant message and committed by a checkpoint **before any tool runs** (so a
   crash or cancel mid-tool leaves a durable call without a result, answered as interrupted
   and never run again, S6), run **in parallel**, their results appended in call order, then
   ``run.checkpoint()`` commits them and hands back inputs that join (S16), which are
   appended before the next model call. Inputs that join at the checkpoint before the batch
   are appended after its results; an interrupting one that arrived during the model call
   ends a ``wait`` of the batch at once (``keep_interrupt``).
4. Budgets (turns, total tokens, tool calls, wall time) are checked before each model call; a
   ``budget_warning`` is emitted once per budget when 80% is used; an exhausted budget ends
   the run with a permanent ``RunFailure`` that names it.
5. Every await watches ``run.cancelled``: the model stream is cancelled, async tools are
   cancelled, sync tools' threads are abandoned (their results discarded), ``wait`` returns;
   then ``RunCancelled`` propagates (S8). ``asyncio.CancelledError`` always propagates.
6. Tool problems never crash the run: unknown tools, bad arguments, exceptions and timeouts
   become error results the model reads, each reported by a tool event.

Events (``core/events.py``): ``run_started``, ``turn_started``, ``text_delta``,
``text_complete``, ``tool_call_requested``, ``tool_execution_*``, ``tool_result_received``,
``turn_completed``, ``retrying``, ``budget_warning``, ``structured_output_invalid``, then
``run_completed`` or ``run_failed``.

Rendering: a staged input becomes its ``appends`` in order, then its ``context_appends`` in
order. Text content is used as is, JSON content as compact JSON, a reference as
``label <uri>`` (or the bare URI). Each message records the ``input_id`` of its append.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .._json import compact
from ..llm.base import Model, ModelError, ModelRequest, ModelResponse, ToolSpec
from ..llm.offline import WAIT_TOOL_NAME, OfflineModel, parse_script
from ..llm.registry import UnknownModelError, build_model, infer_provider
from ..llm.retry import RetryPolicy, complete_with_retry
from . import events as ev
from ._schema import SchemaValidator
from .lifecycle import (
    ConversationAppendRole,
    CoreRenderable,
    JsonRenderable,
    Message,
    RunApplyBoundary,
    RunCancelled,
    RunContext,
    RunFailure,
    RunResult,
    RuntimeTurnMetadata,
    StagedRunInput,
    TextRenderable,
    ToolCall,
    Usage,
)
from .tools import ToolOutcome, ToolRegistry

__all__ = [
    "INTERRUPTED_TOOL_RESULT",
    "WAIT_TOOL",
    "AgentConfig",
    "AgentExecutor",
    "messages_from_staged",
]

INTERRUPTED_TOOL_RESULT = "interrupted, not re-run"
"""The result the agent records for a tool call found without one (S6)."""

WAIT_TOOL = ToolSpec(
    name=WAIT_TOOL_NAME,
    description=(
        "Pause until new input (a message or a reply) interrupts the wait, or `timeout` "
        'seconds pass. Returns "interrupted" or "timeout"; new input follows the result.'
    ),
    parameters={
        "type": "object",
        "properties": {"timeout": {"type": "number", "minimum": 0, "description": "seconds"}},
        "required": ["timeout"],
    },
)
"""The built-in tool the agent answers with ``RunContext.wait`` (a checkpoint follows it)."""

_WARN_AT = 0.8

_ROLES: dict[ConversationAppendRole, Literal["user", "assistant", "system_notice", "tool"]] = {
    ConversationAppendRole.USER: "user",
    ConversationAppendRole.ASSISTANT: "assistant",
    ConversationAppendRole.SYSTEM_NOTICE: "system_notice",
    ConversationAppendRole.TOOL: "tool",
}


@dataclass
class AgentConfig:
    """Session-level agent settings. A run's ``turn_metadata`` may override ``model``,
    ``provider``, ``system_prompt``, ``max_tokens``, ``output_schema``,
    ``structured_output_retries`` and ``provider_params`` for that run only.

    ``max_tokens`` caps each model call's output; the budgets cap a whole run: ``max_turns``
    model calls, ``max_total_tokens`` tokens in and out, ``max_tool_calls`` tool calls,
    ``max_duration`` seconds of wall time (``None``: no limit). Invalid values (and a malformed
    offline script or output schema) raise ``ValueError`` at construction.
    """

    model: str = "offline"
    provider: str | None = None
    system_prompt: str | None = None
    offline_script: list[dict[str, Any]] | None = None
    max_turns: int = 50
    max_tokens: int | None = None
    max_total_tokens: int | None = None
    max_tool_calls: int | None = None
    max_duration: float | None = None
    output_schema: dict[str, Any] | None = None
    structured_output_retries: int = 2
    provider_params: dict[str, Any] = field(default_factory=dict)
    base_url: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_tokens", "max_total_tokens", "max_tool_calls"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.max_duration is not None and not self.max_duration > 0:
            raise ValueError(f"max_duration must be positive seconds, got {self.max_duration}")
        if self.structured_output_retries < 0:
            raise ValueError(
                f"structured_output_retries must be >= 0, got {self.structured_output_retries}"
            )
        if self.offline_script is not None:
            parse_script(self.offline_script)
        if self.output_schema is not None:
            SchemaValidator(self.output_schema)
        try:
            infer_provider(self.model, self.provider)
        except UnknownModelError as exc:
            raise ValueError(str(exc)) from None


@dataclass(frozen=True)
class _TurnSettings:
    model: str
    provider: str | None
    system_prompt: str | None
    max_tokens: int | None
    output_schema: dict[str, Any] | None
    structured_output_retries: int
    provider_params: dict[str, Any]
    allowed_tools: frozenset[str] | None
    blocked_tools: frozenset[str]


def _render(content: CoreRenderable) -> str:
    if isinstance(content, TextRenderable):
        return content.text
    if isinstance(content, JsonRenderable):
        return compact(content.value)
    return f"{content.label} <{content.uri}>" if content.label else content.uri


def messages_from_staged(staged: StagedRunInput) -> list[Message]:
    """The conversation messages a staged input appends: its appends in order (with their
    roles), then its context appends as ``context`` messages named by their key."""
    messages = [
        Message(
            role=_ROLES[append.role],
            content=_render(append.content),
            input_ids=[append.input_id] if append.input_id is not None else [],
        )
        for append in staged.appends
    ]
    messages.extend(
        Message(
            role="context",
            content=_render(ctx.content),
            name=ctx.key,
            input_ids=[ctx.input_id] if ctx.input_id is not None else [],
        )
        for ctx in staged.context_appends
    )
    return messages


def _prompt_text(staged: StagedRunInput) -> str:
    """What ``run_started`` reports as the prompt: the text of the user appends."""
    return "\n".join(
        a.content.text
        for a in staged.appends
        if a.role is ConversationAppendRole.USER and isinstance(a.content, TextRenderable)
    )


def _dangling_tool_results(conversation: Sequence[Message]) -> list[Message]:
    """Synthetic results for tool calls that have no result message (the run that made them
    was cancelled or the process died), in call order (S6: never re-run, always answered)."""
    answered = {m.tool_call_id for m in conversation if m.role == "tool"}
    return [
        Message(
            role="tool",
            content=INTERRUPTED_TOOL_RESULT,
            tool_call_id=call.id,
            name=call.name,
            is_error=True,
        )
        for message in conversation
        if message.role == "assistant"
        for call in message.tool_calls
        if call.id not in answered
    ]


def _raise_if_cancelled(run: RunContext) -> None:
    """Checked before creating a coroutine for ``run.guard``, so a run that is already
    cancelled never creates one it will not await."""
    if run.cancelled.is_set():
        raise RunCancelled()


def _wait_timeout(arguments: dict[str, Any]) -> float | None:
    value = arguments.get("timeout")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    timeout = float(value)
    return timeout if math.isfinite(timeout) and timeout >= 0 else None


def _ms(seconds: float) -> int:
    # round, not int: int(1.001 * 1000) == 1000 (binary floats), so a server's retry_after
    # of 1.001 s would be reported as 1000 ms.
    return round(seconds * 1000)


class _Budget:
    """A run's budgets: ``check`` raises the permanent failure of an exhausted budget;
    ``warnings`` yields each budget once when it first reaches 80%."""

    def __init__(self, config: AgentConfig) -> None:
        self.limits: dict[str, int | None] = {
            "turns": config.max_turns,
            "tokens": config.max_total_tokens,
            "tool_calls": config.max_tool_calls,
            "wall_time_ms": _ms(config.max_duration) if config.max_duration else None,
        }
        self.started = time.monotonic()
        self.warned: set[str] = set()

    def used(self, turns: int, usage: Usage, tool_calls: int) -> dict[str, int]:
        return {
            "turns": turns,
            "tokens": usage.total_tokens,
            "tool_calls": tool_calls,
            "wall_time_ms": _ms(time.monotonic() - self.started),
        }

    def check(self, used: dict[str, int]) -> None:
        for name, limit in self.limits.items():
            if limit is not None and used[name] >= limit:
                raise RunFailure(
                    f"budget exhausted: {name} limit {limit} reached (used {used[name]}) "
                    "before a final answer",
                    permanent=True,
                )

    def warnings(self, used: dict[str, int]) -> list[dict[str, Any]]:
        out = []
        for name, limit in self.limits.items():
            if limit and name not in self.warned and used[name] >= _WARN_AT * limit:
                self.warned.add(name)
                out.append(ev.budget_warning(name, used[name], limit))
        return out

    def remaining_seconds(self) -> float | None:
        limit = self.limits["wall_time_ms"]
        if limit is None:
            return None
        return max(0.0, limit / 1000 - (time.monotonic() - self.started))


def _failure_kind(exc: BaseException) -> str:
    if isinstance(exc, ModelError):
        return exc.kind
    if isinstance(exc, RunCancelled):
        return "cancelled"
    if isinstance(exc, RunFailure):
        return "budget" if str(exc).startswith("budget exhausted") else "failed"
    return "internal"


class AgentExecutor:
    """A ``CoreExecutor`` running the turn loop described in the module docstring.

    One instance serves one session. ``model`` replaces the provider the config would build
    for its own ``name`` (tests and applications inject models this way); other names are
    built on first use and cached. ``tools`` are the application's tools; the built-in
    ``wait`` is always offered.
    """

    def __init__(
        self,
        config: AgentConfig | None = None,
        *,
        session_id: str | None = None,
        model: Model | None = None,
        tools: ToolRegistry | None = None,
    ) -> None:
        self.config = config if config is not None else AgentConfig()
        self.session_id = session_id
        self.tools = tools if tools is not None else ToolRegistry()
        self._models: dict[tuple[str, str], Model] = {}
        self._injected = model

    # ------------------------------------------------------------------ apply

    async def apply(self, run: RunContext) -> RunResult | None:
        primitive = run.primitive
        if primitive.boundary == RunApplyBoundary.IMMEDIATE:
            delta = [*_dangling_tool_results(run.conversation()), *messages_from_staged(primitive)]
            await run.commit_boundary(delta)
            run.emit(ev.context_appended(len(delta)))
            return None
        settings = self._settings(primitive.turn_metadata)
        model = self._resolve(settings)
        if isinstance(model, OfflineModel):
            _raise_if_cancelled(run)
            try:
                await run.guard(model.before_boundary(self._request(run, settings, model)))
            except ModelError as err:
                raise RunFailure(str(err), permanent=not err.transient) from err
        session_id = self.session_id or run.session_id
        run.emit(ev.run_started(session_id, _prompt_text(primitive), str(run.run_id)))
        try:
            await run.commit_boundary(self._boundary_delta(run, primitive))
            result = await self._turn_loop(run, model, settings)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError | GeneratorExit):
                run.emit(ev.run_failed(session_id, str(exc), _failure_kind(exc), str(run.run_id)))
            raise
        run.emit(ev.run_completed(session_id, result.text, result.usage, str(run.run_id)))
        return result

    def _boundary_delta(self, run: RunContext, primitive: StagedRunInput) -> list[Message]:
        delta = _dangling_tool_results(run.conversation())
        meta = primitive.turn_metadata
        if meta is not None and meta.additional_instructions:
            delta.extend(
                Message(role="system_notice", content=text) for text in meta.additional_instructions
            )
        delta.extend(messages_from_staged(primitive))
        return delta

    def _settings(self, meta: RuntimeTurnMetadata | None) -> _TurnSettings:
        cfg = self.config
        if meta is None:
            return _TurnSettings(
                cfg.model,
                cfg.provider,
                cfg.system_prompt,
                cfg.max_tokens,
                cfg.output_schema,
                cfg.structured_output_retries,
                dict(cfg.provider_params),
                None,
                frozenset(),
            )
        overlay = meta.flow_tool_overlay
        model = meta.model if meta.model is not None else cfg.model
        provider = (
            meta.provider
            if meta.provider is not None
            else (cfg.provider if meta.model is None else None)
        )
        return _TurnSettings(
            model=model,
            provider=provider,
            system_prompt=meta.system_prompt
            if meta.system_prompt is not None
            else cfg.system_prompt,
            max_tokens=meta.max_tokens if meta.max_tokens is not None else cfg.max_tokens,
            output_schema=meta.output_schema
            if meta.output_schema is not None
            else cfg.output_schema,
            structured_output_retries=meta.structured_output_retries
            if meta.structured_output_retries is not None
            else cfg.structured_output_retries,
            provider_params={**cfg.provider_params, **(meta.provider_params or {})},
            allowed_tools=frozenset(overlay.allowed_tools)
            if overlay is not None and overlay.allowed_tools is not None
            else None,
            blocked_tools=frozenset(overlay.blocked_tools or ())
            if overlay is not None
            else frozenset(),
        )

    def _resolve(self, settings: _TurnSettings) -> Model:
        """The model for this run: the injected one when its name is asked for (with the
        session's provider), else one built for (name, provider) and cached under both."""
        injected = self._injected
        if (
            injected is not None
            and injected.name == settings.model
            and settings.provider in (None, self.config.provider)
        ):
            return injected
        try:
            key = (settings.model, infer_provider(settings.model, settings.provider))
        except UnknownModelError as exc:
            raise RunFailure(str(exc), permanent=True) from None
        cached = self._models.get(key)
        if cached is not None:
            return cached
        try:
            model = build_model(
                settings.model,
                settings.provider,
                offline_script=self.config.offline_script,
                base_url=self.config.base_url,
            )
        except UnknownModelError as exc:
            raise RunFailure(str(exc), permanent=True) from None
        self._models[key] = model
        return model

    def _tool_specs(self, settings: _TurnSettings) -> list[ToolSpec]:
        specs = [WAIT_TOOL, *self.tools.specs()]
        return [s for s in specs if self._tool_allowed(settings, s.name)]

    @staticmethod
    def _tool_allowed(settings: _TurnSettings, name: str) -> bool:
        if name in settings.blocked_tools:
            return False
        return settings.allowed_tools is None or name in settings.allowed_tools

    def _request(self, run: RunContext, settings: _TurnSettings, model: Model) -> ModelRequest:
        return ModelRequest(
            messages=run.conversation(),
            system_prompt=settings.system_prompt,
            tools=self._tool_specs(settings),
            max_tokens=settings.max_tokens,
            model=model.name,
            session_id=self.session_id or run.session_id,
            output_schema=settings.output_schema,
            provider_params=settings.provider_params,
        )

    # ------------------------------------------------------------------ the loop

    async def _turn_loop(self, run: RunContext, model: Model, settings: _TurnSettings) -> RunResult:
        usage = Usage()
        tool_calls = 0
        turn = 0
        budget = _Budget(self.config)
        validator = (
            SchemaValidator(settings.output_schema) if settings.output_schema is not None else None
        )
        schema_attempts = 0
        while True:
            used = budget.used(turn, usage, tool_calls)
            for warning in budget.warnings(used):
                run.emit(warning)
            budget.check(used)
            turn += 1
            run.emit(ev.turn_started(turn))
            response = await self._call_model(run, model, settings, budget)
            usage = usage + response.usage
            text = response.text or ""
            if text:
                run.emit(ev.text_complete(text))
            run.emit(ev.turn_completed(response.stop_reason, response.usage))
            if not response.tool_calls:
                run.append(Message(role="assistant", content=text, usage=response.usage))
                structured: Any = None
                if validator is not None:
                    structured, errors = validator.parse(text)
                    if errors:
                        schema_attempts += 1
                        limit = settings.structured_output_retries + 1
                        run.emit(ev.structured_output_invalid(schema_attempts, limit, errors))
                        if schema_attempts >= limit:
                            raise RunFailure(
                                f"structured output invalid after {schema_attempts} "
                                f"attempt(s): {'; '.join(errors)}",
                                permanent=True,
                            )
                        run.append(
                            Message(role="system_notice", content=validator.correction(errors))
                        )
                        await self._checkpoint(run)
                        continue
                return RunResult(
                    text=text,
                    session_id=self.session_id or run.session_id,
                    usage=usage,
                    turns=turn,
                    tool_calls=tool_calls,
                    structured_output=structured,
                )
            calls = list(response.tool_calls)
            run.append(
                Message(role="assistant", content=text, tool_calls=calls, usage=response.usage)
            )
            for call in calls:
                run.emit(
                    ev.tool_call_requested(
                        call.id,
                        call.name,
                        call.arguments if call.raw_arguments is None else call.raw_arguments,
                    )
                )
            tool_calls += len(calls)
            # S6: the calls are durable before any tool runs, so a crash or cancel while one
            # runs leaves a call without a committed result, which the next boundary answers
            # as interrupted (never run again). Inputs that join here are appended after the
            # results (a call's results follow it directly); an interrupting input that
            # arrived during the model call still ends a `wait` of this batch at once.
            early = await run.checkpoint(keep_interrupt=True)
            outcomes = await self._run_batch(run, model, settings, calls)
            for call, outcome in zip(calls, outcomes, strict=True):
                run.append(
                    Message(
                        role="tool",
                        content=outcome.content,
                        tool_call_id=call.id,
                        name=call.name,
                        is_error=True if outcome.is_error else None,
                    )
                )
                run.emit(ev.tool_result_received(call.id, call.name, outcome.is_error))
            if early is not None:
                run.append(*messages_from_staged(early))
            if run.cancelled.is_set():
                raise RunCancelled()
            await self._checkpoint(run)

    async def _checkpoint(self, run: RunContext) -> None:
        joined = await run.checkpoint()
        if joined is not None:
            run.append(*messages_from_staged(joined))

    async def _call_model(
        self, run: RunContext, model: Model, settings: _TurnSettings, budget: _Budget
    ) -> ModelResponse:
        request = self._request(run, settings, model)

        def on_text(piece: str) -> None:
            run.emit(ev.text_delta(piece))

        def on_retry(attempt: int, max_attempts: int, err: ModelError, delay: float) -> None:
            run.emit(ev.retrying(attempt, max_attempts, str(err), _ms(delay), err.kind))

        _raise_if_cancelled(run)
        call = complete_with_retry(
            model, request, policy=self.config.retry, on_text=on_text, on_retry=on_retry
        )
        remaining = budget.remaining_seconds()
        try:
            if remaining is None:
                return await run.guard(call)
            return await run.guard(asyncio.wait_for(call, remaining))
        except TimeoutError:
            raise RunFailure(
                f"budget exhausted: wall_time_ms limit {budget.limits['wall_time_ms']} reached "
                "during a model call",
                permanent=True,
            ) from None
        except ModelError as err:
            raise RunFailure(
                f"model {model.name!r} failed ({err.kind}): {err}", permanent=not err.transient
            ) from err

    # ------------------------------------------------------------------ tools

    async def _run_batch(
        self, run: RunContext, model: Model, settings: _TurnSettings, calls: list[ToolCall]
    ) -> list[ToolOutcome]:
        """Run one model turn's tool calls concurrently; results in call order. A cancel
        ends every call promptly (each reports ``cancelled``)."""
        _raise_if_cancelled(run)
        return list(await asyncio.gather(*(self._run_tool(run, model, settings, c) for c in calls)))

    async def _run_tool(
        self, run: RunContext, model: Model, settings: _TurnSettings, call: ToolCall
    ) -> ToolOutcome:
        run.emit(ev.tool_execution_started(call.id, call.name))
        started = time.monotonic()
        if not self._tool_allowed(settings, call.name):
            outcome = _outcome(
                call,
                f"error: tool {call.name!r} is not available in this turn",
                "unknown_tool",
                started,
            )
        elif call.name == WAIT_TOOL_NAME:
            outcome = await self._wait_tool(run, call, started)
        elif call.name not in self.tools and isinstance(model, OfflineModel):
            outcome = await self._simulated_tool(run, model, call, started)
        else:
            outcome = await self.tools.execute(
                call, session_id=self.session_id or run.session_id, cancelled=run.cancelled
            )
        if outcome.status == "timeout":
            run.emit(ev.tool_execution_timed_out(call.id, call.name, outcome.timeout_ms or 0))
        if outcome.status == "cancelled":
            run.emit(ev.tool_execution_cancelled(call.id, call.name, outcome.duration_ms))
        else:
            run.emit(
                ev.tool_execution_completed(
                    call.id,
                    call.name,
                    outcome.content,
                    outcome.is_error,
                    outcome.duration_ms,
                    outcome.status,
                )
            )
        return outcome

    async def _wait_tool(self, run: RunContext, call: ToolCall, started: float) -> ToolOutcome:
        timeout = None if call.raw_arguments is not None else _wait_timeout(call.arguments)
        if timeout is None:
            return _outcome(
                call,
                "error: invalid arguments for tool 'wait': it takes "
                '{"timeout": <finite number of seconds, >= 0>}',
                "invalid_arguments",
                started,
            )
        try:
            result = await run.wait(timeout)
        except RunCancelled:
            return _outcome(call, "cancelled", "cancelled", started)
        return _outcome(call, result, "ok", started)

    async def _simulated_tool(
        self, run: RunContext, model: OfflineModel, call: ToolCall, started: float
    ) -> ToolOutcome:
        """A tool the offline script names but the application did not register: it takes
        the scripted duration and returns the scripted result."""
        if call.raw_arguments is not None:
            return _outcome(
                call,
                f"error: invalid arguments for tool {call.name!r}: not a JSON object: "
                f"{call.raw_arguments[:200]}",
                "invalid_arguments",
                started,
            )
        behaviour = model.tool_behaviour(call)
        if run.cancelled.is_set():
            return _outcome(call, "cancelled", "cancelled", started)
        try:
            await run.guard(asyncio.sleep(behaviour.duration))
        except RunCancelled:
            return _outcome(call, "cancelled", "cancelled", started)
        return _outcome(call, behaviour.result, "ok", started)


def _outcome(call: ToolCall, content: str, status: Any, started: float) -> ToolOutcome:
    return ToolOutcome(
        call_id=call.id,
        name=call.name,
        content=content,
        is_error=status not in ("ok",),
        status=status,
        duration_ms=_ms(time.monotonic() - started),
        timeout_ms=None,
    )
