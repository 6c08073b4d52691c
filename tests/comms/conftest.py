"""Fixtures of the comms suite: ``store_factory`` runs a test once per store kind (``[memory]``
and ``[sqlite]``), like the conformance suite (spec §5)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conformance.stores import STORE_KINDS, StoreFactory


@pytest.fixture(params=STORE_KINDS)
async def store_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StoreFactory]:
    factory = StoreFactory(request.param, tmp_path)
    yield factory
    await factory.close_all()
