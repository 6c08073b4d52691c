"""Webhooks (issue 6 part 5) against a real uvicorn server on 127.0.0.1.

``POST /webhooks/{session_id}/{event_type}``: a signed delivery becomes a durable
``external_event`` input the agent sees; a missing or wrong signature is 401 and leaves no
trace (no input, no event); webhooks are disabled (403) without a secret; the delivery id
deduplicates redeliveries (same id, other body: 409); the runtime's policy table decides per
event type (supersede: the latest delivery wins; coalesce: one aggregate); the body limit,
unknown sessions, bad input and the bearer-token exemption.

Runs are held deterministically by a ``hold`` tool the offline model calls: it parks until
the test releases it, so deliveries queue behind a busy session without timing guesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import httpx

from meerkat_runtime import Runtime
from meerkat_runtime.core.tools import ToolRegistry
from meerkat_runtime.runtime.policy import PolicyRow, PolicyTable, default_policy_table
from meerkat_runtime.surfaces import rest

from .test_rest_support import Api, live_server, rt_config

SECRET = "test-webhook-secret"
D = PolicyTable.decision


@contextlib.asynccontextmanager
async def webhook_api(
    *,
    secret: str | None = SECRET,
    secrets: Mapping[str, str] | Callable[[str], str | None] | None = None,
    token: str | None = None,
    policy: PolicyTable | None = None,
) -> AsyncIterator[Api]:
    async with Runtime.open("memory://", config=rt_config(), policy=policy) as rt:
        app = rest.create_app(rt, token=token, webhook_secret=secret, webhook_secrets=secrets)
        async with (
            live_server(app) as live,
            httpx.AsyncClient(base_url=live.url, timeout=20) as client,
        ):
            yield Api(rt, client, live)


async def deliver(
    api: Api,
    sid: str,
    event_type: str,
    payload: Any = None,
    *,
    body: bytes | None = None,
    secret: str = SECRET,
    signature: str | None = None,
    signed_body: bytes | None = None,
    delivery: str | None = None,
    content_type: str = "application/json",
    headers: Mapping[str, str | bytes] | None = None,
) -> httpx.Response:
    """POST a delivery; signed with ``secret`` over ``signed_body`` (default: the body)
    unless ``signature`` is given ("" sends none)."""
    raw = body if body is not None else json.dumps(payload).encode()
    sent: dict[str, str | bytes] = {"Content-Type": content_type, **(headers or {})}
    if signature is None:
        signature = rest.webhook_signature(secret, raw if signed_body is None else signed_body)
    if signature:
        sent["X-Meerkat-Signature"] = signature
    if delivery is not None:
        sent["X-Meerkat-Delivery"] = delivery
    wire = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in sent.items()}
    return await api.client.post(f"/webhooks/{sid}/{event_type}", content=raw, headers=wire)


async def trace(api: Api, sid: str) -> tuple[list[str], int, int]:
    """What a delivery would leave: the session's inputs (memory and store) and last event."""
    r = await api.client.get(f"/input/{sid}", params={"include_terminal": "true"})
    assert r.status_code == 200, r.text
    stored = await api.rt.store.load_input_states(sid)
    return r.json()["input_ids"], len(stored), await api.rt.last_event_seq(sid)


def assert_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body: dict[str, Any] = r.json()
    assert body["code"] == code, body
    assert isinstance(body["error"], str) and body["error"]
    return body


async def wait_done(api: Api, sid: str, iid: str) -> dict[str, Any]:
    r = await api.client.get(f"/input/{sid}/{iid}/wait", params={"timeout": 10})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


async def input_state(api: Api, sid: str, iid: str) -> dict[str, Any]:
    r = await api.client.get(f"/input/{sid}/{iid}")
    assert r.status_code == 200, r.text
    st: dict[str, Any] = r.json()
    return st


async def user_texts(api: Api, sid: str) -> list[str]:
    r = await api.client.get(f"/sessions/{sid}/history")
    assert r.status_code == 200, r.text
    return [m["content"] for m in r.json()["messages"] if m["role"] == "user"]


