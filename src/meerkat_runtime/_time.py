"""UTC timestamps and their RFC 3339 encoding.

Writers emit UTC with a literal ``Z`` and the fewest of 0, 3 or 6 fractional digits that
represent the value exactly (Python keeps microseconds, so 9 digits never occur on write).
Readers accept any RFC 3339 timestamp with an offset, up to 9 fractional digits (digits past
the sixth are truncated), and convert it to UTC.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

__all__ = ["Timestamp", "format_ts", "parse_ts", "utcnow"]

_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(Z|z|[+-]\d{2}:\d{2})$"
)


def utcnow() -> datetime:
    return datetime.now(UTC)


def format_ts(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    value = value.astimezone(UTC)
    base = (
        f"{value.year:04d}-{value.month:02d}-{value.day:02d}T"
        f"{value.hour:02d}:{value.minute:02d}:{value.second:02d}"
    )
    us = value.microsecond
    if us == 0:
        return base + "Z"
    if us % 1000 == 0:
        return f"{base}.{us // 1000:03d}Z"
    return f"{base}.{us:06d}Z"


def parse_ts(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if not isinstance(value, str):
        raise ValueError("expected an RFC 3339 timestamp string such as 2026-03-15T10:20:30Z")
    m = _RFC3339.match(value)
    if m is None:
        raise ValueError(
            f"{value!r} is not an RFC 3339 timestamp (expected e.g. 2026-03-15T10:20:30.123Z)"
        )
    year, month, day, hour, minute, second, frac, off = m.groups()
    micro = int((frac or "0")[:6].ljust(6, "0"))
    if off in ("Z", "z"):
        tz: timezone = UTC
    else:
        sign = 1 if off[0] == "+" else -1
        tz = timezone(sign * timedelta(hours=int(off[1:3]), minutes=int(off[4:6])))
    dt = datetime(
        int(year), int(month), int(day), int(hour), int(minute), int(second), micro, tzinfo=tz
    )
    return dt.astimezone(UTC)


Timestamp = Annotated[
    datetime,
    BeforeValidator(parse_ts),
    PlainSerializer(format_ts, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
