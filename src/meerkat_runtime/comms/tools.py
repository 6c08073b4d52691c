"""The comms tools the built-in agent is offered when its session has a comms name.

``comms_tools(runtime)`` builds one registry per ``Runtime``; every tool is a closure over the
runtime and learns its session from the ``ToolContext``. Problems (unknown or archived peer,
malformed arguments, a request that is not outstanding) come back as error results the model
reads (``error: ...``), never as a failed run. The built-in ``wait`` parks the run until an
interrupting input arrives (a peer message or request) or its timeout passes; with the default
policy a terminal response joins the run at the checkpoint that follows the wait.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from ..core.tools import ToolContext, ToolFailed, ToolRegistry
from ..errors import MeerkatRuntimeError

if TYPE_CHECKING:
    from ..host import Runtime

__all__ = ["COMMS_TOOL_NAMES", "comms_tools"]

COMMS_TOOL_NAMES = ("list_peers", "send_message", "send_request", "respond")

ResponseStatus = Literal[
    "accepted", "in_progress", "partial_result", "completed", "failed", "cancelled"
]


def _failed(exc: MeerkatRuntimeError) -> ToolFailed:
    return ToolFailed(f"error: {exc}")


def comms_tools(runtime: Runtime) -> ToolRegistry:
    """``list_peers``, ``send_message``, ``send_request`` and ``respond`` over ``runtime``."""
    registry = ToolRegistry()

    async def list_peers(context: ToolContext) -> list[dict[str, Any]]:
        """List the peers this session can talk to: the other named sessions of the store.

        Returns a list of {"name", "peer_id"}; use the name as `to` in send_message and
        send_request.
        """
        try:
            peers = await runtime.peers(context.session_id)
        except MeerkatRuntimeError as exc:
            raise _failed(exc) from None
        return [{"name": p["name"], "peer_id": p["peer_id"]} for p in peers]

    async def send_message(context: ToolContext, to: str, body: str) -> str:
        """Send a message to a peer (no reply expected).

        Args:
            to: the peer's name (see list_peers).
            body: the message text.
        """
        try:
            receipt = await runtime.comms_send(context.session_id, kind="message", to=to, body=body)
        except MeerkatRuntimeError as exc:
            raise _failed(exc) from None
        return f"message sent to {to} (envelope {receipt['envelope_id']})"

    async def send_request(
        context: ToolContext, to: str, intent: str, params: dict[str, Any] | None = None
    ) -> str:
        """Ask a peer to do something; returns the request id. The peer answers with
        responses naming this id; call `wait` to park until the answer arrives.

        Args:
            to: the peer's name (see list_peers).
            intent: what is asked, e.g. "summarize" or "compute".
            params: the request's arguments (a JSON object).
        """
        try:
            receipt = await runtime.comms_send(
                context.session_id, kind="request", to=to, intent=intent, params=params or {}
            )
        except MeerkatRuntimeError as exc:
            raise _failed(exc) from None
        return str(receipt["interaction_id"])

    async def respond(
        context: ToolContext,
        *,
        request_id: str | None = None,
        status: ResponseStatus,
        result: Any = None,
    ) -> str:
        """Answer a request a peer sent to this session. Progress (accepted, in_progress,
        partial_result) may be sent any number of times; one terminal status (completed,
        failed, cancelled) closes the request.

        Args:
            request_id: the id of the request (shown in the request message). May be left
                out when exactly one request to this session is open.
            status: accepted, in_progress, partial_result, completed, failed or cancelled.
            result: the answer (any JSON value).
        """
        sid = context.session_id
        try:
            rid = request_id or await _only_open_request(runtime, sid)
            await runtime.comms_send(
                sid, kind="response", in_reply_to=rid, status=status, result=result
            )
        except MeerkatRuntimeError as exc:
            raise _failed(exc) from None
        return f"response ({status}) to request {rid} sent"

    for fn in (list_peers, send_message, send_request, respond):
        registry.register(fn)
    return registry


async def _only_open_request(runtime: Runtime, session_id: str) -> str:
    open_ = await runtime.store.list_peer_requests(
        responder_runtime_id=session_id, outstanding_only=True
    )
    if not open_:
        raise ToolFailed("error: no request to this session is open; there is nothing to answer")
    if len(open_) > 1:
        ids = ", ".join(r.request_id for r in open_[:10])
        raise ToolFailed(
            f"error: {len(open_)} requests to this session are open ({ids}); pass request_id"
        )
    return open_[0].request_id
