"""``rkat-rpc`` as a subprocess, driven with raw JSON-RPC 2.0 lines: every method family,
concurrency, bad input, event streams and their resumption, callback tools, config, the
command line. The offline model everywhere (no network)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from meerkat_runtime.runtime.inputs import PromptInput

RKAT_RPC = Path(sys.executable).with_name("rkat-rpc")

pytestmark = [
    pytest.mark.skipif(not RKAT_RPC.exists(), reason="rkat-rpc is not installed"),
    pytest.mark.asyncio(loop_scope="module"),
]

SLOW = [{"type": "text", "text": "slow answer", "delay": 30}]


def script(*steps: dict[str, Any]) -> dict[str, Any]:
    """``provider_params`` that give a new offline session this script."""
    return {"offline_script": list(steps)}


class RpcClient:
    """A raw JSON-RPC client over the pipes of an ``rkat-rpc`` subprocess. Every stdout line
    must be a JSON-RPC message (the test fails otherwise)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self._next = 0
        self.pending: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self.notes: list[dict[str, Any]] = []
        self.orphans: list[dict[str, Any]] = []  # responses with an id nobody waits for
        self.server_requests: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.order: list[tuple[str, Any]] = []  # ("note", method) / ("response", id)
        self.stderr = b""
        self._changed = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())
        self._err_reader = asyncio.ensure_future(self._read_stderr())

    @classmethod
    async def start(
        cls, state_dir: Path, *args: str, env: dict[str, str] | None = None
    ) -> RpcClient:
        full_env = {k: v for k, v in os.environ.items() if k != "MEERKAT_OFFLINE_SCRIPT"}
        full_env["MEERKAT_STATE_DIR"] = str(state_dir)
        full_env.update(env or {})
        proc = await asyncio.create_subprocess_exec(
            str(RKAT_RPC),
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=full_env,
            limit=64 << 20,
        )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            msg = json.loads(line)  # stdout carries only protocol lines
            assert isinstance(msg, dict) and msg.get("jsonrpc") == "2.0", line
            if "method" in msg and "id" in msg:
                self.order.append(("request", msg["id"]))
                await self.server_requests.put(msg)
            elif "method" in msg:
                self.order.append(("note", msg["method"]))
                self.notes.append(msg)
            else:
                self.order.append(("response", msg.get("id")))
                fut = self.pending.pop(msg.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
                else:
                    self.orphans.append(msg)
            self._changed.set()
            self._changed = asyncio.Event()

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = await self.proc.stderr.read()

    async def send_line(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data + b"\n")
        await self.proc.stdin.drain()

    def send_request(self, method: str, params: Any = None) -> asyncio.Future[dict[str, Any]]:
        self._next += 1
        rid = self._next
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
        return fut

    async def request(self, method: str, params: Any = None, timeout: float = 15) -> dict[str, Any]:
        return await asyncio.wait_for(self.send_request(method, params), timeout)

    async def call(self, method: str, params: Any = None, timeout: float = 15) -> Any:
        msg = await self.request(method, params, timeout)
        assert "error" not in msg, msg
        return msg["result"]

    async def error(self, method: str, params: Any = None, timeout: float = 15) -> dict[str, Any]:
        msg = await self.request(method, params, timeout)
        assert "error" in msg, msg
        err: dict[str, Any] = msg["error"]
        return err

    async def wait_for(self, pred: Callable[[], Any], timeout: float = 10) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = pred()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("condition not met in time")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def stream_events(self, stream_id: str) -> list[dict[str, Any]]:
        return [
            n["params"]
            for n in self.notes
            if n["method"] == "session/stream_event" and n["params"]["stream_id"] == stream_id
        ]

    def session_events(self, session_id: str) -> list[dict[str, Any]]:
        return [
            n["params"]["event"]
            for n in self.notes
            if n["method"] == "session/event" and n["params"]["session_id"] == session_id
        ]

    async def close(self, timeout: float = 20) -> int:
        """Close stdin (end of input) and wait for a graceful exit; its exit code."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            rc = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise
        await asyncio.wait_for(asyncio.gather(self._reader, self._err_reader), 5)
        return rc


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def rpc(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One server shared by the tests that need no fresh store (each uses its own
    sessions), to spare process start-ups."""
    client = await RpcClient.start(
        tmp_path_factory.mktemp("shared") / "state",
        "--max-line-bytes",
        str(2 << 20),
        "--shutdown-grace",
        "3",
    )
    yield client
    if client.proc.returncode is None:
        rc = await client.close()
        assert rc == 0, client.stderr.decode()


async def create(rpc: RpcClient, prompt: str = "hello", **params: Any) -> dict[str, Any]:
    result: dict[str, Any] = await rpc.call("session/create", {"prompt": prompt, **params})
    return result


# ------------------------------------------------------------------ handshake


async def test_initialize_capabilities_and_unavailable_families(rpc: RpcClient) -> None:
    orphans = len(rpc.orphans)
    init = await rpc.call("initialize", {})
    assert init["contract_version"] == "0.4.10"
    assert init["server_info"]["name"] == "meerkat-rpc"
    for method in (
        "session/create",
        "turn/start",
        "session/stream_open",
        "runtime/accept",
        "input/wait",
        "config/patch",
        "tools/register",
    ):
        assert method in init["methods"]
    assert not any(m.startswith(("mob/", "skills/", "mcp/")) for m in init["methods"])

    # a client notification gets no answer
    await rpc.send_line(b'{"jsonrpc":"2.0","method":"initialized"}')

    caps = await rpc.call("capabilities/get")
    status = {c["id"]: c["status"] for c in caps["capabilities"]}
    assert status["sessions"] == "Available" and status["streaming"] == "Available"
    assert status["comms"] == "Available"  # comms/send, comms/peers: test_comms_surfaces.py
    for missing in ("skills", "mcp_live", "shell", "hooks", "mob"):
        assert status[missing] != "Available"

    for method, capability in (
        ("mob/create", "mob"),
        ("mob/prefabs", "mob"),
        ("skills/list", "skills"),
        ("mcp/add", "mcp_live"),
        ("models/catalog", "models"),
    ):
        err = await rpc.error(method, {})
        assert err["code"] == -32601
        assert err["data"]["capability"] == capability
    err = await rpc.error("no/such/method", {})
    assert err["code"] == -32601 and err["data"]["code"] == "method_not_found"
    assert len(rpc.orphans) == orphans  # the notification was not answered


# ------------------------------------------------------------------ bad input


async def test_bad_input_is_answered_and_changes_nothing(rpc: RpcClient) -> None:
    session = await create(rpc, "first", labels={"test": "bad-input"})
    sid = session["session_id"]
    before = await rpc.call("session/history", {"session_id": sid})
    base = len(rpc.orphans)

    await rpc.send_line(b'{"jsonrpc": "2.0", "id": 1, "method": ')  # malformed JSON
    await rpc.send_line(b"[1, 2]")  # a batch
    await rpc.send_line(b'"just a string"')
    await rpc.send_line(b'{"id": "raw-1", "method": "session/list"}')  # no "jsonrpc"
    await rpc.send_line(b'{"jsonrpc": "2.0", "id": "raw-2", "method": 5}')
    await rpc.send_line(b'{"jsonrpc": "2.0", "id": [1], "method": "session/list"}')
    await rpc.wait_for(lambda: len(rpc.orphans) >= base + 6)
    answered = rpc.orphans[base:]
    by_id = {json.dumps(o["id"]): o["error"] for o in answered}
    codes = [o["error"]["code"] for o in answered if o["id"] is None]
    assert codes == [-32700, -32600, -32600, -32600]
    assert by_id['"raw-1"']["code"] == -32600 and by_id['"raw-2"']["code"] == -32600

    err = await rpc.error("session/list", [1, 2])  # params by position
    assert err["code"] == -32602
    err = await rpc.error("session/create", {"prompt": 5})
    assert (err["code"], err["data"]["code"], err["data"]["field"]) == (
        -32602,
        "bad_request",
        "prompt",
    )
    err = await rpc.error("session/create", {"prompt": "x", "enable_shell": True})
    assert (err["code"], err["data"]["code"]) == (-32602, "unsupported")
    err = await rpc.error("session/create", {"prompt": "x", "model": "no-such-model"})
    assert err["code"] == -32602
    err = await rpc.error("session/create", {"prompt": "x", "provider_params": script({"x": 1})})
    assert err["code"] == -32602
    err = await rpc.error("turn/start", {"session_id": sid, "prompt": ["not", "text"]})
    assert err["code"] == -32602
    err = await rpc.error("turn/start", {"session_id": sid, "prompt": "x", "max_tokens": 0})
    assert err["code"] == -32602
    err = await rpc.error("session/history", {"session_id": sid, "offset": "x"})
    assert err["code"] == -32602 and err["data"]["field"] == "offset"
    err = await rpc.error("input/state", {"session_id": sid, "input_id": "not-a-uuid"})
    assert err["code"] == -32602
    err = await rpc.error("turn/start", {"session_id": "nope", "prompt": "x"})
    assert (err["code"], err["data"]["code"]) == (-32001, "not_found")
    for method in ("session/read", "session/history", "runtime/state", "turn/interrupt"):
        assert (await rpc.error(method, {"session_id": "nope"}))["code"] == -32001
    err = await rpc.error("session/read", {})
    assert err["code"] == -32602 and err["data"]["field"] == "session_id"

    # a line over the transport limit (2 MiB here): refused with the id recovered
    huge = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": "raw-huge",
            "method": "turn/start",
            "params": {"session_id": sid, "prompt": "x" * (3 << 20)},
        }
    ).encode()
    await rpc.send_line(huge)
    await rpc.wait_for(lambda: any(o["id"] == "raw-huge" for o in rpc.orphans))
    too_big = next(o for o in rpc.orphans if o["id"] == "raw-huge")["error"]
    assert too_big["code"] == -32600 and too_big["data"]["code"] == "too_large"
    assert "2097152" in too_big["message"]
    # an input over the runtime's input limit (1 MiB): rejected, nothing accepted
    err = await rpc.error("turn/start", {"session_id": sid, "prompt": "y" * (1500 << 10)})
    assert (err["code"], err["data"]["code"]) == (-32602, "too_large")

    # nothing changed, and the server still works
    after = await rpc.call("session/history", {"session_id": sid})
    assert after == before
    listed = await rpc.call("session/list", {"labels": {"test": "bad-input"}})
    assert [s["session_id"] for s in listed["sessions"]] == [sid]
    assert (await rpc.call("turn/start", {"session_id": sid, "prompt": "still here"}))["text"]


