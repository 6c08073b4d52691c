"""What every surface (REST, JSON-RPC, CLI) shares: request parsing, the wire shapes of
results, and one error vocabulary.

Invariants:
- Parsing never changes anything: a request that fails to parse raises ``SurfaceError`` with
  code ``bad_request`` and a message that names the field, what was wrong and what is
  accepted, before any runtime call is made.
- Every failure a surface reports is a ``SurfaceError`` with a code from ``ERROR_CODES``;
  each surface maps the codes to its own statuses (HTTP) or numbers (JSON-RPC) in one table.
- Wire shapes follow the Meerkat 0.4.10 SDK's readers (``meerkat/client.py``): a run result
  is ``WireRunResult``, a session summary ``WireSessionSummary``, a history page
  ``WireSessionHistory`` with ``SessionMessage`` items. Timestamps are RFC 3339 strings.
- Per-turn overrides are carried in the prompt's ``turn_metadata`` (spec §2) and applied to
  that run only; nothing a client sends is silently dropped: features this runtime does not
  have (skills, hooks, mobs, shell, sub-agents, memory, host mode) are refused when asked
  for with a truthy value, and ignored when sent as their off/default value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from .._time import format_ts
from ..comms import SENDABLE_KINDS, validate_comms_name
from ..core._schema import SchemaValidator
from ..core.lifecycle import Message, RunResult, RuntimeTurnMetadata, Usage
from ..errors import (
    InputNotFoundError,
    InputRejectedError,
    InvalidArgumentError,
    InvalidOperationError,
    MeerkatRuntimeError,
    RuntimeClosedError,
    SessionNotFoundError,
)
from ..host import CompletionHandle, Runtime
from ..llm.registry import UnknownModelError, infer_provider
from ..runtime.outcomes import (
    AbandonedWait,
    CancelledWait,
    CompletedWait,
    CompletedWithoutResultWait,
    Deduplicated,
    RejectCode,
    Rejected,
    SupersededWait,
    TerminatedWait,
    WaitOutcome,
)
from ..sessions import HistoryPage, SessionView
from ..store.base import StoreError

__all__ = [
    "COMMS_KINDS",
    "ERROR_CODES",
    "CommsSendRequest",
    "CreateRequest",
    "ErrorCode",
    "SurfaceError",
    "TurnRequest",
    "classify",
    "comms_error",
    "comms_peers",
    "comms_send",
    "create_session",
    "parse_comms_send",
    "parse_create",
    "parse_turn",
    "reject_error",
    "run_turn",
    "wait_turn",
    "wire_history",
    "wire_message",
    "wire_run_result",
    "wire_session_info",
    "wire_session_summary",
    "wire_usage",
]

ErrorCode = Literal[
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "conflict",
    "too_large",
    "queue_full",
    "not_ready",
    "cancelled",
    "provider_error",
    "budget_exhausted",
    "failed",
    "unsupported",
    "timeout",
    "internal",
]
ERROR_CODES: tuple[str, ...] = ErrorCode.__args__  # type: ignore[attr-defined]


class SurfaceError(Exception):
    """A failure to report to a client: a stable ``code``, a one-line ``message`` that says
    what was wrong (and what to do), and optional structured ``details``."""

    def __init__(self, code: ErrorCode, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.details = details

    def to_json_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message, "code": self.code}
        out.update(self.details)
        return out


def classify(exc: BaseException) -> SurfaceError:
    """The ``SurfaceError`` for an exception raised by the runtime (unknown ones: internal)."""
    if isinstance(exc, SurfaceError):
        return exc
    if isinstance(exc, SessionNotFoundError | InputNotFoundError):
        return SurfaceError("not_found", str(exc))
    if isinstance(exc, InvalidArgumentError):
        return SurfaceError("bad_request", str(exc))
    if isinstance(exc, RuntimeClosedError):
        return SurfaceError("not_ready", str(exc))
    if isinstance(exc, InputRejectedError):
        return reject_error(exc.reject_code, exc.reason)
    if isinstance(exc, InvalidOperationError | MeerkatRuntimeError):
        return SurfaceError("conflict", str(exc))
    if isinstance(exc, TimeoutError):
        return SurfaceError("timeout", "timed out waiting; the input lives on, wait for it again")
    if isinstance(exc, StoreError):
        return SurfaceError("internal", f"store error: {exc}")
    return SurfaceError("internal", f"internal error: {type(exc).__name__}: {exc}")


_REJECT_CODES: dict[str, ErrorCode] = {
    RejectCode.INVALID.value: "bad_request",
    RejectCode.INVALID_DURABILITY.value: "bad_request",
    RejectCode.TOO_LARGE.value: "too_large",
    RejectCode.QUEUE_FULL.value: "queue_full",
    RejectCode.NOT_READY.value: "not_ready",
    RejectCode.IDEMPOTENCY_CONFLICT.value: "conflict",
}


def reject_error(reject_code: str, reason: str) -> SurfaceError:
    return SurfaceError(
        _REJECT_CODES.get(reject_code, "bad_request"),
        f"input rejected ({reject_code}): {reason}",
        reject_code=reject_code,
    )


# ------------------------------------------------------------------ parsing


def _bad(field: str, problem: str) -> SurfaceError:
    return SurfaceError("bad_request", f"{field}: {problem}", field=field)


def _opt(params: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = params.get(key)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        and kind is not bool
        and bool not in (kind if isinstance(kind, tuple) else (kind,))
    ):
        raise _bad(key, f"expected {what}, got a boolean")
    if not isinstance(value, kind):
        raise _bad(key, f"expected {what}, got {type(value).__name__}")
    return value


def _require_text(params: dict[str, Any], key: str, *, allow_empty: bool = False) -> str:
    value = params.get(key)
    if not isinstance(value, str):
        got = "nothing" if value is None else type(value).__name__
        raise _bad(key, f"expected a string, got {got}")
    if not allow_empty and not value.strip():
        raise _bad(key, "must not be empty")
    return value


_UNSUPPORTED_FLAGS = (
    "enable_builtins",
    "enable_shell",
    "enable_subagents",
    "enable_memory",
    "enable_mob",
    "host_mode",
)
_UNSUPPORTED_VALUES = (
    "hooks_override",
    "preload_skills",
    "skill_refs",
    "skill_references",
    "shell_env",
    "external_tools",
    "app_context",
)


def _refuse_unsupported(params: dict[str, Any]) -> None:
    for key in _UNSUPPORTED_FLAGS:
        if params.get(key):
            raise SurfaceError(
                "unsupported",
                f"{key}: this runtime does not support it (send false or leave it out)",
                field=key,
            )
    for key in _UNSUPPORTED_VALUES:
        if params.get(key):
            raise SurfaceError(
                "unsupported",
                f"{key}: skills, hooks, shell and external tool sets are not supported by "
                "this runtime (leave it out)",
                field=key,
            )


def _labels(params: dict[str, Any]) -> dict[str, str] | None:
    labels = params.get("labels")
    if labels is None:
        return None
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise _bad("labels", "expected an object of string keys to string values")
    return dict(labels)


_BUDGET_KEYS = {
    "max_turns": "max_turns",
    "max_tokens": "max_total_tokens",
    "max_total_tokens": "max_total_tokens",
    "max_tool_calls": "max_tool_calls",
    "max_duration": "max_duration",
    "max_duration_secs": "max_duration",
}


def _budget(params: dict[str, Any]) -> dict[str, Any]:
    raw = params.get("budget_limits")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _bad("budget_limits", "expected an object")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if value is None:
            continue
        if key == "max_duration_ms":
            target, scale = "max_duration", 0.001
        elif key in _BUDGET_KEYS:
            target, scale = _BUDGET_KEYS[key], 1.0
        else:
            raise _bad(
                f"budget_limits.{key}",
                "unknown budget; accepted: " + ", ".join([*_BUDGET_KEYS, "max_duration_ms"]),
            )
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise _bad(f"budget_limits.{key}", "expected a positive number")
        out[target] = value * scale if target == "max_duration" else int(value)
    return out


_OVERRIDE_KEYS = (
    "model",
    "provider",
    "max_tokens",
    "system_prompt",
    "output_schema",
    "structured_output_retries",
    "provider_params",
    "additional_instructions",
    "flow_tool_overlay",
)


def parse_turn_metadata(params: dict[str, Any]) -> RuntimeTurnMetadata | None:
    """The per-turn overrides present in ``params`` as turn metadata (None when none)."""
    picked = {k: params[k] for k in _OVERRIDE_KEYS if params.get(k) is not None}
    if not picked:
        return None
    try:
        meta = RuntimeTurnMetadata.model_validate(picked)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "turn metadata"
        raise _bad(where, err["msg"]) from None
    _check_overrides(meta)
    return meta


def _check_overrides(meta: RuntimeTurnMetadata) -> None:
    """Refuse overrides the run could not use, before anything is accepted (as creating a
    session does for its settings): otherwise the turn would fail late, or the agent fall
    back to the session's settings."""
    if meta.provider is not None or meta.model is not None:
        try:
            infer_provider(meta.model if meta.model is not None else "offline", meta.provider)
        except UnknownModelError as exc:
            raise _bad("provider" if meta.provider is not None else "model", str(exc)) from None
    if meta.output_schema is not None:
        try:
            SchemaValidator(meta.output_schema)
        except ValueError as exc:
            raise _bad("output_schema", str(exc)) from None


