"""In-process waiters (S12): futures keyed by input id, resolved exactly once.

Invariants: ``resolve`` removes every waiter of the id before setting results, so a waiter is
resolved at most once; a cancelled or dropped waiter is skipped silently; ``terminate_all``
resolves every remaining waiter with ``terminated`` so none hangs when the instance stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .._ids import InputId
from .outcomes import TerminatedWait, WaitOutcome

__all__ = ["CompletionRegistry"]


class CompletionRegistry:
    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        # each waiter: (future, transform applied to the outcome before delivery)
        self._waiters: dict[
            InputId, list[tuple[asyncio.Future[Any], Callable[[Any], Any] | None]]
        ] = {}

    def register(
        self, input_id: InputId, transform: Callable[[Any], Any] | None = None
    ) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(input_id, []).append((fut, transform))
        return fut

    def has(self, input_id: InputId) -> bool:
        return input_id in self._waiters

    def pending_count(self) -> int:
        return sum(len(v) for v in self._waiters.values())

    def move(self, src: InputId, dst: InputId, transform: Callable[[Any], Any]) -> None:
        """Re-home the waiters of ``src`` onto ``dst`` (a coalesced source follows its
        aggregate); ``transform`` is composed after any existing one."""
        moved = self._waiters.pop(src, [])
        if not moved:
            return
        lst = self._waiters.setdefault(dst, [])
        for fut, prev in moved:
            if prev is None:
                lst.append((fut, transform))
            else:
                lst.append((fut, _compose(prev, transform)))

    def resolve(self, input_id: InputId, outcome: WaitOutcome) -> bool:
        waiters = self._waiters.pop(input_id, None)
        if not waiters:
            return False
        for fut, transform in waiters:
            if not fut.done():
                fut.set_result(transform(outcome) if transform else outcome)
        return True

    def terminate_all(self, reason: str) -> int:
        n = 0
        waiters, self._waiters = self._waiters, {}
        for input_id, lst in waiters.items():
            for fut, transform in lst:
                if not fut.done():
                    outcome = TerminatedWait(input_id=input_id, reason=reason)
                    fut.set_result(transform(outcome) if transform else outcome)
                    n += 1
        return n


def _compose(outer: Callable[[Any], Any], inner: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def composed(outcome: Any) -> Any:
        return outer(inner(outcome))

    return composed
