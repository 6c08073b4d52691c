"""Conformance cases 5-7 (spec §5) through real comms between two sessions, on every store,
and the peer rows of the policy (S1, S3, S17, S20): the requester (``coord``) sends a request
to the responder (``worker``) with ``comms_send``; the worker answers with ``comms_send``; the
response reaches the requester's runtime as a peer input with the response convention."""

from __future__ import annotations

import json

from meerkat_runtime import InputLifecycleState, Runtime, RuntimeState
from meerkat_runtime.runtime.inputs import (
    MessageConvention,
    PeerOrigin,
    RequestConvention,
    ResponseProgressConvention,
    ResponseTerminalConvention,
)
from meerkat_runtime.runtime.outcomes import CompletedWait
from meerkat_runtime.runtime.policy import default_policy_table
from tests.comms.support import by_envelope, open_runtime, peer_input, recording, until
from tests.conformance.stores import StoreFactory
from tests.helpers import ScriptedExecutor, settle

IS = InputLifecycleState


async def pair(
    rt: Runtime, coord_steps: list[str] | None = None, worker_steps: list[str] | None = None
) -> tuple[str, ScriptedExecutor, str, ScriptedExecutor]:
    cx, wx = ScriptedExecutor(coord_steps), ScriptedExecutor(worker_steps)
    coord = await rt.create_session(executor=cx, comms_name="coord")
    worker = await rt.create_session(executor=wx, comms_name="worker")
    return coord.id, cx, worker.id, wx


async def request(rt: Runtime, coord: str, worker: str, wx: ScriptedExecutor) -> str:
    """coord asks worker; returns the request id once the worker has handled the request."""
    receipt = await rt.comms_send(
        coord, kind="request", to="worker", intent="add", params={"a": 2, "b": 3}
    )
    assert receipt["kind"] == "peer_request_sent" and receipt["stream_reserved"] is False
    rid = str(receipt["interaction_id"])
    st = by_envelope(rt, worker, receipt["envelope_id"])
    inp = peer_input(st)
    assert inp.convention == RequestConvention(request_id=rid, intent="add")
    assert json.loads(inp.body) == {"a": 2, "b": 3}
    assert inp.header.source == PeerOrigin(peer_id="coord", runtime_id=coord)  # type: ignore[arg-type]
    assert str(inp.header.idempotency_key) == receipt["envelope_id"]
    await settle(rt, worker)
    assert [r.input_ids for r in wx.runs][-1] == [st.input_id]
    rec = await rt.store.load_peer_request(coord, rid)
    assert rec is not None and rec.outstanding and rec.responder_runtime_id == worker
    return rid


# ------------------------------------------------------------------------------ 5


async def test_conformance_05_terminal_response_while_idle_wakes_the_requester(
    store_factory: StoreFactory,
) -> None:
    async with open_runtime(store_factory) as rt:
        coord, cx, worker, wx = await pair(rt)
        rid = await request(rt, coord, worker, wx)
        assert cx.runs == [] and rt.runtime_state(coord) is RuntimeState.IDLE

        receipt = await rt.comms_send(
            worker, kind="response", in_reply_to=rid, status="completed", result={"sum": 5}
        )
        assert receipt == {
            "kind": "peer_response_sent",
            "envelope_id": receipt["envelope_id"],
            "in_reply_to": rid,
        }
        resp = by_envelope(rt, coord, receipt["envelope_id"])
        conv = peer_input(resp).convention
        assert conv == ResponseTerminalConvention(request_id=rid, status="completed")  # type: ignore[arg-type]
        out = await rt.wait(coord, resp.input_id, timeout=5)
        assert isinstance(out, CompletedWait)
        assert len(cx.runs) == 1
        assert cx.runs[0].input_ids == [resp.input_id]
        assert cx.runs[0].boundary == "run_start"
        assert "from worker" in cx.runs[0].texts[0] and '{"sum":5}' in cx.runs[0].texts[0]
        assert rt.input_state(coord, resp.input_id).current_state is IS.CONSUMED

        # S20: closed by the transaction that accepted the response
        rec = await rt.store.load_peer_request(coord, rid)
        assert rec is not None and rec.status == "completed" and rec.closed_at is not None
        assert rec.closed_by == receipt["envelope_id"]
        txns = recording(rt).txns
        assert any(str(resp.input_id) in ids and rid in closes for ids, closes in txns)
        assert sum(1 for _, closes in txns if rid in closes) == 1


