"""The built-in offline model: deterministic answers, no network.

Without a script (or once the script is used up) it echoes the last user message. With a
script it plays a linear sequence of model calls for the whole session, so tests and demos can
stage tool calls, waits, latency and failures.

Script semantics (the invariants tests rely on):
- The **cursor** is the number of assistant messages in ``request.messages``. Each successful
  call yields exactly one assistant message, so the cursor advances by one per answer, is a pure
  function of the conversation, and survives restarts and continuations.
- ``text``, ``tool`` and ``wait`` steps are **answers**: the cursor selects the cursor-th answer
  of the script (``fail`` steps not counted).
- ``fail`` steps belong to the answer that follows them (trailing ones to the default echo
  after the script). Each fails the first ``times`` times it is reached for a session, counted
  in memory by this ``OfflineModel`` instance and keyed by ``(request.session_id, step
  index)``; afterwards it is passed over. Counters are not persisted: a new instance (e.g. after
  a restart) fails again.
- A ``fail`` step with phase ``"model"`` fires in ``complete``; one with phase
  ``"before_boundary"`` fires only in ``before_boundary``, which the agent calls before it
  commits a run's boundary (a ``complete`` call passes over it). ``before_boundary`` fires
  only when such a step is the first of its group with failures left.
- A ``tool`` or ``wait`` answer at cursor ``c`` is one tool call with id ``call_<c>``; a
  ``tools`` answer is a batch of calls ``call_<c>_<i>``. The simulated duration and result of
  a scripted call are looked up from its id with ``tool_behaviour`` (they never appear in the
  conversation); the agent uses them only for names it has no registered tool for.
- Text answers are streamed to ``on_text`` word by word (``chunk_delay`` between pieces).
- ``delay`` (seconds) is waited with ``asyncio.sleep`` before answering or failing, so it never
  blocks the event loop and is cancellable; a cancelled call counts no failure.
- Usage is a deterministic estimate: whitespace-separated words in, words out.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .._json import compact
from ..core.lifecycle import Message, ToolCall, Usage
from .base import ModelError, ModelRequest, ModelResponse, TextSink

__all__ = [
    "FailStep",
    "OfflineModel",
    "ScriptStep",
    "TextStep",
    "ToolBehaviour",
    "ToolCallSpec",
    "ToolStep",
    "ToolsStep",
    "WaitStep",
    "parse_script",
]

WAIT_TOOL_NAME = "wait"
"""The built-in tool a ``wait`` step calls; the agent answers it with ``RunContext.wait``."""


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    delay: float = Field(default=0.0, ge=0)


class TextStep(_Step):
    """A final text answer, streamed word by word with ``chunk_delay`` seconds between
    pieces."""

    type: Literal["text"]
    text: str
    chunk_delay: float = Field(default=0.0, ge=0)


class ToolCallSpec(BaseModel):
    """One scripted tool call. When the agent has no tool of that name registered it
    simulates the call for ``duration`` seconds and reads ``result``. ``raw_args`` plays a
    model that sent arguments that are not a JSON object (the call carries them as
    ``raw_arguments``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(min_length=1)
    args: dict[str, Any] = Field(default_factory=dict)
    raw_args: str | None = None
    duration: float = Field(default=0.0, ge=0)
    result: str = "ok"


class ToolStep(_Step, ToolCallSpec):
    """One tool call (see ``ToolCallSpec``)."""

    type: Literal["tool"]


class ToolsStep(_Step):
    """Several tool calls in one answer (a parallel batch); each item is a ``tool`` step
    without ``type``. Call ids are ``call_<cursor>_<index>``."""

    type: Literal["tools"]
    calls: list[ToolCallSpec] = Field(min_length=1)


class WaitStep(_Step):
    """A call to the built-in ``wait`` tool with ``{"timeout": timeout}``."""

    type: Literal["wait"]
    timeout: float = Field(default=5.0, ge=0)


class FailStep(_Step):
    """A failing call: ``ModelError(error, transient=not permanent)`` of kind ``scripted``,
    ``times`` times."""

    type: Literal["fail"]
    error: str = "offline model: scripted failure"
    permanent: bool = False
    times: int = Field(default=1, ge=1)
    phase: Literal["model", "before_boundary"] = "model"


ScriptStep = Annotated[
    TextStep | ToolStep | ToolsStep | WaitStep | FailStep, Field(discriminator="type")
]
_AnswerStep = TextStep | ToolStep | ToolsStep | WaitStep

_STEP_TYPES: dict[str, type[_Step]] = {
    "text": TextStep,
    "tool": ToolStep,
    "tools": ToolsStep,
    "wait": WaitStep,
    "fail": FailStep,
}
_STEP_ADAPTER: TypeAdapter[ScriptStep] = TypeAdapter(ScriptStep)
_CALL_ID = re.compile(r"call_(\d+)(?:_(\d+))?")


class ToolBehaviour(NamedTuple):
    """How the agent simulates one scripted tool call."""

    duration: float
    result: str


def _step_signature(name: str, cls: type[_Step]) -> str:
    fields = [
        f if info.is_required() else f"{f}?"
        for f, info in cls.model_fields.items()
        if f not in ("type", "delay")
    ]
    return f"{name}{{{', '.join(fields)}}}"


_ACCEPTED = "accepted step types: {}; every step also takes delay? (seconds)".format(
    ", ".join(_step_signature(n, c) for n, c in _STEP_TYPES.items())
)


def _step_error(index: int, problem: str) -> ValueError:
    return ValueError(f"offline script[{index}]: {problem} ({_ACCEPTED})")


def parse_script(script: str | Sequence[Mapping[str, Any]]) -> list[ScriptStep]:
    """Validate a script (a JSON text or a list of step objects).

    Raises ``ValueError`` naming the first bad step by its list index, what is wrong with it,
    and the accepted step types with their fields.
    """
    raw: Any = script
    if isinstance(script, str):
        try:
            raw = json.loads(script)
        except json.JSONDecodeError as err:
            raise ValueError(f"offline script is not valid JSON: {err}") from err
    if not isinstance(raw, Sequence) or isinstance(raw, str | bytes):
        raise ValueError(f"offline script must be a list of step objects, got {type(raw).__name__}")
    steps: list[ScriptStep] = []
    for index, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise _step_error(index, f"expected an object, got {type(item).__name__}")
        kind = item.get("type")
        if not isinstance(kind, str) or kind not in _STEP_TYPES:
            problem = 'missing "type"' if kind is None else f"unknown step type {kind!r}"
            raise _step_error(index, problem)
        try:
            steps.append(_STEP_ADAPTER.validate_python(dict(item)))
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'][1:]) or '(step)'}: {e['msg']}"
                for e in err.errors()
            )
            raise _step_error(index, f"invalid {kind!r} step: {problems}") from None
    return steps


