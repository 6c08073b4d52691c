"""``Runtime``: the public entry point. It owns many session runtimes over one store, creates
sessions, routes inputs, and exposes state, inputs, events and waiters.

Usage::

    async with Runtime.open() as rt:                   # SQLite under the state directory
        session = await rt.create_session(model="offline")
        handle = await rt.accept_with_completion(session.id, PromptInput.new("hello"))
        outcome = await handle.wait()

Ownership (S10): a process runs a session only while it holds the session's lease. Another
process that shares the store may still ``accept`` (through the durable inbox, which the owner
ingests in order) and ``wait`` (by polling the store); when the owner's lease expires, the next
process that touches the session takes it over and recovers it (S7).

Shutdown (S19): leaving the ``async with`` (or ``close()``) stops accepting, gives active runs
a grace period, then stops them, flushes commits, releases leases and resolves every
in-process waiter ``terminated``.

Peer comms (``comms/``, ``docs/comms.md``): a session created with ``comms_name`` talks to the
other named sessions of the store with ``comms_send`` / ``peers``, and its built-in agent is
offered the comms tools.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any

from ._ids import IdempotencyKey, InputId
from ._time import utcnow
from .comms import CommsService, comms_tools, validate_comms_name
from .core.lifecycle import CoreExecutor, Message, RuntimeTurnMetadata
from .core.tools import ToolRegistry
from .errors import (
    InputNotFoundError,
    InputRejectedError,
    InvalidArgumentError,
    InvalidOperationError,
    RuntimeClosedError,
    SessionNotFoundError,
)
from .runtime.driver import Rebuilders, RuntimeConfig, SessionRuntime, validate_input
from .runtime.events import RuntimeEventEnvelope
from .runtime.input_state import InputState, ReconstructionSource
from .runtime.inputs import (
    ExternalEventInput,
    Input,
    PromptInput,
    content_hash,
    kind_id,
    parse_input,
)
from .runtime.outcomes import (
    Accepted,
    AcceptOutcome,
    Deduplicated,
    RejectCode,
    Rejected,
    TerminatedWait,
    WaitOutcome,
    outcome_of,
    with_via,
)
from .runtime.policy import PolicySnapshot, PolicyTable, default_policy_table
from .runtime.state import RuntimeState
from .sessions import AGENT_KEYS, HistoryPage, SessionView, agent_config_from
from .store import open_store
from .store.base import (
    CommsNameTakenError,
    FencedError,
    IdempotencyRecord,
    InboxEntry,
    RuntimeStore,
    SessionRecord,
    StoreError,
)

__all__ = ["CompletionHandle", "ExecutorFactory", "OwnershipHook", "Runtime", "SessionInfo"]

log = logging.getLogger("meerkat_runtime")

ExecutorFactory = Callable[[SessionRecord], CoreExecutor | None]
# (event, session id, generation, detail): "acquired" a lease, "lost" it (stopped here),
# "released" it at shutdown
OwnershipHook = Callable[[str, str, int, str], None]


@dataclass(slots=True)
class SessionInfo:
    """A session: its id (also its logical runtime id) and how its agent is configured."""

    id: str
    model: str = "offline"
    system_prompt: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    created_at: datetime = field(default_factory=utcnow)
    custom_executor: bool = False
    offline_script: list[dict[str, Any]] | None = None
    provider: str | None = None
    archived: bool = False
    config: dict[str, Any] = field(default_factory=dict)

    def to_json_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "session_id": self.id,
            "model": self.model,
            "system_prompt": self.system_prompt,
            "labels": dict(self.labels),
            "created_at": self.created_at.isoformat().replace("+00:00", "Z"),
        }
        if self.provider is not None:
            out["provider"] = self.provider
        if self.archived:
            out["archived"] = True
        return out

    @classmethod
    def from_record(cls, rec: SessionRecord) -> SessionInfo:
        cfg = rec.config
        return cls(
            id=rec.session_id,
            model=str(cfg.get("model", "offline")),
            system_prompt=cfg.get("system_prompt"),
            labels=dict(rec.labels),
            created_at=rec.created_at,
            custom_executor=bool(cfg.get("custom_executor", False)),
            offline_script=cfg.get("offline_script"),
            provider=cfg.get("provider"),
            archived=rec.archived,
            config=dict(cfg),
        )


class CompletionHandle:
    """What ``accept_with_completion`` returns: the accept outcome and a way to wait for the
    input's waiter outcome (S12). For ``deduplicated`` it follows the existing input."""

    def __init__(
        self,
        outcome: AcceptOutcome,
        future: asyncio.Future[Any] | None,
        waiter: Callable[[float | None], Any] | None = None,
        follow: Callable[[], bool] | None = None,
    ) -> None:
        self.outcome = outcome
        self._future = future
        self._waiter = waiter
        self._follow = follow

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
        if isinstance(self.outcome, Rejected):
            raise InputRejectedError(self.outcome.reason, self.outcome.code.value)
        if self._future is not None:
            result: WaitOutcome = await asyncio.wait_for(asyncio.shield(self._future), timeout)
            if isinstance(result, TerminatedWait) and self._follow is not None and self._follow():
                # the instance stopped on a store fault: follow the input where it lives now
                assert self._waiter is not None
                followed: WaitOutcome = await self._waiter(timeout)
                return followed
            return result
        assert self._waiter is not None
        remote: WaitOutcome = await self._waiter(timeout)
        return remote


