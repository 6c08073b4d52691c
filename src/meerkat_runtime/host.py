"""``Runtime``: the public entry point. It owns many session runtimes, creates sessions, routes
inputs, and exposes state, inputs, events and waiters.

Usage::

    async with Runtime.open() as rt:
        session = await rt.create_session(model="offline")
        handle = await rt.accept_with_completion(session.id, PromptInput.new("hello"))
        outcome = await handle.wait()

Shutdown (S19): leaving the ``async with`` (or ``close()``) stops accepting, gives active runs
a grace period, then stops them and resolves every in-process waiter ``terminated``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any

from ._ids import InputId, SessionId
from ._time import utcnow
from .core.lifecycle import CoreExecutor
from .errors import (
    InputRejectedError,
    InvalidOperationError,
    RuntimeClosedError,
    SessionNotFoundError,
)
from .runtime.driver import Rebuilders, RuntimeConfig, SessionRuntime
from .runtime.events import RuntimeEventEnvelope
from .runtime.input_state import InputState, ReconstructionSource
from .runtime.inputs import Input
from .runtime.outcomes import AcceptOutcome, Deduplicated, RejectCode, Rejected, WaitOutcome
from .runtime.policy import PolicyTable, default_policy_table
from .runtime.state import RuntimeState
from .store.base import RuntimeStore
from .store.memory import MemoryStore

__all__ = ["CompletionHandle", "Runtime", "SessionInfo", "open_store"]


@dataclass(slots=True)
class SessionInfo:
    """A session: its id (also its logical runtime id) and how its agent is configured."""

    id: str
    model: str = "offline"
    system_prompt: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    created_at: datetime = field(default_factory=utcnow)
    custom_executor: bool = False

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.id,
            "model": self.model,
            "system_prompt": self.system_prompt,
            "labels": dict(self.labels),
            "created_at": self.created_at.isoformat().replace("+00:00", "Z"),
        }


class CompletionHandle:
    """What ``accept_with_completion`` returns: the accept outcome and a way to wait for the
    input's waiter outcome (S12). For ``deduplicated`` it follows the existing input."""

    def __init__(self, outcome: AcceptOutcome, future: asyncio.Future[Any] | None) -> None:
        self.outcome = outcome
        self._future = future

    @property
    def input_id(self) -> InputId:
        if isinstance(self.outcome, Deduplicated):
            return self.outcome.existing_id
        if isinstance(self.outcome, Rejected):
            raise InputRejectedError(self.outcome.reason, self.outcome.code.value)
        return self.outcome.input_id

    async def wait(self, timeout: float | None = None) -> WaitOutcome:
        """The waiter outcome; raises ``InputRejectedError`` for a rejected input and
        ``TimeoutError`` after ``timeout`` seconds (the input lives on)."""
        if isinstance(self.outcome, Rejected) or self._future is None:
            assert isinstance(self.outcome, Rejected)
            raise InputRejectedError(self.outcome.reason, self.outcome.code.value)
        result: WaitOutcome = await asyncio.wait_for(asyncio.shield(self._future), timeout)
        return result


def open_store(url: str | None) -> RuntimeStore:
    """The store for ``url``. ``None`` and ``memory://`` give the in-memory store."""
    if url is None or url.startswith("memory:"):
        return MemoryStore(url or "memory://")
    scheme = url.split(":", 1)[0]
    raise InvalidOperationError(
        f"store URL {url!r} is not supported by this build (scheme {scheme!r}); "
        "supported: memory:// (SQLite and PostgreSQL come with their own releases)"
    )


