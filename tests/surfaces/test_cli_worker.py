"""``meerkat worker`` (S10): what it refuses, and its life on a SQLite file shared with a client
process: it takes over a session whose input waits in the inbox, runs it, and a SIGTERM (even
two of them) drains it: the lease is released and the process exits 0. The PostgreSQL
fleet (failover, partitions) is in tests/failover/."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from meerkat_runtime import Runtime
from meerkat_runtime.runtime.outcomes import CompletedWait


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "MEERKAT_STATE_DIR": str(tmp_path / "state")}


def _meerkat(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meerkat_runtime", *args],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_worker_refuses_a_private_store_and_bad_tools(tmp_path: Path) -> None:
    memory = _meerkat(tmp_path, "worker", "--store", "memory://")
    assert memory.returncode == 2
    assert "memory://" in memory.stderr and "postgresql://" in memory.stderr
    tools = _meerkat(tmp_path, "worker", "--tools", "no_such_module:registry")
    assert tools.returncode == 2 and "no_such_module" in tools.stderr
    shape = _meerkat(tmp_path, "worker", "--tools", "just-a-name")
    assert shape.returncode == 2 and "MODULE:ATTRIBUTE" in shape.stderr


async def _events(
    proc: asyncio.subprocess.Process, want: str, timeout: float
) -> list[dict[str, Any]]:
    """JSON events read from the worker's stdout up to the first one of type ``want``."""
    assert proc.stdout is not None
    seen: list[dict[str, Any]] = []
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout)
        assert line, f"the worker ended before a {want!r} event; saw {seen}"
        seen.append(json.loads(line))
        if seen[-1]["event"] == want:
            return seen


async def test_worker_takes_over_runs_and_drains(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    async with Runtime.open(url, owns_sessions=False) as client:
        sid = (await client.create_session()).id
        handle = await client.turn(sid, "hello")  # waits in the inbox: nobody runs it
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "meerkat_runtime",
            "worker",
            "--store",
            url,
            "--json",
            env=_env(tmp_path),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            seen = await _events(proc, "started", 30)
            started = seen[-1]
            assert started["max_sessions"] is None
            if not any(e["event"] == "acquired" for e in seen):  # taken at start, or later
                seen += await _events(proc, "acquired", 30)
            assert [e["session_id"] for e in seen if e["event"] == "acquired"] == [sid]
            outcome = await handle.wait(30)
            assert isinstance(outcome, CompletedWait)
            owner, _, generation = await client.store.lease_owner(sid)
            assert owner == started["owner_id"]
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGTERM)  # a second signal must not cut the drain short
            kinds = [e["event"] for e in await _events(proc, "stopped", 30)]
            assert "draining" in kinds and "released" in kinds
            assert await asyncio.wait_for(proc.wait(), 30) == 0
            owner, _, after = await client.store.lease_owner(sid)
            assert owner is None and after == generation  # released, not expired
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