# ------------------------------------------------------------------------------ 6


async def test_conformance_06_terminal_response_while_running_joins_at_next_checkpoint(
    store_factory: StoreFactory,
) -> None:
    async with open_runtime(store_factory) as rt:
        coord, cx, worker, wx = await pair(rt, coord_steps=["checkpoint_then_ok"])
        head = await rt.turn(coord, "ask the worker, then think")
        await until(lambda: rt.runtime_state(coord) is RuntimeState.RUNNING)
        rid = await request(rt, coord, worker, wx)  # sent while coord's run is active

        receipt = await rt.comms_send(
            worker, kind="response", in_reply_to=rid, status="failed", result="no adder here"
        )
        resp = by_envelope(rt, coord, receipt["envelope_id"])
        snap = resp.policy
        assert snap is not None
        assert snap.decision.apply_mode.value == "stage_run_boundary"
        assert snap.decision.wake_mode.value == "none"
        assert resp.current_state is IS.QUEUED  # waits for the next checkpoint
        rec = await rt.store.load_peer_request(coord, rid)
        assert rec is not None and rec.status == "failed"  # closed at acceptance

        cx.release.set()
        head_out = await head.wait(5)
        out = await rt.wait(coord, resp.input_id, timeout=5)
        await settle(rt, coord)
        assert len(cx.runs) == 1
        assert cx.runs[0].joined == [[resp.input_id]]
        st = rt.input_state(coord, resp.input_id)
        assert st.current_state is IS.CONSUMED and st.last_run_id == cx.runs[0].run_id
        assert isinstance(out, CompletedWait) and isinstance(head_out, CompletedWait)
        assert out.result == head_out.result
        rows = [r for r in rt.runtime(coord).conversation.rows if resp.input_id in r.input_ids]
        assert len(rows) == 1 and rows[0].run_id == cx.runs[0].run_id
        assert "[peer response (failed) to request" in rows[0].message.content


# ------------------------------------------------------------------------------ 7


async def test_conformance_07_progress_response_is_a_progress_peer_input_and_does_not_wake(
    store_factory: StoreFactory,
) -> None:
    async with open_runtime(store_factory) as rt:
        coord, cx, worker, wx = await pair(rt)
        rid = await request(rt, coord, worker, wx)
        receipt = await rt.comms_send(
            worker, kind="response", in_reply_to=rid, status="in_progress", result="halfway"
        )
        st = by_envelope(rt, coord, receipt["envelope_id"])
        assert st.policy is not None
        assert st.policy.decision == default_policy_table().resolve("peer_response_progress", True)
        assert st.policy.decision.wake_mode.value == "none"
        await settle(rt, coord)
        assert cx.runs == []
        assert rt.runtime(coord).active_run_id is None
        assert rt.runtime_state(coord) is RuntimeState.IDLE
        st = rt.input_state(coord, st.input_id)
        assert st.current_state is IS.QUEUED
        conv = peer_input(st).convention
        assert conv == ResponseProgressConvention(request_id=rid, phase="in_progress")  # type: ignore[arg-type]
        assert rt.runtime(coord).queued_ids() == [st.input_id]
        stored = await rt.store.load_input_state(coord, st.input_id)
        assert stored is not None and stored.current_state is IS.QUEUED
        rec = await rt.store.load_peer_request(coord, rid)
        assert rec is not None and rec.outstanding  # progress never closes a request


# ------------------------------------------------------------------------------ policy rows