@dataclass(slots=True)
class TurnRequest:
    session_id: str
    prompt: str
    metadata: RuntimeTurnMetadata | None = None
    idempotency_key: str | None = None


def parse_turn(params: dict[str, Any], *, session_id: str | None = None) -> TurnRequest:
    """A turn request (``turn/start``, ``POST /sessions/{id}/messages``)."""
    if not isinstance(params, dict):
        raise SurfaceError("bad_request", "expected a JSON object")
    sid = session_id if session_id is not None else _require_text(params, "session_id")
    body_sid = params.get("session_id")
    if session_id is not None and body_sid is not None and body_sid != session_id:
        raise _bad("session_id", f"{body_sid!r} does not match the session in the path")
    _refuse_unsupported(params)
    prompt = _require_text(params, "prompt")
    key = _opt(params, "idempotency_key", str, "a string")
    return TurnRequest(sid, prompt, parse_turn_metadata(params), key)


@dataclass(slots=True)
class CreateRequest:
    prompt: str | None
    deferred: bool
    model: str = "offline"
    provider: str | None = None
    system_prompt: str | None = None
    labels: dict[str, str] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    metadata: RuntimeTurnMetadata | None = None
    idempotency_key: str | None = None
    comms_name: str | None = None


def _comms_name(params: dict[str, Any]) -> str | None:
    """``comms_name`` (checked against the name pattern here; uniqueness at creation) and
    ``peer_meta``, which this runtime does not keep: refused unless empty."""
    peer_meta = params.get("peer_meta")
    if peer_meta:
        raise SurfaceError(
            "unsupported",
            "peer_meta: this runtime keeps no peer metadata (peers list `meta: {}`); leave it out",
            field="peer_meta",
        )
    name = params.get("comms_name")
    if name is None:
        return None
    try:
        return validate_comms_name(name)
    except InvalidArgumentError as exc:
        raise SurfaceError("bad_request", str(exc), field="comms_name") from None


