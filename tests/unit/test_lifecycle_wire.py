"""Core lifecycle wire types: run events, receipts, control commands, run primitives and the
executor error strings (reference-runtime.md §6; test list §9, "core lifecycle/*" groups)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from meerkat_runtime._ids import InputId, RunId
from meerkat_runtime.core.lifecycle import (
    ApplyFailed,
    BoundaryAppliedEvent,
    CancelCurrentRun,
    ControlFailed,
    ConversationAppend,
    ConversationAppendRole,
    ConversationContextAppend,
    CoreExecutorError,
    CoreRenderable,
    ExecutorInternalError,
    ExecutorStopped,
    ImmediateAppend,
    ImmediateContextAppend,
    JsonRenderable,
    ReferenceRenderable,
    RunApplyBoundary,
    RunBoundaryReceipt,
    RunCancelledEvent,
    RunCompletedEvent,
    RunControlCommand,
    RunEvent,
    RunFailedEvent,
    RunPrimitive,
    RunStartedEvent,
    RuntimeTurnMetadata,
    SkillKey,
    StagedInput,
    StagedRunInput,
    StopRuntimeExecutor,
    TextRenderable,
    TurnToolOverlay,
)

EVENT: TypeAdapter[Any] = TypeAdapter(RunEvent)
PRIM: TypeAdapter[Any] = TypeAdapter(RunPrimitive)
CTRL: TypeAdapter[Any] = TypeAdapter(RunControlCommand)
REND: TypeAdapter[Any] = TypeAdapter(CoreRenderable)

RUN = RunId("01959d7e-3c4a-7b2e-9f00-1a2b3c4d5e6f")
IN1 = InputId("01959d7e-3c4a-7b2e-9f00-000000000001")
IN2 = InputId("01959d7e-3c4a-7b2e-9f00-000000000002")
IN3 = InputId("01959d7e-3c4a-7b2e-9f00-000000000003")
DIGEST = "ab" * 32


def rt(adapter: TypeAdapter[Any], value: Any) -> tuple[Any, dict[str, Any]]:
    text = adapter.dump_json(value)
    back = adapter.validate_json(text)
    assert type(back) is type(value)
    assert back == value
    assert adapter.dump_json(back) == text
    return back, json.loads(text)


def receipt(**kw: Any) -> RunBoundaryReceipt:
    base: dict[str, Any] = {
        "run_id": RUN,
        "boundary": RunApplyBoundary.RUN_START,
        "contributing_input_ids": [IN1, IN2],
        "conversation_digest": DIGEST,
        "message_count": 4,
        "sequence": 1,
    }
    base.update(kw)
    return RunBoundaryReceipt(**base)


# --- run_event (7) -------------------------------------------------------------------------


def test_run_started_serde() -> None:
    back, doc = rt(EVENT, RunStartedEvent(run_id=RUN))
    assert doc == {"event_type": "run_started", "run_id": str(RUN)}
    assert back.run_id == RUN


def test_boundary_applied_serde() -> None:
    ev = BoundaryAppliedEvent(run_id=RUN, receipt=receipt())
    back, doc = rt(EVENT, ev)
    assert list(doc) == ["event_type", "run_id", "receipt"]  # no snapshot -> omitted
    assert doc["event_type"] == "boundary_applied"
    assert doc["receipt"]["contributing_input_ids"] == [str(IN1), str(IN2)]
    assert back.receipt.contributing_input_ids == [IN1, IN2]
    assert back.session_snapshot is None


def test_boundary_applied_session_snapshot_is_byte_array() -> None:
    ev = BoundaryAppliedEvent(run_id=RUN, receipt=receipt(), session_snapshot=[0, 1, 255])
    back, doc = rt(EVENT, ev)
    assert doc["session_snapshot"] == [0, 1, 255]
    assert back.session_snapshot == [0, 1, 255]


def test_run_completed_serde() -> None:
    back, doc = rt(EVENT, RunCompletedEvent(run_id=RUN, consumed_input_ids=[IN2, IN1]))
    assert doc == {
        "event_type": "run_completed",
        "run_id": str(RUN),
        "consumed_input_ids": [str(IN2), str(IN1)],
    }
    assert back.consumed_input_ids == [IN2, IN1]
    # an empty list is still written
    assert json.loads(EVENT.dump_json(RunCompletedEvent(run_id=RUN)))["consumed_input_ids"] == []


def test_run_failed_serde() -> None:
    back, doc = rt(EVENT, RunFailedEvent(run_id=RUN, error="boom", recoverable=True))
    assert doc == {
        "event_type": "run_failed",
        "run_id": str(RUN),
        "error": "boom",
        "recoverable": True,
    }
    assert back.recoverable is True
    _, doc2 = rt(EVENT, RunFailedEvent(run_id=RUN, error="x", recoverable=False))
    assert doc2["recoverable"] is False


def test_run_cancelled_serde() -> None:
    _, doc = rt(EVENT, RunCancelledEvent(run_id=RUN))
    assert doc == {"event_type": "run_cancelled", "run_id": str(RUN)}


def _all_events() -> list[Any]:
    return [
        RunStartedEvent(run_id=RUN),
        BoundaryAppliedEvent(run_id=RUN, receipt=receipt()),
        RunCompletedEvent(run_id=RUN, consumed_input_ids=[IN3]),
        RunFailedEvent(run_id=RUN, error="e", recoverable=False),
        RunCancelledEvent(run_id=RUN),
    ]


def test_run_event_run_id_accessor() -> None:
    for ev in _all_events():
        assert ev.run_id == RUN
        assert EVENT.validate_json(EVENT.dump_json(ev)).run_id == RUN


def test_run_event_unknown_tag_and_missing_fields_refused() -> None:
    with pytest.raises(ValidationError):
        EVENT.validate_json(f'{{"event_type":"run_paused","run_id":"{RUN}"}}')
    with pytest.raises(ValidationError):
        EVENT.validate_json(f'{{"event_type":"run_failed","run_id":"{RUN}","error":"x"}}')
    with pytest.raises(ValidationError):
        EVENT.validate_json('{"event_type":"run_started"}')


def test_contributing_input_ids_accessor() -> None:
    """reference-runtime §6.2: receipt ids, consumed ids, or empty."""
    started, applied, completed, failed, cancelled = _all_events()
    assert applied.contributing_input_ids == [IN1, IN2]
    assert completed.contributing_input_ids == [IN3]
    for ev in (started, failed, cancelled):
        assert ev.contributing_input_ids == []


# --- run_receipt (3) -----------------------------------------------------------------------


def test_receipt_serde_roundtrip() -> None:
    back, doc = rt(TypeAdapter(RunBoundaryReceipt), receipt())
    assert list(doc) == [
        "run_id",
        "boundary",
        "contributing_input_ids",
        "conversation_digest",
        "message_count",
        "sequence",
    ]
    assert doc["boundary"] == "run_start"
    assert doc["conversation_digest"] == DIGEST
    assert (back.message_count, back.sequence) == (4, 1)


def test_receipt_without_digest() -> None:
    r = RunBoundaryReceipt(run_id=RUN, boundary=RunApplyBoundary.IMMEDIATE)
    back, doc = rt(TypeAdapter(RunBoundaryReceipt), r)
    assert doc == {
        "run_id": str(RUN),
        "boundary": "immediate",
        "contributing_input_ids": [],
        "message_count": 0,
        "sequence": 0,
    }
    assert back.conversation_digest is None


def test_receipt_preserves_contributing_input_ids() -> None:
    r = receipt(contributing_input_ids=[IN3, IN1, IN2])
    back = RunBoundaryReceipt.from_json(r.to_json())
    assert back.contributing_input_ids == [IN3, IN1, IN2]


# --- run_control (2) -----------------------------------------------------------------------


def test_cancel_serde_roundtrip() -> None:
    _, doc = rt(CTRL, CancelCurrentRun(reason="mob interrupt"))
    assert doc == {"command": "cancel_current_run", "reason": "mob interrupt"}


def test_stop_serde_roundtrip() -> None:
    _, doc = rt(CTRL, StopRuntimeExecutor(reason="store failure"))
    assert doc == {"command": "stop_runtime_executor", "reason": "store failure"}


def test_control_reason_defaults_to_empty() -> None:
    cmd = CTRL.validate_json('{"command":"stop_runtime_executor"}')
    assert isinstance(cmd, StopRuntimeExecutor)
    assert cmd.reason == ""
    assert (
        CTRL.dump_json(CancelCurrentRun()).decode()
        == '{"command":"cancel_current_run","reason":""}'
    )
    with pytest.raises(ValidationError):
        CTRL.validate_json('{"command":"pause"}')


# --- core_executor (1) ---------------------------------------------------------------------


def test_core_executor_error_display() -> None:
    errors = [
        ApplyFailed("no session"),
        ControlFailed("not running"),
        ExecutorStopped(),
        ExecutorInternalError("oops"),
    ]
    assert [str(e) for e in errors] == [
        "Apply failed: no session",
        "Control failed: not running",
        "Executor is stopped",
        "Internal error: oops",
    ]
    assert all(isinstance(e, CoreExecutorError) for e in errors)
    assert errors[0].reason == "no session"
    assert errors[3].message == "oops"


# --- run_primitive (11) --------------------------------------------------------------------


@pytest.mark.parametrize("boundary", ["immediate", "run_start", "run_checkpoint"])
def test_run_apply_boundary_serde_roundtrip(boundary: str) -> None:
    adapter: TypeAdapter[RunApplyBoundary] = TypeAdapter(RunApplyBoundary)
    assert adapter.dump_json(RunApplyBoundary(boundary)).decode() == f'"{boundary}"'
    assert adapter.validate_json(f'"{boundary}"') is RunApplyBoundary(boundary)


def test_run_apply_boundary_has_exactly_three_values() -> None:
    assert [b.value for b in RunApplyBoundary] == ["immediate", "run_start", "run_checkpoint"]


def test_core_renderable_text_serde() -> None:
    _, doc = rt(REND, TextRenderable(text="hello"))
    assert doc == {"type": "text", "text": "hello"}


@pytest.mark.parametrize("value", [{"a": [1, 2]}, [1, "x"], "s", 3, True, {"k": None}])
def test_core_renderable_json_serde(value: Any) -> None:
    back, doc = rt(REND, JsonRenderable(value=value))
    assert doc == {"type": "json", "value": value}
    assert back.value == value


def test_core_renderable_json_null_value_written() -> None:
    """Regression: a null value was omitted; 0.4.10 requires the `value` key."""
    assert json.loads(REND.dump_json(JsonRenderable(value=None))) == {"type": "json", "value": None}


def test_core_renderable_reference_serde() -> None:
    _, doc = rt(REND, ReferenceRenderable(uri="file:///a.txt", label="a"))
    assert doc == {"type": "reference", "uri": "file:///a.txt", "label": "a"}
    back, doc2 = rt(REND, ReferenceRenderable(uri="file:///b"))
    assert doc2 == {"type": "reference", "uri": "file:///b", "label": None}  # null written
    assert back.label is None


def test_core_renderable_unknown_type_refused() -> None:
    with pytest.raises(ValidationError):
        REND.validate_json('{"type":"image","uri":"x"}')


def test_conversation_append_role_serde() -> None:
    adapter: TypeAdapter[ConversationAppendRole] = TypeAdapter(ConversationAppendRole)
    assert [r.value for r in ConversationAppendRole] == [
        "user",
        "assistant",
        "system_notice",
        "tool",
    ]
    for r in ConversationAppendRole:
        assert adapter.validate_json(adapter.dump_json(r)) is r


def test_conversation_append_serde() -> None:
    a = ConversationAppend(role=ConversationAppendRole.USER, content=TextRenderable(text="hi"))
    _, doc = rt(TypeAdapter(ConversationAppend), a)
    assert doc == {"role": "user", "content": {"type": "text", "text": "hi"}}
    with_id = ConversationAppend(role="assistant", content=TextRenderable(text="x"), input_id=IN1)
    _, doc2 = rt(TypeAdapter(ConversationAppend), with_id)
    assert doc2["input_id"] == str(IN1)


def test_conversation_context_append_serde() -> None:
    c = ConversationContextAppend(key="system-generated:abc", content=TextRenderable(text="note"))
    back, doc = rt(TypeAdapter(ConversationContextAppend), c)
    assert doc == {"key": "system-generated:abc", "content": {"type": "text", "text": "note"}}
    assert back.key == "system-generated:abc"


FULL_META = RuntimeTurnMetadata(
    host_mode=True,
    skill_references=[SkillKey(source_uuid=str(IN1), skill_name="sk")],
    flow_tool_overlay=TurnToolOverlay(allowed_tools=["read"]),
    additional_instructions=["x"],
)


def test_staged_run_input_serde() -> None:
    s = StagedRunInput(
        boundary=RunApplyBoundary.RUN_START,
        appends=[ConversationAppend(role="user", content=TextRenderable(text="hi"))],
        contributing_input_ids=[IN1],
        turn_metadata=FULL_META,
    )
    back, doc = rt(TypeAdapter(StagedRunInput), s)
    assert list(doc) == ["boundary", "appends", "contributing_input_ids", "turn_metadata"]
    assert doc["turn_metadata"] == {
        "host_mode": True,
        "skill_references": [{"source_uuid": str(IN1), "skill_name": "sk"}],
        "flow_tool_overlay": {"allowed_tools": ["read"], "blocked_tools": None},
        "additional_instructions": ["x"],
    }
    assert back.turn_metadata == FULL_META


def test_staged_run_input_empty_lists_and_none_omitted() -> None:
    s = StagedRunInput(boundary=RunApplyBoundary.RUN_CHECKPOINT)
    assert s.to_json_dict() == {"boundary": "run_checkpoint"}
    back = StagedRunInput.from_json('{"boundary":"run_checkpoint"}')
    assert (back.appends, back.context_appends, back.contributing_input_ids) == ([], [], [])


def test_run_primitive_staged_input_serde() -> None:
    p = StagedInput(
        boundary=RunApplyBoundary.IMMEDIATE,
        context_appends=[
            ConversationContextAppend(key="system-generated:1", content=TextRenderable(text="n"))
        ],
        contributing_input_ids=[IN2],
    )
    back, doc = rt(PRIM, p)
    assert list(doc) == ["primitive_type", "boundary", "context_appends", "contributing_input_ids"]
    assert doc["primitive_type"] == "staged_input"
    assert back.as_staged() == StagedRunInput(
        boundary="immediate", context_appends=p.context_appends, contributing_input_ids=[IN2]
    )


def test_continuation_primitive_is_bare() -> None:
    cont = StagedInput(boundary=RunApplyBoundary.RUN_START)
    assert (
        PRIM.dump_json(cont).decode() == '{"primitive_type":"staged_input","boundary":"run_start"}'
    )


def test_run_primitive_immediate_append_serde() -> None:
    p = ImmediateAppend(role="system_notice", content=JsonRenderable(value={"k": 1}))
    _, doc = rt(PRIM, p)
    assert doc == {
        "primitive_type": "immediate_append",
        "role": "system_notice",
        "content": {"type": "json", "value": {"k": 1}},
    }


def test_run_primitive_immediate_context_append_serde() -> None:
    p = ImmediateContextAppend(key="k", content=ReferenceRenderable(uri="u", label="l"))
    _, doc = rt(PRIM, p)
    assert doc == {
        "primitive_type": "immediate_context_append",
        "key": "k",
        "content": {"type": "reference", "uri": "u", "label": "l"},
    }


def test_run_primitive_unknown_tag_refused() -> None:
    with pytest.raises(ValidationError):
        PRIM.validate_json('{"primitive_type":"tool_result","boundary":"immediate"}')


def test_run_primitive_contributing_input_ids_staged() -> None:
    p = StagedInput(boundary="run_start", contributing_input_ids=[IN1, IN3])
    assert PRIM.validate_json(PRIM.dump_json(p)).contributing_input_ids == [IN1, IN3]
    assert p.turn_metadata is None


@pytest.mark.parametrize(
    "prim",
    [
        ImmediateAppend(role="user", content=TextRenderable(text="x")),
        ImmediateContextAppend(key="k", content=TextRenderable(text="x")),
    ],
    ids=["immediate_append", "immediate_context_append"],
)
def test_run_primitive_contributing_input_ids_empty_for_immediate(prim: Any) -> None:
    """reference-runtime §6.6: contributing_input_ids() is the staged list or empty."""
    assert prim.contributing_input_ids == []


def test_turn_metadata_extensions_roundtrip_and_validate() -> None:
    meta = RuntimeTurnMetadata(
        model="m",
        provider="p",
        max_tokens=100,
        system_prompt="sys",
        output_schema={"type": "object"},
        structured_output_retries=0,
        provider_params={"temperature": 0.2},
    )
    back, doc = rt(TypeAdapter(RuntimeTurnMetadata), meta)
    assert back.provider_params == {"temperature": 0.2}
    assert list(doc) == [
        "model",
        "provider",
        "max_tokens",
        "system_prompt",
        "output_schema",
        "structured_output_retries",
        "provider_params",
    ]
    with pytest.raises(ValidationError):
        RuntimeTurnMetadata(max_tokens=0)
    with pytest.raises(ValidationError):
        RuntimeTurnMetadata(structured_output_retries=-1)


@pytest.mark.parametrize("bad", [[256], [-1]])
def test_session_snapshot_values_are_bytes(bad: list[int]) -> None:
    """Regression: session_snapshot is bytes (0-255) in 0.4.10."""
    with pytest.raises(ValidationError):
        BoundaryAppliedEvent(run_id=RUN, receipt=receipt(), session_snapshot=bad)
