"""Peer comms: message throughput and request/response round-trip latency between sessions.

1. **One-way messages** from session ``a`` to session ``b`` (``Runtime.comms_send(kind=
   "message")``), on the memory store and on SQLite (a temp file): N messages sent by one
   sender awaiting each receipt (*1 sender*) or by 16 concurrent senders of the same session
   (*16 senders*). *send/s*: receipts per second (a receipt means the message is durable in
   ``b``'s inbox); *apply/s*: messages per second from the first send until ``b``'s runtime
   consumed the last one (its ``input_lifecycle consumed`` event). What consuming costs
   depends on ``b``:
   - *consumed at accept*: a policy row makes ``peer_message`` consumed on acceptance (apply
     ``ignore``, no run): delivery only;
   - *no-op executor*: ``b`` runs an application executor that commits its boundary and
     returns, so each wake is one run that consumes what it staged;
   - *agent*: ``b`` is the built-in agent on the offline model (no script: it echoes), so
     every message it is woken by is a model call and an assistant message (the default
     policy: ``wake_if_idle``; a message that arrives during a run joins it at its next
     checkpoint).
   One more row per store sends the same ``PeerInput`` with ``Runtime.accept`` (no comms
   layer) into the *consumed at accept* target: the cost of ``comms_send`` itself.
2. **Request/response round trip**: ``a`` sends a request (``comms_send(kind="request")``);
   ``b`` answers with a terminal response (``completed``) and the clock stops when ``a``'s
   runtime has accepted it (an ``rt.events(a, follow=True)`` subscriber sees the
   ``input_lifecycle accepted`` event of the terminal response, published when the
   acceptance transaction is submitted). ``b`` is either an application executor that, in the
   run the request wakes, commits its boundary and calls ``comms_send(kind="response")``
   (*executor*; its ``comms_send`` returns once the response is durable at ``a``: the
   *→ durable* column), or the built-in agent whose offline script calls the ``respond`` tool
   then answers (*agent*). ``a`` runs the no-op executor. *one Runtime*: both sessions in one
   ``Runtime``; *two Runtimes*: ``b`` in a second ``Runtime`` of this process on the same
   SQLite file, so request and response each cross a durable inbox, ingested when the owner
   polls (every ``poll_interval``), as between two processes. Sequential round trips give
   p50/p99/max; *16 in flight* keeps 16 outstanding and gives round trips per second.

    python benchmarks/bench_comms.py               # full run, about 1.5 minutes
    python benchmarks/bench_comms.py --quick       # smoke run, about 20 s
    python benchmarks/bench_comms.py --write       # also update its section of results.md
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
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    NoopExecutor,
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
from meerkat_runtime.core.lifecycle import Message, RunContext, RunResult
from meerkat_runtime.runtime.driver import RuntimeConfig
from meerkat_runtime.runtime.inputs import (
    InputDurability,
    InputHeader,
    MessageConvention,
    PeerInput,
    PeerOrigin,
    RequestConvention,
    ResponseTerminalConvention,
)
from meerkat_runtime.runtime.policy import PolicyRow, PolicyTable, default_policy_table

clock = time.perf_counter
RESULTS = Path(__file__).resolve().parent / "results.md"
SECTION = "## Peer comms (bench_comms.py)"
MAX_PENDING = 10_000_000  # the default (10,000) would refuse a large backlog as queue_full
EVENTS = 1_000_000


def config() -> RuntimeConfig:
    # a large event ring: the measuring subscriber may fall behind a backlog (the default,
    # 10,000 events, is about 1,000 messages each run by an executor)
    return RuntimeConfig(max_pending_inputs=MAX_PENDING, event_retention=EVENTS)


# ---------------------------------------------------------------------------- executors


class RespondingExecutor:
    """Commits its boundary, then answers every request it staged with a terminal response
    (``comms_send`` through ``rt``, the runtime that runs it); ``durable[request id]`` is
    when that ``comms_send`` returned."""

    def __init__(self) -> None:
        self.rt: Runtime | None = None
        self.durable: dict[str, float] = {}
        self.notify: Callable[[], None] = lambda: None

    async def apply(self, run: RunContext) -> RunResult:
        assert self.rt is not None
        staged = [a for a in run.primitive.appends if a.input_id is not None]
        await run.commit_boundary(
            [
                Message(role="user", content=getattr(a.content, "text", ""), input_ids=[a.input_id])
                for a in staged
            ]
        )
        for a in staged:
            assert a.input_id is not None
            inp = self.rt.input_state(run.session_id, a.input_id).persisted_input
            if isinstance(inp, PeerInput) and isinstance(inp.convention, RequestConvention):
                rid = inp.convention.request_id
                await self.rt.comms_send(
                    run.session_id,
                    kind="response",
                    in_reply_to=rid,
                    status="completed",
                    result={"ok": True},
                )
                self.durable[rid] = clock()
                self.notify()
        return RunResult(text="ok")


def consume_at_accept_policy() -> PolicyTable:
    """The default table with peer messages consumed on acceptance (no run)."""
    d = PolicyTable.decision("ignore", "none", "none", "on_accept", record_transcript=False)
    return default_policy_table().with_rows({"peer_message": PolicyRow(d, d)})


# ---------------------------------------------------------------------------- observers


class Watch:
    """Follows one session's events in a task: counts consumed inputs and started runs, and
    notes when each terminal response is accepted (``seen[request id]``)."""

    def __init__(self, rt: Runtime, session_id: str) -> None:
        self.rt = rt
        self.session_id = session_id
        self.consumed = 0
        self.runs = 0
        self.seen: dict[str, float] = {}
        self.gap: str | None = None  # events the subscriber missed (then it cannot count)
        self.on_run: Callable[[], None] = lambda: None
        self._signal = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        after = await self.rt.last_event_seq(self.session_id)
        events = self.rt.events(self.session_id, after, follow=True)
        self._task = asyncio.create_task(self._follow(events))

    def wake(self) -> None:
        """Wake ``until`` to check its condition again."""
        old, self._signal = self._signal, asyncio.Event()
        old.set()

    async def _follow(self, events: AsyncIterator[Any]) -> None:
        async for env in events:
            event = env.event
            data = event.get("data") or {}
            category = event.get("category")
            if category == "stream" and data.get("code") == "events_gap":
                self.gap = f"events {data.get('from')}-{data.get('to')}"
                self.wake()
            if category == "input_lifecycle":
                code = data.get("code")
                if code == "consumed":
                    self.consumed += 1
                    self.wake()
                elif code == "accepted":
                    self._note_response(str(data.get("input_id")))
            elif category == "run_lifecycle":
                if data.get("code") == "started":
                    self.runs += 1
                self.wake()
                self.on_run()

    def _note_response(self, input_id: str) -> None:
        try:
            inp = self.rt.input_state(self.session_id, input_id).persisted_input
        except Exception:  # not an input this runtime holds
            return
        if isinstance(inp, PeerInput) and isinstance(inp.convention, ResponseTerminalConvention):
            self.seen[inp.convention.request_id] = clock()
            self.wake()

    async def until(self, done: Callable[[], bool], timeout: float = 120.0) -> None:
        deadline = clock() + timeout
        while not done():
            if self.gap is not None:
                raise RuntimeError(f"the subscriber missed {self.gap}; raise EVENTS")
            if clock() > deadline:
                raise TimeoutError("the measured sessions did not finish in time")
            signal = self._signal
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(signal.wait(), 1.0)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# ---------------------------------------------------------------------------- messages


TARGETS = ("accept", "noop", "agent")
TARGET_NAMES = {
    "accept": "consumed at accept",
    "noop": "no-op executor",
    "agent": "agent (offline)",
    "raw": "consumed at accept, `Runtime.accept` (no comms layer)",
}


@dataclass
class MessageResult:
    store: str
    target: str
    senders: int
    n: int
    send_elapsed: float
    apply_elapsed: float
    cpu: float
    runs: int
    send_latency: list[float]

    @property
    def send_rate(self) -> float:
        return self.n / self.send_elapsed

    @property
    def apply_rate(self) -> float:
        return self.n / self.apply_elapsed


def peer_message(sender_id: str, i: int) -> PeerInput:
    """What ``comms_send(kind="message")`` from ``a`` delivers (the raw-accept baseline)."""
    header = InputHeader.new(
        source=PeerOrigin(peer_id="a", runtime_id=sender_id),
        durability=InputDurability.DURABLE,
    )
    return PeerInput(header=header, convention=MessageConvention(), body=f"message {i}")


async def message_run(url: str, store: str, target: str, n: int, senders: int) -> MessageResult:
    policy = consume_at_accept_policy() if target in ("accept", "raw") else None
    rt = Runtime.open(url, policy=policy, config=config())
    async with rt:
        a = await rt.create_session(comms_name="a", executor=NoopExecutor())
        if target == "agent":
            b = await rt.create_session(comms_name="b")  # the offline model, no script: echo
        else:  # (consumed at accept: the executor never runs)
            b = await rt.create_session(comms_name="b", executor=NoopExecutor())
        watch = Watch(rt, b.id)
        await watch.start()

        async def send(i: int) -> None:
            if target == "raw":
                await rt.accept(b.id, peer_message(a.id, i))
            else:
                await rt.comms_send(a.id, kind="message", to="b", body=f"message {i}")

        warm = 20
        for i in range(warm):
            await send(-i - 1)
        await watch.until(lambda: watch.consumed >= warm)
        runs0 = watch.runs
        latency: list[float] = []

        async def sender(ids: range) -> None:
            for i in ids:
                t = clock()
                await send(i)
                latency.append(clock() - t)

        gc.collect()
        cpu0 = time.process_time()
        t0 = clock()
        per = n // senders
        await asyncio.gather(*(sender(range(k * per, (k + 1) * per)) for k in range(senders)))
        sent = clock()
        await watch.until(lambda: watch.consumed >= warm + per * senders)
        done = clock()
        cpu = time.process_time() - cpu0
        await watch.stop()
        return MessageResult(
            store,
            target,
            senders,
            per * senders,
            sent - t0,
            done - t0,
            cpu,
            watch.runs - runs0,
            latency,
        )


# ---------------------------------------------------------------------------- round trips


@dataclass
class RoundTripResult:
    store: str
    responder: str
    topology: str
    in_flight: int
    n: int
    elapsed: float
    cpu: float
    rtt: list[float]
    to_durable: list[float]
    poll: float

    @property
    def rate(self) -> float:
        return self.n / self.elapsed


def agent_script(n: int) -> list[dict[str, Any]]:
    step: list[dict[str, Any]] = [
        {"type": "tool", "name": "respond", "args": {"status": "completed", "result": 42}},
        {"type": "text", "text": "answered"},
    ]
    return step * n


async def round_trip_run(
    url: str,
    store: str,
    responder: str,
    topology: str,
    n: int,
    in_flight: int,
    poll_interval: float,
) -> RoundTripResult:
    """``n`` round trips (after 10 untimed), ``in_flight`` at a time."""
    warm = 10
    rt_a = Runtime.open(url, config=config(), poll_interval=poll_interval)
    rt_b = (
        Runtime.open(url, config=config(), poll_interval=poll_interval, recover_on_open=False)
        if topology == "two"
        else rt_a
    )
    async with contextlib.AsyncExitStack() as stack:
        if rt_b is not rt_a:
            await stack.enter_async_context(rt_b)
        await stack.enter_async_context(rt_a)
        responding = RespondingExecutor()
        responding.rt = rt_b
        if responder == "agent":
            b = await rt_b.create_session(comms_name="b", offline_script=agent_script(n + warm))
        else:
            b = await rt_b.create_session(comms_name="b", executor=responding)
        a = await rt_a.create_session(comms_name="a", executor=NoopExecutor())
        assert b.id in rt_b._runtimes and a.id in rt_a._runtimes
        watch = Watch(rt_a, a.id)
        b_runs = Watch(rt_b, b.id)

        def wake() -> None:
            watch.wake()
            b_runs.wake()

        responding.notify = wake
        watch.on_run = b_runs.wake  # a's runs ending wake `idle` too
        await watch.start()
        await b_runs.start()
        rtt: list[float] = []
        durable: list[float] = []

        async def idle() -> None:
            # one at a time, a round trip starts when both sessions are idle (untimed): it
            # does not queue behind the previous one's last commits (b's completion, a's run
            # for the response); and the agent's script is linear, so a request joining a run
            # about to end would be consumed by its scripted last answer without a `respond`
            runs = (rt_a.runtime(a.id), rt_b.runtime(b.id))
            await b_runs.until(lambda: all(r.active_run_id is None for r in runs))

        jitter = random.Random(0)

        async def one(record: bool) -> None:
            if in_flight == 1:
                await idle()
            if topology == "two":
                # sent at a random moment of the owners' poll cycle (untimed): back to back,
                # the requester would lock onto their ticks and always wait 1 or 2 polls
                await asyncio.sleep(jitter.uniform(0, poll_interval))
            t = clock()
            receipt = await rt_a.comms_send(
                a.id, kind="request", to="b", intent="ping", params={"t": t}
            )
            rid = str(receipt["interaction_id"])
            await watch.until(lambda: rid in watch.seen)
            if responder == "executor":
                await watch.until(lambda: rid in responding.durable)
            if record:
                rtt.append(watch.seen[rid] - t)
                if rid in responding.durable:
                    durable.append(responding.durable[rid] - t)

        for _ in range(warm):
            await one(False)

        async def worker(count: int) -> None:
            for _ in range(count):
                await one(True)

        gc.collect()
        cpu0 = time.process_time()
        t0 = clock()
        per = n // in_flight
        await asyncio.gather(*(worker(per) for _ in range(in_flight)))
        elapsed = clock() - t0
        cpu = time.process_time() - cpu0
        await watch.stop()
        await b_runs.stop()
    return RoundTripResult(
        store,
        responder,
        topology,
        in_flight,
        per * in_flight,
        elapsed,
        cpu,
        rtt,
        durable,
        poll_interval,
    )


# ---------------------------------------------------------------------------- machine


# ---------------------------------------------------------------------------- report


def message_table(rows: list[MessageResult]) -> list[str]:
    out = [
        "| store | target `b` | senders | messages | send/s | send p50 | send p99 | apply/s "
        "| runs | CPU/message |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r.store} | {TARGET_NAMES[r.target]} | {r.senders} | {r.n:,} | "
            f"{r.send_rate:,.0f} | {us(pct(r.send_latency, 0.5))} | "
            f"{us(pct(r.send_latency, 0.99))} | {r.apply_rate:,.0f} | {r.runs:,} | "
            f"{us(r.cpu / r.n)} |"
        )
    return out


def round_trip_table(rows: list[RoundTripResult]) -> list[str]:
    out = [
        "| store | responder `b` | topology | in flight | round trips | round trips/s | p50 | p99 "
        "| max | → durable p50 | CPU/round trip |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        topo = "one Runtime" if r.topology == "one" else f"two Runtimes, poll {r.poll:g} s"
        durable = ms(pct(r.to_durable, 0.5)) if r.to_durable else "n/a"
        rate = f"{r.rate:,.0f}" if r.in_flight > 1 else "n/a"  # one at a time: idle waits
        out.append(
            f"| {r.store} | {r.responder} | {topo} | {r.in_flight} | {r.n:,} | {rate} | "
            f"{ms(pct(r.rtt, 0.5))} | {ms(pct(r.rtt, 0.99))} | {ms(max(r.rtt))} | {durable} | "
            f"{ms(r.cpu / r.n)} |"
        )
    return out


def markdown(
    info: dict[str, Any],
    messages: list[MessageResult],
    trips: list[RoundTripResult],
    elapsed: float,
    load_end: list[float] | None,
) -> str:
    command = ["python benchmarks/bench_comms.py", *sys.argv[1:]]
    lines = section_head(SECTION, info, command, elapsed, load_end)
    if messages:
        lines += [
            "### One-way messages `a` → `b`",
            "",
            '`comms_send(a, kind="message", to="b")` in one `Runtime`, after 20 untimed. '
            "*send/s*: receipts per second (each receipt: the message is durable at `b`); "
            "*send p50/p99*: one `comms_send` call, in µs (with 16 senders it includes "
            "waiting for the others' commits). *apply/s*: messages per second from the first "
            "send until `b` consumed the last (`input_lifecycle consumed` events). *runs*: "
            "runs `b` started for them. *CPU/message*: process CPU time (SQLite's writer "
            "thread included) per message, in µs. Targets: *consumed at accept*: a policy "
            "row consumes `peer_message` on acceptance (no run, delivery only); *no-op "
            "executor*: an application executor that commits its boundary and returns; "
            "*agent*: the built-in agent on the offline model (it echoes), woken by each "
            "message it is idle for, a message arriving during a run joining it at its next "
            "checkpoint. The `Runtime.accept` row sends the same `PeerInput` without the "
            "comms layer.",
            "",
            *message_table(messages),
            "",
        ]
    if trips:
        lines += [
            "### Request → terminal response round trip",
            "",
            '`a` sends `comms_send(kind="request")`; `b` answers `completed`; the round '
            "trip ends when an `rt.events(a, follow=True)` subscriber sees `a` accept the "
            "terminal response (`input_lifecycle accepted`, published as the acceptance "
            "transaction is submitted). Times in ms, after 10 untimed round trips. "
            "*executor*: `b`'s application executor answers in the run the request wakes "
            "(after its boundary); *→ durable*: until that `comms_send` returned, i.e. the "
            "response is durable at `a`. *agent*: `b` is the built-in agent whose offline "
            "script calls `respond` (a model call, the tool, a checkpoint, a second model "
            "call). `a` runs a no-op executor (each terminal response wakes it). *two "
            "Runtimes*: `b` in a second `Runtime` on the same SQLite file, so the request "
            "and the response each go through a durable inbox that the owner ingests when "
            "it polls (each request sent after an untimed random delay of up to one poll "
            "interval, so it lands at a random moment of the poll cycle). One at a time "
            "(*in flight 1*), each round trip starts when both sessions are idle (waited "
            "for, untimed), so *round trips/s* is given only for *in flight 16*: 16 requests "
            "outstanding at any time, back to back.",
            "",
            *round_trip_table(trips),
            "",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small counts (a smoke run)")
    ap.add_argument("--messages", type=int, default=2000, help="messages per row (2000)")
    ap.add_argument(
        "--agent-messages", type=int, default=1000, help="messages per agent-target row (1000)"
    )
    ap.add_argument("--round-trips", type=int, default=400, help="per one-Runtime row (400)")
    ap.add_argument(
        "--inbox-round-trips",
        type=int,
        default=100,
        help="per two-Runtime row (100; each waits for polls)",
    )
    ap.add_argument(
        "--polls",
        default="0.1,0.01",
        help="poll intervals (s) of the two-Runtime rows (0.1 = the default, 0.01)",
    )
    ap.add_argument(
        "--stores", default="memory,sqlite", help="comma-separated: memory, sqlite (both)"
    )
    ap.add_argument("--skip-messages", action="store_true")
    ap.add_argument("--skip-round-trips", action="store_true")
    ap.add_argument(
        "--write", action="store_true", help=f"update the section {SECTION!r} of results.md"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.messages, args.agent_messages = 400, 200
        args.round_trips, args.inbox_round_trips = 80, 30
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    polls = [float(p) for p in args.polls.split(",") if p.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="meerkat-bench-comms-"))
    try:
        info = machine()
        print_machine(info)
        started = clock()
        url = store_urls(tmp)

        messages: list[MessageResult] = []
        if not args.skip_messages:
            asyncio.run(message_run("memory://", "memory", "noop", 200, 1))  # warm-up
            for store in stores:
                for target in ("raw", *TARGETS):
                    n = args.agent_messages if target == "agent" else args.messages
                    for senders in (1, 16):
                        if target == "raw" and senders > 1:
                            continue
                        r = asyncio.run(message_run(url(store), store, target, n, senders))
                        messages.append(r)
                        print(message_table([r])[-1], flush=True)
            print()
        trips: list[RoundTripResult] = []
        if not args.skip_round_trips:
            for store in stores:
                for responder, in_flight in (("executor", 1), ("executor", 16), ("agent", 1)):
                    r2 = asyncio.run(
                        round_trip_run(
                            url(store), store, responder, "one", args.round_trips, in_flight, 0.1
                        )
                    )
                    trips.append(r2)
                    print(round_trip_table([r2])[-1], flush=True)
            if "sqlite" in stores:
                for poll in polls:
                    for responder in ("executor", "agent"):
                        r2 = asyncio.run(
                            round_trip_run(
                                url("sqlite"),
                                "sqlite",
                                responder,
                                "two",
                                args.inbox_round_trips,
                                1,
                                poll,
                            )
                        )
                        trips.append(r2)
                        print(round_trip_table([r2])[-1], flush=True)
            print()
        elapsed = clock() - started
        text = markdown(info, messages, trips, elapsed, loadavg())
        print(text)
        if args.write:
            write_section(text, RESULTS, SECTION)
            print(f"\nupdated {RESULTS}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
