"""Surfaces: throughput and latency of the REST server and of the JSON-RPC server over stdio.

Each server runs in its own process; the client is this process (one asyncio loop). Three
workloads, each on the memory store and on SQLite (a fresh temp file per row):

1. **accept**: ``POST /runtime/{id}/accept`` (REST) and ``runtime/accept`` (RPC) of a durable
   prompt ``Input`` JSON document (built by ``PromptInput.new(...).to_json()`` before the clock
   starts, a fresh id each). The server's prompt policy is the one bench_inmemory and
   bench_durable use (``stage_run_start``, wake ``none``, ``fifo``): an accepted prompt is
   queued and never starts a run, so only the accept path is timed. The default table would
   start an offline turn for every prompt, which measures turns, not accepts. To set that
   policy, the server is this script in ``--child`` mode: it runs the real entry function
   (``surfaces.rest.serve`` / ``surfaces.rpc.main``, exactly what ``meerkat serve`` /
   ``rkat-rpc`` run) with ``Runtime.open`` swapped for one that passes the policy and
   ``max_pending_inputs`` = 10⁷. Concurrency c = c workers, each accepting into its own session.
2. **turn**: ``POST /sessions/{id}/messages`` (waits for the result) and ``turn/start``, a
   10-word prompt that the offline model echoes (one model call, 10 ``text_delta``s: the
   *text* turn of bench_agent). The servers are the console scripts themselves (``meerkat
   serve --port P --store URL``, ``rkat-rpc --store URL``) with the default policy. 16 sessions
   (created ``deferred``, one untimed turn each first); c workers; with c = 16 each worker has
   its own session, with c = 1 the worker goes round the 16 sessions. RPC answers a turn after
   writing its ``session/event`` notifications (about 15 per text turn), which the client
   reads; REST has no event subscriber.
3. **floor**: the cheapest request of each surface (``GET /health``, ``initialized`` as a
   request): HTTP or JSON-RPC framing, routing and the client, without the runtime.

Each row also runs **in-process** (the same workload through ``Runtime`` in this process, no
server) so the surface's cost is the difference measured at the same moment, not against a
figure from another hour. Per row: requests/s, latency p50/p99 (client side, send to parsed
answer), and CPU per request of the server process (``/proc/<pid>/stat``, all its threads)
and of the client (this process). The machine is shared: compare rows of one run.

REST clients: ``httpx.AsyncClient`` with keep-alive (a pool of c connections). RPC clients:
raw newline-delimited JSON-RPC on the server's stdin/stdout pipes, c requests in flight,
answers matched by id.

    python benchmarks/bench_surfaces.py              # full run, ~2-2.5 min on 2 vCPUs
    python benchmarks/bench_surfaces.py --quick      # smoke run, ~45 s
    python benchmarks/bench_surfaces.py --write      # also update its section of results.md
    python benchmarks/bench_surfaces.py --profile rest:accept:memory:32   # pyinstrument
                                                     # of the server process, text to stdout
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import itertools
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import _common
from _common import (
    config,
    loadavg,
    no_wake_policy,
    print_machine,
    section_head,
    write_section,
)

from meerkat_runtime import (
    PromptInput,
    Runtime,
)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
BIN = Path(sys.executable).parent
RESULTS = Path(__file__).resolve().parent / "results.md"
SECTION = "## Surfaces (bench_surfaces.py)"
TURN_SESSIONS = 16
PROMPT_WORDS = "please answer with one short sentence about benchmark"  # + a number
clock = time.perf_counter
clock_ns = time.perf_counter_ns
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class Sizes:
    """Requests per row, by workload and store (memory, sqlite)."""

    accept: dict[str, int]
    turn: dict[str, int]
    floor: int
    warmup: int  # untimed requests per worker before each row


FULL = Sizes(
    accept={"memory": 2000, "sqlite": 1000},
    turn={"memory": 1000, "sqlite": 300},
    floor=2000,
    warmup=10,
)
QUICK = Sizes(
    accept={"memory": 400, "sqlite": 200},
    turn={"memory": 160, "sqlite": 64},
    floor=300,
    warmup=3,
)


# ---------------------------------------------------------------------------- policy


class NoWakeRuntime(Runtime):
    """``Runtime.open`` with the no-wake prompt policy (swapped into the surface modules by
    ``--child ... --policy nowake``)."""

    @classmethod
    def open(cls, url: str | None = None, **kw: Any) -> Runtime:
        kw.setdefault("policy", no_wake_policy())
        kw.setdefault("config", config())
        return super().open(url, **kw)


# ---------------------------------------------------------------------------- child servers


def child_main(args: argparse.Namespace) -> int:
    """Run a server as ``meerkat serve`` / ``rkat-rpc`` do (same entry functions), optionally
    with the no-wake policy and under pyinstrument (the report goes to ``--profile-out``)."""
    from meerkat_runtime.surfaces import rest, rpc

    if args.policy == "nowake":
        setattr(rest, "Runtime", NoWakeRuntime)  # noqa: B010 (both call Runtime.open(store))
        setattr(rpc, "Runtime", NoWakeRuntime)  # noqa: B010
    profiler: Any = None
    cprof: Any = None
    if args.profile_out and args.profile_out.endswith(".pstats"):
        import cProfile

        cprof = cProfile.Profile(timer=time.thread_time)  # CPU time of the loop thread
        cprof.enable()
    elif args.profile_out:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005, async_mode="disabled")
        profiler.start()
    try:
        if args.child == "rest":
            rest.serve(host="127.0.0.1", port=args.port, store=args.store)
        else:
            rpc.main(["--store", args.store])  # parses its own argv
    finally:
        if cprof is not None:
            cprof.disable()
            cprof.dump_stats(args.profile_out)
        if profiler is not None:
            profiler.stop()
            text = profiler.output_text(unicode=True, color=False, show_all=False)
            Path(args.profile_out).write_text(text)
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of process ``pid`` so far."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def server_cmd(
    surface: str, url: str, port: int, *, child: bool, policy: str, profile_out: str | None
) -> list[str]:
    if child:
        cmd = [sys.executable, str(SCRIPT), "--child", surface, "--store", url, "--policy", policy]
        if surface == "rest":
            cmd += ["--port", str(port)]
        if profile_out:
            cmd += ["--profile-out", profile_out]
        return cmd
    if surface == "rest":
        return [str(BIN / "meerkat"), "serve", "--port", str(port), "--store", url]
    return [str(BIN / "rkat-rpc"), "--store", url]


# ---------------------------------------------------------------------------- clients


class Client(Protocol):
    """One server process and the calls this benchmark makes to it (``k``: the worker)."""

    surface: str
    pid: int
    notifications: int  # JSON-RPC notifications received so far

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def create_session(self) -> str: ...
    async def accept(self, sid: str, body: bytes, k: int = 0) -> None: ...
    async def turn(self, sid: str, prompt: str, k: int = 0) -> None: ...
    async def floor(self, k: int = 0) -> None: ...


class RestClient:
    surface = "rest"
    notifications = 0

    def __init__(self, cmd: list[str], port: int, log: Path, conc: int) -> None:
        self.cmd, self.port, self.log, self.conc = cmd, port, log, conc
        self.pid = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.http: Any = None  # setup calls
        self.pool: list[Any] = []  # one client (one keep-alive connection) per worker

    async def start(self) -> None:
        import httpx

        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *self.cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )
        self.pid = self.proc.pid
        base = f"http://127.0.0.1:{self.port}"
        # one AsyncClient per worker: httpx's shared pool costs the client O(c) CPU per
        # request with c requests in flight (2-5 ms per request at c = 32)
        self.http = httpx.AsyncClient(base_url=base, timeout=120.0)
        one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        self.pool = [
            httpx.AsyncClient(base_url=base, limits=one, timeout=120.0) for _ in range(self.conc)
        ]
        deadline = clock() + 30
        while True:
            if self.proc.returncode is not None:
                raise SystemExit(f"the REST server exited at start; see {self.log}")
            try:
                r = await self.http.get("/health")
                if r.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if clock() > deadline:
                raise SystemExit(f"the REST server did not start in 30 s; see {self.log}")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        for c in [self.http, *self.pool]:
            if c is not None:
                await c.aclose()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    async def create_session(self) -> str:
        r = await self.http.post("/sessions", json={"initial_turn": "deferred"})
        r.raise_for_status()
        return str(r.json()["session_id"])

    async def accept(self, sid: str, body: bytes, k: int = 0) -> None:
        r = await self.pool[k].post(
            f"/runtime/{sid}/accept",
            content=body,
            headers={"content-type": "application/json"},
        )
        if r.status_code != 200 or r.json().get("outcome_type") != "accepted":
            raise RuntimeError(f"accept answered {r.status_code}: {r.text[:300]}")

    async def turn(self, sid: str, prompt: str, k: int = 0) -> None:
        r = await self.pool[k].post(f"/sessions/{sid}/messages", json={"prompt": prompt})
        if r.status_code != 200 or not r.json().get("text"):
            raise RuntimeError(f"turn answered {r.status_code}: {r.text[:300]}")

    async def floor(self, k: int = 0) -> None:
        r = await self.pool[k].get("/health")
        if r.status_code != 200:
            raise RuntimeError(f"/health answered {r.status_code}")


class RpcClient:
    """Raw newline-delimited JSON-RPC on the server's pipes, answers matched by id."""

    surface = "rpc"
    notifications = 0

    def __init__(self, cmd: list[str], log: Path) -> None:
        self.cmd, self.log = cmd, log
        self.pid = 0
        self.proc: asyncio.subprocess.Process | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._reader: asyncio.Task[None] | None = None
        self._logf: Any = None

    async def start(self) -> None:
        self._logf = self.log.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            *self.cmd,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._logf,
            limit=64 << 20,
        )
        self.pid = self.proc.pid
        self._reader = asyncio.get_running_loop().create_task(self._read())
        await asyncio.wait_for(self.call("initialize", {}), 30)

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        pending = self._pending
        async for line in self.proc.stdout:
            msg = json.loads(line)
            rid = msg.get("id")
            if "method" in msg:
                self.notifications += 1
                continue
            fut = pending.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(RuntimeError(f"the RPC server exited; see {self.log}"))

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        rid = next(self._ids)
        line = json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
        return await self.send_line(rid, line.encode() + b"\n", method)

    async def send_line(self, rid: int, line: bytes, method: str) -> Any:
        assert self.proc is not None and self.proc.stdin is not None
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self.proc.stdin.write(line)
        await self.proc.stdin.drain()
        msg = await fut
        if "error" in msg:
            raise RuntimeError(f"{method} failed: {msg['error']}")
        return msg["result"]

    def next_id(self) -> int:
        return next(self._ids)

    async def stop(self) -> None:
        if self.proc is not None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader
        if self._logf is not None:
            self._logf.close()

    async def create_session(self) -> str:
        res = await self.call("session/create", {"initial_turn": "deferred"})
        return str(res["session_id"])

    async def accept(self, sid: str, body: bytes, k: int = 0) -> None:
        rid = self.next_id()
        # the Input document is already JSON: splice it in instead of re-encoding it
        line = (
            b'{"jsonrpc":"2.0","id":%d,"method":"runtime/accept","params":{"session_id":"%s",'
            b'"input":%s}}\n' % (rid, sid.encode(), body)
        )
        res = await self.send_line(rid, line, "runtime/accept")
        if res.get("outcome_type") != "accepted":
            raise RuntimeError(f"runtime/accept answered {res}")

    async def turn(self, sid: str, prompt: str, k: int = 0) -> None:
        res = await self.call("turn/start", {"session_id": sid, "prompt": prompt})
        if not res.get("text"):
            raise RuntimeError(f"turn/start answered {res}")

    async def floor(self, k: int = 0) -> None:
        await self.call("initialized", {})


