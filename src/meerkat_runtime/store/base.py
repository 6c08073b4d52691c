"""The store protocol and the transaction the runtime hands to it.

One database holds both the runtime's state (input states, receipts, runs, runtime state,
leases, the inbox, events, the idempotency index) and the sessions' conversations, so that one
transaction spans both (S6).

A ``Txn`` is everything one runtime change writes: changed input states, conversation rows,
receipts, run records, the runtime state and the events that report the change (S15).
``RuntimeStore.submit`` takes transactions in order; the returned awaitable completes once the
transaction is durable. Invariants every store keeps:

- Atomicity: a transaction is applied whole or not at all. A store may batch several
  transactions into one database transaction (group commit), each in its own savepoint, so one
  transaction's failure fails only that transaction's awaitable.
- Order: commit order equals submission order; a transaction never becomes durable before an
  earlier one of the same runtime.
- Fencing (S10): a transaction whose ``generation`` differs from the runtime's stored
  generation is refused with ``FencedError`` and writes nothing.
- Poisoning: once a transaction of (runtime, generation) fails, every later-submitted
  transaction of that pair is refused (``FencedError``) until the runtime recovers under a
  new generation, so a failed instance can never persist state that ran ahead of the store.
- Append-only conversations: rows are inserted, never updated; only ``conversation_reset``
  deletes them (a runtime reset, S9).
- Peer correlation (S20): a requester's outstanding peer requests are rows keyed
  (requester runtime id, request id), written durably by ``open_peer_request`` *before* the
  request is delivered; a ``Txn``'s ``peer_request_closes`` close them in the transaction that
  accepts the terminal response (a close of a request that is missing or already closed
  changes nothing). Comms names are unique among non-archived sessions: ``save_session``
  refuses a second one with ``CommsNameTakenError`` and writes nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from .._ids import InputId, RunId
from ..core.lifecycle import RunBoundaryReceipt, RunResult
from ..core.session import ConversationRow
from ..runtime.events import RuntimeEventEnvelope
from ..runtime.input_state import InputState
from ..runtime.state import RuntimeState

__all__ = [
    "CommsNameTakenError",
    "FencedError",
    "IdempotencyRecord",
    "InboxEntry",
    "LoadedRuntime",
    "NotifyingStore",
    "PeerRequestClose",
    "PeerRequestRecord",
    "RunRecord",
    "RuntimeStore",
    "SessionRecord",
    "StoreError",
    "StoreNotice",
    "Txn",
]


class StoreError(RuntimeError):
    """A store could not do what was asked; the message names the store (file) and the
    problem, e.g. ``store /x/state.db: database disk image is malformed``."""


class FencedError(StoreError):
    """The writer's generation is stale: another instance owns the runtime now (S10)."""


class CommsNameTakenError(StoreError):
    """``save_session`` of a non-archived session whose ``config["comms_name"]`` another
    non-archived session of the store already has (names are unique, checked in the store)."""

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name


@dataclass(slots=True)
class RunRecord:
    """How a run ended: ``running`` until it ends, then completed / failed / cancelled."""

    run_id: RunId
    runtime_id: str
    status: str = "running"
    result: RunResult | None = None
    error: str | None = None
    is_continuation: bool = False


@dataclass(slots=True, frozen=True)
class IdempotencyRecord:
    """One claimed idempotency key (S11): unique per (runtime, key) in the store."""

    key: str
    input_id: InputId
    content_hash: str
    accepted_at: datetime


@dataclass(slots=True)
class SessionRecord:
    """A session's durable description. ``config`` is opaque JSON owned by the host
    (model, system prompt, offline script, ...); ``archived`` hides it from listings."""

    session_id: str
    created_at: datetime
    updated_at: datetime
    config: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    archived: bool = False


@dataclass(slots=True)
class InboxEntry:
    """An input accepted by a process that does not own the runtime (S10). The owner ingests
    inbox entries in ``seq`` order and deletes each in the transaction that ingests it."""

    runtime_id: str
    input_json: str
    reconstruction_json: str | None = None
    seq: int = 0  # assigned by the store on push
    created_at: datetime | None = None


