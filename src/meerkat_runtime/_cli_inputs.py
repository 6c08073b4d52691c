"""``meerkat send``, ``meerkat wait`` and ``meerkat inputs ...``, and the turn-and-wait path
``meerkat run`` shares with ``send``.

- ``send`` (waiting) and ``run`` accept the prompt through ``Runtime.turn``: this process runs
  the session unless another process owns it (then the prompt goes through the session's
  durable inbox and this process waits by polling the store). The reply streams to stdout.
- ``send --no-wait`` always writes the prompt to the session's durable inbox and returns: no
  run starts in this short-lived process (a run it started would be stopped at exit and cost
  the input an attempt). The session's owner, or the next command that runs the session
  (``wait``, ``send``, ``run``), takes it from there.
- ``send --to PEER`` (``--request``, ``--reply-to``) is a peer send from SESSION instead of a
  prompt: ``_cli_comms.send_to_peer``.
- ``inputs list`` and ``inputs show`` only read the store; ``inputs cancel`` runs in the
  session's owner, so it loads the session here when no other process owns it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ._cli_common import (
    EXIT_OK,
    EXIT_REJECTED,
    EXIT_RUN_FAILED,
    EXIT_USAGE,
    JsonOpt,
    StoreOpt,
    err,
    execute,
    fail,
    input_id,
    open_runtime,
    out,
    print_json,
    short,
    spinner,
    when,
    write_line,
)
from ._cli_comms import send_to_peer
from ._ids import InputId
from ._time import utcnow
from .errors import InputNotFoundError
from .host import CompletionHandle, Runtime
from .runtime.input_state import InputState
from .runtime.inputs import Input, kind_id, parse_input
from .runtime.outcomes import (
    AcceptOutcome,
    CompletedWait,
    CompletedWithoutResultWait,
    Deduplicated,
    Rejected,
    WaitOutcome,
)
from .surfaces.common import SurfaceError

__all__ = ["enqueue_prompt", "inputs_app", "print_outcome", "send", "turn_and_wait", "wait"]

inputs_app = typer.Typer(
    name="inputs",
    help="Inspect and cancel a session's inputs (prompts and other things it was sent).",
    no_args_is_help=True,
)

TimeoutOpt = Annotated[
    float,
    typer.Option(
        "--timeout",
        min=0.0,
        metavar="SECONDS",
        help="Give up waiting after this long (exit 5); the input lives on.",
    ),
]


# ------------------------------------------------------------------ shared: turn and wait


async def turn_and_wait(
    rt: Runtime,
    session_id: str,
    prompt: str,
    *,
    idempotency_key: str | None,
    timeout: float,
    as_json: bool,
) -> tuple[int, InputId | None]:
    """Accept ``prompt`` for the session's next turn, stream the reply (text) or print the
    outcome (JSON); the exit code and the input id (None when rejected)."""
    after = await rt.last_event_seq(session_id)
    handle = await rt.turn(session_id, prompt, idempotency_key=idempotency_key)
    if isinstance(handle.outcome, Rejected):
        return _print_rejected(handle.outcome, session_id, as_json), None
    iid = handle.input_id
    extra: dict[str, Any] = {}
    if isinstance(handle.outcome, Deduplicated):
        extra["existing_id"] = str(iid)
        if not as_json:
            err.print(
                f"[dim]duplicate: input {iid} already carries this idempotency key; "
                "following it[/]",
                highlight=False,
            )
    streamed: list[str] = []
    follower = None
    try:
        with spinner("thinking…", enabled=not as_json) as status:
            if not as_json:
                follower = asyncio.create_task(
                    _stream_reply(rt, session_id, after, streamed, status.stop)
                )
            outcome = await _wait_handle(handle, session_id, timeout)
    finally:
        if follower is not None:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
    return print_outcome(outcome, session_id, as_json=as_json, streamed=streamed, extra=extra), iid


async def _wait_handle(handle: CompletionHandle, session_id: str, timeout: float) -> WaitOutcome:
    try:
        return await handle.wait(timeout)
    except TimeoutError:
        raise _timed_out(handle.input_id, session_id, timeout) from None


def _timed_out(iid: InputId, session_id: str, timeout: float) -> SurfaceError:
    return SurfaceError(
        "timeout",
        f"timed out after {timeout:g} s waiting for input {iid}; it lives on: "
        f"`meerkat wait {iid}` waits for it again",
        input_id=str(iid),
        session_id=session_id,
    )


def _print_rejected(outcome: Rejected, session_id: str, as_json: bool) -> int:
    """A rejected input: its accept outcome (JSON) and one error line; exit 3."""
    if as_json:
        doc = outcome.to_json_dict()
        doc["session_id"] = session_id
        print_json(doc)
    err.print(
        f"[bold red]error:[/] input rejected ({outcome.code.value}): "
        + escape(" ".join(outcome.reason.split())),
        highlight=False,
    )
    return EXIT_REJECTED


def print_outcome(
    outcome: WaitOutcome,
    session_id: str,
    *,
    as_json: bool,
    streamed: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> int:
    """Print a waiter outcome: its JSON plus ``session_id`` (``--json``), else the reply on
    stdout (or how the input ended, on stderr). Exit 0 when it completed, 1 otherwise."""
    ok = isinstance(outcome, CompletedWait | CompletedWithoutResultWait)
    if as_json:
        doc = outcome.to_json_dict()
        doc["session_id"] = session_id
        doc.update(extra or {})
        print_json(doc)
    elif isinstance(outcome, CompletedWait):
        text = outcome.result.text
        if streamed and "".join(streamed).endswith(text):
            write_line()  # the reply streamed already; end its line
        else:
            write_line(text)
    elif isinstance(outcome, CompletedWithoutResultWait):
        err.print("[dim](completed without a reply)[/]")
    else:
        doc = outcome.to_json_dict()
        details = ", ".join(
            f"{k}={v}" for k, v in doc.items() if k not in ("outcome_type", "input_id")
        )
        err.print(
            f"[bold red]{outcome.outcome_type}[/]: input {outcome.input_id}"
            + (escape(f" ({details})") if details else ""),
            highlight=False,
        )
    return EXIT_OK if ok else EXIT_RUN_FAILED


async def _stream_reply(
    rt: Runtime,
    session_id: str,
    after: int,
    streamed: list[str],
    before_output: Callable[[], None],
) -> None:
    """Print the reply's text as the model streams it, and tool calls as they start.

    Only pieces of the final answer's turn stay on stdout; text of a turn that ended in tool
    calls is kept as it streamed (the model's words before calling). Text deltas exist only
    in the process that runs the session; a waiter in another process prints the reply at
    the end."""
    async for env in rt.events(session_id, after, follow=True):
        if env.event.get("category") != "agent":
            continue
        data = env.event.get("data") or {}
        kind = data.get("type")
        if kind in ("text_delta", "tool_execution_started", "retrying"):
            before_output()  # the spinner goes before anything is printed
        if kind == "text_delta":
            piece = str(data.get("delta", ""))
            streamed.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        elif kind == "tool_execution_started":
            if streamed:
                sys.stdout.write("\n")
                streamed.clear()
            err.print(f"[dim]→ {data.get('name')}[/]", highlight=False)
        elif kind == "retrying":
            err.print(
                f"[dim]retrying ({data.get('error_kind')}): attempt {data.get('attempt')}[/]",
                highlight=False,
            )


async def enqueue_prompt(
    rt: Runtime, session_id: str, prompt: str, *, idempotency_key: str | None
) -> AcceptOutcome:
    """Accept ``prompt`` for the session through its durable inbox, without running it here
    (``Runtime.turn(run_here=False)``): the deferred prompt is prepended, an archived session
    refuses, an idempotency key deduplicates."""
    handle = await rt.turn(session_id, prompt, idempotency_key=idempotency_key, run_here=False)
    return handle.outcome


# ------------------------------------------------------------------ send, wait


def send(
    session: Annotated[
        str,
        typer.Argument(
            metavar="SESSION",
            help="The session's id (with --to / --request / --reply-to: the sending session's "
            "id or comms name).",
        ),
    ],
    text: Annotated[
        str,
        typer.Argument(
            metavar="TEXT",
            help="The prompt; with --to the message; with --request the params (a JSON "
            "object); with --reply-to the result (JSON, else sent as a string).",
        ),
    ],
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            metavar="PEER",
            help="Send TEXT as a peer message from SESSION to the session named PEER (its comms "
            "name) instead of a prompt; prints the envelope id.",
            show_default=False,
        ),
    ] = None,
    request: Annotated[
        str | None,
        typer.Option(
            "--request",
            metavar="INTENT",
            help="With --to: send a peer request with this intent and TEXT as its params; "
            "prints the request id.",
            show_default=False,
        ),
    ] = None,
    reply_to: Annotated[
        str | None,
        typer.Option(
            "--reply-to",
            metavar="REQUEST_ID",
            help="Answer the peer request REQUEST_ID that SESSION received, with TEXT as the "
            "result (--to is then optional).",
            show_default=False,
        ),
    ] = None,
    status: Annotated[
        str | None,
        typer.Option(
            "--status",
            metavar="STATUS",
            help="With --reply-to: completed (default), failed, cancelled, or a progress "
            "status: accepted, in_progress, partial_result.",
            show_default=False,
        ),
    ] = None,
    envelope_id: Annotated[
        str | None,
        typer.Option(
            "--envelope-id",
            metavar="UUID",
            help="Make a peer send safe to retry: the same envelope id delivers once.",
            show_default=False,
        ),
    ] = None,
    no_wait: Annotated[
        bool,
        typer.Option(
            "--no-wait",
            help="Hand the prompt to the session's durable inbox and print its input id "
            "without waiting; `meerkat wait ID` (or the process running the session) runs it.",
        ),
    ] = False,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            "--idempotency-key",
            metavar="KEY",
            help="Make retries safe: the same key with the same text is the same input "
            "(its id is printed again); with other text it is rejected.",
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            min=0.0,
            metavar="SECONDS",
            help="Give up waiting for the reply after this long (exit 5); the input lives "
            "on (default 300).",
            show_default=False,
        ),
    ] = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Send TEXT to SESSION as its next turn and print the reply.

    The input id is printed on stderr. With --no-wait only the input id is printed, on
    stdout (for a duplicate, the existing input's id).

    With --to PEER, SESSION sends TEXT to its peer PEER as a peer message instead (both need
    a comms name; see `meerkat peers`); --request INTENT makes it a request, --reply-to
    answers one. The receipt's id is printed (--json: the receipt); what was sent lands in
    the target's durable inbox."""
    if to is not None or request is not None or reply_to is not None:
        for flag, given in (
            ("--no-wait", no_wait),
            ("--idempotency-key", idempotency_key is not None),
            ("--timeout", timeout is not None),
        ):
            if given:
                hint = " (use --envelope-id)" if flag == "--idempotency-key" else ""
                raise fail(f"{flag}: not used by a peer send{hint}", EXIT_USAGE)
        execute(
            send_to_peer(
                session,
                text,
                to=to,
                request=request,
                reply_to=reply_to,
                status=status,
                envelope_id=envelope_id,
                store=store,
                as_json=as_json,
            ),
            as_json=as_json,
        )
    for flag, value in (("--status", status), ("--envelope-id", envelope_id)):
        if value is not None:
            raise fail(f"{flag}: only with --to, --request or --reply-to", EXIT_USAGE)
    execute(
        _send(
            session,
            text,
            no_wait,
            idempotency_key,
            300.0 if timeout is None else timeout,
            store,
            as_json,
        ),
        as_json=as_json,
    )


async def _send(
    session: str,
    text: str,
    no_wait: bool,
    key: str | None,
    timeout: float,
    store: str | None,
    as_json: bool,
) -> int:
    if not text.strip():
        raise SurfaceError("bad_request", "TEXT: the prompt must not be empty")
    async with open_runtime(store) as rt:
        if not no_wait:
            await rt.get_session(session)
            code, iid = await turn_and_wait(
                rt, session, text, idempotency_key=key, timeout=timeout, as_json=as_json
            )
            if iid is not None and not as_json:
                err.print(f"[dim]input {iid}[/]", highlight=False)
            return code
        outcome = await enqueue_prompt(rt, session, text, idempotency_key=key)
        if isinstance(outcome, Rejected):
            return _print_rejected(outcome, session, as_json)
        if as_json:
            doc = outcome.to_json_dict()
            doc["session_id"] = session
            print_json(doc)
        elif isinstance(outcome, Deduplicated):
            err.print(
                f"[dim]duplicate: input {outcome.existing_id} already carries this "
                "idempotency key[/]",
                highlight=False,
            )
            write_line(str(outcome.existing_id))
        else:
            write_line(str(outcome.input_id))
        return EXIT_OK


def wait(
    input: Annotated[str, typer.Argument(metavar="INPUT_ID", help="The input's id.")],
    session: Annotated[
        str | None,
        typer.Option(
            "--session", metavar="SESSION", help="The input's session (default: looked up)."
        ),
    ] = None,
    timeout: TimeoutOpt = 300.0,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Wait for an input to finish and print how it ended (the reply if it completed).

    If no other process runs the input's session, this one does until the input is done."""
    execute(_wait(input, session, timeout, store, as_json), as_json=as_json)


async def _wait(
    raw_id: str, session: str | None, timeout: float, store: str | None, as_json: bool
) -> int:
    iid = input_id(raw_id)
    async with open_runtime(store) as rt:
        sid = session
        if sid is None:
            sid = await rt.store.find_input_runtime(iid)
            if sid is None:
                raise InputNotFoundError(str(iid), "this store")
        try:
            with spinner(f"waiting for input {iid}…", enabled=not as_json):
                outcome = await rt.wait(sid, iid, timeout)
        except TimeoutError:
            raise _timed_out(iid, sid, timeout) from None
        return print_outcome(outcome, sid, as_json=as_json)


# ------------------------------------------------------------------ inputs ...


def _preview(inp: Input | None) -> str:
    if inp is None:
        return ""
    for attr in ("text", "body", "instructions", "content", "event_type"):
        value = getattr(inp, attr, None)
        if isinstance(value, str):
            return value
    return ""


def _kind(st: InputState) -> str:
    return kind_id(st.persisted_input) if st.persisted_input is not None else "?"


def _ending(st: InputState) -> str:
    out_ = st.terminal_outcome
    if out_ is None:
        return ""
    doc = out_.to_json_dict()
    rest = [str(v) for k, v in doc.items() if k != "outcome_type" and v is not None]
    return out_.outcome_type + (f" ({', '.join(rest)})" if rest else "")


async def _input_states(rt: Runtime, session: str, include_terminal: bool) -> list[InputState]:
    """The session's inputs as the store holds them, then the inbox entries its owner has
    not ingested yet (as ``accepted``), in creation order."""
    await rt.get_session(session)
    states = await rt.store.load_input_states(session, include_terminal=include_terminal)
    known = {st.input_id for st in states}
    for entry in await rt.store.inbox_entries(session, limit=100_000):
        try:
            inp = parse_input(entry.input_json)
        except ValueError:
            continue
        if inp.id in known:
            continue
        st = InputState.new_accepted(inp.id, entry.created_at or utcnow())
        st.persisted_input = inp
        st.durability = inp.header.durability
        st.idempotency_key = inp.header.idempotency_key
        states.append(st)
    states.sort(key=lambda s: s.input_id)
    return states


@inputs_app.command("list")
def inputs_list(
    session: Annotated[str, typer.Argument(metavar="SESSION", help="The session's id.")],
    include_all: Annotated[
        bool, typer.Option("--all", help="Include finished inputs (consumed, abandoned, ...).")
    ] = False,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List a session's pending inputs (with --all, finished ones too)."""
    execute(_inputs_list(session, include_all, store, as_json), as_json=as_json)


async def _inputs_list(session: str, include_all: bool, store: str | None, as_json: bool) -> int:
    async with open_runtime(store) as rt:
        states = await _input_states(rt, session, include_all)
    if as_json:
        print_json(
            {
                "session_id": session,
                "input_ids": [str(s.input_id) for s in states],
                "inputs": [s.to_json_dict() for s in states],
            }
        )
        return EXIT_OK
    if not states:
        err.print(
            "[dim]no inputs"
            + ("" if include_all else " pending (--all lists finished ones)")
            + "[/]"
        )
        return EXIT_OK
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("INPUT", "KIND", "STATE", "ATTEMPTS", "UPDATED", "TEXT / OUTCOME"):
        table.add_column(name, justify="right" if name == "ATTEMPTS" else "left")
    for st in states:
        detail = _ending(st) or short(_preview(st.persisted_input), 48)
        table.add_row(
            str(st.input_id),
            _kind(st),
            st.current_state.value,
            str(st.attempt_count),
            when(st.updated_at),
            Text(detail),
        )
    out.print(table)
    return EXIT_OK


@inputs_app.command("show")
def inputs_show(
    session: Annotated[str, typer.Argument(metavar="SESSION", help="The session's id.")],
    input: Annotated[str, typer.Argument(metavar="INPUT_ID", help="The input's id.")],
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show an input: lifecycle state, attempts, outcome, history."""
    execute(_inputs_show(session, input, store, as_json), as_json=as_json)


async def _inputs_show(session: str, raw_id: str, store: str | None, as_json: bool) -> int:
    iid = input_id(raw_id)
    async with open_runtime(store) as rt:
        await rt.get_session(session)
        st = await rt.get_input_state(session, iid)
    if as_json:
        print_json(st.to_json_dict())
        return EXIT_OK
    _print_state(st)
    return EXIT_OK


def _print_state(st: InputState) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    rows: list[tuple[str, str]] = [
        ("input", str(st.input_id)),
        ("kind", _kind(st)),
        ("state", st.current_state.value),
    ]
    if st.terminal_outcome is not None:
        rows.append(("outcome", _ending(st)))
    if st.durability is not None:
        rows.append(("durability", st.durability.value))
    if st.idempotency_key is not None:
        rows.append(("idempotency key", str(st.idempotency_key)))
    rows += [
        ("attempts", str(st.attempt_count)),
        ("recoveries", str(st.recovery_count)),
        ("created", when(st.created_at)),
        ("updated", when(st.updated_at)),
    ]
    if st.last_run_id is not None:
        rows.append(("last run", str(st.last_run_id)))
    preview = _preview(st.persisted_input)
    if preview:
        rows.append(("text", short(preview, 200)))
    for key, value in rows:
        grid.add_row(key, Text(value))
    out.print(grid)
    if st.history:
        out.print()
        hist = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="history", title_justify="left")
        for name in ("AT", "FROM", "TO", "REASON"):
            hist.add_column(name)
        for h in st.history:
            hist.add_row(when(h.timestamp), h.from_.value, h.to.value, Text(h.reason or ""))
        out.print(hist)


@inputs_app.command("cancel")
def inputs_cancel(
    session: Annotated[str, typer.Argument(metavar="SESSION", help="The session's id.")],
    input: Annotated[str, typer.Argument(metavar="INPUT_ID", help="The input's id.")],
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel an input that has not started yet (accepted or queued).

    It ends abandoned (cancelled). To stop the running one, use `meerkat runtime cancel`."""
    execute(_inputs_cancel(session, input, store, as_json), as_json=as_json)


async def _inputs_cancel(session: str, raw_id: str, store: str | None, as_json: bool) -> int:
    iid = input_id(raw_id)
    async with open_runtime(store) as rt:
        await rt.get_session(session)
        stored = await rt.store.load_input_state(session, iid)
        if stored is not None and stored.is_terminal:
            raise SurfaceError("conflict", f"input {iid} has already ended: {_ending(stored)}")
        st = await rt.cancel_input(session, iid)
    if as_json:
        print_json(st.to_json_dict())
    else:
        write_line(f"cancelled input {st.input_id} ({_ending(st) or st.current_state.value})")
    return EXIT_OK