# ---------------------------------------------------------------------------- measurement


@dataclass
class Row:
    workload: str  # accept, turn, floor
    surface: str  # rest, rpc, in-process
    store: str
    conc: int
    n: int
    wall: float
    lat: list[int]  # ns, sorted
    server_cpu: float | None  # seconds, the server process
    client_cpu: float  # seconds, this process
    notifications: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.n / self.wall

    def pct_ms(self, q: float) -> float:
        return self.lat[min(len(self.lat) - 1, int(len(self.lat) * q))] / 1e6


async def drive(
    n: int, conc: int, call: Callable[[int, int], Awaitable[None]]
) -> tuple[float, list[int]]:
    """``conc`` workers make ``n`` calls in all: ``call(worker, i)``; wall seconds and each
    call's latency (ns, sorted)."""
    lat = [0] * n
    nxt = iter(range(n))

    async def worker(k: int) -> None:
        for i in nxt:
            t0 = clock_ns()
            await call(k, i)
            lat[i] = clock_ns() - t0

    t0 = clock()
    await asyncio.gather(*(worker(k) for k in range(conc)))
    wall = clock() - t0
    lat.sort()
    return wall, lat


def prompt_bodies(n: int) -> list[bytes]:
    return [PromptInput.new(f"prompt {i}").to_json().encode() for i in range(n)]


