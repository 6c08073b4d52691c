"""The store protocol and the transaction the runtime hands to it.

A ``Txn`` is everything one runtime change writes: changed input states, conversation rows,
receipts, run records, the runtime state and the events that report the change (S6, S15).
``RuntimeStore.submit`` takes transactions in order; the returned awaitable completes once the
transaction is durable (for the memory store: at once). Commit order equals submission order,
so a later transaction never becomes durable before an earlier one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .._ids import InputId, RunId
from ..core.lifecycle import RunBoundaryReceipt, RunResult
from ..core.session import ConversationRow
from ..runtime.events import RuntimeEventEnvelope
from ..runtime.input_state import InputState
from ..runtime.state import RuntimeState

__all__ = ["RunRecord", "RuntimeStore", "StoreError", "Txn"]


class StoreError(RuntimeError):
    """A store could not do what was asked; the message names the store and the problem."""


@dataclass(slots=True)
class RunRecord:
    """How a run ended: ``running`` until it ends, then completed / failed / cancelled."""

    run_id: RunId
    runtime_id: str
    status: str = "running"
    result: RunResult | None = None
    error: str | None = None
    is_continuation: bool = False


@dataclass(slots=True)
class Txn:
    runtime_id: str
    generation: int
    durable: bool = False
    states: dict[InputId, InputState] = field(default_factory=dict)
    rows: list[ConversationRow] = field(default_factory=list)
    conversation_reset: bool = False
    receipts: list[RunBoundaryReceipt] = field(default_factory=list)
    runs: list[RunRecord] = field(default_factory=list)
    runtime_state: RuntimeState | None = None
    events: list[RuntimeEventEnvelope] = field(default_factory=list)
    after_commit: list[Callable[[], Any]] = field(default_factory=list)

    def touch(self, state: InputState) -> None:
        self.states[state.input_id] = state

    @property
    def empty(self) -> bool:
        return not (
            self.states
            or self.rows
            or self.conversation_reset
            or self.receipts
            or self.runs
            or self.runtime_state is not None
            or self.events
        )


class RuntimeStore(Protocol):
    url: str

    def submit(self, txn: Txn) -> Awaitable[None]:
        """Queue ``txn`` for commit (atomic: all or nothing); await the result for durability.

        Called synchronously from the event loop thread; must not block.
        """
        ...

    async def close(self) -> None: ...
