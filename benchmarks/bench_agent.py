"""Agent core: runtime overhead per turn and cancel latency of the built-in agent.

1. **Overhead per turn** on the offline model: N turns (``rt.turn`` then ``handle.wait()``)
   of (a) a text-only turn (one model call) and (b) a tool turn (a model call that asks for
   one registered trivial async tool, the tool, a second model call with the final answer),
   on the memory store and on SQLite (a temp file), either one session at a time
   ("sequential") or with many sessions running turns at once ("parallel"). The time spent
   inside the model (``OfflineModel.complete``, minus the ``on_text`` callbacks, which are the
   runtime's event publishing) and inside the tool (its own body) is measured and subtracted:
   what remains is the runtime's overhead (accept, run start, boundary and checkpoint commits,
   events, tool dispatch, waiter resolution).
2. **Cancel latency**: ``rt.interrupt(sid)`` during a long model call (offline, a text step
   with a long ``chunk_delay``), a long async tool, a long sync tool (a thread blocked on a
   ``threading.Event``, released after each cancel), the built-in ``wait``, and an
   OpenAI-compatible SSE stream from a loopback HTTP server (``tests/providers/loopback.py``).
   Latency runs from the ``interrupt`` call to (a) ``handle.wait()`` returning ``cancelled``
   and (b) a subscriber of ``rt.events`` seeing ``run.cancelled``.

    python benchmarks/bench_agent.py                 # full run, about 2 minutes
    python benchmarks/bench_agent.py --quick         # smoke run, about 15 s
    python benchmarks/bench_agent.py --write         # also update results.md
    python benchmarks/bench_agent.py --profile-cancel sync_tool   # pyinstrument one case
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    loadavg,
    machine,
    ms,
    pct,
    print_machine,
    section_head,
    store_urls,
    us,
    write_section,
)

from meerkat_runtime import Runtime
from meerkat_runtime.core.agent import AgentConfig, AgentExecutor
from meerkat_runtime.core.tools import ToolRegistry
from meerkat_runtime.llm.base import ModelRequest, ModelResponse, TextSink
from meerkat_runtime.llm.offline import OfflineModel

ROOT = Path(__file__).resolve().parent.parent
clock = time.perf_counter
RESULTS = Path(__file__).resolve().parent / "results.md"
SECTION = "## Agent core (bench_agent.py)"


# ---------------------------------------------------------------------------- overhead


@dataclass
class Spent:
    """Seconds spent inside the model and inside tools (one per session)."""

    model: float = 0.0
    tool: float = 0.0
    model_calls: int = 0
    tool_calls: int = 0


class TimedOfflineModel(OfflineModel):
    """The offline model, timing ``complete`` and ``before_boundary`` (the agent calls it
    before each run's boundary). The ``on_text`` callbacks it makes are the agent publishing
    ``text_delta`` events (runtime work), so their time is not counted."""

    def __init__(self, script: Sequence[Mapping[str, Any]], spent: Spent) -> None:
        super().__init__(script)
        self.spent = spent

    async def complete(
        self, request: ModelRequest, *, on_text: TextSink | None = None
    ) -> ModelResponse:
        started = clock()
        in_sink = 0.0
        sink = on_text
        if on_text is not None:
            inner = on_text

            def sink(piece: str) -> None:
                nonlocal in_sink
                t = clock()
                inner(piece)
                in_sink += clock() - t

        try:
            return await super().complete(request, on_text=sink)
        finally:
            self.spent.model += clock() - started - in_sink
            self.spent.model_calls += 1

    async def before_boundary(self, request: ModelRequest) -> None:
        started = clock()
        try:
            await super().before_boundary(request)
        finally:
            self.spent.model += clock() - started


TEXT = "The answer is forty-two, as computed by the offline model."


def text_script(turns: int) -> list[dict[str, Any]]:
    return [{"type": "text", "text": TEXT}] * turns


def tool_script(turns: int) -> list[dict[str, Any]]:
    step: list[dict[str, Any]] = [
        {"type": "tool", "name": "lookup", "args": {"key": "forty-two"}},
        {"type": "text", "text": TEXT},
    ]
    return step * turns


def timed_tools(spent: Spent) -> ToolRegistry:
    registry = ToolRegistry()

    @registry.tool
    async def lookup(key: str) -> str:
        """Look a key up (trivial: upper-cases it)."""
        started = clock()
        value = key.upper()
        spent.tool += clock() - started
        spent.tool_calls += 1
        return value

    return registry


@dataclass
class OverheadResult:
    kind: str  # "text" / "tool"
    mode: str  # "sequential" / "parallel"
    store: str
    turns: int
    sessions: int
    elapsed: float
    cpu: float
    latency: list[float]
    overhead: list[float]
    model: float
    tool: float
    model_calls: int
    tool_calls: int

    @property
    def turns_per_s(self) -> float:
        return self.turns / self.elapsed

    @property
    def amortised_overhead(self) -> float:
        """Wall time per turn that was not spent in the model or tools."""
        return (self.elapsed - self.model - self.tool) / self.turns


async def overhead_run(url: str, kind: str, mode: str, turns: int, sessions: int) -> OverheadResult:
    """``turns`` turns over ``sessions`` sessions (``turns // sessions`` each): one session
    after the other (sequential) or all sessions at once, each a closed loop (parallel)."""
    per = turns // sessions
    script = text_script(per) if kind == "text" else tool_script(per)
    rt = Runtime.open(url)
    try:
        sids: list[str] = []
        spent: dict[str, Spent] = {}
        for _ in range(sessions):
            s = Spent()
            executor = AgentExecutor(
                AgentConfig(model="offline", offline_script=script),
                model=TimedOfflineModel(script, s),
                tools=timed_tools(s),
            )
            sid = (await rt.create_session(executor=executor)).id
            sids.append(sid)
            spent[sid] = s
        latency: list[float] = []
        overhead: list[float] = []

        async def loop(sid: str) -> None:
            s = spent[sid]
            for i in range(per):
                before = s.model + s.tool
                t0 = clock()
                handle = await rt.turn(sid, f"question {i}: what is the answer?")
                outcome = await handle.wait()
                took = clock() - t0
                if outcome.outcome_type != "completed":
                    raise SystemExit(f"benchmark invalid: a turn ended {outcome.to_json()}")
                latency.append(took)
                overhead.append(took - (s.model + s.tool - before))

        gc.collect()
        t0, c0 = clock(), time.process_time()
        if mode == "sequential":
            for sid in sids:
                await loop(sid)
        else:
            await asyncio.gather(*(loop(sid) for sid in sids))
        elapsed, cpu = clock() - t0, time.process_time() - c0
        total = Spent()
        for s in spent.values():
            total.model += s.model
            total.tool += s.tool
            total.model_calls += s.model_calls
            total.tool_calls += s.tool_calls
        want_calls = per * sessions * (1 if kind == "text" else 2)
        if total.model_calls != want_calls:
            raise SystemExit(f"benchmark invalid: {total.model_calls} model calls, {want_calls=}")
        return OverheadResult(
            kind, mode, store_name(url), per * sessions, sessions, elapsed, cpu, latency,
            overhead, total.model, total.tool, total.model_calls, total.tool_calls,
        )  # fmt: skip
    finally:
        await rt.close(grace=0)


def store_name(url: str) -> str:
    return "memory" if url.startswith("memory") else "sqlite"


# ---------------------------------------------------------------------------- cancel


class Watcher:
    """Follows a session's events and timestamps the first occurrence of awaited codes."""

    def __init__(self, rt: Runtime, sid: str) -> None:
        self.rt = rt
        self.sid = sid
        self.waiting: dict[str, asyncio.Future[float]] = {}
        self.task: asyncio.Task[None] | None = None

    def expect(self, code: str) -> asyncio.Future[float]:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiting[code] = fut
        return fut

    async def start(self) -> None:
        after = await self.rt.last_event_seq(self.sid)
        self.task = asyncio.create_task(self._follow(after))

    async def _follow(self, after: int) -> None:
        async for env in self.rt.events(self.sid, after, follow=True):
            fut = self.waiting.pop(env.code, None)
            if fut is not None and not fut.done():
                fut.set_result(clock())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


@dataclass
class CancelResult:
    case: str
    store: str
    to_outcome: list[float] = field(default_factory=list)
    to_event: list[float] = field(default_factory=list)
    to_return: list[float] = field(default_factory=list)  # the interrupt call itself
    iterations: list[int] = field(default_factory=list)  # event loop iterations to outcome


class LoopIterations:
    """Counts event loop iterations (``BaseEventLoop._run_once`` calls) while installed: a
    cancel that needs k iterations waits k times for every other ready task's next step."""

    count = 0

    def __enter__(self) -> LoopIterations:
        import asyncio.base_events as base

        self._base = base.BaseEventLoop
        self._orig = self._base._run_once  # type: ignore[attr-defined]
        orig = self._orig
        counter = type(self)

        def run_once(loop: Any) -> None:
            counter.count += 1
            orig(loop)

        self._base._run_once = run_once  # type: ignore[attr-defined]
        return self

    def __exit__(self, *exc: object) -> None:
        self._base._run_once = self._orig  # type: ignore[attr-defined]


@dataclass
class SlowTools:
    """The registered long tools; ``started`` is set when a call begins."""

    started: asyncio.Event = field(default_factory=asyncio.Event)
    releases: list[threading.Event] = field(default_factory=list)

    def registry(self, loop: asyncio.AbstractEventLoop) -> ToolRegistry:
        registry = ToolRegistry()
        started = self.started
        releases = self.releases

        @registry.tool
        async def slow_async(seconds: float) -> str:
            """Sleep ``seconds`` (async)."""
            started.set()
            await asyncio.sleep(seconds)
            return "slept"

        @registry.tool
        def slow_sync(seconds: float) -> str:
            """Block a thread until released or ``seconds`` pass."""
            release = threading.Event()
            releases.append(release)
            loop.call_soon_threadsafe(started.set)
            release.wait(seconds)
            return "released"

        return registry

    def release_all(self) -> None:
        while self.releases:
            self.releases.pop().set()


LONG = 600.0  # seconds: every long operation would outlast the benchmark


def cancel_script(case: str, n: int) -> list[dict[str, Any]]:
    if case == "model":
        step: dict[str, Any] = {
            "type": "text",
            "text": "streaming " + "word " * 20,
            "chunk_delay": LONG,
        }
    elif case == "async_tool":
        step = {"type": "tool", "name": "slow_async", "args": {"seconds": LONG}}
    elif case == "sync_tool":
        step = {"type": "tool", "name": "slow_sync", "args": {"seconds": LONG}}
    elif case == "wait":
        step = {"type": "wait", "timeout": LONG}
    else:
        raise ValueError(case)
    # a run cancelled during a tool call has committed its tool-call message (S6), so the
    # cursor moves by one per cancelled tool turn: one step per cancel (a completed turn
    # fails the benchmark)
    return [step] * (n + 5)


class SlowOfflineModel(OfflineModel):
    """The offline model (echo) answering after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def complete(
        self, request: ModelRequest, *, on_text: TextSink | None = None
    ) -> ModelResponse:
        if self.delay:
            await asyncio.sleep(self.delay)
        return await super().complete(request, on_text=on_text)


CASES = ("model", "async_tool", "sync_tool", "wait", "openai")
READY_CODE = {
    "model": "agent.text_delta",
    "openai": "agent.text_delta",
    "wait": "agent.tool_execution_started",
}


def openai_reply(_request: Any) -> Any:
    from tests.providers.loopback import Reply, sse

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "gpt-bench",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    chunks: list[bytes | str | float] = []
    chunks += sse((None, chunk({"role": "assistant", "content": "Hello"})))
    chunks.append(LONG)  # the stream stalls here until the client goes away
    chunks += sse((None, chunk({"content": " world"}, "stop")), (None, "[DONE]"))
    return Reply(headers={"content-type": "text/event-stream"}, chunks=chunks)


def _quiet(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loopback server's loop handler: on 3.11, stopping ``asyncio.start_server`` with
    connections open logs a ``CancelledError`` per connection (noise, not a failure)."""
    if not isinstance(context.get("exception"), asyncio.CancelledError):
        loop.default_exception_handler(context)


async def cancel_run(
    url: str, case: str, n: int, *, load: int = 0, load_delay: float = 0.5, warmup: int = 5
) -> CancelResult:
    """``n`` cancels (after ``warmup`` untimed ones) of ``case`` on one session; with
    ``load``, as many other sessions run offline text turns back to back meanwhile, each
    model call taking ``load_delay`` seconds (``asyncio.sleep``, like waiting for an LLM)."""
    loop = asyncio.get_running_loop()
    slow = SlowTools()
    server_cm: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if case == "openai":
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        from tests.providers.loopback import LoopbackServer

        server_cm = LoopbackServer()
    with server_cm as server:
        if server is not None and server._loop is not None:
            server._loop.call_soon_threadsafe(server._loop.set_exception_handler, _quiet)
        rt = Runtime.open(url, tools=slow.registry(loop))
        busy: list[asyncio.Task[int]] = []
        stopping = asyncio.Event()

        async def keep_busy(sid: str) -> int:
            done = 0
            while not stopping.is_set():
                await (await rt.turn(sid, f"busy work {done}")).wait()
                done += 1
            return done

        try:
            if case == "openai":
                server.default = openai_reply
                session = await rt.create_session(
                    model="gpt-bench", provider="openai", base_url=server.url + "/v1"
                )
            else:
                session = await rt.create_session(
                    model="offline", offline_script=cancel_script(case, n + warmup)
                )
            sid = session.id
            for _ in range(load):
                model = SlowOfflineModel(load_delay)
                other = await rt.create_session(executor=AgentExecutor(model=model))
                busy.append(asyncio.create_task(keep_busy(other.id)))
            if busy:
                await asyncio.sleep(load_delay + 0.05)  # every busy session is under way
            watcher = Watcher(rt, sid)
            await watcher.start()
            result = CancelResult(
                f"{case}, {load} busy sessions ({load_delay * 1000:.0f} ms model)"
                if load
                else case,
                store_name(url),
            )
            gc.collect()
            jitter = random.Random(7)
            for i in range(n + warmup):
                if busy:  # sample the busy sessions' cycle at random phases
                    await asyncio.sleep(jitter.uniform(0, 0.02))
                slow.started.clear()
                ready_code = READY_CODE.get(case)
                ready: Awaitable[Any] = (
                    watcher.expect(ready_code) if ready_code else slow.started.wait()
                )
                handle = await rt.turn(sid, f"long job {i}")
                await asyncio.wait_for(ready, 30)
                seen = watcher.expect("run.cancelled")
                n0 = LoopIterations.count
                t0 = clock()
                if not await rt.interrupt(sid):
                    raise SystemExit(f"benchmark invalid: {case}: no active run to interrupt")
                t_ret = clock()
                outcome = await handle.wait(30)
                t_out = clock()
                n_out = LoopIterations.count
                t_ev = await asyncio.wait_for(seen, 30)
                slow.release_all()
                if outcome.outcome_type != "cancelled":
                    raise SystemExit(f"benchmark invalid: {case} ended {outcome.to_json()}")
                if i >= warmup:
                    result.to_return.append(t_ret - t0)
                    result.to_outcome.append(t_out - t0)
                    result.to_event.append(t_ev - t0)
                    result.iterations.append(n_out - n0)
            await watcher.stop()
            stopping.set()
            busy_turns = sum(await asyncio.gather(*busy))
            if load and busy_turns < load:
                raise SystemExit("benchmark invalid: the busy sessions did not run")
            return result
        finally:
            stopping.set()
            slow.release_all()
            await rt.close(grace=0)
            for task in busy:
                task.cancel()


# ---------------------------------------------------------------------------- machine


# ---------------------------------------------------------------------------- report


def overhead_table(rows: list[OverheadResult]) -> list[str]:
    out = [
        "| turn | store | mode | turns | turns/s | wall p50 | wall p99 | model+tool | "
        "overhead mean | overhead p50 | overhead p99 | CPU/turn |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mode = "sequential" if r.mode == "sequential" else f"{r.sessions} parallel"
        out.append(
            f"| {r.kind} | {r.store} | {mode} | {r.turns:,} | {r.turns_per_s:,.0f} | "
            f"{us(pct(r.latency, 0.5))} | {us(pct(r.latency, 0.99))} | "
            f"{us((r.model + r.tool) / r.turns)} | {us(r.amortised_overhead)} | "
            f"{us(pct(r.overhead, 0.5))} | {us(pct(r.overhead, 0.99))} | "
            f"{us(r.cpu / r.turns)} |"
        )
    return out


LONG_WINDOW = 100


def long_session_table(r: OverheadResult, per_turn_messages: int = 2) -> list[str]:
    """Per-turn figures for windows of ``LONG_WINDOW`` turns along one long session."""
    n = len(r.latency)
    starts = sorted({0, *(k * n // 4 for k in range(1, 4)), max(0, n - LONG_WINDOW)})
    out = [
        "| turns | messages before | wall p50 | model p50 | overhead p50 | overhead p99 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for a in starts:
        lat, over = r.latency[a : a + LONG_WINDOW], r.overhead[a : a + LONG_WINDOW]
        model = [x - y for x, y in zip(lat, over, strict=True)]
        out.append(
            f"| {a + 1}-{a + len(lat)} | {a * per_turn_messages:,} | {us(pct(lat, 0.5))} | "
            f"{us(pct(model, 0.5))} | {us(pct(over, 0.5))} | {us(pct(over, 0.99))} |"
        )
    return out


def cancel_table(rows: list[CancelResult]) -> list[str]:
    out = [
        "| cancel during | store | n | → outcome p50 | p99 | max | → `run.cancelled` p50 | p99 "
        "| max | loop iterations | p99 < 50 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for r in rows:
        worst = max(pct(r.to_outcome, 0.99), pct(r.to_event, 0.99))
        its = f"{pct(r.iterations, 0.5):.0f}" if r.iterations else ""
        out.append(
            f"| {r.case} | {r.store} | {len(r.to_outcome)} | {ms(pct(r.to_outcome, 0.5))} | "
            f"{ms(pct(r.to_outcome, 0.99))} | {ms(max(r.to_outcome))} | "
            f"{ms(pct(r.to_event, 0.5))} | {ms(pct(r.to_event, 0.99))} | "
            f"{ms(max(r.to_event))} | {its} | {'yes' if worst < 0.05 else '**no**'} |"
        )
    return out


def markdown(
    info: dict[str, Any],
    args: argparse.Namespace,
    over: list[OverheadResult],
    long: OverheadResult | None,
    cancels: list[CancelResult],
    elapsed: float,
    load_end: list[float] | None,
) -> str:
    command = ["python benchmarks/bench_agent.py", *sys.argv[1:]]
    lines = section_head(SECTION, info, command, elapsed, load_end)
    if over:
        lines += [
            "### Runtime overhead per turn (offline model)",
            "",
            f"A *text* turn is one model call; a *tool* turn is a model call asking for one "
            f"trivial async tool, the tool, and a second model call with the answer. "
            f"{over[0].turns:,} turns per row, {args.turns_per_session} per session in "
            f"*sequential* (one session after the other) and "
            f"{over[0].turns // args.parallel} per session in *parallel* ({args.parallel} "
            "sessions each running turns back to back). Times in µs. *wall*: `rt.turn` to "
            "`handle.wait()` returning. *model+tool*: time inside `OfflineModel.complete` "
            "(its `on_text` callbacks excluded: they are the runtime publishing `text_delta`) "
            "and inside the tool's body, per turn. *overhead mean*: (elapsed - model - tool) "
            "/ turns. *overhead p50/p99*: per turn, wall minus that turn's own model and tool "
            "time (in parallel mode that includes waiting for other sessions' work). "
            "*CPU/turn*: process CPU time (SQLite's writer thread included) / turns.",
            "",
            *overhead_table(over),
            "",
        ]
    if long is not None:
        lines += [
            "### One long session",
            "",
            f"{long.turns:,} text turns on one session (memory store, sequential), in windows "
            f"of {LONG_WINDOW} turns; each turn adds 2 messages. Times in µs; *model* is "
            "the offline model's own time (it counts words and assistant messages over the "
            "whole conversation, so it grows too).",
            "",
            *long_session_table(long),
            "",
        ]
    if cancels:
        lines += [
            "### Cancel latency",
            "",
            f"`rt.interrupt(sid)` while the run is inside the named operation, {args.cancels} "
            "times per row (after 5 untimed); one session per row (*busy sessions*: that many "
            "other sessions of the same `Runtime` run turns back to back meanwhile, each "
            f"turn one offline model call that takes {args.load_delay * 1000:.0f} ms of "
            "`asyncio.sleep`, like waiting for an LLM). Times in ms from the "
            "`interrupt` call to `handle.wait()` returning `cancelled` (*→ outcome*) and to "
            "an `rt.events(sid, follow=True)` subscriber seeing `run.cancelled`. *model*: "
            "an offline text step stalled in `chunk_delay`; *async_tool* / *sync_tool*: a "
            "registered tool sleeping / a thread blocked on a `threading.Event` (released "
            "after each cancel); *wait*: the built-in `wait` tool; *openai*: the OpenAI "
            "provider (`openai` SDK) reading an SSE stream from a loopback HTTP server that "
            "sent one delta and stalls. *loop iterations*: median number of event loop "
            "iterations from the `interrupt` call to the outcome (each one waits for a step of "
            "every other ready task, so under load the latency scales with it).",
            "",
            *cancel_table(cancels),
            "",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def profile_cancel(url: str, case: str, n: int, load: int, load_delay: float) -> int:
    """Run ``case``'s cancels under pyinstrument (wall clock, every task and thread of the
    loop's thread): with ``load``, what fills the event loop while cancels wait for it."""
    from pyinstrument import Profiler

    async def go() -> CancelResult:
        return await cancel_run(url, case, n, load=load, load_delay=load_delay)

    profiler = Profiler(interval=0.0005, async_mode="disabled")
    profiler.start()
    with LoopIterations():
        result = asyncio.run(go())
    profiler.stop()
    print(profiler.output_text(unicode=True, color=False, show_all=False))
    print("\n".join(cancel_table([result])))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small counts (a smoke run)")
    ap.add_argument("--turns", type=int, default=2000, help="turns per overhead row (2000)")
    ap.add_argument("--turns-per-session", type=int, default=40, help="sequential mode (40)")
    ap.add_argument("--parallel", type=int, default=50, help="sessions in parallel mode (50)")
    ap.add_argument(
        "--long-session", type=int, default=2000, help="turns on one long session (2000; 0: skip)"
    )
    ap.add_argument("--cancels", type=int, default=200, help="timed cancels per case (200)")
    ap.add_argument(
        "--load-sessions",
        type=int,
        default=50,
        help="busy sessions for the extra 'model' cancel row under load (50; 0: skip)",
    )
    ap.add_argument(
        "--load-delay",
        type=float,
        default=0.5,
        help="seconds each busy session's model call takes (0.5; 0: saturate the loop)",
    )
    ap.add_argument(
        "--stores", default="memory,sqlite", help="comma-separated: memory, sqlite (both)"
    )
    ap.add_argument("--cases", default=",".join(CASES), help=f"cancel cases ({','.join(CASES)})")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--skip-cancel", action="store_true")
    ap.add_argument(
        "--no-gc", action="store_true", help="disable the cyclic GC inside timed overhead runs"
    )
    ap.add_argument(
        "--write", action="store_true", help=f"update the section {SECTION!r} of results.md"
    )
    ap.add_argument(
        "--profile-cancel",
        metavar="CASE",
        choices=CASES,
        help="instead: run CASE's cancels on the memory store under pyinstrument "
        "(with --profile-load: while --load-sessions busy sessions run)",
    )
    ap.add_argument("--profile-load", action="store_true", help="see --profile-cancel")
    args = ap.parse_args(argv)
    if args.quick:
        args.turns, args.turns_per_session, args.parallel = 400, 20, 20
        args.long_session, args.cancels, args.load_sessions = 400, 40, 20
    tmp = Path(tempfile.mkdtemp(prefix="meerkat-bench-agent-"))
    try:
        if args.profile_cancel:
            load = args.load_sessions if args.profile_load else 0
            return profile_cancel(
                "memory://", args.profile_cancel, args.cancels, load, args.load_delay
            )
        stores = [s.strip() for s in args.stores.split(",") if s.strip()]
        cases = [c.strip() for c in args.cases.split(",") if c.strip()]
        info = machine()
        print_machine(info)
        started = clock()
        url = store_urls(tmp)

        def timed(coro: Any) -> Any:
            gc.collect()
            if args.no_gc:
                gc.disable()
            try:
                return asyncio.run(coro)
            finally:
                gc.enable()

        over: list[OverheadResult] = []
        long: OverheadResult | None = None
        if not args.skip_overhead:
            asyncio.run(overhead_run("memory://", "tool", "sequential", 100, 5))  # warm-up
            for store in stores:
                for kind in ("text", "tool"):
                    for mode, sessions in (
                        ("sequential", max(1, args.turns // args.turns_per_session)),
                        ("parallel", args.parallel),
                    ):
                        r = timed(overhead_run(url(store), kind, mode, args.turns, sessions))
                        over.append(r)
                        print(overhead_table([r])[-1], flush=True)
            if args.long_session:
                long = timed(overhead_run("memory://", "text", "sequential", args.long_session, 1))
                print("\n".join(long_session_table(long)), flush=True)
            print()
        cancels: list[CancelResult] = []
        if not args.skip_cancel:
            for store in stores:
                for case in cases:
                    with LoopIterations():
                        c = asyncio.run(cancel_run(url(store), case, args.cancels))
                    cancels.append(c)
                    print(cancel_table([c])[-1], flush=True)
                if args.load_sessions and "model" in cases:
                    with LoopIterations():
                        c = asyncio.run(
                            cancel_run(
                                url(store),
                                "model",
                                args.cancels,
                                load=args.load_sessions,
                                load_delay=args.load_delay,
                            )
                        )
                    cancels.append(c)
                    print(cancel_table([c])[-1], flush=True)
            print()
        elapsed = clock() - started
        text = markdown(info, args, over, long, cancels, elapsed, loadavg())
        print(text)
        if args.write:
            write_section(text, RESULTS, SECTION)
            print(f"\nupdated {RESULTS}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