@dataclass(frozen=True)
class _Slot:
    """One answer of the script and the fail steps (with their indexes) that precede it."""

    fails: tuple[tuple[int, FailStep], ...] = ()
    answer: _AnswerStep | None = None


def _plan(steps: Sequence[ScriptStep]) -> list[_Slot]:
    slots: list[_Slot] = []
    fails: list[tuple[int, FailStep]] = []
    for index, step in enumerate(steps):
        if isinstance(step, FailStep):
            fails.append((index, step))
        else:
            slots.append(_Slot(tuple(fails), step))
            fails = []
    if fails:
        slots.append(_Slot(tuple(fails), None))
    return slots


def _cursor(messages: Sequence[Message]) -> int:
    return sum(1 for m in messages if m.role == "assistant")


def _words(text: str | None) -> int:
    return len(text.split()) if text else 0


def _input_tokens(request: ModelRequest) -> int:
    return _words(request.system_prompt) + sum(_words(m.content) for m in request.messages)


def _echo_text(messages: Sequence[Message]) -> str:
    n = len(messages)
    for message in reversed(messages):
        if message.role == "user":
            return f'offline model: you said "{message.content}" ({n} messages in the conversation)'
    return f"offline model: nothing to answer ({n} messages in the conversation)"


class OfflineModel:
    """A deterministic ``Model`` driven by an optional script (see the module docstring)."""

    def __init__(
        self, script: str | Sequence[Mapping[str, Any]] | None = None, *, name: str = "offline"
    ) -> None:
        self.name = name
        self.steps: tuple[ScriptStep, ...] = (
            tuple(parse_script(script)) if script is not None else ()
        )
        self._slots = _plan(self.steps)
        self._answers = [s.answer for s in self._slots if s.answer is not None]
        self._failures: dict[tuple[str | None, int], int] = {}

    def failures(self, session_id: str | None, step_index: int) -> int:
        """How many times the fail step at ``step_index`` has fired for ``session_id``."""
        return self._failures.get((session_id, step_index), 0)

    async def complete(
        self, request: ModelRequest, *, on_text: TextSink | None = None
    ) -> ModelResponse:
        cursor = _cursor(request.messages)
        slot = self._slot(cursor)
        for index, step in slot.fails:
            if step.phase == "model" and self._has_failures_left(request.session_id, index, step):
                await self._fail(request.session_id, index, step)
        answer = slot.answer
        if answer is None:
            text = _echo_text(request.messages)
            await _stream(text, 0.0, on_text)
            return ModelResponse(
                text=text,
                tool_calls=[],
                usage=Usage(input_tokens=_input_tokens(request), output_tokens=_words(text)),
                stop_reason="end_turn",
            )
        if answer.delay > 0:
            await asyncio.sleep(answer.delay)
        if isinstance(answer, TextStep):
            await _stream(answer.text, answer.chunk_delay, on_text)
        return self._respond(answer, cursor, request)

    async def before_boundary(self, request: ModelRequest) -> None:
        """Raise ``ModelError`` if the first fail step with failures left at the cursor of
        ``request.messages`` has phase ``before_boundary``; otherwise return at once."""
        for index, step in self._slot(_cursor(request.messages)).fails:
            if self._has_failures_left(request.session_id, index, step):
                if step.phase == "before_boundary":
                    await self._fail(request.session_id, index, step)
                return

    def tool_behaviour(self, call: ToolCall) -> ToolBehaviour:
        """Duration and result of a tool call this model made; ``(0.0, "ok")`` for a call it
        did not script (unknown id or a name that does not match the step)."""
        match = _CALL_ID.fullmatch(call.id)
        if match is not None:
            position = int(match.group(1))
            if position < len(self._answers):
                step = self._answers[position]
                spec: ToolCallSpec | None = None
                if isinstance(step, ToolStep) and match.group(2) is None:
                    spec = step
                elif isinstance(step, ToolsStep) and match.group(2) is not None:
                    index = int(match.group(2))
                    spec = step.calls[index] if index < len(step.calls) else None
                if spec is not None and spec.name == call.name:
                    return ToolBehaviour(spec.duration, spec.result)
        return ToolBehaviour(0.0, "ok")

    def _slot(self, cursor: int) -> _Slot:
        return self._slots[cursor] if cursor < len(self._slots) else _Slot()

    def _has_failures_left(self, session_id: str | None, index: int, step: FailStep) -> bool:
        return self.failures(session_id, index) < step.times

    async def _fail(self, session_id: str | None, index: int, step: FailStep) -> None:
        if step.delay > 0:
            await asyncio.sleep(step.delay)
        key = (session_id, index)
        self._failures[key] = self._failures.get(key, 0) + 1
        raise ModelError(step.error, transient=not step.permanent, kind="scripted")

    def _respond(self, step: _AnswerStep, cursor: int, request: ModelRequest) -> ModelResponse:
        input_tokens = _input_tokens(request)
        if isinstance(step, TextStep):
            return ModelResponse(
                text=step.text,
                tool_calls=[],
                usage=Usage(input_tokens=input_tokens, output_tokens=_words(step.text)),
                stop_reason="end_turn",
            )
        if isinstance(step, ToolStep):
            calls = [_call(f"call_{cursor}", step)]
        elif isinstance(step, ToolsStep):
            calls = [_call(f"call_{cursor}_{i}", spec) for i, spec in enumerate(step.calls)]
        else:
            calls = [
                ToolCall(
                    id=f"call_{cursor}", name=WAIT_TOOL_NAME, arguments={"timeout": step.timeout}
                )
            ]
        out_tokens = sum(1 + _words(c.raw_arguments or compact(c.arguments)) for c in calls)
        return ModelResponse(
            text=None,
            tool_calls=calls,
            usage=Usage(input_tokens=input_tokens, output_tokens=out_tokens),
            stop_reason="tool_use",
        )


def _call(call_id: str, spec: ToolCallSpec) -> ToolCall:
    if spec.raw_args is not None:
        return ToolCall(id=call_id, name=spec.name, raw_arguments=spec.raw_args)
    return ToolCall(id=call_id, name=spec.name, arguments=copy.deepcopy(spec.args))


async def _stream(text: str, chunk_delay: float, on_text: TextSink | None) -> None:
    """Hand ``text`` to ``on_text`` in word-sized pieces (whitespace kept with the word that
    follows it), sleeping ``chunk_delay`` seconds before each piece after the first."""
    if on_text is None or not text:
        return
    for i, piece in enumerate(re.findall(r"\s*\S+|\s+$", text)):
        if i and chunk_delay > 0:
            await asyncio.sleep(chunk_delay)
        on_text(piece)
