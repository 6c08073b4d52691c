"""Peer comms between the sessions of one store: identity, routing, conventions, S20.

A session takes part in comms when it has a **comms name** (``create_session(comms_name=...)``,
kept in its stored config; unique among the store's non-archived sessions). Its **peers** are
the other named, non-archived sessions of the same store, whichever process runs them, so two
processes on one SQLite file talk to each other.

Sending is accepting a ``peer`` input into the target's runtime (S10: directly when this
process owns the target, through its durable inbox otherwise), with origin
``peer{peer_id: sender's comms name, runtime_id: sender's session id}`` and the **envelope id**
(a UUID; minted when the caller gives none) as the input's idempotency key and correlation id:
a retried send with the same envelope id is deduplicated, never delivered twice (S11).

Conventions (body is text; params and results are canonical JSON):

============  =============================================  ================================
kind          convention at the target                        body
============  =============================================  ================================
message       ``message``                                     the message text
request       ``request{request_id, intent}``                 canonical JSON of ``params``
response      ``response_progress{request_id, phase}`` for    canonical JSON of ``result``
              status accepted / in_progress / partial_result
              ``response_terminal{request_id, status}`` for
              status completed / failed / cancelled
============  =============================================  ================================

Every peer input is durable (progress responses too, unlike 0.4.10's ephemeral "accepted":
a progress update that went through another process's inbox is never lost or doubled).

S20: the requester mints the request id (UUIDv7) and records the request as outstanding
(``PeerRequestRecord``, keyed by requester and request id) durably **before** delivering it. A
response is checked on the sending path (the request is outstanding at the requester and was
sent to the responder) and again by the requester's runtime when it admits the input; the
terminal response closes the request in the transaction that accepts it. A response whose
request is not outstanding is refused with a one-line reason and nothing is delivered.

Errors: ``InvalidArgumentError`` for everything the caller can fix (unknown kind, missing or
misplaced fields, malformed envelope id, unknown or archived peer, unnamed or archived sender,
a response to a request that is not outstanding); ``InvalidOperationError`` when the target
cannot take input now (retired: ``not_ready``; ``queue_full``); ``SessionNotFoundError`` for
an unknown sender.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from .._ids import CorrelationId, LogicalRuntimeId, new_uuid7
from .._json import canonical_bytes
from .._time import utcnow
from ..errors import InvalidArgumentError, InvalidOperationError
from ..runtime.inputs import (
    InputDurability,
    InputHeader,
    MessageConvention,
    PeerConvention,
    PeerInput,
    PeerOrigin,
    RequestConvention,
    ResponseProgressConvention,
    ResponseProgressPhase,
    ResponseTerminalConvention,
    ResponseTerminalStatus,
)
from ..runtime.outcomes import AcceptOutcome, RejectCode, Rejected
from ..store.base import PeerRequestRecord, SessionRecord

if TYPE_CHECKING:
    from ..host import Runtime

__all__ = [
    "COMMS_NAME_PATTERN",
    "PROGRESS_STATUSES",
    "SENDABLE_KINDS",
    "TERMINAL_STATUSES",
    "CommsService",
    "comms_name_of",
    "validate_comms_name",
]

COMMS_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
"""What a comms name must match."""

SENDABLE_KINDS: tuple[str, ...] = ("message", "request", "response")
PROGRESS_STATUSES: tuple[str, ...] = tuple(p.value for p in ResponseProgressPhase)
TERMINAL_STATUSES: tuple[str, ...] = tuple(s.value for s in ResponseTerminalStatus)
_STATUSES = PROGRESS_STATUSES + TERMINAL_STATUSES


def validate_comms_name(name: Any) -> str:
    """``name`` if it is a valid comms name, else ``InvalidArgumentError`` saying why."""
    if not isinstance(name, str) or not COMMS_NAME_PATTERN.fullmatch(name):
        raise InvalidArgumentError(
            f"comms_name: {name!r} is not a valid comms name; use 1-64 letters, digits, "
            "'_', '.' or '-'"
        )
    return name


def comms_name_of(record: SessionRecord) -> str | None:
    """The session's comms name, or None if it takes no part in comms."""
    name = record.config.get("comms_name")
    return name if isinstance(name, str) and name else None


