"""``meerkat db ...``: the schema version of a store, and bringing it up to date.

Commands::

    meerkat db status [--store URL] [--json]
    meerkat db migrate [--store URL] [--json]

Invariants:
- ``status`` never writes to the store. PostgreSQL is read on one connection of its own;
  SQLite through a read-only connection (a missing file is version 0 and is not created).
  It exits 0 when the schema is at the newest version this build knows, 1 when migrations
  are pending (a deploy script's gate: ``meerkat db status || meerkat db migrate``).
- ``migrate`` applies every pending migration and says which. PostgreSQL: all of them in
  one transaction under an advisory lock (``PostgresStore.migrate``), so a migration that
  fails leaves nothing behind and two concurrent runs migrate once. SQLite: a SQLite store
  migrates itself whenever it is opened (by any command or server); ``migrate`` opens it
  (creating the file if it is missing) and reports the versions between the one read before
  and the one after (another process opening the file at that moment may have applied some).
- Both refuse, with one error line and exit 1, a schema newer than this build knows and a
  database holding another application's tables (nothing is written then); an unreachable
  store exits 1 too. ``memory://`` and a URL that is not understood are usage errors (exit 2)
  that say which URLs are accepted.
- A URL's password is never printed: stores are named by their redacted URL
  (``redact_url``), and every error message is scrubbed of the password before it is printed.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import typer

from ._cli_common import (
    EXIT_OK,
    EXIT_RUN_FAILED,
    JsonOpt,
    StoreOpt,
    err,
    execute,
    print_json,
    write_line,
)
from .errors import MeerkatRuntimeError
from .store import open_store, redact_url, scrub
from .store.base import StoreError
from .store.memory import MemoryStore
from .store.sqlite import SchemaRefusedError, SqliteStore, load_migrations, schema_version_of
from .surfaces.common import SurfaceError, classify

if TYPE_CHECKING:
    from .store.postgres import PostgresStore  # imported when used: it needs psycopg

__all__ = ["SchemaStatus", "db_app", "migrate_store", "schema_status"]

db_app = typer.Typer(
    name="db",
    help="The store's schema: its version, and the migrations this build would apply. "
    "PostgreSQL needs `db migrate` after an upgrade; SQLite migrates itself when opened.",
    no_args_is_help=True,
)

Backend = Literal["postgresql", "sqlite"]

_ACCEPTED = (
    "a SQLite file (sqlite:///path.db, or a path ending in .db) or postgresql://user@host/dbname"
)


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    """Where a store's schema stands. ``version`` 0: no meerkat-runtime schema yet (an empty
    PostgreSQL schema, a missing or empty SQLite file). ``pending`` lists (version, name) of
    the migrations this build would apply, oldest first; empty exactly when ``version ==
    latest``."""

    backend: Backend
    store: str  # the URL or path, password redacted
    version: int
    latest: int
    pending: tuple[tuple[int, str], ...]

    @property
    def up_to_date(self) -> bool:
        return not self.pending

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "backend": self.backend,
            "version": self.version,
            "latest": self.latest,
            "up_to_date": self.up_to_date,
            "pending": [{"version": v, "name": n} for v, n in self.pending],
        }


@dataclass(frozen=True, slots=True)
class MigrateReport:
    """What ``migrate`` did: ``applied`` (version, name), oldest first; ``version`` is the
    schema's version afterwards (this build's newest)."""

    backend: Backend
    store: str
    applied: tuple[tuple[int, str], ...]
    version: int

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "backend": self.backend,
            "applied": [{"version": v, "name": n} for v, n in self.applied],
            "version": self.version,
        }


# ------------------------------------------------------------------ commands


@db_app.command("status")
def status(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Print the store's schema version, the newest this build knows, and what is pending.

    Exit code 0 when the schema is up to date, 1 when migrations are pending (run `meerkat
    db migrate`). Changes nothing. A schema newer than this build is refused (exit 1)."""
    execute(_status(store, as_json), as_json=as_json)


