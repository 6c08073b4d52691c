"""Servers that own no session (``meerkat serve/rpc --no-own-sessions``): every turn goes to
the session's durable inbox, the server never takes a lease, and a worker that shares the
store (here a second ``Runtime`` that owns sessions) runs it; the server's waits and long
polls follow the input through the store to its outcome. Operations that need the session's
owner answer a conflict (HTTP 409 ``conflict``, JSON-RPC -32002) that names the session.

In process (``rest.create_app`` and ``rpc.serve`` on a SQLite file), and through the command
line (``meerkat rpc --no-own-sessions``, ``meerkat serve --no-own-sessions``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from meerkat_runtime import PromptInput, Runtime
from meerkat_runtime.surfaces import rest, rpc
from meerkat_runtime.surfaces._rpc_protocol import MessageWriter

from .test_rest_support import live_server, rt_config

SCRIPT = [{"type": "text", "text": "from the worker"}, {"type": "text", "text": "second turn"}]
SESSION_BUSY = -32002


def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'shared.db'}"  # four slashes: an absolute path


@contextlib.asynccontextmanager
async def worker(url: str, sid: str) -> AsyncIterator[Runtime]:
    """A process that runs sessions, sharing the server's store; it takes ``sid`` over."""
    async with Runtime.open(url, config=rt_config(), recover_on_open=False) as rt:
        assert await rt.load(sid) is not None
        yield rt


async def in_inbox(rt: Runtime, sid: str, iid: str) -> bool:
    return any(iid in e.input_json for e in await rt.store.inbox_entries(sid))


def assert_conflict(r: httpx.Response, sid: str) -> str:
    assert r.status_code == 409, (r.status_code, r.text)
    body = r.json()
    assert body["code"] == "conflict" and sid in body["error"], body
    message: str = body["error"]
    return message


# ------------------------------------------------------------------ REST


async def test_rest_turns_go_to_the_inbox_and_a_worker_runs_them(tmp_path: Path) -> None:
    url = store_url(tmp_path)
    app = rest.create_app(store=url, owns_sessions=False)
    async with (
        live_server(app) as live,
        httpx.AsyncClient(base_url=live.url, timeout=20) as c,
    ):
        server: Runtime = app.state.meerkat.runtime
        assert server.owns_sessions is False
        sid = (await server.create_session(model="offline", offline_script=SCRIPT)).id

        r = await c.post(
            f"/sessions/{sid}/messages", params={"wait": "false"}, json={"prompt": "p"}
        )
        assert r.status_code == 202, r.text
        iid = r.json()["input_id"]
        assert await in_inbox(server, sid, iid)
        assert (await server.store.lease_owner(sid))[0] is None  # no lease taken
        assert (await c.get(f"/input/{sid}/{iid}")).json()["current_state"] == "accepted"
        pending = await c.get(f"/input/{sid}/{iid}/wait", params={"timeout": 0.3})
        assert pending.status_code == 202 and pending.json()["done"] is False

        # what needs the session's owner is a conflict, and says why
        message = assert_conflict(await c.get(f"/runtime/{sid}/state"), sid)
        assert "--no-own-sessions" in message
        assert "--no-own-sessions" in assert_conflict(await c.get(f"/input/{sid}"), sid)
        assert_conflict(await c.post(f"/runtime/{sid}/retire"), sid)
        assert_conflict(await c.post(f"/runtime/{sid}/reset"), sid)
        assert_conflict(await c.post(f"/input/{sid}/{iid}/cancel"), sid)
        assert_conflict(await c.post(f"/sessions/{sid}/interrupt"), sid)
        # archiving must retire the pending input, which only its owner can do
        assert "retires its pending" in assert_conflict(await c.delete(f"/sessions/{sid}"), sid)
        assert await in_inbox(server, sid, iid)  # none of them changed anything
        assert not (await server.store.load_session(sid)).archived  # type: ignore[union-attr]

        async with worker(url, sid) as w:
            done = await c.get(f"/input/{sid}/{iid}/wait", params={"timeout": 15})
            assert done.status_code == 200, done.text
            assert done.json()["outcome_type"] == "completed"
            assert done.json()["result"]["text"] == "from the worker"
            # a blocking turn: accepted here, run there, answered here
            r = await c.post(f"/sessions/{sid}/messages", json={"prompt": "again"})
            assert r.status_code == 200, r.text
            assert r.json()["text"] == "second turn" and r.json()["session_id"] == sid
            assert (await server.store.lease_owner(sid))[0] == w.owner_id
            assert_conflict(await c.post(f"/runtime/{sid}/retire"), sid)
        history = (await c.get(f"/sessions/{sid}/history")).json()
        assert history["message_count"] == 4