# ------------------------------------------------------------------ sessions and turns


async def test_sessions_turns_overrides_and_events(rpc: RpcClient) -> None:
    request = rpc.send_request(
        "session/create",
        {
            "prompt": "alpha",
            "labels": {"team": "red", "test": "sessions"},
            "system_prompt": "one two three",
        },
    )
    request_id = rpc._next
    a = (await asyncio.wait_for(request, 10))["result"]
    assert a["text"].startswith('offline model: you said "alpha"')
    assert a["turns"] == 1 and a["usage"]["input_tokens"] == 4  # 3 system words + 1
    sid = a["session_id"]
    # every agent event of the run was written before the response
    events = rpc.session_events(sid)
    assert [e["type"] for e in events][:2] == ["run_started", "turn_started"]
    assert events[-1]["type"] == "run_completed"
    assert "".join(e["delta"] for e in events if e["type"] == "text_delta") == a["text"]
    last_note = max(i for i, item in enumerate(rpc.order) if item == ("note", "session/event"))
    assert rpc.order.index(("response", request_id)) > last_note

    b = await rpc.call(
        "session/create",
        {
            "prompt": "context",
            "initial_turn": "deferred",
            "labels": {"team": "blue", "test": "sessions"},
            "provider_params": script({"type": "text", "text": '{"answer": 42}'}),
        },
    )
    assert set(b) == {"session_id"}
    bid = b["session_id"]
    first = await rpc.call(
        "turn/start",
        {
            "session_id": bid,
            "prompt": "go",
            "output_schema": {"type": "object", "required": ["answer"]},
            "system_prompt": "five words of system prompt",
        },
    )
    assert first["structured_output"] == {"answer": 42}
    assert first["usage"]["input_tokens"] == 5 + 2  # the override and "context\n\ngo"
    # the overrides applied to that run only
    second = await rpc.call("turn/start", {"session_id": bid, "prompt": "again"})
    assert "structured_output" not in second
    assert second["text"].startswith('offline model: you said "again"')

    info = await rpc.call("session/read", {"session_id": bid})
    assert info["session_id"] == bid and info["message_count"] == 4
    assert info["labels"] == {"team": "blue", "test": "sessions"} and info["archived"] is False
    history = await rpc.call("session/history", {"session_id": bid, "offset": 1, "limit": 2})
    assert history["message_count"] == 4 and history["has_more"] is True
    assert [m["role"] for m in history["messages"]] == ["assistant", "user"]

    mine = {"labels": {"test": "sessions"}}
    listed = await rpc.call("session/list", mine)
    assert [s["session_id"] for s in listed["sessions"]] == [sid, bid]
    assert listed["sessions"][0]["message_count"] == 2
    red = await rpc.call("session/list", {"labels": {"team": "red"}})
    assert [s["session_id"] for s in red["sessions"]] == [sid]
    page = await rpc.call("session/list", {**mine, "offset": 1, "limit": 1})
    assert [s["session_id"] for s in page["sessions"]] == [bid]

    archived = await rpc.call("session/archive", {"session_id": sid})
    assert archived["archived"] is True
    assert [s["session_id"] for s in (await rpc.call("session/list", mine))["sessions"]] == [bid]
    err = await rpc.error("turn/start", {"session_id": sid, "prompt": "x"})
    assert err["code"] == -32001
    assert (await rpc.call("session/read", {"session_id": sid}))["archived"] is True