class Runtime:
    """Many session runtimes over one store."""

    def __init__(
        self,
        store: RuntimeStore,
        *,
        policy: PolicyTable | None = None,
        config: RuntimeConfig | None = None,
        rebuilders: Rebuilders | None = None,
    ) -> None:
        self.store = store
        self.policy = policy or default_policy_table()
        self.config = config or RuntimeConfig()
        self.rebuilders = rebuilders or Rebuilders()
        self._sessions: dict[str, SessionInfo] = {}
        self._runtimes: dict[str, SessionRuntime] = {}
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(
        cls,
        url: str | None = None,
        *,
        policy: PolicyTable | None = None,
        config: RuntimeConfig | None = None,
        rebuilders: Rebuilders | None = None,
    ) -> Runtime:
        """A runtime over the store at ``url`` (default: in memory)."""
        return cls(open_store(url), policy=policy, config=config, rebuilders=rebuilders)

    async def __aenter__(self) -> Runtime:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self, grace: float | None = None) -> None:
        """S19: stop accepting, give active runs ``grace`` seconds (default from config),
        then stop them; in-process waiters resolve ``terminated``."""
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*(rt.close(grace) for rt in self._runtimes.values()))
        await self.store.close()

    # ------------------------------------------------------------------ sessions

    async def create_session(
        self,
        *,
        model: str = "offline",
        system_prompt: str | None = None,
        labels: dict[str, str] | None = None,
        executor: CoreExecutor | None = None,
        offline_script: list[dict[str, Any]] | None = None,
        session_id: str | None = None,
    ) -> SessionInfo:
        """Create a session and its runtime. Without ``executor`` the built-in agent runs it."""
        self._check_open()
        sid = session_id or str(SessionId(InputId.new().value))
        if sid in self._sessions:
            raise InvalidOperationError(f"session {sid!r} already exists")
        info = SessionInfo(
            id=sid,
            model=model,
            system_prompt=system_prompt,
            labels=dict(labels or {}),
            custom_executor=executor is not None,
        )
        if executor is None:
            from .core.agent import AgentConfig, AgentExecutor

            try:
                config = AgentConfig(
                    model=model, system_prompt=system_prompt, offline_script=offline_script
                )
            except ValueError as exc:
                raise InvalidOperationError(f"cannot create the session: {exc}") from None
            executor = AgentExecutor(config, session_id=sid)
        rt = SessionRuntime(
            sid,
            self.store,
            executor,
            policy=self.policy,
            config=self.config,
            rebuilders=self.rebuilders,
        )
        self._sessions[sid] = info
        self._runtimes[sid] = rt
        return info

    def sessions(self) -> list[SessionInfo]:
        return list(self._sessions.values())

    def session(self, session_id: str) -> SessionInfo:
        info = self._sessions.get(session_id)
        if info is None:
            raise SessionNotFoundError(session_id)
        return info

    def runtime(self, session_id: str) -> SessionRuntime:
        """The session's runtime (the per-session control plane)."""
        rt = self._runtimes.get(session_id)
        if rt is None:
            raise SessionNotFoundError(session_id)
        return rt

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeClosedError("this Runtime is closed; open a new one")

    # ------------------------------------------------------------------ inputs

    async def accept(
        self,
        session_id: str,
        input: Input | str | bytes | dict[str, Any],
        *,
        reconstruction_source: ReconstructionSource | None = None,
    ) -> AcceptOutcome:
        """Admit an input (an ``Input``, or its JSON as text, bytes or dict). Input problems
        come back as ``rejected{reason, code}``; nothing raises for them (S14)."""
        rt = self._accepting(session_id)
        if rt is None:
            return Rejected(reason="this Runtime is shutting down", code=RejectCode.NOT_READY)
        outcome, _ = await rt.accept(input, reconstruction_source=reconstruction_source)
        return outcome

    async def accept_with_completion(
        self,
        session_id: str,
        input: Input | str | bytes | dict[str, Any],
        *,
        reconstruction_source: ReconstructionSource | None = None,
    ) -> CompletionHandle:
        rt = self._accepting(session_id)
        if rt is None:
            return CompletionHandle(
                Rejected(reason="this Runtime is shutting down", code=RejectCode.NOT_READY),
                None,
            )
        outcome, fut = await rt.accept(
            input, reconstruction_source=reconstruction_source, register_waiter=True
        )
        return CompletionHandle(outcome, fut)

    def _accepting(self, session_id: str) -> SessionRuntime | None:
        rt = self.runtime(session_id)
        return None if self._closed else rt

    async def wait(
        self, session_id: str, input_id: InputId | str, timeout: float | None = None
    ) -> WaitOutcome:
        """Wait for an input's outcome; a terminal input answers at once (S12)."""
        rt = self.runtime(session_id)
        iid = input_id if isinstance(input_id, InputId) else InputId(input_id)
        fut = rt.register_waiter(iid)
        result: WaitOutcome = await asyncio.wait_for(asyncio.shield(fut), timeout)
        return result

    def input_state(self, session_id: str, input_id: InputId | str) -> InputState:
        iid = input_id if isinstance(input_id, InputId) else InputId(input_id)
        return self.runtime(session_id).input_state(iid)

    def list_inputs(self, session_id: str, *, include_terminal: bool = False) -> list[InputState]:
        rt = self.runtime(session_id)
        return [rt.input_state(i) for i in rt.input_ids(include_terminal=include_terminal)]

    async def cancel_input(self, session_id: str, input_id: InputId | str) -> InputState:
        iid = input_id if isinstance(input_id, InputId) else InputId(input_id)
        return await self.runtime(session_id).cancel_input(iid)

    async def ack(self, session_id: str, input_id: InputId | str) -> InputState:
        iid = input_id if isinstance(input_id, InputId) else InputId(input_id)
        return await self.runtime(session_id).ack(iid)

    # ------------------------------------------------------------------ runtime control

    def runtime_state(self, session_id: str) -> RuntimeState:
        return self.runtime(session_id).state

    async def cancel(self, session_id: str, reason: str = "") -> bool:
        """Cancel the session's active run (S8). False when there was nothing to cancel."""
        return self.runtime(session_id).cancel_current_run(reason)

    async def retire(self, session_id: str, *, replacement_planned: bool = False) -> dict[str, int]:
        return await self.runtime(session_id).retire(replacement_planned)

    async def respawn(self, session_id: str) -> dict[str, int]:
        return await self.runtime(session_id).respawn()

    async def reset(self, session_id: str) -> dict[str, int]:
        return await self.runtime(session_id).reset()

    async def destroy(self, session_id: str) -> dict[str, int]:
        return await self.runtime(session_id).destroy()

    def stop(self, session_id: str, reason: str = "runtime stopped") -> None:
        self.runtime(session_id).stop(reason)

    # ------------------------------------------------------------------ events

    async def events(
        self, session_id: str, after_seq: int = 0, *, follow: bool = False
    ) -> AsyncIterator[RuntimeEventEnvelope]:
        """The session's runtime events with ``seq > after_seq``, in order; with ``follow``,
        keeps waiting for new ones. A resume past what is kept yields one ``events_gap``."""
        rt = self.runtime(session_id)
        seq = after_seq
        while True:
            signal = rt.event_signal()
            gap_from, evs = rt.events_after(seq)
            if gap_from is not None:
                to = evs[0].seq - 1 if evs else rt.last_seq
                yield RuntimeEventEnvelope.make(
                    0,
                    utcnow(),
                    session_id,
                    "stream",
                    {"code": "events_gap", "from": gap_from, "to": to},
                )
                seq = to
            for e in evs:
                yield e
                seq = e.seq
            if evs:
                continue
            if not follow:
                return
            await signal.wait()
