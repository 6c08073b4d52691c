"""Provider retries inside one run attempt (S4: "provider retries happen inside one attempt").

Invariants:
- Only ``ModelError.transient`` errors are retried; a permanent error is raised at once.
- At most ``max_attempts`` calls in all; the last transient error is raised when they are
  spent, so the runtime's own attempt accounting (S4) takes over from there.
- The wait before a retry is the server's ``retry_after`` when it gave one (capped at
  ``max_retry_after``), else a bounded exponential backoff with jitter. ``on_retry`` is told
  before each wait, so the agent can emit a ``retrying`` event.
- Every wait is an ``asyncio.sleep``: cancelling the caller cancels the wait at once.
- Text streamed by a failed call has already reached ``on_text``; the retried call streams
  its own text again (subscribers see the final text in ``text_complete``).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass

from .base import Model, ModelError, ModelRequest, ModelResponse, TextSink

__all__ = ["RetryPolicy", "complete_with_retry"]

RetryHook = Callable[[int, int, ModelError, float], None]
"""``(attempt that failed, max_attempts, error, delay in seconds)``."""


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 20.0
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.base_delay < 0 or self.max_delay < 0 or self.max_retry_after < 0:
            raise ValueError("retry delays must not be negative")

    def delay(self, attempt: int, error: ModelError) -> float:
        """Seconds to wait after failed call number ``attempt`` (1-based)."""
        if error.retry_after is not None and error.retry_after >= 0:
            return float(min(error.retry_after, self.max_retry_after))
        backoff = min(self.max_delay, self.base_delay * (2.0 ** (attempt - 1)))
        jitter: float = random.uniform(0.5, 1.0)
        return backoff * jitter


async def complete_with_retry(
    model: Model,
    request: ModelRequest,
    *,
    policy: RetryPolicy | None = None,
    on_text: TextSink | None = None,
    on_retry: RetryHook | None = None,
) -> ModelResponse:
    """``model.complete`` with retries of transient errors (see the module docstring)."""
    policy = policy or RetryPolicy()
    attempt = 1
    while True:
        try:
            return await model.complete(request, on_text=on_text)
        except ModelError as err:
            if not err.transient or attempt >= policy.max_attempts:
                raise
            delay = policy.delay(attempt, err)
            if on_retry is not None:
                on_retry(attempt, policy.max_attempts, err, delay)
            await asyncio.sleep(delay)
            attempt += 1