async def test_two_slow_turns_on_two_sessions_overlap(rpc: RpcClient) -> None:
    slow = script({"type": "text", "text": "done", "delay": 1.5})
    ids = []
    for _ in range(2):
        made = await rpc.call(
            "session/create", {"prompt": "", "initial_turn": "deferred", "provider_params": slow}
        )
        ids.append(made["session_id"])
    started = time.monotonic()
    futures = [rpc.send_request("turn/start", {"session_id": s, "prompt": "go"}) for s in ids]
    results = await asyncio.wait_for(asyncio.gather(*futures), 10)
    elapsed = time.monotonic() - started
    assert [r["result"]["text"] for r in results] == ["done", "done"]
    assert elapsed < 2.7, f"the turns did not overlap ({elapsed:.2f} s; 3 s in sequence)"


# ------------------------------------------------------------------ runtime and inputs


async def test_runtime_and_input_methods(rpc: RpcClient) -> None:
    made = await rpc.call(
        "session/create",
        {
            "prompt": "",
            "initial_turn": "deferred",
            "provider_params": script(
                {"type": "text", "text": "quick"}, {"type": "text", "text": "slow", "delay": 30}
            ),
        },
    )
    sid = made["session_id"]
    assert (await rpc.call("runtime/state", {"session_id": sid}))["state"] == "idle"

    prompt = PromptInput.new("via accept", idempotency_key="k1").to_json_dict()
    accepted = await rpc.call("runtime/accept", {"session_id": sid, "input": prompt})
    assert accepted["outcome_type"] == "accepted"
    iid = accepted["input_id"]
    again = PromptInput.new("via accept", idempotency_key="k1").to_json_dict()
    dup = await rpc.call("runtime/accept", {"session_id": sid, "input": again})
    assert dup["outcome_type"] == "deduplicated" and dup["existing_id"] == iid
    waited = await rpc.call("input/wait", {"session_id": sid, "input_id": iid, "timeout": 10})
    assert waited["timed_out"] is False and waited["outcome"]["outcome_type"] == "completed"
    assert waited["outcome"]["result"]["text"] == "quick"
    state = await rpc.call("input/state", {"session_id": sid, "input_id": iid})
    assert state["current_state"] == "consumed"
    unknown = "01900000-0000-7000-8000-000000000000"
    assert await rpc.call("input/state", {"session_id": sid, "input_id": unknown}) is None
    bad = await rpc.call("runtime/accept", {"session_id": sid, "input": {"input_type": "nope"}})
    assert bad["outcome_type"] == "rejected" and bad["code"] == "invalid"

    injected = await rpc.call(
        "session/inject_context",
        {"session_id": sid, "text": "the build is green", "source": "ci", "idempotency_key": "c1"},
    )
    assert injected["status"] == "applied"
    repeat = await rpc.call(
        "session/inject_context",
        {"session_id": sid, "text": "the build is green", "source": "ci", "idempotency_key": "c1"},
    )
    assert repeat["status"] == "duplicate"
    history = await rpc.call("session/history", {"session_id": sid})
    assert history["messages"][-1]["content"] == "the build is green"

    # a slow turn; a prompt queued behind it is cancelled; the turn is interrupted
    turn = rpc.send_request("turn/start", {"session_id": sid, "prompt": "take your time"})
    await rpc.wait_for(
        lambda: any(e["type"] == "turn_started" for e in rpc.session_events(sid)[-3:])
    )
    assert (await rpc.call("runtime/state", {"session_id": sid}))["state"] == "running"
    queued = await rpc.call(
        "runtime/accept", {"session_id": sid, "input": PromptInput.new("later").to_json_dict()}
    )
    qid = queued["input_id"]
    listed = await rpc.call("input/list", {"session_id": sid})
    assert qid in listed["input_ids"]
    cancelled = await rpc.call("input/cancel", {"session_id": sid, "input_id": qid})
    assert cancelled["current_state"] == "abandoned"
    waited = await rpc.call("input/wait", {"session_id": sid, "input_id": qid, "timeout": 0})
    assert waited["outcome"]["outcome_type"] == "cancelled"  # abandoned{cancelled} (S12)
    stopped = await rpc.call("turn/interrupt", {"session_id": sid})
    assert stopped == {"session_id": sid, "interrupted": True, "was_running": True}
    answer = await asyncio.wait_for(turn, 10)
    assert answer["error"]["code"] == -32603 and answer["error"]["data"]["code"] == "cancelled"
    await rpc.wait_for(lambda: True)
    assert (await rpc.call("runtime/cancel", {"session_id": sid}))["cancelled"] is False

    # a wait that times out says so
    slow_prompt = PromptInput.new("slow again").to_json_dict()
    pending = await rpc.call("runtime/accept", {"session_id": sid, "input": slow_prompt})
    timed = await rpc.call(
        "input/wait", {"session_id": sid, "input_id": pending["input_id"], "timeout": 0.1}
    )
    assert timed["timed_out"] is True and timed["outcome"] is None
    assert (await rpc.call("runtime/cancel", {"session_id": sid}))["cancelled"] is True

    # lifecycle: retire refuses new input, respawn and reset bring it back, destroy ends it
    retired = await rpc.call("runtime/retire", {"session_id": sid})
    assert retired["state"] == "retired"
    refused = await rpc.call(
        "runtime/accept", {"session_id": sid, "input": PromptInput.new("no").to_json_dict()}
    )
    assert refused["outcome_type"] == "rejected" and refused["code"] == "not_ready"
    err = await rpc.error("turn/start", {"session_id": sid, "prompt": "no"})
    assert err["code"] == -32002 and err["data"]["code"] == "not_ready"
    reset = await rpc.call("runtime/reset", {"session_id": sid})
    assert reset["state"] == "idle"
    recovered = await rpc.call("runtime/recover", {"session_id": sid})
    assert recovered["state"] == "idle" and isinstance(recovered["report"], dict)
    planned = await rpc.call("runtime/retire", {"session_id": sid, "replacement_planned": True})
    assert "inputs_abandoned" in planned
    respawned = await rpc.call("runtime/respawn", {"session_id": sid})
    assert respawned["state"] == "idle"
    destroyed = await rpc.call("runtime/destroy", {"session_id": sid})
    assert destroyed["state"] == "destroyed"
    err = await rpc.error("runtime/reset", {"session_id": sid})
    assert err["code"] == -32002