def turn_prompt(i: int) -> str:
    return f"{PROMPT_WORDS} {i}"  # 10 words echoed by the offline model


async def surface_row(
    workload: str,
    client: Client,
    store: str,
    conc: int,
    n: int,
    warmup: int,
) -> Row:
    """One row on a started server: sessions, warm-up, then the timed calls."""
    if workload == "accept":
        sids = [await client.create_session() for _ in range(conc)]
        warm = prompt_bodies(warmup * conc)
        bodies = prompt_bodies(n)

        async def warm_call(k: int, i: int) -> None:
            await client.accept(sids[k], warm[i], k)

        async def call(k: int, i: int) -> None:
            await client.accept(sids[k], bodies[i], k)

        await drive(len(warm), conc, warm_call)
    elif workload == "turn":
        sids = [await client.create_session() for _ in range(TURN_SESSIONS)]
        await asyncio.gather(*(client.turn(s, turn_prompt(0)) for s in sids))

        async def call(k: int, i: int) -> None:
            sid = sids[i % TURN_SESSIONS] if conc < TURN_SESSIONS else sids[k % TURN_SESSIONS]
            await client.turn(sid, turn_prompt(i), k)
    else:

        async def call(k: int, i: int) -> None:
            await client.floor(k)

        await drive(warmup * conc, conc, call)
    gc.collect()
    notes0 = client.notifications
    s0, c0 = proc_cpu(client.pid), time.process_time()
    wall, lat = await drive(n, conc, call)
    s1, c1 = proc_cpu(client.pid), time.process_time()
    return Row(
        workload,
        client.surface,
        store,
        conc,
        n,
        wall,
        lat,
        s1 - s0,
        c1 - c0,
        client.notifications - notes0,
    )


