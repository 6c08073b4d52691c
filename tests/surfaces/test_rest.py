"""The REST surface against a real uvicorn server on 127.0.0.1 (issue 5).

Sessions and turns (create, turn, read, history, list, archive; per-turn overrides applied;
idempotent turns), the runtime and input endpoints (wrong state is 409, not 404; accept's
413/429), the long poll, system context, auth, bad input that changes nothing, and
``serve``'s refusal to listen beyond loopback without a token. Event streams and the
schemathesis run live in ``test_rest_events.py`` and ``test_rest_schema.py``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from meerkat_runtime import PromptInput
from meerkat_runtime.runtime.policy import PolicyRow, PolicyTable, default_policy_table
from meerkat_runtime.surfaces import rest
from meerkat_runtime.surfaces.common import ERROR_CODES

from .test_rest_support import Api, api_for, rt_config

SLOW = [{"type": "text", "text": "slow answer", "delay": 30}]


@pytest.fixture
async def api() -> Any:
    async with api_for() as a:
        yield a


async def scripted(api: Api, script: list[dict[str, Any]], **kw: Any) -> str:
    return (await api.rt.create_session(model="offline", offline_script=script, **kw)).id


async def until(pred: Any, what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = pred()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def runtime_state(api: Api, sid: str) -> str:
    r = await api.client.get(f"/runtime/{sid}/state")
    assert r.status_code == 200, r.text
    state: str = r.json()["state"]
    return state


def prompt_json(text: str, **header: Any) -> dict[str, Any]:
    return PromptInput.new(text, **header).to_json_dict()


def assert_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body: dict[str, Any] = r.json()
    assert body["code"] == code, body
    assert isinstance(body["error"], str) and body["error"]
    return body


# ------------------------------------------------------------------ the status table


def test_every_error_code_has_one_status() -> None:
    assert set(rest.STATUS_BY_CODE) == set(ERROR_CODES)
    assert rest.STATUS_BY_CODE["not_found"] == 404
    assert rest.STATUS_BY_CODE["conflict"] == 409
    assert all(400 <= s < 600 for s in rest.STATUS_BY_CODE.values())


# ------------------------------------------------------------------ sessions and turns


async def test_create_turn_read_history_list_archive(api: Api) -> None:
    c = api.client
    assert (await c.get("/health")).json() == {"status": "ok"}
    r = await c.post("/sessions", json={"prompt": "hello", "labels": {"team": "a"}})
    assert r.status_code == 200, r.text
    first = r.json()
    sid = first["session_id"]
    assert "hello" in first["text"]
    assert first["turns"] == 1 and first["tool_calls"] == 0
    assert first["usage"]["output_tokens"] > 0

    r = await c.post(f"/sessions/{sid}/messages", json={"prompt": "more"})
    assert r.status_code == 200, r.text
    assert '"more"' in r.json()["text"] and r.json()["session_id"] == sid

    info = (await c.get(f"/sessions/{sid}")).json()
    assert info["session_id"] == sid and info["message_count"] == 4
    assert info["labels"] == {"team": "a"} and info["model"] == "offline"
    assert info["archived"] is False and info["is_active"] is False
    assert info["total_tokens"] == info["usage"]["total_tokens"] > 0

    page = (await c.get(f"/sessions/{sid}/history", params={"offset": 1, "limit": 2})).json()
    assert page["offset"] == 1 and page["limit"] == 2 and page["has_more"] is True
    assert [m["role"] for m in page["messages"]] == ["assistant", "user"]
    assert page["message_count"] == 4

    other = (await c.post("/sessions", json={"prompt": "x", "labels": {"team": "b"}})).json()
    listed = (await c.get("/sessions")).json()["sessions"]
    assert [s["session_id"] for s in listed] == [sid, other["session_id"]]
    assert listed[0]["message_count"] == 4 and listed[0]["labels"] == {"team": "a"}
    only_a = (await c.get("/sessions", params={"label": "team=a"})).json()["sessions"]
    assert [s["session_id"] for s in only_a] == [sid]
    both = await c.get("/sessions", params=[("label", "team=a"), ("label", "x=y")])
    assert both.json() == {"sessions": []}
    paged = (await c.get("/sessions", params={"offset": 1, "limit": 1})).json()["sessions"]
    assert [s["session_id"] for s in paged] == [other["session_id"]]

    r = await c.delete(f"/sessions/{sid}")
    assert r.json() == {"session_id": sid, "archived": True}
    listed = (await c.get("/sessions")).json()["sessions"]
    assert [s["session_id"] for s in listed] == [other["session_id"]]
    archived = (await c.get("/sessions", params={"include_archived": "true"})).json()
    assert len(archived["sessions"]) == 2
    assert (await c.get(f"/sessions/{sid}")).json()["archived"] is True
    assert (await c.get(f"/sessions/{sid}/history")).json()["message_count"] == 4
    assert_error(await c.post(f"/sessions/{sid}/messages", json={"prompt": "?"}), 409, "conflict")
    assert_error(
        await c.post(f"/sessions/{sid}/system_context", json={"text": "?"}), 409, "conflict"
    )


async def test_deferred_create_prepends_its_prompt_to_the_first_turn(api: Api) -> None:
    c = api.client
    r = await c.post("/sessions", json={"prompt": "context", "initial_turn": "deferred"})
    assert r.status_code == 200 and set(r.json()) == {"session_id"}
    sid = r.json()["session_id"]
    assert (await c.get(f"/sessions/{sid}")).json()["message_count"] == 0
    r = await c.post(f"/sessions/{sid}/messages", json={"prompt": "go", "session_id": sid})
    assert r.status_code == 200, r.text
    assert "context\n\ngo" in r.json()["text"]


async def test_create_settings_apply(api: Api) -> None:
    r = await api.client.post(
        "/sessions",
        json={
            "prompt": "hi",
            "system_prompt": "be brief",
            "max_tokens": 64,
            "budget_limits": {"max_turns": 3},
            "enable_shell": False,
        },
    )
    assert r.status_code == 200, r.text
    rec = await api.rt.store.load_session(r.json()["session_id"])
    assert rec is not None
    assert rec.config["system_prompt"] == "be brief" and rec.config["max_tokens"] == 64
    assert rec.config["max_turns"] == 3
    # an unsupported feature asked for is refused, and nothing is created
    r = await api.client.post("/sessions", json={"prompt": "hi", "enable_shell": True})
    assert_error(r, 400, "unsupported")
    assert len(await api.rt.list_sessions()) == 1


async def test_per_turn_overrides_apply_to_that_turn_only(api: Api) -> None:
    sid = await scripted(
        api,
        [
            {"type": "text", "text": '{"answer": 42}'},
            {"type": "text", "text": '{"answer": 7}'},
            {"type": "text", "text": '{"answer": 8}'},
        ],
    )
    c = api.client
    plain = (await c.post(f"/sessions/{sid}/messages", json={"prompt": "q1"})).json()
    assert "structured_output" not in plain
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"],
    }
    r = await c.post(f"/sessions/{sid}/messages", json={"prompt": "q2", "output_schema": schema})
    assert r.status_code == 200, r.text
    assert r.json()["structured_output"] == {"answer": 7}
    after = (await c.post(f"/sessions/{sid}/messages", json={"prompt": "q3"})).json()
    assert "structured_output" not in after
    # an override of the wrong type is a 400 naming it, before anything is accepted
    r = await c.post(f"/sessions/{sid}/messages", json={"prompt": "q", "max_tokens": "many"})
    body = assert_error(r, 400, "bad_request")
    assert body["field"] == "max_tokens"
    assert (await c.get(f"/sessions/{sid}")).json()["message_count"] == 6


async def test_duplicate_turn_answers_the_original_and_conflict_is_409(api: Api) -> None:
    c = api.client
    sid = (await c.post("/sessions", json={"prompt": "start"})).json()["session_id"]
    r1 = await c.post(f"/sessions/{sid}/messages", json={"prompt": "p", "idempotency_key": "k1"})
    assert r1.status_code == 200 and "existing_id" not in r1.json()
    r2 = await c.post(f"/sessions/{sid}/messages", json={"prompt": "p", "idempotency_key": "k1"})
    assert r2.status_code == 200, r2.text
    dup = r2.json()
    assert dup.pop("existing_id")
    assert dup == r1.json()
    r3 = await c.post(f"/sessions/{sid}/messages", json={"prompt": "q", "idempotency_key": "k1"})
    body = assert_error(r3, 409, "conflict")
    assert body["reject_code"] == "idempotency_conflict"
    assert (await c.get(f"/sessions/{sid}")).json()["message_count"] == 4


async def test_duplicate_of_an_in_flight_turn_waits_for_it() -> None:
    async with api_for() as api:
        sid = await scripted(api, [{"type": "text", "text": "late answer", "delay": 0.5}])
        c = api.client
        body = {"prompt": "p", "idempotency_key": "k"}
        r = await c.post(f"/sessions/{sid}/messages", params={"wait": "false"}, json=body)
        assert r.status_code == 202, r.text
        accepted = r.json()
        assert accepted["outcome"]["outcome_type"] == "accepted"
        dup = await c.post(f"/sessions/{sid}/messages", json=body)
        assert dup.status_code == 200, dup.text
        assert dup.json()["text"] == "late answer"
        assert dup.json()["existing_id"] == accepted["input_id"]


async def test_wait_false_then_long_poll_202_then_outcome() -> None:
    async with api_for() as api:
        sid = await scripted(api, [{"type": "text", "text": "done late", "delay": 0.6}])
        c = api.client
        r = await c.post(
            f"/sessions/{sid}/messages", params={"wait": "false"}, json={"prompt": "p"}
        )
        assert r.status_code == 202
        iid = r.json()["input_id"]
        ids = (await c.get(f"/input/{sid}")).json()["input_ids"]
        assert iid in ids
        pending = await c.get(f"/input/{sid}/{iid}/wait", params={"timeout": 0.05})
        assert pending.status_code == 202
        assert pending.json()["done"] is False and pending.json()["input_id"] == iid
        assert pending.json()["state"] not in ("consumed", "abandoned", "superseded")
        done = await c.get(f"/input/{sid}/{iid}/wait", params={"timeout": 10})
        assert done.status_code == 200, done.text
        out = done.json()
        assert out["outcome_type"] == "completed" and out["input_id"] == iid
        assert out["result"]["text"] == "done late"
        st = (await c.get(f"/input/{sid}/{iid}")).json()
        assert st["input_id"] == iid and st["current_state"] == "consumed"
        assert (await c.get(f"/input/{sid}")).json() == {"input_ids": []}
        full = (await c.get(f"/input/{sid}", params={"include_terminal": "true"})).json()
        assert iid in full["input_ids"] and "inputs" not in full
        detail = await c.get(f"/input/{sid}", params={"include_terminal": 1, "detail": 1})
        assert [s["input_id"] for s in detail.json()["inputs"]] == detail.json()["input_ids"]
        # the 0.4.10 path still lists
        assert (await c.get(f"/input/{sid}/list")).json() == {"input_ids": []}
        # a terminal input answers at once
        again = await c.get(f"/input/{sid}/{iid}/wait", params={"timeout": 0})
        assert again.status_code == 200 and again.json()["outcome_type"] == "completed"


async def test_interrupt_cancels_the_waiting_turn_with_409() -> None:
    async with api_for() as api:
        sid = await scripted(api, SLOW)
        c = api.client
        turn = asyncio.create_task(c.post(f"/sessions/{sid}/messages", json={"prompt": "p"}))
        await until(lambda: api.rt.runtime(sid).active_run_id is not None, "an active run")
        assert await runtime_state(api, sid) == "running"
        r = await c.post(f"/sessions/{sid}/interrupt")
        assert r.json() == {"session_id": sid, "interrupted": True}
        body = assert_error(await turn, 409, "cancelled")
        assert body["input_id"]
        r = await c.post(f"/sessions/{sid}/interrupt")
        assert r.json() == {"session_id": sid, "interrupted": False}


async def test_system_context_applied_staged_duplicate() -> None:
    async with api_for() as api:
        c = api.client
        sid = await scripted(api, [])
        r = await c.post(
            f"/sessions/{sid}/system_context",
            json={"text": "it is noon", "source": "clock", "idempotency_key": "c1"},
        )
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "applied" and r.json()["session_id"] == sid
        first_id = r.json()["input_id"]
        st = (await c.get(f"/input/{sid}/{first_id}")).json()
        assert st["current_state"] == "consumed"
        assert st["persisted_input"]["input_type"] == "system_generated"
        assert st["persisted_input"]["generator"] == "clock"
        r = await c.post(
            f"/sessions/{sid}/system_context", json={"text": "it is noon", "idempotency_key": "c1"}
        )
        # same key, other source: other content -> conflict; same content -> duplicate
        assert_error(r, 409, "conflict")
        r = await c.post(
            f"/sessions/{sid}/system_context",
            json={"text": "it is noon", "source": "clock", "idempotency_key": "c1"},
        )
        assert r.json() == {"session_id": sid, "status": "duplicate", "input_id": first_id}

        busy = await scripted(api, SLOW)
        turn = await c.post(
            f"/sessions/{busy}/messages", params={"wait": "false"}, json={"prompt": "p"}
        )
        assert turn.status_code == 202
        await until(lambda: api.rt.runtime(busy).active_run_id is not None, "an active run")
        r = await c.post(f"/sessions/{busy}/system_context", json={"text": "later"})
        assert r.status_code == 200 and r.json()["status"] == "staged"
        assert (await c.post(f"/runtime/{busy}/reset")).status_code == 200


# ------------------------------------------------------------------ runtime endpoints


async def test_runtime_lifecycle_and_wrong_state_is_409(api: Api) -> None:
    c = api.client
    sid = await scripted(api, [])
    assert (await c.get(f"/runtime/{sid}/state")).json() == {"session_id": sid, "state": "idle"}
    r = await c.post(f"/runtime/{sid}/accept", json=prompt_json("via accept"))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["outcome_type"] == "accepted"
    done = await c.get(f"/input/{sid}/{out['input_id']}/wait", params={"timeout": 10})
    assert done.json()["outcome_type"] == "completed"
    key = {"idempotency_key": "a1"}
    r1 = (await c.post(f"/runtime/{sid}/accept", json=prompt_json("k", **key))).json()
    r2 = (await c.post(f"/runtime/{sid}/accept", json=prompt_json("k", **key))).json()
    assert r2["outcome_type"] == "deduplicated" and r2["existing_id"] == r1["input_id"]

    assert (await c.post(f"/runtime/{sid}/cancel")).json() == {
        "session_id": sid,
        "cancelled": False,
    }
    r = await c.post(f"/runtime/{sid}/retire")
    assert r.status_code == 200 and r.json()["session_id"] == sid
    assert set(r.json()) >= {"inputs_abandoned", "inputs_pending_drain"}
    assert (await c.get(f"/runtime/{sid}/state")).json()["state"] == "retired"
    rejected = (await c.post(f"/runtime/{sid}/accept", json=prompt_json("no"))).json()
    assert rejected["outcome_type"] == "rejected" and rejected["code"] == "not_ready"
    r = await c.post(f"/runtime/{sid}/respawn")
    assert r.status_code == 200, r.text
    assert (await c.get(f"/runtime/{sid}/state")).json()["state"] == "idle"
    r = await c.post(f"/runtime/{sid}/retire", params={"replacement_planned": "true"})
    assert r.status_code == 200
    r = await c.post(f"/runtime/{sid}/reset")
    assert r.status_code == 200 and "inputs_abandoned" in r.json()
    assert (await c.get(f"/runtime/{sid}/state")).json()["state"] == "idle"
    rec = (await c.post(f"/runtime/{sid}/recover")).json()
    assert rec["session_id"] == sid and rec["state"] == "idle"
    assert set(rec["recovery_report"]) >= {"inputs_lost", "inputs_rebuilt"}
    r = await c.post(f"/runtime/{sid}/destroy")
    assert r.status_code == 200 and "inputs_abandoned" in r.json()
    assert (await c.get(f"/runtime/{sid}/state")).json()["state"] == "destroyed"
    # the hazard fix: a wrong-state operation is a 409 with a code, never a 404
    for op in ("retire", "respawn", "reset"):
        assert_error(await c.post(f"/runtime/{sid}/{op}"), 409, "conflict")


async def test_runtime_and_input_endpoints_404_for_unknown_session(api: Api) -> None:
    c = api.client
    iid = "01959d7e-3c4a-7b2e-9f00-1a2b3c4d5e6f"
    for method, path in [
        ("GET", "/runtime/nope/state"),
        ("POST", "/runtime/nope/retire"),
        ("POST", "/runtime/nope/respawn"),
        ("POST", "/runtime/nope/reset"),
        ("POST", "/runtime/nope/destroy"),
        ("POST", "/runtime/nope/cancel"),
        ("POST", "/runtime/nope/recover"),
        ("GET", "/input/nope"),
        ("GET", f"/input/nope/{iid}"),
        ("POST", f"/input/nope/{iid}/cancel"),
        ("POST", f"/input/nope/{iid}/ack"),
        ("GET", f"/input/nope/{iid}/wait"),
        ("GET", "/sessions/nope"),
        ("GET", "/sessions/nope/history"),
        ("GET", "/sessions/nope/events"),
        ("POST", "/sessions/nope/interrupt"),
        ("DELETE", "/sessions/nope"),
    ]:
        assert_error(await c.request(method, path), 404, "not_found")
    for path, body in [
        ("/runtime/nope/accept", prompt_json("x")),
        ("/sessions/nope/messages", {"prompt": "x"}),
        ("/sessions/nope/system_context", {"text": "x"}),
    ]:
        assert_error(await c.post(path, json=body), 404, "not_found")
    sid = await scripted(api, [])
    assert_error(await c.get(f"/input/{sid}/{iid}"), 404, "not_found")
    assert_error(await c.get(f"/input/{sid}/{iid}/wait", params={"timeout": 0}), 404, "not_found")
    assert_error(await c.post(f"/input/{sid}/{iid}/cancel"), 404, "not_found")
    body = assert_error(await c.get(f"/input/{sid}/not-a-uuid"), 400, "bad_request")
    assert body["field"] == "input_id"


async def test_input_cancel_and_ack() -> None:
    async with api_for() as api:
        c = api.client
        sid = await scripted(api, SLOW)
        await c.post(f"/sessions/{sid}/messages", params={"wait": "false"}, json={"prompt": "a"})
        await until(lambda: api.rt.runtime(sid).active_run_id is not None, "an active run")
        queued = await c.post(
            f"/sessions/{sid}/messages", params={"wait": "false"}, json={"prompt": "b"}
        )
        iid = queued.json()["input_id"]
        r = await c.post(f"/input/{sid}/{iid}/cancel")
        assert r.status_code == 200, r.text
        assert r.json()["current_state"] == "abandoned"
        # cancelling a terminal input is a wrong-state operation
        assert_error(await c.post(f"/input/{sid}/{iid}/cancel"), 409, "conflict")
        out = (await c.get(f"/input/{sid}/{iid}/wait", params={"timeout": 5})).json()
        assert out["outcome_type"] == "cancelled"
        # only an input awaiting explicit acknowledgement can be acked
        assert_error(await c.post(f"/input/{sid}/{iid}/ack"), 409, "conflict")
        await c.post(f"/runtime/{sid}/reset")


async def test_explicit_ack_consumes_the_input() -> None:
    row = PolicyRow(
        PolicyTable.decision("stage_run_start", "wake_if_idle", "fifo", "explicit_ack"),
        PolicyTable.decision("stage_run_start", "none", "fifo", "explicit_ack"),
    )
    async with api_for(policy=default_policy_table().with_rows({"prompt": row})) as api:
        c = api.client
        sid = await scripted(api, [{"type": "text", "text": "needs ack"}])
        r = await c.post(
            f"/sessions/{sid}/messages", params={"wait": "false"}, json={"prompt": "p"}
        )
        iid = r.json()["input_id"]

        async def parked() -> bool:
            st = (await c.get(f"/input/{sid}/{iid}")).json()["current_state"]
            return bool(
                st == "applied_pending_consumption" and api.rt.runtime(sid).active_run_id is None
            )

        await until(parked, "the input to await its ack")
        pending = await c.get(f"/input/{sid}/{iid}/wait", params={"timeout": 0.05})
        assert pending.status_code == 202
        assert pending.json()["state"] == "applied_pending_consumption"
        r = await c.post(f"/input/{sid}/{iid}/ack")
        assert r.status_code == 200, r.text
        assert r.json()["current_state"] == "consumed"
        out = (await c.get(f"/input/{sid}/{iid}/wait", params={"timeout": 5})).json()
        assert out["outcome_type"] == "completed" and out["result"]["text"] == "needs ack"
        assert_error(await c.post(f"/input/{sid}/{iid}/ack"), 409, "conflict")


async def test_accept_too_large_is_413_and_queue_full_is_429() -> None:
    cfg = rt_config(max_input_bytes=4096, max_pending_inputs=2)
    async with api_for(config=cfg) as api:
        c = api.client
        sid = await scripted(api, SLOW)
        r = await c.post(f"/runtime/{sid}/accept", json=prompt_json("x" * 5000))
        assert r.status_code == 413, r.text
        body = r.json()
        assert body["outcome_type"] == "rejected" and body["code"] == "too_large"
        assert "error" in body and "reason" in body
        assert (await c.get(f"/input/{sid}", params={"include_terminal": 1})).json() == {
            "input_ids": []
        }
        first = (await c.post(f"/runtime/{sid}/accept", json=prompt_json("one"))).json()
        second = (await c.post(f"/runtime/{sid}/accept", json=prompt_json("two"))).json()
        assert first["outcome_type"] == second["outcome_type"] == "accepted"
        r = await c.post(f"/runtime/{sid}/accept", json=prompt_json("three"))
        assert r.status_code == 429, r.text
        assert r.json()["outcome_type"] == "rejected" and r.json()["code"] == "queue_full"
        assert r.headers["retry-after"] == "1"
        ids = (await c.get(f"/input/{sid}")).json()["input_ids"]
        assert ids == [first["input_id"], second["input_id"]]
        # a turn into the full queue is a 429 too
        assert_error(
            await c.post(f"/sessions/{sid}/messages", json={"prompt": "four"}), 429, "queue_full"
        )
        await c.post(f"/runtime/{sid}/reset")


# ------------------------------------------------------------------ bad input


async def test_bad_input_on_every_endpoint_family_changes_nothing(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)  # else any model name is OpenAI's
    monkeypatch.delenv("RKAT_OPENAI_BASE_URL", raising=False)
    c = api.client
    sid = (await c.post("/sessions", json={"prompt": "keep me"})).json()["session_id"]
    before_sessions = (await c.get("/sessions", params={"include_archived": 1})).json()
    before_info = (await c.get(f"/sessions/{sid}")).json()
    before_inputs = (await c.get(f"/input/{sid}", params={"include_terminal": 1})).json()
    big = b'{"prompt": "' + b"x" * (rest.MAX_BODY_BYTES + 10) + b'"}'
    iid = before_inputs["input_ids"][0]
    sess, msgs, ctx = (
        f"/sessions/{sid}",
        f"/sessions/{sid}/messages",
        f"/sessions/{sid}/system_context",
    )
    inp, run = f"/input/{sid}", f"/runtime/{sid}"
    bad, P, G = "bad_request", "POST", "GET"

    def j(**body: Any) -> dict[str, Any]:
        return {"json": body}

    def q(**params: Any) -> dict[str, Any]:
        return {"params": params}

    def raw(content: bytes) -> dict[str, Any]:
        return {"content": content}

    cases: list[tuple[str, str, dict[str, Any], int, str, str | None]] = [
        # sessions
        (P, "/sessions", raw(b"{not json"), 400, bad, "body"),
        (P, "/sessions", raw(b""), 400, bad, "body"),
        (P, "/sessions", raw(b"[1, 2]"), 400, bad, "body"),
        (P, "/sessions", raw(b'{"prompt": NaN}'), 400, bad, "body"),
        (P, "/sessions", j(prompt=5), 400, bad, "prompt"),
        (P, "/sessions", j(prompt=""), 400, bad, "prompt"),
        (P, "/sessions", j(prompt="x", labels=[1]), 400, bad, "labels"),
        (P, "/sessions", j(prompt="x", max_tokens=0), 400, bad, "max_tokens"),
        (P, "/sessions", j(prompt="x", initial_turn="later"), 400, bad, "initial_turn"),
        (P, "/sessions", j(prompt="x", budget_limits={"mx": 1}), 400, bad, "budget_limits.mx"),
        (P, "/sessions", j(prompt="x", hooks_override={"a": 1}), 400, "unsupported", None),
        (P, "/sessions", raw(big), 413, "too_large", None),
        (G, "/sessions", q(limit=-1), 400, bad, "limit"),
        (G, "/sessions", q(limit="ten"), 400, bad, "limit"),
        (G, "/sessions", q(label="novalue"), 400, bad, "label"),
        (G, "/sessions", q(label="=v"), 400, bad, "label"),
        (G, f"{sess}/history", q(offset=-2), 400, bad, "offset"),
        # turns, overrides included
        (P, msgs, raw(b"{"), 400, bad, "body"),
        (P, msgs, j(), 400, bad, "prompt"),
        (P, msgs, j(prompt=["a"]), 400, bad, "prompt"),
        (P, msgs, j(prompt="a", session_id="other"), 400, bad, "session_id"),
        (P, msgs, j(prompt="a", idempotency_key=3), 400, bad, "idempotency_key"),
        (P, msgs, j(prompt="a", output_schema="x"), 400, bad, "output_schema"),
        (P, msgs, j(prompt="a", output_schema={"type": "bogus"}), 400, bad, "output_schema"),
        (P, msgs, j(prompt="a", provider="nobody"), 400, bad, "provider"),
        (P, msgs, j(prompt="a", model="mystery-model"), 400, bad, "model"),
        (P, msgs, {**j(prompt="a"), **q(wait="maybe")}, 400, bad, "wait"),
        (P, msgs, raw(big), 413, "too_large", None),
        (P, "/sessions/nope/messages", j(prompt="a"), 404, "not_found", None),
        (P, ctx, j(text=1), 400, bad, "text"),
        (P, ctx, j(text=" "), 400, bad, "text"),
        (P, ctx, j(text="a", source=2), 400, bad, "source"),
        (G, f"{sess}/events", {"headers": {"Last-Event-ID": "x"}}, 400, bad, "Last-Event-ID"),
        (G, f"{sess}/events", q(after=-1), 400, bad, "after"),
        # runtime
        (P, f"{run}/accept", raw(b"nope"), 400, bad, "body"),
        (P, f"{run}/accept", raw(big), 413, "too_large", None),
        (P, f"{run}/retire", q(replacement_planned="perhaps"), 400, bad, "replacement_planned"),
        (G, "/runtime/nope/state", {}, 404, "not_found", None),
        # inputs
        (G, f"{inp}/zzz", {}, 400, bad, "input_id"),
        (P, f"{inp}/zzz/cancel", {}, 400, bad, "input_id"),
        (P, f"{inp}/zzz/ack", {}, 400, bad, "input_id"),
        (G, f"{inp}/{iid}/wait", q(timeout=301), 400, bad, "timeout"),
        (G, f"{inp}/{iid}/wait", q(timeout="soon"), 400, bad, "timeout"),
        (G, inp, q(detail="kind of"), 400, bad, "detail"),
        # no such endpoint / method
        (G, "/nowhere", {}, 404, "not_found", None),
        ("PUT", "/sessions", {}, 405, bad, None),
    ]  # fmt: skip
    for method, path, kw, status, code, field_name in cases:
        r = await c.request(method, path, **kw)
        body = assert_error(r, status, code)
        if field_name is not None:
            assert body.get("field") == field_name, (method, path, kw, body)
    # a well-formed Input that is not valid is a rejected outcome, not an error
    r = await c.post(f"/runtime/{sid}/accept", json={"input_type": "prompt"})
    assert r.status_code == 200 and r.json()["outcome_type"] == "rejected"
    assert r.json()["code"] == "invalid"
    assert (await c.get("/sessions", params={"include_archived": 1})).json() == before_sessions
    assert (await c.get(f"/sessions/{sid}")).json() == before_info
    after_inputs = (await c.get(f"/input/{sid}", params={"include_terminal": 1})).json()
    assert after_inputs == before_inputs


async def test_token_required_everywhere_but_health() -> None:
    async with api_for(token="s3cret") as api:
        url = api.live.url
        async with httpx.AsyncClient(base_url=url, timeout=10) as anon:
            assert (await anon.get("/health")).json() == {"status": "ok"}
            r = await anon.get("/sessions")
            assert_error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"] == "Bearer"
            assert_error(await anon.get("/openapi.json"), 401, "unauthorized")
            bad = {"Authorization": "Bearer wrong"}
            r = await anon.post("/sessions", json={"prompt": "x"}, headers=bad)
            assert_error(r, 401, "unauthorized")
            basic = {"Authorization": "Basic czNjcmV0"}
            assert_error(await anon.get("/sessions", headers=basic), 401, "unauthorized")
            # refused before the body is read: an oversized body is still just a 401
            big = b"x" * (rest.MAX_BODY_BYTES + 1)
            assert_error(await anon.post("/sessions", content=big), 401, "unauthorized")
        assert await api.rt.list_sessions() == []
        r = await api.client.post("/sessions", json={"prompt": "x"})
        assert r.status_code == 200, r.text
        spec = (await api.client.get("/openapi.json")).json()
        assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        assert spec["paths"]["/health"]["get"]["security"] == []


async def test_openapi_documents_every_endpoint(api: Api) -> None:
    spec = (await api.client.get("/openapi.json")).json()
    paths = spec["paths"]
    for path in [
        "/sessions",
        "/sessions/{session_id}",
        "/sessions/{session_id}/history",
        "/sessions/{session_id}/messages",
        "/sessions/{session_id}/interrupt",
        "/sessions/{session_id}/system_context",
        "/sessions/{session_id}/events",
        "/runtime/{session_id}/state",
        "/runtime/{session_id}/accept",
        "/runtime/{session_id}/retire",
        "/runtime/{session_id}/respawn",
        "/runtime/{session_id}/reset",
        "/runtime/{session_id}/destroy",
        "/runtime/{session_id}/cancel",
        "/runtime/{session_id}/recover",
        "/input/{session_id}",
        "/input/{session_id}/{input_id}",
        "/input/{session_id}/{input_id}/cancel",
        "/input/{session_id}/{input_id}/ack",
        "/input/{session_id}/{input_id}/wait",
        "/health",
    ]:
        assert path in paths, path
        for op in paths[path].values():
            assert op["summary"]
            assert "422" not in op["responses"] or "budget" in json.dumps(op["responses"]["422"])
    create_body = paths["/sessions"]["post"]["requestBody"]["content"]["application/json"]
    assert create_body["schema"]["$ref"] == "#/components/schemas/CreateSessionRequest"
    assert "CreateSessionRequest" in spec["components"]["schemas"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]


# ------------------------------------------------------------------ serve()


def test_serve_refuses_a_non_loopback_host_without_a_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MEERKAT_API_TOKEN", raising=False)
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.com"):
        with pytest.raises(rest.ServeConfigError, match="MEERKAT_API_TOKEN"):
            rest.serve(host=host, port=0, store="memory://")
    assert issubclass(rest.ServeConfigError, ValueError)
    for host in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert rest._is_loopback(host), host
    for host in ("0.0.0.0", "10.0.0.1", "::", "localhost.example.com"):
        assert not rest._is_loopback(host), host
