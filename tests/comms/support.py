"""Helpers of the comms suite."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from meerkat_runtime import Runtime, RuntimeConfig
from meerkat_runtime.runtime.input_state import InputState
from meerkat_runtime.runtime.inputs import PeerInput
from meerkat_runtime.store.base import Txn
from tests.conformance.stores import ProbeStore, StoreFactory

CONFIG = RuntimeConfig(backoff_base=0.01, shutdown_grace=0.05)


class RecordingStore(ProbeStore):
    """A ``ProbeStore`` that also keeps, per submitted transaction, the input ids it wrote and
    the peer requests it closed (to check that a close shares its acceptance's transaction)."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.txns: list[tuple[set[str], set[str]]] = []

    def submit(self, txn: Txn) -> asyncio.Future[None]:
        self.txns.append(
            ({str(i) for i in txn.states}, {c.request_id for c in txn.peer_request_closes})
        )
        return super().submit(txn)


@asynccontextmanager
async def open_runtime(store_factory: StoreFactory, **kw: Any) -> AsyncIterator[Runtime]:
    store = RecordingStore(store_factory())
    rt = Runtime(store, config=kw.pop("config", CONFIG), **kw)  # type: ignore[arg-type]
    try:
        yield rt
    finally:
        await rt.close(grace=0)


def recording(rt: Runtime) -> RecordingStore:
    assert isinstance(rt.store, RecordingStore)
    return rt.store


async def until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def by_envelope(rt: Runtime, session_id: str, envelope_id: str) -> InputState:
    """The input a comms send delivered to a session this process runs."""
    for st in rt.list_inputs(session_id, include_terminal=True):
        inp = st.persisted_input
        if inp is not None and str(inp.header.correlation_id) == envelope_id:
            return st
    raise AssertionError(f"no input with envelope {envelope_id} at session {session_id}")


def peer_input(st: InputState) -> PeerInput:
    assert isinstance(st.persisted_input, PeerInput)
    return st.persisted_input


async def input_ids(rt: Runtime, session_id: str) -> set[str]:
    """Every input the session holds anywhere: in memory, in the store, in its inbox."""
    ids = {str(st.input_id) for st in await rt.store.load_input_states(session_id)}
    owned = rt._runtimes.get(session_id)
    if owned is not None:
        ids |= {str(i) for i in owned.input_ids(include_terminal=True)}
    ids |= {e.input_json for e in await rt.store.inbox_entries(session_id)}
    return ids
