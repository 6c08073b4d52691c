"""Fixtures of the failover tests: a fresh schema of the ``MEERKAT_TEST_PG_URL`` database with
the store's tables and the audit triggers (dropped afterwards), a directory for the workers'
logs and the side-effect log, and a list of spawned workers killed on the way out whatever
happened. Skipped, with the reason, when PostgreSQL is unreachable."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.failover.harness import Worker, install_audit, prepare_store
from tests.postgres import support as pg


@pytest.fixture(autouse=True)
def _needs_postgres() -> None:
    reason = pg.unavailable()
    if reason is not None:
        pytest.skip(reason)


@dataclass(frozen=True)
class Shared:
    """A fresh store (``url`` selects its schema ``schema``) and where logs go."""

    url: str
    schema: str
    directory: Path

    @property
    def tool_log(self) -> Path:
        return self.directory / "tools.jsonl"


@pytest.fixture
async def shared(tmp_path: Path) -> AsyncIterator[Shared]:
    url, schema = pg.fresh_schema()
    try:
        await prepare_store(url)
        install_audit(url)
        yield Shared(url, schema, tmp_path)
    finally:
        pg.drop_schema(schema)


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    """Workers a test spawned (it appends them); any still running at the end is killed."""
    spawned: list[Worker] = []
    try:
        yield spawned
    finally:
        for w in spawned:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
            if w.reader is not None:
                w.reader.join(5)
            w.save()  # <tmp_path>/<name>.events.jsonl, for the post-mortem