@dataclass(slots=True)
class PeerRequestRecord:
    """A peer request its requester sent (S20), keyed (``requester_runtime_id``,
    ``request_id``); ``envelope_id`` is unique per requester (a retried send finds its
    request again). Outstanding while ``closed_at`` is None; a terminal response closes it
    with its ``status`` (completed / failed / cancelled) and ``closed_by`` (the closing
    input's idempotency key, the response's envelope id, else its input id)."""

    requester_runtime_id: str
    request_id: str
    responder_runtime_id: str
    envelope_id: str
    created_at: datetime
    requester_name: str = ""
    responder_name: str = ""
    intent: str = ""
    status: str | None = None
    closed_at: datetime | None = None
    closed_by: str | None = None

    @property
    def outstanding(self) -> bool:
        return self.closed_at is None


@dataclass(slots=True, frozen=True)
class PeerRequestClose:
    """A ``Txn``'s close of one of its runtime's outstanding requests (S20)."""

    request_id: str
    status: str
    closed_at: datetime
    closed_by: str | None = None


@dataclass(slots=True, frozen=True)
class StoreNotice:
    """A hint from a store that notifies (``NotifyingStore``): ``inbox`` (an input reached
    ``runtime_id``'s inbox: its owner takes it in; with none, it needs one), ``released``
    (its lease was released: it may need an owner), ``change`` (a
    transaction of ``runtime_id`` committed) or ``resync`` (notices may have been missed:
    re-read everything; ``runtime_id`` is empty)."""

    topic: str
    runtime_id: str


@dataclass(slots=True)
class LoadedRuntime:
    """What recovery needs of one runtime (S7), read in one go.

    ``inputs`` are the non-terminal input states in queue order (``queue_order`` ascending,
    then input id); ``receipted`` holds every (run_id, input_id) pair that a stored receipt
    lists, for the staged inputs' last runs; ``runs`` the records of the runs those inputs
    name; ``sources`` the stored states of inputs named by coalescing reconstruction sources.
    """

    runtime_id: str
    state: RuntimeState | None = None
    generation: int = 0
    inputs: list[InputState] = field(default_factory=list)
    queue_orders: dict[InputId, int] = field(default_factory=dict)
    idempotency: list[IdempotencyRecord] = field(default_factory=list)
    conversation: list[ConversationRow] = field(default_factory=list)
    receipted: set[tuple[RunId, InputId]] = field(default_factory=set)
    runs: dict[RunId, RunRecord] = field(default_factory=dict)
    sources: dict[InputId, InputState] = field(default_factory=dict)
    last_seq: int = 0
    recovery_count: int = 0


@dataclass(slots=True)
class Txn:
    runtime_id: str
    generation: int
    durable: bool = False
    states: dict[InputId, InputState] = field(default_factory=dict)
    # queue position of queued inputs (ascending = earlier); None for inputs not queued
    queue_orders: dict[InputId, int | None] = field(default_factory=dict)
    idempotency: list[IdempotencyRecord] = field(default_factory=list)
    rows: list[ConversationRow] = field(default_factory=list)
    conversation_reset: bool = False
    receipts: list[RunBoundaryReceipt] = field(default_factory=list)
    runs: list[RunRecord] = field(default_factory=list)
    runtime_state: RuntimeState | None = None
    # respawn (S9): after the fencing check, the runtime's stored generation becomes this
    next_generation: int | None = None
    recovered: bool = False  # bump the runtime's recovery_count (S7 step 5)
    inbox_done: list[int] = field(default_factory=list)  # inbox seqs ingested by this txn
    # S20: outstanding requests of this runtime (the requester) closed by this txn
    peer_request_closes: list[PeerRequestClose] = field(default_factory=list)
    events: list[RuntimeEventEnvelope] = field(default_factory=list)
    after_commit: list[Callable[[], Any]] = field(default_factory=list)

    def touch(self, state: InputState) -> None:
        self.states[state.input_id] = state

    @property
    def empty(self) -> bool:
        return not (
            self.states
            or self.rows
            or self.conversation_reset
            or self.receipts
            or self.runs
            or self.runtime_state is not None
            or self.events
            or self.idempotency
            or self.inbox_done
            or self.recovered
            or self.peer_request_closes
        )