# ------------------------------------------------------------------ event streams


def _payload_type(params: dict[str, Any]) -> str:
    return str(params["event"]["payload"].get("type", ""))


async def test_stream_resume_misses_nothing_and_repeats_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    rpc = await RpcClient.start(state)
    made = await rpc.call("session/create", {"prompt": "", "initial_turn": "deferred"})
    sid = made["session_id"]
    full = await rpc.call("session/stream_open", {"session_id": sid, "after_seq": 0})
    assert full["opened"] is True and full["after_seq"] == 0
    await rpc.call("turn/start", {"session_id": sid, "prompt": "one two three four"})
    await rpc.wait_for(
        lambda: any(
            _payload_type(p) == "run_completed" for p in rpc.stream_events(full["stream_id"])
        )
    )
    everything = rpc.stream_events(full["stream_id"])
    seqs = [p["event"]["seq"] for p in everything]
    assert seqs == list(range(1, len(seqs) + 1))  # the whole sequence, in order
    assert [p["sequence"] for p in everything] == list(range(1, len(everything) + 1))
    env = everything[0]["event"]
    assert set(env) >= {"event_id", "source_id", "seq", "timestamp_ms", "payload"}
    assert env["source_id"] == sid
    assert {_payload_type(p) for p in everything} >= {
        "input.accepted",
        "run.started",
        "run_started",
        "text_delta",
        "run_completed",
    }

    # a live stream from "now" sees only what happens next
    live = await rpc.call("session/stream_open", {"session_id": sid})
    assert live["after_seq"] == seqs[-1]

    # read part of the sequence, close, reopen after the last seq seen
    part = await rpc.call("session/stream_open", {"session_id": sid, "after_seq": 0})
    await rpc.wait_for(lambda: len(rpc.stream_events(part["stream_id"])) >= 5)
    closed = await rpc.call("session/stream_close", {"stream_id": part["stream_id"]})
    assert closed["closed"] is True and closed["already_closed"] is False
    first_half = rpc.stream_events(part["stream_id"])
    assert [p["event"]["seq"] for p in first_half] == seqs[: len(first_half)]
    ends = [n["params"] for n in rpc.notes if n["method"] == "session/stream_end"]
    assert ends == [
        {
            "stream_id": part["stream_id"],
            "session_id": sid,
            "ended": True,
            "outcome": "explicit_close",
        }
    ]
    again = await rpc.call("session/stream_close", {"stream_id": part["stream_id"]})
    assert again["already_closed"] is True
    err = await rpc.error("session/stream_close", {"stream_id": "stream-nope"})
    assert err["code"] == -32602

    resumed = await rpc.call(
        "session/stream_open", {"session_id": sid, "after_seq": first_half[-1]["event"]["seq"]}
    )
    await rpc.call("turn/start", {"session_id": sid, "prompt": "five six"})
    await rpc.wait_for(
        lambda: (
            sum(
                _payload_type(p) == "run_completed"
                for p in first_half + rpc.stream_events(resumed["stream_id"])
            )
            >= 2
        )
    )
    second = rpc.stream_events(resumed["stream_id"])
    union = [p["event"]["seq"] for p in first_half + second]
    assert len(union) == len(set(union))  # none twice
    assert union == list(range(1, union[-1] + 1))  # none missed
    await rpc.wait_for(lambda: len(rpc.stream_events(full["stream_id"])) >= len(union))
    final = rpc.stream_events(full["stream_id"])
    assert [p["event"]["seq"] for p in final][: len(union)] == union
    live_seqs = [p["event"]["seq"] for p in rpc.stream_events(live["stream_id"])]
    assert live_seqs and live_seqs[0] == seqs[-1] + 1
    stored_before = [
        p["event"] for p in rpc.stream_events(full["stream_id"]) if _payload_type(p) != "text_delta"
    ]
    assert await rpc.close() == 0

    # after a restart the stored events are all there: resume after seq k misses none
    rpc2 = await RpcClient.start(state)
    try:
        k = 5
        reopened = await rpc2.call("session/stream_open", {"session_id": sid, "after_seq": k})
        expected = [e for e in stored_before if e["seq"] > k]
        await rpc2.wait_for(lambda: len(rpc2.stream_events(reopened["stream_id"])) >= len(expected))
        got = [p["event"] for p in rpc2.stream_events(reopened["stream_id"])]
        got = [e for e in got if e["seq"] <= stored_before[-1]["seq"]]
        assert [(e["seq"], e["event_id"]) for e in got] == [
            (e["seq"], e["event_id"]) for e in expected
        ]
        # archiving the session ends its streams
        await rpc2.call("session/archive", {"session_id": sid})
        await rpc2.wait_for(
            lambda: any(
                n["method"] == "session/stream_end" and n["params"]["outcome"] == "remote_end"
                for n in rpc2.notes
            )
        )
    finally:
        assert await rpc2.close() == 0


