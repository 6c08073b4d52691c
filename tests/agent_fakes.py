"""Fakes for testing ``AgentExecutor`` without a runtime.

``FakeRun`` is an in-memory ``RunContext`` (it records boundary deltas, checkpoint commits,
events and a ``log`` of what happened in order); ``SpyModel`` is an ``OfflineModel`` that
records its requests; ``ScriptedModel`` is a non-offline ``Model`` that plays a list of
responses and errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Sequence
from typing import Any, Literal, TypeVar

from meerkat_runtime._ids import InputId, RunId
from meerkat_runtime.core.lifecycle import (
    ConversationAppend,
    ConversationAppendRole,
    Message,
    RunApplyBoundary,
    RunBoundaryReceipt,
    RunCancelled,
    StagedInput,
    StagedRunInput,
    TextRenderable,
    ToolCall,
    Usage,
)
from meerkat_runtime.llm.base import ModelRequest, ModelResponse, TextSink
from meerkat_runtime.llm.offline import OfflineModel

__all__ = [
    "FakeRun",
    "ScriptedModel",
    "SpyModel",
    "prompt",
    "text_response",
    "tool_response",
]

T = TypeVar("T")


class FakeRun:
    """An in-memory RunContext. ``log`` records boundary, checkpoint, wait and (through
    ``SpyModel``) model events in order; ``joins`` are returned by successive checkpoints;
    ``events`` are what the agent emitted."""

    def __init__(
        self,
        primitive: StagedInput,
        *,
        history: Sequence[Message] = (),
        joins: Sequence[StagedRunInput | None] = (),
        log: list[str] | None = None,
    ) -> None:
        self.run_id = RunId.new()
        self.session_id = "fake-session"
        self.primitive = primitive
        self.is_continuation = not primitive.appends and not primitive.contributing_input_ids
        self.cancelled = asyncio.Event()
        self.interrupt = asyncio.Event()
        self.committed: list[Message] = list(history)
        self.pending: list[Message] = []
        self.log = log if log is not None else []
        self.boundary_deltas: list[list[Message]] = []
        self.checkpoint_commits: list[list[Message]] = []
        self._joins = list(joins)
        self.events: list[dict[str, Any]] = []

    async def commit_boundary(self, delta: Sequence[Message] = ()) -> RunBoundaryReceipt:
        self.log.append("boundary")
        self.boundary_deltas.append(list(delta))
        self.committed.extend([*self.pending, *delta])
        self.pending.clear()
        return RunBoundaryReceipt(
            run_id=self.run_id,
            boundary=self.primitive.boundary,
            contributing_input_ids=list(self.primitive.contributing_input_ids),
            message_count=len(self.committed),
        )

    async def checkpoint(
        self, delta: Sequence[Message] = (), *, keep_interrupt: bool = False
    ) -> StagedRunInput | None:
        self.log.append("checkpoint")
        batch = [*self.pending, *delta]
        self.checkpoint_commits.append(batch)
        self.committed.extend(batch)
        self.pending.clear()
        return self._joins.pop(0) if self._joins else None

    def append(self, *messages: Message) -> None:
        self.pending.extend(messages)

    def emit(self, event: Any) -> None:
        self.events.append(dict(event))

    def conversation(self) -> list[Message]:
        return [*self.committed, *self.pending]

    async def wait(self, timeout: float) -> Literal["interrupted", "timeout"]:
        self.log.append(f"wait:{timeout}")
        tasks = [
            asyncio.create_task(self.interrupt.wait()),
            asyncio.create_task(self.cancelled.wait()),
        ]
        try:
            await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
        if self.cancelled.is_set():
            raise RunCancelled()
        if self.interrupt.is_set():
            self.interrupt.clear()
            return "interrupted"
        return "timeout"

    async def guard(self, awaitable: Awaitable[T]) -> T:
        work = asyncio.ensure_future(awaitable)
        watcher = asyncio.create_task(self.cancelled.wait())
        try:
            await asyncio.wait([work, watcher], return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                return work.result()
            raise RunCancelled()
        finally:
            watcher.cancel()
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work

    # -- helpers for assertions ------------------------------------------------------------

    def types(self) -> list[str]:
        """The types of the emitted events, in order."""
        return [str(e["type"]) for e in self.events]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        """The emitted events of one type, in order."""
        return [e for e in self.events if e["type"] == kind]


class SpyModel(OfflineModel):
    """An OfflineModel that records each request and logs each call with how many messages
    were committed by then (``model:committed=N``)."""

    def __init__(self, script: Any, log: list[str], run: list[FakeRun]) -> None:
        super().__init__(script)
        self.log = log
        self.run = run
        self.requests: list[ModelRequest] = []

    async def complete(
        self, request: ModelRequest, *, on_text: TextSink | None = None
    ) -> ModelResponse:
        self.requests.append(request)
        self.log.append(f"model:committed={len(self.run[0].committed)}")
        return await super().complete(request, on_text=on_text)


ScriptedStep = ModelResponse | Exception


class ScriptedModel:
    """A non-offline ``Model``: each call pops the next step, raising it when it is an
    exception, else streaming its text word by word and returning it. Records requests."""

    def __init__(self, steps: Sequence[ScriptedStep], *, name: str = "gpt-test") -> None:
        self.name = name
        self.steps = list(steps)
        self.requests: list[ModelRequest] = []

    async def complete(
        self, request: ModelRequest, *, on_text: TextSink | None = None
    ) -> ModelResponse:
        self.requests.append(request)
        if not self.steps:
            raise AssertionError("ScriptedModel: no steps left")
        step = self.steps.pop(0)
        if isinstance(step, Exception):
            raise step
        if step.text and on_text is not None:
            for piece in re.findall(r"\s*\S+", step.text):
                on_text(piece)
        return step


def text_response(text: str, usage: Usage | None = None) -> ModelResponse:
    return ModelResponse(
        text=text,
        tool_calls=[],
        usage=usage or Usage(input_tokens=10, output_tokens=len(text.split())),
        stop_reason="end_turn",
    )


def tool_response(*calls: ToolCall, usage: Usage | None = None) -> ModelResponse:
    return ModelResponse(
        text=None,
        tool_calls=list(calls),
        usage=usage or Usage(input_tokens=10, output_tokens=5),
        stop_reason="tool_use",
    )


def prompt(text: str, input_id: InputId | None = None, **kw: Any) -> StagedInput:
    """A run-start primitive with one user append (``kw``: e.g. ``turn_metadata``)."""
    ids = [input_id] if input_id is not None else []
    return StagedInput(
        boundary=RunApplyBoundary.RUN_START,
        appends=[
            ConversationAppend(
                role=ConversationAppendRole.USER,
                content=TextRenderable(text=text),
                input_id=input_id,
            )
        ],
        contributing_input_ids=ids,
        **kw,
    )