class RuntimeStore(Protocol):
    """Everything the runtime asks of a store. Implementations: memory, SQLite and
    PostgreSQL (``postgresql://user@host/dbname``); ``open_store(url)`` picks one."""

    url: str

    async def open(self) -> None:
        """Create or migrate the schema. A store that cannot be read (corrupt file, schema too
        new, permission denied) raises ``StoreError`` naming the file and the problem."""
        ...

    async def close(self) -> None:
        """Flush every submitted transaction, then release connections and threads."""
        ...

    def submit(self, txn: Txn) -> Awaitable[None]:
        """Queue ``txn`` for commit; await the result for durability. Called synchronously on
        the event loop thread; must not block. Failures surface through the awaitable
        (``FencedError`` for a stale generation, ``StoreError`` otherwise)."""
        ...

    # sessions --------------------------------------------------------------------------

    async def save_session(self, record: SessionRecord) -> None:
        """Insert or replace a session record (durable before returning)."""
        ...

    async def load_session(self, session_id: str) -> SessionRecord | None: ...

    async def list_sessions(self, *, include_archived: bool = False) -> list[SessionRecord]:
        """Sessions ordered by creation time."""
        ...

    # recovery and reads ----------------------------------------------------------------

    async def runtimes_with_pending_inputs(self) -> list[str]:
        """Ids of runtimes holding non-terminal inputs or inbox entries (one indexed query)."""
        ...

    async def runtimes_needing_owner(self, limit: int = 1000) -> list[str]:
        """Runtimes with pending inputs or inbox entries whose lease is free or expired (on
        the store's clock): what a worker should take over. At most ``limit``, by id."""
        ...

    async def load_runtime(self, runtime_id: str) -> LoadedRuntime: ...

    async def load_input_state(self, runtime_id: str, input_id: InputId) -> InputState | None: ...

    async def load_input_states(
        self, runtime_id: str, *, include_terminal: bool = True, limit: int | None = None
    ) -> list[InputState]:
        """States of a runtime ordered by input id (creation order)."""
        ...

    async def load_run(self, run_id: RunId) -> RunRecord | None: ...

    async def load_conversation(self, runtime_id: str) -> list[ConversationRow]: ...

    async def load_events(
        self, runtime_id: str, after_seq: int = 0, limit: int = 1000
    ) -> list[RuntimeEventEnvelope]:
        """Stored events with ``seq > after_seq`` in seq order."""
        ...

    async def first_event_seq(self, runtime_id: str) -> int | None:
        """The oldest stored seq of the runtime (for ``events_gap``), or None if none."""
        ...

    async def last_event_seq(self, runtime_id: str) -> int:
        """The newest stored seq of the runtime (0 if none): one indexed read, whatever the
        number of stored events."""
        ...

    async def change_token(self) -> int:
        """A number that changes whenever any process committed (SQLite: data_version plus a
        local commit counter). Pollers compare it to skip reads when nothing changed."""
        ...

    # ownership (S10) -------------------------------------------------------------------

    async def acquire_lease(self, runtime_id: str, owner: str, ttl: float) -> int | None:
        """Take the runtime's lease if it is free, expired, or already ``owner``'s: bump and
        return the new generation. ``None`` while another owner holds a live lease. Creates
        the runtime row if missing (state ``idle``, generation 1)."""
        ...

    async def renew_lease(self, runtime_id: str, owner: str, generation: int, ttl: float) -> bool:
        """Extend the lease; False if it was lost (another generation took over)."""
        ...

    async def renew_leases(self, owner: str, leases: dict[str, int], ttl: float) -> set[str]:
        """Extend every lease of ``leases`` (runtime id -> generation) that ``owner`` still
        holds under that generation, in one statement; the ids renewed. Not ordered behind
        submitted transactions (a store with a busy writer renews on another connection), so
        a backlog of commits never lets a live owner's leases expire."""
        ...

    async def release_lease(self, runtime_id: str, owner: str, generation: int) -> None: ...

    def abandon_generation(self, runtime_id: str, generation: int) -> None:
        """Refuse (``FencedError``) every transaction of (runtime, generation) submitted from
        now on; those submitted before still commit in order. The owner calls it when it
        gives a session up because its lease may be gone: nothing it submits later (the stop
        of the session, say) can reach the store, even before anyone else takes over."""
        ...

    async def lease_owner(self, runtime_id: str) -> tuple[str | None, float | None, int]:
        """(owner, expiry as a UNIX time, generation) of the runtime's lease."""
        ...

    # inbox (S10) -----------------------------------------------------------------------

    async def inbox_push(
        self, entry: InboxEntry, idempotency: IdempotencyRecord | None, max_pending: int
    ) -> tuple[str, InputId | None]:
        """Durably add an entry for the owner to ingest. With an idempotency record the key is
        claimed in the same transaction through the unique index: returns
        ``("deduplicated", existing_id)`` when the key is taken with the same content hash,
        ``("conflict", existing_id)`` with another hash. Returns ``("queue_full", None)``
        when the runtime already holds ``max_pending`` non-terminal inputs plus inbox entries
        (counted in SQL), else ``("accepted", None)``."""
        ...

    async def inbox_entries(self, runtime_id: str, limit: int = 100) -> list[InboxEntry]:
        """Entries in ``seq`` order, not removed (the ingesting txn removes them)."""
        ...

    async def find_input_runtime(self, input_id: InputId) -> str | None:
        """The id of the runtime holding input ``input_id``: one whose ledger has its state,
        else one whose inbox holds it (acknowledged, not yet ingested); None if no runtime
        does. Input ids are unique across runtimes (UUIDv7), so there is at most one."""
        ...

    # peer correlation (S20) -----------------------------------------------------------

    async def open_peer_request(self, record: PeerRequestRecord) -> PeerRequestRecord:
        """Durably record an outstanding request (before it is delivered) and return it. If
        the requester already has a request with the same ``envelope_id`` (a retried send) or
        the same ``request_id``, nothing is written and the stored record is returned."""
        ...

    async def load_peer_request(
        self, requester_runtime_id: str, request_id: str
    ) -> PeerRequestRecord | None: ...

    async def find_peer_requests(self, request_id: str) -> list[PeerRequestRecord]:
        """Every stored request with this id, whoever sent it (an indexed lookup)."""
        ...

    async def list_peer_requests(
        self,
        *,
        requester_runtime_id: str | None = None,
        responder_runtime_id: str | None = None,
        outstanding_only: bool = False,
    ) -> list[PeerRequestRecord]:
        """Requests sent by / to the given runtimes (both filters apply when given), oldest
        first; with ``outstanding_only``, only those not yet closed."""
        ...

    async def discard_peer_request(self, requester_runtime_id: str, request_id: str) -> None:
        """Delete an outstanding request that was never delivered (its delivery was refused);
        a closed one is kept."""
        ...

    async def prune_peer_requests(self, *, older_than: datetime, batch: int = 1000) -> int:
        """S18: delete requests closed before ``older_than`` (outstanding ones are kept)."""
        ...

    # retention (S18) -------------------------------------------------------------------

    async def prune(
        self, *, older_than: datetime, keep_events: int, batch: int = 1000
    ) -> dict[str, int]:
        """Delete, in batches, terminal input states, receipts and runs older than
        ``older_than``, idempotency keys older than it, and events beyond the last
        ``keep_events`` per runtime. Never deletes anything non-terminal. Returns counts."""
        ...


class NotifyingStore(RuntimeStore, Protocol):
    """A store shared by several processes that pushes ``StoreNotice`` hints as other
    processes commit (PostgreSQL: LISTEN/NOTIFY). A Runtime over one reacts to them instead
    of polling, and keeps only a slow poll for notices a lost connection missed."""

    def notifications(self) -> AsyncIterator[StoreNotice]:
        """Notices until the store closes; the first one (and the first after each
        reconnection) is ``resync``."""
        ...
