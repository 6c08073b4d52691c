"""``meerkat runtime ...`` (a session's runtime: state and lifecycle control) and
``meerkat events``.

- ``runtime state`` and ``events`` only read the store: they never take a session over from
  the process running it. ``events`` therefore shows what is stored; text deltas live only in
  the memory of the process running the session (``meerkat run``/``send`` stream them), so
  they appear here only when that process is this one.
- The control commands (``retire``, ``respawn``, ``reset``, ``destroy``, ``cancel``,
  ``recover``) run in the session's owner: when no other process owns the session this one
  loads (and so recovers) it first; when another one does, they fail with a conflict (exit 2)
  naming the way out.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Annotated

import typer
from rich.markup import escape

from ._cli_common import (
    EXIT_OK,
    EXIT_RUN_FAILED,
    EXIT_USAGE,
    JsonOpt,
    StoreOpt,
    err,
    execute,
    fail,
    open_runtime,
    print_json,
    short,
    spinner,
    write_line,
)
from ._time import utcnow
from .host import Runtime
from .runtime.events import RuntimeEventEnvelope
from .surfaces.common import SurfaceError

__all__ = ["EventPrinter", "events", "runtime_app"]

runtime_app = typer.Typer(
    name="runtime",
    help="A session's runtime: its state, and lifecycle control (retire, respawn, reset, "
    "destroy, recover, cancel the running turn).",
    no_args_is_help=True,
)

SessionArg = Annotated[str, typer.Argument(metavar="SESSION", help="The session's id.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


# ------------------------------------------------------------------ state


@runtime_app.command("state")
def state(session: SessionArg, store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Print the runtime's state: idle, running, retired or destroyed.

    Who runs the session now and how many inputs are pending go to stderr (with --json,
    into the object)."""
    execute(_state(session, store, as_json), as_json=as_json)


async def _state(session: str, store: str | None, as_json: bool) -> int:
    async with open_runtime(store) as rt:
        await rt.get_session(session)
        loaded = await rt.store.load_runtime(session)
        inbox = await rt.store.inbox_entries(session, limit=100_000)
        owner, expiry, generation = await rt.store.lease_owner(session)
    live = owner is not None and expiry is not None and expiry > time.time()
    value = loaded.state.value if loaded.state is not None else "idle"
    pending = len(loaded.inputs) + len(inbox)
    if as_json:
        print_json(
            {
                "session_id": session,
                "state": value,
                "owner": owner if live else None,
                "generation": generation,
                "pending_inputs": pending,
            }
        )
        return EXIT_OK
    write_line(value)
    who = f"run by {owner}" if live else "not loaded by any process"
    if not live and value == "running":
        who += " (it stopped during a run; the next process to load it recovers it)"
    err.print(f"[dim]{escape(who)} · {pending} pending inputs[/]", highlight=False)
    return EXIT_OK


# ------------------------------------------------------------------ control


def _confirm(question: str) -> None:
    if not sys.stdin.isatty():
        raise fail(f"{question} Pass --yes to confirm (stdin is not a terminal).", EXIT_USAGE)
    if not typer.confirm(question, default=False, err=True):
        raise fail("not confirmed; nothing was changed", EXIT_RUN_FAILED)


async def _control(
    session: str,
    store: str | None,
    as_json: bool,
    action: Callable[[Runtime], Awaitable[dict[str, object]]],
    done: str,
    *,
    confirm: str | None = None,
    human: Callable[[dict[str, object]], str] | None = None,
) -> int:
    async with open_runtime(store) as rt:
        await rt.get_session(session)
        if confirm is not None:
            _confirm(confirm)
        with spinner(f"{done.split()[0]}…", enabled=not as_json):
            report = await action(rt)
    if as_json:
        print_json({"session_id": session, **report})
    elif human is not None:
        write_line(human(report))
    else:
        details = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in report.items())
        write_line(f"{done} {session}" + (f" ({details})" if details else ""))
    return EXIT_OK


