"""Public errors. Each message says what was wrong and what to do instead.

Input problems never raise: ``accept`` answers ``rejected{reason, code}`` (S14). These errors are
for operations on things that do not exist or cannot be done in the current state.
"""

from __future__ import annotations

__all__ = [
    "InputNotFoundError",
    "InputRejectedError",
    "InvalidArgumentError",
    "InvalidOperationError",
    "MeerkatRuntimeError",
    "RuntimeClosedError",
    "SessionNotFoundError",
]


class MeerkatRuntimeError(Exception):
    """Base class; ``code`` is stable for clients to branch on."""

    code = "error"


class SessionNotFoundError(MeerkatRuntimeError, LookupError):
    code = "session_not_found"

    def __init__(self, session_id: str) -> None:
        super().__init__(f"no session {session_id!r} in this store")
        self.session_id = session_id


class InputNotFoundError(MeerkatRuntimeError, LookupError):
    code = "input_not_found"

    def __init__(self, input_id: str, where: str = "") -> None:
        super().__init__(f"no input {input_id!r}{' in ' + where if where else ''}")
        self.input_id = input_id


class InvalidOperationError(MeerkatRuntimeError):
    code = "invalid_operation"


class InvalidArgumentError(InvalidOperationError, ValueError):
    """An argument was malformed or out of range (surfaces answer it as a bad request)."""

    code = "invalid_argument"


class RuntimeClosedError(MeerkatRuntimeError):
    code = "not_ready"


class InputRejectedError(MeerkatRuntimeError):
    """Raised by ``wait`` helpers when the input was rejected at accept (it has no lifecycle)."""

    code = "rejected"

    def __init__(self, reason: str, reject_code: str) -> None:
        super().__init__(f"input rejected ({reject_code}): {reason}")
        self.reason = reason
        self.reject_code = reject_code
