"""What every ``meerkat`` command shares: consoles, exit codes, the error line, the runtime a
command opens, JSON output, option types and small formatters.

Invariants:
- stdout carries only the command's result (text, a table, or JSON); progress, notes and
  errors go to stderr. A failure prints exactly one line ``error: ...`` on stderr; with
  ``--json`` the error object (``{"error", "code", ...}``, the REST/RPC vocabulary of
  ``surfaces.common``) is also printed on stdout.
- The exit code of a failure follows from its error code alone (``exit_code_for``).
- A command's runtime recovers only the sessions the command touches, and stops them at once
  when the command ends (no grace period: a command never lingers after its answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Coroutine
from datetime import datetime
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner as RichSpinner
from rich.text import Text

from ._ids import InputId
from .errors import MeerkatRuntimeError
from .host import Runtime
from .store.base import StoreError
from .surfaces.common import SurfaceError, classify

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_REJECTED",
    "EXIT_RUN_FAILED",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "JsonOpt",
    "OwnSessionsOpt",
    "Spinner",
    "StoreOpt",
    "check_own_sessions",
    "err",
    "execute",
    "exit_code_for",
    "fail",
    "input_id",
    "labels_from",
    "open_runtime",
    "out",
    "print_json",
    "require_shared_store",
    "short",
    "spinner",
    "when",
    "write_line",
]

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_USAGE = 2
EXIT_REJECTED = 3
EXIT_NOT_FOUND = 4
EXIT_TIMEOUT = 5
EXIT_INTERRUPTED = 130

err = Console(stderr=True, highlight=False, soft_wrap=True)
# a pipe gets wide tables (ids are never folded); a terminal gets its own width
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)

StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store",
        metavar="URL",
        help="Store URL (sqlite:///path.db, a path ending in .db, "
        "postgresql://user:password@host:5432/dbname, or memory://); default: SQLite under "
        "$MEERKAT_STATE_DIR or ~/.local/share/meerkat.",
        show_default=False,
    ),
]
JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Print JSON (the shapes the REST and RPC servers answer)."),
]
OwnSessionsOpt = Annotated[
    bool,
    typer.Option(
        "--own-sessions/--no-own-sessions",
        help="Run sessions in this process (default). --no-own-sessions: take no session's "
        "lease; every turn goes to the session's durable inbox and a worker (`meerkat "
        "worker`) sharing the store runs it (see docs/cli.md).",
    ),
]


# SurfaceError codes -> exit codes (a rejection, whatever its code, exits 3)
_EXIT_CODES: dict[str, int] = {
    "bad_request": EXIT_USAGE,
    "unsupported": EXIT_USAGE,
    "unauthorized": EXIT_USAGE,
    "conflict": EXIT_USAGE,
    "too_large": EXIT_REJECTED,
    "queue_full": EXIT_REJECTED,
    "not_found": EXIT_NOT_FOUND,
    "timeout": EXIT_TIMEOUT,
    "not_ready": EXIT_RUN_FAILED,
    "cancelled": EXIT_RUN_FAILED,
    "provider_error": EXIT_RUN_FAILED,
    "budget_exhausted": EXIT_RUN_FAILED,
    "failed": EXIT_RUN_FAILED,
    "internal": EXIT_RUN_FAILED,
}


def exit_code_for(error: SurfaceError) -> int:
    if "reject_code" in error.details:
        return EXIT_REJECTED
    return _EXIT_CODES.get(error.code, EXIT_RUN_FAILED)


def fail(message: str, code: int) -> typer.Exit:
    """Print the one error line; return the ``Exit`` to raise."""
    err.print(f"[bold red]error:[/] {_one_line(message)}", highlight=False)
    return typer.Exit(code)


def check_own_sessions(store: str | None, own_sessions: bool) -> None:
    """A server that owns no session needs a store its workers share: refuse ``memory://``
    (nothing outside this process could run its sessions, so every turn would wait forever)."""
    if not own_sessions:
        require_shared_store(store, "--no-own-sessions", "no worker could run its sessions")


def require_shared_store(store: str | None, what: str, consequence: str) -> None:
    """Refuse ``memory://`` for ``what``, which needs a store other processes share."""
    if store is None:
        return
    scheme, sep, _ = store.strip().partition("://")
    if sep and scheme.lower() == "memory":
        raise fail(
            f"{what} needs a store that other processes share (a SQLite file for processes on "
            "one machine, or postgresql://user@host/dbname); memory:// lives inside this "
            f"process, so {consequence}",
            EXIT_USAGE,
        )