@db_app.command("migrate")
def migrate(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Apply the store's pending migrations and print which.

    PostgreSQL: all of them in one transaction (safe to run from several hosts at once).
    SQLite migrates itself whenever it is opened; this opens it now (creating the file if
    missing). A schema newer than this build is refused (exit 1)."""
    execute(_migrate(store, as_json), as_json=as_json)


async def _status(url: str | None, as_json: bool) -> int:
    with _scrubbed(url):
        st = await schema_status(url)
    if as_json:
        print_json(st.to_json_dict())
    else:
        write_line(f"store    {st.store}")
        empty = " (no meerkat-runtime schema yet)" if st.version == 0 else ""
        write_line(f"version  {st.version}{empty}")
        write_line(f"latest   {st.latest} (this build)")
        pending = ", ".join(f"{v} {n}" for v, n in st.pending) or "none"
        write_line(f"pending  {pending}")
        if st.pending:
            note = "run `meerkat db migrate` to apply them"
            if st.backend == "sqlite":
                note += " (or let the next command or server that opens the file do it)"
            err.print(f"[dim]{note}[/]", highlight=False)
    return EXIT_OK if st.up_to_date else EXIT_RUN_FAILED


async def _migrate(url: str | None, as_json: bool) -> int:
    with _scrubbed(url):
        report = await migrate_store(url)
    if as_json:
        print_json(report.to_json_dict())
    elif report.applied:
        versions = ", ".join(str(v) for v, _ in report.applied)
        plural = "s" if len(report.applied) > 1 else ""
        write_line(f"applied migration{plural} {versions}; schema is at version {report.version}")
    else:
        write_line(f"schema is up to date (version {report.version})")
    return EXIT_OK


# ------------------------------------------------------------------ the work


async def schema_status(url: str | None) -> SchemaStatus:
    """The schema status of the store at ``url`` (``None``: the default SQLite file), read
    without writing anything. Raises ``SurfaceError`` (bad_request) for a URL that names no
    migratable store, ``StoreError`` for a store that cannot be read or whose schema is
    newer than this build or another application's."""
    store = _store_for(url)
    if isinstance(store, SqliteStore):
        known = [(m.version, m.name) for m in load_migrations()]
        current = _sqlite_version(store.path, max(v for v, _ in known))
        return _status_of("sqlite", store.url, current, known)
    from .store._pg_schema import load_pg_migrations, schema_version

    known = [(m.version, m.name) for m in load_pg_migrations()]
    try:
        # the store's own connection settings and error wording (password redacted); a
        # public ``PostgresStore`` status call would make these private uses unnecessary
        conn = await store._connect()
    except Exception as exc:
        raise store._error(exc) from exc
    try:
        pg_version = await schema_version(conn, max(v for v, _ in known))
    except Exception as exc:
        raise store._error(exc) from exc
    finally:
        await conn.close()
    return _status_of("postgresql", store.url, pg_version or 0, known)


async def migrate_store(url: str | None) -> MigrateReport:
    """Bring the store at ``url`` to this build's newest schema version; what was applied.
    Errors as for ``schema_status``."""
    store = _store_for(url)
    if isinstance(store, SqliteStore):
        known = [(m.version, m.name) for m in load_migrations()]
        before = _sqlite_version(store.path, max(v for v, _ in known))
        try:
            await store.open()  # checks the file, then migrates it (sqlite.py)
            after = await store.schema_version()
        finally:
            await store.close()
        applied = tuple((v, n) for v, n in known if before < v <= after)
        return MigrateReport("sqlite", store.url, applied, after)
    from .store.postgres import load_pg_migrations

    names = {m.version: m.name for m in load_pg_migrations()}
    versions = await store.migrate()
    return MigrateReport(
        "postgresql", store.url, tuple((v, names[v]) for v in versions), max(names, default=0)
    )


def _store_for(url: str | None) -> SqliteStore | PostgresStore:
    """The (unopened) store of ``url``; a usage error for one that has no schema."""
    from .store.postgres import PostgresStore

    try:
        store = open_store(url)
    except StoreError as exc:
        raise SurfaceError("bad_request", f"--store: {exc}") from None
    if isinstance(store, SqliteStore | PostgresStore):
        return store
    what = (
        "an in-memory store lives inside one process and has no schema"
        if isinstance(store, MemoryStore)
        else f"a {type(store).__name__} has no schema"
    )
    raise SurfaceError(
        "bad_request",
        f"--store {redact_url(store.url)}: {what} to check or migrate; use {_ACCEPTED}",
    )


def _status_of(
    backend: Backend, store: str, current: int, known: list[tuple[int, str]]
) -> SchemaStatus:
    latest = max((v for v, _ in known), default=0)
    pending = tuple((v, n) for v, n in known if v > current)
    return SchemaStatus(backend, redact_url(store), current, latest, pending)


def _sqlite_version(path: Path, known: int) -> int:
    """The schema version of the SQLite file at ``path``, read through a read-only
    connection (0: no file, or no tables yet). Refuses, as the store's ``open`` does, a file
    that is not a database, another application's database and a newer schema."""
    if not path.exists():
        return 0
    try:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        raise StoreError(f"store {path}: {exc}") from None
    try:
        current = schema_version_of(conn, known)
    except (sqlite3.Error, SchemaRefusedError) as exc:
        raise StoreError(f"store {path}: {exc}") from None
    finally:
        conn.close()
    return current


@contextlib.contextmanager
def _scrubbed(url: str | None) -> Iterator[None]:
    """Re-raises the failures of its block as ``SurfaceError`` with scrubbed messages (the
    code ``classify`` gives them, so exit codes stay those of every other command)."""
    try:
        yield
    except (SurfaceError, MeerkatRuntimeError, StoreError) as exc:
        error = classify(exc)
        raise SurfaceError(error.code, scrub(error.message, url), **error.details) from None
