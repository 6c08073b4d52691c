"""Bring your own agent: any object with ``async def apply(run)`` is a CoreExecutor.

Run: python examples/own_executor.py
"""

from __future__ import annotations

import asyncio

from meerkat_runtime import Message, PromptInput, RunContext, RunResult, Runtime


class Shouter:
    """Commits the user's words at the boundary, then answers them in capitals."""

    async def apply(self, run: RunContext) -> RunResult | None:
        said = [a.content.text for a in run.primitive.appends if a.content.type == "text"]
        user = [Message(role="user", content=t) for t in said]
        await run.commit_boundary(user)  # spec S6: before any model or tool work
        answer = " ".join(said).upper()
        run.append(Message(role="assistant", content=answer))  # committed at completion
        return RunResult(text=answer)


async def main() -> None:
    async with Runtime.open("memory://") as rt:
        session = await rt.create_session(executor=Shouter())
        handle = await rt.accept_with_completion(session.id, PromptInput.new("hello there"))
        outcome = await handle.wait()
        print(outcome.to_json())
        async for event in rt.events(session.id):
            print(event.seq, event.code)


if __name__ == "__main__":
    asyncio.run(main())