# ------------------------------------------------------------------ callback tools


async def test_callback_tools_round_trip(rpc: RpcClient) -> None:
    registered = await rpc.call(
        "tools/register",
        {
            "tools": [
                {
                    "name": "lookup",
                    "description": "Look something up",
                    "input_schema": {
                        "type": "object",
                        "properties": {"q": {"type": "string"}},
                        "required": ["q"],
                    },
                }
            ]
        },
    )
    assert registered["registered"] == ["lookup"]
    for bad in (
        {"tools": [{"name": "wait"}]},
        {"tools": [{"name": "bad name"}]},
        {"tools": [{"name": "t", "input_schema": {"type": "string"}}]},
        {"tools": "lookup"},
    ):
        assert (await rpc.error("tools/register", bad))["code"] == -32602

    turn = rpc.send_request(
        "session/create",
        {
            "prompt": "look it up",
            "provider_params": script(
                {"type": "tool", "name": "lookup", "args": {"q": "meerkats"}},
                {"type": "tool", "name": "lookup", "args": {"q": "fail"}},
                {"type": "text", "text": "all done"},
            ),
        },
    )
    for answer in (
        {"content": "meerkats live in the Kalahari", "is_error": False},
        {"content": "the index is offline", "is_error": True},
    ):
        req = await asyncio.wait_for(rpc.server_requests.get(), 10)
        assert req["method"] == "tool/execute"
        assert req["params"]["name"] == "lookup" and "q" in req["params"]["arguments"]
        await rpc.send_line(
            json.dumps({"jsonrpc": "2.0", "id": req["id"], "result": answer}).encode()
        )
    result = (await asyncio.wait_for(turn, 10))["result"]
    assert result["text"] == "all done" and result["tool_calls"] == 2
    history = await rpc.call("session/history", {"session_id": result["session_id"]})
    tool_results = [m["results"][0] for m in history["messages"] if m["role"] == "tool_results"]
    assert tool_results == [
        {"tool_use_id": "call_0", "content": "meerkats live in the Kalahari", "is_error": False},
        {"tool_use_id": "call_1", "content": "the index is offline", "is_error": True},
    ]

    # a call the client never answers ends with the run's cancellation
    slow = rpc.send_request(
        "session/create",
        {
            "prompt": "again",
            "provider_params": script({"type": "tool", "name": "lookup", "args": {"q": "x"}}),
        },
    )
    req = await asyncio.wait_for(rpc.server_requests.get(), 10)
    sid = req["params"]["session_id"]
    await rpc.call("turn/interrupt", {"session_id": sid})
    answer = await asyncio.wait_for(slow, 10)
    assert answer["error"]["data"]["code"] == "cancelled"
    # a late answer is ignored
    await rpc.send_line(
        json.dumps({"jsonrpc": "2.0", "id": req["id"], "result": {"content": "late"}}).encode()
    )
    assert (await rpc.call("session/read", {"session_id": sid}))["session_id"] == sid