def _json_body(field: str, value: Any) -> str:
    """Canonical JSON (sorted keys: a retry with reordered keys is the same content, S11)."""
    try:
        return canonical_bytes(value).decode("utf-8")
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"{field}: not a JSON value ({exc})") from None


def _unused(kind: str, **fields: Any) -> None:
    for name, value in fields.items():
        if value is not None:
            raise InvalidArgumentError(f"{name}: not used by kind {kind!r}; leave it out")


class CommsService:
    """The comms operations of one ``Runtime`` (``Runtime.comms_send`` / ``Runtime.peers``
    delegate here)."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self._names: dict[str, str] = {}  # comms name -> session id (checked on every use)

    # ------------------------------------------------------------------ peers

    async def peers(self, session_id: str) -> list[dict[str, Any]]:
        """The other named, non-archived sessions of the store, by creation time."""
        await self.rt._record(session_id)  # SessionNotFoundError for an unknown session
        out: list[dict[str, Any]] = []
        for rec in await self.rt.store.list_sessions():
            name = comms_name_of(rec)
            if name is None or rec.session_id == session_id:
                continue
            self._names[name] = rec.session_id
            out.append(
                {
                    "name": name,
                    "peer_id": rec.session_id,
                    "address": f"session:{rec.session_id}",
                    "source": "store",
                    "sendable_kinds": list(SENDABLE_KINDS),
                    "capabilities": {},
                    "meta": {},
                }
            )
        return out

    async def _peer(self, sender: SessionRecord, to: Any, kind: str) -> SessionRecord:
        """The non-archived session named ``to``."""
        if not isinstance(to, str) or not to:
            raise InvalidArgumentError(f"to: required for kind {kind!r} (the peer's comms name)")
        if to == comms_name_of(sender):
            raise InvalidArgumentError(
                f"to: {to!r} is this session's own comms name; a session does not send to itself"
            )
        cached = self._names.get(to)
        if cached is not None:
            rec = await self.rt.store.load_session(cached)
            if rec is not None and not rec.archived and comms_name_of(rec) == to:
                return rec
            self._names.pop(to, None)
        archived = False
        known: list[str] = []
        for rec in await self.rt.store.list_sessions(include_archived=True):
            name = comms_name_of(rec)
            if name is None or rec.session_id == sender.session_id:
                continue
            if rec.archived:
                archived = archived or name == to
                continue
            if name == to:
                self._names[to] = rec.session_id
                return rec
            known.append(name)
        if archived:
            raise InvalidArgumentError(f"to: peer {to!r} is archived; it takes no more input")
        shown = ", ".join(sorted(known)[:10]) or "none"
        raise InvalidArgumentError(
            f"to: unknown peer {to!r}; no session of this store has that comms name "
            f"(peers: {shown})"
        )

    async def _sender(self, session_id: str) -> tuple[SessionRecord, str]:
        record = await self.rt._record(session_id)
        if record.archived:
            raise InvalidArgumentError(
                f"session {session_id} is archived; an archived session sends nothing"
            )
        name = comms_name_of(record)
        if name is None:
            raise InvalidArgumentError(
                f"session {session_id} has no comms name; create it with comms_name=... to "
                "talk to peers"
            )
        return record, name

    # ------------------------------------------------------------------ send

    async def send(
        self,
        session_id: str,
        *,
        kind: str,
        to: str | None = None,
        body: str | None = None,
        intent: str | None = None,
        params: dict[str, Any] | None = None,
        in_reply_to: str | None = None,
        status: str | None = None,
        result: Any = None,
        envelope_id: str | None = None,
    ) -> dict[str, Any]:
        if kind not in SENDABLE_KINDS:
            raise InvalidArgumentError(
                f"kind: unknown kind {kind!r}; expected one of {', '.join(SENDABLE_KINDS)}"
            )
        envelope = _envelope(envelope_id)
        sender, name = await self._sender(session_id)
        if kind == "message":
            _unused(kind, intent=intent, params=params, in_reply_to=in_reply_to, status=status)
            _unused(kind, result=result)
            if not isinstance(body, str):
                raise InvalidArgumentError("body: required for kind 'message' (a string)")
            target = await self._peer(sender, to, kind)
            await self._deliver(
                sender, name, target, envelope, MessageConvention(), body, "message"
            )
            return {"kind": "peer_message_sent", "envelope_id": envelope, "acked": True}
        if kind == "request":
            _unused(kind, body=body, in_reply_to=in_reply_to, status=status, result=result)
            if not isinstance(intent, str) or not intent:
                raise InvalidArgumentError(
                    "intent: required for kind 'request' (a non-empty string)"
                )
            if params is None:
                params = {}
            if not isinstance(params, dict):
                raise InvalidArgumentError(
                    f"params: must be a JSON object, got {type(params).__name__}"
                )
            text = _json_body("params", params)
            target = await self._peer(sender, to, kind)
            request_id = await self._send_request(sender, name, target, envelope, intent, text)
            return {
                "kind": "peer_request_sent",
                "envelope_id": envelope,
                "interaction_id": request_id,
                "stream_reserved": False,
            }
        _unused(kind, body=body, intent=intent, params=params)
        if not isinstance(in_reply_to, str) or not in_reply_to:
            raise InvalidArgumentError(
                "in_reply_to: required for kind 'response' (the request id it answers)"
            )
        if status not in _STATUSES:
            raise InvalidArgumentError(
                f"status: {status!r} is not a response status; expected one of "
                f"{', '.join(_STATUSES)}"
            )
        text = _json_body("result", result)
        await self._send_response(sender, name, to, envelope, in_reply_to, status, text)
        return {"kind": "peer_response_sent", "envelope_id": envelope, "in_reply_to": in_reply_to}

    async def _send_request(
        self,
        sender: SessionRecord,
        name: str,
        target: SessionRecord,
        envelope: str,
        intent: str,
        body: str,
    ) -> str:
        """S20: record the request as outstanding (durably), then deliver it. A retry with the
        same envelope id finds the request (and its id) again."""
        minted = new_uuid7()
        target_name = comms_name_of(target) or ""
        rec = await self.rt.store.open_peer_request(
            PeerRequestRecord(
                requester_runtime_id=sender.session_id,
                request_id=minted,
                responder_runtime_id=target.session_id,
                envelope_id=envelope,
                created_at=utcnow(),
                requester_name=name,
                responder_name=target_name,
                intent=intent,
            )
        )
        created = rec.request_id == minted
        if not created and (rec.responder_runtime_id != target.session_id or rec.intent != intent):
            raise InvalidArgumentError(
                f"envelope_id: {envelope} was already used for request {rec.request_id} to "
                f"{rec.responder_name or rec.responder_runtime_id} (intent {rec.intent!r}); use "
                "a fresh envelope id for a new request"
            )
        convention = RequestConvention(request_id=rec.request_id, intent=intent)
        try:
            await self._deliver(sender, name, target, envelope, convention, body, "request")
        except (InvalidArgumentError, InvalidOperationError):
            if created:  # refused by the target: it was never delivered
                await self.rt.store.discard_peer_request(sender.session_id, rec.request_id)
            raise
        return rec.request_id

    async def _send_response(
        self,
        sender: SessionRecord,
        name: str,
        to: str | None,
        envelope: str,
        request_id: str,
        status: str,
        body: str,
    ) -> None:
        requester_id = await self._requester_of(sender.session_id, request_id)
        if to is not None:
            named = await self._peer(sender, to, "response")
            if requester_id is not None and named.session_id != requester_id:
                raise InvalidArgumentError(
                    f"to: request {request_id!r} came from session {requester_id}, not from "
                    f"peer {to!r}; leave 'to' out to answer the requester"
                )
            requester_id = named.session_id
        if requester_id is None:
            raise InvalidArgumentError(
                f"in_reply_to: request {request_id!r} is not outstanding: no peer sent a request "
                f"with that id to this session ({name})"
            )
        rec = await self.rt.store.load_peer_request(requester_id, request_id)
        if rec is None:
            raise InvalidArgumentError(
                f"in_reply_to: request {request_id!r} is not outstanding at session {requester_id}"
            )
        if rec.responder_runtime_id != sender.session_id:
            raise InvalidArgumentError(
                f"in_reply_to: request {request_id!r} was sent to "
                f"{rec.responder_name or rec.responder_runtime_id}, not to this session ({name})"
            )
        if rec.closed_at is not None and rec.closed_by != envelope:
            raise InvalidArgumentError(
                f"in_reply_to: request {request_id!r} is already closed ({rec.status}); a "
                "request takes one terminal response"
            )
        requester = await self.rt.store.load_session(requester_id)
        if requester is None or requester.archived:
            who = rec.requester_name or requester_id
            raise InvalidArgumentError(
                f"in_reply_to: the requester {who!r} of request {request_id!r} is archived or "
                "gone; it takes no more input"
            )
        convention: PeerConvention
        if status in TERMINAL_STATUSES:
            convention = ResponseTerminalConvention(
                request_id=request_id, status=ResponseTerminalStatus(status)
            )
        else:
            convention = ResponseProgressConvention(
                request_id=request_id, phase=ResponseProgressPhase(status)
            )
        await self._deliver(sender, name, requester, envelope, convention, body, "response")

    async def _requester_of(self, session_id: str, request_id: str) -> str | None:
        """The session that sent ``request_id`` to ``session_id``: the origin of the request
        input in this session's inputs (in memory when this process runs it), else the
        requester's record of the request (S20) in the store."""
        owned = self.rt._runtimes.get(session_id)
        if owned is not None:
            for entry in owned._entries.values():
                inp = entry.input
                conv = inp.convention if isinstance(inp, PeerInput) else None
                if isinstance(conv, RequestConvention) and conv.request_id == request_id:
                    src = inp.header.source
                    if isinstance(src, PeerOrigin) and src.runtime_id is not None:
                        return src.runtime_id.value
        for rec in await self.rt.store.find_peer_requests(request_id):
            if rec.responder_runtime_id == session_id:
                return rec.requester_runtime_id
        return None

    async def _deliver(
        self,
        sender: SessionRecord,
        name: str,
        target: SessionRecord,
        envelope: str,
        convention: PeerConvention,
        body: str,
        what: str,
    ) -> AcceptOutcome:
        header = InputHeader.new(
            source=PeerOrigin(peer_id=name, runtime_id=LogicalRuntimeId(sender.session_id)),
            durability=InputDurability.DURABLE,
            idempotency_key=envelope,
            correlation_id=CorrelationId(envelope),
        )
        peer_input = PeerInput(header=header, convention=convention, body=body)
        tid = target.session_id
        try:
            outcome = await self.rt.accept(tid, peer_input)
        except InvalidOperationError as exc:
            if isinstance(exc, InvalidArgumentError):
                raise
            # this process cannot run the target (e.g. it has an application executor): the
            # input waits in its durable inbox for a process that can (S10)
            outcome = await self.rt._accept_remote(tid, peer_input, None)
        if isinstance(outcome, Rejected):
            peer = comms_name_of(target) or tid
            text = f"{what} to {peer!r} was not delivered ({outcome.code.value}): {outcome.reason}"
            if outcome.code in (RejectCode.NOT_READY, RejectCode.QUEUE_FULL):
                raise InvalidOperationError(text)
            raise InvalidArgumentError(text)
        return outcome


def _envelope(envelope_id: Any) -> str:
    if envelope_id is None:
        return new_uuid7()
    try:
        return CorrelationId(envelope_id).value
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"envelope_id: {envelope_id!r} is not a UUID (leave it out to have one minted)"
        ) from None
