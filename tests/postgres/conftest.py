"""Fixtures of the PostgreSQL store's own tests: every test gets a fresh schema of the
``MEERKAT_TEST_PG_URL`` database (``pg_url`` selects it), dropped afterwards, so tests and test
runs never share tables. Everything here is skipped, with the reason, when the server is
unreachable."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from meerkat_runtime.store.postgres import PostgresStore
from tests.postgres import support as pg


@pytest.fixture(autouse=True)
def _needs_postgres() -> None:
    reason = pg.unavailable()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def pg_schema() -> Iterator[tuple[str, str]]:
    """(URL, schema name) of a fresh, empty schema."""
    url, name = pg.fresh_schema()
    try:
        yield url, name
    finally:
        pg.drop_schema(name)


@pytest.fixture
def pg_url(pg_schema: tuple[str, str]) -> str:
    return pg_schema[0]


@pytest.fixture
async def pgs(pg_url: str) -> AsyncIterator[PostgresStore]:
    """An open store on a fresh schema."""
    s = PostgresStore(pg_url)
    await s.open()
    try:
        yield s
    finally:
        await s.close()
