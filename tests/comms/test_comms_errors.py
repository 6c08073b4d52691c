"""Bad input, identity and idempotency of peer comms, on every store: each refusal is a clear
one-line error and delivers nothing (the target holds no new input, no request is recorded);
a retried send with the same envelope id delivers once."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from meerkat_runtime import PeerInput, Runtime, SessionNotFoundError
from meerkat_runtime._ids import new_uuid7
from meerkat_runtime.errors import InvalidArgumentError, InvalidOperationError
from meerkat_runtime.runtime.inputs import ResponseProgressConvention, ResponseTerminalConvention
from meerkat_runtime.runtime.outcomes import Accepted, Rejected
from meerkat_runtime.store.base import CommsNameTakenError, SessionRecord
from tests.comms.support import by_envelope, input_ids, open_runtime
from tests.conformance.stores import StoreFactory
from tests.helpers import ScriptedExecutor, settle


async def three(rt: Runtime) -> tuple[str, str, str]:
    ids = []
    for name in ("coord", "worker", "other"):
        ids.append((await rt.create_session(executor=ScriptedExecutor(), comms_name=name)).id)
    return ids[0], ids[1], ids[2]


async def snapshot(rt: Runtime, *sids: str) -> tuple[Any, ...]:
    states = [frozenset(await input_ids(rt, s)) for s in sids]
    requests = len(await rt.store.list_peer_requests())
    return (*states, requests)


async def refused(rt: Runtime, sids: tuple[str, ...], match: str, **send: Any) -> str:
    """``comms_send(**send)`` raises InvalidArgumentError matching ``match`` and nothing of any
    session changes; returns the message."""
    before = await snapshot(rt, *sids)
    sender = send.pop("sender")
    with pytest.raises(InvalidArgumentError, match=match) as err:
        await rt.comms_send(sender, **send)
    message = str(err.value)
    assert "\n" not in message
    for sid in sids:
        await settle(rt, sid)
    assert await snapshot(rt, *sids) == before
    return message


async def test_unknown_and_archived_peers_are_refused(store_factory: StoreFactory) -> None:
    async with open_runtime(store_factory) as rt:
        coord, worker, other = await three(rt)
        sids = (coord, worker, other)
        msg = await refused(
            rt, sids, "unknown peer 'nobody'", sender=coord, kind="message", to="nobody", body="x"
        )
        assert msg.startswith("to: ") and "peers: other, worker" in msg
        await rt.archive_session(worker)
        for kind, extra in (("message", {"body": "x"}), ("request", {"intent": "go"})):
            await refused(
                rt, sids, "peer 'worker' is archived", sender=coord, kind=kind, to="worker", **extra
            )
        assert [p["name"] for p in await rt.peers(coord)] == ["other"]


@pytest.mark.parametrize(
    ("send", "match"),
    [
        ({"kind": "shout", "to": "worker", "body": "x"}, "kind: unknown kind 'shout'"),
        ({"kind": "message", "to": "worker"}, "body: required for kind 'message'"),
        ({"kind": "message", "body": "x"}, "to: required for kind 'message'"),
        ({"kind": "message", "to": "coord", "body": "x"}, "own comms name"),
        (
            {"kind": "message", "to": "worker", "body": "x", "status": "completed"},
            "status: not used by kind 'message'",
        ),
        ({"kind": "request", "to": "worker"}, "intent: required for kind 'request'"),
        ({"kind": "request", "to": "worker", "intent": ""}, "intent: required"),
        (
            {"kind": "request", "to": "worker", "intent": "go", "params": [1, 2]},
            "params: must be a JSON object, got list",
        ),
        (
            {"kind": "request", "to": "worker", "intent": "go", "params": {"x": float("nan")}},
            "params: not a JSON value",
        ),
        (
            {"kind": "request", "to": "worker", "intent": "go", "body": "b"},
            "body: not used by kind 'request'",
        ),
        ({"kind": "response", "status": "completed"}, "in_reply_to: required for kind 'response'"),
        (
            {"kind": "response", "in_reply_to": "r", "status": "done"},
            "status: 'done' is not a response status",
        ),
        ({"kind": "response", "in_reply_to": "r"}, "status: None is not a response status"),
        (
            {"kind": "response", "in_reply_to": "r", "status": "completed", "intent": "i"},
            "intent: not used by kind 'response'",
        ),
        (
            {"kind": "message", "to": "worker", "body": "x", "envelope_id": "not-a-uuid"},
            "envelope_id: 'not-a-uuid' is not a UUID",
        ),
    ],
)
async def test_malformed_sends_are_refused(
    store_factory: StoreFactory, send: dict[str, Any], match: str
) -> None:
    async with open_runtime(store_factory) as rt:
        coord, worker, other = await three(rt)
        await refused(rt, (coord, worker, other), match, sender=coord, **send)


async def test_responses_must_answer_an_outstanding_request(store_factory: StoreFactory) -> None:
    async with open_runtime(store_factory) as rt:
        coord, worker, other = await three(rt)
        sids = (coord, worker, other)
        stranger = new_uuid7()
        await refused(
            rt,
            sids,
            f"in_reply_to: request '{stranger}' is not outstanding",
            sender=worker,
            kind="response",
            in_reply_to=stranger,
            status="completed",
        )
        # naming the requester does not help: coord has no such request
        await refused(
            rt,
            sids,
            "is not outstanding at session",
            sender=worker,
            kind="response",
            to="coord",
            in_reply_to=stranger,
            status="completed",
        )
        receipt = await rt.comms_send(coord, kind="request", to="worker", intent="go")
        rid = receipt["interaction_id"]
        await settle(rt, worker)
        # a peer the request was not sent to cannot answer it
        await refused(
            rt,
            sids,
            "no peer sent a request with that id to this session",
            sender=other,
            kind="response",
            in_reply_to=rid,
            status="completed",
        )
        await refused(
            rt,
            sids,
            "was sent to worker, not to this session",
            sender=other,
            kind="response",
            to="coord",
            in_reply_to=rid,
            status="completed",
        )
        # 'to' must be the requester
        await refused(
            rt,
            sids,
            "came from session",
            sender=worker,
            kind="response",
            to="other",
            in_reply_to=rid,
            status="completed",
        )
        done = await rt.comms_send(worker, kind="response", in_reply_to=rid, status="cancelled")
        await settle(rt, coord)
        # closed: a second terminal response, or more progress, is refused
        for status in ("completed", "in_progress"):
            await refused(
                rt,
                sids,
                r"already closed \(cancelled\)",
                sender=worker,
                kind="response",
                in_reply_to=rid,
                status=status,
            )
        # ... but a retry of the closing send (same envelope) is the same delivery
        again = await rt.comms_send(
            worker,
            kind="response",
            in_reply_to=rid,
            status="cancelled",
            envelope_id=done["envelope_id"],
        )
        assert again == done
        assert len([s for s in rt.list_inputs(coord, include_terminal=True)]) == 1


async def test_comms_names_are_validated_and_unique(store_factory: StoreFactory) -> None:
    async with open_runtime(store_factory) as rt:
        coord, worker, _ = await three(rt)
        before = [s.id for s in await rt.list_sessions(include_archived=True)]
        with pytest.raises(InvalidArgumentError, match="'worker' is already taken by session"):
            await rt.create_session(executor=ScriptedExecutor(), comms_name="worker")
        for bad in ("", "has space", "x" * 65, "ünï", "a/b"):
            with pytest.raises(InvalidArgumentError, match="is not a valid comms name"):
                await rt.create_session(executor=ScriptedExecutor(), comms_name=bad)
        assert [s.id for s in await rt.list_sessions(include_archived=True)] == before
        # archiving frees the name
        await rt.archive_session(worker)
        again = await rt.create_session(executor=ScriptedExecutor(), comms_name="worker")
        assert again.config["comms_name"] == "worker"
        assert {p["name"] for p in await rt.peers(coord)} == {"worker", "other"}
        # the store itself refuses a second holder (two processes racing past the check)
        now = datetime.now(UTC)
        dup = SessionRecord("dup", now, now, {"comms_name": "other"})
        with pytest.raises(CommsNameTakenError, match="'other' is already taken"):
            await rt.store.save_session(dup)
        assert await rt.store.load_session("dup") is None


async def test_senders_must_be_named_live_sessions(store_factory: StoreFactory) -> None:
    async with open_runtime(store_factory) as rt:
        coord, worker, other = await three(rt)
        plain = (await rt.create_session(executor=ScriptedExecutor())).id
        sids = (coord, worker, other, plain)
        await refused(
            rt, sids, "has no comms name", sender=plain, kind="message", to="worker", body="x"
        )
        assert plain not in {p["peer_id"] for p in await rt.peers(coord)}
        await rt.archive_session(other)
        await refused(
            rt,
            sids,
            "is archived; an archived session sends nothing",
            sender=other,
            kind="message",
            to="worker",
            body="x",
        )
        with pytest.raises(SessionNotFoundError):
            await rt.comms_send("no-such-session", kind="message", to="worker", body="x")


async def test_a_retried_send_delivers_once(store_factory: StoreFactory) -> None:
    async with open_runtime(store_factory) as rt:
        coord, worker, _ = await three(rt)
        env = new_uuid7()
        first = await rt.comms_send(coord, kind="message", to="worker", body="hi", envelope_id=env)
        second = await rt.comms_send(coord, kind="message", to="worker", body="hi", envelope_id=env)
        assert first == second and first["envelope_id"] == env
        await settle(rt, worker)
        assert len(rt.list_inputs(worker, include_terminal=True)) == 1

        renv = new_uuid7()
        r1 = await rt.comms_send(
            coord,
            kind="request",
            to="worker",
            intent="go",
            params={"b": 1, "a": 2},
            envelope_id=renv,
        )
        r2 = await rt.comms_send(  # same params in another key order: the same content
            coord,
            kind="request",
            to="worker",
            intent="go",
            params={"a": 2, "b": 1},
            envelope_id=renv,
        )
        assert r1 == r2
        await settle(rt, worker)
        assert len(rt.list_inputs(worker, include_terminal=True)) == 2
        assert [r.request_id for r in await rt.store.list_peer_requests()] == [r1["interaction_id"]]
        with pytest.raises(InvalidArgumentError, match=r"envelope_id: .* was already used"):
            await rt.comms_send(
                coord, kind="request", to="worker", intent="other", envelope_id=renv
            )
        # a different message under a used envelope id is a conflict, not a second delivery
        with pytest.raises(InvalidArgumentError, match="idempotency_conflict"):
            await rt.comms_send(coord, kind="message", to="worker", body="bye", envelope_id=env)

        penv = new_uuid7()
        for _ in range(2):
            await rt.comms_send(
                worker,
                kind="response",
                in_reply_to=r1["interaction_id"],
                status="accepted",
                envelope_id=penv,
            )
        await settle(rt, coord)
        assert len(rt.list_inputs(coord, include_terminal=True)) == 1
        assert by_envelope(rt, coord, penv) is not None


async def test_the_requesters_runtime_checks_hand_built_responses(
    store_factory: StoreFactory,
) -> None:
    """S20 in the driver: a response accepted directly (``Runtime.accept``) by a named
    session's runtime must answer one of its outstanding requests, from the peer the request
    went to; the terminal one closes it; nothing is recorded for a refused one."""
    async with open_runtime(store_factory) as rt:
        coord, worker, other = await three(rt)

        def response(rid: str, sender: str, sender_name: str, terminal: bool = True) -> PeerInput:
            conv: Any = (
                ResponseTerminalConvention(request_id=rid, status="completed")  # type: ignore[arg-type]
                if terminal
                else ResponseProgressConvention(request_id=rid, phase="accepted")  # type: ignore[arg-type]
            )
            return PeerInput.new("{}", peer_id=sender_name, runtime_id=sender, convention=conv)

        out = await rt.accept(coord, response("req-1", worker, "worker"))
        assert isinstance(out, Rejected) and out.code.value == "invalid"
        assert "no request with that id is outstanding at session" in out.reason
        assert await input_ids(rt, coord) == set()

        rid = (await rt.comms_send(coord, kind="request", to="worker", intent="go"))[
            "interaction_id"
        ]
        out = await rt.accept(coord, response(rid, other, "other"))
        assert isinstance(out, Rejected) and "it was sent to peer worker" in out.reason
        out = await rt.accept(coord, response(rid, worker, "worker", terminal=False))
        assert isinstance(out, Accepted)
        ok = response(rid, worker, "worker")
        out = await rt.accept(coord, ok)
        assert isinstance(out, Accepted)
        rec = await rt.store.load_peer_request(coord, rid)
        assert rec is not None and rec.status == "completed" and rec.closed_by == str(ok.id)
        out = await rt.accept(coord, response(rid, worker, "worker"))
        assert isinstance(out, Rejected) and "already closed (completed)" in out.reason
        await settle(rt, coord)
        assert len(await input_ids(rt, coord)) == 2  # the progress and the terminal one


async def test_sessions_without_a_comms_name_take_responses_unchecked(
    store_factory: StoreFactory,
) -> None:
    """A runtime that takes no part in comms keeps no requests: an application bringing its
    own transport correlates responses itself (the conformance suite's hand-built inputs)."""
    async with open_runtime(store_factory) as rt:
        plain = (await rt.create_session(executor=ScriptedExecutor())).id
        conv = ResponseTerminalConvention(request_id="req-1", status="completed")  # type: ignore[arg-type]
        out = await rt.accept(plain, PeerInput.new("{}", peer_id="p", convention=conv))
        assert isinstance(out, Accepted)


async def test_a_refused_request_is_not_left_outstanding(store_factory: StoreFactory) -> None:
    async with open_runtime(store_factory) as rt:
        coord, worker, _ = await three(rt)
        await rt.retire(worker)  # retired, not archived: it refuses input (not_ready)
        with pytest.raises(InvalidOperationError, match=r"not delivered \(not_ready\)"):
            await rt.comms_send(coord, kind="request", to="worker", intent="go")
        assert await rt.store.list_peer_requests() == []


async def test_peers_lists_the_other_named_sessions(store_factory: StoreFactory) -> None:
    async with open_runtime(store_factory) as rt:
        coord, worker, other = await three(rt)
        await rt.create_session(executor=ScriptedExecutor())  # unnamed: not a peer
        peers = await rt.peers(coord)
        assert peers == [
            {
                "name": name,
                "peer_id": sid,
                "address": f"session:{sid}",
                "source": "store",
                "sendable_kinds": ["message", "request", "response"],
                "capabilities": {},
                "meta": {},
            }
            for name, sid in (("worker", worker), ("other", other))
        ]
        with pytest.raises(SessionNotFoundError):
            await rt.peers("nope")