# ------------------------------------------------------------------ config


async def test_config_get_set_patch_persist_and_apply(tmp_path: Path) -> None:
    state = tmp_path / "state"
    rpc = await RpcClient.start(state)
    try:
        got = await rpc.call("config/get")
        assert got["config"] == {"model": "offline"} and got["generation"] == 0
        assert got["persisted"] is True
        set_ = await rpc.call(
            "config/set",
            {
                "config": {
                    "model": "offline",
                    "system_prompt": "alpha beta",
                    "offline_script": [{"type": "text", "text": "from config"}],
                }
            },
        )
        assert set_["generation"] == 1
        patched = await rpc.call(
            "config/patch", {"patch": {"system_prompt": None, "max_tokens": 64}}
        )
        assert patched["config"] == {
            "model": "offline",
            "max_tokens": 64,
            "offline_script": [{"type": "text", "text": "from config"}],
        }
        assert patched["generation"] == 2
        err = await rpc.error(
            "config/patch", {"patch": {"max_tokens": 1}, "expected_generation": 1}
        )
        assert (err["code"], err["data"]["code"]) == (-32002, "conflict")
        err = await rpc.error("config/patch", {"patch": {"colour": "red"}})
        assert err["code"] == -32602
        err = await rpc.error("config/set", {"config": {"max_tokens": "many"}})
        assert err["code"] == -32602
        err = await rpc.error("config/set", {"config": {"offline_script": [{"type": "x"}]}})
        assert err["code"] == -32602
        assert (await rpc.call("config/get"))["generation"] == 2  # nothing changed

        made = await create(rpc, "hi")
        assert made["text"] == "from config"
        own = await create(rpc, "hi", provider_params=script({"type": "text", "text": "mine"}))
        assert own["text"] == "mine"
        echo = await create(rpc, "hi", provider_params={"offline_script": None})
        assert echo["text"].startswith("offline model")
    finally:
        assert await rpc.close() == 0
    stored = json.loads((state / "rpc-config.json").read_text())
    assert stored["generation"] == 2
    rpc2 = await RpcClient.start(state)
    try:
        assert (await rpc2.call("config/get"))["config"]["max_tokens"] == 64
    finally:
        assert await rpc2.close() == 0


