"""Identifiers and timestamps (reference-inputs.md §1.1, §1.2; test lists §13.2 and §13.3)."""

from __future__ import annotations

import copy
import json
import pickle
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

from meerkat_runtime._ids import (
    CausationId,
    ConversationId,
    CorrelationId,
    IdempotencyKey,
    InputId,
    KindId,
    LogicalRuntimeId,
    RunId,
    RuntimeEventId,
    SessionId,
    SupersessionKey,
    new_uuid7,
)
from meerkat_runtime._time import Timestamp, format_ts, parse_ts

NIL = "00000000-0000-0000-0000-000000000000"
SAMPLE = "01959d7e-3c4a-7b2e-9f00-1a2b3c4d5e6f"

UUID_ID_TYPES = [InputId, RunId, RuntimeEventId, ConversationId, CausationId, CorrelationId]
STRING_ID_TYPES = [LogicalRuntimeId, SessionId, IdempotencyKey, SupersessionKey, KindId]


def _dump(tp: type, value: object) -> str:
    return TypeAdapter(tp).dump_json(value).decode()


def _load(tp: type, text: str) -> object:
    return TypeAdapter(tp).validate_json(text)


# --- §13.2 identifiers ---------------------------------------------------------------------


def test_runtime_event_id_unique() -> None:
    assert RuntimeEventId.new() != RuntimeEventId.new()


def test_runtime_event_id_serde() -> None:
    rid = RuntimeEventId.new()
    text = _dump(RuntimeEventId, rid)
    assert text == json.dumps(str(rid))
    back = _load(RuntimeEventId, text)
    assert type(back) is RuntimeEventId
    assert back == rid


def test_logical_runtime_id_serde_and_display() -> None:
    lid = LogicalRuntimeId("agent-1")
    assert str(lid) == "agent-1"
    assert _dump(LogicalRuntimeId, lid) == '"agent-1"'
    assert _load(LogicalRuntimeId, '"agent-1"') == lid


def test_conversation_id_unique() -> None:
    assert ConversationId.new() != ConversationId.new()


def test_idempotency_key_serde() -> None:
    key = IdempotencyKey("req-abc-123")
    assert _dump(IdempotencyKey, key) == '"req-abc-123"'
    assert _load(IdempotencyKey, '"req-abc-123"') == key


def test_supersession_key_serde() -> None:
    key = SupersessionKey("peer-status")
    assert _dump(SupersessionKey, key) == '"peer-status"'
    assert _load(SupersessionKey, '"peer-status"') == key


def test_kind_id_display() -> None:
    assert str(KindId("prompt")) == "prompt"
    assert KindId("prompt").value == "prompt"


def test_string_ids_are_case_sensitive_and_not_normalised() -> None:
    assert LogicalRuntimeId("Agent-1") != LogicalRuntimeId("agent-1")
    assert str(IdempotencyKey("  spaced  ")) == "  spaced  "


# --- §13.3 core identifiers ----------------------------------------------------------------


def test_run_id_new_is_unique() -> None:
    assert RunId.new() != RunId.new()


def test_input_id_new_is_unique() -> None:
    ids = {InputId.new() for _ in range(2000)}
    assert len(ids) == 2000


def test_run_id_from_uuid_roundtrip() -> None:
    u = uuid.UUID(SAMPLE)
    rid = RunId.from_uuid(u)
    assert rid.uuid == u
    assert str(rid) == SAMPLE


def test_run_id_serde_roundtrip() -> None:
    rid = RunId.new()
    back = _load(RunId, _dump(RunId, rid))
    assert back == rid
    assert type(back) is RunId


def test_input_id_serde_roundtrip() -> None:
    iid = InputId.new()
    text = _dump(InputId, iid)
    assert text == f'"{iid}"'
    assert _load(InputId, text) == iid


@pytest.mark.parametrize("cls", [RunId, InputId])
def test_nil_uuid_display(cls: type) -> None:
    assert str(cls(NIL)) == NIL
    assert str(cls.from_uuid(uuid.UUID(int=0))) == NIL


