"""Row shapes and decoders that every SQL store (SQLite, PostgreSQL) and the in-memory store
share: the column lists of the ``runs`` and ``peer_requests`` tables (same names and order in
both schemas), the decoding of a ``runs`` row, and the input id of an inbox entry."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .._ids import RunId
from ..core.lifecycle import RunResult
from .base import RunRecord

__all__ = ["PEER_COLS", "RUN_COLS", "inbox_input_id", "run_record"]

RUN_COLS = "run_id, runtime_id, status, result_json, error, is_continuation"
PEER_COLS = (
    "requester_runtime_id, request_id, responder_runtime_id, envelope_id, requester_name,"
    " responder_name, intent, created_at, status, closed_at, closed_by"
)


def run_record(row: Sequence[Any]) -> RunRecord:
    """A ``runs`` row selected as ``RUN_COLS``."""
    run_id, runtime_id, status, result_json, error, is_cont = row
    return RunRecord(
        RunId(run_id),
        runtime_id,
        status,
        RunResult.from_json(result_json) if result_json is not None else None,
        error,
        bool(is_cont),
    )


def inbox_input_id(input_json: str) -> str | None:
    """The header id of an inbox entry's input document (None if it has none)."""
    try:
        doc = json.loads(input_json)
    except ValueError:
        return None
    header = doc.get("header") if isinstance(doc, dict) else None
    value = header.get("id") if isinstance(header, dict) else None
    return value if isinstance(value, str) else None
