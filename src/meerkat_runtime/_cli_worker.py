"""``meerkat worker``: a process that runs sessions of a shared store until it is told to stop.

A worker holds at most ``--max-sessions`` session leases (S10). It takes over sessions that
need an owner (new inbox input for a session nobody runs, a dead worker's expired lease, a
drained worker's released lease), renews its leases, and stops a session at once if a lease
cannot be renewed in time. SIGTERM or Ctrl-C drains it: it takes nothing more, gives active
runs ``--grace`` seconds, stops what is left (nothing is abandoned: the next owner recovers it,
S8), releases its leases (other workers take those sessions over at once) and exits 0.

Progress goes to stderr, one line per change of ownership plus a status line every
``--status-every`` seconds; with ``--json``, the same as JSON lines on stdout
(``{"event": "started" | "acquired" | "lost" | "released" | "status" | "stopped", ...}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import signal
import sys
import time
from typing import Annotated, Any

import typer

from ._cli_common import (
    EXIT_OK,
    EXIT_USAGE,
    StoreOpt,
    err,
    execute,
    fail,
    require_shared_store,
)
from .core.tools import ToolRegistry
from .host import ExecutorFactory, Runtime
from .store import redact_url

__all__ = ["worker"]


def _load_object(spec: str, option: str) -> Any:
    """``module:attribute`` (``module.sub:attr.inner`` works) imported; a usage error that
    says what was wrong otherwise."""
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise fail(
            f"{option}: expected MODULE:ATTRIBUTE (e.g. myapp.tools:registry), got {spec!r}",
            EXIT_USAGE,
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise fail(f"{option}: cannot import module {module_name!r}: {exc}", EXIT_USAGE) from None
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise fail(
                f"{option}: module {module_name!r} has no attribute {attr_path!r}", EXIT_USAGE
            ) from None
    return obj


def _tools_from(spec: str) -> ToolRegistry:
    obj = _load_object(spec, "--tools")
    if callable(obj) and not isinstance(obj, ToolRegistry):
        obj = obj()
    if not isinstance(obj, ToolRegistry):
        raise fail(
            f"--tools: {spec} is a {type(obj).__name__}; expected a ToolRegistry (or a function "
            "returning one)",
            EXIT_USAGE,
        )
    return obj


def _factory_from(spec: str) -> ExecutorFactory:
    obj = _load_object(spec, "--executor-factory")
    if not callable(obj):
        raise fail(
            f"--executor-factory: {spec} is a {type(obj).__name__}; expected a function "
            "taking a SessionRecord and returning a CoreExecutor (or None for the built-in agent)",
            EXIT_USAGE,
        )
    factory: ExecutorFactory = obj
    return factory


class _Reporter:
    """Ownership changes and status as lines on stderr, or JSON lines on stdout."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def emit(self, event: str, text: str, **fields: Any) -> None:
        if self.as_json:
            doc = {"event": event, "at": round(time.time(), 3), **fields}
            sys.stdout.write(json.dumps(doc) + "\n")
            sys.stdout.flush()
        else:
            err.print(text, highlight=False, markup=False)

    def ownership(self, event: str, session_id: str, generation: int, detail: str) -> None:
        words = {"acquired": "took", "lost": "lost", "released": "released"}[event]
        tail = f": {detail}" if detail else ""
        self.emit(
            event,
            f"{words} session {session_id} (generation {generation}){tail}",
            session_id=session_id,
            generation=generation,
            detail=detail,
        )