async def test_rest_app_owns_sessions_by_default(tmp_path: Path) -> None:
    url = store_url(tmp_path)
    app = rest.create_app(store=url)
    async with (
        live_server(app) as live,
        httpx.AsyncClient(base_url=live.url, timeout=20) as c,
    ):
        server: Runtime = app.state.meerkat.runtime
        assert server.owns_sessions is True
        sid = (await server.create_session(model="offline", offline_script=SCRIPT)).id
        r = await c.post(f"/sessions/{sid}/messages", json={"prompt": "p"})
        assert r.status_code == 200 and r.json()["text"] == "from the worker"
        assert (await server.store.lease_owner(sid))[0] == server.owner_id


# ------------------------------------------------------------------ JSON-RPC


class InProcessRpc:
    """``rpc.serve`` on a queue of request lines; answers matched to requests by id."""

    def __init__(self, url: str) -> None:
        self.lines: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.answers: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.next_id = 0
        self.task = asyncio.get_running_loop().create_task(
            rpc.serve(
                self._chunks(),
                MessageWriter(self._write),
                store=url,
                owns_sessions=False,
                shutdown_grace=2.0,
                term_grace=0.5,
            )
        )

    async def _chunks(self) -> AsyncIterator[bytes]:
        while (line := await self.lines.get()) is not None:
            yield line

    def _write(self, data: bytes) -> None:
        for line in data.splitlines():
            msg = json.loads(line)
            fut = self.answers.pop(msg.get("id"), None) if "method" not in msg else None
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def send(self, method: str, params: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        self.next_id += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.answers[self.next_id] = fut
        msg = {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params}
        self.lines.put_nowait(json.dumps(msg).encode() + b"\n")
        return fut

    async def call(self, method: str, params: dict[str, Any], timeout: float = 15) -> Any:
        answer = await asyncio.wait_for(self.send(method, params), timeout)
        assert "result" in answer, answer
        return answer["result"]

    async def error(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        answer = await asyncio.wait_for(self.send(method, params), 15)
        assert "error" in answer, answer
        error: dict[str, Any] = answer["error"]
        return error

    async def close(self) -> None:
        self.lines.put_nowait(None)
        await asyncio.wait_for(self.task, 15)


async def test_rpc_turns_go_to_the_inbox_and_a_worker_runs_them(tmp_path: Path) -> None:
    url = store_url(tmp_path)
    client = InProcessRpc(url)
    try:
        made = await client.call(
            "session/create",
            {
                "prompt": "",
                "initial_turn": "deferred",
                "provider_params": {"offline_script": SCRIPT},
            },
        )
        sid = made["session_id"]
        async with Runtime.open(url, owns_sessions=False) as observer:
            turn = client.send("turn/start", {"session_id": sid, "prompt": "p"})

            async def queued() -> bool:
                return bool(await observer.store.inbox_entries(sid))

            for _ in range(200):
                if await queued():
                    break
                await asyncio.sleep(0.02)
            assert await queued(), "the turn never reached the inbox"
            assert (await observer.store.lease_owner(sid))[0] is None
            assert not turn.done()

            for method in ("runtime/retire", "runtime/reset", "turn/interrupt", "input/list"):
                error = await client.error(method, {"session_id": sid})
                assert error["code"] == SESSION_BUSY and sid in error["message"], (method, error)
                assert "runs no sessions" in error["message"], error

            # runtime/accept needs no owner here: the input joins the inbox (S10)
            accepted = await client.call(
                "runtime/accept",
                {"session_id": sid, "input": PromptInput.new("via accept").to_json_dict()},
            )
            assert accepted["outcome_type"] == "accepted", accepted
            assert len(await observer.store.inbox_entries(sid)) == 2

            async with worker(url, sid):
                answer = await asyncio.wait_for(turn, 15)
                assert answer["result"]["text"] == "from the worker", answer
    finally:
        await client.close()


# ------------------------------------------------------------------ the command line


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEERKAT_")}
    env["MEERKAT_STATE_DIR"] = str(tmp_path / "state")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _meerkat(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meerkat_runtime", *args],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_cli_refuses_no_own_sessions_on_a_memory_store(tmp_path: Path) -> None:
    for command in ("serve", "rpc"):
        r = _meerkat(tmp_path, command, "--no-own-sessions", "--store", "memory://")
        assert r.returncode == 2, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: --no-own-sessions"), r.stderr
        assert "memory://" in lines[0] and "postgresql://" in lines[0]
    for command in ("serve", "rpc"):
        assert "--no-own-sessions" in _meerkat(tmp_path, command, "--help").stdout


async def test_cli_rpc_without_sessions_hands_turns_to_a_worker(tmp_path: Path) -> None:
    url = store_url(tmp_path)
    async with Runtime.open(url, owns_sessions=False) as setup:
        sid = (await setup.create_session(model="offline", offline_script=SCRIPT)).id
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meerkat_runtime",
        "rpc",
        "--no-own-sessions",
        "--store",
        url,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(tmp_path),
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        request = {"jsonrpc": "2.0", "id": 1, "method": "turn/start"}
        request["params"] = {"session_id": sid, "prompt": "p"}
        proc.stdin.write(json.dumps(request).encode() + b"\n")
        await proc.stdin.drain()
        async with Runtime.open(url, owns_sessions=False) as observer:
            for _ in range(500):
                if await observer.store.inbox_entries(sid):
                    break
                await asyncio.sleep(0.02)
            assert await observer.store.inbox_entries(sid), "the turn never reached the inbox"
            assert (await observer.store.lease_owner(sid))[0] is None
        async with worker(url, sid):
            answer: dict[str, Any] = {}
            while answer.get("id") != 1:  # notifications (events) may come first
                line = await asyncio.wait_for(proc.stdout.readline(), 20)
                assert line, "the server closed stdout without answering"
                answer = json.loads(line)
        assert answer["result"]["text"] == "from the worker", answer
    finally:
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, (await proc.stderr.read()).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_cli_serve_without_sessions_hands_turns_to_a_worker(tmp_path: Path) -> None:
    url = store_url(tmp_path)
    async with Runtime.open(url, owns_sessions=False) as setup:
        sid = (await setup.create_session(model="offline", offline_script=SCRIPT)).id
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meerkat_runtime",
        "serve",
        "--no-own-sessions",
        "--port",
        str(port),
        "--store",
        url,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=_env(tmp_path),
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as c:
            for _ in range(500):
                with contextlib.suppress(httpx.TransportError):
                    if (await c.get("/health")).status_code == 200:
                        break
                await asyncio.sleep(0.02)
            r = await c.post(
                f"/sessions/{sid}/messages", params={"wait": "false"}, json={"prompt": "p"}
            )
            assert r.status_code == 202, r.text
            iid = r.json()["input_id"]
            async with Runtime.open(url, owns_sessions=False) as observer:
                assert await in_inbox(observer, sid, iid)
                assert (await observer.store.lease_owner(sid))[0] is None
            async with worker(url, sid):
                done = await c.get(f"/input/{sid}/{iid}/wait", params={"timeout": 15})
            assert done.status_code == 200 and done.json()["result"]["text"] == "from the worker"
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()
