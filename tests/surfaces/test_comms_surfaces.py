"""Peer comms through every surface: ``POST /comms/send`` and ``GET /comms/peers`` on a live
uvicorn server, ``comms/send`` and ``comms/peers`` on ``rkat-rpc`` (raw JSON-RPC and the
official SDK's ``send`` / ``peers``), and ``meerkat send --to`` / ``meerkat peers`` as
subprocesses. Sessions get their comms name at creation on each surface. Every refused send
answers the documented error and delivers nothing. Offline model only."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from meerkat_runtime import Runtime
from meerkat_runtime.runtime.inputs import (
    MessageConvention,
    RequestConvention,
    ResponseProgressConvention,
    ResponseTerminalConvention,
)
from tests.comms.support import by_envelope, input_ids, peer_input, until

from .test_rest_support import Api, api_for, rt_config
from .test_rpc import RKAT_RPC, RpcClient

needs_rpc = pytest.mark.skipif(not RKAT_RPC.exists(), reason="rkat-rpc is not installed")

# ------------------------------------------------------------------ REST


async def create(c: httpx.AsyncClient, name: str, **extra: Any) -> str:
    r = await c.post("/sessions", json={"initial_turn": "deferred", "comms_name": name, **extra})
    assert r.status_code == 200, r.text
    sid: str = r.json()["session_id"]
    return sid


async def send(c: httpx.AsyncClient, **body: Any) -> httpx.Response:
    return await c.post("/comms/send", json=body)


async def sent(c: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    r = await send(c, **body)
    assert r.status_code == 200, r.text
    receipt: dict[str, Any] = r.json()
    return receipt


async def history_text(c: httpx.AsyncClient, sid: str) -> str:
    r = await c.get(f"/sessions/{sid}/history")
    assert r.status_code == 200, r.text
    return "\n".join(str(m.get("content", "")) for m in r.json()["messages"])


async def test_rest_message_request_response_round_trip() -> None:
    async with api_for() as api:
        c, rt = api.client, api.rt
        coord = await create(c, "coord")
        worker = await create(c, "worker")

        # creation checks the name before anything is created
        for body, field, code in (
            ({"comms_name": "coord"}, "comms_name", "bad_request"),  # taken
            ({"comms_name": "no spaces"}, "comms_name", "bad_request"),
            ({"comms_name": "x", "peer_meta": {"role": "lead"}}, "peer_meta", "unsupported"),
        ):
            r = await c.post("/sessions", json={"initial_turn": "deferred", **body})
            assert r.status_code == 400, r.text
            assert r.json()["code"] == code and r.json()["field"] == field, r.text
        assert len(await rt.list_sessions()) == 2

        r = await c.get("/comms/peers", params={"session_id": coord})
        assert r.status_code == 200, r.text
        assert r.json() == {
            "peers": [
                {
                    "name": "worker",
                    "peer_id": worker,
                    "address": f"session:{worker}",
                    "source": "store",
                    "sendable_kinds": ["message", "request", "response"],
                    "capabilities": {},
                    "meta": {},
                }
            ]
        }

        # a message; a retry with its envelope id answers the same receipt, delivers nothing
        receipt = await sent(c, session_id=coord, kind="message", to="worker", body="hello")
        assert receipt["kind"] == "peer_message_sent" and receipt["acked"] is True
        env = receipt["envelope_id"]
        st = by_envelope(rt, worker, env)
        inp = peer_input(st)
        assert isinstance(inp.convention, MessageConvention) and inp.body == "hello"
        assert inp.header.source.peer_id == "coord"  # type: ignore[union-attr]
        before = await input_ids(rt, worker)
        again = await sent(
            c, session_id=coord, kind="message", to="worker", body="hello", envelope_id=env
        )
        assert again == receipt and await input_ids(rt, worker) == before

        # a request (0.4.10's kind name), progress and the terminal response
        receipt = await sent(
            c,
            session_id=coord,
            kind="peer_request",
            to="worker",
            intent="multiply",
            params={"b": 7, "a": 6},
        )
        assert receipt["kind"] == "peer_request_sent" and receipt["stream_reserved"] is False
        rid = receipt["interaction_id"]
        conv = peer_input(by_envelope(rt, worker, receipt["envelope_id"])).convention
        assert isinstance(conv, RequestConvention) and conv.request_id == rid
        assert conv.intent == "multiply"
        rec = await rt.store.load_peer_request(coord, rid)
        assert rec is not None and rec.closed_at is None

        progress = await sent(
            c, session_id=worker, kind="response", in_reply_to=rid, status="accepted"
        )
        assert progress["kind"] == "peer_response_sent" and progress["in_reply_to"] == rid
        conv = peer_input(by_envelope(rt, coord, progress["envelope_id"])).convention
        assert isinstance(conv, ResponseProgressConvention)
        done = await sent(
            c,
            session_id=worker,
            kind="peer_response",
            in_reply_to=rid,
            status="completed",
            result={"product": 42},
            to="coord",
        )
        st = by_envelope(rt, coord, done["envelope_id"])
        assert isinstance(peer_input(st).convention, ResponseTerminalConvention)
        assert peer_input(st).body == '{"product":42}'
        rec = await rt.store.load_peer_request(coord, rid)
        assert rec is not None and rec.status == "completed"

        # the coordinator's agent saw the answer, with its sender and status
        for _ in range(200):
            text = await history_text(c, coord)
            if f"[peer response (completed) to request {rid} from worker]" in text:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"the answer never reached the coordinator: {text}")
        assert "[peer message from coord] hello" in await history_text(c, worker)

        # a request takes one terminal response
        r = await send(
            c, session_id=worker, kind="response", in_reply_to=rid, status="failed", result=None
        )
        assert r.status_code == 400 and r.json()["field"] == "in_reply_to", r.text
        assert "already closed" in r.json()["error"]


async def snapshot(api: Api, *sids: str) -> tuple[Any, ...]:
    states = []
    for sid in sids:
        r = await api.client.get(f"/input/{sid}", params={"include_terminal": "true"})
        states.append(frozenset(r.json()["input_ids"]) if r.status_code == 200 else r.status_code)
    return (*states, len(await api.rt.store.list_peer_requests()))


async def test_rest_bad_sends_answer_documented_errors_and_deliver_nothing() -> None:
    async with api_for(config=rt_config(max_input_bytes=4096)) as api:
        c, rt = api.client, api.rt
        coord = await create(c, "coord")
        worker = await create(c, "worker")
        gone = await create(c, "gone")
        retired = await create(c, "retired")
        plain = (await rt.create_session()).id  # no comms name
        assert (await c.delete(f"/sessions/{gone}")).status_code == 200
        r = await c.post(f"/runtime/{retired}/retire")
        assert r.status_code == 200, r.text
        sids = (coord, worker, retired)
        before = await snapshot(api, *sids)

        rid = "01960000-0000-7000-8000-000000000000"
        m = {"session_id": coord, "kind": "message", "to": "worker"}
        cases: list[tuple[dict[str, Any], int, str, str | None, str]] = [
            # (body, status, code, field, in the message)
            ({**m, "to": "nobody", "body": "x"}, 400, "bad_request", "to", "unknown peer"),
            ({**m, "to": "gone", "body": "x"}, 400, "bad_request", "to", "archived"),
            ({**m, "to": "coord", "body": "x"}, 400, "bad_request", "to", "itself"),
            (m, 400, "bad_request", "body", "required"),
            ({**m, "body": 5}, 400, "bad_request", "body", "expected a string"),
            ({**m, "body": "x", "status": "completed"}, 400, "bad_request", "status", "not used"),
            ({**m, "body": "x", "kind": "bogus"}, 400, "bad_request", "kind", "unknown kind"),
            ({**m, "body": "x", "kind": "input"}, 400, "unsupported", "kind", "not a peer"),
            ({**m, "body": "x", "stream": True}, 400, "unsupported", "stream", "not supported"),
            ({**m, "body": "x", "envelope_id": "e1"}, 400, "bad_request", "envelope_id", "UUID"),
            (
                {**m, "kind": "request", "intent": "go", "params": [1]},
                400,
                "bad_request",
                "params",
                "JSON object",
            ),
            ({**m, "kind": "request"}, 400, "bad_request", "intent", "required"),
            (
                {**m, "kind": "response", "in_reply_to": rid, "status": "done"},
                400,
                "bad_request",
                "status",
                "not a response status",
            ),
            (
                {"session_id": worker, "kind": "response", "in_reply_to": rid, "status": "failed"},
                400,
                "bad_request",
                "in_reply_to",
                "not outstanding",
            ),
            ({**m, "body": "x" * 5000}, 413, "too_large", None, "too_large"),
            ({**m, "to": "retired", "body": "x"}, 503, "not_ready", None, "not_ready"),
            ({**m, "session_id": "no-such-session", "body": "x"}, 404, "not_found", None, "no"),
            ({**m, "session_id": plain, "body": "x"}, 400, "bad_request", None, "no comms name"),
            ({**m, "session_id": gone, "body": "x"}, 400, "bad_request", "session_id", "archived"),
            ({"kind": "message"}, 400, "bad_request", "session_id", "expected a string"),
        ]
        for body, status, code, field, text in cases:
            r = await send(c, **body)
            doc = r.json()
            assert r.status_code == status, (body, r.text)
            assert doc["code"] == code and text in doc["error"], (body, doc)
            assert "\n" not in doc["error"]
            if field is not None:
                assert doc["field"] == field, (body, doc)
        r = await send(c, **{**m, "body": "x" * 5000})
        assert r.json()["reject_code"] == "too_large"
        assert r.headers.get("retry-after") is None
        r = await send(c, **{**m, "to": "retired", "body": "x"})
        assert r.json()["reject_code"] == "not_ready" and r.headers["retry-after"] == "1"
        r = await c.post("/comms/send", content=b"{not json")
        assert r.status_code == 400 and r.json()["field"] == "body"
        r = await send(c, session_id=gone, kind="response", in_reply_to=rid, status="completed")
        assert r.status_code == 400 and r.json().get("archived") is True

        assert await snapshot(api, *sids) == before  # nothing delivered, no request recorded

        # reusing an envelope id for other content: 409, the first delivery stands
        first = await sent(c, **{**m, "body": "first"})
        r = await send(c, **{**m, "body": "second", "envelope_id": first["envelope_id"]})
        assert r.status_code == 409, r.text
        assert r.json()["reject_code"] == "idempotency_conflict"
        assert peer_input(by_envelope(rt, worker, first["envelope_id"])).body == "first"

        r = await c.get("/comms/peers", params={"session_id": "no-such-session"})
        assert r.status_code == 404 and r.json()["code"] == "not_found"
        r = await c.get("/comms/peers")
        assert r.status_code == 400 and r.json()["field"] == "session_id"
        r = await c.get("/comms/peers", params={"session_id": plain})
        assert [p["name"] for p in r.json()["peers"]] == ["coord", "worker", "retired"]


# ------------------------------------------------------------------ JSON-RPC


@needs_rpc
async def test_rpc_comms_send_and_peers(tmp_path: Path) -> None:
    rpc = await RpcClient.start(tmp_path / "state", "--shutdown-grace", "3")
    try:
        init = await rpc.call("initialize", {})
        assert "comms/send" in init["methods"] and "comms/peers" in init["methods"]
        caps = await rpc.call("capabilities/get")
        assert {c["id"]: c["status"] for c in caps["capabilities"]}["comms"] == "Available"

        a = (await rpc.call("session/create", {"initial_turn": "deferred", "comms_name": "a"}))[
            "session_id"
        ]
        b = (await rpc.call("session/create", {"prompt": "hi", "comms_name": "b"}))["session_id"]
        peers = await rpc.call("comms/peers", {"session_id": a})
        assert peers == {
            "peers": [
                {
                    "name": "b",
                    "peer_id": b,
                    "address": f"session:{b}",
                    "source": "store",
                    "sendable_kinds": ["message", "request", "response"],
                    "capabilities": {},
                }
            ]
        }  # no meta, as 0.4.10

        receipt = await rpc.call(
            "comms/send", {"session_id": a, "kind": "peer_message", "to": "b", "body": "hello"}
        )
        assert receipt["kind"] == "peer_message_sent" and receipt["acked"] is True
        request = await rpc.call(
            "comms/send",
            {"session_id": a, "kind": "request", "to": "b", "intent": "sum", "params": {"x": 1}},
        )
        rid = request["interaction_id"]
        response = await rpc.call(
            "comms/send",
            {
                "session_id": b,
                "kind": "response",
                "in_reply_to": rid,
                "status": "completed",
                "result": 1,
            },
        )
        assert response == {
            "kind": "peer_response_sent",
            "envelope_id": response["envelope_id"],
            "in_reply_to": rid,
        }

        base = {"session_id": a, "kind": "message", "to": "b"}
        for params, code, field in (
            ({**base, "to": "nobody", "body": "x"}, -32602, "to"),
            (base, -32602, "body"),
            ({**base, "body": "x", "kind": 3}, -32602, "kind"),
            ({**base, "body": "x", "params": "no"}, -32602, "params"),
            ({**base, "session_id": "nope", "body": "x"}, -32001, None),
        ):
            err = await rpc.error("comms/send", params)
            assert err["code"] == code, (params, err)
            if field is not None:
                assert err["data"]["field"] == field and err["data"]["code"] == "bad_request"
        err = await rpc.error("comms/peers", {"session_id": "nope"})
        assert err["code"] == -32001
        err = await rpc.error("comms/peers", {})
        assert err["code"] == -32602 and err["data"]["field"] == "session_id"

        await rpc.call("session/archive", {"session_id": a})
        err = await rpc.error("comms/send", {**base, "body": "x"})
        assert err["code"] == -32602 and "archived" in err["message"]
        assert err["data"]["archived"] is True
        peers = await rpc.call("comms/peers", {"session_id": b})
        assert peers == {"peers": []}  # an archived session is nobody's peer
    finally:
        rc = await rpc.close()
    assert rc == 0, rpc.stderr.decode()


@needs_rpc
async def test_official_sdk_send_and_peers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    meerkat = pytest.importorskip("meerkat")
    monkeypatch.delenv("MEERKAT_OFFLINE_SCRIPT", raising=False)
    monkeypatch.delenv("MEERKAT_BIN_PATH", raising=False)
    client = meerkat.MeerkatClient(rkat_path=str(RKAT_RPC))
    await client.connect(state_root=str(tmp_path / "state"))
    try:
        assert client.has_capability("comms")
        client.require_capability("comms")
        alpha = await client.create_session("hi", comms_name="alpha")
        beta = await client.create_session("hi", comms_name="beta")
        assert [p["name"] for p in await alpha.peers()] == ["beta"]
        raw = await client.peers(beta.id)
        assert [p["peer_id"] for p in raw["peers"]] == [alpha.id]

        receipt = await alpha.send(kind="peer_message", to="beta", body="hello")
        assert receipt["kind"] == "peer_message_sent" and receipt["acked"] is True
        request = await client.send(
            alpha.id, kind="peer_request", to="beta", intent="multiply", params={"a": 6, "b": 7}
        )
        assert request["kind"] == "peer_request_sent"
        answer = await beta.send(
            kind="peer_response",
            in_reply_to=request["interaction_id"],
            status="completed",
            result={"product": 42},
        )
        assert answer["in_reply_to"] == request["interaction_id"]

        with pytest.raises(meerkat.MeerkatError) as caught:
            await alpha.send(kind="peer_message", to="nobody", body="x")
        assert caught.value.code == "-32602" and "unknown peer" in caught.value.message
        assert caught.value.details["field"] == "to"
    finally:
        await client.close()


# ------------------------------------------------------------------ CLI

Result = subprocess.CompletedProcess[str]


def cli_runner(home: Path) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEERKAT_")}
    env["MEERKAT_STATE_DIR"] = str(home)

    def run(*args: str) -> Result:
        return subprocess.run(
            [sys.executable, "-m", "meerkat_runtime", *args],
            env=env,
            cwd=home,
            capture_output=True,
            text=True,
            timeout=60,
            input="",
        )

    return run


def ok(r: Result, code: int = 0) -> Result:
    assert r.returncode == code, f"exit {r.returncode}, expected {code}: {r.stderr}{r.stdout}"
    return r


def one_error_line(r: Result) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (r.args, r.stderr)
    return lines[0]


def test_cli_send_to_a_peer_and_list_peers(tmp_path: Path) -> None:
    cli = cli_runner(tmp_path)
    ok(cli("sessions", "list"))  # the database exists before commands run side by side

    def parallel(*commands: Sequence[str]) -> list[Result]:
        with ThreadPoolExecutor(max_workers=len(commands)) as pool:
            return list(pool.map(lambda cmd: cli(*cmd), commands))

    made = parallel(
        ("sessions", "create", "--comms-name", "coord"),
        ("sessions", "create", "--comms-name", "worker"),
    )
    coord, worker = (ok(r).stdout.strip() for r in made)

    peers, listed, taken = parallel(
        ("peers", "coord"),
        ("peers", worker, "--json"),
        ("sessions", "create", "--comms-name", "worker"),
    )
    assert "worker" in ok(peers).stdout and worker in peers.stdout
    assert "NAME" in peers.stdout and "message, request, response" in peers.stdout
    doc = json.loads(ok(listed).stdout)
    assert doc["session_id"] == worker and [p["peer_id"] for p in doc["peers"]] == [coord]
    assert "already taken" in one_error_line(ok(taken, 2))

    message, request = parallel(
        ("send", "coord", "hello worker", "--to", "worker", "--json"),
        ("send", coord, '{"a": 6, "b": 7}', "--to", "worker", "--request", "multiply"),
    )
    receipt = json.loads(ok(message).stdout)
    assert receipt["kind"] == "peer_message_sent" and receipt["acked"] is True
    rid = ok(request).stdout.strip()
    assert "request" in request.stderr and "multiply" in request.stderr

    answer = ok(cli("send", "worker", '{"product": 42}', "--reply-to", rid))
    envelope = answer.stdout.strip()
    assert "response (completed)" in answer.stderr
    # a second answer goes to the inbox too (the request closes when the coordinator's
    # runtime admits the first); the coordinator's runtime refuses it when it takes it in
    ok(cli("send", "worker", "late", "--reply-to", rid, "--status", "failed"))

    bad = parallel(
        ("send", "coord", "x", "--to", "nobody"),
        ("send", "nobody", "x", "--to", "worker"),
        ("send", "coord", "x", "--to", "worker", "--no-wait"),
        ("send", "coord", "[1]", "--to", "worker", "--request", "go"),
        ("send", "coord", "x", "--status", "completed"),
        ("send", "coord", "x", "--to", "nobody", "--json"),
    )
    assert "unknown peer 'nobody'" in one_error_line(ok(bad[0], 2))
    assert "no session 'nobody'" in one_error_line(ok(bad[1], 4))
    assert "--no-wait" in one_error_line(ok(bad[2], 2))
    assert "JSON object" in one_error_line(ok(bad[3], 2))
    assert "--status" in one_error_line(ok(bad[4], 2))
    assert json.loads(ok(bad[5], 2).stdout)["field"] == "to"

    # the sends wait in the targets' durable inboxes; a process that runs them takes them in
    async def check() -> None:
        async with Runtime.open(f"sqlite:///{tmp_path / 'meerkat.db'}") as rt:
            for sid in (coord, worker):
                await rt.load(sid)
            await until(lambda: len(rt.list_inputs(worker, include_terminal=True)) == 2)
            await until(lambda: len(rt.list_inputs(coord, include_terminal=True)) == 2)
            (late,) = (
                s
                for s in rt.list_inputs(coord, include_terminal=True)
                if peer_input(s).body == '"late"'
            )
            assert late.current_state.value == "abandoned"
            assert late.terminal_outcome is not None
            assert "already closed" in json.dumps(late.terminal_outcome.to_json_dict())
            bodies = {peer_input(s).body for s in rt.list_inputs(worker, include_terminal=True)}
            assert bodies == {"hello worker", '{"a":6,"b":7}'}
            st = by_envelope(rt, coord, envelope)
            assert isinstance(peer_input(st).convention, ResponseTerminalConvention)
            rec = await rt.store.load_peer_request(coord, rid)
            assert rec is not None and rec.status == "completed" and rec.closed_by == envelope
            assert await rt.store.inbox_entries(coord) == []

    asyncio.run(check())
