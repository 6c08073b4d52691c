"""Helpers shared by the benchmark scripts in this directory (not a benchmark itself).

Importing it puts the checkout's ``src/`` on ``sys.path`` when ``meerkat_runtime`` is not
installed, so the scripts import it before anything from ``meerkat_runtime``.

The scripts import it as ``_common`` (their own directory is first on ``sys.path`` when run as
``python benchmarks/bench_*.py``; ``meerkat worker`` processes get it on ``PYTHONPATH``, as for
``_pg_worker_exec``). It holds only what several scripts did the same way: the machine
description (CPU, RAM, load, pressure, which code ran), nearest-rank percentiles, the markdown
header of a ``results.md`` section and the ``--write`` logic that replaces that section, the
no-wake prompt policy, and the no-op executor.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import platform
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

try:
    import meerkat_runtime
except ModuleNotFoundError as exc:  # not installed: use the checkout's src/
    if exc.name != "meerkat_runtime":
        raise
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    import meerkat_runtime

from meerkat_runtime import (
    Message,
    PolicyRow,
    PolicyTable,
    PromptInput,
    RunContext,
    RunResult,
    RuntimeConfig,
    default_policy_table,
)

MAX_PENDING = 10_000_000  # the default (10,000) would reject a large backlog as queue_full
FINDINGS = "### Findings"


# ---------------------------------------------------------------------------- workload


class NoopExecutor:
    """Commits its boundary with the staged user messages, optionally sleeps (cancellable),
    and completes with ``RunResult(text="ok")``."""

    def __init__(self, sleep: float = 0.0) -> None:
        self.sleep = sleep

    async def apply(self, run: RunContext) -> RunResult:
        msgs = [
            Message(role="user", content=getattr(a.content, "text", ""), input_ids=[a.input_id])
            for a in run.primitive.appends
            if a.input_id is not None
        ]
        await run.commit_boundary(msgs)
        if self.sleep > 0:
            await run.wait(self.sleep)  # returns early if the run is interrupted
        return RunResult(text="ok")


def no_wake_policy() -> PolicyTable:
    """The default table with prompts that never wake a run (accept path only)."""
    d = PolicyTable.decision("stage_run_start", "none", "fifo", "on_run_complete")
    return default_policy_table().with_rows({"prompt": PolicyRow(d, d)})


def config() -> RuntimeConfig:
    """A runtime config whose pending-input limit a large backlog does not hit."""
    return RuntimeConfig(max_pending_inputs=MAX_PENDING)


def prompts(n: int) -> list[PromptInput]:
    """``n`` distinct durable prompts, built before any clock starts."""
    return [PromptInput.new(f"prompt {i}") for i in range(n)]


def split(items: list[Any], parts: int) -> list[list[Any]]:
    """``items`` dealt round-robin into ``parts`` lists (one per producer)."""
    return [items[i::parts] for i in range(parts)]


def check(cond: bool, msg: str) -> None:
    """Stop the benchmark when a measurement did not do what it was meant to."""
    if not cond:
        raise SystemExit(f"benchmark invalid: {msg}")


# ---------------------------------------------------------------------------- statistics


def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (nearest rank) of unsorted ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def us(seconds: float) -> str:
    """Seconds as whole microseconds with thousands separators."""
    return f"{seconds * 1e6:,.0f}"


def ms(seconds: float) -> str:
    """Seconds as milliseconds with two decimals."""
    return f"{seconds * 1e3:.2f}"


# ---------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return cpu


def ram_gib() -> float | None:
    """Total RAM in GiB, rounded to 0.1 (``/proc/meminfo``), or ``None`` when unknown."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1 << 20), 1)
    return None


def usable_cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 0


def python_version() -> str:
    """E.g. ``CPython 3.12.3``."""
    return f"{platform.python_implementation()} {platform.python_version()}"


