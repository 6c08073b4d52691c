"""Schema versions of the PostgreSQL store: an empty database or schema is migrated at open,
an older schema is refused until ``meerkat db migrate`` (``migrate_postgres``) upgraded it, a
newer one is refused naming both versions, another application's tables are never touched,
a failing migration leaves nothing behind, and opening needs a reachable server."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from meerkat_runtime.store import open_store
from meerkat_runtime.store.base import StoreError, Txn
from meerkat_runtime.store.postgres import (
    _INBOX_LOCK,
    PgMigration,
    PostgresStore,
    load_pg_migrations,
    migrate_postgres,
)
from tests.postgres import support as pg

KNOWN = load_pg_migrations()
LATEST = len(KNOWN)


def _tables(url: str, schema: str = "public") -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (schema,),
        ).fetchall()
    return {r[0] for r in rows}


def _versions(url: str) -> list[tuple[int, str]]:
    with psycopg.connect(url) as conn:
        return [
            (int(v), str(n))
            for v, n in conn.execute(
                "SELECT version, name FROM schema_version ORDER BY version"
            ).fetchall()
        ]


def test_the_packaged_migrations_are_numbered_from_one() -> None:
    assert [m.version for m in KNOWN] == list(range(1, LATEST + 1))
    assert KNOWN[0].name == "initial"
    assert [m.name for m in KNOWN[:3]] == ["initial", "peer_comms", "inbox_push"]


def test_the_inbox_push_function_takes_the_inbox_lock() -> None:
    """``meerkat_inbox_push`` (v3) serializes pushes to a runtime without a row on the advisory
    lock ``_INBOX_LOCK`` names; the SQL spells the constant in decimal."""
    push = next(m for m in KNOWN if m.name == "inbox_push")
    assert f"pg_advisory_xact_lock({_INBOX_LOCK}, hashtext(p_runtime))" in push.sql


async def test_a_fresh_database_is_migrated_at_open() -> None:
    """A brand-new database (its public schema empty) just works, as for first use."""
    url, name = pg.fresh_database()
    try:
        store = PostgresStore(url)
        await store.open()
        try:
            assert store.applied_migrations == list(range(1, LATEST + 1))
            assert await store.schema_version() == LATEST
            settings = await store.settings()
            assert settings["synchronous_commit"] == "on"
            assert settings["TimeZone"] == "UTC"
        finally:
            await store.close()
        assert _versions(url) == [(m.version, m.name) for m in KNOWN]
        assert {"runtimes", "input_states", "inbox", "events", "peer_requests"} <= _tables(url)
        assert await migrate_postgres(url) == []  # current: nothing to do
        again = PostgresStore(url)
        await again.open()  # an up-to-date schema opens without migrating
        try:
            assert again.applied_migrations == []
        finally:
            await again.close()
    finally:
        pg.drop_database(name)


async def test_a_newer_schema_is_refused_naming_the_versions(pg_url: str) -> None:
    await migrate_postgres(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_version (version, name) VALUES (99, 'future')")
    with pytest.raises(StoreError) as err:
        await PostgresStore(pg_url).open()
    msg = str(err.value)
    assert "schema version 99 is newer" in msg and f"up to v{LATEST}" in msg
    assert "upgrade meerkat-runtime" in msg
    with pytest.raises(StoreError, match="99"):
        await migrate_postgres(pg_url)  # nor migrated "down"
    assert _versions(pg_url)[-1] == (99, "future")


async def test_an_older_schema_needs_meerkat_db_migrate(pg_url: str) -> None:
    old = PostgresStore(pg_url, migrations=KNOWN[:1])
    await old.open()  # an empty schema: migrated to v1 only
    await old.acquire_lease("rt-old", "owner", 30)
    await old.close()
    with pytest.raises(StoreError) as err:
        await PostgresStore(pg_url).open()
    msg = str(err.value)
    assert "schema version 1 is older" in msg and f"v{LATEST}" in msg
    assert "run `meerkat db migrate`" in msg
    assert _versions(pg_url) == [(1, "initial")]  # the refused open changed nothing
    assert await migrate_postgres(pg_url) == list(range(2, LATEST + 1))
    store = PostgresStore(pg_url)
    await store.open()
    try:
        assert await store.schema_version() == LATEST
        assert (await store.lease_owner("rt-old"))[0] == "owner"  # data kept
    finally:
        await store.close()


async def test_another_applications_tables_are_left_alone(
    pg_url: str, pg_schema: tuple[str, str]
) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, name text)")
    for attempt in (PostgresStore(pg_url).open(), migrate_postgres(pg_url)):
        with pytest.raises(StoreError, match=r"not a meerkat-runtime database.*accounts"):
            await attempt
    assert _tables(pg_url, pg_schema[1]) == {"accounts"}


async def test_a_failing_migration_leaves_nothing_behind(
    pg_url: str, pg_schema: tuple[str, str]
) -> None:
    await migrate_postgres(pg_url)
    broken = PgMigration(
        LATEST + 1, "broken", "CREATE TABLE extra (x int);\nINSERT INTO nowhere VALUES (1);"
    )
    with pytest.raises(StoreError, match="nowhere"):
        await PostgresStore(pg_url, migrations=[*KNOWN, broken]).migrate()
    assert "extra" not in _tables(pg_url, pg_schema[1])  # DDL is transactional
    assert _versions(pg_url)[-1][0] == LATEST
    good = PgMigration(LATEST + 1, "extra", "-- a later one\nCREATE TABLE extra (x int);\n")
    assert await PostgresStore(pg_url, migrations=[*KNOWN, good]).migrate() == [LATEST + 1]
    store = PostgresStore(pg_url, migrations=[*KNOWN, good])
    await store.open()
    try:
        assert await store.schema_version() == LATEST + 1
    finally:
        await store.close()


async def test_concurrent_first_opens_migrate_once(pg_url: str) -> None:
    stores = [PostgresStore(pg_url) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        assert sorted(len(s.applied_migrations) for s in stores) == [0, 0, 0, LATEST]
        assert _versions(pg_url) == [(m.version, m.name) for m in KNOWN]
    finally:
        for s in stores:
            await s.close()


async def test_a_missing_schema_is_named(pg_url: str) -> None:
    url = pg.with_schema(pg.base_url(), "meerkat_no_such_schema")
    with pytest.raises(StoreError, match="create the schema first"):
        await PostgresStore(url).open()


async def test_an_unreachable_server_is_a_clear_error() -> None:
    url = "postgresql://meerkat:s3cret@127.0.0.1:1/nothing"
    store = open_store(url)
    assert isinstance(store, PostgresStore)
    assert store.url == "postgresql://meerkat:***@127.0.0.1:1/nothing"
    with pytest.raises(StoreError) as err:
        await store.open()
    msg = str(err.value)
    assert msg.startswith("store postgresql://meerkat:***@127.0.0.1:1/nothing: ")
    assert "is the PostgreSQL server running" in msg and "s3cret" not in msg
    with pytest.raises(StoreError, match="not open"):
        await store.list_sessions()
    with pytest.raises(StoreError, match="not open"):
        await store.submit(Txn("rt", 0))


def test_open_store_serves_postgres_urls() -> None:
    for url in (
        "postgresql://u@h:5432/db",
        "postgres://u@h/db?sslmode=require",
        "postgresql+psycopg://u:pw@h/db",
    ):
        store = open_store(url)
        assert isinstance(store, PostgresStore)
        assert "pw" not in store.url


async def test_errors_never_show_the_password() -> None:
    """libpq quotes parts of a malformed URL in its messages; the store's errors must not."""
    import pytest

    from meerkat_runtime.store import open_store
    from meerkat_runtime.store.base import StoreError

    for url in (
        "postgresql://meerkat:s3cr%ZZet@127.0.0.1:1/db",  # a bad percent-escape
        "postgresql://meerkat:s3cret@127.0.0.1:1/db",  # connection refused
    ):
        store = open_store(url)
        with pytest.raises(StoreError) as info:
            await store.open()
        assert "s3cr" not in str(info.value), str(info.value)
        assert "127.0.0.1" in str(info.value)
    with pytest.raises(StoreError) as bad:
        open_store("postgresql:/meerkat:s3cret@host/db")
    assert "s3cret" not in str(bad.value)