async def inprocess_row(workload: str, url: str, store: str, conc: int, n: int, warmup: int) -> Row:
    """The same workload through ``Runtime`` in this process (no server)."""
    nowake = workload == "accept"
    rt = Runtime.open(
        url,
        policy=no_wake_policy() if nowake else None,
        config=config() if nowake else None,
    )
    try:
        await rt.start()
        if workload == "accept":
            sids = [(await rt.create_session()).id for _ in range(conc)]
            warm = [PromptInput.new(f"w{i}") for i in range(warmup * conc)]
            inputs = [PromptInput.new(f"prompt {i}") for i in range(n)]

            async def warm_call(k: int, i: int) -> None:
                out = await rt.accept(sids[k], warm[i])
                assert out.outcome_type == "accepted", out

            async def call(k: int, i: int) -> None:
                out = await rt.accept(sids[k], inputs[i])
                if out.outcome_type != "accepted":
                    raise RuntimeError(f"accept: {out}")

            await drive(len(warm), conc, warm_call)
        else:
            sids = [(await rt.create_session()).id for _ in range(TURN_SESSIONS)]

            async def one_turn(sid: str, prompt: str) -> None:
                handle = await rt.turn(sid, prompt)
                out = await handle.wait()
                if out.outcome_type != "completed":
                    raise RuntimeError(f"turn: {out}")

            await asyncio.gather(*(one_turn(s, turn_prompt(0)) for s in sids))

            async def call(k: int, i: int) -> None:
                sid = sids[i % TURN_SESSIONS] if conc < TURN_SESSIONS else sids[k % TURN_SESSIONS]
                await one_turn(sid, turn_prompt(i))

        gc.collect()
        c0 = time.process_time()
        wall, lat = await drive(n, conc, call)
        c1 = time.process_time()
    finally:
        await rt.close(grace=0)
    return Row(workload, "in-process", store, conc, n, wall, lat, None, c1 - c0)


