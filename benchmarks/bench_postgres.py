"""Throughput, latency and failover time of the runtime on the PostgreSQL store (issue 7).

Each measurement runs on a fresh database (``CREATE DATABASE meerkat_bench_pg_<pid>_<n>``
on the server of ``--pg-url``, migrated with ``migrate_postgres``, what ``meerkat db migrate``
runs), dropped right afterwards; every process the script starts is stopped before it exits.

1. the floor: one ``SELECT 1`` round trip and one single-row ``INSERT`` in autocommit
   (``synchronous_commit = on``: a flushed commit) with plain psycopg;
2. durable accepts/s and accept-to-acknowledge latency p50 / p99 of durable ``PromptInput``s:
   - *inbox*: through a non-owning ``Runtime`` (``owns_sessions=False``, the API-server path):
     every accept is an ``inbox_push`` into the session's durable inbox (nobody runs the
     sessions here, so the inbox only grows); 1 producer into 1 session, ``--producers``
     concurrent asyncio tasks each into its own session, and 2 producer processes with
     ``--producers / 2`` tasks each (same total concurrency);
   - *direct*: through an owning ``Runtime`` that holds the sessions' leases, with prompts on a
     policy row whose wake mode is ``none`` (they stay queued, no run starts): the accept
     workload of ``bench_durable.py``, so the figures compare with its SQLite rows;
3. durable runs/s with 1, 2 and 4 ``meerkat worker`` processes on one database: S sessions with
   N prompts in their inboxes (pushed before any worker exists), then the workers start
   (``--max-sessions ceil(S / W)``, so they share the sessions) and the clock runs from the
   first lease acquired (a worker's ``acquired`` JSON event) until the database holds N
   consumed inputs (polled every 50 ms). The executor is ``_pg_worker_exec.NoopExecutor``
   (commits its boundary, returns), through ``--executor-factory``; ``--lease-ttl 10``
   (``RUNS_TTL``, the worker's default);
4. failover: 2 workers run S sessions whose runs each take ``--run-seconds`` (an
   ``asyncio.sleep``), every session with a backlog; the worker holding the most sessions is
   SIGKILLed and the clock runs until the other worker has emitted ``acquired`` for each of
   them, for lease TTLs of 2 s and 10 s. The expiry of the dead worker's leases is read from
   the database, so the time splits into waiting for the lease and noticing the orphan.

Each row notes the CPU time spent per operation by this process (or the worker processes)
and by the database's backends for this database (``/proc/<pid>/stat`` of the PIDs in
``pg_stat_activity``; PostgreSQL runs on this machine), the machine's CPU use during the row
(``/proc/stat``, 100 % = every core busy) and the writer's transactions per COMMIT (group
commit). Nothing here fails on a slow figure, and CI never runs this script.

    python benchmarks/bench_postgres.py            # full run, ~3 min on 2 vCPUs
    python benchmarks/bench_postgres.py --quick    # smoke run, ~30 s
    python benchmarks/bench_postgres.py --only accept runs
    python benchmarks/bench_postgres.py --write    # also update its section of results.md
    python benchmarks/bench_postgres.py --profile inbox   # pyinstrument of inbox accepts
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import platform
import re
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from _common import (
    NoopExecutor,
    code_fingerprint,
    config,
    cpu_model,
    loadavg,
    no_wake_policy,
    now_iso,
    pressure,
    prompts,
    python_version,
    ram_gib,
    split,
    write_section,
)
from _pg_worker_exec import RUN_SECONDS_ENV

from meerkat_runtime import (
    PromptInput,
    Runtime,
)
from meerkat_runtime.store.postgres import PostgresStore, migrate_postgres

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results.md"
SECTION = "## PostgreSQL (issue 7)"
DB_PREFIX = "meerkat_bench_pg_"
CLK_TCK = os.sysconf("SC_CLK_TCK")
STOPPING = False  # set by a signal: nothing new starts (asyncio may run a task on after it)
# lease TTL of the workers in the throughput rows: the worker's default. (It was 60 s while
# Runtime.start() renewed no lease until its recovery was done: fixed, see results.md.)
RUNS_TTL = 10.0


# ---------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    floor_n: int  # round trips and raw commits
    accept_1_n: int  # accepts by 1 producer
    accept_c_n: int  # accepts by the concurrent producers, in all
    run_sessions: int
    run_inputs: int
    workers: tuple[int, ...]
    failover: tuple[tuple[float, int], ...]  # (lease TTL, repetitions)
    failover_sessions: int


FULL = Sizes(2_000, 2_000, 8_000, 100, 2_000, (1, 2, 4), ((2.0, 2), (10.0, 1)), 20)
QUICK = Sizes(300, 300, 1_500, 20, 400, (1, 2), ((2.0, 1),), 10)


# ---------------------------------------------------------------------------- workload


def open_runtime(url: str, *, owning: bool) -> Runtime:
    """An owning Runtime whose prompts stay queued, or a non-owning one (API-server path)."""
    if owning:
        return Runtime.open(
            url,
            policy=no_wake_policy(),
            config=config(),
            executor_factory=lambda rec: NoopExecutor(),
        )
    return Runtime.open(url, owns_sessions=False, config=config())


async def create_sessions(rt: Runtime, n: int, *, agent: bool = False) -> list[str]:
    """``n`` sessions, 16 created at a time: a no-op executor's (``custom_executor``; a
    worker's ``_pg_worker_exec.factory`` gives them one) or the built-in offline agent's."""
    gate = asyncio.Semaphore(16)

    async def one() -> str:
        async with gate:
            if agent:
                return (await rt.create_session(model="offline")).id
            return (await rt.create_session(executor=NoopExecutor())).id

    return list(await asyncio.gather(*(one() for _ in range(n))))


# ---------------------------------------------------------------------------- statistics


def pct(sorted_ns: Sequence[int], q: float) -> float:
    """The q-quantile (nearest rank) of sorted nanoseconds, in milliseconds."""
    n = len(sorted_ns)
    return sorted_ns[min(n - 1, int(n * q))] / 1e6 if n else float("nan")


@dataclass
class Row:
    section: str  # floor, accept, runs, failover
    name: str
    n: int
    rate: float | None = None  # per wall-clock second
    unit: str = ""
    p50_ms: float | None = None
    p99_ms: float | None = None
    client_us: float | None = None  # CPU of this process (or the workers) per operation
    pg_us: float | None = None  # CPU of the database's backends per operation
    busy_pct: float | None = None  # machine CPU use during the row (100 = every core)
    extra: dict[str, Any] = field(default_factory=dict)


class GcTimer:
    """Time spent in the cyclic garbage collector while active (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0 = 0.0

    def _cb(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._t0

    def __enter__(self) -> GcTimer:
        gc.callbacks.append(self._cb)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._cb)


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of a process so far; 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far (``/proc/stat``)."""
    try:
        parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return (0, 0)
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return (sum(parts) - idle, sum(parts))


def busy_between(a: tuple[int, int], b: tuple[int, int]) -> float | None:
    total = b[1] - a[1]
    return round(100 * (b[0] - a[0]) / total) if total > 0 else None


class Observer:
    """A connection of its own to the benchmark database: CPU of the database's backends
    (its own excluded) and progress counts."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn

    @classmethod
    async def open(cls, url: str) -> Observer:
        return cls(await psycopg.AsyncConnection.connect(url, autocommit=True))

    async def close(self) -> None:
        await self.conn.close()

    async def backend_pids(self) -> list[int]:
        cur = await self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        )
        return [int(r[0]) for r in await cur.fetchall()]

    async def backend_cpu(self) -> dict[int, float]:
        return {pid: proc_cpu(pid) for pid in await self.backend_pids()}

    async def progress(self) -> tuple[int, int, int]:
        """(consumed inputs, abandoned inputs, inbox entries)."""
        cur = await self.conn.execute(
            "SELECT count(*) FILTER (WHERE current_state = 'consumed'),"
            " count(*) FILTER (WHERE current_state = 'abandoned'),"
            " (SELECT count(*) FROM inbox) FROM input_states"
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])

    async def runs(self) -> int:
        cur = await self.conn.execute("SELECT count(*) FROM runs")
        row = await cur.fetchone()
        return int(row[0]) if row is not None else 0


