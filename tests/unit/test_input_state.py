"""The input state model and its state machine (reference-inputs.md §6-§7; test lists §13.10
and §13.11; spec §2 extended abandon reasons)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from meerkat_runtime._ids import IdempotencyKey, InputId, RunId
from meerkat_runtime._time import utcnow
from meerkat_runtime.runtime.input_state import (
    AbandonedOutcome,
    CoalescedOutcome,
    CoalescingSource,
    ConsumedOutcome,
    InputAbandonReason,
    InputLifecycleState,
    InputState,
    InputStateHistoryEntry,
    InputTerminalOutcome,
    InvalidTransitionError,
    ProjectionSource,
    ReconstructionSource,
    SupersededOutcome,
    TerminalStateError,
    is_valid_transition,
)
from meerkat_runtime.runtime.inputs import InputDurability, PromptInput
from meerkat_runtime.runtime.policy import PolicySnapshot, default_policy_table

S = InputLifecycleState
ACC, QUE, STG, APP, APC = S.ACCEPTED, S.QUEUED, S.STAGED, S.APPLIED, S.APPLIED_PENDING_CONSUMPTION
CON, SUP, COA, ABN = S.CONSUMED, S.SUPERSEDED, S.COALESCED, S.ABANDONED
ALL_STATES = [ACC, QUE, STG, APP, APC, CON, SUP, COA, ABN]
TERMINAL = {CON, SUP, COA, ABN}

T0 = datetime(2026, 3, 15, 10, 0, 0, tzinfo=UTC)
T1 = datetime(2026, 3, 15, 10, 0, 1, 500000, tzinfo=UTC)

# §7.1 full matrix: rows = from, columns = to (Acc Que Stg App APC Con Sup Coa Abn)
MATRIX = {
    ACC: "·✓···✓✓✓✓",
    QUE: "··✓···✓✓✓",
    STG: "·✓·✓··✓·✓",
    APP: "····✓···✓",
    APC: "·····✓··✓",
    CON: "TTTTTTTTT",
    SUP: "TTTTTTTTT",
    COA: "TTTTTTTTT",
    ABN: "TTTTTTTTT",
}
CELLS = [(src, dst, MATRIX[src][j]) for src in ALL_STATES for j, dst in enumerate(ALL_STATES)]


def state_at(current: InputLifecycleState, **fields: Any) -> InputState:
    return InputState(
        input_id=InputId("01959d7e-3c4a-7b2e-9f00-1a2b3c4d5e6f"),
        current_state=current,
        created_at=T0,
        updated_at=T0,
        **fields,
    )


def snapshot(s: InputState) -> dict[str, Any]:
    return s.to_json_dict()


# --- §6.1 states ---------------------------------------------------------------------------


def test_lifecycle_state_terminal() -> None:
    assert {s for s in S if s.is_terminal} == TERMINAL
    for s in ALL_STATES:
        assert state_at(s).is_terminal is (s in TERMINAL)


def test_lifecycle_state_serde() -> None:
    adapter: TypeAdapter[InputLifecycleState] = TypeAdapter(InputLifecycleState)
    assert [s.value for s in S] == [
        "accepted",
        "queued",
        "staged",
        "applied",
        "applied_pending_consumption",
        "consumed",
        "superseded",
        "coalesced",
        "abandoned",
    ]
    for s in S:
        assert adapter.validate_json(adapter.dump_json(s)) is s
        assert adapter.dump_json(s).decode() == f'"{s.value}"'


# --- §7.1 the 9x9 matrix -------------------------------------------------------------------


def test_exactly_seventeen_legal_transitions() -> None:
    legal = [(a, b) for a in ALL_STATES for b in ALL_STATES if is_valid_transition(a, b)]
    assert len(legal) == 17
    assert legal == [(a, b) for a, b, c in CELLS if c == "✓"]
    assert not any(is_valid_transition(t, dst) for t in TERMINAL for dst in ALL_STATES)


@pytest.mark.parametrize(
    ("src", "dst", "cell"), CELLS, ids=[f"{a.value}->{b.value}" for a, b, _ in CELLS]
)
def test_transition_matrix(src: InputLifecycleState, dst: InputLifecycleState, cell: str) -> None:
    s = state_at(src)
    before = snapshot(s)
    assert is_valid_transition(src, dst) is (cell == "✓")
    if cell == "✓":
        s.transition(dst, now=T1)
        assert s.current_state is dst
        assert len(s.history) == 1
        entry = s.history[0]
        assert (entry.from_, entry.to, entry.reason, entry.timestamp) == (src, dst, None, T1)
        assert s.updated_at == T1
        assert s.created_at == T0
        return
    if cell == "T":
        with pytest.raises(TerminalStateError) as exc:
            s.transition(dst, now=T1)
        assert exc.value.state is src
        assert exc.value.input_id == s.input_id
        assert str(s.input_id) in str(exc.value)
        assert src.value in str(exc.value)
    else:
        with pytest.raises(InvalidTransitionError) as exc2:
            s.transition(dst, now=T1)
        assert (exc2.value.src, exc2.value.dst) == (src, dst)
        assert f"{src.value} -> {dst.value}" in str(exc2.value)
    assert isinstance(s, InputState)
    assert snapshot(s) == before
    assert s.history == []
    assert s.current_state is src


@pytest.mark.parametrize("terminal", sorted(TERMINAL))
def test_terminal_error_wins_over_invalid_even_for_self(terminal: InputLifecycleState) -> None:
    s = state_at(terminal, terminal_outcome=ConsumedOutcome())
    before = snapshot(s)
    for dst in ALL_STATES:
        with pytest.raises(TerminalStateError):
            s.transition(dst)
    assert snapshot(s) == before


@pytest.mark.parametrize("src", [ACC, QUE, STG, APP, APC])
def test_self_transition_illegal(src: InputLifecycleState) -> None:
    with pytest.raises(InvalidTransitionError):
        state_at(src).transition(src)


def test_errors_are_value_errors() -> None:
    assert issubclass(InvalidTransitionError, ValueError)
    assert issubclass(TerminalStateError, ValueError)


# --- §13.11 named cases --------------------------------------------------------------------


def test_accepted_to_queued_records_one_entry() -> None:
    s = InputState.new_accepted(InputId.new())
    s.transition(QUE)
    assert s.current_state is QUE
    assert [(h.from_, h.to) for h in s.history] == [(ACC, QUE)]


def test_full_happy_path_history() -> None:
    s = InputState.new_accepted(InputId.new())
    for dst in (QUE, STG, APP, APC, CON):
        s.transition(dst)
    assert s.current_state is CON
    assert s.is_terminal
    assert [(h.from_, h.to) for h in s.history] == [
        (ACC, QUE),
        (QUE, STG),
        (STG, APP),
        (APP, APC),
        (APC, CON),
    ]
    assert s.terminal_outcome == ConsumedOutcome()
    assert s.updated_at == s.history[-1].timestamp


def test_staged_to_queued_rollback() -> None:
    s = state_at(STG)
    s.transition(QUE, "run failed, rollback")
    assert s.current_state is QUE
    assert s.history[0].reason == "run failed, rollback"


def test_applied_pending_to_queued_rejected() -> None:
    s = state_at(APC)
    before = snapshot(s)
    with pytest.raises(InvalidTransitionError):
        s.transition(QUE)
    assert snapshot(s) == before


def test_accepted_to_consumed_ignore_on_accept() -> None:
    s = state_at(ACC)
    s.transition(CON, "ignored at accept")
    assert s.is_terminal
    assert s.terminal_outcome == ConsumedOutcome()


@pytest.mark.parametrize("via", [SUP, COA])
def test_terminal_after_supersede_or_coalesce_rejects_further(via: InputLifecycleState) -> None:
    s = state_at(ACC)
    s.transition(via)
    with pytest.raises(TerminalStateError):
        s.transition(QUE)


# --- terminal outcomes ---------------------------------------------------------------------


def test_consumed_outcome_set_automatically() -> None:
    s = state_at(APC)
    assert s.terminal_outcome is None
    s.transition(CON)
    assert s.terminal_outcome == ConsumedOutcome()


@pytest.mark.parametrize("src", [ACC, QUE, STG, APP, APC])
def test_bare_abandon_transition_defaults_to_cancelled(src: InputLifecycleState) -> None:
    s = state_at(src)
    s.transition(ABN)
    assert s.terminal_outcome == AbandonedOutcome(reason=InputAbandonReason.CANCELLED)
    assert s.history[0].reason is None


@pytest.mark.parametrize(
    ("src", "dst"), [(ACC, SUP), (QUE, SUP), (STG, SUP), (ACC, COA), (QUE, COA)]
)
def test_bare_supersede_or_coalesce_leave_outcome_unset(
    src: InputLifecycleState, dst: InputLifecycleState
) -> None:
    s = state_at(src)
    s.transition(dst)
    assert s.current_state is dst
    assert s.terminal_outcome is None


def test_preset_outcome_not_overwritten_by_transition() -> None:
    preset = AbandonedOutcome(reason=InputAbandonReason.RESET)
    s = state_at(APC, terminal_outcome=preset)
    s.transition(CON)
    assert s.terminal_outcome == preset


@pytest.mark.parametrize(
    ("src", "reason"),
    [
        (ACC, InputAbandonReason.RETIRED),
        (QUE, InputAbandonReason.RESET),
        (STG, InputAbandonReason.DESTROYED),
        (APP, InputAbandonReason.CANCELLED),
        (APC, InputAbandonReason.RETIRED),
        (QUE, InputAbandonReason.RECOVERY_FAILED),
        (QUE, InputAbandonReason.RETRY_BUDGET_EXCEEDED),
    ],
)
def test_abandon_from_each_state(src: InputLifecycleState, reason: InputAbandonReason) -> None:
    s = state_at(src)
    s.abandon(reason, now=T1)
    assert s.current_state is ABN
    assert s.terminal_outcome == AbandonedOutcome(reason=reason)
    assert len(s.history) == 1
    assert s.history[0].reason == f"abandoned: {reason.value}"
    assert (s.history[0].from_, s.history[0].to, s.history[0].timestamp) == (src, ABN, T1)
    assert s.updated_at == T1


def test_abandon_failed_carries_error_text() -> None:
    s = state_at(STG)
    s.abandon(InputAbandonReason.FAILED, "model refused: bad request")
    assert s.terminal_outcome == AbandonedOutcome(
        reason=InputAbandonReason.FAILED, error="model refused: bad request"
    )
    assert s.history[0].reason == "abandoned: failed: model refused: bad request"
    assert json.loads(s.to_json())["terminal_outcome"] == {
        "outcome_type": "abandoned",
        "reason": "failed",
        "error": "model refused: bad request",
    }


def test_abandon_overwrites_preset_outcome() -> None:
    s = state_at(QUE, terminal_outcome=ConsumedOutcome())
    s.abandon(InputAbandonReason.DESTROYED)
    assert s.terminal_outcome == AbandonedOutcome(reason=InputAbandonReason.DESTROYED)


@pytest.mark.parametrize("terminal", sorted(TERMINAL))
def test_abandon_from_terminal_raises_and_changes_nothing(terminal: InputLifecycleState) -> None:
    s = state_at(terminal, terminal_outcome=ConsumedOutcome())
    before = snapshot(s)
    with pytest.raises(TerminalStateError):
        s.abandon(InputAbandonReason.RETIRED)
    assert snapshot(s) == before


def test_supersede_sets_outcome_and_reason() -> None:
    by = InputId.new()
    s = state_at(QUE)
    s.supersede(by, now=T1)
    assert s.current_state is SUP
    assert s.terminal_outcome == SupersededOutcome(superseded_by=by)
    assert s.history[0].reason == f"superseded by {by}"
    assert s.updated_at == T1


def test_coalesce_sets_outcome_and_reason() -> None:
    into = InputId.new()
    s = state_at(ACC)
    s.coalesce(into)
    assert s.current_state is COA
    assert s.terminal_outcome == CoalescedOutcome(aggregate_id=into)
    assert s.history[0].reason == f"coalesced into {into}"


@pytest.mark.parametrize(
    ("src", "method"), [(APP, "supersede"), (APC, "coalesce"), (STG, "coalesce")]
)
def test_supersede_coalesce_illegal_leave_state_untouched(
    src: InputLifecycleState, method: str
) -> None:
    s = state_at(src)
    before = snapshot(s)
    with pytest.raises(InvalidTransitionError):
        getattr(s, method)(InputId.new())
    assert snapshot(s) == before
    assert s.terminal_outcome is None


# --- history -------------------------------------------------------------------------------


def test_history_records_reason() -> None:
    s = state_at(ACC)
    s.transition(QUE, "recovery: Accepted→Queued")
    assert s.history[0].reason == "recovery: Accepted→Queued"
    assert json.loads(s.to_json())["history"][0]["reason"] == "recovery: Accepted→Queued"


def test_history_records_timestamps() -> None:
    s = InputState.new_accepted(InputId.new())
    before = utcnow()
    s.transition(QUE)
    after = utcnow()
    ts = s.history[0].timestamp
    assert before <= ts <= after
    assert ts.utcoffset() == timedelta(0)
    assert s.updated_at == ts


def test_history_appends_in_order_and_failed_transitions_add_nothing() -> None:
    s = InputState.new_accepted(InputId.new())
    s.transition(QUE, "a")
    with pytest.raises(InvalidTransitionError):
        s.transition(APP, "nope")
    s.transition(STG, "b")
    assert [h.reason for h in s.history] == ["a", "b"]
    assert s.history[0].timestamp <= s.history[1].timestamp


# --- §6.8 InputState and its JSON ----------------------------------------------------------


def test_input_state_new_accepted() -> None:
    iid = InputId.new()
    before = utcnow()
    s = InputState.new_accepted(iid)
    after = utcnow()
    assert s.input_id == iid
    assert s.current_state is ACC
    assert not s.is_terminal
    assert s.history == []
    assert s.terminal_outcome is None
    assert s.policy is None
    assert s.durability is None
    assert (s.attempt_count, s.recovery_count) == (0, 0)
    assert s.created_at == s.updated_at
    assert before <= s.created_at <= after


def test_new_accepted_json_exact() -> None:
    s = InputState.new_accepted(InputId("01959d7e-3c4a-7b2e-9f00-1a2b3c4d5e6f"), now=T0)
    assert s.to_json() == (
        '{"input_id":"01959d7e-3c4a-7b2e-9f00-1a2b3c4d5e6f","current_state":"accepted",'
        '"attempt_count":0,"recovery_count":0,'
        '"created_at":"2026-03-15T10:00:00Z","updated_at":"2026-03-15T10:00:00Z"}'
    )


def test_history_entry_json_uses_from_key_and_omits_unset_reason() -> None:
    s = state_at(ACC)
    s.transition(QUE, now=T1)
    s.transition(STG, "why", now=T1)
    assert json.loads(s.to_json())["history"] == [
        {"timestamp": "2026-03-15T10:00:01.500Z", "from": "accepted", "to": "queued"},
        {
            "timestamp": "2026-03-15T10:00:01.500Z",
            "from": "queued",
            "to": "staged",
            "reason": "why",
        },
    ]
    entry = InputStateHistoryEntry.from_json(
        '{"timestamp":"2026-03-15T10:00:01Z","from":"staged","to":"applied","extra":1}'
    )
    assert (entry.from_, entry.to, entry.reason) == (STG, APP, None)


def test_input_state_serde_roundtrip_full() -> None:
    prompt = PromptInput.new("hello", idempotency_key="k")
    decision = default_policy_table().resolve("prompt", True)
    s = InputState.new_accepted(prompt.id, now=T0)
    s.policy = PolicySnapshot(version=decision.policy_version, decision=decision)
    s.durability = InputDurability.DURABLE
    s.idempotency_key = IdempotencyKey("k")
    s.attempt_count = 2
    s.recovery_count = 1
    s.reconstruction_source = CoalescingSource(source_input_ids=[InputId.new(), InputId.new()])
    s.persisted_input = prompt
    s.last_run_id = RunId.new()
    s.last_boundary_sequence = 3
    s.transition(QUE, now=T1)
    text = s.to_json()
    doc = json.loads(text)
    assert list(doc) == [
        "input_id",
        "current_state",
        "policy",
        "durability",
        "idempotency_key",
        "attempt_count",
        "recovery_count",
        "history",
        "reconstruction_source",
        "persisted_input",
        "last_run_id",
        "last_boundary_sequence",
        "created_at",
        "updated_at",
    ]
    assert doc["persisted_input"]["input_type"] == "prompt"
    assert doc["policy"]["version"] == 1
    back = InputState.from_json(text)
    assert back == s
    assert back.to_json() == text
    assert back.input_id == prompt.id
    assert back.current_state is QUE
    assert len(back.history) == 1
    assert isinstance(back.persisted_input, PromptInput)


def test_input_state_json_with_terminal_outcome_position() -> None:
    s = state_at(APC)
    s.transition(CON, now=T1)
    doc = json.loads(s.to_json())
    assert list(doc)[:3] == ["input_id", "current_state", "terminal_outcome"]
    assert doc["terminal_outcome"] == {"outcome_type": "consumed"}


def test_input_state_read_defaults() -> None:
    s = InputState.from_json(
        '{"input_id":"01959d7e-3c4a-7b2e-9f00-1a2b3c4d5e6f","current_state":"queued",'
        '"created_at":"2026-03-15T10:00:00Z","updated_at":"2026-03-15T12:00:00+02:00",'
        '"future_field":true}'
    )
    assert (s.attempt_count, s.recovery_count, s.history) == (0, 0, [])
    assert s.updated_at == T0
    assert s.policy is None and s.persisted_input is None and s.last_run_id is None


@pytest.mark.parametrize("missing", ["input_id", "current_state", "created_at", "updated_at"])
def test_input_state_required_fields(missing: str) -> None:
    doc = state_at(QUE).to_json_dict()
    del doc[missing]
    with pytest.raises(ValidationError):
        InputState.from_json(doc)


def test_clone_is_independent() -> None:
    s = state_at(ACC)
    c = s.clone()
    c.transition(QUE)
    assert s.current_state is ACC
    assert s.history == []
    assert len(c.history) == 1


# --- outcomes, reasons, reconstruction sources ---------------------------------------------

_OUTCOME = TypeAdapter(InputTerminalOutcome)


def test_terminal_outcome_consumed_serde() -> None:
    assert _OUTCOME.dump_json(ConsumedOutcome()).decode() == '{"outcome_type":"consumed"}'
    assert _OUTCOME.validate_json('{"outcome_type":"consumed"}') == ConsumedOutcome()


def test_terminal_outcome_superseded_serde() -> None:
    by = InputId.new()
    o = SupersededOutcome(superseded_by=by)
    assert json.loads(_OUTCOME.dump_json(o)) == {
        "outcome_type": "superseded",
        "superseded_by": str(by),
    }
    assert _OUTCOME.validate_json(_OUTCOME.dump_json(o)) == o


def test_terminal_outcome_coalesced_serde() -> None:
    agg = InputId.new()
    o = CoalescedOutcome(aggregate_id=agg)
    assert json.loads(_OUTCOME.dump_json(o)) == {
        "outcome_type": "coalesced",
        "aggregate_id": str(agg),
    }
    assert _OUTCOME.validate_json(_OUTCOME.dump_json(o)) == o


ALL_REASONS = [
    "retired",
    "reset",
    "destroyed",
    "cancelled",
    "recovery_failed",
    "retry_budget_exceeded",
    "failed",
]


def test_abandon_reasons_are_exactly_seven() -> None:
    assert [r.value for r in InputAbandonReason] == ALL_REASONS


@pytest.mark.parametrize("reason", ALL_REASONS)
def test_abandon_reason_and_outcome_serde(reason: str) -> None:
    adapter: TypeAdapter[InputAbandonReason] = TypeAdapter(InputAbandonReason)
    assert adapter.validate_json(f'"{reason}"') is InputAbandonReason(reason)
    o = AbandonedOutcome(reason=InputAbandonReason(reason))
    text = _OUTCOME.dump_json(o).decode()
    assert text == f'{{"outcome_type":"abandoned","reason":"{reason}"}}'
    assert _OUTCOME.validate_json(text) == o


def test_unknown_outcome_and_reason_refused() -> None:
    with pytest.raises(ValidationError):
        _OUTCOME.validate_json('{"outcome_type":"abandoned","reason":"Retired"}')
    with pytest.raises(ValidationError):
        _OUTCOME.validate_json('{"outcome_type":"expired"}')


_SOURCE = TypeAdapter(ReconstructionSource)


def test_reconstruction_source_projection_serde() -> None:
    src = ProjectionSource(rule_id="rule-1", source_event_id="evt-1")
    assert json.loads(_SOURCE.dump_json(src)) == {
        "source_type": "projection",
        "rule_id": "rule-1",
        "source_event_id": "evt-1",
    }
    assert _SOURCE.validate_json(_SOURCE.dump_json(src)) == src


def test_reconstruction_source_coalescing_serde() -> None:
    ids = [InputId.new(), InputId.new(), InputId.new()]
    src = CoalescingSource(source_input_ids=ids)
    doc = json.loads(_SOURCE.dump_json(src))
    assert doc == {"source_type": "coalescing", "source_input_ids": [str(i) for i in ids]}
    back = _SOURCE.validate_json(_SOURCE.dump_json(src))
    assert back == src
    assert back.source_input_ids == ids  # order kept
    empty = CoalescingSource(source_input_ids=[])
    assert json.loads(_SOURCE.dump_json(empty)) == {
        "source_type": "coalescing",
        "source_input_ids": [],
    }


def test_transition_coerces_string_targets() -> None:
    """Regression: a str target was stored unconverted and skipped the Consumed outcome."""
    s = state_at(APC)
    s.transition("consumed")  # type: ignore[arg-type]
    assert s.current_state is CON
    assert s.terminal_outcome == ConsumedOutcome()


def test_plain_pydantic_dump_uses_wire_key_from() -> None:
    """Regression: model_dump_json() wrote 'from_' unless by_alias=True was passed."""
    s = state_at(ACC)
    s.transition(QUE)
    assert "from" in json.loads(s.model_dump_json())["history"][0]
