"""The runtime state machine (reference-runtime.md §1, plus ``recovering`` in use, S7).

Invariants: only the listed transitions are legal and self-transitions never are; ``stopped``
and ``destroyed`` are terminal. ``stopped`` is an in-process state only: it is never written to
a store (S8), so the next open recovers normally.
"""

from __future__ import annotations

import enum

__all__ = ["RuntimeState", "RuntimeStateTransitionError", "can_transition"]


class RuntimeState(enum.StrEnum):
    INITIALIZING = "initializing"
    IDLE = "idle"
    RUNNING = "running"
    RECOVERING = "recovering"
    RETIRED = "retired"
    STOPPED = "stopped"
    DESTROYED = "destroyed"

    @property
    def is_terminal(self) -> bool:
        return self in (RuntimeState.STOPPED, RuntimeState.DESTROYED)

    @property
    def can_accept_input(self) -> bool:
        return self in (RuntimeState.IDLE, RuntimeState.RUNNING)

    @property
    def can_process_queue(self) -> bool:
        return self in (RuntimeState.IDLE, RuntimeState.RETIRED)


R = RuntimeState
_ALLOWED: dict[RuntimeState, frozenset[RuntimeState]] = {
    R.INITIALIZING: frozenset({R.IDLE, R.STOPPED, R.DESTROYED, R.RECOVERING}),
    R.IDLE: frozenset({R.RUNNING, R.RETIRED, R.RECOVERING, R.STOPPED, R.DESTROYED}),
    R.RUNNING: frozenset({R.IDLE, R.RECOVERING, R.RETIRED, R.STOPPED, R.DESTROYED}),
    R.RECOVERING: frozenset({R.IDLE, R.RUNNING, R.STOPPED, R.DESTROYED, R.RETIRED}),
    # retired -> idle is our addition: reset and respawn revive a retired runtime (S9).
    R.RETIRED: frozenset({R.RUNNING, R.STOPPED, R.DESTROYED, R.IDLE, R.RECOVERING}),
    R.STOPPED: frozenset(),
    R.DESTROYED: frozenset(),
}


def can_transition(src: RuntimeState, dst: RuntimeState) -> bool:
    return dst in _ALLOWED[src]


class RuntimeStateTransitionError(RuntimeError):
    def __init__(self, src: RuntimeState, dst: RuntimeState) -> None:
        super().__init__(f"Invalid runtime state transition: {src.value} -> {dst.value}")
        self.src = src
        self.dst = dst
