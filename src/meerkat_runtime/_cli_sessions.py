"""``meerkat sessions ...``: create, list, show, history, archive.

``list``, ``show`` and ``history`` only read the store (they never take a session over from
the process running it, and change nothing); their JSON is the REST/RPC wire shapes
(``WireSessionSummary``, the session info, ``WireSessionHistory``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from ._cli_common import (
    EXIT_OK,
    JsonOpt,
    StoreOpt,
    err,
    execute,
    labels_from,
    open_runtime,
    out,
    print_json,
    short,
    when,
    write_line,
)
from .errors import SessionNotFoundError
from .host import Runtime
from .runtime.state import RuntimeState
from .sessions import SessionView
from .store.base import SessionRecord
from .surfaces.common import (
    SurfaceError,
    wire_history,
    wire_session_info,
    wire_session_summary,
)

__all__ = ["load_script", "sessions_app", "store_view"]

sessions_app = typer.Typer(
    name="sessions",
    help="Create, list, inspect and archive sessions.",
    no_args_is_help=True,
)

LabelOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--label",
        metavar="KEY=VALUE",
        help="A label (repeatable).",
        show_default=False,
    ),
]


def load_script(path: Path | None) -> list[dict[str, Any]] | None:
    """An offline-model script file: a JSON array of steps."""
    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SurfaceError(
            "bad_request", f"--script: cannot read {path}: {exc.strerror or exc}"
        ) from None
    except json.JSONDecodeError as exc:
        raise SurfaceError("bad_request", f"--script: {path} is not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise SurfaceError("bad_request", f"--script: {path} must be a JSON array of steps")
    return data


async def store_view(rt: Runtime, record: SessionRecord) -> SessionView:
    """The session as the store holds it, without loading it: its committed conversation,
    stored runtime state, and whether a live owner is running it now."""
    sid = record.session_id
    loaded = await rt.store.load_runtime(sid)
    messages = [r.message for r in loaded.conversation]
    owner, expiry, _ = await rt.store.lease_owner(sid)
    live = owner is not None and expiry is not None and expiry > time.time()
    last = next((m.created_at for m in reversed(messages) if m.created_at), None)
    return SessionView.build(
        record,
        messages,
        is_active=live and loaded.state is RuntimeState.RUNNING,
        state=loaded.state.value if loaded.state is not None else None,
        updated_at=last,
    )


async def _record(rt: Runtime, session_id: str) -> SessionRecord:
    record = await rt.store.load_session(session_id)
    if record is None:
        raise SessionNotFoundError(session_id)
    return record


# ------------------------------------------------------------------ create


@sessions_app.command("create")
def create(
    model: Annotated[
        str,
        typer.Option(
            help="Model: 'offline' (no network), an OpenAI model (gpt-..., needs "
            "OPENAI_API_KEY) or an Anthropic one (claude-..., needs ANTHROPIC_API_KEY)."
        ),
    ] = "offline",
    provider: Annotated[
        str | None,
        typer.Option(help="Provider (offline, openai, anthropic); default: from the model name."),
    ] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    label: LabelOpt = None,
    script: Annotated[
        Path | None,
        typer.Option(help="JSON file with an offline-model script (a list of steps)."),
    ] = None,
    comms_name: Annotated[
        str | None,
        typer.Option(
            "--comms-name",
            metavar="NAME",
            help="Make the session a comms peer named NAME (letters, digits, _ . -; unique "
            "among the store's sessions): other sessions can send it messages and requests "
            "(`meerkat send ... --to NAME`).",
            show_default=False,
        ),
    ] = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a session (no turn yet) and print its id."""
    execute(
        _create(model, provider, system, label, script, comms_name, store, as_json),
        as_json=as_json,
    )


async def _create(
    model: str,
    provider: str | None,
    system: str | None,
    label: list[str] | None,
    script: Path | None,
    comms_name: str | None,
    store: str | None,
    as_json: bool,
) -> int:
    labels = labels_from(label)
    offline_script = load_script(script)
    async with open_runtime(store) as rt:
        info = await rt.create_session(
            model=model,
            provider=provider,
            system_prompt=system,
            labels=labels or None,
            offline_script=offline_script,
            comms_name=comms_name,
        )
    if as_json:
        print_json({"session_id": info.id})
    else:
        write_line(info.id)
    return EXIT_OK


# ------------------------------------------------------------------ list