def cpu_spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds the backends spent between two samples (new backends count from 0)."""
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())


# ---------------------------------------------------------------------------- databases


class Databases:
    """Creates the benchmark's databases on the server of ``admin_url`` and drops them (also
    leftovers of earlier runs whose process is gone)."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.live: list[str] = []
        self._n = 0

    def _admin(self, sql: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            cur = conn.execute(sql)
            return list(cur.fetchall()) if cur.description else []

    def url_of(self, name: str) -> str:
        base, _, query = self.admin_url.partition("?")
        url = base.rsplit("/", 1)[0] + "/" + name
        return f"{url}?{query}" if query else url

    def drop_stale(self) -> list[str]:
        """Drop ``meerkat_bench_pg_<pid>_*`` databases whose process no longer runs."""
        dropped = []
        for (name,) in self._admin(
            f"SELECT datname FROM pg_database WHERE datname LIKE '{DB_PREFIX}%'"
        ):
            m = re.match(rf"{DB_PREFIX}(\d+)_", name)
            if m is None or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
                continue
            self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            dropped.append(name)
        return dropped

    async def create(self) -> str:
        """A fresh, migrated database; its URL."""
        if STOPPING:
            raise SystemExit("stopping")
        self._n += 1
        name = f"{DB_PREFIX}{os.getpid()}_{self._n}"
        await asyncio.to_thread(self._admin, f'CREATE DATABASE "{name}"')
        self.live.append(name)
        url = self.url_of(name)
        await migrate_postgres(url)
        return url

    async def drop(self, url: str) -> None:
        name = url.partition("?")[0].rsplit("/", 1)[1]
        await asyncio.to_thread(self._admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        with contextlib.suppress(ValueError):
            self.live.remove(name)

    def drop_all(self) -> None:
        for name in list(self.live):
            with contextlib.suppress(psycopg.Error):
                self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            self.live.remove(name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


DBS: Databases | None = None  # set in main(): every measurement makes its database here


@contextlib.asynccontextmanager
async def fresh_db() -> AsyncIterator[str]:
    assert DBS is not None
    url = await DBS.create()
    try:
        yield url
    finally:
        await DBS.drop(url)


# ---------------------------------------------------------------------------- child processes

CHILDREN: dict[int, asyncio.subprocess.Process] = {}  # every process started, until reaped


async def spawn(
    *cmd: str, env: dict[str, str] | None = None, **kw: Any
) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, **kw)
    CHILDREN[proc.pid] = proc
    return proc


async def send_line(proc: asyncio.subprocess.Process, data: bytes) -> None:
    assert proc.stdin is not None
    proc.stdin.write(data)
    await proc.stdin.drain()


async def read_line(proc: asyncio.subprocess.Process, timeout: float) -> bytes:
    assert proc.stdout is not None
    return await asyncio.wait_for(proc.stdout.readline(), timeout)


async def reap(proc: asyncio.subprocess.Process, timeout: float) -> None:
    """Wait for ``proc`` to exit; SIGKILL it after ``timeout`` seconds."""
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    CHILDREN.pop(proc.pid, None)


def kill_children() -> None:
    """Last resort (an exception or a signal): SIGKILL whatever is still running."""
    for pid in list(CHILDREN):
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        CHILDREN.pop(pid, None)


# ---------------------------------------------------------------------------- 1. the floor


async def floor(n: int) -> list[Row]:
    """psycopg alone: ``SELECT 1`` round trips and single-row autocommit INSERTs."""
    async with fresh_db() as url:
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
        try:
            await conn.execute("SET synchronous_commit = on")
            await conn.execute(
                "CREATE TABLE t (id bigserial PRIMARY KEY, runtime_id text, body text)"
            )
            body = "x" * 400
            out: list[Row] = []
            for label, sql, args in (
                ("SELECT 1 round trip (psycopg async)", "SELECT 1", ()),
                (
                    "1-row INSERT + COMMIT (autocommit, flushed)",
                    "INSERT INTO t (runtime_id, body) VALUES (%s, %s)",
                    ("rt", body),
                ),
            ):
                for _ in range(50):
                    await conn.execute(sql, args)
                lat = [0] * n
                clock = time.perf_counter_ns
                m0, c0, t0 = machine_ticks(), time.process_time(), time.perf_counter()
                for i in range(n):
                    s = clock()
                    await conn.execute(sql, args)
                    lat[i] = clock() - s
                wall = time.perf_counter() - t0
                cpu = time.process_time() - c0
                lat.sort()
                out.append(
                    Row("floor", label, n, n / wall, "/s", pct(lat, 0.5), pct(lat, 0.99),
                        client_us=1e6 * cpu / n, busy_pct=busy_between(m0, machine_ticks()))
                )  # fmt: skip
            return out
        finally:
            await conn.close()


# ---------------------------------------------------------------------------- 2. accepts


async def accept_in_process(url: str, n: int, producers: int, *, owning: bool) -> Row:
    """``producers`` asyncio tasks accept ``n`` durable prompts in all, each into its own
    session; every call's latency is kept."""
    rt = open_runtime(url, owning=owning)
    await rt.start()
    obs = await Observer.open(url)
    try:
        ids = await create_sessions(rt, producers)
        warm = (await create_sessions(rt, 1))[0]
        for p in prompts(20):  # untimed: prepared statements, caches
            await rt.accept(warm, p)
        batches = split(prompts(n), producers)
        lat: list[int] = []
        clock = time.perf_counter_ns

        async def produce(sid: str, batch: list[PromptInput]) -> int:
            ok = 0
            mine = [0] * len(batch)
            for i, inp in enumerate(batch):
                t0 = clock()
                out = await rt.accept(sid, inp)
                mine[i] = clock() - t0
                ok += out.outcome_type == "accepted"
            lat.extend(mine)
            return ok

        store = rt.store
        assert isinstance(store, PostgresStore)
        gc.collect()
        k0, x0 = store.commits, store.transactions
        pg0, m0 = await obs.backend_cpu(), machine_ticks()
        c0, t0 = time.process_time(), time.perf_counter()
        with GcTimer() as gct:
            counts = await asyncio.gather(
                *(produce(s, b) for s, b in zip(ids, batches, strict=True))
            )
            wall = time.perf_counter() - t0
            cpu = time.process_time() - c0
        m1, pg1 = machine_ticks(), await obs.backend_cpu()
        commits = store.commits - k0
        txns = store.transactions - x0
    finally:
        await obs.close()
        await rt.close(grace=0)
    if sum(counts) != n:
        raise SystemExit(f"benchmark invalid: only {sum(counts)} of {n} inputs were accepted")
    first = sorted(lat[: max(1, n // 10)]) if producers == 1 else []
    last = sorted(lat[-max(1, n // 10) :]) if producers == 1 else []
    lat.sort()
    path = "direct (owning Runtime)" if owning else "inbox (non-owning Runtime)"
    who = "1 producer" if producers == 1 else f"{producers} tasks, 1 process"
    extra: dict[str, Any] = {
        "commits": commits,
        # the inbox pushes are writer jobs, not submitted transactions: count per COMMIT
        "per_commit": round((n if not owning else txns) / commits, 1) if commits else None,
        "gc_pct": round(100 * gct.seconds / wall),
    }
    if first:
        extra["p50_first_last_tenth_ms"] = [round(pct(first, 0.5), 2), round(pct(last, 0.5), 2)]
    return Row(
        "accept", f"{path}, {who}", n, n / wall, "accepts/s", pct(lat, 0.5), pct(lat, 0.99),
        client_us=1e6 * cpu / n, pg_us=1e6 * cpu_spent(pg0, pg1) / n,
        busy_pct=busy_between(m0, m1), extra=extra,
    )  # fmt: skip


async def child_accept(url: str) -> None:
    """``--child-accept URL``: a producer process. Reads its job (a JSON line: sessions, the
    warm-up session, inputs per session) from stdin, warms up, says ready, waits for "go",
    accepts through a non-owning Runtime with one task per session, and prints its figures."""
    job = json.loads(sys.stdin.readline())
    rt = open_runtime(url, owning=False)
    await rt.start()
    try:
        for p in prompts(20):
            await rt.accept(job["warm"], p)
        batches = split(prompts(job["n"]), len(job["sessions"]))
        lat: list[int] = []
        clock = time.perf_counter_ns

        async def produce(sid: str, batch: list[PromptInput]) -> int:
            ok = 0
            mine = [0] * len(batch)
            for i, inp in enumerate(batch):
                t0 = clock()
                out = await rt.accept(sid, inp)
                mine[i] = clock() - t0
                ok += out.outcome_type == "accepted"
            lat.extend(mine)
            return ok

        store = rt.store
        assert isinstance(store, PostgresStore)
        gc.collect()
        print(json.dumps({"ready": True}), flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # "go"
        k0 = store.commits
        c0, t0 = time.process_time(), time.time()
        counts = await asyncio.gather(
            *(produce(s, b) for s, b in zip(job["sessions"], batches, strict=True))
        )
        t1, cpu = time.time(), time.process_time() - c0
        doc = {
            "ok": sum(counts), "t0": t0, "t1": t1, "cpu": cpu, "lat": lat,
            "commits": store.commits - k0,
        }  # fmt: skip
        print(json.dumps(doc), flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # the parent has read its backends' CPU
    finally:
        await rt.close(grace=0)


async def accept_processes(url: str, n: int, procs: int, tasks: int) -> Row:
    """``procs`` producer processes (``--child-accept``), ``tasks`` tasks each, each task into
    its own session; the clock runs from the first process's start to the last one's end."""
    rt = open_runtime(url, owning=False)
    await rt.start()
    try:
        ids = await create_sessions(rt, procs * tasks)
        warm = await create_sessions(rt, procs)
    finally:
        await rt.close(grace=0)
    obs = await Observer.open(url)
    children: list[asyncio.subprocess.Process] = []
    me = str(BENCH_DIR / "bench_postgres.py")
    try:
        for k in range(procs):
            child = await spawn(
                sys.executable, me, "--child-accept", url,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 24,
            )  # fmt: skip
            children.append(child)
            job = {"sessions": ids[k * tasks : (k + 1) * tasks], "warm": warm[k], "n": n // procs}
            await send_line(child, (json.dumps(job) + "\n").encode())
        for child in children:
            line = await read_line(child, 60)
            if not line.startswith(b'{"ready"'):
                raise SystemExit(f"producer process failed to start: {line!r}")
        pg0, m0 = await obs.backend_cpu(), machine_ticks()
        for child in children:
            await send_line(child, b"go\n")
        docs = [json.loads(await read_line(c, 300)) for c in children]
        m1, pg1 = machine_ticks(), await obs.backend_cpu()
        for child in children:
            await send_line(child, b"bye\n")  # the child closes its Runtime and exits
            await reap(child, 30)
    finally:
        await obs.close()
        for child in children:
            if child.returncode is None:
                await reap(child, 0)
    total = sum(d["ok"] for d in docs)
    want = (n // procs) * procs
    if total != want:
        raise SystemExit(f"benchmark invalid: only {total} of {want} inputs were accepted")
    wall = max(d["t1"] for d in docs) - min(d["t0"] for d in docs)
    lat = sorted(x for d in docs for x in d["lat"])
    commits = sum(d["commits"] for d in docs)
    return Row(
        "accept", f"inbox (non-owning Runtime), {procs} processes x {tasks} tasks", total,
        total / wall, "accepts/s", pct(lat, 0.5), pct(lat, 0.99),
        client_us=1e6 * sum(d["cpu"] for d in docs) / total,
        pg_us=1e6 * cpu_spent(pg0, pg1) / total, busy_pct=busy_between(m0, m1),
        extra={"commits": commits, "per_commit": round(total / commits, 1) if commits else None},
    )  # fmt: skip


# ---------------------------------------------------------------------------- workers


@dataclass
class Worker:
    index: int
    proc: asyncio.subprocess.Process
    stderr_path: Path
    events: list[dict[str, Any]] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    def started(self) -> dict[str, Any] | None:
        return next((e for e in self.events if e["event"] == "started"), None)

    def status_after(self, at: float) -> dict[str, Any] | None:
        """The first ``status`` line emitted after ``at``."""
        return next(
            (e for e in self.events if e["event"] == "status" and float(e["at"]) > at), None
        )

    def transactions(self) -> int:
        """Transactions the worker made durable, by its last ``status`` line."""
        last = next((e for e in reversed(self.events) if e["event"] == "status"), None)
        return int(last.get("transactions") or 0) if last is not None else 0


class Fleet:
    """``meerkat worker --json`` processes on one database; their JSON events, as they come."""

    def __init__(self, url: str, logdir: Path) -> None:
        self.url = url
        self.logdir = logdir
        self.workers: list[Worker] = []

    @staticmethod
    def command() -> list[str]:
        exe = Path(sys.executable).with_name("meerkat")
        if exe.exists():
            return [str(exe)]
        return [sys.executable, "-m", "meerkat_runtime"]

    async def launch(
        self,
        count: int,
        *,
        ttl: float,
        max_sessions: int | None,
        run_seconds: float = 0.0,
        status_every: float = 1.0,
        profile_dir: Path | None = None,
    ) -> None:
        """Start ``count`` workers; with ``profile_dir``, each under cProfile (wall clock),
        its stats written to ``profile_dir/worker-<index>.pstats`` when it exits."""
        if STOPPING:
            raise SystemExit("stopping")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(BENCH_DIR), env.get("PYTHONPATH", "")) if p
        )
        env[RUN_SECONDS_ENV] = str(run_seconds)
        args = [
            "worker", "--store", self.url, "--json",
            "--lease-ttl", str(ttl), "--status-every", str(status_every), "--grace", "0",
            "--executor-factory", "_pg_worker_exec:factory",
        ]  # fmt: skip
        if max_sessions is not None:
            args += ["--max-sessions", str(max_sessions)]
        for _ in range(count):
            idx = len(self.workers)
            cmd = [*self.command(), *args]
            if profile_dir is not None:
                out = str(profile_dir / f"worker-{idx}.pstats")
                cmd = [sys.executable, "-m", "cProfile", "-o", out, "-m", "meerkat_runtime", *args]
            err_path = self.logdir / f"worker-{os.getpid()}-{id(self):x}-{idx}.stderr"
            with err_path.open("wb") as err:
                proc = await spawn(*cmd, env=env, stdout=asyncio.subprocess.PIPE, stderr=err)
            w = Worker(idx, proc, err_path)
            w.reader = asyncio.get_running_loop().create_task(self._read(w))
            self.workers.append(w)

    async def _read(self, w: Worker) -> None:
        assert w.proc.stdout is not None
        async for line in w.proc.stdout:
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and "event" in doc:
                    w.events.append(doc)

    async def until(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            for w in self.workers:
                if w.proc.returncode is not None and w.proc.returncode != -signal.SIGKILL:
                    raise SystemExit(f"worker {w.index} exited early:\n{self.stderr_tail(w)}")
            if time.monotonic() > deadline:
                tails = "\n".join(self.stderr_tail(w) for w in self.workers)
                raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")
            await asyncio.sleep(0.02)

    def stderr_tail(self, w: Worker) -> str:
        with contextlib.suppress(OSError):
            lines = w.stderr_path.read_text(errors="replace").splitlines()
            return f"worker {w.index} stderr: " + "\n".join(lines[-15:])
        return ""

    def acquisitions(self) -> list[tuple[float, int, str, str]]:
        """(at, worker, event, session) of every ownership change, in time order."""
        out = [
            (float(e["at"]), w.index, e["event"], str(e["session_id"]))
            for w in self.workers
            for e in w.events
            if e["event"] in ("acquired", "lost", "released")
        ]
        return sorted(out)

    def owners(self) -> dict[str, int]:
        """session -> the worker that owns it now (by the events so far)."""
        own: dict[str, int] = {}
        for _at, idx, event, sid in self.acquisitions():
            if event == "acquired":
                own[sid] = idx
            elif own.get(sid) == idx:
                del own[sid]
        return own

    def cpu(self) -> list[float]:
        return [proc_cpu(w.proc.pid) for w in self.workers]

    async def stop(self) -> None:
        """SIGTERM (drain: --grace 0) every live worker; SIGKILL after 20 s."""
        for w in self.workers:
            if w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGTERM)
        for w in self.workers:
            await reap(w.proc, 20)
            if w.reader is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(w.reader, 5)
            with contextlib.suppress(OSError):
                w.stderr_path.unlink()


# ---------------------------------------------------------------------------- 3. runs


async def push_inputs(url: str, ids: list[str], n: int) -> None:
    """``n`` prompts into the inboxes of ``ids`` (a non-owning Runtime, one task each)."""
    rt = open_runtime(url, owning=False)
    await rt.start()
    try:

        async def produce(sid: str, batch: list[PromptInput]) -> int:
            ok = 0
            for inp in batch:
                ok += (await rt.accept(sid, inp)).outcome_type == "accepted"
            return ok

        counts = await asyncio.gather(
            *(produce(s, b) for s, b in zip(ids, split(prompts(n), len(ids)), strict=True))
        )
    finally:
        await rt.close(grace=0)
    if sum(counts) != n:
        raise SystemExit(f"benchmark invalid: only {sum(counts)} of {n} pushes were accepted")


async def runs_with_workers(
    url: str, logdir: Path, workers: int, sessions: int, n: int, *, bounded: bool = True,
    agent: bool = False, ttl: float = RUNS_TTL, profile_dir: Path | None = None,
) -> Row:  # fmt: skip
    """S sessions with N prompts in their inboxes; then ``workers`` workers start. Timed from
    the first ``acquired`` event to N consumed inputs in the database."""
    rt = open_runtime(url, owning=False)
    await rt.start()
    try:
        ids = await create_sessions(rt, sessions, agent=agent)
    finally:
        await rt.close(grace=0)
    await push_inputs(url, ids, n)
    obs = await Observer.open(url)
    fleet = Fleet(url, logdir)
    try:
        cap = math.ceil(sessions / workers) if bounded else None
        m0, t_launch = machine_ticks(), time.time()
        await fleet.launch(workers, ttl=ttl, max_sessions=cap, profile_dir=profile_dir)
        deadline = time.monotonic() + 180
        consumed = abandoned = 0
        series: list[tuple[float, int]] = []  # (time, consumed inputs)
        while True:
            consumed, abandoned, _inbox = await obs.progress()
            series.append((time.time(), consumed))
            if consumed + abandoned >= n:
                break
            if time.monotonic() > deadline:
                tails = "\n".join(fleet.stderr_tail(w) for w in fleet.workers)
                raise SystemExit(f"runs: only {consumed} of {n} consumed after 180 s\n{tails}")
            for w in fleet.workers:
                if w.proc.returncode is not None:
                    raise SystemExit(f"worker {w.index} exited:\n{fleet.stderr_tail(w)}")
            await asyncio.sleep(0.05)
        t_done, m1 = time.time(), machine_ticks()
        worker_cpu = sum(fleet.cpu())
        pg_cpu = sum((await obs.backend_cpu()).values())  # the workers' backends are new
        runs = await obs.runs()
        # the last status line of each worker: transactions it made durable
        await fleet.until(
            lambda: all(w.status_after(t_done) is not None for w in fleet.workers),
            10,
            "a status line after the end",
        )
        txns = sum(w.transactions() for w in fleet.workers)
        acq = fleet.acquisitions()
        t_first = min(a[0] for a in acq if a[2] == "acquired")
        t_all = max(a[0] for a in acq if a[2] == "acquired")
        per_worker = [len({a[3] for a in acq if a[1] == w.index and a[2] == "acquired"})
                      for w in fleet.workers]  # fmt: skip
        acquired = sum(1 for a in acq if a[2] == "acquired")
        most = [max((int(e["sessions"]) for e in w.events if e["event"] == "status"), default=0)
                for w in fleet.workers]  # fmt: skip
    finally:
        await fleet.stop()
        await obs.close()
    if abandoned:
        raise SystemExit(f"benchmark invalid: {abandoned} inputs were abandoned")
    wall = t_done - t_first
    # once every session is owned (no recovery or inbox ingestion left): the runs alone
    at_all = next((c for t, c in series if t >= t_all), n)
    tail = round((n - at_all) / (t_done - t_all)) if n - at_all >= n // 5 else None
    what = "offline agent" if agent else "no-op executor"
    cap_text = f"--max-sessions {cap}" if cap is not None else "no --max-sessions"
    cap_text += f", --lease-ttl {ttl:g}"
    lost = sum(1 for a in acq if a[2] == "lost")
    return Row(
        "runs", f"{workers} worker{'s' if workers > 1 else ''} ({cap_text}), {what}", n,
        n / wall, "inputs/s", client_us=1e6 * worker_cpu / n, pg_us=1e6 * pg_cpu / n,
        busy_pct=busy_between(m0, m1),
        extra={
            "runs": runs, "runs_per_s": round(runs / wall), "sessions": sessions,
            "inputs_per_s_after_all_acquired": tail,
            "startup_s": round(t_first - t_launch, 2),
            "all_acquired_s": round(t_all - t_first, 2),
            "sessions_per_worker": per_worker, "most_held": most, "acquisitions": acquired,
            "lost": lost,
            "txns_per_input": round(txns / n, 2),
        },
    )  # fmt: skip


# ---------------------------------------------------------------------------- 4. failover


async def failover(
    url: str, logdir: Path, ttl: float, sessions: int, run_seconds: float, workers: int = 2
) -> Row:
    """Kill the busiest of ``workers`` workers; time until the others own its sessions."""
    fleet = Fleet(url, logdir)
    obs = await Observer.open(url)
    try:
        await fleet.launch(workers, ttl=ttl, max_sessions=None, run_seconds=run_seconds)
        await fleet.until(lambda: all(w.started() for w in fleet.workers), 60, "workers")
        rt = open_runtime(url, owning=False)
        await rt.start()
        try:
            ids = await create_sessions(rt, sessions)
        finally:
            await rt.close(grace=0)
        # each session's backlog outlasts the wait for the lease and the takeover
        per = math.ceil((2.0 + 1.5 * ttl + 5.0) / run_seconds)
        await push_inputs(url, ids, per * sessions)
        await fleet.until(lambda: len(fleet.owners()) == sessions, 60, "sessions owned")
        await asyncio.sleep(1.0)  # steady state: every session has a run in flight
        owners = fleet.owners()
        counts = [sum(1 for o in owners.values() if o == w.index) for w in fleet.workers]
        victim = fleet.workers[max(range(workers), key=lambda i: counts[i])]
        theirs = {s for s, o in owners.items() if o == victim.index}
        started = victim.started()
        assert started is not None
        owner_id = started["owner_id"]
        consumed0 = (await obs.progress())[0]
        t_kill = time.time()
        victim.proc.kill()
        await asyncio.sleep(0.2)  # a renewal already sent may still commit
        cur = await obs.conn.execute(
            "SELECT extract(epoch FROM min(lease_expiry))::float8,"
            " extract(epoch FROM max(lease_expiry))::float8"
            " FROM runtimes WHERE lease_owner = %s",
            (owner_id,),
        )
        row = await cur.fetchone()
        assert row is not None and row[0] is not None
        expiry_min, expiry_max = float(row[0]), float(row[1])

        def taken() -> dict[str, float]:
            out: dict[str, float] = {}
            for at, idx, event, sid in fleet.acquisitions():
                if event == "acquired" and sid in theirs and idx != victim.index and at >= t_kill:
                    out.setdefault(sid, at)
            return out

        await fleet.until(lambda: len(taken()) == len(theirs), 3 * ttl + 30, "takeover")
        took = taken()
        t_last = max(took.values())
        consumed1 = (await obs.progress())[0]
    finally:
        await fleet.stop()
        await obs.close()
    return Row(
        "failover", f"lease TTL {ttl:g} s, {workers} workers, {sessions} sessions", len(theirs),
        t_last - t_kill, "s",
        extra={
            "first_s": round(min(took.values()) - t_kill, 2),
            "lease_left_s": [round(expiry_min - t_kill, 2), round(expiry_max - t_kill, 2)],
            "after_expiry_s": round(t_last - expiry_max, 2),
            "sessions_killed": len(theirs), "split": counts,
            "consumed_meanwhile": consumed1 - consumed0,
        },
    )  # fmt: skip


# ---------------------------------------------------------------------------- machine


def machine(pg_url: str) -> dict[str, Any]:
    pg: dict[str, str] = {}
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for name in (
            "server_version", "synchronous_commit", "fsync", "wal_sync_method", "commit_delay",
            "shared_buffers", "max_connections",
        ):  # fmt: skip
            row = conn.execute(f"SHOW {name}").fetchone()
            pg[name] = str(row[0]) if row is not None else ""
    return {
        "python": python_version(),
        "psycopg": psycopg.__version__,
        "postgres": pg,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": ram_gib(),
        "platform": platform.platform(),
        "code": code_fingerprint(),
        "date": now_iso(),
        "loadavg_at_start": loadavg(),
        "pressure_at_start": pressure(),
    }


# ---------------------------------------------------------------------------- report


def _num(x: float | None, digits: int = 0) -> str:
    return "" if x is None else f"{x:,.{digits}f}"


def table(rows: list[Row]) -> list[str]:
    out: list[str] = []
    floor_rows = [r for r in rows if r.section == "floor"]
    if floor_rows:
        out += [
            "| floor (psycopg alone) | N | per s | p50 ms | p99 ms | client CPU µs/op |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in floor_rows:
            out.append(
                f"| {r.name} | {r.n:,} | {_num(r.rate)} | {_num(r.p50_ms, 2)} | "
                f"{_num(r.p99_ms, 2)} | {_num(r.client_us)} |"
            )
        out.append("")
    acc = [r for r in rows if r.section == "accept"]
    if acc:
        out += [
            "| durable accepts | N | accepts/s | p50 ms | p99 ms | client CPU µs | "
            "PG CPU µs | machine busy | notes |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in acc:
            out.append(
                f"| {r.name} | {r.n:,} | {_num(r.rate)} | {_num(r.p50_ms, 2)} | "
                f"{_num(r.p99_ms, 2)} | {_num(r.client_us)} | {_num(r.pg_us)} | "
                f"{_num(r.busy_pct)} % | {_notes(r)} |"
            )
        out.append("")
    runs = [r for r in rows if r.section == "runs"]
    if runs:
        out += [
            "| durable runs, `meerkat worker` | inputs | inputs/s | runs/s | worker CPU µs | "
            "PG CPU µs | machine busy | notes |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in runs:
            e = dict(r.extra)
            rps = e.pop("runs_per_s")
            out.append(
                f"| {r.name} | {r.n:,} | {_num(r.rate)} | {rps:,} | {_num(r.client_us)} | "
                f"{_num(r.pg_us)} | {_num(r.busy_pct)} % | {_notes(r, e)} |"
            )
        out.append("")
    fo = [r for r in rows if r.section == "failover"]
    if fo:
        out += [
            "| failover (SIGKILL the busiest worker) | sessions moved | all taken over after "
            "| first | its leases expired after | last takeover after the expiry | split |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in fo:
            e = r.extra
            lo, hi = e["lease_left_s"]
            out.append(
                f"| {r.name} | {r.n} | {_num(r.rate, 2)} s | {e['first_s']:.2f} s | "
                f"{lo:.2f} to {hi:.2f} s | {e['after_expiry_s']:.2f} s | {e['split']} |"
            )
        out.append("")
    return out


def _notes(r: Row, extra: dict[str, Any] | None = None) -> str:
    e = r.extra if extra is None else extra
    return ", ".join(f"{k} {v}" for k, v in e.items() if v is not None)


def render(info: dict[str, Any], rows: list[Row], sz: Sizes, args: argparse.Namespace) -> str:
    pg = info["postgres"]
    lines = [
        SECTION,
        "",
        f"Recorded {info['date'].replace('T', ' ').replace('+00:00', ' UTC')} with "
        f"`{' '.join(['python benchmarks/bench_postgres.py', *sys.argv[1:]])}` "
        f"({info['elapsed_s']:.0f} s in all).",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | `{info['cpu']}`, {info['cores']} cores, RAM {info['ram_gib']} GiB |",
        f"| OS | {info['platform']} |",
        f"| Python | {info['python']}, psycopg {info['psycopg']} |",
        f"| PostgreSQL | {pg['server_version']} on the same machine (127.0.0.1); "
        f"synchronous_commit {pg['synchronous_commit']}, fsync {pg['fsync']}, "
        f"wal_sync_method {pg['wal_sync_method']}, commit_delay {pg['commit_delay']}, "
        f"shared_buffers {pg['shared_buffers']} |",
        f"| code | `{info['code']}` |",
        f"| load | {info['loadavg_at_start']} at start, {info['loadavg_at_end']} at end "
        f"(1/5/15 min); CPU/IO pressure {info['pressure_at_start']} → "
        f"{info['pressure_at_end']} |",
        "",
        "What each table measures: see the docstring of `benchmarks/bench_postgres.py` and "
        "`benchmarks/README.md`. *client CPU* is this process's (or the producer processes') "
        "CPU time per accept; *PG CPU* the CPU time of the benchmark database's backends per "
        "operation; *machine busy* the share of both vCPUs in use during the row (everything "
        "on the machine); *per_commit* accepts per COMMIT of the store's writer (group "
        f"commit). Prompts are durable `PromptInput`s; {sz.run_sessions} sessions for the "
        f"worker rows, whose inputs were pushed to the inboxes before the workers started "
        "(*startup_s*: from launching the processes to the first lease; *all_acquired_s*: "
        "from the first lease to the last; *txns_per_input*: transactions the workers made "
        "durable, from their last `status` line). Failover: "
        f"{sz.failover_sessions} sessions, each run takes {args.run_seconds:g} s "
        "(`asyncio.sleep`), every session has a backlog; times from the SIGKILL.",
        "",
        *table(rows),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- profile


async def profile_worker(logdir: Path, sessions: int, n: int, top: int) -> None:
    """One ``meerkat worker`` under cProfile (wall clock: time waiting for the database shows
    as ``epoll.poll``) running ``n`` no-op runs queued in ``sessions`` inboxes."""
    import pstats

    async with fresh_db() as url:
        row = await runs_with_workers(url, logdir, 1, sessions, n, profile_dir=logdir)
    stats = pstats.Stats(str(logdir / "worker-0.pstats"))
    stats.strip_dirs()
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    print("\n".join(table([row])))


async def profile(mode: str, n: int, producers: int, use_cprofile: bool, top: int) -> None:
    """pyinstrument (wall clock, the loop thread) or cProfile (CPU time) of ``n`` accepts by
    ``producers`` tasks, inbox or direct, after an unprofiled warm-up run."""
    async with fresh_db() as url:
        await accept_in_process(url, 200, producers, owning=mode == "direct")
    async with fresh_db() as url:
        if use_cprofile:
            import cProfile
            import pstats

            prof = cProfile.Profile(timer=time.thread_time)
            prof.enable()
            row = await accept_in_process(url, n, producers, owning=mode == "direct")
            prof.disable()
            stats = pstats.Stats(prof)
            stats.strip_dirs()
            stats.sort_stats("cumulative").print_stats(top)
            stats.sort_stats("tottime").print_stats(top)
        else:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0005, async_mode="disabled")
            profiler.start()
            row = await accept_in_process(url, n, producers, owning=mode == "direct")
            profiler.stop()
            print(profiler.output_text(unicode=True, color=False, show_all=False))
    print("\n".join(table([row])))


# ---------------------------------------------------------------------------- main


async def bench(args: argparse.Namespace, sz: Sizes, logdir: Path) -> list[Row]:
    only = set(args.only or ("floor", "accept", "runs", "failover"))
    rows: list[Row] = []

    def add(r: Row) -> None:
        rows.append(r)
        lat = "" if r.p50_ms is None else f", p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms"
        digits = 2 if r.unit == "s" else 0
        print(f"  {r.section}: {r.name}: {_num(r.rate, digits)} {r.unit}{lat}  {_notes(r)}")

    if "floor" in only:
        for r in await floor(sz.floor_n):
            add(r)
    if "accept" in only:
        async with fresh_db() as url:  # warm-up, untimed
            await accept_in_process(url, 200, 1, owning=False)
        half = max(1, args.producers // 2)
        for owning in (False, True):
            async with fresh_db() as url:
                add(await accept_in_process(url, sz.accept_1_n, 1, owning=owning))
            async with fresh_db() as url:
                add(await accept_in_process(url, sz.accept_c_n, args.producers, owning=owning))
        async with fresh_db() as url:
            add(await accept_processes(url, sz.accept_c_n, 2, half))
    if "runs" in only:
        for w in sz.workers:
            async with fresh_db() as url:
                add(await runs_with_workers(url, logdir, w, sz.run_sessions, sz.run_inputs))
        if not args.quick:
            w = max(sz.workers)
            async with fresh_db() as url:  # what happens without a bound: see the findings
                add(await runs_with_workers(url, logdir, w, sz.run_sessions, sz.run_inputs,
                                            bounded=False))  # fmt: skip
            async with fresh_db() as url:
                add(await runs_with_workers(url, logdir, w, sz.run_sessions,
                                            sz.run_inputs // 2, agent=True))  # fmt: skip
    if "failover" in only:
        for ttl, reps in sz.failover:
            for _ in range(reps):
                async with fresh_db() as url:
                    add(await failover(url, logdir, ttl, sz.failover_sessions, args.run_seconds))
    return rows


def _on_signal(signum: int, frame: Any) -> None:
    global STOPPING
    STOPPING = True
    raise SystemExit(f"stopped by signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run, ~30 s)")
    ap.add_argument(
        "--pg-url",
        default=os.environ.get("MEERKAT_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a database on the server to use, as a user that may CREATE DATABASE; the "
        "benchmark's databases are made beside it and dropped (default: "
        "$MEERKAT_BENCH_PG_URL or postgresql://postgres@127.0.0.1:5432/postgres)",
    )  # fmt: skip
    ap.add_argument(
        "--only", nargs="+", choices=("floor", "accept", "runs", "failover"),
        help="run only these measurements",
    )  # fmt: skip
    ap.add_argument("--producers", type=int, default=50, help="concurrent accept tasks (50)")
    ap.add_argument(
        "--run-seconds", type=float, default=0.2,
        help="how long each run takes in the failover measurement (0.2)",
    )  # fmt: skip
    ap.add_argument(
        "--profile", choices=("inbox", "direct", "worker"),
        help="instead of benchmarking, profile accepts (pyinstrument; --cprofile for cProfile) "
        "or one worker's no-op runs (cProfile in the worker process)",
    )  # fmt: skip
    ap.add_argument("--profile-n", type=int, default=3000, help="accepts profiled (3000)")
    ap.add_argument("--profile-producers", type=int, default=1, help="tasks while profiling (1)")
    ap.add_argument("--cprofile", action="store_true", help="cProfile (thread CPU time)")
    ap.add_argument("--top", type=int, default=30, help="functions per cProfile table")
    ap.add_argument("--write", action="store_true", help=f"update {SECTION!r} in results.md")
    ap.add_argument("--json", metavar="PATH", help="also write machine + rows as JSON to PATH")
    ap.add_argument("--child-accept", metavar="URL", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child_accept:
        asyncio.run(child_accept(args.child_accept))
        return 0

    global DBS
    DBS = Databases(args.pg_url)
    # SIGINT too: asyncio.run's own handler only cancels the main task, and a cancellation
    # that lands while Runtime.close() awaits its tasks is swallowed there
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    sz = QUICK if args.quick else FULL
    logdir = Path(tempfile.mkdtemp(prefix="meerkat-bench-pg-"))
    try:
        stale = DBS.drop_stale()
        if stale:
            print(f"dropped {len(stale)} databases left by earlier runs: {', '.join(stale)}")
        if args.profile == "worker":
            asyncio.run(profile_worker(logdir, sz.run_sessions, args.profile_n, args.top))
            return 0
        if args.profile:
            asyncio.run(
                profile(args.profile, args.profile_n, args.profile_producers, args.cprofile,
                        args.top)
            )  # fmt: skip
            return 0
        info = machine(args.pg_url)
        pg = info["postgres"]
        print(f"Python  {info['python']}, psycopg {info['psycopg']}")
        print(f"PG      {pg['server_version']}: synchronous_commit {pg['synchronous_commit']}, "
              f"fsync {pg['fsync']}, wal_sync_method {pg['wal_sync_method']}")  # fmt: skip
        print(f"CPU     {info['cpu']}, {info['cores']} cores, RAM {info['ram_gib']} GiB")
        print(f"Date    {info['date']}; load {info['loadavg_at_start']}, "
              f"pressure {info['pressure_at_start']} at start")  # fmt: skip
        print(f"Mode    {'quick' if args.quick else 'full'}")
        print()
        started = time.perf_counter()
        rows = asyncio.run(bench(args, sz, logdir))
        info["loadavg_at_end"] = loadavg()
        info["pressure_at_end"] = pressure()
        info["elapsed_s"] = round(time.perf_counter() - started, 1)
        text = render(info, rows, sz, args)
        print()
        print(text)
        if args.write:
            write_section(text, RESULTS, SECTION)
            print(f"\nwrote the section {SECTION!r} of {RESULTS}")
        if args.json:
            doc = {"machine": info, "rows": [asdict(r) for r in rows]}
            Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        return 0
    finally:
        kill_children()
        DBS.drop_all()
        with contextlib.suppress(OSError):
            for f in logdir.iterdir():
                f.unlink()
            logdir.rmdir()


if __name__ == "__main__":
    raise SystemExit(main())
