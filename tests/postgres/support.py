"""PostgreSQL for the tests: the server named by ``MEERKAT_TEST_PG_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``), and throwaway schemas and databases in it so
that no two tests (nor two test runs) share tables.

``fresh_schema()`` creates an empty schema and returns a URL whose ``search_path`` selects it
(the store creates its tables there); ``drop_schema`` removes it. ``fresh_database()`` /
``drop_database`` do the same with a whole database, for the few tests that need one.
``unavailable()`` says why PostgreSQL cannot be used (once per run), or None: tests skip
with that reason when the server is unreachable (CI runs it, see ``.ci/run``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import uuid
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
from psycopg import sql

__all__ = [
    "DEFAULT_URL",
    "base_url",
    "drop_database",
    "drop_schema",
    "fresh_database",
    "fresh_schema",
    "unavailable",
    "with_database",
    "with_schema",
]

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def base_url() -> str:
    return os.environ.get("MEERKAT_TEST_PG_URL") or DEFAULT_URL


@functools.cache
def unavailable() -> str | None:
    """Why the test server cannot be used, or None when it can."""
    url = base_url()
    try:
        with psycopg.connect(url, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return (
            f"PostgreSQL at {url} (MEERKAT_TEST_PG_URL) is unreachable: {first}; start it with "
            "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`"
        )
    return None


def _new_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def with_schema(url: str, schema: str) -> str:
    """``url`` whose connections use ``schema`` (through libpq's ``options``)."""
    parts = urlsplit(url)
    option = "options=" + quote(f"-csearch_path={schema}", safe="")
    query = f"{parts.query}&{option}" if parts.query else option
    return urlunsplit(parts._replace(query=query))


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def fresh_schema(url: str | None = None) -> tuple[str, str]:
    """Create an empty schema; (URL selecting it, schema name)."""
    base = url or base_url()
    name = _new_name("meerkat_t")
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    return with_schema(base, name), name


def drop_schema(name: str, url: str | None = None) -> None:
    with (
        contextlib.suppress(psycopg.Error),
        psycopg.connect(url or base_url(), autocommit=True) as conn,
    ):
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def fresh_database() -> tuple[str, str]:
    """Create an empty database; (URL of it, database name)."""
    name = _new_name("meerkat_t")
    with psycopg.connect(base_url(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return with_database(base_url(), name), name


def drop_database(name: str) -> None:
    with (
        contextlib.suppress(psycopg.Error),
        psycopg.connect(base_url(), autocommit=True) as conn,
    ):
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