def _one_line(message: str) -> str:
    from rich.markup import escape

    return escape(" ".join(message.split()))


def report(error: SurfaceError, as_json: bool) -> int:
    """Print ``error`` (one line on stderr; the error object on stdout with ``--json``) and
    return its exit code."""
    if as_json:
        print_json(error.to_json_dict())
    err.print(f"[bold red]error:[/] {_one_line(error.message)}", highlight=False)
    return exit_code_for(error)


def execute(
    main: Coroutine[Any, Any, int | None],
    *,
    as_json: bool = False,
    quiet_interrupt: bool = False,
) -> NoReturn:
    """Run a command's coroutine and exit with its code; every failure becomes one error line
    and its exit code (Ctrl-C: 130, silently with ``quiet_interrupt``). ``MEERKAT_DEBUG=1``
    lets unexpected exceptions print their traceback."""
    _log_to_stderr()
    try:
        code = asyncio.run(main)
    except KeyboardInterrupt:
        if quiet_interrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None
        raise fail("interrupted", EXIT_INTERRUPTED) from None
    except typer.Exit:
        raise
    except (SurfaceError, MeerkatRuntimeError, StoreError, TimeoutError) as exc:
        raise typer.Exit(report(classify(exc), as_json)) from None
    except Exception as exc:
        if os.environ.get("MEERKAT_DEBUG"):
            raise
        error = SurfaceError("internal", f"internal error: {type(exc).__name__}: {exc}")
        raise typer.Exit(report(error, as_json)) from None
    raise typer.Exit(code or EXIT_OK)


class _LineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {' '.join(record.getMessage().split())}"


def _log_to_stderr() -> None:
    """The runtime's log records (a session that failed to recover, a failed lease renewal)
    as ``warning: ...``/``error: ...`` lines on stderr."""
    logger = logging.getLogger("meerkat_runtime")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_LineFormatter())
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False


@contextlib.asynccontextmanager
async def open_runtime(store: str | None, *, run_sessions: bool = True) -> AsyncIterator[Runtime]:
    """The runtime of one command: opened on ``store``, recovering only what the command
    touches, closed without a grace period (a run still going is stopped; the session's
    next owner recovers it). ``run_sessions=False``: a Runtime that owns no session
    (every input goes to the target's durable inbox)."""
    try:
        rt = Runtime.open(store, recover_on_open=False, owns_sessions=run_sessions)
    except StoreError as exc:
        raise SurfaceError("bad_request", f"--store: {exc}") from None
    try:
        await rt.start()
        yield rt
    finally:
        await rt.close(grace=0.0)


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def write_line(text: str = "") -> None:
    """A line of plain text on stdout (never wrapped, no markup)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class Spinner:
    """A spinner on stderr while a block runs, only when stderr is a terminal. ``stop()``
    removes it early (before the first output: it never redirects or overwrites stdout)."""

    def __init__(self, text: str, *, enabled: bool = True) -> None:
        self._live: Live | None = None
        if enabled and sys.stderr.isatty():
            self._live = Live(
                RichSpinner("dots", text=Text(text, style="dim")),
                console=err,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )

    def __enter__(self) -> Spinner:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def spinner(text: str, *, enabled: bool = True) -> Spinner:
    return Spinner(text, enabled=enabled)


def input_id(value: str, what: str = "INPUT_ID") -> InputId:
    try:
        return InputId(value)
    except (ValueError, TypeError) as exc:
        raise SurfaceError("bad_request", f"{what}: {exc}") from None


def labels_from(pairs: list[str] | None) -> dict[str, str]:
    """``--label KEY=VALUE`` options as a dict (a later key wins)."""
    labels: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SurfaceError("bad_request", f"--label: expected KEY=VALUE, got {pair!r}")
        labels[key.strip()] = value
    return labels


def short(value: Any, width: int = 60) -> str:
    """A compact one-line rendering of ``value``, cut to ``width`` characters."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def when(dt: datetime | None) -> str:
    """A timestamp for tables: local time, to the second."""
    if dt is None:
        return "-"
    return dt.astimezone().strftime("%Y-%m-%d %H:%M:%S")
