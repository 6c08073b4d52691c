"""``rkat-rpc``: the JSON-RPC 2.0 server over stdio that the official Meerkat SDK
(``meerkat-sdk`` 0.4.10, ``meerkat.MeerkatClient``) drives unchanged.

Newline-delimited JSON on stdin/stdout: stdout carries only protocol lines (file descriptor 1
is pointed at stderr once the server starts, so nothing else can reach it), logs go to
stderr. Requests run concurrently, one task each; notifications from the client are
ignored; end of input (or SIGTERM / SIGINT) shuts the server down gracefully: in-flight
requests get ``--shutdown-grace`` seconds after end of input, then the ``Runtime`` closes
(S19: active runs get their grace period, then stop; nothing durable is lost).

Entry points: ``serve_stdio`` (``meerkat rpc`` calls it) and ``main`` (the ``rkat-rpc``
console script). Methods, notifications and error codes: ``docs/rpc.md``.

Command line (``rkat-rpc --help``): ``--store URL``; the options the SDK passes when it
spawns the binary (``MeerkatClient.connect``): ``--isolated`` (an in-memory store: nothing
persists), ``--state-root DIR`` (the state directory, instead of ``$MEERKAT_STATE_DIR``),
``--realm ID`` (sessions of a realm live in ``<state dir>/realms/<ID>/``), ``--instance``,
``--realm-backend``, ``--context-root``, ``--user-config-root`` (accepted, not used).

Environment: ``MEERKAT_STATE_DIR`` (default store directory), ``MEERKAT_OFFLINE_SCRIPT`` (an
offline-model script, as JSON text or a path to a JSON file, used by new offline sessions
that get no script otherwise), ``MEERKAT_RPC_MAX_LINE_BYTES`` (request line limit, default
8 MiB), ``MEERKAT_LOG`` (log level, default ``WARNING``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ..host import Runtime
from ..llm.offline import parse_script
from ..store.base import StoreError
from ..store.sqlite import SqliteStore
from ._rpc_protocol import LineSplitter, MessageWriter, open_stdio
from ._rpc_server import CONTRACT_VERSION, RpcServer
from .config import CONFIG_FILE_NAME, ConfigDocument

__all__ = ["CONTRACT_VERSION", "main", "serve", "serve_stdio"]

log = logging.getLogger("meerkat_runtime.rpc")

DEFAULT_MAX_LINE = 8 << 20
DEFAULT_SHUTDOWN_GRACE = 30.0
DEFAULT_TERM_GRACE = 3.0
"""Seconds active runs get on SIGTERM / SIGINT: the SDK kills the process 5 s after its
SIGTERM, and a clean stop releases the session leases at once."""
_REALM = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def load_offline_script(value: str | None) -> list[dict[str, Any]] | None:
    """An offline script from JSON text or a path to a JSON file (``ValueError`` naming the
    problem)."""
    if value is None or not value.strip():
        return None
    text = value
    if not value.lstrip().startswith("["):
        try:
            text = Path(value).expanduser().read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(
                f"MEERKAT_OFFLINE_SCRIPT: neither a JSON array nor a readable file: {exc}"
            ) from None
    try:
        steps = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"MEERKAT_OFFLINE_SCRIPT is not valid JSON: {exc}") from None
    if not isinstance(steps, list):
        raise ValueError("MEERKAT_OFFLINE_SCRIPT must be a JSON array of steps")
    parse_script(steps)
    return steps


def _state_store(state_root: str | None, realm: str | None) -> str | None:
    """The store URL for a state directory and realm (None: the default store)."""
    if state_root is None and realm is None:
        return None
    if realm is not None and not _REALM.fullmatch(realm):
        raise ValueError(f"--realm {realm!r}: use 1 to 128 letters, digits, '.', '_' or '-'")
    if state_root is not None:
        base = Path(state_root).expanduser()
    else:
        env = os.environ.get("MEERKAT_STATE_DIR")
        base = Path(env).expanduser() if env else Path.home() / ".local" / "share" / "meerkat"
    if realm is not None:
        base = base / "realms" / realm
    return str(base.absolute() / "meerkat.db")


def _env_max_line() -> int:
    raw = os.environ.get("MEERKAT_RPC_MAX_LINE_BYTES", "").strip()
    if not raw:
        return DEFAULT_MAX_LINE
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1024:
        raise ValueError(f"MEERKAT_RPC_MAX_LINE_BYTES={raw!r}: expected a number of bytes >= 1024")
    return value


def _config_path(rt: Runtime) -> Path | None:
    store = rt.store
    if isinstance(store, SqliteStore):
        return store.path.parent / CONFIG_FILE_NAME
    return None


async def serve(
    chunks: AsyncIterator[bytes],
    writer: MessageWriter,
    *,
    store: str | None = None,
    offline_script: list[dict[str, Any]] | None = None,
    max_line: int = DEFAULT_MAX_LINE,
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
    term_grace: float = DEFAULT_TERM_GRACE,
    stop: asyncio.Event | None = None,
    owns_sessions: bool = True,
) -> None:
    """Serve one client reading ``chunks`` and answering through ``writer`` until end of
    input or ``stop`` is set. At end of input, in-flight requests and active runs get
    ``shutdown_grace`` seconds in all; once ``stop`` is set, active runs get ``term_grace``
    seconds, then stop (S8; they recover at the next start). ``owns_sessions=False``: the
    server's Runtime never takes a session's lease; turns go to the session's durable inbox
    and a worker process sharing the store runs them (``turn/start`` and ``input/wait``
    follow them through the store); methods that need the session's owner (``runtime/*``,
    ``input/list``, ``input/cancel``, ``turn/interrupt``, ``session/inject_context``) answer
    error -32002."""
    rt = Runtime.open(store, owns_sessions=owns_sessions)
    config = ConfigDocument.load(_config_path(rt))
    server = RpcServer(rt, writer, config, default_offline_script=offline_script, max_line=max_line)
    stop = stop or asyncio.Event()
    close_grace = term_grace  # SIGTERM / SIGINT
    try:
        await rt.start()

        async def read() -> None:
            splitter = LineSplitter(max_line)
            async for chunk in chunks:
                for line in splitter.feed(chunk):
                    await server.handle_line(line)
            for line in splitter.finish():
                await server.handle_line(line)

        reader = asyncio.get_running_loop().create_task(read(), name="rpc-reader")
        stopper = asyncio.get_running_loop().create_task(stop.wait(), name="rpc-stop")
        done, _ = await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
        eof = reader in done
        stopper.cancel()
        if not eof:
            reader.cancel()
        try:
            await reader
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            log.error("reading the input failed: %s", exc)
        server.client_gone()
        if eof and not stop.is_set():
            # end of input: in-flight requests (and their runs) get the shutdown grace,
            # unless a signal cuts it short
            started = asyncio.get_running_loop().time()
            await server.drain(shutdown_grace, stop)
            if not stop.is_set():
                elapsed = asyncio.get_running_loop().time() - started
                close_grace = max(0.0, shutdown_grace - elapsed)
    finally:
        await rt.close(close_grace)
        await server.drain(1.0)  # answers for the requests the close just resolved
        await server.close()
        writer.close()


async def serve_stdio(
    *,
    store: str | None = None,
    offline_script: list[dict[str, Any]] | None = None,
    max_line: int | None = None,
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
    term_grace: float = DEFAULT_TERM_GRACE,
    owns_sessions: bool = True,
) -> None:
    """Serve JSON-RPC on this process's stdin/stdout until end of input, SIGTERM or SIGINT.

    ``store``: a store URL (``None``: SQLite under ``$MEERKAT_STATE_DIR``).
    ``owns_sessions``: see ``serve``.
    ``offline_script``: the default script of new offline sessions (default: from
    ``MEERKAT_OFFLINE_SCRIPT``). ``max_line``: the request line limit in bytes (default:
    ``MEERKAT_RPC_MAX_LINE_BYTES`` or 8 MiB).

    Raises ``ValueError`` (a message naming the culprit) for an invalid
    ``MEERKAT_OFFLINE_SCRIPT`` / ``MEERKAT_RPC_MAX_LINE_BYTES`` or config file, and
    ``StoreError`` for a store it cannot open; nothing has been served then."""
    if offline_script is None:
        offline_script = load_offline_script(os.environ.get("MEERKAT_OFFLINE_SCRIPT"))
    if max_line is None:
        max_line = _env_max_line()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    chunks, writer = await open_stdio()
    try:
        await serve(
            chunks,
            writer,
            store=store,
            offline_script=offline_script,
            max_line=max_line,
            shutdown_grace=shutdown_grace,
            term_grace=term_grace,
            stop=stop,
            owns_sessions=owns_sessions,
        )
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rkat-rpc",
        description=(
            "JSON-RPC 2.0 over stdio for the Meerkat runtime (newline-delimited JSON; "
            "the official Meerkat SDK spawns it). See docs/rpc.md."
        ),
    )
    p.add_argument(
        "--store",
        metavar="URL",
        help="store URL: sqlite:///path.db, a path ending in .db, "
        "postgresql://user@host/db, or memory:// (default: SQLite under $MEERKAT_STATE_DIR)",
    )
    p.add_argument(
        "--state-root", metavar="DIR", help="state directory (instead of $MEERKAT_STATE_DIR)"
    )
    p.add_argument(
        "--realm", metavar="ID", help="keep this realm's sessions in <state dir>/realms/<ID>/"
    )
    p.add_argument(
        "--isolated",
        action="store_true",
        help="use an in-memory store: nothing persists after the process exits",
    )
    p.add_argument("--instance", metavar="ID", help="accepted for SDK compatibility; not used")
    p.add_argument(
        "--realm-backend", metavar="NAME", help="accepted for SDK compatibility; not used"
    )
    p.add_argument("--context-root", metavar="DIR", help="accepted for SDK compatibility; not used")
    p.add_argument(
        "--user-config-root", metavar="DIR", help="accepted for SDK compatibility; not used"
    )
    p.add_argument(
        "--max-line-bytes",
        type=int,
        metavar="N",
        help="longest request line accepted (default: $MEERKAT_RPC_MAX_LINE_BYTES or 8 MiB)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=DEFAULT_SHUTDOWN_GRACE,
        metavar="SECONDS",
        help="at end of input, how long in-flight requests may still run (default 30)",
    )
    p.add_argument(
        "--term-grace",
        type=float,
        default=DEFAULT_TERM_GRACE,
        metavar="SECONDS",
        help="on SIGTERM / SIGINT, how long active runs may still run (default 3)",
    )
    p.add_argument(
        "--log-level",
        default=os.environ.get("MEERKAT_LOG", "WARNING"),
        help="log level on stderr (default: $MEERKAT_LOG or WARNING)",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    """The ``rkat-rpc`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=str(args.log_level).upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.realm and args.isolated:
        parser.error("--realm and --isolated cannot be used together")
    if args.max_line_bytes is not None and args.max_line_bytes < 1024:
        parser.error("--max-line-bytes must be at least 1024")
    try:
        store = args.store
        if store is None:
            store = "memory://" if args.isolated else _state_store(args.state_root, args.realm)
        script = load_offline_script(os.environ.get("MEERKAT_OFFLINE_SCRIPT"))
        max_line = args.max_line_bytes if args.max_line_bytes is not None else _env_max_line()
    except ValueError as exc:
        print(f"rkat-rpc: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        asyncio.run(
            serve_stdio(
                store=store,
                offline_script=script,
                max_line=max_line,
                shutdown_grace=args.shutdown_grace,
                term_grace=args.term_grace,
            )
        )
    except (ValueError, StoreError) as exc:  # an invalid config file or store: say why
        print(f"rkat-rpc: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