def parse_create(params: dict[str, Any], *, default_model: str = "offline") -> CreateRequest:
    """A session creation request (``session/create``, ``POST /sessions``).

    ``initial_turn`` is ``run_immediately`` (default) or ``deferred``; a deferred session
    keeps its prompt and prepends it to the first turn's (the reference's behaviour)."""
    if not isinstance(params, dict):
        raise SurfaceError("bad_request", "expected a JSON object")
    _refuse_unsupported(params)
    initial = params.get("initial_turn", "run_immediately")
    if initial not in ("run_immediately", "deferred"):
        raise _bad("initial_turn", "accepted: run_immediately, deferred")
    deferred = initial == "deferred"
    prompt = params.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise _bad("prompt", f"expected a string, got {type(prompt).__name__}")
    if not deferred and not (prompt or "").strip():
        raise _bad("prompt", "must not be empty (or create the session with initial_turn=deferred)")
    settings: dict[str, Any] = {}
    max_tokens = _opt(params, "max_tokens", int, "a positive integer")
    if max_tokens is not None:
        if max_tokens < 1:
            raise _bad("max_tokens", "expected a positive integer")
        settings["max_tokens"] = max_tokens
    schema = _opt(params, "output_schema", dict, "a JSON Schema object")
    if schema is not None:
        settings["output_schema"] = schema
    retries = _opt(params, "structured_output_retries", int, "a non-negative integer")
    if retries is not None:
        if retries < 0:
            raise _bad("structured_output_retries", "expected a non-negative integer")
        settings["structured_output_retries"] = retries
    provider_params = _opt(params, "provider_params", dict, "an object")
    if provider_params is not None:
        settings["provider_params"] = provider_params
    settings.update(_budget(params))
    meta: RuntimeTurnMetadata | None = None
    instructions = params.get("additional_instructions")
    if instructions is not None:
        meta = parse_turn_metadata({"additional_instructions": instructions})
    return CreateRequest(
        prompt=prompt,
        deferred=deferred,
        model=_opt(params, "model", str, "a string") or default_model,
        provider=_opt(params, "provider", str, "a string"),
        system_prompt=_opt(params, "system_prompt", str, "a string"),
        labels=_labels(params),
        settings=settings,
        metadata=meta,
        idempotency_key=_opt(params, "idempotency_key", str, "a string"),
        comms_name=_comms_name(params),
    )


