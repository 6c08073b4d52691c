"""Peer comms on the command line: ``meerkat send SESSION TEXT --to PEER`` (and its request
and response forms) and ``meerkat peers SESSION``.

- A peer send goes through ``surfaces.common.comms_send``, as ``POST /comms/send`` and
  ``comms/send`` do: the same checks, the same receipt (``--json`` prints it), the same
  errors (exit 2 for bad input, 4 for an unknown session, 3 when the target refused it).
- The command runs no session (``Runtime(owns_sessions=False)``): what it sends lands in
  the target's durable inbox, and the process that runs the target (``meerkat serve``, an
  application, or the next command that runs it) takes it in. A run started here would be stopped at
  once when the command exits.
- SESSION is a session id or a session's comms name.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from ._cli_common import (
    EXIT_OK,
    JsonOpt,
    StoreOpt,
    err,
    execute,
    open_runtime,
    out,
    print_json,
    write_line,
)
from .comms import TERMINAL_STATUSES, comms_name_of
from .host import Runtime
from .surfaces.common import CommsSendRequest, SurfaceError, comms_peers, comms_send

__all__ = ["peers", "resolve_session", "send_to_peer"]


async def resolve_session(rt: Runtime, ref: str) -> str:
    """The id of the session ``ref`` names: a session id, else a (non-archived) session's
    comms name."""
    if await rt.store.load_session(ref) is not None:
        return ref
    for rec in await rt.store.list_sessions():
        if comms_name_of(rec) == ref:
            return rec.session_id
    raise SurfaceError(
        "not_found",
        f"SESSION: no session {ref!r} in this store (neither a session id nor a session's "
        "comms name)",
        session_id=ref,
    )


def _json_text(text: str, what: str, *, lenient: bool) -> Any:
    """TEXT as JSON; empty is None. ``lenient``: text that is not JSON is a JSON string."""
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        if lenient:
            return text
        raise SurfaceError("bad_request", f"TEXT: the {what} must be JSON ({exc})") from None


def comms_request(
    sender: str,
    text: str,
    *,
    to: str | None,
    request: str | None,
    reply_to: str | None,
    status: str | None,
    envelope_id: str | None,
) -> CommsSendRequest:
    """The send the options describe (usage errors name the option)."""
    if request is not None and reply_to is not None:
        raise SurfaceError("bad_request", "--request and --reply-to: choose one")
    if status is not None and reply_to is None:
        raise SurfaceError("bad_request", "--status: only with --reply-to (a response)")
    if reply_to is not None:
        return CommsSendRequest(
            sender,
            "response",
            to=to,
            in_reply_to=reply_to,
            status=status or "completed",
            result=_json_text(text, "result", lenient=True),
            envelope_id=envelope_id,
        )
    if to is None:
        raise SurfaceError("bad_request", "--request: needs --to PEER (the peer asked)")
    if request is not None:
        params = _json_text(text, "params", lenient=False)
        if params is not None and not isinstance(params, dict):
            got = type(params).__name__
            raise SurfaceError("bad_request", f"TEXT: the params must be a JSON object, got {got}")
        return CommsSendRequest(
            sender, "request", to=to, intent=request, params=params, envelope_id=envelope_id
        )
    if not text.strip():
        raise SurfaceError("bad_request", "TEXT: the message must not be empty")
    return CommsSendRequest(sender, "message", to=to, body=text, envelope_id=envelope_id)


async def send_to_peer(
    session: str,
    text: str,
    *,
    to: str | None,
    request: str | None,
    reply_to: str | None,
    status: str | None,
    envelope_id: str | None,
    store: str | None,
    as_json: bool,
) -> int:
    """``meerkat send SESSION TEXT --to PEER`` and friends: print the receipt (``--json``),
    else its main id on stdout (the envelope id; for a request, the request id) and what
    was sent on stderr."""
    async with open_runtime(store, run_sessions=False) as rt:
        sender = await resolve_session(rt, session)
        req = comms_request(
            sender,
            text,
            to=to,
            request=request,
            reply_to=reply_to,
            status=status,
            envelope_id=envelope_id,
        )
        receipt = await comms_send(rt, req)
    if as_json:
        print_json(receipt)
        return EXIT_OK
    envelope = receipt["envelope_id"]
    if req.kind == "message":
        err.print(f"[dim]message sent to {req.to} (envelope {envelope})[/]", highlight=False)
        write_line(envelope)
    elif req.kind == "request":
        request_id = receipt["interaction_id"]
        err.print(
            f"[dim]request {request_id} ({req.intent}) sent to {req.to} (envelope "
            f"{envelope}); answer it with --reply-to {request_id}[/]",
            highlight=False,
        )
        write_line(request_id)
    else:
        what = "response" if req.status in TERMINAL_STATUSES else "progress response"
        err.print(
            f"[dim]{what} ({req.status}) to request {req.in_reply_to} sent "
            f"(envelope {envelope})[/]",
            highlight=False,
        )
        write_line(envelope)
    return EXIT_OK


def peers(
    session: Annotated[
        str, typer.Argument(metavar="SESSION", help="A session id or a session's comms name.")
    ],
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the peers SESSION can send to.

    The other sessions of the store that have a comms name and are not archived."""
    execute(_peers(session, store, as_json), as_json=as_json)


async def _peers(session: str, store: str | None, as_json: bool) -> int:
    async with open_runtime(store, run_sessions=False) as rt:
        sid = await resolve_session(rt, session)
        found = await comms_peers(rt, sid)
    if as_json:
        print_json({"session_id": sid, "peers": found})
        return EXIT_OK
    if not found:
        err.print("[dim]no peers (no other session has a comms name)[/]")
        return EXIT_OK
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("NAME", "SESSION", "KINDS"):
        table.add_column(name)
    for peer in found:
        table.add_row(peer["name"], peer["peer_id"], ", ".join(peer["sendable_kinds"]))
    out.print(table)
    return EXIT_OK
