"""The in-memory store: the reference implementation of the store protocol, for tests and
throwaway runs. It keeps its own copies of everything committed (as a disk would), so what the
runtime holds in memory and what the store holds can be compared."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from .._ids import InputId, RunId
from ..core.lifecycle import RunBoundaryReceipt
from ..core.session import ConversationRow
from ..runtime.events import RuntimeEventEnvelope
from ..runtime.input_state import InputState
from ..runtime.state import RuntimeState
from .base import RunRecord, Txn

__all__ = ["MemoryStore"]


class MemoryStore:
    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self.input_states: dict[str, dict[InputId, InputState]] = defaultdict(dict)
        self.conversations: dict[str, list[ConversationRow]] = defaultdict(list)
        self.receipts: dict[tuple[str, RunId, int], RunBoundaryReceipt] = {}
        self.runs: dict[RunId, RunRecord] = {}
        self.runtime_states: dict[str, RuntimeState] = {}
        self.events: dict[str, list[RuntimeEventEnvelope]] = defaultdict(list)
        self.commits = 0
        self.fail_next: BaseException | None = None  # fault injection for tests
        self._done: asyncio.Future[None] | None = None

    def submit(self, txn: Txn) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            fut.set_exception(exc)
            return fut
        rid = txn.runtime_id
        states = self.input_states[rid]
        for sid, st in txn.states.items():
            states[sid] = st.clone()
        if txn.conversation_reset:
            self.conversations[rid] = []
        if txn.rows:
            self.conversations[rid].extend(txn.rows)
        for r in txn.receipts:
            self.receipts[(rid, r.run_id, r.sequence)] = r
        for run in txn.runs:
            self.runs[run.run_id] = RunRecord(
                run.run_id, run.runtime_id, run.status, run.result, run.error, run.is_continuation
            )
        if txn.runtime_state is not None and txn.runtime_state is not RuntimeState.STOPPED:
            self.runtime_states[rid] = txn.runtime_state
        if txn.events:
            self.events[rid].extend(txn.events)
        self.commits += 1
        fut.set_result(None)
        return fut

    async def close(self) -> None:
        return None

    def snapshot(self, runtime_id: str) -> dict[str, Any]:
        """A plain view of one runtime's stored rows (for tests and debugging)."""
        return {
            "input_states": {
                str(k): v.to_json_dict() for k, v in self.input_states[runtime_id].items()
            },
            "conversation": [r.message.to_json_dict() for r in self.conversations[runtime_id]],
            "runtime_state": self.runtime_states.get(runtime_id),
        }
