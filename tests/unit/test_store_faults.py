"""Store faults at the runtime level (issue: durability): a write that fails leaves memory and
the store consistent, the caller gets a clear error, and nothing accepted is lost: the instance
stops and its next use recovers from what the store holds (S6, S7, S10)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from meerkat_runtime import PromptInput, Runtime, RuntimeConfig
from meerkat_runtime.runtime.outcomes import CompletedWait
from meerkat_runtime.store.base import StoreError
from meerkat_runtime.store.memory import MemoryStore
from tests.helpers import ScriptedExecutor

CFG = RuntimeConfig(backoff_base=0.01, backoff_max=0.02)


async def _stored_states(store: MemoryStore, sid: str) -> dict[str, str]:
    return {str(s.input_id): s.current_state.value for s in await store.load_input_states(sid)}


async def test_failed_accept_commit_raises_and_loses_nothing_acknowledged() -> None:
    store = MemoryStore()
    ex = ScriptedExecutor()
    async with Runtime(store, config=CFG, executor_factory=lambda rec: ex) as rt:
        sid = (await rt.create_session(executor=ex)).id
        ok = await rt.accept_with_completion(sid, PromptInput.new("before"))
        assert isinstance(await ok.wait(5), CompletedWait)
        store.fail_next = OSError("disk full")
        doomed = PromptInput.new("during the fault")
        with pytest.raises(StoreError) as info:
            await rt.accept(sid, doomed)
        assert "disk full" in str(info.value)
        # the instance stopped; nothing of the failed accept is in the store
        stored = await _stored_states(store, sid)
        assert str(doomed.id) not in stored
        # the next use recovers from the store and works; memory equals the store again
        after = await rt.accept_with_completion(sid, PromptInput.new("after"))
        assert isinstance(await after.wait(5), CompletedWait)
        sr = rt.runtime(sid)
        assert str(doomed.id) not in {str(i) for i in sr.input_ids(include_terminal=True)}
        mem = {str(i): sr.input_state(i).current_state.value for i in sr.input_ids()}
        stored_now = await _stored_states(store, sid)
        assert {k: v for k, v in stored_now.items() if k in mem} == mem


async def test_failed_boundary_commit_reruns_the_input_exactly_once() -> None:
    store = MemoryStore()
    ex = ScriptedExecutor()
    async with Runtime(store, config=CFG, executor_factory=lambda rec: ex) as rt:
        sid = (await rt.create_session(executor=ex)).id
        ex.steps = ["hang"]  # first run: commit the boundary (which fails), then park
        original_submit = store.submit
        armed = {"boundary": True}

        def failing_submit(txn):  # type: ignore[no-untyped-def]
            if armed["boundary"] and txn.receipts:
                armed["boundary"] = False
                fut = asyncio.get_running_loop().create_future()
                fut.set_exception(StoreError("store memory://: disk I/O error (injected)"))
                return fut
            return original_submit(txn)

        store.submit = failing_submit  # type: ignore[method-assign]
        handle = await rt.accept_with_completion(sid, PromptInput.new("once"))
        outcome = await handle.wait(5)
        # the failed instance stopped; the waiter followed the input into the recovered
        # instance, which ran it again from the queue (its boundary never became durable)
        assert isinstance(outcome, CompletedWait), outcome
        rows = await store.load_conversation(sid)
        user_rows = [r for r in rows if r.message.role == "user"]
        assert [r.message.content for r in user_rows] == ["once"]


async def test_corrupt_database_gives_a_clear_error_never_an_empty_queue(tmp_path: Path) -> None:
    db = tmp_path / "broken.db"
    db.write_bytes(b"this is not a database" * 100)
    rt = Runtime.open(f"sqlite:///{db}")
    with pytest.raises(StoreError) as info:
        await rt.start()
    assert str(db) in str(info.value)
    await rt.close()


async def test_s11_s12_retry_after_restart_is_deduplicated_and_answered_from_the_store(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'dedup.db'}"
    async with Runtime.open(url) as rt:
        sid = (await rt.create_session()).id
        first = await rt.accept_with_completion(sid, PromptInput.new("a", idempotency_key="k"))
        done = await first.wait(5)
        assert isinstance(done, CompletedWait)
    async with Runtime.open(url) as rt:
        again = await rt.accept_with_completion(sid, PromptInput.new("a", idempotency_key="k"))
        assert again.outcome.outcome_type == "deduplicated"
        assert again.input_id == first.input_id
        outcome = await again.wait(5)
        assert isinstance(outcome, CompletedWait)
        assert outcome.result.text == done.result.text
        conflict = await rt.accept(sid, PromptInput.new("b", idempotency_key="k"))
        assert conflict.outcome_type == "rejected"
        assert conflict.code.value == "idempotency_conflict"
