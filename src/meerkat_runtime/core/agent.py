"""The built-in agent: a minimal turn loop that honours the RunContext (spec §3, S4, S16).

What ``AgentExecutor.apply`` guarantees, in order:
1. Nothing durable happens before the boundary: the model is resolved (an unknown name is a
   permanent ``RunFailure``) and a scripted ``before_boundary`` failure of the offline model is
   raised before ``commit_boundary``, so the runtime re-queues the head input (S4). Both are
   skipped for an ``immediate`` boundary, which makes no model call.
2. ``commit_boundary`` is called exactly once, before any model or tool work, with the
   primitive's appends rendered as messages (none for a continuation), preceded by a synthetic
   ``INTERRUPTED_TOOL_RESULT`` for every tool call in the conversation that has no result (a
   cancelled or crashed run's; S6), so every call is answered before the next model call and
   is never run again.
3. An ``immediate`` boundary ends there: ``apply`` returns ``None`` (a context append).
4. Otherwise at most ``max_turns`` model calls, each over ``run.conversation()``. A text answer
   is appended and ends the run. Tool calls are appended as one assistant message, run in
   order, each followed by its ``tool`` result message, then ``run.checkpoint()`` commits them;
   inputs that join there are appended and committed with the next commit.
5. Every await watches ``run.cancelled`` (through ``run.guard`` / ``run.wait``);
   ``RunCancelled`` and ``asyncio.CancelledError`` always propagate. ``ModelError`` becomes
   ``RunFailure`` (permanent unless the error is transient).

Rendering: a staged input becomes its ``appends`` in order, then its ``context_appends`` in
order. Text content is used as is, JSON content as compact JSON, a reference as
``label <uri>`` (or the bare URI). Each message records the ``input_id`` of its append.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .._json import compact
from ..llm.base import Model, ModelError, ModelRequest, ToolSpec
from ..llm.offline import WAIT_TOOL_NAME, OfflineModel, parse_script
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
        "Pause until new input interrupts the wait or `timeout` seconds pass. "
        'Returns "interrupted" or "timeout".'
    ),
    parameters={
        "type": "object",
        "properties": {"timeout": {"type": "number", "minimum": 0, "description": "seconds"}},
        "required": ["timeout"],
    },
)
"""The built-in tool the agent answers with ``RunContext.wait`` (a checkpoint follows it)."""

_ROLES: dict[ConversationAppendRole, Literal["user", "assistant", "system_notice", "tool"]] = {
    ConversationAppendRole.USER: "user",
    ConversationAppendRole.ASSISTANT: "assistant",
    ConversationAppendRole.SYSTEM_NOTICE: "system_notice",
    ConversationAppendRole.TOOL: "tool",
}


@dataclass
class AgentConfig:
    """Session-level agent settings; a run's ``turn_metadata`` may override ``model``,
    ``system_prompt`` and ``max_tokens`` for that run only.

    ``offline_script`` is validated at construction (``ValueError`` when malformed).
    """

    model: str = "offline"
    system_prompt: str | None = None
    offline_script: list[dict[str, Any]] | None = None
    max_turns: int = 50

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be at least 1, got {self.max_turns}")
        if self.offline_script is not None:
            parse_script(self.offline_script)


@dataclass(frozen=True)
class _TurnSettings:
    model: str
    system_prompt: str | None
    max_tokens: int | None


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


def _dangling_tool_results(conversation: Sequence[Message]) -> list[Message]:
    """Synthetic results for tool calls that have no result message (the run that made them
    was cancelled or the process died), in call order (S6: never re-run, always answered)."""
    answered = {m.tool_call_id for m in conversation if m.role == "tool"}
    return [
        Message(role="tool", content=INTERRUPTED_TOOL_RESULT, tool_call_id=call.id, name=call.name)
        for message in conversation
        if message.role == "assistant"
        for call in message.tool_calls
        if call.id not in answered
    ]


def _boundary_delta(run: RunContext, primitive: StagedRunInput) -> list[Message]:
    return [*_dangling_tool_results(run.conversation()), *messages_from_staged(primitive)]


def _raise_if_cancelled(run: RunContext) -> None:
    """Checked before creating a coroutine for ``run.guard``, so a run that is already
    cancelled never creates one it will not await."""
    if run.cancelled.is_set():
        raise RunCancelled()


def _model_failure(err: ModelError) -> RunFailure:
    return RunFailure(str(err), permanent=not err.transient)


def _wait_timeout(arguments: dict[str, Any]) -> float | None:
    value = arguments.get("timeout")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    timeout = float(value)
    return timeout if math.isfinite(timeout) and timeout >= 0 else None


class AgentExecutor:
    """A ``CoreExecutor`` running the turn loop described in the module docstring.

    One instance serves one session: the offline model it builds keeps its scripted failure
    counters across that session's runs. ``session_id`` is passed to the model and reported in
    the ``RunResult``. ``model`` replaces the model built from the config (its ``name`` is
    what the config or turn metadata must select).
    """

    def __init__(
        self,
        config: AgentConfig | None = None,
        *,
        session_id: str | None = None,
        model: Model | None = None,
    ) -> None:
        self.config = config if config is not None else AgentConfig()
        self.session_id = session_id
        self._model: Model | None = model
        if model is None and self.config.model == "offline":
            self._model = OfflineModel(self.config.offline_script)

    async def apply(self, run: RunContext) -> RunResult | None:
        primitive = run.primitive
        immediate = primitive.boundary == RunApplyBoundary.IMMEDIATE
        if immediate:
            await run.commit_boundary(_boundary_delta(run, primitive))
            return None
        settings = self._settings(primitive.turn_metadata)
        model = self._resolve(settings.model)
        if isinstance(model, OfflineModel):
            _raise_if_cancelled(run)
            try:
                await run.guard(model.before_boundary(self._request(run, settings)))
            except ModelError as err:
                raise _model_failure(err) from err
        await run.commit_boundary(_boundary_delta(run, primitive))
        return await self._turn_loop(run, model, settings)

    def _settings(self, meta: RuntimeTurnMetadata | None) -> _TurnSettings:
        if meta is None:
            return _TurnSettings(self.config.model, self.config.system_prompt, None)
        return _TurnSettings(
            model=meta.model if meta.model is not None else self.config.model,
            system_prompt=(
                meta.system_prompt if meta.system_prompt is not None else self.config.system_prompt
            ),
            max_tokens=meta.max_tokens,
        )

    def _resolve(self, name: str) -> Model:
        if self._model is not None and self._model.name == name:
            return self._model
        available = self._model.name if self._model is not None else "offline"
        raise RunFailure(f"unknown model {name!r}; this build has: {available}", permanent=True)

    def _request(self, run: RunContext, settings: _TurnSettings) -> ModelRequest:
        return ModelRequest(
            messages=run.conversation(),
            system_prompt=settings.system_prompt,
            tools=[WAIT_TOOL],
            max_tokens=settings.max_tokens,
            model=settings.model,
            session_id=self.session_id,
        )

    async def _turn_loop(self, run: RunContext, model: Model, settings: _TurnSettings) -> RunResult:
        usage = Usage()
        tool_calls = 0
        max_turns = self.config.max_turns
        for turn in range(1, max_turns + 1):
            _raise_if_cancelled(run)
            try:
                response = await run.guard(model.complete(self._request(run, settings)))
            except ModelError as err:
                raise _model_failure(err) from err
            usage = Usage(
                input_tokens=usage.input_tokens + response.usage.input_tokens,
                output_tokens=usage.output_tokens + response.usage.output_tokens,
            )
            if not response.tool_calls:
                text = response.text or ""
                run.append(Message(role="assistant", content=text))
                return RunResult(
                    text=text,
                    session_id=self.session_id,
                    usage=usage,
                    turns=turn,
                    tool_calls=tool_calls,
                )
            run.append(
                Message(
                    role="assistant",
                    content=response.text or "",
                    tool_calls=list(response.tool_calls),
                )
            )
            for call in response.tool_calls:
                result = await self._run_tool(run, model, call)
                run.append(
                    Message(role="tool", content=result, tool_call_id=call.id, name=call.name)
                )
                tool_calls += 1
            joined = await run.checkpoint()
            if joined is not None:
                run.append(*messages_from_staged(joined))
        raise RunFailure(
            f"max turns exceeded: {max_turns} model calls without a final answer", permanent=True
        )

    async def _run_tool(self, run: RunContext, model: Model, call: ToolCall) -> str:
        """The result text of one tool call. ``wait`` waits on the run (interrupts end it
        early); scripted offline tools sleep for their duration; anything else is unknown."""
        if call.name == WAIT_TOOL_NAME:
            timeout = _wait_timeout(call.arguments)
            if timeout is None:
                return "error: wait needs a finite, non-negative number `timeout` (seconds)"
            return await run.wait(timeout)
        if not isinstance(model, OfflineModel):
            return f"error: no tool named {call.name!r} in this build"
        behaviour = model.tool_behaviour(call)
        _raise_if_cancelled(run)
        await run.guard(asyncio.sleep(behaviour.duration))
        return behaviour.result