async def _run_worker(
    store: str | None,
    *,
    max_sessions: int | None,
    lease_ttl: float,
    grace: float,
    status_every: float,
    tools: ToolRegistry | None,
    factory: ExecutorFactory | None,
    owner_id: str | None,
    reporter: _Reporter,
) -> int:
    rt = Runtime.open(
        store,
        lease_ttl=lease_ttl,
        tools=tools,
        executor_factory=factory,
        max_sessions=max_sessions,
        on_ownership=reporter.ownership,
        owner_id=owner_id or None,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def _signalled() -> None:
        # a second signal (a supervisor signalling the whole process group, a second
        # Ctrl-C) must not kill the drain half-way: say what is going on instead
        if stop.is_set():
            reporter.emit(
                "draining",
                f"already draining (active runs get up to {grace:g} s); SIGKILL stops at once,"
                " and the sessions' next owners recover them",
                grace=grace,
            )
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _signalled)
    try:
        await rt.start()
        bound = "unbounded" if max_sessions is None else f"at most {max_sessions} sessions"
        reporter.emit(
            "started",
            f"worker {rt.owner_id} on {redact_url(rt.store.url)}: {bound}, lease {lease_ttl:g} s;"
            " SIGTERM or Ctrl-C drains it",
            owner_id=rt.owner_id,
            store=redact_url(rt.store.url),
            max_sessions=max_sessions,
            lease_ttl=lease_ttl,
        )
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), status_every)
            owned = rt.owned_sessions()
            running = sum(1 for s in owned if rt.runtime(s).active_run_id is not None)
            if not stop.is_set():
                reporter.emit(
                    "status",
                    f"owning {len(owned)} sessions, {running} running",
                    sessions=len(owned),
                    running=running,
                    # transactions this process made durable (PostgreSQL and SQLite stores)
                    transactions=getattr(rt.store, "transactions", None),
                )
        reporter.emit(
            "draining",
            f"draining: active runs get {grace:g} s, then leases are released",
            grace=grace,
        )
    finally:
        try:
            await rt.close(grace=grace)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    reporter.emit("stopped", "worker stopped", owner_id=rt.owner_id)
    return EXIT_OK


def worker(
    store: StoreOpt = None,
    max_sessions: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Most sessions this worker runs at once (leases it holds); default: no bound.",
            show_default=False,
        ),
    ] = None,
    lease_ttl: Annotated[
        float,
        typer.Option(
            min=0.5,
            help="Lease time in seconds: a dead worker's sessions move to another after at "
            "most this long (renewed every third of it).",
        ),
    ] = 10.0,
    grace: Annotated[
        float,
        typer.Option(min=0.0, help="Seconds active runs get to finish when the worker drains."),
    ] = 30.0,
    status_every: Annotated[
        float, typer.Option(min=0.1, help="Seconds between status lines.")
    ] = 30.0,
    tools: Annotated[
        str | None,
        typer.Option(
            metavar="MODULE:ATTR",
            help="Tools for the built-in agent: a ToolRegistry (or a function returning one), "
            "e.g. myapp.tools:registry.",
            show_default=False,
        ),
    ] = None,
    executor_factory: Annotated[
        str | None,
        typer.Option(
            metavar="MODULE:ATTR",
            help="Function (SessionRecord) -> CoreExecutor | None for sessions that run an "
            "application executor.",
            show_default=False,
        ),
    ] = None,
    owner_id: Annotated[
        str | None,
        typer.Option(
            help="This worker's lease owner id; default: host:pid:object.", show_default=False
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Progress as JSON lines on stdout.")
    ] = False,
) -> None:
    """Run sessions of a shared store (PostgreSQL, or SQLite on one machine) until SIGTERM.

    Takes over sessions that need an owner, up to --max-sessions; SIGTERM or Ctrl-C drains:
    active runs get --grace seconds, leases are released, other workers take over."""
    require_shared_store(store, "a worker", "no other process could share its sessions")
    registry = _tools_from(tools) if tools else None
    factory = _factory_from(executor_factory) if executor_factory else None
    execute(
        _run_worker(
            store,
            max_sessions=max_sessions,
            lease_ttl=lease_ttl,
            grace=grace,
            status_every=status_every,
            tools=registry,
            factory=factory,
            owner_id=owner_id,
            reporter=_Reporter(as_json),
        ),
        as_json=as_json,
    )
