"""Schemathesis over ``/openapi.json`` against the live server: no 5xx, and every answer
(status, content type, body, each SSE event) conforms to the documented schema.

Every operation is fuzzed with schema-valid data, both with random path parameters (unknown
sessions: the 404 paths) and with a real session's id (the working paths); operations that
take a query or a body are also fuzzed with schema-invalid data, which must be refused with a
4xx. Examples per operation are few and derandomized, so the run is reproducible and takes
10-15 s (well under 30 s in CI).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from meerkat_runtime.surfaces import rest

from .test_rest_support import live_server

EXAMPLES = 5
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def runner(strategy: Any, url: str, checks: list[Any]) -> Any:
    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        case.call_and_validate(base_url=url, checks=checks, timeout=15)

    return run


def fuzz(url: str, session_id: str) -> list[str]:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    ran: list[str] = []
    for result in schema.get_all_operations():
        op = result.ok()  # type: ignore[union-attr]  # (an Err raises here: a broken schema)
        label = f"{op.method.upper()} {op.path}"
        streaming = op.path.endswith("/events")
        modes = [GenerationMode.POSITIVE]
        if op.query.items or op.headers.items or op.body.items:
            modes.append(GenerationMode.NEGATIVE)  # (a string path parameter cannot be wrong)
        for mode in modes:
            for real in (False, True):
                kwargs: dict[str, Any] = {}
                has_session = "{session_id}" in op.path
                if real and has_session:
                    kwargs["path_parameters"] = {"session_id": session_id}
                elif real or (mode.is_negative and has_session):
                    continue  # (invalid data against unknown sessions adds little)
                if streaming:
                    kwargs["query"] = {"follow": "false"}
                strategy = op.as_strategy(generation_mode=mode, **kwargs)
                checks = list(CHECKS)
                if mode.is_negative and not op.path.endswith("/accept"):
                    # (accept answers an invalid Input with 200 rejected{invalid}: S14)
                    checks.append(negative_data_rejection)

                try:
                    runner(strategy, url, checks)()
                except Unsatisfiable:
                    # nothing to make invalid (e.g. GET /health has no parameters)
                    assert mode.is_negative, label
        ran.append(label)
    return ran


async def test_schemathesis_finds_no_server_error_and_no_schema_violation() -> None:
    app = rest.create_app(store="memory://")
    async with live_server(app) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=20) as c:
            r = await c.post("/sessions", json={"prompt": "fuzz me", "labels": {"k": "v"}})
            assert r.status_code == 200, r.text
            sid = r.json()["session_id"]
        ran = await asyncio.to_thread(fuzz, live.url, sid)
        assert len(ran) >= 20
        async with httpx.AsyncClient(base_url=live.url, timeout=20) as c:
            assert (await c.get("/health")).status_code == 200
