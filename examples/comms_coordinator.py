"""Two agents talking through peer comms: a coordinator asks a worker, waits, and answers the
user with the worker's result.

Both sessions run the built-in agent on the offline model (no key, no network, a few seconds).
They have comms names, so each is offered the comms tools (``list_peers``, ``send_message``,
``send_request``, ``respond``) beside the built-in ``wait``:

- the coordinator calls ``send_request(to="worker", intent="multiply", params=...)`` (the
  request is recorded as outstanding, then delivered into the worker's durable inbox), then
  ``wait``;
- the request wakes the idle worker, which calls ``respond`` twice: ``accepted`` (a progress
  update, which never starts a run) and ``completed`` with the product (the terminal response,
  which closes the request);
- both responses join the coordinator's run at the checkpoint after its ``wait``; its model
  (here: the offline model echoing the last message) answers the user with the result.

    .venv/bin/python examples/comms_coordinator.py
    .venv/bin/python examples/comms_coordinator.py --store sqlite:///comms.db   # keep it
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from meerkat_runtime import Runtime
from meerkat_runtime.runtime.outcomes import CompletedWait

WORKER_SCRIPT: list[dict[str, Any]] = [
    {"type": "tool", "name": "respond", "args": {"status": "accepted"}},
    {
        "type": "tool",
        "name": "respond",
        "args": {"status": "completed", "result": {"product": 42}},
        "delay": 0.2,  # "thinking"
    },
    {"type": "text", "text": "Sent the product to the coordinator."},
]

# With the default policy a terminal response does not end a `wait` (it joins the run at the
# checkpoint after it), so the coordinator waits a bounded time. The script ends there: the
# offline model then echoes the last message it received, the worker's answer.
COORDINATOR_SCRIPT: list[dict[str, Any]] = [
    {"type": "tool", "name": "list_peers"},
    {
        "type": "tool",
        "name": "send_request",
        "args": {"to": "worker", "intent": "multiply", "params": {"a": 6, "b": 7}},
    },
    {"type": "wait", "timeout": 1.0},
]


async def main(store: str) -> None:
    async with Runtime.open(store) as rt:
        for old in await rt.list_sessions():  # a kept store: archiving frees the names
            if old.config.get("comms_name") in ("worker", "coordinator"):
                await rt.archive_session(old.id)
        worker = await rt.create_session(
            comms_name="worker", offline_script=WORKER_SCRIPT, labels={"role": "worker"}
        )
        coord = await rt.create_session(
            comms_name="coordinator", offline_script=COORDINATOR_SCRIPT, labels={"role": "coord"}
        )
        print("peers of the coordinator:", [p["name"] for p in await rt.peers(coord.id)])
        started = time.monotonic()
        handle = await rt.turn(coord.id, "What is 6 x 7? Ask the worker.")
        outcome = await handle.wait(30)
        assert isinstance(outcome, CompletedWait) and outcome.result is not None
        print(f"\ncoordinator's answer ({time.monotonic() - started:.1f} s):")
        print("  " + outcome.result.text)

        for name, sid in (("coordinator", coord.id), ("worker", worker.id)):
            print(f"\n{name}'s conversation:")
            for m in (await rt.history(sid)).messages:
                calls = ", ".join(f"{c.name}({c.arguments})" for c in m.tool_calls or [])
                text = m.content or calls
                label = f"{m.role}:{m.name}" if m.role == "tool" else m.role
                print(f"  {label:>22}  {text}")

        requests = await rt.store.list_peer_requests(requester_runtime_id=coord.id)
        for r in requests:
            print(f"\nrequest {r.request_id} ({r.intent}) to {r.responder_name}: {r.status}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="memory://", help="store URL (default memory://)")
    asyncio.run(main(parser.parse_args().store))
