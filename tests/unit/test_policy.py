"""Policy dimensions, decisions and the default table (reference-inputs.md §5; test lists §13.7
and §13.8; spec S1 with its three corrections, S17)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from meerkat_runtime.runtime.inputs import (
    KIND_IDS,
    ExternalEventInput,
    MessageConvention,
    PeerInput,
    PromptInput,
    RequestConvention,
    kind_id,
)
from meerkat_runtime.runtime.policy import (
    DEFAULT_POLICY_VERSION,
    ApplyMode,
    ConsumePoint,
    PolicyDecision,
    PolicyRow,
    PolicySnapshot,
    PolicyTable,
    QueueMode,
    WakeMode,
    default_policy_table,
)

# --- §13.7 enums and decisions -------------------------------------------------------------


@pytest.mark.parametrize(
    ("enum_type", "values"),
    [
        (ApplyMode, ["stage_run_start", "stage_run_boundary", "inject_now", "ignore"]),
        (WakeMode, ["wake_if_idle", "interrupt_yielding", "none"]),
        (QueueMode, ["none", "fifo", "coalesce", "supersede", "priority"]),
        (
            ConsumePoint,
            ["on_accept", "on_apply", "on_run_start", "on_run_complete", "explicit_ack"],
        ),
    ],
    ids=["apply_mode", "wake_mode", "queue_mode", "consume_point"],
)
def test_dimension_enums_serde(enum_type: Any, values: list[str]) -> None:
    assert [m.value for m in enum_type] == values
    adapter: TypeAdapter[Any] = TypeAdapter(enum_type)
    for v in values:
        member = enum_type(v)
        assert adapter.dump_json(member).decode() == f'"{v}"'
        assert adapter.validate_json(f'"{v}"') is member
    with pytest.raises(ValidationError):
        adapter.validate_json('"StageRunStart"')


FULL_JSON = (
    '{"apply_mode":"stage_run_start","wake_mode":"wake_if_idle","queue_mode":"fifo",'
    '"consume_point":"on_run_complete","record_transcript":true,"emit_operator_content":true,'
    '"policy_version":1}'
)


def test_policy_decision_serde_roundtrip() -> None:
    d = PolicyDecision(
        apply_mode=ApplyMode.STAGE_RUN_START,
        wake_mode=WakeMode.WAKE_IF_IDLE,
        queue_mode=QueueMode.FIFO,
        consume_point=ConsumePoint.ON_RUN_COMPLETE,
        record_transcript=True,
        emit_operator_content=True,
        policy_version=1,
    )
    assert d.to_json() == FULL_JSON
    assert PolicyDecision.from_json(FULL_JSON) == d


def test_policy_decision_ignore_on_accept() -> None:
    d = PolicyTable.decision("ignore", "none", "none", "on_accept", record_transcript=False)
    assert json.loads(d.to_json()) == {
        "apply_mode": "ignore",
        "wake_mode": "none",
        "queue_mode": "none",
        "consume_point": "on_accept",
        "record_transcript": False,
        "emit_operator_content": False,
        "policy_version": 1,
    }
    assert PolicyDecision.from_json(d.to_json()) == d


def test_record_transcript_defaults_true() -> None:
    d = PolicyDecision.from_json(
        '{"apply_mode":"inject_now","wake_mode":"none","queue_mode":"priority",'
        '"consume_point":"explicit_ack","policy_version":3}'
    )
    assert d.record_transcript is True
    assert d.emit_operator_content is True
    assert d.apply_mode is ApplyMode.INJECT_NOW
    assert d.queue_mode is QueueMode.PRIORITY
    assert d.consume_point is ConsumePoint.EXPLICIT_ACK
    assert d.policy_version == 3
    # always written in full
    assert json.loads(d.to_json())["record_transcript"] is True
    assert json.loads(d.to_json())["emit_operator_content"] is True


@pytest.mark.parametrize(
    "missing", ["apply_mode", "wake_mode", "queue_mode", "consume_point", "policy_version"]
)
def test_policy_decision_required_fields(missing: str) -> None:
    doc = json.loads(FULL_JSON)
    del doc[missing]
    with pytest.raises(ValidationError):
        PolicyDecision.from_json(doc)


def test_policy_version_serde() -> None:
    d = PolicyTable.decision("stage_run_start", "none", "fifo", "on_apply", version=42)
    doc = json.loads(d.to_json())
    assert doc["policy_version"] == 42
    assert isinstance(doc["policy_version"], int)
    assert PolicyDecision.from_json(d.to_json()).policy_version == 42
    snap = PolicySnapshot(version=42, decision=d)
    assert json.loads(snap.to_json()) == {"version": 42, "decision": doc}
    assert PolicySnapshot.from_json(snap.to_json()) == snap


def test_policy_decision_unknown_fields_ignored_and_frozen() -> None:
    doc = json.loads(FULL_JSON) | {"future": 1}
    d = PolicyDecision.from_json(doc)
    assert "future" not in json.loads(d.to_json())
    with pytest.raises(ValidationError):
        d.apply_mode = ApplyMode.IGNORE  # type: ignore[misc]


def test_policy_decision_equality_is_field_by_field() -> None:
    a = PolicyTable.decision("stage_run_start", "none", "fifo", "on_apply")
    assert a == PolicyTable.decision("stage_run_start", "none", "fifo", "on_apply")
    assert a != PolicyTable.decision("stage_run_start", "none", "fifo", "on_apply", version=2)
    assert a != PolicyTable.decision(
        "stage_run_start", "none", "fifo", "on_apply", record_transcript=False
    )


# --- §13.8 the default table (as corrected by S1) ------------------------------------------

SRS, SRB, INJ, IGN = "stage_run_start", "stage_run_boundary", "inject_now", "ignore"
ORC, ONA = "on_run_complete", "on_accept"

# (kind, idle) -> (apply, wake, queue, consume, record_transcript)
DEFAULT_TABLE: dict[tuple[str, bool], tuple[str, str, str, str, bool]] = {
    ("prompt", True): (SRS, "wake_if_idle", "fifo", ORC, True),
    ("prompt", False): (SRS, "none", "fifo", ORC, True),
    ("peer_message", True): (SRS, "wake_if_idle", "fifo", ORC, True),
    ("peer_message", False): (SRB, "interrupt_yielding", "fifo", ORC, True),  # S1
    ("peer_request", True): (SRS, "wake_if_idle", "fifo", ORC, True),
    ("peer_request", False): (SRB, "interrupt_yielding", "fifo", ORC, True),  # S1
    ("peer_response_progress", True): (SRB, "none", "coalesce", ORC, True),
    ("peer_response_progress", False): (SRB, "none", "coalesce", ORC, True),
    ("peer_response_terminal", True): (SRS, "wake_if_idle", "fifo", ORC, True),
    ("peer_response_terminal", False): (SRB, "none", "fifo", ORC, True),  # S1
    ("flow_step", True): (SRS, "wake_if_idle", "fifo", ORC, True),
    ("flow_step", False): (SRS, "none", "fifo", ORC, True),
    ("external_event", True): (SRS, "wake_if_idle", "fifo", ORC, True),
    ("external_event", False): (SRS, "none", "fifo", ORC, True),
    ("system_generated", True): (INJ, "none", "none", ONA, True),
    ("system_generated", False): (INJ, "none", "none", ONA, True),
    ("projected", True): (IGN, "none", "none", ONA, False),
    ("projected", False): (IGN, "none", "coalesce", ONA, False),
}


@pytest.mark.parametrize(
    ("kind", "idle"),
    list(DEFAULT_TABLE),
    ids=[f"{k}_{'idle' if i else 'running'}" for k, i in DEFAULT_TABLE],
)
def test_default_table_cell(kind: str, idle: bool) -> None:
    d = default_policy_table().resolve(kind, idle)
    apply, wake, queue, consume, transcript = DEFAULT_TABLE[(kind, idle)]
    assert d.apply_mode is ApplyMode(apply)
    assert d.wake_mode is WakeMode(wake)
    assert d.queue_mode is QueueMode(queue)
    assert d.consume_point is ConsumePoint(consume)
    assert d.record_transcript is transcript
    assert d.emit_operator_content is transcript
    assert d.policy_version == DEFAULT_POLICY_VERSION == 1


def test_default_table_has_a_row_for_every_kind_and_nothing_else() -> None:
    assert set(default_policy_table().rows()) == set(KIND_IDS)
    assert {k for k, _ in DEFAULT_TABLE} == set(KIND_IDS)
    assert default_policy_table().version == 1


@pytest.mark.parametrize("kind", ["tool_callback", "", "PROMPT", "peer"])
@pytest.mark.parametrize("idle", [True, False])
def test_unknown_kind_uses_fallback_row(kind: str, idle: bool) -> None:
    d = default_policy_table().resolve(kind, idle)
    assert d == PolicyTable.decision(SRS, "none", "fifo", ORC)
    assert d.record_transcript is d.emit_operator_content is True


def test_resolve_via_input_object() -> None:
    d = default_policy_table().resolve(kind_id(PromptInput.new("x")), True)
    assert d.apply_mode is ApplyMode.STAGE_RUN_START
    assert d.wake_mode is WakeMode.WAKE_IF_IDLE


def test_peer_without_convention_resolves_as_peer_message() -> None:
    table = default_policy_table()
    bare = PeerInput.new("b", peer_id="p")
    msg = PeerInput.new("b", peer_id="p", convention=MessageConvention())
    for idle in (True, False):
        assert table.resolve(kind_id(bare), idle) == table.resolve(kind_id(msg), idle)
    assert table.resolve(kind_id(bare), False).wake_mode is WakeMode.INTERRUPT_YIELDING


@pytest.mark.parametrize("kind", ["peer_message", "peer_request"])
def test_peer_running_interrupts_yielding_idle_still_wakes(kind: str) -> None:
    table = default_policy_table()
    running = table.resolve(kind, False)
    assert running.wake_mode is WakeMode.INTERRUPT_YIELDING
    assert running.wake_mode is not WakeMode.WAKE_IF_IDLE
    assert table.resolve(kind, True).wake_mode is WakeMode.WAKE_IF_IDLE


def test_header_is_never_consulted() -> None:
    table = default_policy_table()
    a = PeerInput.new("b", peer_id="p", convention=RequestConvention(request_id="r", intent="i"))
    b = PeerInput.new(
        "b",
        peer_id="q",
        durability="ephemeral",
        idempotency_key="k",
        convention=RequestConvention(request_id="r2", intent="j"),
    )
    assert table.resolve(kind_id(a), True) == table.resolve(kind_id(b), True)


def test_rows_is_a_copy_and_tables_are_independent() -> None:
    t1 = default_policy_table()
    projected = t1.rows()["projected"]
    t1.rows()["prompt"] = projected  # mutating the copy changes nothing
    assert t1.resolve("prompt", True).apply_mode is ApplyMode.STAGE_RUN_START
    t2 = t1.with_rows({"prompt": projected})
    assert t2.resolve("prompt", True).apply_mode is ApplyMode.IGNORE
    assert t1.resolve("prompt", True).apply_mode is ApplyMode.STAGE_RUN_START
    assert default_policy_table().resolve("prompt", True).apply_mode is ApplyMode.STAGE_RUN_START


# --- S1: tables are data -------------------------------------------------------------------


def test_with_rows_overrides_by_kind() -> None:
    base = default_policy_table()
    custom = PolicyRow(
        idle=PolicyTable.decision("stage_run_start", "wake_if_idle", "priority", "on_apply"),
        running=PolicyTable.decision("stage_run_boundary", "none", "supersede", "explicit_ack"),
    )
    table = base.with_rows({"prompt": custom})
    assert table.resolve("prompt", True) == custom.idle
    assert table.resolve("prompt", False) == custom.running
    # other rows and the original table untouched
    assert table.resolve("flow_step", True) == base.resolve("flow_step", True)
    assert base.resolve("prompt", True).queue_mode is QueueMode.FIFO
    assert table.resolve("nope", True) == base.resolve("nope", True)
    assert table.version == base.version


def test_with_rows_overrides_external_event_by_event_type() -> None:
    base = default_policy_table()
    quiet = PolicyTable.decision("stage_run_boundary", "none", "coalesce", "on_run_complete")
    table = base.with_rows({("external_event", "metrics.tick"): PolicyRow(quiet, quiet)})
    assert table.resolve("external_event", True, "metrics.tick") == quiet
    assert table.resolve("external_event", False, "metrics.tick") == quiet
    # other event types and no event type fall back to the kind row
    assert table.resolve("external_event", True, "webhook.received") == base.resolve(
        "external_event", True
    )
    assert table.resolve("external_event", True) == base.resolve("external_event", True)
    assert table.resolve("external_event", True).wake_mode is WakeMode.WAKE_IF_IDLE
    e = ExternalEventInput.new("metrics.tick", {"v": 1})
    assert table.resolve(kind_id(e), True, e.event_type) == quiet


def test_event_type_row_wins_over_kind_row() -> None:
    a = PolicyTable.decision("inject_now", "none", "none", "on_accept")
    b = PolicyTable.decision("ignore", "none", "none", "on_accept", record_transcript=False)
    table = PolicyTable(
        {"external_event": PolicyRow(a, a), ("external_event", "x"): PolicyRow(b, b)}
    )
    assert table.resolve("external_event", True, "x") == b
    assert table.resolve("external_event", False, "y") == a


def test_custom_fallback_and_version() -> None:
    fb = PolicyTable.decision("ignore", "none", "none", "on_accept", version=7)
    table = PolicyTable({}, fallback=PolicyRow(fb, fb), version=7)
    assert table.resolve("prompt", True) == fb
    assert table.version == 7
    assert table.with_rows({}).resolve("anything", False) == fb
    assert table.with_rows({}).version == 7


def test_empty_table_default_fallback_carries_table_version() -> None:
    d = PolicyTable({}, version=5).resolve("prompt", True)
    assert d.policy_version == 5
    assert (d.apply_mode, d.wake_mode, d.queue_mode, d.consume_point) == (
        ApplyMode.STAGE_RUN_START,
        WakeMode.NONE,
        QueueMode.FIFO,
        ConsumePoint.ON_RUN_COMPLETE,
    )


# --- derived properties --------------------------------------------------------------------


def _dec(apply: str = SRS, wake: str = "none", queue: str = "fifo", consume: str = ORC):
    return PolicyTable.decision(apply, wake, queue, consume)


@pytest.mark.parametrize(
    ("apply", "expected"), [(SRS, False), (SRB, True), (INJ, True), (IGN, False)]
)
def test_joins_boundaries(apply: str, expected: bool) -> None:
    assert _dec(apply=apply).joins_boundaries is expected


@pytest.mark.parametrize("apply", [SRS, SRB, INJ, IGN])
@pytest.mark.parametrize("wake", ["wake_if_idle", "interrupt_yielding", "none"])
def test_wakes(apply: str, wake: str) -> None:
    expected = wake == "wake_if_idle" or apply == INJ
    assert _dec(apply=apply, wake=wake).wakes is expected


@pytest.mark.parametrize("apply", [SRS, SRB, INJ, IGN])
@pytest.mark.parametrize(
    "consume", ["on_accept", "on_apply", "on_run_start", "on_run_complete", "explicit_ack"]
)
def test_effective_consume_point(apply: str, consume: str) -> None:
    expected = "on_apply" if (consume == "on_accept" and apply != IGN) else consume
    assert _dec(apply=apply, consume=consume).effective_consume_point is ConsumePoint(expected)


@pytest.mark.parametrize(
    ("queue", "expected"),
    [
        ("none", True),
        ("fifo", False),
        ("coalesce", False),
        ("supersede", False),
        ("priority", True),
    ],
)
def test_is_priority(queue: str, expected: bool) -> None:
    assert _dec(queue=queue).is_priority is expected


@pytest.mark.parametrize(
    ("apply", "expected"), [(SRS, False), (SRB, False), (INJ, False), (IGN, True)]
)
def test_consumed_at_accept(apply: str, expected: bool) -> None:
    assert _dec(apply=apply).consumed_at_accept is expected


def test_derived_properties_on_the_default_table() -> None:
    t = default_policy_table()
    # S17: wakes is read on the as-if-idle decision
    wakers = {k for k in KIND_IDS if t.resolve(k, True).wakes}
    assert wakers == {
        "prompt",
        "peer_message",
        "peer_request",
        "peer_response_terminal",
        "flow_step",
        "external_event",
        "system_generated",
    }
    # a progress response never starts a run on its own
    assert not t.resolve("peer_response_progress", True).wakes
    joiners_running = {k for k in KIND_IDS if t.resolve(k, False).joins_boundaries}
    assert joiners_running == {
        "peer_message",
        "peer_request",
        "peer_response_progress",
        "peer_response_terminal",
        "system_generated",
    }
    assert t.resolve("system_generated", True).effective_consume_point is ConsumePoint.ON_APPLY
    assert t.resolve("projected", True).effective_consume_point is ConsumePoint.ON_ACCEPT
    assert t.resolve("projected", False).consumed_at_accept
    assert t.resolve("system_generated", True).is_priority
    assert not t.resolve("prompt", True).is_priority