# ------------------------------------------------------------------ actions


async def create_session(rt: Runtime, req: CreateRequest) -> str:
    """Create the session described by ``req`` (no turn yet); its id."""
    try:
        info = await rt.create_session(
            model=req.model,
            provider=req.provider,
            system_prompt=req.system_prompt,
            labels=req.labels,
            deferred_prompt=req.prompt if req.deferred and req.prompt else None,
            comms_name=req.comms_name,
            **req.settings,
        )
    except MeerkatRuntimeError as exc:
        raise _with_field(classify(exc)) from None
    return info.id


async def run_turn(
    rt: Runtime, req: TurnRequest, *, timeout: float | None = None
) -> dict[str, Any]:
    """Accept the prompt and wait for its run: the ``WireRunResult`` (with ``existing_id``
    when the prompt was a duplicate, whose outcome it follows), or a ``SurfaceError``."""
    handle = await start_turn(rt, req)
    return await wait_turn(rt, req.session_id, handle, timeout=timeout)


async def start_turn(rt: Runtime, req: TurnRequest) -> CompletionHandle:
    try:
        handle = await rt.turn(
            req.session_id,
            req.prompt,
            turn_metadata=req.metadata,
            idempotency_key=req.idempotency_key,
        )
    except MeerkatRuntimeError as exc:
        raise classify(exc) from None
    if isinstance(handle.outcome, Rejected):
        raise reject_error(handle.outcome.code.value, handle.outcome.reason)
    return handle


async def wait_turn(
    rt: Runtime, session_id: str, handle: CompletionHandle, *, timeout: float | None = None
) -> dict[str, Any]:
    try:
        outcome = await handle.wait(timeout)
    except TimeoutError:
        raise SurfaceError(
            "timeout",
            f"the turn did not finish within {timeout} s; it goes on: wait for input "
            f"{handle.input_id}",
            input_id=str(handle.input_id),
        ) from None
    except MeerkatRuntimeError as exc:
        raise classify(exc) from None
    result = turn_result(session_id, outcome)
    if isinstance(handle.outcome, Deduplicated):
        result["existing_id"] = str(handle.outcome.existing_id)
    return result


