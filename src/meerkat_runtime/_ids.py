"""Identifier types.

Invariants:
- Every identifier is encoded in JSON as its bare inner value (a string), never as an object.
- UUID identifiers are written in the canonical lowercase hyphenated form; readers also accept
  the 32-hex, braced and ``urn:uuid:`` forms and normalise them.
- Two identifiers are equal only if they are of the same class and hold the same value, so an
  ``InputId`` never equals a ``RunId`` even when both wrap the same UUID.
- ``new()`` mints UUIDv7 values: time ordered, and strictly increasing within one process
  (a counter fills the sub-millisecond bits), so sorting ids by text sorts them by creation.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
import uuid
from typing import Any, ClassVar, Self

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

__all__ = [
    "CausationId",
    "ConversationId",
    "CorrelationId",
    "IdempotencyKey",
    "InputId",
    "KindId",
    "LogicalRuntimeId",
    "RunId",
    "RuntimeEventId",
    "SessionId",
    "SupersessionKey",
    "new_uuid7",
]

_HYPHENATED = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_ACCEPTED = re.compile(
    rf"({_HYPHENATED})|([0-9a-fA-F]{{32}})|\{{({_HYPHENATED})\}}|urn:uuid:({_HYPHENATED})"
)
_lock = threading.Lock()
_last_ms = 0
_counter = 0
_rand = random.Random(int.from_bytes(os.urandom(16), "big"))


def _reseed_after_fork() -> None:
    """A forked child must not mint the ids its parent mints in the same millisecond."""
    global _last_ms, _counter
    _rand.seed(int.from_bytes(os.urandom(16), "big"))
    _last_ms = 0
    _counter = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed_after_fork)


def new_uuid7() -> str:
    """A fresh UUIDv7 in hyphenated form, monotonic within this process."""
    global _last_ms, _counter
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms = ms
            _counter = _rand.getrandbits(11)  # leave headroom for increments in one ms
        else:
            _counter += 1
            if _counter >= 1 << 12:  # 4096 ids in one millisecond: borrow the next one
                _last_ms += 1
                _counter = 0
            ms = _last_ms
        tail = _rand.getrandbits(62)
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= _counter << 64
    value |= 0b10 << 62
    value |= tail
    h = f"{value:032x}"
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


class _Id:
    """A typed, immutable wrapper around a string value."""

    __slots__ = ("_value",)
    _value: str
    _kind: ClassVar[str] = "id"

    def __init__(self, value: str) -> None:
        object.__setattr__(self, "_value", self._normalise(value))

    @classmethod
    def _normalise(cls, value: str) -> str:
        if not isinstance(value, str):
            raise TypeError(f"{cls.__name__} takes a string, got {type(value).__name__}")
        return value

    @property
    def value(self) -> str:
        return self._value

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __str__(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._value!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._value == self._value

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __lt__(self, other: Self) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._value < other._value

    def __hash__(self) -> int:
        return hash((self._kind, self._value))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._value,))

    def __copy__(self) -> Self:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        return self

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: type[Any], handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        def validate(v: Any) -> Any:
            if type(v) is cls:
                return v
            if isinstance(v, str):
                return cls(v)
            raise ValueError(f"expected a string for {cls.__name__}")

        return core_schema.no_info_plain_validator_function(
            validate,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda v: v._value, return_schema=core_schema.str_schema()
            ),
            json_schema_input_schema=core_schema.str_schema(),
        )


class _UuidId(_Id):
    """An identifier whose value is a UUID (new ones are UUIDv7)."""

    __slots__ = ()

    @classmethod
    def _normalise(cls, value: str) -> str:
        if not isinstance(value, str):
            raise TypeError(f"{cls.__name__} takes a UUID string, got {type(value).__name__}")
        if _CANONICAL.fullmatch(value):
            return value
        m = _ACCEPTED.fullmatch(value)
        if m is None:
            raise ValueError(
                f"{value!r} is not a UUID (expected e.g. 01959d7e-3c4a-7b2e-9f00-1a2b3c4d5e6f)"
            )
        h = (m.group(1) or m.group(2) or m.group(3) or m.group(4)).replace("-", "").lower()
        return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"

    @classmethod
    def new(cls) -> Self:
        obj = object.__new__(cls)
        object.__setattr__(obj, "_value", new_uuid7())
        return obj

    @classmethod
    def from_uuid(cls, value: uuid.UUID) -> Self:
        return cls(str(value))

    @property
    def uuid(self) -> uuid.UUID:
        return uuid.UUID(self._value)


class InputId(_UuidId):
    """Identity of one input. Opaque to core."""

    __slots__ = ()
    _kind = "input"


class RunId(_UuidId):
    """Identity of one run of the executor."""

    __slots__ = ()
    _kind = "run"


class RuntimeEventId(_UuidId):
    __slots__ = ()
    _kind = "runtime_event"


class ConversationId(_UuidId):
    __slots__ = ()
    _kind = "conversation"


class CausationId(_UuidId):
    __slots__ = ()
    _kind = "causation"


class CorrelationId(_UuidId):
    __slots__ = ()
    _kind = "correlation"


class LogicalRuntimeId(_Id):
    """Logical identity of a runtime; survives retire and respawn. A session's is its id."""

    __slots__ = ()
    _kind = "logical_runtime"


class SessionId(_Id):
    __slots__ = ()
    _kind = "session"


class IdempotencyKey(_Id):
    __slots__ = ()
    _kind = "idempotency_key"


class SupersessionKey(_Id):
    __slots__ = ()
    _kind = "supersession_key"


class KindId(_Id):
    __slots__ = ()
    _kind = "kind"
