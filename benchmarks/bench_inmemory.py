"""Throughput and latency of the runtime control plane on the in-memory store.

Measures, each several times on a fresh ``Runtime`` (the median is reported):

1. accepted inputs per second (durable ``PromptInput`` via ``Runtime.accept``), 1 session and
   100 sessions (100 concurrent producers). Prompts use a policy row with wake mode ``none``
   so no run starts and only the accept path is timed.
2. completed no-op runs per second, 1 session and 100 sessions: N prompts accepted with
   ``accept_with_completion`` up front (a backlog), then every outcome awaited;
   runs/s = N / elapsed (accepts included). Also a closed loop: one producer that accepts one
   prompt and waits for its outcome before the next.
3. accept-to-ack latency of single ``accept`` calls from one producer (p50 / p99 / p99.9 / max).

Inputs are built before the clock starts; the store is ``memory://``. Nothing is written
unless ``--write PATH`` is given (then a JSON file with the machine and the figures).

    python benchmarks/bench_inmemory.py            # full run, about a minute
    python benchmarks/bench_inmemory.py --quick    # smoke run, a few seconds
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    NoopExecutor,
    check,
    code_fingerprint,
    config,
    cpu_model,
    loadavg,
    no_wake_policy,
    now_iso,
    prompts,
    python_version,
    ram_gib,
    split,
    usable_cores,
)

from meerkat_runtime import (
    PromptInput,
    Runtime,
)

# ---------------------------------------------------------------------------- measurements


async def accept_throughput(n: int, sessions: int) -> Rate:
    """Inputs accepted per second over ``sessions`` sessions, one producer per session."""
    rt = Runtime.open("memory://", policy=no_wake_policy(), config=config())
    try:
        ids = [(await rt.create_session(executor=NoopExecutor())).id for _ in range(sessions)]
        batches = split(prompts(n), sessions)

        async def produce(sid: str, batch: list[PromptInput]) -> int:
            ok = 0
            for inp in batch:
                out = await rt.accept(sid, inp)
                ok += out.outcome_type == "accepted"
            return ok

        gc.collect()
        t0 = _start()
        counts = await asyncio.gather(*(produce(s, b) for s, b in zip(ids, batches, strict=True)))
        rate = _rate(n, t0)
        check(sum(counts) == n, f"only {sum(counts)} of {n} inputs were accepted")
        return rate
    finally:
        await rt.close(grace=0)


async def run_throughput(n: int, sessions: int) -> Rate:
    """No-op runs completed per second: accept N prompts (a backlog), await all outcomes."""
    rt = Runtime.open("memory://", config=config())
    try:
        ids = [(await rt.create_session(executor=NoopExecutor())).id for _ in range(sessions)]
        batches = split(prompts(n), sessions)

        async def produce(sid: str, batch: list[PromptInput]) -> int:
            handles = [await rt.accept_with_completion(sid, inp) for inp in batch]
            outs = [await h.wait() for h in handles]
            return sum(o.outcome_type == "completed" for o in outs)

        gc.collect()
        t0 = _start()
        counts = await asyncio.gather(*(produce(s, b) for s, b in zip(ids, batches, strict=True)))
        rate = _rate(n, t0)
        check(sum(counts) == n, f"only {sum(counts)} of {n} runs completed")
        return rate
    finally:
        await rt.close(grace=0)


async def run_closed_loop(n: int) -> Rate:
    """One producer, one session: accept a prompt, wait for its outcome, repeat."""
    rt = Runtime.open("memory://", config=config())
    try:
        sid = (await rt.create_session(executor=NoopExecutor())).id
        batch = prompts(n)
        gc.collect()
        ok = 0
        t0 = _start()
        for inp in batch:
            out = await (await rt.accept_with_completion(sid, inp)).wait()
            ok += out.outcome_type == "completed"
        rate = _rate(n, t0)
        check(ok == n, f"only {ok} of {n} runs completed")
        return rate
    finally:
        await rt.close(grace=0)


async def accept_latency(n: int) -> dict[str, float]:
    """Per-call latency (microseconds) of ``accept`` from one producer, no runs."""
    rt = Runtime.open("memory://", policy=no_wake_policy(), config=config())
    try:
        sid = (await rt.create_session(executor=NoopExecutor())).id
        batch = prompts(n)
        lat = [0] * n
        clock = time.perf_counter_ns
        gc.collect()
        for i, inp in enumerate(batch):
            t0 = clock()
            await rt.accept(sid, inp)
            lat[i] = clock() - t0
        lat.sort()
        return {
            "p50": lat[n // 2] / 1e3,
            "p99": lat[min(n - 1, int(n * 0.99))] / 1e3,
            "p99.9": lat[min(n - 1, int(n * 0.999))] / 1e3,
            "max": lat[-1] / 1e3,
            "mean": sum(lat) / n / 1e3,
        }
    finally:
        await rt.close(grace=0)


Rate = tuple[float, float]  # (per wall-clock second, per CPU second of this process)


def _start() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _rate(n: int, t0: tuple[float, float]) -> Rate:
    """``n`` per second of wall time (``perf_counter``) and per second of this process's CPU
    time; the two differ when other work on the machine takes the CPU away."""
    wall = time.perf_counter() - t0[0]
    cpu = time.process_time() - t0[1]
    return n / wall, n / cpu if cpu > 0 else float("nan")


# ---------------------------------------------------------------------------- harness


@dataclass
class Row:
    name: str
    n: int
    unit: str
    samples: list[float] = field(default_factory=list)
    cpu_samples: list[float] = field(default_factory=list)

    @classmethod
    def rates(cls, name: str, n: int, unit: str, results: list[Rate]) -> Row:
        return cls(name, n, unit, [r[0] for r in results], [r[1] for r in results])

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def cpu_median(self) -> float | None:
        return statistics.median(self.cpu_samples) if self.cpu_samples else None


@dataclass
class Sizes:
    reps: int
    accept_n: int
    runs_1_n: int
    runs_100_n: int
    closed_n: int
    latency_n: int


FULL = Sizes(
    reps=5,
    accept_n=10_000,
    runs_1_n=1_000,
    runs_100_n=3_000,
    closed_n=2_000,
    latency_n=10_000,
)
QUICK = Sizes(reps=3, accept_n=2_000, runs_1_n=300, runs_100_n=1_000, closed_n=500, latency_n=2_000)


def measure(fn: Callable[[], Coroutine[Any, Any, Any]], reps: int, no_gc: bool) -> list[Any]:
    out = []
    for _ in range(reps):
        gc.collect()
        if no_gc:
            gc.disable()
        try:
            out.append(asyncio.run(fn()))
        finally:
            gc.enable()
    return out


def machine() -> dict[str, Any]:
    import pydantic

    return {
        "python": python_version(),
        "pydantic": pydantic.VERSION,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "ram_gib": ram_gib(),
        "platform": platform.platform(),
        "date": now_iso(),
        "loadavg_at_start": loadavg(),
        "code": code_fingerprint(newest=True),
    }


def profile_accept(n: int) -> int:
    """cProfile ``n`` accepts on one session (no runs). The cyclic GC is off while profiling:
    with it on, collection time lands on whichever allocation triggered it (it shows up as
    ``{built-in method __new__}``); ``--no-gc`` on the benchmark shows the GC's share."""
    import cProfile
    import pstats

    async def loop(rt: Runtime, sid: str, batch: list[PromptInput]) -> None:
        for inp in batch:
            await rt.accept(sid, inp)

    async def go() -> None:
        rt = Runtime.open("memory://", policy=no_wake_policy(), config=config())
        try:
            sid = (await rt.create_session(executor=NoopExecutor())).id
            await loop(rt, sid, prompts(200))  # warm-up
            batch = prompts(n)
            gc.collect()
            gc.disable()
            prof = cProfile.Profile()
            try:
                prof.enable()
                await loop(rt, sid, batch)
                prof.disable()
            finally:
                gc.enable()
            stats = pstats.Stats(prof).strip_dirs()
            print(f"cProfile of {n} accepts (1 session, prompts do not wake runs, GC off)\n")
            stats.sort_stats("cumulative").print_stats(30)
            stats.sort_stats("tottime").print_stats(15)
        finally:
            await rt.close(grace=0)

    asyncio.run(go())
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a few seconds)")
    ap.add_argument("--reps", type=int, help="repetitions per measurement (median reported)")
    ap.add_argument(
        "--no-gc",
        action="store_true",
        help="disable the cyclic GC inside timed runs (shows the GC's share)",
    )
    ap.add_argument(
        "--backlog-sweep",
        action="store_true",
        help="also time 1-session runs/s for backlogs of 250..4000 prompts (1 rep each, ~40 s)",
    )
    ap.add_argument(
        "--profile",
        type=int,
        nargs="?",
        const=20_000,
        metavar="N",
        help="instead of benchmarking, cProfile N accepts (default 20000; GC off) and print "
        "the top functions",
    )
    ap.add_argument("--write", metavar="PATH", help="also write the results as JSON to PATH")
    args = ap.parse_args(argv)
    if args.profile:
        return profile_accept(args.profile)

    sz = QUICK if args.quick else FULL
    reps = args.reps or sz.reps
    info = machine()
    print(f"Python  {info['python']} (pydantic {info['pydantic']})")
    print(
        f"CPU     {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
        f"RAM {info['ram_gib']} GiB"
    )
    print(f"Load    {info['loadavg_at_start']} (1/5/15 min) at start")
    print(f"Code    {info['code']}")
    print(
        f"Mode    {'quick' if args.quick else 'full'}, {reps} reps, median reported"
        f"{', GC disabled in timed runs' if args.no_gc else ''}"
    )
    print()

    started = time.perf_counter()
    # warm up lazy imports, schema caches and the event loop path once, untimed
    asyncio.run(accept_throughput(200, 1))
    asyncio.run(run_throughput(50, 1))

    def rates(name: str, n: int, unit: str, fn: Callable[[], Any], k: int = reps) -> Row:
        return Row.rates(name, n, unit, measure(fn, k, args.no_gc))

    rows = [
        rates("accept, 1 session", sz.accept_n, "inputs/s",
              lambda: accept_throughput(sz.accept_n, 1)),
        rates("accept, 100 sessions", sz.accept_n, "inputs/s",
              lambda: accept_throughput(sz.accept_n, 100)),
        rates("no-op runs, 1 session (backlog)", sz.runs_1_n, "runs/s",
              lambda: run_throughput(sz.runs_1_n, 1)),
        rates("no-op runs, 100 sessions (backlog)", sz.runs_100_n, "runs/s",
              lambda: run_throughput(sz.runs_100_n, 100)),
        rates("no-op runs, 1 session (closed loop)", sz.closed_n, "runs/s",
              lambda: run_closed_loop(sz.closed_n)),
    ]  # fmt: skip
    lat_samples = measure(lambda: accept_latency(sz.latency_n), reps, args.no_gc)
    for key in ("p50", "p99", "p99.9", "max"):
        samples = [s[key] for s in lat_samples]
        rows.append(Row(f"accept latency {key}, 1 producer", sz.latency_n, "us", samples))
    if args.backlog_sweep:  # one rep each: the trend matters, not the third digit
        for n in (250, 500, 1000, 2000, 4000):
            rows.append(
                rates(f"no-op runs, 1 session, backlog {n}", n, "runs/s",
                      functools.partial(run_throughput, n, 1), k=1)
            )  # fmt: skip

    elapsed = time.perf_counter() - started
    header = (
        f"{'measurement':40s} {'N':>7s} {'median':>10s} {'min':>10s} {'max':>10s} "
        f"{'per CPU-s':>10s}  unit"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        cpu = f"{r.cpu_median:10.1f}" if r.cpu_median is not None else f"{'':10s}"
        print(
            f"{r.name:40s} {r.n:7d} {r.median:10.1f} {min(r.samples):10.1f} "
            f"{max(r.samples):10.1f} {cpu}  {r.unit}"
        )
    print(
        "\nmedian/min/max: per wall-clock second (perf_counter). per CPU-s: median per second of"
        "\nthis process's CPU time; well above the median means other work took the CPU."
    )
    print(f"({elapsed:.1f} s in all; load {loadavg()} at end)")

    if args.write:
        doc = {
            "machine": info,
            "mode": "quick" if args.quick else "full",
            "reps": reps,
            "gc_disabled": args.no_gc,
            "loadavg_at_end": loadavg(),
            "elapsed_s": round(elapsed, 1),
            "results": [
                {**asdict(r), "median": r.median, "cpu_median": r.cpu_median} for r in rows
            ],
        }
        Path(args.write).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