def turn_result(session_id: str, outcome: WaitOutcome) -> dict[str, Any]:
    """The wire result of a finished turn, or the ``SurfaceError`` that says how it ended."""
    if isinstance(outcome, CompletedWait):
        return wire_run_result(outcome.result, session_id)
    if isinstance(outcome, CompletedWithoutResultWait):
        return wire_run_result(RunResult(session_id=session_id), session_id)
    iid = str(outcome.input_id)
    if isinstance(outcome, CancelledWait):
        raise SurfaceError("cancelled", "the turn was cancelled (interrupted)", input_id=iid)
    if isinstance(outcome, SupersededWait):
        raise SurfaceError(
            "conflict",
            f"the turn was superseded by input {outcome.superseded_by}",
            input_id=iid,
        )
    if isinstance(outcome, AbandonedWait):
        error = outcome.error or ""
        reason = outcome.reason.value
        if error.startswith("budget exhausted"):
            raise SurfaceError("budget_exhausted", error, input_id=iid, reason=reason)
        if error.startswith("model ") and " failed (" in error:
            raise SurfaceError("provider_error", error, input_id=iid, reason=reason)
        text = f"turn abandoned ({reason})" + (f": {error}" if error else "")
        raise SurfaceError("failed", text, input_id=iid, reason=reason)
    if isinstance(outcome, TerminatedWait):
        raise SurfaceError(
            "not_ready",
            f"the session's runtime stopped ({outcome.reason}); the input lives on, wait for "
            "it again",
            input_id=iid,
        )
    raise SurfaceError("internal", f"unexpected outcome {outcome!r}")


# ------------------------------------------------------------------ peer comms

COMMS_KINDS: dict[str, str] = {
    "message": "message",
    "request": "request",
    "response": "response",
    "peer_message": "message",
    "peer_request": "request",
    "peer_response": "response",
}
"""``comms/send`` kinds: ours, and 0.4.10's ``peer_*`` names for the same things."""

_COMMS_FIELDS = (
    "session_id",
    "kind",
    "to",
    "body",
    "intent",
    "params",
    "in_reply_to",
    "status",
    "result",
    "envelope_id",
    "comms_name",
)
_FIELD_PREFIX = re.compile(r"^([a-z_]+): ")
_UNDELIVERED = re.compile(r" was not delivered \(([a-z_]+)\): ")


@dataclass(slots=True)
class CommsSendRequest:
    """A ``comms/send`` / ``POST /comms/send`` request, types checked (the comms service
    checks what each kind needs)."""

    session_id: str
    kind: str
    to: str | None = None
    body: str | None = None
    intent: str | None = None
    params: dict[str, Any] | None = None
    in_reply_to: str | None = None
    status: str | None = None
    result: Any = None
    envelope_id: str | None = None