# ---------------------------------------------------------------------------- plan


@dataclass
class Plan:
    workload: str
    surface: str
    store: str
    concs: list[int]
    n: int


def make_client(
    surface: str, url: str, tmp: Path, conc: int, *, child: bool, policy: str, prof: str | None
) -> Client:
    port = free_port()
    cmd = server_cmd(surface, url, port, child=child, policy=policy, profile_out=prof)
    log = tmp / f"{surface}-server.log"
    if surface == "rest":
        return RestClient(cmd, port, log, conc)
    return RpcClient(cmd, log)


class Urls:
    def __init__(self, tmp: Path) -> None:
        self.tmp, self.k = tmp, 0

    def __call__(self, store: str) -> str:
        if store == "memory":
            return "memory://"
        self.k += 1
        return f"sqlite:///{self.tmp}/bench-{self.k}.db"  # a fresh file per row


async def run_surface(
    workload: str, surface: str, store: str, conc: int, n: int, sz: Sizes, urls: Urls, tmp: Path
) -> Row:
    """A fresh server (and store) per row."""
    accept = workload == "accept"
    client = make_client(
        surface,
        urls(store),
        tmp,
        conc,
        child=accept,
        policy="nowake" if accept else "default",
        prof=None,
    )
    await client.start()
    try:
        return await surface_row(workload, client, store, conc, n, sz.warmup)
    finally:
        await client.stop()


# ---------------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    import fastapi
    import httpx
    import uvicorn

    # what uvicorn's "auto" settings pick in the server processes (same interpreter)
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return {
        **_common.machine(),
        "stack": f"uvicorn {uvicorn.__version__} ({loop} loop, {http} parser), "
        f"FastAPI {fastapi.__version__}, httpx {httpx.__version__} (client)",
    }


# ---------------------------------------------------------------------------- report

HEADER = [
    "| workload | surface | store | conc | n | req/s | p50 ms | p99 ms | server CPU/req µs "
    "| client CPU/req µs | vs in-process |",
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
]


