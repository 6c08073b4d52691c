"""Test executors and helpers shared by the suites.

``ScriptedExecutor`` is a CoreExecutor whose behaviour per run is given by a list of steps,
so tests can make runs fail before or after their boundary, take checkpoints, wait, or hang
until cancelled. It records every run it saw (``runs``) for assertions.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from meerkat_runtime import Message, RunFailure, RunResult
from meerkat_runtime.core.lifecycle import RunContext, StagedRunInput


def messages_from(staged: StagedRunInput) -> list[Message]:
    """The conversation messages an executor appends for a staged primitive."""
    out = [
        Message(
            role="user",
            content=getattr(a.content, "text", ""),
            input_ids=[a.input_id] if a.input_id else [],
        )
        for a in staged.appends
    ]
    out += [
        Message(
            role="context",
            content=getattr(c.content, "text", ""),
            name=c.key,
            input_ids=[c.input_id] if c.input_id else [],
        )
        for c in staged.context_appends
    ]
    return out


@dataclass
class SeenRun:
    run_id: Any
    input_ids: list[Any]
    is_continuation: bool
    boundary: str
    texts: list[str]
    joined: list[list[Any]] = field(default_factory=list)
    outcome: str = "running"


class ScriptedExecutor:
    """Steps (consumed one per run, then ``default``):

    - ``"ok"``: commit boundary, return RunResult(text="done:<texts>")
    - ``"fail_before"`` / ``"fail_before_permanent"``: raise before commit_boundary
    - ``"fail_after"`` / ``"fail_after_permanent"``: commit boundary, then raise
    - ``"hang_before"``: wait for cancel without committing the boundary
    - ``"hang"``: commit boundary, then wait until cancelled (guard on a long sleep)
    - ``"checkpoint_then_ok"``: commit, wait for ``release`` event, checkpoint (append joined),
      checkpoint again, then ok
    - ``"wait"``: commit, ``run.wait(30)``, checkpoint, ok with the wait result in the text
    - ``"none"``: commit and return None (completed without result)
    """

    def __init__(self, steps: list[str] | None = None, default: str = "ok") -> None:
        self.steps = list(steps or [])
        self.default = default
        self.runs: list[SeenRun] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def apply(self, run: RunContext) -> RunResult | None:
        step = self.steps.pop(0) if self.steps else self.default
        prim = run.primitive
        msgs = messages_from(prim)
        seen = SeenRun(
            run.run_id,
            list(prim.contributing_input_ids),
            run.is_continuation,
            prim.boundary.value,
            [m.content for m in msgs],
        )
        self.runs.append(seen)
        self.started.set()
        try:
            if step.startswith("fail_before"):
                raise RunFailure("boom before boundary", permanent=step.endswith("permanent"))
            if step == "hang_before":
                await run.guard(asyncio.sleep(3600))
            await run.commit_boundary(msgs)
            if step.startswith("fail_after"):
                raise RunFailure("boom after boundary", permanent=step.endswith("permanent"))
            if step == "hang":
                await run.guard(asyncio.sleep(3600))
            if step == "checkpoint_then_ok":
                await run.guard(self.release.wait())
                joined = await run.checkpoint([Message(role="assistant", content="thinking")])
                if joined is not None:
                    seen.joined.append(list(joined.contributing_input_ids))
                    run.append(*messages_from(joined))
                joined = await run.checkpoint()
                if joined is not None:
                    seen.joined.append(list(joined.contributing_input_ids))
                    run.append(*messages_from(joined))
            if step == "wait":
                how = await run.wait(30)
                joined = await run.checkpoint()
                if joined is not None:
                    seen.joined.append(list(joined.contributing_input_ids))
                    run.append(*messages_from(joined))
                seen.outcome = "completed"
                return RunResult(text=f"wait:{how}")
            if step == "none":
                seen.outcome = "completed"
                return None
            seen.outcome = "completed"
            run.append(Message(role="assistant", content="done"))
            return RunResult(text="done:" + "|".join(seen.texts))
        except BaseException as exc:
            seen.outcome = type(exc).__name__
            raise


async def settle(rt: Any, session_id: str, timeout: float = 5.0) -> None:
    """Wait until the session's runtime has no loop task (all startable work done)."""
    sr = rt.runtime(session_id)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        await sr.wait_idle(timeout)
        await asyncio.sleep(0)
        if sr._loop_task is None:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("runtime did not settle")