def parse_comms_send(params: dict[str, Any]) -> CommsSendRequest:
    """A peer send: ``{session_id, kind, to?, body?, intent?, params?, in_reply_to?, status?,
    result?, envelope_id?}``. ``kind`` is ``message``, ``request`` or ``response`` (0.4.10's
    ``peer_message``, ``peer_request``, ``peer_response`` too); 0.4.10's ``input`` kind and
    ``stream`` / ``allow_self_session`` / ``source`` are refused as unsupported."""
    if not isinstance(params, dict):
        raise SurfaceError("bad_request", "expected a JSON object")
    sid = _require_text(params, "session_id")
    raw_kind = params.get("kind")
    if not isinstance(raw_kind, str):
        got = "nothing" if raw_kind is None else type(raw_kind).__name__
        raise _bad("kind", f"expected one of {', '.join(SENDABLE_KINDS)}, got {got}")
    if raw_kind == "input":
        raise SurfaceError(
            "unsupported",
            "kind: 'input' (an input into the session's own inbox) is not a peer send; send "
            "a prompt with turn/start or POST /sessions/{id}/messages",
            field="kind",
        )
    kind = COMMS_KINDS.get(raw_kind)
    if kind is None:
        raise _bad(
            "kind",
            f"unknown kind {raw_kind!r}; expected one of {', '.join(SENDABLE_KINDS)} (0.4.10's "
            "peer_message, peer_request, peer_response are accepted too)",
        )
    for key in ("stream", "allow_self_session", "source"):
        if params.get(key):
            raise SurfaceError(
                "unsupported",
                f"{key}: not supported by this runtime's peer comms (leave it out)",
                field=key,
            )
    peer_params = params.get("params")
    if peer_params is not None and not isinstance(peer_params, dict):
        raise _bad("params", f"expected a JSON object, got {type(peer_params).__name__}")
    return CommsSendRequest(
        session_id=sid,
        kind=kind,
        to=_opt(params, "to", str, "a peer's comms name (a string)"),
        body=_opt(params, "body", str, "a string"),
        intent=_opt(params, "intent", str, "a string"),
        params=peer_params,
        in_reply_to=_opt(params, "in_reply_to", str, "a request id (a string)"),
        status=_opt(params, "status", str, "a string"),
        result=params.get("result"),
        envelope_id=_opt(params, "envelope_id", str, "a UUID string"),
    )


def _with_field(err: SurfaceError) -> SurfaceError:
    """``err`` with ``field`` set from its message when the message starts with a known
    field name (the comms service's messages do: ``to: unknown peer 'x'; ...``)."""
    match = _FIELD_PREFIX.match(err.message)
    if match and match.group(1) in _COMMS_FIELDS and err.code == "bad_request":
        err.details.setdefault("field", match.group(1))
    return err


def comms_error(exc: BaseException) -> SurfaceError:
    """The ``SurfaceError`` for a failed peer send: a target that refused the input keeps its
    reject code (``not_ready``, ``queue_full``, ``too_large``, ``idempotency_conflict``,
    ``invalid``); bad input is ``bad_request`` naming the field; an unknown sender
    ``not_found``."""
    if isinstance(exc, InvalidOperationError):
        match = _UNDELIVERED.search(str(exc))
        if match is not None:
            reject = match.group(1)
            code = _REJECT_CODES.get(reject)
            if code is None:
                code = "bad_request" if isinstance(exc, InvalidArgumentError) else "conflict"
            return SurfaceError(code, str(exc), reject_code=reject)
    return _with_field(classify(exc))


async def comms_send(rt: Runtime, req: CommsSendRequest) -> dict[str, Any]:
    """Send from ``req.session_id`` to a peer; the receipt (``peer_message_sent``,
    ``peer_request_sent``, ``peer_response_sent``). An unknown sender is ``not_found``, an
    archived one ``bad_request`` with ``archived: true``; nothing is delivered on error."""
    try:
        await rt.start()
        record = await rt.store.load_session(req.session_id)
        if record is None:
            raise SessionNotFoundError(req.session_id)
        if record.archived:
            raise SurfaceError(
                "bad_request",
                f"session_id: session {req.session_id} is archived; an archived session sends "
                "nothing",
                field="session_id",
                archived=True,
            )
        return await rt.comms_send(
            req.session_id,
            kind=req.kind,
            to=req.to,
            body=req.body,
            intent=req.intent,
            params=req.params,
            in_reply_to=req.in_reply_to,
            status=req.status,
            result=req.result,
            envelope_id=req.envelope_id,
        )
    except (MeerkatRuntimeError, StoreError) as exc:
        raise comms_error(exc) from None


async def comms_peers(rt: Runtime, session_id: str, *, meta: bool = True) -> list[dict[str, Any]]:
    """The session's peers (``{name, peer_id, address, source, sendable_kinds,
    capabilities, meta}``; without ``meta`` for JSON-RPC, as 0.4.10)."""
    try:
        peers = await rt.peers(session_id)
    except (MeerkatRuntimeError, StoreError) as exc:
        raise classify(exc) from None
    if not meta:
        peers = [{k: v for k, v in p.items() if k != "meta"} for p in peers]
    return peers


