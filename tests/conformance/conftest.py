"""Fixtures of the conformance suites.

``store_factory`` runs every test that uses it once per store kind (ids ``[memory]``,
``[sqlite]`` and ``[postgres]``), as the spec's conformance list asks (§5). The ``postgres``
runs use a fresh schema of the ``MEERKAT_TEST_PG_URL`` database each and are skipped, with
the reason, when that server is unreachable. A test that fails on one kind because
of a known bug carries ``@pytest.mark.store_xfail("sqlite", reason="BUG: ...")``: only that
kind's run is marked ``xfail(strict=True)``, so the mark fails loudly once the bug is fixed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conformance.stores import STORE_KINDS, StoreFactory, skip_without_postgres


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "store_xfail(*kinds, reason): strict xfail for the store_factory runs of these kinds",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or "store_factory" not in callspec.params:
            continue
        kind = callspec.params["store_factory"]
        for mark in item.iter_markers("store_xfail"):
            if kind in mark.args:
                item.add_marker(pytest.mark.xfail(strict=True, reason=mark.kwargs["reason"]))


@pytest.fixture(params=STORE_KINDS)
async def store_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StoreFactory]:
    if request.param == "postgres":
        skip_without_postgres()
    factory = StoreFactory(request.param, tmp_path)
    yield factory
    await factory.close_all()