def fmt_row(r: Row, base: Row | None) -> str:
    server = f"{r.server_cpu / r.n * 1e6:,.0f}" if r.server_cpu is not None else ""
    client = f"{r.client_cpu / r.n * 1e6:,.0f}"
    if r.surface == "in-process":
        server, client = client, ""  # the runtime's own CPU is the "server" side
    ratio = f"{r.rate / base.rate:.2f}x" if base is not None and r is not base else ""
    unit = {"accept": "accept", "turn": "turn (text)", "floor": "floor"}[r.workload]
    return (
        f"| {unit} | {r.surface} | {r.store} | {r.conc} | {r.n:,} | {r.rate:,.0f} | "
        f"{r.pct_ms(0.5):.2f} | {r.pct_ms(0.99):.2f} | {server} | {client} | {ratio} |"
    )


def table(rows: list[Row]) -> list[str]:
    out = list(HEADER)
    for r in rows:
        base = next(
            (
                b
                for b in rows
                if b.surface == "in-process"
                and (b.workload, b.store, b.conc) == (r.workload, r.store, r.conc)
            ),
            None,
        )
        out.append(fmt_row(r, base))
    return out


def markdown(
    info: dict[str, Any],
    rows: list[Row],
    elapsed: float,
    load_end: list[float] | None,
    argv: Sequence[str],
) -> str:
    rpc_turns = [r for r in rows if r.surface == "rpc" and r.workload == "turn"]
    notes = (
        f"{sum(r.notifications for r in rpc_turns) / sum(r.n for r in rpc_turns):.0f}"
        if rpc_turns
        else "about 15"
    )
    command = ["python benchmarks/bench_surfaces.py", *argv]
    stack = [f"| stack | {info['stack']} |"]
    lines = [
        *section_head(SECTION, info, command, elapsed, load_end, stack),
        "Each server is its own process (a fresh one, and a fresh SQLite file, per row); the "
        "client is the benchmark process. *accept*: a durable prompt `Input` JSON document "
        "(`POST /runtime/{id}/accept`, `runtime/accept`) under a prompt policy that never "
        "wakes a run (the accept workload of bench_inmemory / bench_durable), c workers each "
        "into its own session; the server is the real entry function (`rest.serve`, "
        "`rpc.main`) run by this script with `Runtime.open` given that policy. *turn*: a "
        "10-word prompt the offline model echoes (`POST /sessions/{id}/messages`, which "
        "waits; `turn/start`), on `meerkat serve` / `rkat-rpc` themselves with the default "
        "policy; 16 sessions (c = 1 goes round them, c = 16 one each). RPC writes each turn's "
        f"`session/event` notifications before its answer ({notes} per turn here), and the "
        "client reads them; REST turns have no event subscriber. *floor*: `GET /health` / "
        "`initialized` (framing, routing and the client, no runtime). *in-process*: the same "
        "workload through `Runtime` in the benchmark process, at the same moment. Latency is "
        "client side (send to parsed answer). *server CPU/req*: the server process's CPU "
        "time (all threads, `/proc/<pid>/stat`) per request; for in-process rows, the "
        "process's own. *client CPU/req*: the benchmark process (httpx, or the JSON-RPC "
        "pipe client). *vs in-process*: req/s over the in-process row's.",
        "",
        *table(rows),
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- profile


async def profile_run(spec: str, sz: Sizes, tmp: Path, cprofile: bool, top: int) -> int:
    """``surface:workload:store:conc``: run that row once against a child server under
    pyinstrument (wall clock) or cProfile (CPU time of the server's loop thread), then print
    the server's profile."""
    try:
        surface, workload, store, conc_s = spec.split(":")
        conc = int(conc_s)
    except ValueError:
        raise SystemExit(f"--profile {spec!r}: expected surface:workload:store:conc") from None
    urls = Urls(tmp)
    out = tmp / ("profile.pstats" if cprofile else "profile.txt")
    n = sz.floor if workload == "floor" else getattr(sz, workload)[store]
    client = make_client(
        surface,
        urls(store),
        tmp,
        conc,
        child=True,
        policy="nowake" if workload == "accept" else "default",
        prof=str(out),
    )
    await client.start()
    try:
        row = await surface_row(workload, client, store, conc, n, sz.warmup)
    finally:
        await client.stop()
    if not out.exists():
        print(f"no profile written; see {tmp}")
    elif cprofile:
        import pstats

        st = pstats.Stats(str(out))
        st.sort_stats("tottime").print_stats(top)
        st.sort_stats("cumulative").print_stats(top)
    else:
        print(out.read_text())
    print("\n".join([*HEADER, fmt_row(row, None)]))
    tool = "cProfile" if cprofile else "pyinstrument"
    print(f"(the server ran under {tool}: its figures are slower than without)")
    return 0


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small counts (a smoke run)")
    ap.add_argument("--stores", default="memory,sqlite", help="memory, sqlite (both)")
    ap.add_argument("--surfaces", default="rest,rpc", help="rest, rpc (both)")
    ap.add_argument(
        "--workloads", default="floor,accept,turn", help="floor, accept, turn (all three)"
    )
    ap.add_argument("--accept-conc", default="1,32", help="accept concurrencies (1,32)")
    ap.add_argument("--turn-conc", default="1,16", help="turn concurrencies (1,16)")
    ap.add_argument("--floor-conc", default="1,32", help="floor concurrencies (1,32)")
    ap.add_argument("--no-inprocess", action="store_true", help="skip the in-process rows")
    ap.add_argument(
        "--write", action="store_true", help=f"update the section {SECTION!r} of results.md"
    )
    ap.add_argument(
        "--profile",
        metavar="SURFACE:WORKLOAD:STORE:CONC",
        help="instead: one row against a server running under pyinstrument, e.g. "
        "rest:accept:memory:32; prints the server's profile",
    )
    ap.add_argument(
        "--cprofile",
        action="store_true",
        help="with --profile: cProfile the server's loop thread in CPU time instead "
        "(less disturbed by a busy machine than pyinstrument's wall clock)",
    )
    ap.add_argument("--top", type=int, default=40, help="rows of the cProfile listing (40)")
    # internal: the server process of a row
    ap.add_argument("--child", choices=("rest", "rpc"), help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--policy", choices=("default", "nowake"), help=argparse.SUPPRESS)
    ap.add_argument("--profile-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args)
    sz = QUICK if args.quick else FULL
    tmp = Path(tempfile.mkdtemp(prefix="meerkat-bench-surfaces-"))
    try:
        if args.profile:
            return asyncio.run(profile_run(args.profile, sz, tmp, args.cprofile, args.top))
        return asyncio.run(bench(args, sz, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


async def bench(args: argparse.Namespace, sz: Sizes, tmp: Path) -> int:
    info = machine()
    print_machine(info, [f"Stack   {info['stack']}"])
    print("\n".join(HEADER), flush=True)
    started = clock()
    urls = Urls(tmp)
    stores, surfaces = _list(args.stores), _list(args.surfaces)
    concs = {
        "floor": [int(c) for c in _list(args.floor_conc)],
        "accept": [int(c) for c in _list(args.accept_conc)],
        "turn": [int(c) for c in _list(args.turn_conc)],
    }
    rows: list[Row] = []

    def show(r: Row) -> None:
        rows.append(r)
        print(table(rows)[-1], flush=True)

    for workload in _list(args.workloads):
        for store in stores if workload != "floor" else ["memory"]:
            for conc in concs[workload]:
                n = sz.floor if workload == "floor" else getattr(sz, workload)[store]
                if workload != "floor" and not args.no_inprocess:
                    show(await inprocess_row(workload, urls(store), store, conc, n, sz.warmup))
                for surface in surfaces:
                    show(await run_surface(workload, surface, store, conc, n, sz, urls, tmp))
    elapsed = clock() - started
    text = markdown(info, rows, elapsed, loadavg(), sys.argv[1:])
    print()
    print(text)
    if args.write:
        write_section(text, RESULTS, SECTION)
        print(f"\nupdated {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