async def test_progress_responses_coalesce_and_ride_with_the_terminal_one(
    store_factory: StoreFactory,
) -> None:
    """S3/S17: progress updates never start a run; the terminal response that wakes the
    requester takes them along, merged into one aggregate."""
    async with open_runtime(store_factory) as rt:
        coord, cx, worker, wx = await pair(rt)
        rid = await request(rt, coord, worker, wx)
        for phase, part in (("accepted", "queued"), ("partial_result", "first half")):
            await rt.comms_send(worker, kind="response", in_reply_to=rid, status=phase, result=part)
        await settle(rt, coord)
        assert cx.runs == []
        done = await rt.comms_send(
            worker, kind="response", in_reply_to=rid, status="completed", result="all"
        )
        resp = by_envelope(rt, coord, done["envelope_id"])
        await rt.wait(coord, resp.input_id, timeout=5)
        await settle(rt, coord)
        assert len(cx.runs) == 1
        ids = cx.runs[0].input_ids
        assert resp.input_id in ids and len(ids) == 2  # the terminal one and one aggregate
        (agg_id,) = [i for i in ids if i != resp.input_id]
        agg = rt.input_state(coord, agg_id)
        assert agg.reconstruction_source is not None
        assert json.loads(peer_input(agg).body) == ['"queued"', '"first half"']


async def test_message_and_request_to_a_running_agent_end_its_wait_and_join(
    store_factory: StoreFactory,
) -> None:
    """S1: peer message / request while running: interrupt_yielding + stage_run_boundary."""
    async with open_runtime(store_factory) as rt:
        coord, _, worker, wx = await pair(rt, worker_steps=["wait", "wait"])
        for kind in ("message", "request"):
            head = await rt.turn(worker, f"wait for a {kind}")
            await until(lambda: rt.runtime_state(worker) is RuntimeState.RUNNING)
            if kind == "message":
                receipt = await rt.comms_send(coord, kind="message", to="worker", body="hello")
            else:
                receipt = await rt.comms_send(coord, kind="request", to="worker", intent="ping")
            out = await head.wait(5)  # the wait (30 s) ended at once
            assert isinstance(out, CompletedWait) and out.result is not None
            assert out.result.text == "wait:interrupted"
            st = by_envelope(rt, worker, receipt["envelope_id"])
            assert st.policy is not None
            assert st.policy.decision.wake_mode.value == "interrupt_yielding"
            assert st.policy.decision.apply_mode.value == "stage_run_boundary"
            assert wx.runs[-1].joined == [[st.input_id]]
            assert st.current_state is IS.CONSUMED
            if kind == "message":
                assert peer_input(st).convention == MessageConvention()
                assert peer_input(st).body == "hello"


async def test_message_to_an_idle_peer_wakes_it(store_factory: StoreFactory) -> None:
    async with open_runtime(store_factory) as rt:
        coord, _, worker, wx = await pair(rt)
        receipt = await rt.comms_send(coord, kind="message", to="worker", body="hi there")
        assert receipt == {
            "kind": "peer_message_sent",
            "envelope_id": receipt["envelope_id"],
            "acked": True,
        }
        st = by_envelope(rt, worker, receipt["envelope_id"])
        assert isinstance(await rt.wait(worker, st.input_id, timeout=5), CompletedWait)
        assert wx.runs[0].input_ids == [st.input_id]
        assert wx.runs[0].texts == ["[peer message from coord] hi there"]


async def test_an_application_table_can_make_terminal_responses_end_a_wait(
    store_factory: StoreFactory,
) -> None:
    """A terminal response (wake none while running) leaves a `wait` to its timeout under
    the default table; an application table may make it interrupting."""
    from meerkat_runtime.runtime.policy import PolicyRow, PolicyTable

    base = default_policy_table()
    idle = base.resolve("peer_response_terminal", True)
    interrupting = PolicyTable.decision(
        "stage_run_boundary", "interrupt_yielding", "fifo", "on_run_complete"
    )
    table = base.with_rows({"peer_response_terminal": PolicyRow(idle, interrupting)})
    async with open_runtime(store_factory, policy=table) as rt:
        coord, cx, worker, wx = await pair(rt, coord_steps=["wait"])
        head = await rt.turn(coord, "ask and wait")
        await until(lambda: rt.runtime_state(coord) is RuntimeState.RUNNING)
        rid = await request(rt, coord, worker, wx)
        receipt = await rt.comms_send(
            worker, kind="response", in_reply_to=rid, status="completed", result=5
        )
        out = await head.wait(5)
        assert isinstance(out, CompletedWait) and out.result is not None
        assert out.result.text == "wait:interrupted"
        st = by_envelope(rt, coord, receipt["envelope_id"])
        assert cx.runs[0].joined == [[st.input_id]]
        assert st.current_state is IS.CONSUMED
