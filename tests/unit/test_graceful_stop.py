"""S4/S19: a graceful stop in the middle of a run is not a crash. The run is recorded as
cancelled, and the next open recovers its inputs without counting an attempt (only a process
that died in a run costs its inputs one, so a stop-and-restart loop never spends the retry
budget)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from meerkat_runtime import Runtime
from meerkat_runtime.runtime.input_state import InputLifecycleState as IS
from meerkat_runtime.runtime.outcomes import CompletedWait

SCRIPT = [
    {"type": "tool", "name": "slow", "duration": 0.5, "result": "r"},
    {"type": "text", "text": "done"},
]


async def _stop_mid_run(url: str, sid: str | None) -> tuple[str, str]:
    async with Runtime.open(url) as rt:
        if sid is None:
            sid = (await rt.create_session(offline_script=SCRIPT)).id
            handle = await rt.turn(sid, "go")
            iid = str(handle.input_id)
        else:
            iid = ""
        rt_ = await rt.load(sid)
        assert rt_ is not None
        for _ in range(200):
            if rt_.active_run_id is not None:
                break
            await asyncio.sleep(0.01)
        assert rt_.active_run_id is not None
        await rt.close(grace=0)
    return sid, iid


async def _stored(url: str, sid: str, iid: str):  # type: ignore[no-untyped-def]
    from meerkat_runtime._ids import InputId

    async with Runtime.open(url, recover_on_open=False) as rt:
        return await rt.store.load_input_state(sid, InputId(iid))


async def test_a_graceful_stop_mid_run_costs_no_attempt(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    sid, iid = await _stop_mid_run(url, None)
    for _ in range(4):  # more stop-and-restart cycles than the retry budget (3)
        state = await _stored(url, sid, iid)
        assert state is not None
        assert state.attempt_count == 0
        assert state.current_state in (IS.STAGED, IS.APPLIED_PENDING_CONSUMPTION)
        await _stop_mid_run(url, sid)
    state = await _stored(url, sid, iid)
    assert state is not None and state.attempt_count == 0 and not state.is_terminal
    # and it still completes once a process lets it
    async with Runtime.open(url) as rt:
        rt_ = await rt.load(sid)
        assert rt_ is not None
        out = await rt.wait(sid, iid, 60)
        assert isinstance(out, CompletedWait)
