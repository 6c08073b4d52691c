"""An agent with two application tools: the reply streams as it is written, tool calls show
as they happen, then the token usage.

Offline (the default): a scripted model calls both tools and answers; no key, no network,
a few seconds, nothing left on disk (the memory store):

    .venv/bin/python examples/agent_with_tools.py

A real model runs the very same code, without the script:

    OPENAI_API_KEY=sk-... .venv/bin/python examples/agent_with_tools.py   # gpt-4o-mini
    .venv/bin/python examples/agent_with_tools.py --model gpt-4o-mini "Weather in Oslo in F?"
    ANTHROPIC_API_KEY=... .venv/bin/python examples/agent_with_tools.py --provider anthropic
    .venv/bin/python examples/agent_with_tools.py --store sqlite:///agent.db   # keep the session
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from meerkat_runtime import Runtime
from meerkat_runtime.core.tools import ToolRegistry
from meerkat_runtime.runtime.outcomes import CompletedWait

tools = ToolRegistry()


@tools.tool
async def get_weather(city: str) -> dict[str, Any]:
    """The current weather in a city; the temperature is in degrees Celsius."""
    await asyncio.sleep(0.2)  # a real tool would call a weather service here
    return {"city": city, "celsius": 21.5, "sky": "clear"}


@tools.tool
def convert_temperature(celsius: float) -> float:
    """Convert a temperature from degrees Celsius to degrees Fahrenheit."""
    return round(celsius * 9 / 5 + 32, 1)  # sync tools run on a worker thread


# What the offline model does: two tool calls, one per model turn, then a streamed answer.
OFFLINE_SCRIPT: list[dict[str, Any]] = [
    {"type": "tool", "name": "get_weather", "args": {"city": "Lisbon"}},
    {"type": "tool", "name": "convert_temperature", "args": {"celsius": 21.5}},
    {
        "type": "text",
        "text": "It is clear in Lisbon, 21.5 °C, which is 70.7 °F.",
        "chunk_delay": 0.05,
    },
]
DEFAULT_MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-3-5-haiku-latest"}


def choose_model(model: str | None, provider: str | None) -> str:
    if model is not None:
        return model
    if provider is not None:
        return DEFAULT_MODELS.get(provider, "offline")
    return DEFAULT_MODELS["openai"] if os.environ.get("OPENAI_API_KEY") else "offline"


async def show(rt: Runtime, session_id: str, after_seq: int) -> None:
    """Print the run's agent events as they are published, until the run ends."""
    async for envelope in rt.events(session_id, after_seq, follow=True):
        data = envelope.event.get("data") or {}
        kind = data.get("type") if envelope.event["category"] == "agent" else None
        if kind == "text_delta":
            print(data["delta"], end="", flush=True)
        elif kind == "tool_call_requested":
            print(f"  -> {data['name']}({data['args']})")
        elif kind == "tool_execution_completed":
            print(f"  <- {data['name']}: {data['result']} ({data['duration_ms']} ms)")
        elif kind in ("run_completed", "run_failed"):
            print()
            return


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prompt", nargs="?", default="What is the weather in Lisbon, in Fahrenheit?")
    ap.add_argument("--model", help="offline, gpt-4o-mini, claude-..., ... (default: see above)")
    ap.add_argument("--provider", choices=["offline", "openai", "anthropic"])
    ap.add_argument("--store", default="memory://", help="memory:// or sqlite:///path.db")
    args = ap.parse_args()
    model = choose_model(args.model, args.provider)
    offline = (args.provider or ("offline" if model == "offline" else None)) == "offline"

    async with Runtime.open(args.store, tools=tools) as rt:
        session = await rt.create_session(
            model=model,
            provider=args.provider,
            system_prompt="You are a concise assistant. Use the tools; do not guess.",
            offline_script=OFFLINE_SCRIPT if offline else None,
            labels={"example": "agent_with_tools"},
            max_turns=8,
        )
        print(f"session {session.id} on {model!r}\n> {args.prompt}")
        follower = asyncio.create_task(show(rt, session.id, await rt.last_event_seq(session.id)))
        handle = await rt.turn(session.id, args.prompt)
        outcome = await handle.wait()
        await asyncio.wait_for(follower, timeout=5)  # the last events of the run
        if not isinstance(outcome, CompletedWait):
            raise SystemExit(f"the turn ended {outcome.outcome_type}: {outcome.to_json()}")
        result = outcome.result
        print(
            f"usage: {result.usage.input_tokens} tokens in, {result.usage.output_tokens} out, "
            f"{result.turns} model turns, {result.tool_calls} tool calls"
        )
        view = await rt.read_session(session.id)
        print(f"session: {view.message_count} messages, {view.total_tokens} tokens in all")


if __name__ == "__main__":
    asyncio.run(main())