class Hold:
    """A ``hold`` tool: the offline model's first answer calls it and the run parks until
    ``release``; deliveries meanwhile queue behind the busy session."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.tools = ToolRegistry()

        async def hold() -> str:
            """Park until the test releases the run."""
            self.entered.set()
            await self.gate.wait()
            return "released"

        self.tools.register(hold)

    async def busy_session(self, api: Api) -> str:
        info = await api.rt.create_session(
            model="offline", offline_script=[{"type": "tool", "name": "hold"}], tools=self.tools
        )
        r = await api.client.post(
            f"/sessions/{info.id}/messages", params={"wait": "false"}, json={"prompt": "start"}
        )
        assert r.status_code == 202, r.text
        await asyncio.wait_for(self.entered.wait(), 5)
        return info.id


def table(event_type: str, queue: str) -> PolicyRow:
    return PolicyRow(
        D("stage_run_start", "wake_if_idle", queue, "on_run_complete"),
        D("stage_run_start", "none", queue, "on_run_complete"),
    )


# ------------------------------------------------------------------ accepted deliveries


async def test_a_signed_delivery_becomes_an_external_event_the_agent_sees() -> None:
    async with webhook_api() as api:
        sid = (await api.rt.create_session(model="offline")).id
        r = await deliver(api, sid, "github.push", {"ref": "main", "n": 1}, delivery="d-1")
        assert r.status_code == 202, r.text
        body = r.json()
        assert body["outcome_type"] == "accepted"
        assert body["session_id"] == sid and body["event_type"] == "github.push"
        assert body["delivery_id"] == "d-1" and "existing_id" not in body
        iid = body["input_id"]
        assert (await wait_done(api, sid, iid))["outcome_type"] == "completed"
        st = await input_state(api, sid, iid)
        assert st["current_state"] == "consumed"
        inp = st["persisted_input"]
        assert inp["input_type"] == "external_event" and inp["event_type"] == "github.push"
        assert inp["payload"] == {"ref": "main", "n": 1}
        assert inp["header"]["source"] == {"type": "external", "source_name": "webhook"}
        assert inp["header"]["durability"] == "durable"
        assert inp["header"]["idempotency_key"] == "webhook:d-1"
        assert "supersession_key" not in inp["header"]  # the default table is fifo
        event_text = '[External Event: github.push] {"ref":"main","n":1}'
        assert await user_texts(api, sid) == [event_text]
        info = (await api.client.get(f"/sessions/{sid}")).json()
        assert event_text in info["last_assistant_text"]  # the offline model echoes it

        # a text body is a string payload; an empty JSON body is null; signatures are
        # hex in any case; no delivery id: every delivery is new
        r = await deliver(api, sid, "note", body=b"hello", content_type="text/plain")
        assert r.status_code == 202, r.text
        await wait_done(api, sid, r.json()["input_id"])
        assert (await input_state(api, sid, r.json()["input_id"]))["persisted_input"][
            "payload"
        ] == "hello"
        sig = rest.webhook_signature(SECRET, b"").upper().replace("SHA256=", "sha256=")
        ids = []
        for _ in range(2):
            r = await deliver(api, sid, "ping", body=b"", signature=sig)
            assert r.status_code == 202, r.text
            assert "delivery_id" not in r.json()
            ids.append(r.json()["input_id"])
        assert ids[0] != ids[1]
        for iid in ids:
            await wait_done(api, sid, iid)
            assert (await input_state(api, sid, iid))["persisted_input"]["payload"] is None
        texts = await user_texts(api, sid)
        assert texts[1:] == ['[External Event: note] "hello"'] + ["[External Event: ping] null"] * 2


# ------------------------------------------------------------------ authentication


async def test_a_missing_or_wrong_signature_is_401_and_leaves_no_trace() -> None:
    async with webhook_api() as api:
        sid = (await api.rt.create_session(model="offline")).id
        before = await trace(api, sid)
        payload = {"amount": 10}
        raw = json.dumps(payload).encode()
        good = rest.webhook_signature(SECRET, raw)
        cases: list[dict[str, Any]] = [
            {"signature": ""},  # missing
            {"secret": "another-secret"},  # wrong secret
            {"signed_body": json.dumps({"amount": 1000}).encode()},  # over another body
            {"signed_body": raw + b" "},  # one byte off
            {"signature": good.removeprefix("sha256=")},  # no scheme
            {"signature": "sha1=" + good.removeprefix("sha256=")},  # another scheme
            {"signature": good[:-2]},  # truncated
            {"signature": "sha256=zz"},
            {"signature": "", "headers": {"X-Meerkat-Signature": "sha256=\xe9".encode("latin-1")}},
        ]
        for case in cases:
            r = await deliver(api, sid, "payment", payload, delivery="p-1", **case)
            body = assert_error(r, 401, "unauthorized")
            assert "X-Meerkat-Signature" in body["error"], body
        assert await trace(api, sid) == before == ([], 0, before[2])  # no input, no event
        # the same request signed right is accepted (delivery p-1 was never recorded)
        r = await deliver(api, sid, "payment", payload, delivery="p-1")
        assert r.status_code == 202 and r.json()["outcome_type"] == "accepted", r.text
        await wait_done(api, sid, r.json()["input_id"])
        assert (await trace(api, sid))[0] == [r.json()["input_id"]]


async def test_no_secret_disables_webhooks_and_per_session_secrets_win() -> None:
    async with webhook_api(secret=None) as api:
        sid = (await api.rt.create_session(model="offline")).id
        before = await trace(api, sid)
        body = assert_error(await deliver(api, sid, "x", {"a": 1}), 403, "forbidden")
        assert "MEERKAT_WEBHOOK_SECRET" in body["error"]
        assert_error(await deliver(api, "no-such-session", "x", {}), 403, "forbidden")
        assert await trace(api, sid) == before

    secrets = {"wh-a": "secret-a", "wh-b": ""}
    async with webhook_api(secret="global", secrets=secrets) as api:
        for sid in ("wh-a", "wh-b", "wh-c"):
            await api.rt.create_session(model="offline", session_id=sid)
        # wh-a has its own secret: the global one no longer opens it
        assert_error(await deliver(api, "wh-a", "x", {}, secret="global"), 401, "unauthorized")
        r = await deliver(api, "wh-a", "x", {}, secret="secret-a")
        assert r.status_code == 202, r.text
        # an empty per-session secret falls back to the global one; so does an unlisted one
        for sid in ("wh-b", "wh-c"):
            assert_error(await deliver(api, sid, "x", {}, secret="secret-a"), 401, "unauthorized")
            assert (await deliver(api, sid, "x", {}, secret="global")).status_code == 202

    def resolver(session_id: str) -> str | None:
        return "fn-secret" if session_id == "wh-on" else None

    async with webhook_api(secret=None, secrets=resolver) as api:
        for sid in ("wh-on", "wh-off"):
            await api.rt.create_session(model="offline", session_id=sid)
        assert (await deliver(api, "wh-on", "x", {}, secret="fn-secret")).status_code == 202
        assert_error(await deliver(api, "wh-off", "x", {}, secret="fn-secret"), 403, "forbidden")


async def test_webhooks_skip_the_bearer_token_but_nothing_else_does() -> None:
    async with webhook_api(token="api-token") as api:
        sid = (await api.rt.create_session(model="offline")).id
        bearer = {"Authorization": "Bearer api-token"}
        # no bearer token needed: the signature authenticates
        r = await deliver(api, sid, "x", {"v": 1})
        assert r.status_code == 202, r.text
        # ...and a bearer token does not replace it
        assert_error(
            await deliver(api, sid, "x", {"v": 1}, signature="", headers=bearer),
            401,
            "unauthorized",
        )
        # other endpoints still need the token, also paths that merely look like webhooks
        assert_error(await api.client.get(f"/sessions/{sid}"), 401, "unauthorized")
        assert_error(await api.client.get(f"/webhooks/{sid}/x"), 401, "unauthorized")
        assert_error(await api.client.post(f"/webhooks/{sid}"), 401, "unauthorized")
        assert (await api.client.get(f"/sessions/{sid}", headers=bearer)).status_code == 200
        schema = (await api.client.get("/openapi.json", headers=bearer)).json()
        op = schema["paths"]["/webhooks/{session_id}/{event_type}"]["post"]
        assert op["security"] == []
        assert {"202", "200", "401", "403", "404", "409", "413"} <= set(op["responses"])


# ------------------------------------------------------------------ idempotency


async def test_a_redelivery_is_deduplicated_and_the_same_id_with_another_body_is_409() -> None:
    async with webhook_api() as api:
        sid = (await api.rt.create_session(model="offline")).id
        first = await deliver(api, sid, "order.paid", {"order": 7}, delivery="dlv-7")
        assert first.status_code == 202, first.text
        iid = first.json()["input_id"]
        await wait_done(api, sid, iid)
        seen = await trace(api, sid)
        again = await deliver(api, sid, "order.paid", {"order": 7}, delivery="dlv-7")
        assert again.status_code == 200, again.text
        assert again.json() == {
            "session_id": sid,
            "event_type": "order.paid",
            "delivery_id": "dlv-7",
            "input_id": iid,
            "outcome_type": "deduplicated",
            "existing_id": iid,
        }
        for changed in (
            {"payload": {"order": 8}},
            {"event_type": "order.refunded"},
            {"body": b"order 7", "content_type": "text/plain"},
        ):
            args: dict[str, Any] = {"event_type": "order.paid", "payload": {"order": 7}}
            args.update(changed)
            r = await deliver(api, sid, delivery="dlv-7", **args)
            body = assert_error(r, 409, "conflict")
            assert body["reject_code"] == "idempotency_conflict"
            assert body["delivery_id"] == "dlv-7" and "dlv-7" in body["error"]
        ids, stored, _ = await trace(api, sid)
        assert (ids, stored) == (seen[0], seen[1])  # no new input
        assert await user_texts(api, sid) == ['[External Event: order.paid] {"order":7}']


# ------------------------------------------------------------------ policy per event type


async def test_a_supersede_row_makes_the_latest_delivery_of_its_type_win() -> None:
    policy = default_policy_table().with_rows(
        {
            ("external_event", "stock.price"): table("stock.price", "supersede"),
            ("external_event", "fx.rate"): table("fx.rate", "supersede"),
        }
    )
    hold = Hold()
    async with webhook_api(policy=policy) as api:
        sid = await hold.busy_session(api)
        prices = []
        for n, event_type in ((1, "stock.price"), (1, "fx.rate"), (2, "stock.price")):
            r = await deliver(api, sid, event_type, {"v": n})
            assert r.status_code == 202, r.text
            prices.append(r.json()["input_id"])
        r = await deliver(api, sid, "stock.price", {"v": 3})
        latest = r.json()["input_id"]
        p1, fx, p2 = prices
        # superseded in the newer input's acceptance: before any run takes them
        assert (await input_state(api, sid, p1))["current_state"] == "superseded"
        assert (await input_state(api, sid, p2))["current_state"] == "superseded"
        assert (await input_state(api, sid, fx))["current_state"] == "queued"  # other type
        header = (await input_state(api, sid, latest))["persisted_input"]["header"]
        assert header["supersession_key"] == "stock.price"
        hold.gate.set()
        assert (await wait_done(api, sid, latest))["outcome_type"] == "completed"
        assert (await wait_done(api, sid, fx))["outcome_type"] == "completed"
        out = await wait_done(api, sid, p1)
        assert out["outcome_type"] == "superseded" and out["superseded_by"] == p2
        out = await wait_done(api, sid, p2)
        assert out["outcome_type"] == "superseded" and out["superseded_by"] == latest
        texts = await user_texts(api, sid)
        assert texts == [
            "start",
            '[External Event: fx.rate] {"v":1}',
            '[External Event: stock.price] {"v":3}',
        ]


async def test_a_coalesce_row_merges_queued_deliveries_into_one_input() -> None:
    policy = default_policy_table().with_rows(
        {("external_event", "sensor.reading"): table("sensor.reading", "coalesce")}
    )
    hold = Hold()
    async with webhook_api(policy=policy) as api:
        sid = await hold.busy_session(api)
        sources = []
        for n in (1, 2, 3):
            r = await deliver(api, sid, "sensor.reading", {"t": n}, delivery=f"s-{n}")
            assert r.status_code == 202, r.text
            sources.append(r.json()["input_id"])
            header = (await input_state(api, sid, sources[-1]))["persisted_input"]["header"]
            assert "supersession_key" not in header  # coalesce, not supersede
        hold.gate.set()
        outs = [await wait_done(api, sid, iid) for iid in sources]
        aggregates = {o.get("via_aggregate_id") for o in outs}
        assert len(aggregates) == 1 and None not in aggregates, outs
        assert all(o["outcome_type"] == "completed" for o in outs), outs
        (agg,) = aggregates
        assert isinstance(agg, str)
        for iid in sources:
            st = await input_state(api, sid, iid)
            assert st["current_state"] == "coalesced", st
        agg_state = await input_state(api, sid, agg)
        assert agg_state["current_state"] == "consumed"
        assert agg_state["reconstruction_source"]["source_input_ids"] == sources
        assert agg_state["persisted_input"]["payload"] == [{"t": 1}, {"t": 2}, {"t": 3}]
        assert await user_texts(api, sid) == [
            "start",
            '[External Event: sensor.reading] [{"t":1},{"t":2},{"t":3}]',
        ]


# ------------------------------------------------------------------ refusals


async def test_refusals_change_nothing() -> None:
    async with webhook_api() as api:
        sid = (await api.rt.create_session(model="offline")).id
        before = await trace(api, sid)
        # over 1 MiB: 413 before the signature is even looked at
        big = b'{"x": "' + b"a" * (rest.MAX_BODY_BYTES + 1) + b'"}'
        assert_error(await deliver(api, sid, "big", body=big), 413, "too_large")
        assert_error(await deliver(api, sid, "big", body=big, signature=""), 413, "too_large")
        # signed, but unknown session, bad event type, bad delivery id, bad body
        assert_error(await deliver(api, "no-such-session", "x", {}), 404, "not_found")
        for bad_type in ("-x", "a b", "a" * 129, "\u00e9t\u00e9"):
            r = await deliver(api, sid, bad_type, {})
            assert assert_error(r, 400, "bad_request")["field"] == "event_type"
        r = await deliver(api, sid, "x", {}, delivery="has space")
        assert assert_error(r, 400, "bad_request")["field"] == "X-Meerkat-Delivery"
        for raw in (b"{not json", b"NaN", b"[1,"):
            r = await deliver(api, sid, "x", body=raw)
            assert assert_error(r, 400, "bad_request")["field"] == "body"
        r = await deliver(api, sid, "x", body=b"\xff\xfe", content_type="text/plain")
        assert assert_error(r, 400, "bad_request")["field"] == "body"
        assert await trace(api, sid) == before

        # a runtime that takes no input: the common status table
        held = (await api.rt.create_session(model="offline")).id
        r = await api.client.post(f"/runtime/{held}/retire", params={"replacement_planned": 1})
        assert r.status_code == 200, r.text
        r = await deliver(api, held, "x", {})
        assert assert_error(r, 503, "not_ready")["reject_code"] == "not_ready"
        assert r.headers["retry-after"] == "1"
        archived = (await api.rt.create_session(model="offline")).id
        assert (await api.client.delete(f"/sessions/{archived}")).status_code == 200
        assert_error(await deliver(api, archived, "x", {}), 409, "conflict")
