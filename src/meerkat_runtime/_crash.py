"""Crash points for the crash test kit (``meerkat crashtest``).

``MEERKAT_CRASH_AT=name:n`` makes the process kill itself with SIGKILL the ``n``-th time it
passes the point ``name`` (``n`` defaults to 1). Without the variable every call is one global
lookup, so the points cost nothing in production.

Points: ``accept.committed``, ``boundary.before``, ``boundary.after``, ``checkpoint.before``,
``checkpoint.after``, ``completion.before``, ``completion.after``, ``recovery.after``.
"""

from __future__ import annotations

import os
import signal

__all__ = ["POINTS", "crashpoint"]

POINTS = (
    "accept.committed",
    "boundary.before",
    "boundary.after",
    "checkpoint.before",
    "checkpoint.after",
    "completion.before",
    "completion.after",
    "recovery.after",
)


def _parse(spec: str | None) -> tuple[str, int] | None:
    if not spec:
        return None
    name, _, count = spec.partition(":")
    return name, int(count or "1")


_target = _parse(os.environ.get("MEERKAT_CRASH_AT"))
_seen = 0


def crashpoint(name: str) -> None:
    """Kill this process if ``name`` is the armed point and its count is reached."""
    global _seen
    if _target is None or _target[0] != name:
        return
    _seen += 1
    if _seen >= _target[1]:
        os.kill(os.getpid(), signal.SIGKILL)
