"""The failover tests' real tool (``meerkat worker --tools tests.failover.tools:registry``).

``lookup(q)`` appends one JSON line ``{"session", "call_id", "tool", "pid", "at"}`` to the
side-effect log named by ``$MEERKAT_FAILOVER_TOOL_LOG`` (one ``write``, ``fsync``-ed) *before*
it does its work, then takes ``$MEERKAT_FAILOVER_TOOL_SECONDS`` (default 0.3) seconds, so runs
are in flight when a worker is killed, stopped or cut off. The line format is the crash kit's
(``meerkat_runtime.crashtest.read_tool_log``) and the tool's name is one of its ``KIT_TOOLS``,
so the kit's check (e) (no tool call executed twice) applies to these logs unchanged.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from meerkat_runtime.core.tools import ToolContext, ToolRegistry

__all__ = ["LOG_ENV", "SECONDS_ENV", "TOOL_NAME", "registry"]

LOG_ENV = "MEERKAT_FAILOVER_TOOL_LOG"
SECONDS_ENV = "MEERKAT_FAILOVER_TOOL_SECONDS"
TOOL_NAME = "lookup"


def _log_execution(context: ToolContext) -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        raise RuntimeError(f"{LOG_ENV} is not set: the side-effect log is required")
    doc = {
        "session": context.session_id,
        "call_id": context.call_id,
        "tool": TOOL_NAME,
        "pid": os.getpid(),
        "at": time.time(),
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (json.dumps(doc, separators=(",", ":")) + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


async def lookup(q: int, context: ToolContext) -> str:
    """Look ``q`` up: logs the execution durably first, then takes a while."""
    _log_execution(context)
    await asyncio.sleep(float(os.environ.get(SECONDS_ENV, "0.3")))
    return f"looked up {q}"


registry = ToolRegistry()
registry.register(lookup)
