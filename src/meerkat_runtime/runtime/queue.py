"""The input queue: priority inputs ahead of fifo inputs, FIFO within each (S1).

Invariants:
- An id is in the queue at most once; ``push_back``/``push_front`` of a present id is refused.
- Iteration yields priority ids in order, then fifo ids in order.
- ``push_front`` puts ids back at the very front of their lane in the given order (a failed
  run's inputs return ahead of everything accepted after them, S4).
- ``remove`` is O(1) (a tombstone); tombstones are compacted when they outnumber live ids.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

from .._ids import InputId

__all__ = ["InputQueue"]


class InputQueue:
    __slots__ = ("_dead", "_fifo", "_live", "_prio", "_token")

    def __init__(self) -> None:
        self._prio: deque[tuple[InputId, int]] = deque()
        self._fifo: deque[tuple[InputId, int]] = deque()
        self._live: dict[InputId, tuple[int, bool]] = {}
        self._token = 0
        self._dead = 0

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, input_id: object) -> bool:
        return input_id in self._live

    def __iter__(self) -> Iterator[InputId]:
        live = self._live
        for lane in (self._prio, self._fifo):
            for iid, tok in list(lane):
                cur = live.get(iid)
                if cur is not None and cur[0] == tok:
                    yield iid

    def peek(self) -> InputId | None:
        """The id at the front (priority lane first), dropping stale tombstones on the way."""
        live = self._live
        for lane in (self._prio, self._fifo):
            while lane:
                iid, tok = lane[0]
                cur = live.get(iid)
                if cur is not None and cur[0] == tok:
                    return iid
                lane.popleft()
                self._dead -= 1
        return None

    def ids(self) -> list[InputId]:
        return list(self)

    def _add(self, input_id: InputId, priority: bool, front: bool) -> None:
        if input_id in self._live:
            raise ValueError(f"input {input_id} is already queued")
        self._token += 1
        self._live[input_id] = (self._token, priority)
        lane = self._prio if priority else self._fifo
        if front:
            lane.appendleft((input_id, self._token))
        else:
            lane.append((input_id, self._token))

    def push_back(self, input_id: InputId, priority: bool = False) -> None:
        self._add(input_id, priority, front=False)

    def push_front(self, items: Iterable[tuple[InputId, bool]]) -> None:
        for input_id, priority in reversed(list(items)):
            self._add(input_id, priority, front=True)

    def remove(self, input_id: InputId) -> bool:
        if self._live.pop(input_id, None) is None:
            return False
        self._dead += 1
        if self._dead > 64 and self._dead > len(self._live):
            self._compact()
        return True

    def clear(self) -> list[InputId]:
        ids = self.ids()
        self._prio.clear()
        self._fifo.clear()
        self._live.clear()
        self._dead = 0
        return ids

    def is_priority(self, input_id: InputId) -> bool:
        return self._live[input_id][1]

    def _compact(self) -> None:
        live = self._live
        for lane in (self._prio, self._fifo):
            kept = [(i, t) for i, t in lane if (cur := live.get(i)) is not None and cur[0] == t]
            lane.clear()
            lane.extend(kept)
        self._dead = 0
