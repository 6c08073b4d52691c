"""``GET /sessions/{id}/events`` (SSE) against a real server, and shutdown with open streams.

Live: agent text deltas arrive while the turn runs, before ``run.completed``. Resume: a
client that disconnects and comes back with ``Last-Event-ID`` misses no event and sees none
twice. Pruned history: the resume starts with ``stream.events_gap``. Shutdown: open streams
and long polls end, the server stops promptly (S19).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from typing import Any

import httpx
import pytest

from meerkat_runtime import Runtime
from meerkat_runtime.errors import RuntimeClosedError
from meerkat_runtime.surfaces import rest

from .test_rest_support import api_for, live_server, read_sse, rt_config

WORDS = "alpha beta gamma delta epsilon zeta"


async def scripted(rt: Any, script: list[dict[str, Any]]) -> str:
    return str((await rt.create_session(model="offline", offline_script=script)).id)


async def test_events_stream_live_then_resume_without_gaps_or_repeats() -> None:
    async with api_for() as api:
        c = api.client
        sid = await scripted(
            api.rt,
            [
                {"type": "text", "text": WORDS, "chunk_delay": 0.03},
                {"type": "text", "text": "second answer"},
                {"type": "text", "text": "third answer"},
            ],
        )
        start = await api.rt.last_event_seq(sid)
        opened = asyncio.Event()
        reader = asyncio.create_task(
            read_sse(
                c, f"/sessions/{sid}/events?after={start}", until="run.completed", on_open=opened
            )
        )
        await asyncio.wait_for(opened.wait(), 5)
        r = await c.post(f"/sessions/{sid}/messages", json={"prompt": "go"})
        answered_at = asyncio.get_running_loop().time()
        assert r.status_code == 200 and r.json()["text"] == WORDS
        live = await reader
        first_delta = next(e for e in live if e.event == "agent.text_delta")
        assert first_delta.received_at < answered_at  # streamed while the turn ran
        codes = [e.event for e in live]
        assert "input.accepted" in codes and "run.started" in codes
        assert codes[-1] == "run.completed"
        deltas = [i for i, code in enumerate(codes) if code == "agent.text_delta"]
        assert len(deltas) >= 3 and deltas[-1] < codes.index("run.completed")
        streamed = [e.data for e in live if e.event == "agent.text_delta" and e.data]
        assert "".join(d["event"]["data"]["delta"] for d in streamed).strip() == WORDS
        seqs = [e.seq for e in live]
        assert seqs == sorted(set(seqs)) and seqs[0] == start + 1
        assert all(e.data is not None and e.data["seq"] == e.seq for e in live)
        assert all(e.data is not None and e.data["runtime_id"] == sid for e in live)

        # the client went away after the first run; two more turns happen meanwhile
        for prompt in ("two", "three"):
            assert (
                await c.post(f"/sessions/{sid}/messages", json={"prompt": prompt})
            ).status_code == 200
        last_seen = live[-1].id
        assert last_seen is not None
        resumed = await read_sse(
            c, f"/sessions/{sid}/events?follow=false", headers={"Last-Event-ID": last_seen}
        )
        everything = await read_sse(c, f"/sessions/{sid}/events?follow=false")
        assert [e.seq for e in everything] == list(range(1, everything[-1].seq + 1))
        combined = [e.seq for e in everything if e.seq <= start] + seqs + [e.seq for e in resumed]
        assert combined == [e.seq for e in everything]  # nothing missed, nothing twice
        assert [e.event for e in resumed].count("run.completed") == 2
        # ?after= is the same resume point as Last-Event-ID
        after = await read_sse(c, f"/sessions/{sid}/events?follow=false&after={last_seen}")
        assert [e.seq for e in after] == [e.seq for e in resumed]


async def test_resume_past_retention_starts_with_events_gap() -> None:
    async with api_for(config=rt_config(event_retention=5)) as api:
        c = api.client
        sid = (await c.post("/sessions", json={"prompt": "one two three"})).json()["session_id"]
        assert (
            await c.post(f"/sessions/{sid}/messages", json={"prompt": "again"})
        ).status_code == 200
        await api.rt.prune()
        events = await read_sse(c, f"/sessions/{sid}/events?follow=false")
        gap = events[0]
        assert gap.event == "stream.events_gap"
        assert gap.data is not None
        data = gap.data["event"]["data"]
        assert data["from"] == 1 and gap.seq == data["to"]
        assert events[1].seq == data["to"] + 1
        rest_seqs = [e.seq for e in events[1:]]
        assert rest_seqs == list(range(rest_seqs[0], rest_seqs[0] + len(rest_seqs)))
        # resuming from the gap's id continues right after it
        again = await read_sse(
            c, f"/sessions/{sid}/events?follow=false", headers={"Last-Event-ID": str(gap.seq)}
        )
        assert [e.seq for e in again] == rest_seqs


async def test_keepalive_comments_flow_while_idle(monkeypatch: Any) -> None:
    monkeypatch.setattr(rest, "KEEPALIVE_SECONDS", 0.1)
    async with api_for() as api:
        sid = await scripted(api.rt, [])
        comments = 0
        async with api.client.stream("GET", f"/sessions/{sid}/events") as resp:
            async for line in resp.aiter_lines():
                if line == ": keep-alive":
                    comments += 1
                    if comments == 3:
                        break
        assert comments == 3


async def test_shutdown_ends_streams_long_polls_and_turn_waits_promptly() -> None:
    async with api_for() as api:
        c = api.client
        sid = (await c.post("/sessions", json={"prompt": "hi"})).json()["session_id"]
        slow = await scripted(api.rt, [{"type": "text", "text": "never", "delay": 60}])
        r = await c.post(
            f"/sessions/{slow}/messages", params={"wait": "false"}, json={"prompt": "p"}
        )
        iid = r.json()["input_id"]
        opened = asyncio.Event()
        stream = asyncio.create_task(
            read_sse(c, f"/sessions/{sid}/events", timeout=30, on_open=opened)
        )
        poll = asyncio.create_task(c.get(f"/input/{slow}/{iid}/wait", params={"timeout": 300}))
        turn = asyncio.create_task(c.post(f"/sessions/{slow}/messages", json={"prompt": "q"}))
        await asyncio.wait_for(opened.wait(), 5)
        await asyncio.sleep(0.3)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await api.live.stop()
        assert loop.time() - t0 < 3, "shutdown took too long"
        events = await asyncio.wait_for(stream, 5)  # the stream ended cleanly
        assert events and events[-1].event is not None
        polled = await asyncio.wait_for(poll, 5)
        assert polled.status_code == 202 and polled.json()["done"] is False
        answered = await asyncio.wait_for(turn, 5)
        assert answered.status_code == 503, answered.text
        body = answered.json()
        assert body["code"] == "not_ready" and body["input_id"]
        # the turn lives on in the runtime: nothing was cancelled by the server going away
        state = await api.rt.get_input_state(slow, body["input_id"])
        assert not state.is_terminal


async def test_an_app_that_opened_its_runtime_closes_it_at_shutdown() -> None:
    app = rest.create_app(store="memory://")
    async with live_server(app) as live, httpx.AsyncClient(base_url=live.url, timeout=20) as c:
        sid = (await c.post("/sessions", json={"prompt": "hi"})).json()["session_id"]
        rt = app.state.meerkat.runtime
        assert rt is not None
        opened = asyncio.Event()
        stream = asyncio.create_task(
            read_sse(c, f"/sessions/{sid}/events", timeout=30, on_open=opened)
        )
        await asyncio.wait_for(opened.wait(), 5)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await live.stop()
        assert loop.time() - t0 < 3, "shutdown took too long"
        assert "run.completed" in [e.event for e in await asyncio.wait_for(stream, 5)]
        with pytest.raises(RuntimeClosedError):
            await rt.create_session()


async def test_serve_stops_on_sigterm_with_a_stream_open(tmp_path: Any) -> None:
    """The real entry point in its own process: SIGTERM with an open event stream ends the
    stream and the process promptly after a clean shutdown (the lifespan closed the Runtime);
    the SQLite store is left consistent."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    store = f"sqlite:///{tmp_path / 'rest.db'}"
    code = (
        "from meerkat_runtime.surfaces.rest import serve; "
        f"serve(host='127.0.0.1', port={port}, store={store!r})"
    )
    env = {k: v for k, v in os.environ.items() if k != "MEERKAT_API_TOKEN"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            for _ in range(300):
                with contextlib.suppress(httpx.TransportError):
                    if (await c.get("/health")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the server did not come up")
            sid = (await c.post("/sessions", json={"prompt": "hi"})).json()["session_id"]
            opened = asyncio.Event()
            stream = asyncio.create_task(
                read_sse(c, f"/sessions/{sid}/events", timeout=20, on_open=opened)
            )
            await asyncio.wait_for(opened.wait(), 5)
            proc.send_signal(signal.SIGTERM)
            assert proc.stdout is not None
            log = (await asyncio.wait_for(proc.stdout.read(), 10)).decode()
            # uvicorn re-raises the signal after its graceful shutdown
            assert await asyncio.wait_for(proc.wait(), 5) in (0, -signal.SIGTERM)
            assert "Application shutdown complete" in log, log
            assert "Traceback" not in log, log
            assert "run.completed" in [e.event for e in await asyncio.wait_for(stream, 5)]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    async with Runtime.open(store) as rt:
        assert (await rt.read_session(sid)).message_count == 2