def now_iso() -> str:
    """The current UTC time, to the second."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def code_fingerprint(*, newest: bool = False) -> str:
    """SHA-256 (12 hex) of the package's .py files: which code ran; with ``newest``, also the
    newest file's mtime."""
    root = Path(meerkat_runtime.__file__).resolve().parent
    h = hashlib.sha256()
    latest = 0.0
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
        latest = max(latest, f.stat().st_mtime)
    out = f"meerkat_runtime sha256:{h.hexdigest()[:12]}"
    if newest:
        when = dt.datetime.fromtimestamp(latest, dt.UTC).isoformat(timespec="seconds")
        out += f", newest file {when}"
    return out


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load average: other work on the machine skews every figure."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def pressure() -> str:
    """Linux PSI: the share of the last 60 s in which some task waited for a CPU or for I/O
    (high values mean other work on the machine skews every figure)."""
    out = []
    for res in ("cpu", "io"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            some = Path(f"/proc/pressure/{res}").read_text().splitlines()[0]
            out.append(f"{res} {float(some.split()[2].split('=')[1]):.0f}%")
    return ", ".join(out) or "n/a"


def machine() -> dict[str, Any]:
    """The machine and code a run used, as recorded by the section-writing benchmarks."""
    return {
        "python": python_version(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "platform": platform.platform(),
        "date": now_iso(),
        "loadavg_at_start": loadavg(),
        "code": code_fingerprint(),
    }


def print_machine(info: dict[str, Any], extra: Sequence[str] = ()) -> None:
    """The console header of a run made with :func:`machine` (``extra`` lines after the CPU
    line)."""
    print(f"Python  {info['python']}")
    print(f"CPU     {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable)")
    for line in extra:
        print(line)
    print(f"Load    {info['loadavg_at_start']} (1/5/15 min) at start")
    print(f"Code    {info['code']}\n")


def store_urls(tmp: Path) -> Callable[[str], str]:
    """``url(store)``: ``memory://`` for ``"memory"``, else a fresh SQLite file in ``tmp`` at
    each call (one per measurement)."""
    n_db = 0

    def url(store: str) -> str:
        nonlocal n_db
        if store == "memory":
            return "memory://"
        n_db += 1
        return f"sqlite:///{tmp}/bench-{n_db}.db"  # a fresh file per measurement

    return url


# ---------------------------------------------------------------------------- results.md


def section_head(
    section: str,
    info: dict[str, Any],
    command: Sequence[str],
    elapsed: float,
    load_end: list[float] | None,
    extra: Sequence[str] = (),
) -> list[str]:
    """A section's first lines: its heading, when and how it was recorded, and the machine
    table (``extra`` rows go after the Python row)."""
    return [
        section,
        "",
        f"Recorded {info['date'].replace('T', ' ').replace('+00:00', ' UTC')} with "
        f"`{' '.join(command)}` ({elapsed:.0f} s in all).",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | `{info['cpu']}` |",
        f"| cores | {info['cores']} ({info['usable_cores']} usable) |",
        f"| OS | {info['platform']} |",
        f"| Python | {info['python']} |",
        *extra,
        f"| code | `{info['code']}` |",
        f"| load | {info['loadavg_at_start']} at start, {load_end} at end (1/5/15 min) |",
        "",
    ]


def write_section(text: str, path: Path, section: str, findings: str = FINDINGS) -> None:
    """Replace ``section`` (from its ``## `` heading to the next) in ``path``, or append it,
    keeping the old section's ``findings`` subsection."""
    doc = path.read_text() if path.exists() else ""
    start = doc.find(section)
    if start < 0:
        path.write_text(doc.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n")
        return
    nxt = re.search(r"^## ", doc[start + len(section) :], re.MULTILINE)
    end = start + len(section) + nxt.start() if nxt else len(doc)
    old = doc[start:end]
    kept = old[old.find(findings) :].rstrip("\n") if findings in old else ""
    new = text.rstrip("\n") + ("\n\n" + kept if kept else "") + "\n"
    rest = doc[end:]
    path.write_text(doc[:start] + new + ("\n" + rest if rest else ""))