class Runtime:
    """Many session runtimes over one store."""

    def __init__(
        self,
        store: RuntimeStore,
        *,
        policy: PolicyTable | None = None,
        config: RuntimeConfig | None = None,
        rebuilders: Rebuilders | None = None,
        executor_factory: ExecutorFactory | None = None,
        lease_ttl: float = 10.0,
        poll_interval: float = 0.1,
        owner_id: str | None = None,
        recover_on_open: bool = True,
        tools: ToolRegistry | None = None,
        owns_sessions: bool = True,
        max_sessions: int | None = None,
        slow_poll: float = 2.0,
        on_ownership: OwnershipHook | None = None,
    ) -> None:
        if max_sessions is not None and max_sessions < 1:
            raise InvalidArgumentError(f"max_sessions must be at least 1, got {max_sessions}")
        if lease_ttl <= 0:
            raise InvalidArgumentError(f"lease_ttl must be positive, got {lease_ttl}")
        self.store = store
        self.tools = tools if tools is not None else ToolRegistry()
        self.policy = policy or default_policy_table()
        self.config = config or RuntimeConfig()
        self.rebuilders = rebuilders or Rebuilders()
        self.executor_factory = executor_factory
        self.lease_ttl = lease_ttl
        self.poll_interval = poll_interval
        self.owner_id = owner_id or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.recover_on_open = recover_on_open
        # False: a client-only Runtime (short-lived commands): it never takes a lease, so
        # every accept goes to the session's durable inbox (S10) and no run starts here
        self.owns_sessions = owns_sessions
        # at most this many leases at once (a worker's bound); beyond it, inputs for other
        # sessions go to their inboxes and another process runs them
        self.max_sessions = max_sessions
        # with a store that notifies (PostgreSQL), polls are only a backstop: this often
        self.slow_poll = slow_poll
        self.on_ownership = on_ownership
        self._notifying = callable(getattr(store, "notifications", None))
        self._listener: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watchers: dict[str, set[asyncio.Event]] = {}
        # session -> monotonic time the last successful acquire/renew of its lease was sent:
        # the lease is valid until at least that + lease_ttl on any sane clock
        self._lease_sent: dict[str, float] = {}
        self._adopting: set[str] = set()
        self._acquiring: set[str] = set()  # sessions whose lease is being acquired
        self._ingest_queued: set[str] = set()  # runtimes with an ingest pass not yet reading
        # session -> lease expiry (UNIX time) of a live owner elsewhere, seen on a notice
        self._owned_elsewhere: dict[str, float] = {}
        self._draining = False
        self.recovery_reports: dict[str, dict[str, int]] = {}
        self._sessions: dict[str, SessionInfo] = {}
        self._runtimes: dict[str, SessionRuntime] = {}
        self._executors: dict[str, CoreExecutor] = {}
        self._session_tools: dict[str, ToolRegistry] = {}
        self._comms: CommsService | None = None
        self._comms_tools: ToolRegistry | None = None
        self._load_locks: dict[str, asyncio.Lock] = {}
        self._ingest_locks: dict[str, asyncio.Lock] = {}
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self._closed = False
        self._maintainer: asyncio.Task[None] | None = None
        self._token: int | None = None

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(
        cls,
        url: str | None = None,
        *,
        policy: PolicyTable | None = None,
        config: RuntimeConfig | None = None,
        rebuilders: Rebuilders | None = None,
        executor_factory: ExecutorFactory | None = None,
        lease_ttl: float = 10.0,
        poll_interval: float = 0.1,
        recover_on_open: bool = True,
        tools: ToolRegistry | None = None,
        owns_sessions: bool = True,
        max_sessions: int | None = None,
        slow_poll: float = 2.0,
        on_ownership: OwnershipHook | None = None,
        owner_id: str | None = None,
    ) -> Runtime:
        """A runtime over the store at ``url``: ``None`` for the default SQLite file under
        ``$MEERKAT_STATE_DIR`` (or ``~/.local/share/meerkat``), ``sqlite:///path.db``,
        ``postgresql://user:password@host:5432/dbname``, or ``memory://`` (``open_store``
        lists every accepted form). The store is opened (and pending sessions recovered,
        S7) on entering ``async with`` or on first use. ``tools`` are offered to every
        built-in agent session (a session may add its own at ``create_session``)."""
        return cls(
            open_store(url),
            policy=policy,
            config=config,
            rebuilders=rebuilders,
            executor_factory=executor_factory,
            lease_ttl=lease_ttl,
            poll_interval=poll_interval,
            recover_on_open=recover_on_open,
            tools=tools,
            owns_sessions=owns_sessions,
            max_sessions=max_sessions,
            slow_poll=slow_poll,
            on_ownership=on_ownership,
            owner_id=owner_id,
        )

    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Open the store and recover every session with pending inputs before its loop
        starts (S7). Idempotent."""
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            self._check_open()
            await self.store.open()
            self._started = True
            loop = asyncio.get_running_loop()
            # leases are renewed from the first acquisition on: recovering many sessions may
            # take longer than a lease, and recovered sessions run at once
            if self.owns_sessions:
                self._keeper = loop.create_task(self._keep_leases(), name="meerkat-lease-keeper")
            if self._notifying:
                self._listener = loop.create_task(self._listen(), name="meerkat-store-listener")
            if self.recover_on_open:
                # sessions recover concurrently (their commits share group commits); one
                # broken session must not block the rest
                gate = asyncio.Semaphore(16)

                async def _recover(sid: str) -> None:
                    async with gate:
                        try:
                            await self._owned(sid)
                        except Exception as exc:
                            log.error("recovery of session %s failed: %s", sid, exc)

                pending = await self.store.runtimes_with_pending_inputs()
                await asyncio.gather(*(_recover(sid) for sid in pending))
            self._maintainer = loop.create_task(self._maintain(), name="meerkat-runtime-maintainer")

    async def close(self, grace: float | None = None) -> None:
        """S19: stop accepting, give active runs ``grace`` seconds (default from config),
        then stop them, flush commits, release leases; in-process waiters resolve
        ``terminated``."""
        if self._closed:
            return
        self._closed = True
        self._draining = True
        background = [t for t in (self._maintainer, self._listener, *self._tasks) if t is not None]
        for task in background:
            task.cancel()
        # gather, not suppress(CancelledError): a cancellation of close()'s caller propagates
        await asyncio.gather(*background, return_exceptions=True)
        # the lease keeper runs on while active runs finish their grace period: a drain
        # longer than the lease must not let another process take the sessions mid-run
        await asyncio.gather(*(rt.close(grace) for rt in self._runtimes.values()))
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        if self._started:

            async def _release(sid: str, rt: SessionRuntime) -> None:
                with contextlib.suppress(Exception):
                    await self.store.release_lease(sid, self.owner_id, rt.generation)
                    self._ownership("released", sid, rt.generation, "shutdown")

            await asyncio.gather(*(_release(sid, rt) for sid, rt in self._runtimes.items()))
        self._wake_all()
        await self.store.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeClosedError("this Runtime is closed; open a new one")

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
        provider: str | None = None,
        tools: ToolRegistry | None = None,
        deferred_prompt: str | None = None,
        comms_name: str | None = None,
        **agent: Any,
    ) -> SessionInfo:
        """Create a session and its runtime. Without ``executor`` the built-in agent runs it
        with the given settings (``agent`` takes the other ``AgentConfig`` fields:
        ``max_tokens``, ``max_turns``, ``max_total_tokens``, ``max_tool_calls``,
        ``max_duration``, ``output_schema``, ``structured_output_retries``,
        ``provider_params``, ``base_url``); invalid settings raise ``InvalidOperationError``
        and create nothing. ``tools`` are added to the Runtime's tools for this session (in
        this process). With ``executor``, a later process needs ``executor_factory`` to run
        the session again. ``deferred_prompt`` is prepended to the first ``turn``'s prompt
        (the reference's deferred initial turn). ``comms_name`` makes the session a comms peer
        (``^[A-Za-z0-9_.-]{1,64}$``, unique among the store's non-archived sessions; else
        ``InvalidArgumentError``)."""
        self._check_open()
        await self.start()
        if comms_name is not None:
            validate_comms_name(comms_name)
        sid = session_id or str(InputId.new())
        if sid in self._sessions or await self.store.load_session(sid) is not None:
            raise InvalidOperationError(f"session {sid!r} already exists")
        if comms_name is not None:
            for other in await self.store.list_sessions():
                if other.config.get("comms_name") == comms_name:
                    raise _name_taken(comms_name, other.session_id)
        unknown = sorted(set(agent) - set(AGENT_KEYS))
        if unknown:
            raise InvalidArgumentError(
                f"unknown session setting(s) {', '.join(unknown)}; accepted: "
                + ", ".join(AGENT_KEYS)
            )
        now = utcnow()
        config: dict[str, Any] = {"model": model, "custom_executor": executor is not None}
        for key, value in (
            ("system_prompt", system_prompt),
            ("offline_script", offline_script),
            ("provider", provider),
            ("deferred_prompt", deferred_prompt),
            ("comms_name", comms_name),
            *agent.items(),
        ):
            if value is not None:
                config[key] = value
        record = SessionRecord(sid, now, now, config, dict(labels or {}))
        if tools is not None:
            self._session_tools[sid] = tools
        try:
            if executor is None:
                executor = self._build_agent(record)
        except InvalidArgumentError:
            self._session_tools.pop(sid, None)
            raise
        try:
            await self.store.save_session(record)
        except CommsNameTakenError as exc:  # another process took the name meanwhile
            self._session_tools.pop(sid, None)
            raise _name_taken(exc.name, None) from None
        self._executors[sid] = executor
        info = SessionInfo.from_record(record)
        self._sessions[sid] = info
        await self._owned(sid)
        return info

    def _build_agent(self, record: SessionRecord) -> CoreExecutor:
        from .core.agent import AgentExecutor

        try:
            agent_config = agent_config_from(record.config)
        except (ValueError, TypeError) as exc:
            raise InvalidArgumentError(f"cannot create the session: {exc}") from None
        tools = self.tools
        if record.config.get("comms_name"):
            if self._comms_tools is None:
                self._comms_tools = comms_tools(self)
            tools = tools.merged(self._comms_tools)
        extra = self._session_tools.get(record.session_id)
        if extra is not None:
            tools = self.tools.merged(extra)
        return AgentExecutor(agent_config, session_id=record.session_id, tools=tools)

    def _executor_for(self, record: SessionRecord) -> CoreExecutor:
        sid = record.session_id
        if sid in self._executors:
            return self._executors[sid]
        if self.executor_factory is not None:
            made = self.executor_factory(record)
            if made is not None:
                return made
        if record.config.get("custom_executor"):
            raise InvalidOperationError(
                f"session {sid} runs an application executor; pass executor_factory to "
                "Runtime.open so this process can run it"
            )
        return self._build_agent(record)

    async def get_session(self, session_id: str) -> SessionInfo:
        await self.start()
        info = self._sessions.get(session_id)
        if info is not None:
            return info
        rec = await self.store.load_session(session_id)
        if rec is None:
            raise SessionNotFoundError(session_id)
        info = SessionInfo.from_record(rec)
        self._sessions[session_id] = info
        return info

    async def list_sessions(
        self,
        *,
        include_archived: bool = False,
        labels: dict[str, str] | None = None,
        offset: int = 0,
        limit: int | None = None,
    ) -> list[SessionInfo]:
        """Sessions in creation order; with ``labels``, only those carrying every given
        label with the given value."""
        await self.start()
        recs = await self.store.list_sessions(include_archived=include_archived)
        if labels:
            recs = [r for r in recs if all(r.labels.get(k) == v for k, v in labels.items())]
        recs = recs[max(offset, 0) :]
        if limit is not None:
            recs = recs[: max(limit, 0)]
        return [SessionInfo.from_record(r) for r in recs]

    # ------------------------------------------------------------------ the session service

    async def turn(
        self,
        session_id: str,
        prompt: str,
        *,
        turn_metadata: RuntimeTurnMetadata | None = None,
        idempotency_key: str | None = None,
        run_here: bool = True,
    ) -> CompletionHandle:
        """Accept a prompt for the session's next turn; ``handle.wait()`` gives its outcome
        (``completed{result}`` carries the run result). A session's deferred prompt is
        prepended to its first turn (``"{deferred}\n\n{prompt}"``) and then cleared.

        ``run_here=False`` only writes the prompt to the session's durable inbox (S10), as a
        process that does not own the session does: this process takes no lease and starts
        no run; whichever process runs the session next takes the prompt in."""
        record = await self._record(session_id)
        if record.archived:
            raise InvalidOperationError(f"session {session_id} is archived; it takes no turns")
        deferred = record.config.get("deferred_prompt")
        applied = record.config.get("deferred_applied")
        if (
            deferred is None
            and isinstance(applied, dict)
            and idempotency_key is not None
            and applied.get("key") == idempotency_key
        ):
            # a retry of the first turn: the same content as the first attempt (S11)
            deferred = applied.get("text")
            applied = "retry"
        text = f"{deferred}\n\n{prompt}" if deferred else prompt
        header: dict[str, Any] = {}
        if idempotency_key is not None:
            header["idempotency_key"] = idempotency_key
        prompt_input = PromptInput.new(text, turn_metadata, **header)
        if run_here:
            handle = await self.accept_with_completion(session_id, prompt_input)
        else:
            outcome = await self._accept_remote(session_id, prompt_input, None)
            handle = CompletionHandle(outcome, None)
            if not isinstance(outcome, Rejected):
                target = (
                    outcome.existing_id if isinstance(outcome, Deduplicated) else outcome.input_id
                )
                handle = CompletionHandle(
                    outcome, None, lambda timeout: self.wait(session_id, target, timeout)
                )
        if deferred and applied != "retry" and not isinstance(handle.outcome, Rejected):
            record.config.pop("deferred_prompt", None)
            if idempotency_key is not None:
                record.config["deferred_applied"] = {"key": idempotency_key, "text": deferred}
            record.updated_at = utcnow()
            await self.store.save_session(record)
        return handle

    async def interrupt(self, session_id: str) -> bool:
        """Cancel the session's active run (S8); False when no run was active."""
        return await self.cancel(session_id, "interrupted")

    async def _record(self, session_id: str) -> SessionRecord:
        await self.start()
        record = await self.store.load_session(session_id)
        if record is None:
            raise SessionNotFoundError(session_id)
        return record

    async def _messages(self, session_id: str) -> tuple[list[Message], SessionRuntime | None]:
        rt = await self._owned(session_id)
        if rt is not None:
            return rt.conversation.messages(), rt
        return [r.message for r in await self.store.load_conversation(session_id)], None

    async def read_session(self, session_id: str) -> SessionView:
        """The session as it stands: settings, labels, message count, usage totals (from the
        committed conversation), whether a run is active."""
        record = await self._record(session_id)
        if record.archived:
            messages = [r.message for r in await self.store.load_conversation(session_id)]
            rt = None
        else:
            messages, rt = await self._messages(session_id)
        last = next((m.created_at for m in reversed(messages) if m.created_at), None)
        return SessionView.build(
            record,
            messages,
            is_active=rt is not None and rt.active_run_id is not None,
            state=rt.state.value if rt is not None else None,
            updated_at=last,
        )

    async def history(
        self, session_id: str, *, offset: int = 0, limit: int | None = None
    ) -> HistoryPage:
        """A page of the session's committed conversation, oldest first."""
        await self._record(session_id)
        messages = [r.message for r in await self.store.load_conversation(session_id)]
        rt = self._runtimes.get(session_id)
        if rt is not None and len(rt.conversation) > len(messages):
            messages = rt.conversation.messages()
        try:
            return HistoryPage.slice(session_id, messages, offset, limit)
        except ValueError as exc:
            raise InvalidArgumentError(str(exc)) from None

    async def archive_session(self, session_id: str) -> dict[str, int]:
        """Retire the session without replacement (its pending inputs end ``{retired}``,
        S9), then mark it archived: it leaves listings and takes no more turns. Its
        conversation stays readable."""
        record = await self._record(session_id)
        counts: dict[str, int] = {}
        if not record.archived:
            rt = await self._owned(session_id)
            if rt is not None and rt.state not in (RuntimeState.RETIRED, RuntimeState.DESTROYED):
                counts = await rt.retire(False)
            elif rt is None and await self._pending_in_store(session_id):
                # its pending inputs must end {retired} first, which only its owner can do
                raise InvalidOperationError(
                    f"{self.not_owned_message(session_id)} (archiving retires its pending inputs)"
                )
            record.archived = True
            record.updated_at = utcnow()
            await self.store.save_session(record)
            info = self._sessions.get(session_id)
            if info is not None:
                info.archived = True
        return counts

    async def _pending_in_store(self, session_id: str) -> bool:
        """Whether the store holds pending inputs or inbox entries of the session."""
        if await self.store.load_input_states(session_id, include_terminal=False, limit=1):
            return True
        return bool(await self.store.inbox_entries(session_id, limit=1))

    def sessions(self) -> list[SessionInfo]:
        """Sessions this process has touched (see ``list_sessions`` for the store's)."""
        return list(self._sessions.values())

    def session(self, session_id: str) -> SessionInfo:
        info = self._sessions.get(session_id)
        if info is None:
            raise SessionNotFoundError(session_id)
        return info

    def owned_sessions(self) -> list[str]:
        """Ids of the sessions this process runs now (holds the lease of)."""
        return list(self._runtimes)

    def runtime(self, session_id: str) -> SessionRuntime:
        """The session's runtime if this process owns it (loaded); see ``_owned``."""
        rt = self._runtimes.get(session_id)
        if rt is None:
            raise SessionNotFoundError(session_id)
        return rt

    async def load(self, session_id: str) -> SessionRuntime | None:
        """This process's runtime for the session, taking its lease and recovering it on
        first use (S7, S10); ``None`` while another live process owns it. Raises
        ``SessionNotFoundError`` for an unknown session."""
        return await self._owned(session_id)

    async def _owned(self, session_id: str) -> SessionRuntime | None:
        """This process's runtime for the session, taking the lease and recovering it from
        the store on first use (S7, S10); None while another live process owns it, and
        always None for a Runtime that does not own sessions."""
        if not self.owns_sessions:
            return None
        rt = self._runtimes.get(session_id)
        if rt is not None and rt.failure is None:
            return rt  # a stopped instance stays stopped until the next Runtime opens (S8)
        lock = self._load_locks.setdefault(session_id, asyncio.Lock())
        async with lock:
            rt = self._runtimes.get(session_id)
            if rt is not None and rt.failure is None:
                return rt
            self._check_open()
            await self.start()
            record = await self.store.load_session(session_id)
            if record is None:
                raise SessionNotFoundError(session_id)
            self._sessions.setdefault(session_id, SessionInfo.from_record(record))
            if self._at_capacity() or self._draining:
                return None  # its inbox takes the input; another process runs it
            executor = self._executor_for(record)
            sent = time.monotonic()
            self._acquiring.add(session_id)
            try:
                generation = await self.store.acquire_lease(
                    session_id, self.owner_id, self.lease_ttl
                )
                if generation is None:
                    return None
                self._lease_sent[session_id] = sent
                return await self._take(session_id, record, executor, generation)
            finally:
                self._acquiring.discard(session_id)

    async def _take(
        self, session_id: str, record: SessionRecord, executor: CoreExecutor, generation: int
    ) -> SessionRuntime:
        """Recover the session under its new lease (S7) and make it this process's."""
        rt = SessionRuntime(
            session_id,
            self.store,
            executor,
            policy=self.policy,
            config=self.config,
            rebuilders=self.rebuilders,
        )
        rt.generation = generation
        rt.peer_correlation = bool(record.config.get("comms_name"))  # S20 checks
        loaded = await self.store.load_runtime(session_id)
        loaded.generation = generation
        self._runtimes[session_id] = rt
        self._acquiring.discard(session_id)
        self._ownership("acquired", session_id, generation, "")
        self.recovery_reports[session_id] = await rt.recover(loaded)
        await self._ingest(rt)
        return rt

    async def _ingest(self, rt: SessionRuntime) -> None:
        """Admit the inbox entries other processes wrote (S10), one pass at a time per
        runtime: two concurrent passes (the maintainer's and a waiter's, say, while the runtime
        recovers and ``accept`` waits) would both read an entry, and the second admission,
        refused as a duplicate id, would abandon the input the first one admitted."""
        lock = self._ingest_locks.setdefault(rt.runtime_id, asyncio.Lock())
        async with lock:
            self._ingest_queued.discard(rt.runtime_id)  # see _ingest_soon
            entries = await self.store.inbox_entries(rt.runtime_id)
            if len(entries) > 1 and rt.ingests_concurrently:
                # admitted in seq order all the same, their commits grouped (one round of
                # durability for a backlog instead of one per entry)
                await asyncio.gather(*(rt.ingest(entry) for entry in entries))
                return
            for entry in entries:
                await rt.ingest(entry)

    async def _maintain(self) -> None:
        """Ingest inbox entries other processes wrote (on a change of the store's change
        token: every ``poll_interval``, or every ``slow_poll`` when the store notifies and
        this is only the backstop), adopt orphaned sessions, drop instances that stopped on a
        store failure (their next use recovers from the store), prune (S18)."""
        check_every = self.slow_poll if self._notifying else self.poll_interval
        adopt_every = self.lease_ttl / 4 if self._notifying else self.lease_ttl / 2
        last_check = last_prune = last_adopt = time.monotonic()
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                now = time.monotonic()
                if self._adopts() and now - last_adopt >= adopt_every:
                    last_adopt = now
                    await self._adopt_orphans()
                for sid, rt in list(self._runtimes.items()):
                    if rt.failure is not None:
                        # stopped on a store failure: its next use recovers from the store
                        self._runtimes.pop(sid, None)
                        self._lease_sent.pop(sid, None)
                        log.warning("stopped session %s: %s", sid, rt.failure)
                        self._ownership(
                            "lost", sid, rt.generation, f"store write failed: {rt.failure}"
                        )
                now = time.monotonic()
                if now - last_prune >= self.config.prune_interval:
                    last_prune = now
                    await self.prune()
                if now - last_check >= check_every:
                    last_check = now
                    token = await self.store.change_token()
                    if token != self._token:
                        self._token = token
                        for rt in list(self._runtimes.values()):
                            await self._ingest(rt)
                        self._wake_all()
                        if self._adopts() and not self._notifying and now - last_adopt >= 0.5:
                            # no notices (SQLite): something committed, maybe a session that
                            # needs an owner (a new inbox entry, a released lease)
                            last_adopt = now
                            await self._adopt_orphans()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("runtime maintenance failed: %s", exc)

    async def _keep_leases(self) -> None:
        """S10: renew every held lease each ``lease_ttl / 3`` (all at once: a store with
        group commit writes them in one transaction) and stop, without writing, every session
        whose lease could not be renewed in time.

        Invariant: this process runs a session only while its lease is surely valid. A lease
        renewed by a request sent at monotonic time ``t`` is valid until at least
        ``t + lease_ttl`` (the database stamps the expiry when it runs the request, which is
        later). A session not renewed by ``t + 0.75 * lease_ttl`` (store unreachable, the
        connection killed: a partition) is stopped then, a quarter of the lease before any
        other process may take it over; a renewal the store refuses (another generation owns
        the session) stops it at once. Its later writes, if any were in flight, are refused by
        the store's fencing (S10). Runs on a task of its own so that a hung store call never
        delays the deadline checks."""
        renew_every = self.lease_ttl / 3
        tick = min(self.lease_ttl / 12, max(self.poll_interval, 0.05))
        round_task: asyncio.Task[None] | None = None
        last_round = time.monotonic()
        try:
            while True:
                await asyncio.sleep(tick)
                now = time.monotonic()
                for sid, sent in list(self._lease_sent.items()):
                    if now - sent > 0.75 * self.lease_ttl and sid in self._runtimes:
                        self._lose(sid, "lease not renewed in time (store unreachable?)")
                if now - last_round >= renew_every and (round_task is None or round_task.done()):
                    last_round = now
                    round_task = asyncio.get_running_loop().create_task(self._renew_round())
        finally:
            if round_task is not None:
                round_task.cancel()

    async def _renew_round(self) -> None:
        """Renew every held lease in one store call. No timeout: a late answer still proves
        each lease valid until its send time + ``lease_ttl`` (the deadline check stops a
        session whose answer does not come in time), and a renewal the store performed must
        not be ignored."""
        held = dict(self._runtimes)
        if not held:
            return
        sent = time.monotonic()
        try:
            renewed = await self.store.renew_leases(
                self.owner_id, {sid: rt.generation for sid, rt in held.items()}, self.lease_ttl
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("renewing %d lease(s) failed: %s", len(held), exc)
            return
        for sid, rt in held.items():
            if self._runtimes.get(sid) is not rt:
                continue  # lost or replaced meanwhile
            if sid in renewed:
                self._lease_sent[sid] = max(self._lease_sent.get(sid, 0.0), sent)
            else:
                self._lose(sid, "lease lost: another process owns this session now")

    def _lose(self, session_id: str, reason: str) -> None:
        """Stop the session here (S8, nothing abandoned) because its lease is gone or may be
        gone; in-process waiters follow their inputs to the new owner through the store."""
        rt = self._runtimes.pop(session_id, None)
        self._lease_sent.pop(session_id, None)
        if rt is None:
            return
        if rt.failure is None:
            rt.failure = FencedError(f"session {session_id}: {reason}")
        # nothing this instance submits from now on may reach the store (its lease may be
        # gone): the stop below, and whatever its run still tries to commit
        self.store.abandon_generation(session_id, rt.generation)
        rt.stop(reason)
        log.warning("stopped session %s: %s", session_id, reason)
        self._ownership("lost", session_id, rt.generation, reason)

    def _ownership(self, event: str, session_id: str, generation: int, detail: str) -> None:
        if self.on_ownership is not None:
            try:
                self.on_ownership(event, session_id, generation, detail)
            except Exception as exc:  # an observer must not break ownership
                log.error("on_ownership hook failed: %s", exc)

    def _adopts(self) -> bool:
        """Whether this process takes over sessions nobody runs: processes that own sessions
        and recover on open (servers, workers), not short-lived CLI commands."""
        return self.owns_sessions and self.recover_on_open and not self._draining

    def _at_capacity(self) -> bool:
        """Held leases plus acquisitions in progress (a slot is reserved before the first
        await of an acquisition, so concurrent ones never exceed the bound)."""
        held = len(self._runtimes) + len(self._acquiring)
        return self.max_sessions is not None and held >= self.max_sessions

    async def _adopt_orphans(self) -> None:
        """Take over sessions with pending work whose owner's lease expired (the owner died)
        or was released (a drained worker), up to ``max_sessions``: without this, such a
        session would wait for something to touch it (e.g. a peer request in its inbox)."""
        sids = [s for s in await self.store.runtimes_needing_owner() if s not in self._runtimes]
        random.shuffle(sids)  # processes scanning at once do not all race for the same one
        gate = asyncio.Semaphore(8)  # a dead worker's sessions are taken over concurrently

        async def _one(sid: str) -> None:
            async with gate:
                if not self._at_capacity() and self._adopts():
                    await self._adopt(sid)

        await asyncio.gather(*(_one(sid) for sid in sids))

    async def _adopt(self, session_id: str) -> None:
        if session_id in self._adopting:
            return
        self._adopting.add(session_id)
        try:
            await self._owned(session_id)
        except SessionNotFoundError:
            pass  # an inbox for a session never created (or deleted): nothing to run
        except Exception as exc:
            log.error("taking over session %s failed: %s", session_id, exc)
        finally:
            self._adopting.discard(session_id)

    # ------------------------------------------------------------------ notifications

    async def _listen(self) -> None:
        """React to the store's notices (``NotifyingStore``): ingest inbox arrivals of owned
        sessions at once, offer sessions that need an owner to this process (the less loaded
        a process is, the sooner it tries: sessions spread over workers), and wake waiters
        and event followers of changed sessions."""
        notices = self.store.notifications()  # type: ignore[attr-defined]
        async for notice in notices:
            rid = notice.runtime_id
            if notice.topic == "change":
                self._wake(rid)
            elif notice.topic in ("inbox", "released"):
                if notice.topic == "released":
                    self._owned_elsewhere.pop(rid, None)
                rt = self._runtimes.get(rid)
                if rt is not None:
                    self._ingest_soon(rt)
                elif self._adopts() and not self._at_capacity():
                    self._spawn(self._adopt_later(rid))
            else:  # resync: something may have been missed
                self._wake_all()
                for rt in list(self._runtimes.values()):
                    self._ingest_soon(rt)
                if self._adopts():
                    self._spawn(self._adopt_orphans())

    def _ingest_soon(self, rt: SessionRuntime) -> None:
        """Schedule one ingest pass for the runtime unless one is already scheduled and has
        not read the inbox yet: a burst of inbox notices costs one read, not one per notice.
        The mark is cleared just before the pass reads, so an entry pushed after that read
        schedules a new pass (nothing is left behind)."""
        rid = rt.runtime_id
        if rid in self._ingest_queued:
            return
        self._ingest_queued.add(rid)
        self._spawn(self._ingest(rt))

    async def _adopt_later(self, session_id: str) -> None:
        """Try to take over a session whose inbox got an input, unless it has a live owner.
        A live owner's lease expiry is remembered, so a busy session owned elsewhere costs
        one read per lease period here, not one per input."""
        if self._owned_elsewhere.get(session_id, 0.0) > time.time():
            return
        load = len(self._runtimes) / (self.max_sessions or 100)
        await asyncio.sleep(random.uniform(0.0, 0.01) + 0.05 * min(load, 1.0))
        if session_id in self._runtimes or not self._adopts() or self._at_capacity():
            return
        owner, expiry, _ = await self.store.lease_owner(session_id)
        if owner is not None and expiry is not None and expiry > time.time():
            # someone runs it (its inbox notice reached that owner too)
            if len(self._owned_elsewhere) > 100_000:
                self._owned_elsewhere.clear()
            self._owned_elsewhere[session_id] = expiry
            return
        await self._adopt(session_id)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("runtime background task failed: %s", task.exception())

    def _watch(self, session_id: str) -> asyncio.Event:
        """An event set at the next change notice of the session (register it before
        reading the store, so a change between the read and the wait is not missed)."""
        ev = asyncio.Event()
        self._watchers.setdefault(session_id, set()).add(ev)
        return ev

    def _unwatch(self, session_id: str, ev: asyncio.Event) -> None:
        evs = self._watchers.get(session_id)
        if evs is not None:
            evs.discard(ev)
            if not evs:
                del self._watchers[session_id]

    def _wake(self, session_id: str) -> None:
        for ev in self._watchers.get(session_id, ()):
            ev.set()

    def _wake_all(self) -> None:
        for evs in self._watchers.values():
            for ev in evs:
                ev.set()

    async def _until_change(self, ev: asyncio.Event) -> None:
        """Sleep until ``ev`` is set or the poll period passes (``slow_poll`` when the store
        notifies: the notice normally comes first)."""
        period = self.slow_poll if self._notifying and self._listening() else self.poll_interval
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ev.wait(), period)

    def _listening(self) -> bool:
        return self._listener is not None and not self._listener.done()

    async def prune(self) -> dict[str, int]:
        """S18: delete terminal inputs, receipts, runs and idempotency keys older than the
        retention window, and events beyond the last ``event_retention`` per runtime, in
        batches. Nothing non-terminal is ever deleted. Runs every ``prune_interval``."""
        await self.start()
        cutoff = utcnow() - self.config.retention_window
        counts = await self.store.prune(older_than=cutoff, keep_events=self.config.event_retention)
        counts["peer_requests"] = await self.store.prune_peer_requests(older_than=cutoff)
        return counts

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
        handle = await self._accept(session_id, input, reconstruction_source, waiter=False)
        return handle.outcome

    async def accept_with_completion(
        self,
        session_id: str,
        input: Input | str | bytes | dict[str, Any],
        *,
        reconstruction_source: ReconstructionSource | None = None,
    ) -> CompletionHandle:
        return await self._accept(session_id, input, reconstruction_source, waiter=True)

    async def _accept(
        self,
        session_id: str,
        raw: Input | str | bytes | dict[str, Any],
        source: ReconstructionSource | None,
        *,
        waiter: bool,
    ) -> CompletionHandle:
        if self._closed:
            return CompletionHandle(
                Rejected(reason="this Runtime is shutting down", code=RejectCode.NOT_READY), None
            )
        rt = await self._owned(session_id)
        if rt is not None:
            outcome, fut = await rt.accept(
                raw, reconstruction_source=source, register_waiter=waiter
            )
            if isinstance(outcome, Rejected) or not waiter:
                return CompletionHandle(outcome, fut)
            target = outcome.existing_id if isinstance(outcome, Deduplicated) else outcome.input_id
            if fut is None:  # deduplicated onto an input this process has not loaded
                return CompletionHandle(
                    outcome, None, lambda timeout: self.wait(session_id, target, timeout)
                )
            owner = rt
            return CompletionHandle(
                outcome,
                fut,
                lambda timeout: self.wait(session_id, target, timeout),
                lambda: owner.failure is not None and not self._closed,
            )
        outcome = await self._accept_remote(session_id, raw, source)
        if isinstance(outcome, Rejected):
            return CompletionHandle(outcome, None)
        target = outcome.existing_id if isinstance(outcome, Deduplicated) else outcome.input_id
        return CompletionHandle(
            outcome, None, lambda timeout: self.wait(session_id, target, timeout)
        )

    async def _accept_remote(
        self, session_id: str, raw: Any, source: ReconstructionSource | None
    ) -> AcceptOutcome:
        """Accept through the durable inbox of a session another process owns (S10)."""
        checked = validate_input(raw, self.config.max_input_bytes, source)
        if isinstance(checked, Rejected):
            return checked
        input, source = checked
        key = input.header.idempotency_key
        now = utcnow()
        idem = (
            IdempotencyRecord(key.value, input.id, content_hash(input), now)
            if isinstance(key, IdempotencyKey)
            else None
        )
        entry = InboxEntry(
            session_id,
            input.to_json(),
            None if source is None else source.model_dump_json(),
            created_at=now,
        )
        verdict, existing = await self.store.inbox_push(entry, idem, self.config.max_pending_inputs)
        if verdict == "deduplicated" and existing is not None:
            return Deduplicated(input_id=input.id, existing_id=existing)
        if verdict == "conflict":
            return Rejected(
                reason=f"idempotency key {key} was already used by input {existing} with "
                "different content; use a new key for a different request",
                code=RejectCode.IDEMPOTENCY_CONFLICT,
            )
        if verdict == "queue_full":
            return Rejected(
                reason=f"session {session_id} already holds {self.config.max_pending_inputs} "
                "pending inputs; wait for some to finish",
                code=RejectCode.QUEUE_FULL,
            )
        kind = kind_id(input)
        et = input.event_type if isinstance(input, ExternalEventInput) else None
        policy = self.policy.resolve(kind, True, et)
        state = InputState.new_accepted(input.id, now)
        state.durability = input.header.durability
        state.idempotency_key = key
        state.policy = PolicySnapshot(version=policy.policy_version, decision=policy)
        state.persisted_input = input
        return Accepted(input_id=input.id, policy=policy, state=state)

    async def wait(
        self, session_id: str, input_id: InputId | str, timeout: float | None = None
    ) -> WaitOutcome:
        """Wait for an input's outcome, also one accepted by another process or before a
        restart; a terminal input answers at once from the store (S12)."""
        iid = input_id if isinstance(input_id, InputId) else InputId(input_id)
        return await asyncio.wait_for(self._wait(session_id, iid), timeout)

    async def _wait(self, session_id: str, iid: InputId) -> WaitOutcome:
        """Every waiter resolves: a store that cannot be reached for a while (a partition, a
        database restart) delays the answer, it does not fail the wait (``wait``'s timeout
        bounds it); the failure is logged once per outage."""
        failing = False
        while True:
            ev = self._watch(session_id)
            try:
                try:
                    found = await self._wait_once(session_id, iid)
                except StoreError as exc:
                    if self._closed or isinstance(exc, FencedError):
                        raise
                    if not failing:
                        log.warning("waiting for input %s: %s; retrying", iid, exc)
                    failing = True
                    await asyncio.sleep(max(self.poll_interval, 0.2))
                    continue
                failing = False
                if found is not None:
                    return found
                await self._until_change(ev)
            finally:
                self._unwatch(session_id, ev)

    async def _wait_once(self, session_id: str, iid: InputId) -> WaitOutcome | None:
        """One look for the input's outcome: through the owned runtime (awaited there), else
        one store read; None when the outcome is not known yet."""
        while True:
            rt = await self._owned(session_id)
            if rt is not None:
                if iid not in rt._entries:
                    await self._ingest(rt)
                if iid in rt._entries:
                    fut = rt.register_waiter(iid)
                    outcome: WaitOutcome = await asyncio.shield(fut)
                    stopped_on_fault = (
                        isinstance(outcome, TerminatedWait) and rt.failure is not None
                    )
                    if stopped_on_fault and not self._closed:
                        continue  # stopped on a store fault: follow the input (reload)
                    return outcome
            # one store read per poll: the state, then (only if missing) the inbox
            state = await self.store.load_input_state(session_id, iid)
            if state is not None:
                run = await self.store.load_run(state.last_run_id) if state.last_run_id else None
                out = outcome_of(state, run)
                if isinstance(out, InputId):
                    # coalesced: the waiter follows the aggregate (S12), also across restarts
                    followed: WaitOutcome = with_via(await self._wait(session_id, out), out, iid)
                    return followed
                if out is not None:
                    return out
            elif await self._inbox_entry(session_id, iid) is None and (
                # unknown to the owner (this process), or to a store no process owns
                rt is not None or (await self.store.lease_owner(session_id))[0] is None
            ):
                raise InputNotFoundError(str(iid), f"session {session_id}")
            return None

    async def _inbox_entry(self, session_id: str, iid: InputId) -> InboxEntry | None:
        """The inbox entry of an input acknowledged but not yet ingested by the owner."""
        needle = f'"id":"{iid}"'
        for e in await self.store.inbox_entries(session_id, limit=10_000):
            if needle in e.input_json:
                return e
        return None

    async def get_input_state(self, session_id: str, input_id: InputId | str) -> InputState:
        """The input's state: from memory if this process owns the session, else the store."""
        iid = input_id if isinstance(input_id, InputId) else InputId(input_id)
        rt = self._runtimes.get(session_id)
        if rt is not None and iid in rt._entries:
            return rt.input_state(iid)
        await self.start()
        st = await self.store.load_input_state(session_id, iid)
        if st is not None:
            return st
        e = await self._inbox_entry(session_id, iid)
        if e is None:
            raise InputNotFoundError(str(iid), f"session {session_id}")
        # acknowledged into the inbox, not yet ingested by the owner: accepted
        inbox_state = InputState.new_accepted(iid, e.created_at or utcnow())
        inbox_state.persisted_input = parse_input(e.input_json)
        inbox_state.durability = inbox_state.persisted_input.header.durability
        return inbox_state

    def input_state(self, session_id: str, input_id: InputId | str) -> InputState:
        iid = input_id if isinstance(input_id, InputId) else InputId(input_id)
        return self.runtime(session_id).input_state(iid)

    def list_inputs(self, session_id: str, *, include_terminal: bool = False) -> list[InputState]:
        rt = self.runtime(session_id)
        return [rt.input_state(i) for i in rt.input_ids(include_terminal=include_terminal)]

    async def _require(self, session_id: str) -> SessionRuntime:
        rt = await self._owned(session_id)
        if rt is None:
            raise InvalidOperationError(self.not_owned_message(session_id))
        return rt

    def not_owned_message(self, session_id: str) -> str:
        """Why an operation that needs the session's owner cannot run in this process."""
        if not self.owns_sessions:
            return (
                f"session {session_id}: this process runs no sessions (it does not own "
                "sessions, e.g. a server started with --no-own-sessions); the worker that runs "
                "it does this operation: send it to a process that owns sessions"
            )
        if self._at_capacity():
            return (
                f"session {session_id}: this process already runs its maximum of "
                f"{self.max_sessions} sessions; another worker runs (or will run) this one"
            )
        return (
            f"session {session_id} is owned by another process; run this operation there "
            "(or wait until its lease expires)"
        )

    async def cancel_input(self, session_id: str, input_id: InputId | str) -> InputState:
        iid = input_id if isinstance(input_id, InputId) else InputId(input_id)
        return await (await self._require(session_id)).cancel_input(iid)

    async def ack(self, session_id: str, input_id: InputId | str) -> InputState:
        iid = input_id if isinstance(input_id, InputId) else InputId(input_id)
        return await (await self._require(session_id)).ack(iid)

    # ------------------------------------------------------------------ peer comms

    @property
    def comms(self) -> CommsService:
        if self._comms is None:
            self._comms = CommsService(self)
        return self._comms

    async def comms_send(
        self,
        session_id: str,
        *,
        kind: str,
        to: str | None = None,
        body: str | None = None,
        intent: str | None = None,
        params: dict[str, Any] | None = None,
        in_reply_to: str | None = None,
        status: str | None = None,
        result: Any = None,
        envelope_id: str | None = None,
    ) -> dict[str, Any]:
        """Send a peer message, request or response from the session (it must have a comms
        name) to a peer of the store, as an input accepted into the peer's durable inbox
        (S10), idempotent by ``envelope_id`` (minted when left out). Receipts:
        ``{kind: "peer_message_sent", envelope_id, acked: true}``,
        ``{kind: "peer_request_sent", envelope_id, interaction_id: <request id>,
        stream_reserved: false}``, ``{kind: "peer_response_sent", envelope_id,
        in_reply_to}``. A request is recorded as outstanding before it is delivered; a
        response must answer an outstanding request (S20). Bad input raises
        ``InvalidArgumentError`` naming the field and the problem; nothing is delivered."""
        self._check_open()
        await self.start()
        return await self.comms.send(
            session_id,
            kind=kind,
            to=to,
            body=body,
            intent=intent,
            params=params,
            in_reply_to=in_reply_to,
            status=status,
            result=result,
            envelope_id=envelope_id,
        )

    async def peers(self, session_id: str) -> list[dict[str, Any]]:
        """The session's peers: the other named, non-archived sessions of the store, each
        ``{name, peer_id, address, source: "store", sendable_kinds, capabilities, meta}``."""
        self._check_open()
        await self.start()
        return await self.comms.peers(session_id)

    # ------------------------------------------------------------------ runtime control

    def runtime_state(self, session_id: str) -> RuntimeState:
        return self.runtime(session_id).state

    async def cancel(self, session_id: str, reason: str = "") -> bool:
        """Cancel the session's active run (S8). False when there was nothing to cancel."""
        return (await self._require(session_id)).cancel_current_run(reason)

    async def retire(self, session_id: str, *, replacement_planned: bool = False) -> dict[str, int]:
        return await (await self._require(session_id)).retire(replacement_planned)

    async def respawn(self, session_id: str) -> dict[str, int]:
        return await (await self._require(session_id)).respawn()

    async def reset(self, session_id: str) -> dict[str, int]:
        return await (await self._require(session_id)).reset()

    async def destroy(self, session_id: str) -> dict[str, int]:
        return await (await self._require(session_id)).destroy()

    def stop(self, session_id: str, reason: str = "runtime stopped") -> None:
        self.runtime(session_id).stop(reason)

    # ------------------------------------------------------------------ events

    async def last_event_seq(self, session_id: str) -> int:
        """The session's last event ``seq`` (follow ``events`` after it to see only what
        happens from now on)."""
        rt = await self._owned(session_id)
        if rt is not None:
            return rt.last_seq
        return await self.store.last_event_seq(session_id)

    async def events(
        self, session_id: str, after_seq: int = 0, *, follow: bool = False
    ) -> AsyncIterator[RuntimeEventEnvelope]:
        """The session's runtime events with ``seq > after_seq``, in order; with ``follow``,
        keeps waiting for new ones. Older events come from the store; a resume past what is
        kept yields one ``events_gap`` first (S15)."""
        rt = await self._owned(session_id)
        seq = after_seq
        if rt is None or _needs_store(rt, seq):
            # read what the in-memory ring no longer holds from the store
            first = await self.store.first_event_seq(session_id)
            if first is not None and seq + 1 < first:
                yield _gap(session_id, seq + 1, first - 1)
                seq = first - 1
            while True:
                batch = await self.store.load_events(session_id, seq, 1000)
                if rt is not None:
                    ring_first = rt.events_after(0)[1][:1]
                    if ring_first and batch and batch[-1].seq >= ring_first[0].seq - 1:
                        for e in batch:
                            if e.seq < ring_first[0].seq:
                                yield e
                                seq = e.seq
                        break
                if not batch:
                    break
                for e in batch:
                    yield e
                    seq = e.seq
            if rt is None:
                if not follow:
                    return
                while True:
                    ev = self._watch(session_id)
                    try:
                        batch = await self.store.load_events(session_id, seq, 1000)
                        if not batch:
                            await self._until_change(ev)
                    finally:
                        self._unwatch(session_id, ev)
                    for e in batch:
                        yield e
                        seq = e.seq
        assert rt is not None
        while True:
            signal = rt.event_signal()
            gap_from, evs = rt.events_after(seq)
            if gap_from is not None:
                to = evs[0].seq - 1 if evs else rt.last_seq
                yield _gap(session_id, gap_from, to)
                seq = to
            for e in evs:
                yield e
                seq = e.seq
            if evs:
                continue
            if not follow:
                return
            await signal.wait()


def _name_taken(name: str, holder: str | None) -> InvalidArgumentError:
    by = f" by session {holder}" if holder else ""
    return InvalidArgumentError(
        f"comms_name: {name!r} is already taken{by}; names are unique among the store's "
        "sessions (archive that session to free it)"
    )


def _needs_store(rt: SessionRuntime, after_seq: int) -> bool:
    """Whether events after ``after_seq`` must be read from the store: the in-memory ring no
    longer holds the next one (pruned from it), or holds nothing at all while earlier events
    exist (a recovered runtime starts with an empty ring; what came before is in the store)."""
    gap, evs = rt.events_after(after_seq)
    return gap is not None or (not evs and after_seq < rt.last_seq)


def _gap(session_id: str, start: int, end: int) -> RuntimeEventEnvelope:
    return RuntimeEventEnvelope.make(
        0, utcnow(), session_id, "stream", {"code": "events_gap", "from": start, "to": end}
    )