@sessions_app.command("list")
def list_(
    label: LabelOpt = None,
    limit: Annotated[
        int | None, typer.Option(min=0, metavar="N", help="List at most N sessions.")
    ] = None,
    offset: Annotated[int, typer.Option(min=0, metavar="N", help="Skip the first N.")] = 0,
    include_all: Annotated[bool, typer.Option("--all", help="Include archived sessions.")] = False,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List sessions, oldest first.

    With --label, only those carrying every label given."""
    execute(_list(label, limit, offset, include_all, store, as_json), as_json=as_json)


async def _list(
    label: list[str] | None,
    limit: int | None,
    offset: int,
    include_all: bool,
    store: str | None,
    as_json: bool,
) -> int:
    labels = labels_from(label)
    async with open_runtime(store) as rt:
        infos = await rt.list_sessions(
            include_archived=include_all, labels=labels or None, offset=offset, limit=limit
        )
        records = {
            r.session_id: r for r in await rt.store.list_sessions(include_archived=include_all)
        }
        views = [await store_view(rt, records[i.id]) for i in infos if i.id in records]
    if as_json:
        print_json({"sessions": [wire_session_summary(v) for v in views]})
        return EXIT_OK
    if not views:
        err.print("[dim]no sessions[/]")
        return EXIT_OK
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("SESSION", "CREATED", "UPDATED", "MESSAGES", "TOKENS", "STATE", "LABELS"):
        table.add_column(name, justify="right" if name in ("MESSAGES", "TOKENS") else "left")
    for v in views:
        table.add_row(
            v.session_id,
            when(v.created_at),
            when(v.updated_at),
            str(v.message_count),
            str(v.total_tokens),
            _state(v),
            Text(" ".join(f"{k}={val}" for k, val in sorted(v.labels.items()))),
        )
    out.print(table)
    return EXIT_OK


def _state(v: SessionView) -> str:
    if v.archived:
        return "archived"
    return v.state or "-"


# ------------------------------------------------------------------ show


@sessions_app.command("show")
def show(
    session: Annotated[str, typer.Argument(metavar="SESSION", help="The session's id.")],
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a session: model, state, messages, token usage, labels, last reply."""
    execute(_show(session, store, as_json), as_json=as_json)


async def _show(session: str, store: str | None, as_json: bool) -> int:
    async with open_runtime(store) as rt:
        view = await store_view(rt, await _record(rt, session))
    if as_json:
        print_json(wire_session_info(view))
        return EXIT_OK
    u = view.usage
    rows: list[tuple[str, str]] = [
        ("session", view.session_id),
        ("model", view.model + (f" ({view.provider})" if view.provider else "")),
    ]
    if view.system_prompt:
        rows.append(("system prompt", short(view.system_prompt, 120)))
    rows += [
        ("state", _state(view) + (" (running now)" if view.is_active else "")),
        ("created", when(view.created_at)),
        ("updated", when(view.updated_at)),
        ("messages", str(view.message_count)),
        ("tokens", f"{u.total_tokens} ({u.input_tokens} in, {u.output_tokens} out)"),
    ]
    if view.labels:
        rows.append(("labels", " ".join(f"{k}={v}" for k, v in sorted(view.labels.items()))))
    if view.last_assistant_text is not None:
        rows.append(("last reply", short(view.last_assistant_text, 200)))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for key, value in rows:
        grid.add_row(key, Text(value))
    out.print(grid)
    return EXIT_OK


# ------------------------------------------------------------------ history


@sessions_app.command("history")
def history(
    session: Annotated[str, typer.Argument(metavar="SESSION", help="The session's id.")],
    offset: Annotated[int, typer.Option(min=0, metavar="N", help="Skip the first N.")] = 0,
    limit: Annotated[
        int | None, typer.Option(min=0, metavar="N", help="Show at most N messages.")
    ] = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the session's conversation, oldest first."""
    execute(_history(session, offset, limit, store, as_json), as_json=as_json)


async def _history(
    session: str, offset: int, limit: int | None, store: str | None, as_json: bool
) -> int:
    async with open_runtime(store) as rt:
        page = await rt.history(session, offset=offset, limit=limit)
    if as_json:
        print_json(wire_history(page))
        return EXIT_OK
    if not page.messages:
        err.print(f"[dim]no messages (the session has {page.message_count})[/]")
        return EXIT_OK
    table = Table.grid(padding=(0, 1))
    table.add_column(justify="right", style="dim")
    table.add_column(style="bold")
    table.add_column()
    for i, m in enumerate(page.messages, start=page.offset):
        role = m.role if m.role != "tool" else f"tool {m.name or ''}".rstrip()
        lines = [m.content] if m.content else []
        for call in m.tool_calls:
            args = call.arguments if call.raw_arguments is None else call.raw_arguments
            lines.append(f"→ {call.name}({short(args, 80)})")
        if m.is_error:
            lines.insert(0, "(error)")
        table.add_row(f"#{i}", role, Text("\n".join(lines)))
    out.print(table)
    if page.has_more:
        nxt = page.offset + len(page.messages)
        err.print(f"[dim]more: --offset {nxt} (of {page.message_count})[/]")
    return EXIT_OK


# ------------------------------------------------------------------ archive


@sessions_app.command("archive")
def archive(
    session: Annotated[str, typer.Argument(metavar="SESSION", help="The session's id.")],
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Archive a session: it takes no more turns and leaves the list.

    Its pending inputs end abandoned (retired); its history stays readable."""
    execute(_archive(session, store, as_json), as_json=as_json)


async def _archive(session: str, store: str | None, as_json: bool) -> int:
    async with open_runtime(store) as rt:
        counts = await rt.archive_session(session)
    if as_json:
        print_json({"session_id": session, "archived": True, **counts})
    else:
        abandoned = counts.get("inputs_abandoned", 0)
        note = f" ({abandoned} pending inputs abandoned)" if abandoned else ""
        write_line(f"archived session {session}{note}")
    return EXIT_OK