# ------------------------------------------------------------------ command line, shutdown


async def test_command_line_options_env_script_and_shutdown(tmp_path: Path) -> None:
    # the options MeerkatClient.connect passes are accepted; --realm/--state-root pick the store
    root = tmp_path / "root"
    rpc = await RpcClient.start(
        tmp_path / "unused",
        "--realm",
        "team-a",
        "--state-root",
        str(root),
        "--instance",
        "i1",
        "--realm-backend",
        "sqlite",
        "--context-root",
        str(tmp_path),
        "--user-config-root",
        str(tmp_path),
        env={"MEERKAT_OFFLINE_SCRIPT": json.dumps([{"type": "text", "text": "scripted"}])},
    )
    assert (await create(rpc, "hi"))["text"] == "scripted"
    # end of input: a request still in flight is answered before the process exits
    slow = script({"type": "text", "text": "finished", "delay": 0.5})
    fut = rpc.send_request("session/create", {"prompt": "x", "provider_params": slow})
    assert await rpc.close() == 0
    assert fut.done() and fut.result()["result"]["text"] == "finished"
    assert (root / "realms" / "team-a" / "meerkat.db").exists()
    assert not (tmp_path / "unused").exists()

    # --isolated keeps nothing; SIGTERM stops an active run quickly and answers its request
    isolated = await RpcClient.start(tmp_path / "iso", "--isolated", "--term-grace", "0.2")
    assert (await isolated.call("config/get"))["persisted"] is False
    turn = isolated.send_request(
        "session/create", {"prompt": "x", "provider_params": script(*SLOW)}
    )
    await isolated.wait_for(lambda: isolated.notes)
    started = time.monotonic()
    isolated.proc.terminate()
    assert await asyncio.wait_for(isolated.proc.wait(), 10) == 0
    assert time.monotonic() - started < 5
    await asyncio.wait_for(isolated._reader, 5)
    answer = turn.result()
    assert answer["error"]["code"] == -32002 and answer["error"]["data"]["code"] == "not_ready"
    assert not (tmp_path / "iso").exists()

    bad = await RpcClient.start(tmp_path / "x", env={"MEERKAT_OFFLINE_SCRIPT": "[{]"})
    assert await bad.close() == 2
    assert b"MEERKAT_OFFLINE_SCRIPT" in bad.stderr