def test_run_id_and_input_id_are_distinct_types() -> None:
    assert RunId is not InputId
    assert not issubclass(RunId, InputId)
    assert not issubclass(InputId, RunId)
    run = RunId(SAMPLE)
    inp = InputId(SAMPLE)
    assert run != inp
    assert inp != run
    assert run.__eq__(inp) is False  # __eq__ itself, not only __ne__
    # both may sit in one set without colliding
    assert len({run, inp}) == 2


def test_run_id_not_accepted_where_an_input_id_is_expected() -> None:
    with pytest.raises(ValidationError):
        TypeAdapter(InputId).validate_python(RunId(SAMPLE))


@pytest.mark.parametrize("cls", UUID_ID_TYPES)
def test_every_uuid_id_roundtrips_and_is_v7(cls: type) -> None:
    value = cls.new()
    assert value.uuid.version == 7
    assert value.uuid.variant == uuid.RFC_4122
    assert _load(cls, _dump(cls, value)) == value
    assert hash(_load(cls, _dump(cls, value))) == hash(value)


@pytest.mark.parametrize("cls", STRING_ID_TYPES)
def test_every_string_id_roundtrips(cls: type) -> None:
    value = cls("some-value-1")
    assert _dump(cls, value) == '"some-value-1"'
    assert _load(cls, '"some-value-1"') == value


def test_ids_in_a_model_are_bare_strings() -> None:
    class M(BaseModel):
        run: RunId
        key: IdempotencyKey

    m = M(run=RunId(SAMPLE), key=IdempotencyKey("k"))
    assert json.loads(m.model_dump_json()) == {"run": SAMPLE, "key": "k"}
    back = M.model_validate_json(m.model_dump_json())
    assert back.run == RunId(SAMPLE)
    assert back.key == IdempotencyKey("k")


def test_new_ids_are_time_ordered_within_the_process() -> None:
    values = [new_uuid7() for _ in range(5000)]
    assert values == sorted(values)
    assert len(set(values)) == 5000
    ids = [InputId.new() for _ in range(100)]
    assert ids == sorted(ids)


def test_ids_are_immutable_and_copy_safe() -> None:
    iid = InputId(SAMPLE)
    with pytest.raises(AttributeError):
        iid._value = NIL  # type: ignore[misc]
    assert copy.deepcopy(iid) == iid
    assert pickle.loads(pickle.dumps(iid)) == iid
    assert repr(iid) == f"InputId('{SAMPLE}')"


@pytest.mark.parametrize(
    "form",
    [
        SAMPLE.upper(),
        SAMPLE.replace("-", ""),
        SAMPLE.replace("-", "").upper(),
        "{" + SAMPLE + "}",
        "urn:uuid:" + SAMPLE,
    ],
)
def test_non_canonical_uuid_forms_are_normalised(form: str) -> None:
    assert str(InputId(form)) == SAMPLE
    assert InputId(form) == InputId(SAMPLE)
    assert _load(RunId, json.dumps(form)) == RunId(SAMPLE)
    assert _dump(RunId, RunId(form)) == f'"{SAMPLE}"'


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "nope",
        SAMPLE[:-1],
        SAMPLE + "0",
        SAMPLE[:-1] + "g",
        SAMPLE + " ",
        "0195 d7e" + SAMPLE[8:],
    ],
)
def test_bad_uuid_rejected_with_a_clear_message(bad: str) -> None:
    with pytest.raises(ValueError) as exc:
        InputId(bad)
    assert repr(bad) in str(exc.value)
    assert "not a UUID" in str(exc.value)
    with pytest.raises(ValidationError) as exc2:
        _load(RunId, json.dumps(bad))
    assert "not a UUID" in str(exc2.value)


def test_non_string_uuid_rejected() -> None:
    with pytest.raises(TypeError):
        InputId(123)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        TypeAdapter(InputId).validate_python(123)


@pytest.mark.parametrize(
    "bad",
    [
        "0195_d7e" + SAMPLE[8:],
        "0x959d7e" + SAMPLE[8:],
        "+1959d7e" + SAMPLE[8:],
        " 1959d7e" + SAMPLE[8:],
        "0195_D7E" + SAMPLE[8:].upper(),
        "0-" + SAMPLE.replace("-", "")[1:],
        "{" + SAMPLE.replace("-", ""),
    ],
)
def test_malformed_uuid_text_is_rejected(bad: str) -> None:
    """Regression: int(x, 16) / uuid.UUID accepted '_', '0x', signs, blanks, stray hyphens."""
    with pytest.raises(ValueError):
        InputId(bad)


