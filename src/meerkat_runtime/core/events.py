"""Agent events: what the turn loop reports while a run happens.

Each event is a JSON object ``{"type": <name>, ...fields}`` whose type names and fields are
those of the official Meerkat Python SDK (``meerkat-sdk`` 0.4.10, ``meerkat/events.py``), so
``meerkat.events.parse_event`` turns every one of them into its typed dataclass (a test pins
this against the installed SDK). Extra fields the SDK does not know (``status`` on tool
events, ``error_kind`` on failures) are ignored by its parser and kept for our own surfaces.

Three types are ours (the SDK reads them as ``UnknownEvent``): ``tool_execution_cancelled``
(a cancel reached a running tool), ``structured_output_invalid`` (a final answer failed the
output schema and is being retried or given up on) and ``context_appended`` (system-generated
or ``inject_now`` input appended without a model call).

Events are published through ``RunContext.emit`` into the session's event sequence (S15):
``text_delta`` only in memory, every other type also stored.
"""

from __future__ import annotations

from typing import Any

from .lifecycle import Usage

__all__ = [
    "SDK_EVENT_TYPES",
    "budget_warning",
    "context_appended",
    "retrying",
    "run_completed",
    "run_failed",
    "run_started",
    "structured_output_invalid",
    "text_complete",
    "text_delta",
    "tool_call_requested",
    "tool_execution_cancelled",
    "tool_execution_completed",
    "tool_execution_started",
    "tool_execution_timed_out",
    "tool_result_received",
    "turn_completed",
    "turn_started",
    "usage_json",
]

SDK_EVENT_TYPES = frozenset(
    {
        "run_started",
        "run_completed",
        "run_failed",
        "turn_started",
        "text_delta",
        "text_complete",
        "tool_call_requested",
        "tool_result_received",
        "turn_completed",
        "tool_execution_started",
        "tool_execution_completed",
        "tool_execution_timed_out",
        "budget_warning",
        "retrying",
    }
)
"""The agent event types this runtime emits that the SDK parses into typed events."""

Event = dict[str, Any]


def usage_json(usage: Usage) -> dict[str, Any]:
    """Usage in the SDK's shape (cache fields only when the provider reported them)."""
    out: dict[str, Any] = {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens}
    if usage.cache_creation_tokens is not None:
        out["cache_creation_tokens"] = usage.cache_creation_tokens
    if usage.cache_read_tokens is not None:
        out["cache_read_tokens"] = usage.cache_read_tokens
    return out


def run_started(session_id: str, prompt: str, run_id: str) -> Event:
    return {"type": "run_started", "session_id": session_id, "prompt": prompt, "run_id": run_id}


def run_completed(session_id: str, result: str, usage: Usage, run_id: str) -> Event:
    return {
        "type": "run_completed",
        "session_id": session_id,
        "result": result,
        "usage": usage_json(usage),
        "run_id": run_id,
    }


def run_failed(session_id: str, error: str, error_kind: str, run_id: str) -> Event:
    return {
        "type": "run_failed",
        "session_id": session_id,
        "error": error,
        "error_kind": error_kind,
        "run_id": run_id,
    }


def turn_started(turn_number: int) -> Event:
    return {"type": "turn_started", "turn_number": turn_number}


def text_delta(delta: str) -> Event:
    return {"type": "text_delta", "delta": delta}


def text_complete(content: str) -> Event:
    return {"type": "text_complete", "content": content}


def tool_call_requested(call_id: str, name: str, args: Any) -> Event:
    return {"type": "tool_call_requested", "id": call_id, "name": name, "args": args}


def tool_execution_started(call_id: str, name: str) -> Event:
    return {"type": "tool_execution_started", "id": call_id, "name": name}


def tool_execution_completed(
    call_id: str, name: str, result: str, is_error: bool, duration_ms: int, status: str
) -> Event:
    return {
        "type": "tool_execution_completed",
        "id": call_id,
        "name": name,
        "result": result,
        "is_error": is_error,
        "duration_ms": duration_ms,
        "status": status,
    }


def tool_execution_timed_out(call_id: str, name: str, timeout_ms: int) -> Event:
    return {
        "type": "tool_execution_timed_out",
        "id": call_id,
        "name": name,
        "timeout_ms": timeout_ms,
    }


def tool_execution_cancelled(call_id: str, name: str, duration_ms: int) -> Event:
    return {
        "type": "tool_execution_cancelled",
        "id": call_id,
        "name": name,
        "duration_ms": duration_ms,
    }


def tool_result_received(call_id: str, name: str, is_error: bool) -> Event:
    return {"type": "tool_result_received", "id": call_id, "name": name, "is_error": is_error}


def turn_completed(stop_reason: str, usage: Usage) -> Event:
    return {"type": "turn_completed", "stop_reason": stop_reason, "usage": usage_json(usage)}


def budget_warning(budget_type: str, used: int, limit: int) -> Event:
    percent = round(100.0 * used / limit, 1) if limit else 100.0
    return {
        "type": "budget_warning",
        "budget_type": budget_type,
        "used": used,
        "limit": limit,
        "percent": percent,
    }


def retrying(attempt: int, max_attempts: int, error: str, delay_ms: int, error_kind: str) -> Event:
    return {
        "type": "retrying",
        "attempt": attempt,
        "max_attempts": max_attempts,
        "error": error,
        "delay_ms": delay_ms,
        "error_kind": error_kind,
    }


def structured_output_invalid(attempt: int, max_attempts: int, errors: list[str]) -> Event:
    return {
        "type": "structured_output_invalid",
        "attempt": attempt,
        "max_attempts": max_attempts,
        "errors": errors,
    }


def context_appended(count: int) -> Event:
    return {"type": "context_appended", "count": count}