@runtime_app.command("retire")
def retire(
    session: SessionArg,
    replacement_planned: Annotated[
        bool,
        typer.Option(
            "--replacement-planned",
            help="Keep the pending inputs for a replacement (respawn) instead of abandoning them.",
        ),
    ] = False,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Retire the runtime: it accepts nothing new.

    Queued inputs are abandoned (retired) unless --replacement-planned; the running one
    finishes."""

    async def action(rt: Runtime) -> dict[str, object]:
        return dict(await rt.retire(session, replacement_planned=replacement_planned))

    execute(_control(session, store, as_json, action, "retired"), as_json=as_json)


@runtime_app.command("respawn")
def respawn(session: SessionArg, store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Replace the runtime instance once its running turn ends.

    Durable pending inputs are kept, ephemeral ones dropped."""

    async def action(rt: Runtime) -> dict[str, object]:
        return dict(await rt.respawn(session))

    execute(_control(session, store, as_json, action, "respawned"), as_json=as_json)


@runtime_app.command("reset")
def reset(
    session: SessionArg, yes: YesOpt = False, store: StoreOpt = None, as_json: JsonOpt = False
) -> None:
    """Reset the session: abandon its inputs, clear its conversation.

    Cancels the running turn, abandons every pending input (reset) and clears the
    conversation; the runtime is idle again. Asks first unless --yes."""

    async def action(rt: Runtime) -> dict[str, object]:
        return dict(await rt.reset(session))

    question = None if yes else f"Reset session {session}? Its conversation is cleared."
    execute(_control(session, store, as_json, action, "reset", confirm=question), as_json=as_json)


@runtime_app.command("destroy")
def destroy(
    session: SessionArg, yes: YesOpt = False, store: StoreOpt = None, as_json: JsonOpt = False
) -> None:
    """Destroy the runtime for good.

    Cancels the running turn and abandons every pending input (destroyed). Asks first
    unless --yes."""

    async def action(rt: Runtime) -> dict[str, object]:
        return dict(await rt.destroy(session))

    question = None if yes else f"Destroy session {session}'s runtime? This cannot be undone."
    execute(
        _control(session, store, as_json, action, "destroyed", confirm=question),
        as_json=as_json,
    )


@runtime_app.command("cancel")
def cancel(session: SessionArg, store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Cancel the running turn (its waiters see cancelled)."""

    async def action(rt: Runtime) -> dict[str, object]:
        return {"cancelled": await rt.cancel(session, "cancelled from the command line")}

    def human(report: dict[str, object]) -> str:
        if report["cancelled"]:
            return f"cancelled the running turn of session {session}"
        return f"session {session} had no running turn; nothing to cancel"

    execute(_control(session, store, as_json, action, "cancelling", human=human), as_json=as_json)


@runtime_app.command("recover")
def recover(session: SessionArg, store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Load (and so recover) the session here and print the recovery report.

    Recovery is what follows a crash: inputs recovered, lost, rebuilt; continuations."""
    execute(_recover(session, store, as_json), as_json=as_json)


async def _recover(session: str, store: str | None, as_json: bool) -> int:
    async with open_runtime(store) as rt:
        await rt.get_session(session)
        if await rt.load(session) is None:
            raise SurfaceError(
                "conflict",
                f"session {session} is run by another process; it recovered it when it loaded "
                "it (or wait until its lease expires)",
            )
        report = dict(rt.recovery_reports.get(session, {}))
        value = rt.runtime_state(session).value
        pending = len(rt.list_inputs(session))
    if as_json:
        print_json(
            {"session_id": session, "state": value, "pending_inputs": pending, "recovery": report}
        )
        return EXIT_OK
    details = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in report.items())
    write_line(f"recovered {session} ({details}); state {value}, {pending} pending inputs")
    return EXIT_OK


# ------------------------------------------------------------------ events


class EventPrinter:
    """Prints events one line each (``seq  time  code  key=value ...``), or as JSON lines.
    Consecutive text deltas share one line, their text appended as it comes."""

    def __init__(self, as_json: bool, write: Callable[[str], object] | None = None) -> None:
        self.as_json = as_json
        self._write = write or sys.stdout.write
        self._in_delta = False

    def emit(self, env: RuntimeEventEnvelope) -> None:
        if self.as_json:
            self._write(json.dumps(env.to_json_dict(), ensure_ascii=False) + "\n")
            return
        data = env.event.get("data") or {}
        code = env.code
        if code == "agent.text_delta":
            if not self._in_delta:
                self._write(f"{self._head(env)}  {code:<28} ")
                self._in_delta = True
            self._write(str(data.get("delta", "")).replace("\n", "\\n"))
            return
        self.end_line()
        fields = " ".join(
            f"{k}={short(v, 48)}" for k, v in data.items() if k not in ("code", "type")
        )
        self._write(f"{self._head(env)}  {code:<28} {short(fields, 160)}".rstrip() + "\n")

    def end_line(self) -> None:
        if self._in_delta:
            self._write("\n")
            self._in_delta = False

    @staticmethod
    def _head(env: RuntimeEventEnvelope) -> str:
        seq = str(env.seq) if env.seq else "-"
        ts = env.timestamp
        at = ts.astimezone().strftime("%H:%M:%S.%f")[:-3] if isinstance(ts, datetime) else ""
        return f"{seq:>6}  {at}"


async def _stored_events(
    rt: Runtime, session: str, after: int, follow: bool, poll: float = 0.2
) -> AsyncIterator[RuntimeEventEnvelope]:
    """The session's stored events with ``seq > after``; an ``events_gap`` first when some of
    them were pruned (S15); with ``follow``, then new ones as they are committed."""
    seq = after
    first = await rt.store.first_event_seq(session)
    if first is not None and seq + 1 < first:
        yield RuntimeEventEnvelope.make(
            0, utcnow(), session, "stream", {"code": "events_gap", "from": seq + 1, "to": first - 1}
        )
        seq = first - 1
    while True:
        batch = await rt.store.load_events(session, seq, 1000)
        for env in batch:
            yield env
            seq = env.seq
        if len(batch) < 1000:
            if not follow:
                return
            await asyncio.sleep(poll)


def events(
    session: SessionArg,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events until Ctrl-C.")
    ] = False,
    after: Annotated[
        int, typer.Option(min=0, metavar="SEQ", help="Only events after this sequence number.")
    ] = 0,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a session's runtime events, one line each.

    Each line: seq, time, code and details; --json prints one JSON object per line."""
    execute(_events(session, follow, after, store, as_json), as_json=as_json, quiet_interrupt=True)


async def _events(session: str, follow: bool, after: int, store: str | None, as_json: bool) -> int:
    printer = EventPrinter(as_json)
    try:
        async with open_runtime(store) as rt:
            await rt.get_session(session)
            async for env in _stored_events(rt, session, after, follow):
                printer.emit(env)
                if follow:
                    sys.stdout.flush()
    finally:
        printer.end_line()
        sys.stdout.flush()
    return EXIT_OK