# ------------------------------------------------------------------ wire shapes


def wire_usage(usage: Usage) -> dict[str, Any]:
    out: dict[str, Any] = {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
    }
    if usage.cache_creation_tokens is not None:
        out["cache_creation_tokens"] = usage.cache_creation_tokens
    if usage.cache_read_tokens is not None:
        out["cache_read_tokens"] = usage.cache_read_tokens
    return out


def wire_run_result(result: RunResult, session_id: str) -> dict[str, Any]:
    """``WireRunResult``: ``session_id, text, turns, tool_calls, usage, structured_output?,
    schema_warnings?``."""
    out: dict[str, Any] = {
        "session_id": result.session_id or session_id,
        "text": result.text,
        "turns": result.turns,
        "tool_calls": result.tool_calls,
        "usage": wire_usage(result.usage),
    }
    if result.structured_output is not None:
        out["structured_output"] = result.structured_output
    if result.schema_warnings:
        out["schema_warnings"] = [{"message": w} for w in result.schema_warnings]
    return out


def wire_session_summary(view: SessionView) -> dict[str, Any]:
    """``WireSessionSummary``: what ``session/list`` and ``GET /sessions`` list."""
    return {
        "session_id": view.session_id,
        "created_at": format_ts(view.created_at),
        "updated_at": format_ts(view.updated_at),
        "message_count": view.message_count,
        "total_tokens": view.total_tokens,
        "is_active": view.is_active,
        "labels": dict(view.labels),
    }


def wire_session_info(view: SessionView) -> dict[str, Any]:
    """``session/read`` / ``GET /sessions/{id}``: the summary plus usage, model and state."""
    out = wire_session_summary(view)
    out["usage"] = wire_usage(view.usage)
    out["model"] = view.model
    if view.provider is not None:
        out["provider"] = view.provider
    if view.last_assistant_text is not None:
        out["last_assistant_text"] = view.last_assistant_text
    if view.state is not None:
        out["state"] = view.state
    out["archived"] = view.archived
    return out


def wire_message(m: Message) -> dict[str, Any]:
    """One history message in the SDK's ``SessionMessage`` shape: assistant tool calls as
    ``tool_calls[{id, name, args}]``, a tool result as role ``tool_results`` with
    ``results[{tool_use_id, content, is_error}]``; our extra fields (``created_at``,
    ``input_ids``, ``name``) ride along and the SDK ignores them."""
    if m.role == "tool":
        out: dict[str, Any] = {
            "role": "tool_results",
            "results": [
                {
                    "tool_use_id": m.tool_call_id or "",
                    "content": m.content,
                    "is_error": bool(m.is_error),
                }
            ],
        }
    else:
        out = {"role": m.role, "content": m.content}
        if m.role == "assistant":
            out["tool_calls"] = [
                {
                    "id": c.id,
                    "name": c.name,
                    "args": c.arguments if c.raw_arguments is None else c.raw_arguments,
                }
                for c in m.tool_calls
            ]
            out["stop_reason"] = "tool_use" if m.tool_calls else "end_turn"
            if m.usage is not None:
                out["usage"] = wire_usage(m.usage)
    if m.name is not None:
        out["name"] = m.name
    if m.input_ids:
        out["input_ids"] = [str(i) for i in m.input_ids]
    if m.created_at is not None:
        out["created_at"] = format_ts(m.created_at)
    return out


def wire_history(page: HistoryPage) -> dict[str, Any]:
    """``WireSessionHistory``."""
    out: dict[str, Any] = {
        "session_id": page.session_id,
        "message_count": page.message_count,
        "offset": page.offset,
        "has_more": page.has_more,
        "messages": [wire_message(m) for m in page.messages],
    }
    if page.limit is not None:
        out["limit"] = page.limit
    return out