# --- §1.2 timestamps -----------------------------------------------------------------------

_TS = TypeAdapter(Timestamp)


@pytest.mark.parametrize(
    ("micro", "text"),
    [
        (0, "2026-03-15T10:20:30Z"),
        (123000, "2026-03-15T10:20:30.123Z"),
        (120000, "2026-03-15T10:20:30.120Z"),
        (1000, "2026-03-15T10:20:30.001Z"),
        (123456, "2026-03-15T10:20:30.123456Z"),
        (100, "2026-03-15T10:20:30.000100Z"),
        (1, "2026-03-15T10:20:30.000001Z"),
    ],
)
def test_timestamps_written_with_0_3_or_6_digits_and_z(micro: int, text: str) -> None:
    dt = datetime(2026, 3, 15, 10, 20, 30, micro, tzinfo=UTC)
    assert format_ts(dt) == text
    assert _TS.dump_json(dt).decode() == json.dumps(text)
    assert parse_ts(text) == dt


def test_timestamp_written_in_utc_whatever_the_input_zone() -> None:
    dt = datetime(2026, 3, 15, 12, 20, 30, tzinfo=timezone(timedelta(hours=2)))
    assert format_ts(dt) == "2026-03-15T10:20:30Z"
    assert format_ts(datetime(2026, 3, 15, 10, 20, 30)) == "2026-03-15T10:20:30Z"  # naive = UTC


def test_nine_digit_fraction_is_read_and_truncated_to_microseconds() -> None:
    dt = parse_ts("2026-03-15T10:20:30.123456789Z")
    assert dt == datetime(2026, 3, 15, 10, 20, 30, 123456, tzinfo=UTC)
    assert format_ts(dt) == "2026-03-15T10:20:30.123456Z"
    assert parse_ts("2026-03-15T10:20:30.999999999Z").microsecond == 999999


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-03-15T12:20:30+02:00", datetime(2026, 3, 15, 10, 20, 30, tzinfo=UTC)),
        ("2026-03-15T05:50:30.5-04:30", datetime(2026, 3, 15, 10, 20, 30, 500000, tzinfo=UTC)),
        (
            "2026-03-16T00:20:30.123456789+14:00",
            datetime(2026, 3, 15, 10, 20, 30, 123456, tzinfo=UTC),
        ),
        ("2026-03-15t10:20:30z", datetime(2026, 3, 15, 10, 20, 30, tzinfo=UTC)),
        ("2026-03-15T10:20:30+00:00", datetime(2026, 3, 15, 10, 20, 30, tzinfo=UTC)),
    ],
)
def test_offset_timestamps_read_and_converted_to_utc(text: str, expected: datetime) -> None:
    dt = parse_ts(text)
    assert dt == expected
    assert dt.utcoffset() == timedelta(0)
    via_model = _TS.validate_json(json.dumps(text))
    assert via_model == expected
    assert via_model.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "bad",
    [
        "2026-03-15",
        "2026-03-15T10:20:30",  # no offset
        "2026-03-15T10:20:30.1234567890Z",  # 10 digits
        "2026-03-15T10:20Z",
        "15/03/2026 10:20:30Z",
        "2026-13-15T10:20:30Z",
    ],
)
def test_bad_timestamps_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_ts(bad)
    with pytest.raises(ValidationError):
        _TS.validate_json(json.dumps(bad))


def test_non_string_timestamp_rejected_with_an_example() -> None:
    with pytest.raises(ValueError, match="RFC 3339"):
        parse_ts(12345)


def test_small_years_round_trip() -> None:
    """Regression: strftime('%Y') wrote '999-...' for years below 1000."""
    dt = datetime(999, 1, 1, tzinfo=UTC)
    text = format_ts(dt)
    assert text == "0999-01-01T00:00:00Z"
    assert parse_ts(text) == dt
