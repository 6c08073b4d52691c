"""Schema versions of the PostgreSQL store: the packaged migrations
(``schema/postgres/NNNN_name.sql``), the version check ``PostgresStore.open`` makes, and the
forward migration ``migrate_postgres`` applies.

The tables live in the connection's current schema (the first existing schema of its
``search_path``), so one database can hold several stores side by side, one per schema.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from psycopg import AsyncConnection, sql
from psycopg.rows import TupleRow

from .._time import utcnow
from ._pg_rows import Refused
from .base import StoreError

__all__ = ["PgMigration", "apply_migrations", "check_schema", "load_pg_migrations"]

_MIGRATION_NAME = re.compile(r"^(\d{4})_(\w+)\.sql$")
# advisory lock key space of the migration lock (the second key is the schema's oid)
_MIGRATION_LOCK = 0x6D6B7431  # "mkt1"


@dataclass(frozen=True, slots=True)
class PgMigration:
    """One forward migration: ``NNNN_name.sql`` applied when the schema is older."""

    version: int
    name: str
    sql: str


def load_pg_migrations() -> list[PgMigration]:
    """The packaged migrations in version order (numbered 0001, 0002, ... without gaps)."""
    folder = resources.files("meerkat_runtime.store").joinpath("schema", "postgres")
    out: list[PgMigration] = []
    for item in folder.iterdir():
        m = _MIGRATION_NAME.match(item.name)
        if m is not None:
            out.append(PgMigration(int(m.group(1)), m.group(2), item.read_text(encoding="utf-8")))
    out.sort(key=lambda mg: mg.version)
    for i, mg in enumerate(out, start=1):
        if mg.version != i:
            raise StoreError(f"PostgreSQL migrations are not numbered 0001, 0002, ...: {mg.name}")
    return out


async def current_schema(conn: AsyncConnection[TupleRow]) -> str:
    cur = await conn.execute("SELECT current_schema()")
    row = await cur.fetchone()
    if row is None or row[0] is None:
        cur = await conn.execute("SHOW search_path")
        path = await cur.fetchone()
        raise Refused(
            f"no schema to use: none of the search_path ({path[0] if path else '?'}) exists; "
            "create the schema first (CREATE SCHEMA ...)"
        )
    return str(row[0])


async def schema_version(conn: AsyncConnection[TupleRow], known: int) -> int | None:
    """The version recorded in the current schema: None for an empty schema (no tables at
    all). Refuses a schema that holds other tables but no ``schema_version`` (another
    application's), and one newer than ``known``."""
    schema = await current_schema(conn)
    cur = await conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
        (schema,),
    )
    tables = {str(r[0]) for r in await cur.fetchall()}
    if "schema_version" not in tables:
        if tables:
            names = ", ".join(sorted(tables)[:5])
            raise Refused(
                f"not a meerkat-runtime database: schema {schema!r} holds tables ({names}) but "
                "no schema_version; refusing to add a schema to it"
            )
        return None
    cur = await conn.execute(
        sql.SQL("SELECT COALESCE(MAX(version), 0) FROM {}.schema_version").format(
            sql.Identifier(schema)
        )
    )
    row = await cur.fetchone()
    current = int(row[0]) if row is not None else 0
    if current > known:
        raise Refused(
            f"schema version {current} is newer than this build of meerkat-runtime knows "
            f"(this build knows up to v{known}); upgrade meerkat-runtime to open it"
        )
    return current


async def check_schema(conn: AsyncConnection[TupleRow], migrations: list[PgMigration]) -> list[int]:
    """``open``'s check: migrate an empty schema (returns the versions applied), accept the
    current version, refuse an older one (run ``meerkat db migrate``) or a newer one."""
    known = max((m.version for m in migrations), default=0)
    current = await schema_version(conn, known)
    if current is None:
        return await apply_migrations(conn, migrations, only_if_empty=True)
    if current < known:
        missing = ", ".join(f"v{m.version} {m.name}" for m in migrations if m.version > current)
        raise Refused(
            f"schema version {current} is older than this build of meerkat-runtime (v{known}; "
            f"missing {missing}); run `meerkat db migrate` to upgrade it"
        )
    return []


async def apply_migrations(
    conn: AsyncConnection[TupleRow],
    migrations: list[PgMigration],
    *,
    only_if_empty: bool = False,
) -> list[int]:
    """Apply every missing migration in one transaction, under an advisory lock so that two
    processes never migrate one schema at once (the second finds it done). Returns the
    versions applied. With ``only_if_empty``, a schema another process created meanwhile is
    left alone (and checked by the caller's next open)."""
    known = max((m.version for m in migrations), default=0)
    applied: list[int] = []
    async with conn.transaction():
        schema = await current_schema(conn)
        await conn.execute(
            "SELECT pg_advisory_xact_lock(%s, n.oid::int) FROM pg_namespace n WHERE nspname = %s",
            (_MIGRATION_LOCK, schema),
        )
        current = await schema_version(conn, known)
        if current is not None and only_if_empty:
            if current < known:
                raise Refused(
                    f"schema version {current} is older than this build of meerkat-runtime "
                    f"(v{known}); run `meerkat db migrate` to upgrade it"
                )
            return []
        for m in migrations:
            if m.version <= (current or 0):
                continue
            await conn.execute(m.sql.encode("utf-8"))  # a script: no parameters
            await conn.execute(
                "INSERT INTO schema_version (version, name, applied_at) VALUES (%s, %s, %s)",
                (m.version, m.name, utcnow()),
            )
            applied.append(m.version)
    return applied
