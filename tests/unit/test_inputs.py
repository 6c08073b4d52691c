"""Inputs: variants, JSON shapes, kind ids, parse errors, durability, content hash, rendering
(reference-inputs.md §2, §3; test lists §13.1 and §13.6; spec S11, S13)."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import TypeAdapter

from meerkat_runtime._ids import CorrelationId, IdempotencyKey, InputId, LogicalRuntimeId
from meerkat_runtime.core.lifecycle import RuntimeTurnMetadata, SkillKey, TurnToolOverlay
from meerkat_runtime.runtime.inputs import (
    KIND_IDS,
    DurabilityError,
    ExternalEventInput,
    ExternalOrigin,
    FlowOrigin,
    FlowStepInput,
    InputDurability,
    InputHeader,
    InputOrigin,
    InputVisibility,
    MessageConvention,
    OperatorOrigin,
    PeerInput,
    PeerOrigin,
    ProjectedInput,
    PromptInput,
    RequestConvention,
    ResponseProgressConvention,
    ResponseProgressPhase,
    ResponseTerminalConvention,
    ResponseTerminalStatus,
    SystemGeneratedInput,
    SystemOrigin,
    content_hash,
    input_adapter,
    kind_id,
    parse_input,
    render_input_text,
    validate_durability,
)

ID = "01959d7e-3c4a-7b2e-9f00-1a2b3c4d5e6f"
CORR = "01959d7e-3c4a-7b2e-9f00-aaaaaaaaaaaa"
TS9 = "2026-03-15T10:20:30.123456789Z"
TS6 = "2026-03-15T10:20:30.123456Z"
VIS = {"transcript_eligible": True, "operator_eligible": True}


def header(source: dict[str, Any] | None = None, durability: str = "durable", **extra: Any):
    h: dict[str, Any] = {
        "id": ID,
        "timestamp": TS9,
        "source": source or {"type": "operator"},
        "durability": durability,
        "visibility": dict(VIS),
    }
    h.update(extra)
    return h


def dump(model: Any) -> dict[str, Any]:
    return json.loads(input_adapter.dump_json(model))


def roundtrip(model: Any) -> Any:
    text = input_adapter.dump_json(model)
    back = parse_input(text)
    assert type(back) is type(model)
    assert back == model
    assert input_adapter.dump_json(back) == text
    return back


# --- §2.7 examples: parse, re-serialise, compare ------------------------------------------

PEER_SOURCE = {"type": "peer", "peer_id": "peer-1", "runtime_id": "agent-1"}
FULL_HEADER_EXTRAS = {
    "idempotency_key": "req-abc-123",
    "supersession_key": "peer-status",
    "correlation_id": CORR,
}

EXAMPLES: dict[str, dict[str, Any]] = {
    "prompt_minimal": {"input_type": "prompt", "header": header(), "text": "hello"},
    "peer_request_full_header": {
        "input_type": "peer",
        "header": header(PEER_SOURCE, **FULL_HEADER_EXTRAS),
        "convention": {
            "convention_type": "request",
            "request_id": "req-1",
            "intent": "mob.peer_added",
        },
        "body": "Agent joined",
    },
    "peer_progress": {
        "input_type": "peer",
        "header": header(PEER_SOURCE),
        "convention": {
            "convention_type": "response_progress",
            "request_id": "req-1",
            "phase": "in_progress",
        },
        "body": "working",
    },
    "peer_terminal": {
        "input_type": "peer",
        "header": header(PEER_SOURCE),
        "convention": {
            "convention_type": "response_terminal",
            "request_id": "req-1",
            "status": "completed",
        },
        "body": "done",
    },
    "peer_message": {
        "input_type": "peer",
        "header": header({"type": "peer", "peer_id": "p1"}),
        "convention": {"convention_type": "message"},
        "body": "hi",
    },
    "peer_no_convention": {
        "input_type": "peer",
        "header": header({"type": "peer", "peer_id": "p1"}),
        "body": "hi",
    },
    "flow_step": {
        "input_type": "flow_step",
        "header": header({"type": "flow", "flow_id": "f1", "step_index": 0}),
        "step_id": "step-1",
        "instructions": "analyze the data",
    },
    "flow_step_with_metadata": {
        "input_type": "flow_step",
        "header": header({"type": "flow", "flow_id": "f1", "step_index": 3}),
        "step_id": "step-1",
        "instructions": "analyze the data",
        "turn_metadata": {
            "host_mode": True,
            "skill_references": [{"source_uuid": ID, "skill_name": "s"}],
            "flow_tool_overlay": {"allowed_tools": ["a"], "blocked_tools": None},
            "additional_instructions": ["be brief"],
        },
    },
    "external_event": {
        "input_type": "external_event",
        "header": header({"type": "external", "source_name": "webhook"}),
        "event_type": "webhook.received",
        "payload": {"url": "https://example.com"},
    },
    "system_generated": {
        "input_type": "system_generated",
        "header": header({"type": "system"}),
        "generator": "compactor",
        "content": "summary text",
    },
    "projected": {
        "input_type": "projected",
        "header": header({"type": "system"}, durability="derived"),
        "rule_id": "rule-1",
        "source_event_id": "evt-1",
        "content": "projected content",
    },
}


def _with_6_digit_ts(doc: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    assert out["header"]["timestamp"] == TS9
    out["header"]["timestamp"] = TS6
    return out


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_reference_examples_reserialise_identically(name: str) -> None:
    doc = EXAMPLES[name]
    parsed = parse_input(json.dumps(doc))
    assert parsed.input_type == doc["input_type"]
    out = dump(parsed)
    assert out == _with_6_digit_ts(doc)
    # key order: the tag first, then the fields in declared order
    assert list(out) == list(doc)
    assert list(out["header"]) == list(doc["header"])
    # parsing from a dict gives the same value
    assert parse_input(copy.deepcopy(doc)) == parsed


def test_prompt_example_exact_bytes() -> None:
    parsed = parse_input(json.dumps(EXAMPLES["prompt_minimal"]))
    assert input_adapter.dump_json(parsed).decode() == (
        '{"input_type":"prompt","header":{"id":"01959d7e-3c4a-7b2e-9f00-1a2b3c4d5e6f",'
        '"timestamp":"2026-03-15T10:20:30.123456Z","source":{"type":"operator"},'
        '"durability":"durable","visibility":{"transcript_eligible":true,"operator_eligible":true}},'
        '"text":"hello"}'
    )
    assert parsed.to_json() == input_adapter.dump_json(parsed).decode()


def test_peer_request_example_reads_every_header_field() -> None:
    p = parse_input(json.dumps(EXAMPLES["peer_request_full_header"]))
    assert isinstance(p, PeerInput)
    h = p.header
    assert h.id == InputId(ID)
    assert h.timestamp == datetime(2026, 3, 15, 10, 20, 30, 123456, tzinfo=UTC)
    assert h.source == PeerOrigin(peer_id="peer-1", runtime_id=LogicalRuntimeId("agent-1"))
    assert h.durability is InputDurability.DURABLE
    assert h.visibility == InputVisibility(transcript_eligible=True, operator_eligible=True)
    assert h.idempotency_key == IdempotencyKey("req-abc-123")
    assert str(h.supersession_key) == "peer-status"
    assert h.correlation_id == CorrelationId(CORR)
    assert p.convention == RequestConvention(request_id="req-1", intent="mob.peer_added")
    assert p.body == "Agent joined"


# --- §13.1 every variant round-trips -------------------------------------------------------


def test_prompt_input_serde() -> None:
    p = PromptInput.new("hello")
    d = dump(p)
    assert d["input_type"] == "prompt"
    assert d["text"] == "hello"
    assert "turn_metadata" not in d
    roundtrip(p)


def test_prompt_new_defaults() -> None:
    before = datetime.now(UTC)
    p = PromptInput.new("hello")
    after = datetime.now(UTC)
    h = p.header
    assert h.id.uuid.version == 7
    assert before <= h.timestamp <= after
    assert h.source == OperatorOrigin()
    assert h.durability is InputDurability.DURABLE
    assert h.visibility == InputVisibility(transcript_eligible=True, operator_eligible=True)
    assert h.idempotency_key is None
    assert h.supersession_key is None
    assert h.correlation_id is None
    assert p.id == h.id


def test_peer_input_message_serde() -> None:
    p = PeerInput.new("hi", peer_id="p1", convention=MessageConvention())
    d = dump(p)
    assert d["input_type"] == "peer"
    assert d["convention"] == {"convention_type": "message"}
    assert d["header"]["source"] == {"type": "peer", "peer_id": "p1"}
    back = roundtrip(p)
    assert isinstance(back.convention, MessageConvention)


def test_peer_input_request_serde() -> None:
    p = PeerInput.new(
        "b", peer_id="p1", convention=RequestConvention(request_id="r1", intent="do.it")
    )
    back = roundtrip(p)
    assert back.convention == RequestConvention(request_id="r1", intent="do.it")
    assert dump(p)["convention"] == {
        "convention_type": "request",
        "request_id": "r1",
        "intent": "do.it",
    }


def test_peer_input_response_terminal_serde() -> None:
    conv = ResponseTerminalConvention(request_id="r1", status=ResponseTerminalStatus.COMPLETED)
    back = roundtrip(PeerInput.new("b", peer_id="p1", convention=conv))
    assert back.convention == conv
    assert back.convention.status is ResponseTerminalStatus.COMPLETED


def test_peer_input_response_progress_serde() -> None:
    conv = ResponseProgressConvention(request_id="r1", phase=ResponseProgressPhase.IN_PROGRESS)
    back = roundtrip(PeerInput.new("b", peer_id="p1", convention=conv))
    assert back.convention == conv
    assert dump(back)["convention"]["phase"] == "in_progress"


@pytest.mark.parametrize("phase", ["accepted", "in_progress", "partial_result"])
def test_all_progress_phases_roundtrip(phase: str) -> None:
    conv = ResponseProgressConvention(request_id="r", phase=ResponseProgressPhase(phase))
    assert roundtrip(PeerInput.new("b", peer_id="p", convention=conv)).convention.phase == phase


@pytest.mark.parametrize("status", ["completed", "failed", "cancelled"])
def test_all_terminal_statuses_roundtrip(status: str) -> None:
    conv = ResponseTerminalConvention(request_id="r", status=ResponseTerminalStatus(status))
    assert roundtrip(PeerInput.new("b", peer_id="p", convention=conv)).convention.status == status


def test_flow_step_input_serde() -> None:
    f = FlowStepInput.new("step-1", "analyze", flow_id="f1", step_index=0)
    d = dump(f)
    assert d["input_type"] == "flow_step"
    assert d["header"]["source"] == {"type": "flow", "flow_id": "f1", "step_index": 0}
    assert list(d) == ["input_type", "header", "step_id", "instructions"]
    roundtrip(f)


def test_flow_step_with_turn_metadata_roundtrips() -> None:
    meta = RuntimeTurnMetadata(
        host_mode=False,
        skill_references=[SkillKey(source_uuid=ID, skill_name="x")],
        flow_tool_overlay=TurnToolOverlay(blocked_tools=["rm"]),
        additional_instructions=["a", "b"],
    )
    f = FlowStepInput.new("s", "i", flow_id="f", step_index=2, turn_metadata=meta)
    back = roundtrip(f)
    assert back.turn_metadata == meta
    assert dump(f)["turn_metadata"] == {
        "host_mode": False,
        "skill_references": [{"source_uuid": ID, "skill_name": "x"}],
        "flow_tool_overlay": {"allowed_tools": None, "blocked_tools": ["rm"]},
        "additional_instructions": ["a", "b"],
    }


def test_external_event_input_serde() -> None:
    e = ExternalEventInput.new("webhook.received", {"url": "https://example.com", "n": [1, 2]})
    d = dump(e)
    assert d["input_type"] == "external_event"
    assert d["payload"] == {"url": "https://example.com", "n": [1, 2]}
    roundtrip(e)


@pytest.mark.parametrize("payload", [None, 0, "", [], {}, {"a": None}, [None], False, 1.5])
def test_external_event_payload_any_json_including_null(payload: Any) -> None:
    e = ExternalEventInput.new("t", payload)
    d = dump(e)
    assert "payload" in d
    assert d["payload"] == payload
    back = roundtrip(e)
    assert back.payload == payload


def test_external_event_null_payload_written_explicitly() -> None:
    e = ExternalEventInput.new("t", None)
    assert e.to_json().endswith('"event_type":"t","payload":null}')


def test_system_generated_input_serde() -> None:
    s = SystemGeneratedInput.new("compactor", "summary")
    d = dump(s)
    assert d["input_type"] == "system_generated"
    assert d["header"]["source"] == {"type": "system"}
    roundtrip(s)


def test_projected_input_serde() -> None:
    p = ProjectedInput.new("rule-1", "evt-1", "content")
    d = dump(p)
    assert d["input_type"] == "projected"
    assert d["header"]["durability"] == "derived"
    assert d["header"]["source"] == {"type": "system"}
    back = roundtrip(p)
    assert back.header.durability is InputDurability.DERIVED


_ORIGINS = [
    OperatorOrigin(),
    PeerOrigin(peer_id="p1"),
    PeerOrigin(peer_id="p1", runtime_id=LogicalRuntimeId("agent-1")),
    FlowOrigin(flow_id="f1", step_index=0),
    SystemOrigin(),
    ExternalOrigin(source_name="webhook"),
]


@pytest.mark.parametrize("origin", _ORIGINS, ids=lambda o: o.type)
def test_input_source_variants(origin: Any) -> None:
    adapter: TypeAdapter[Any] = TypeAdapter(InputOrigin)
    text = adapter.dump_json(origin)
    assert json.loads(text)["type"] == origin.type
    assert next(iter(json.loads(text))) == "type"
    assert adapter.validate_json(text) == origin
    p = PromptInput.new("x", source=origin)
    assert roundtrip(p).header.source == origin


def test_origin_exact_json() -> None:
    adapter: TypeAdapter[Any] = TypeAdapter(InputOrigin)
    assert [json.loads(adapter.dump_json(o)) for o in _ORIGINS] == [
        {"type": "operator"},
        {"type": "peer", "peer_id": "p1"},
        {"type": "peer", "peer_id": "p1", "runtime_id": "agent-1"},
        {"type": "flow", "flow_id": "f1", "step_index": 0},
        {"type": "system"},
        {"type": "external", "source_name": "webhook"},
    ]


def test_origins_compare_field_by_field() -> None:
    assert PeerOrigin(peer_id="a") == PeerOrigin(peer_id="a")
    assert PeerOrigin(peer_id="a") != PeerOrigin(peer_id="b")
    assert PeerOrigin(peer_id="a") != PeerOrigin(peer_id="a", runtime_id=LogicalRuntimeId("r"))


@pytest.mark.parametrize("durability", ["durable", "ephemeral", "derived"])
def test_input_durability_serde(durability: str) -> None:
    adapter: TypeAdapter[InputDurability] = TypeAdapter(InputDurability)
    assert adapter.dump_json(InputDurability(durability)).decode() == f'"{durability}"'
    assert adapter.validate_json(f'"{durability}"') is InputDurability(durability)
    doc = {"input_type": "system_generated", "header": header({"type": "system"}, durability)}
    doc |= {"generator": "g", "content": "c"}
    assert parse_input(doc).header.durability is InputDurability(durability)


# --- header: optional fields --------------------------------------------------------------


def test_header_optional_fields_omitted_when_unset() -> None:
    d = dump(PromptInput.new("x"))["header"]
    assert list(d) == ["id", "timestamp", "source", "durability", "visibility"]
    assert "null" not in json.dumps(d)


def test_header_optional_fields_written_in_order_when_set() -> None:
    p = PromptInput.new(
        "x",
        idempotency_key="k",
        supersession_key="s",
        correlation_id=CorrelationId(CORR),
    )
    d = dump(p)["header"]
    assert list(d) == [
        "id",
        "timestamp",
        "source",
        "durability",
        "visibility",
        "idempotency_key",
        "supersession_key",
        "correlation_id",
    ]
    assert (d["idempotency_key"], d["supersession_key"], d["correlation_id"]) == ("k", "s", CORR)


def test_header_optional_fields_read_as_null() -> None:
    doc = {
        "input_type": "prompt",
        "header": header(idempotency_key=None, supersession_key=None, correlation_id=None),
        "text": "t",
    }
    p = parse_input(doc)
    assert p.header.idempotency_key is None
    assert p.header.supersession_key is None
    assert p.header.correlation_id is None
    assert "idempotency_key" not in dump(p)["header"]


def test_prompt_turn_metadata_extensions_omitted_when_unset() -> None:
    p = PromptInput.new("x", turn_metadata=RuntimeTurnMetadata(model="m", max_tokens=10))
    assert dump(p)["turn_metadata"] == {"model": "m", "max_tokens": 10}
    assert dump(PromptInput.new("x", turn_metadata=RuntimeTurnMetadata()))["turn_metadata"] == {}


# --- kind ids ------------------------------------------------------------------------------

_KIND_CASES = [
    (PromptInput.new("x"), "prompt"),
    (PeerInput.new("b", peer_id="p", convention=MessageConvention()), "peer_message"),
    (PeerInput.new("b", peer_id="p"), "peer_message"),
    (
        PeerInput.new("b", peer_id="p", convention=RequestConvention(request_id="r", intent="i")),
        "peer_request",
    ),
    (
        PeerInput.new(
            "b",
            peer_id="p",
            convention=ResponseProgressConvention(request_id="r", phase="accepted"),
        ),
        "peer_response_progress",
    ),
    (
        PeerInput.new(
            "b",
            peer_id="p",
            convention=ResponseTerminalConvention(request_id="r", status="failed"),
        ),
        "peer_response_terminal",
    ),
    (FlowStepInput.new("s", "i", flow_id="f", step_index=0), "flow_step"),
    (ExternalEventInput.new("t", None), "external_event"),
    (SystemGeneratedInput.new("g", "c"), "system_generated"),
    (ProjectedInput.new("r", "e", "c"), "projected"),
]


@pytest.mark.parametrize(("inp", "kind"), _KIND_CASES, ids=[k for _, k in _KIND_CASES])
def test_input_kind_id(inp: Any, kind: str) -> None:
    assert kind_id(inp) == kind
    assert inp.kind_id == kind


def test_kind_ids_cover_exactly_the_nine_kinds() -> None:
    assert set(KIND_IDS) == {k for _, k in _KIND_CASES}
    assert len(KIND_IDS) == 9


def test_input_type_tag_differs_from_kind_for_peers() -> None:
    p = PeerInput.new("b", peer_id="p", convention=RequestConvention(request_id="r", intent="i"))
    assert dump(p)["input_type"] == "peer"
    assert kind_id(p) == "peer_request"


# --- parse errors --------------------------------------------------------------------------


def test_unknown_input_type_refused() -> None:
    with pytest.raises(ValueError) as exc:
        parse_input({"input_type": "tool_callback", "header": header(), "text": "x"})
    msg = str(exc.value)
    assert "input_type" in msg
    assert "'tool_callback'" in msg
    assert "prompt" in msg  # names what is expected


def test_unknown_convention_type_refused() -> None:
    doc = copy.deepcopy(EXAMPLES["peer_message"])
    doc["convention"] = {"convention_type": "gossip"}
    with pytest.raises(ValueError) as exc:
        parse_input(doc)
    msg = str(exc.value)
    assert "convention" in msg
    assert "'gossip'" in msg
    assert "response_terminal" in msg


def test_unknown_origin_type_refused() -> None:
    doc = copy.deepcopy(EXAMPLES["prompt_minimal"])
    doc["header"]["source"] = {"type": "user"}
    with pytest.raises(ValueError) as exc:
        parse_input(doc)
    msg = str(exc.value)
    assert "header.source" in msg
    assert "'user'" in msg
    assert "operator" in msg


def test_missing_tag_refused() -> None:
    doc = copy.deepcopy(EXAMPLES["prompt_minimal"])
    del doc["input_type"]
    with pytest.raises(ValueError, match="input_type"):
        parse_input(doc)


def test_malformed_json_refused_readably() -> None:
    with pytest.raises(ValueError, match="malformed JSON"):
        parse_input(b'{"input_type": ')


@pytest.mark.parametrize(
    ("example", "path"),
    [
        ("prompt_minimal", ("text",)),
        ("prompt_minimal", ("header",)),
        ("prompt_minimal", ("header", "id")),
        ("prompt_minimal", ("header", "timestamp")),
        ("prompt_minimal", ("header", "source")),
        ("prompt_minimal", ("header", "durability")),
        ("prompt_minimal", ("header", "visibility")),
        ("prompt_minimal", ("header", "visibility", "transcript_eligible")),
        ("prompt_minimal", ("header", "visibility", "operator_eligible")),
        ("peer_message", ("body",)),
        ("peer_message", ("header", "source", "peer_id")),
        ("peer_request_full_header", ("convention", "intent")),
        ("peer_request_full_header", ("convention", "request_id")),
        ("peer_progress", ("convention", "phase")),
        ("peer_terminal", ("convention", "status")),
        ("flow_step", ("step_id",)),
        ("flow_step", ("instructions",)),
        ("flow_step", ("header", "source", "flow_id")),
        ("flow_step", ("header", "source", "step_index")),
        ("external_event", ("event_type",)),
        ("external_event", ("payload",)),
        ("external_event", ("header", "source", "source_name")),
        ("system_generated", ("generator",)),
        ("system_generated", ("content",)),
        ("projected", ("rule_id",)),
        ("projected", ("source_event_id",)),
        ("projected", ("content",)),
    ],
)
def test_missing_required_field_refused(example: str, path: tuple[str, ...]) -> None:
    doc = copy.deepcopy(EXAMPLES[example])
    target = doc
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    with pytest.raises(ValueError) as exc:
        parse_input(doc)
    assert path[-1] in str(exc.value)
    assert str(exc.value).startswith("invalid input: ")


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("header", "durability"), "persistent"),
        (("header", "id"), "not-a-uuid"),
        (("header", "timestamp"), "yesterday"),
        (("header", "source", "step_index"), -1),
        (("convention", "phase"), "done"),
    ],
)
def test_bad_field_values_refused(path: tuple[str, ...], value: Any) -> None:
    doc = copy.deepcopy(EXAMPLES["flow_step" if "step_index" in path else "peer_progress"])
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ValueError):
        parse_input(doc)


def test_unknown_extra_fields_ignored_everywhere() -> None:
    doc = copy.deepcopy(EXAMPLES["peer_request_full_header"])
    doc["future_field"] = 1
    doc["header"]["causation_id"] = ID
    doc["header"]["source"]["region"] = "eu"
    doc["header"]["visibility"]["audit_eligible"] = False
    doc["convention"]["deadline"] = "soon"
    p = parse_input(json.dumps(doc))
    assert dump(p) == _with_6_digit_ts(EXAMPLES["peer_request_full_header"])


# --- §13.6 durability matrix ---------------------------------------------------------------

EXTERNAL_MSG = "External ingress cannot submit derived inputs"

_CONVENTIONS: dict[str, Any] = {
    "message": MessageConvention(),
    "request": RequestConvention(request_id="r", intent="i"),
    "response_terminal": ResponseTerminalConvention(request_id="r", status="completed"),
    "response_progress": ResponseProgressConvention(request_id="r", phase="in_progress"),
    "none": None,
}


def _variant(name: str, source: Any, durability: str) -> Any:
    kw = {"source": source, "durability": durability}
    if name == "prompt":
        return PromptInput.new("x", **kw)
    if name.startswith("peer:"):
        return PeerInput.new("b", peer_id="p", convention=_CONVENTIONS[name[5:]], **kw)
    if name == "flow_step":
        return FlowStepInput.new("s", "i", flow_id="f", step_index=0, **kw)
    if name == "external_event":
        return ExternalEventInput.new("t", {}, **kw)
    if name == "system_generated":
        return SystemGeneratedInput.new("g", "c", **kw)
    assert name == "projected"
    return ProjectedInput.new("r", "e", "c", **kw)


# variant -> message for origin system/flow (None = OK)
_INTERNAL_MATRIX = {
    "prompt": "Derived durability forbidden for prompt",
    "peer:message": "Derived durability forbidden for peer_message",
    "peer:request": "Derived durability forbidden for peer_request",
    "peer:response_terminal": "Derived durability forbidden for peer_response_terminal",
    "peer:response_progress": None,
    # S13 overrides the reference here: a peer message without a convention is still a
    # peer message, and may not be derived
    "peer:none": "Derived durability forbidden for peer_message",
    "flow_step": "Derived durability forbidden for flow_step",
    "external_event": None,
    "system_generated": None,
    "projected": None,
}
_EXTERNAL_ORIGINS = [
    OperatorOrigin(),
    PeerOrigin(peer_id="p"),
    ExternalOrigin(source_name="webhook"),
]
_INTERNAL_ORIGINS = [SystemOrigin(), FlowOrigin(flow_id="f", step_index=1)]


@pytest.mark.parametrize("variant", list(_INTERNAL_MATRIX))
@pytest.mark.parametrize("origin", _EXTERNAL_ORIGINS, ids=lambda o: o.type)
def test_derived_from_external_ingress_refused(variant: str, origin: Any) -> None:
    err = validate_durability(_variant(variant, origin, "derived"))
    assert isinstance(err, DurabilityError)
    assert isinstance(err, ValueError)
    assert str(err) == EXTERNAL_MSG  # takes precedence over the per-variant check


@pytest.mark.parametrize("variant", list(_INTERNAL_MATRIX))
@pytest.mark.parametrize("origin", _INTERNAL_ORIGINS, ids=lambda o: o.type)
def test_derived_from_system_or_flow(variant: str, origin: Any) -> None:
    err = validate_durability(_variant(variant, origin, "derived"))
    expected = _INTERNAL_MATRIX[variant]
    if expected is None:
        assert err is None
    else:
        assert isinstance(err, DurabilityError)
        assert str(err) == expected
        assert "peer_peer_" not in str(err)


@pytest.mark.parametrize("variant", list(_INTERNAL_MATRIX))
@pytest.mark.parametrize("origin", _EXTERNAL_ORIGINS + _INTERNAL_ORIGINS, ids=lambda o: o.type)
@pytest.mark.parametrize("durability", ["durable", "ephemeral"])
def test_durable_and_ephemeral_always_allowed(variant: str, origin: Any, durability: str) -> None:
    assert validate_durability(_variant(variant, origin, durability)) is None


def test_reference_durability_cases() -> None:
    """The twelve named cases of §13.6."""
    s, op, ext = SystemOrigin(), OperatorOrigin(), ExternalOrigin(source_name="x")
    assert validate_durability(_variant("prompt", s, "derived")) is not None
    assert validate_durability(_variant("prompt", op, "durable")) is None
    assert validate_durability(_variant("prompt", op, "ephemeral")) is None
    assert validate_durability(_variant("peer:message", s, "derived")) is not None
    assert validate_durability(_variant("peer:request", s, "derived")) is not None
    assert validate_durability(_variant("peer:response_terminal", s, "derived")) is not None
    assert validate_durability(_variant("peer:response_progress", s, "derived")) is None
    assert validate_durability(_variant("flow_step", s, "derived")) is not None
    assert validate_durability(_variant("external_event", s, "derived")) is None
    assert str(validate_durability(_variant("external_event", ext, "derived"))) == EXTERNAL_MSG
    assert str(validate_durability(_variant("system_generated", op, "derived"))) == EXTERNAL_MSG
    assert validate_durability(_variant("projected", s, "derived")) is None


# --- content hash (S11) --------------------------------------------------------------------


def _prompt(**changes: Any) -> PromptInput:
    doc = copy.deepcopy(EXAMPLES["prompt_minimal"])
    doc["header"]["idempotency_key"] = "k1"
    for path, value in changes.items():
        target = doc
        keys = path.split("__")
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    p = parse_input(doc)
    assert isinstance(p, PromptInput)
    return p


def test_content_hash_is_sha256_hex() -> None:
    h = content_hash(_prompt())
    assert len(h) == 64
    assert int(h, 16) >= 0
    assert content_hash(_prompt()) == h


@pytest.mark.parametrize(
    "change",
    [
        {"header__id": "01959d7e-3c4a-7b2e-9f00-000000000001"},
        {"header__timestamp": "2030-01-01T00:00:00Z"},
        {"header__correlation_id": CORR},
        {
            "header__id": "01959d7e-3c4a-7b2e-9f00-000000000002",
            "header__timestamp": "2020-01-01T00:00:00+05:00",
            "header__correlation_id": CORR,
        },
    ],
)
def test_content_hash_ignores_id_timestamp_and_correlation(change: dict[str, Any]) -> None:
    assert content_hash(_prompt(**change)) == content_hash(_prompt())


@pytest.mark.parametrize(
    "change",
    [
        {"text": "hello!"},
        {"header__idempotency_key": "k2"},
        {"header__durability": "ephemeral"},
        {"header__supersession_key": "s"},
        {"header__source": {"type": "system"}},
        {"header__visibility": {"transcript_eligible": False, "operator_eligible": True}},
        {"turn_metadata": {"model": "m"}},
    ],
)
def test_content_hash_covers_content_key_and_durability(change: dict[str, Any]) -> None:
    assert content_hash(_prompt(**change)) != content_hash(_prompt())


def test_content_hash_independent_of_key_order_and_retry_ids() -> None:
    a = ExternalEventInput.new("t", {"a": 1, "b": 2}, idempotency_key="k")
    b = ExternalEventInput.new("t", {"b": 2, "a": 1}, idempotency_key="k")
    assert a.id != b.id
    assert content_hash(a) == content_hash(b)
    assert content_hash(ExternalEventInput.new("t", {"a": 1, "b": 3}, idempotency_key="k")) != (
        content_hash(a)
    )


def test_content_hash_distinguishes_variants_with_same_text() -> None:
    s = SystemGeneratedInput.new("g", "same", source=OperatorOrigin())
    p = ProjectedInput.new("g", "e", "same", source=OperatorOrigin(), durability="durable")
    assert content_hash(s) != content_hash(p)


# --- render_input_text ---------------------------------------------------------------------


def test_render_prompt() -> None:
    assert render_input_text(PromptInput.new("hello there")) == "hello there"


def test_render_peer_message_and_no_convention() -> None:
    m = PeerInput.new("hi", peer_id="alice", convention=MessageConvention())
    n = PeerInput.new("hi", peer_id="alice")
    assert render_input_text(m) == "[peer message from alice] hi"
    assert render_input_text(n) == "[peer message from alice] hi"


def test_render_peer_request() -> None:
    p = PeerInput.new(
        "please", peer_id="bob", convention=RequestConvention(request_id="r-9", intent="review")
    )
    assert render_input_text(p) == "[peer request r-9 from bob, intent review] please"


def test_render_peer_progress_and_terminal() -> None:
    prog = PeerInput.new(
        "50%",
        peer_id="bob",
        convention=ResponseProgressConvention(request_id="r-9", phase="partial_result"),
    )
    term = PeerInput.new(
        "ok",
        peer_id="bob",
        convention=ResponseTerminalConvention(request_id="r-9", status="failed"),
    )
    assert render_input_text(prog) == (
        "[peer response progress (partial_result) to request r-9 from bob] 50%"
    )
    assert render_input_text(term) == "[peer response (failed) to request r-9 from bob] ok"


def test_render_peer_from_non_peer_origin_names_the_origin_type() -> None:
    p = PeerInput.new("x", peer_id="ignored", source=SystemOrigin())
    assert render_input_text(p) == "[peer message from system] x"


def test_render_flow_step() -> None:
    f = FlowStepInput.new("s", "analyze the data", flow_id="f", step_index=0)
    assert render_input_text(f) == "analyze the data"


@pytest.mark.parametrize(
    ("payload", "text"),
    [
        ({"url": "https://example.com"}, '{"url":"https://example.com"}'),
        (None, "null"),
        ([1, "é"], '[1,"é"]'),
        ("s", '"s"'),
    ],
)
def test_render_external_event(payload: Any, text: str) -> None:
    e = ExternalEventInput.new("webhook.received", payload)
    assert render_input_text(e) == f"[External Event: webhook.received] {text}"


def test_render_system_generated_and_projected() -> None:
    assert render_input_text(SystemGeneratedInput.new("compactor", "summary")) == "summary"
    assert render_input_text(ProjectedInput.new("r", "e", "projected content")) == (
        "projected content"
    )


def test_header_new_rejects_unknown_durability() -> None:
    with pytest.raises(ValueError):
        InputHeader.new(durability="forever")
