"""JSON helpers: compact encoding, canonical encoding and content hashes.

Canonical JSON (used for idempotency content hashes, S11, and conversation digests, spec §3):
keys sorted, no whitespace, non-ASCII written as UTF-8. Two documents that are equal as JSON
values have the same canonical bytes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["canonical_bytes", "compact", "sha256_hex"]


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def canonical_bytes(value: Any) -> bytes:
    return json.dumps(
        value, separators=(",", ":"), ensure_ascii=False, sort_keys=True, allow_nan=False
    ).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
