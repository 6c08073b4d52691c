"""Failover on PostgreSQL with real processes (S6, S7, S10): ``meerkat worker`` processes share
the sessions of one store while the test process, a client that owns no session, keeps
accepting prompts into their durable inboxes. Every session runs the built-in agent on an
offline script whose every run calls a real tool (``tests/failover/tools.py``: it logs each
execution, ``fsync``-ed, before it takes its time), so runs are in flight when a worker

- dies (SIGKILL): the others take its sessions over within the lease plus a scan period;
- is frozen (SIGSTOP) longer than its lease: the others take over under a new generation, and
  once it runs again the database refuses everything it tries to write (the fence, S10);
- loses the database (its role may no longer log in and its backends are terminated every
  50 ms): it stops its sessions itself before the lease runs out, the other worker takes them
  over, and once the database is back it carries on without a restart.

Right after the failure the client sends one more prompt to each session the failed worker
held, so that every one of them needs a new owner (a session with nothing to do is taken over
lazily, when work arrives) and the takeover of all of them is measured from the workers' JSON
events. Each worker's events, stderr and the side-effect log stay in the test's ``tmp_path``.

After each: every acknowledged input was consumed by a completed run and its waiter answered
``completed``; nothing was applied twice; no tool call ran twice; every write the database
committed was made by the holder of the session's lease (audit triggers, ``harness.py``).

Timing: lease 2 s (renewed every 2/3 s; a session not renewed for 1.5 s is stopped), workers
scan for sessions needing an owner every 0.5 s and react to inbox notifications at once; the
bounds add a slack for a loaded 2-vCPU machine and say so in their messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import pytest

from meerkat_runtime import Runtime
from meerkat_runtime.runtime.outcomes import Deduplicated
from tests.failover.conftest import Shared
from tests.failover.harness import (
    Load,
    Partition,
    Report,
    Worker,
    add_app_name,
    check_all,
    create_role,
    drop_role,
    interrupted_by,
    read_audit,
    read_leases,
    script,
    stale_writes,
    stop_all,
    tool_starts,
    wait_for,
    with_user,
)

TTL = 2.0  # --lease-ttl of every worker
SCAN = TTL / 4  # how often a worker looks for sessions needing an owner (notifying store)
TOOL_SECONDS = 0.4  # each tool execution takes this long: runs are in flight
SLACK = 3.0  # scheduling slack on a loaded 2-vCPU machine (PostgreSQL + 4 Python processes)
TAKEOVER_BOUND = TTL + SCAN + SLACK
LOSE_BOUND = 0.75 * TTL + 0.75  # a cut-off worker stops its sessions 0.75 x ttl after renewing


def spawn(shared: Shared, name: str, url: str | None = None) -> Worker:
    return Worker.spawn(
        name,
        url or shared.url,
        shared.directory,
        shared.tool_log,
        lease_ttl=TTL,
        tool_seconds=TOOL_SECONDS,
    )


@contextlib.asynccontextmanager
async def client(shared: Shared) -> AsyncIterator[Runtime]:
    """The test's own Runtime: it only accepts and waits (its accepts go to the inboxes)."""
    async with Runtime.open(add_app_name(shared.url, "client"), owns_sessions=False) as rt:
        yield rt


async def create_sessions(rt: Runtime, prefix: str, n: int) -> list[str]:
    ids = [f"{prefix}-{i:03d}" for i in range(n)]
    for sid in ids:
        await rt.create_session(session_id=sid, offline_script=script(40))
    return ids


def running_now(w: Worker) -> int:
    """Runs in flight in ``w`` by its latest status line, if that is fresh (0 otherwise)."""
    status = w.status_before(time.time())
    if status is None or time.time() - status["at"] > 0.6:
        return 0
    return int(status["running"])


def tools_running(shared: Shared, w: Worker) -> int:
    """Tool executions ``w`` started so recently that they are surely still running (each
    takes ``TOOL_SECONDS`` after it logged its start): runs caught in the middle of a tool."""
    now = time.time()
    return sum(1 for t in tool_starts(shared.tool_log, w.pid) if now - t < TOOL_SECONDS - 0.15)


def in_flight(shared: Shared, w: Worker) -> bool:
    """``w`` has runs in flight (fresh status) and at least one of them is inside its tool."""
    return running_now(w) >= 1 and tools_running(shared, w) >= 1


def takeovers(
    owned: dict[str, int], others: Iterable[Worker], after: float
) -> dict[str, tuple[str, int, float]]:
    """session -> (worker, generation, at) of the first acquisition of each of ``owned`` by
    one of ``others`` after ``after`` under a newer generation than the one in ``owned``."""
    found: dict[str, tuple[str, int, float]] = {}
    for w in others:
        for e in w.of("acquired", after):
            sid, gen = str(e["session_id"]), int(e["generation"])
            if sid in owned and gen > owned[sid] and (sid not in found or e["at"] < found[sid][2]):
                found[sid] = (w.name, gen, float(e["at"]))
    return found


def lost_reports(w: Worker, owned: dict[str, int], after: float) -> dict[str, dict[str, Any]]:
    """session -> ``w``'s first ``lost`` report, after ``after``, of the lease it held."""
    out: dict[str, dict[str, Any]] = {}
    for e in w.of("lost", after):
        sid = str(e["session_id"])
        if owned.get(sid) == int(e["generation"]):
            out.setdefault(sid, e)
    return out


def unreported(w: Worker, owned: dict[str, int], after: float) -> str:
    """What is missing when ``w`` has not reported every session of ``owned`` lost."""
    missing = sorted(set(owned) - set(lost_reports(w, owned, after)))
    return (
        f"never reported: {missing} of {len(owned)}; its latest status "
        f"{w.status_before(time.time())} (a session it stopped without a 'lost' report is no "
        "longer in its count)"
    )


def counter_between(w: Worker, start: float, end: float) -> list[int]:
    """The ``transactions`` counter of ``w``'s status lines with ``start < at < end``."""
    return [int(e["transactions"]) for e in w.of("status", start) if e["at"] < end]


def assert_clean(report: Report, workers: Iterable[Worker]) -> None:
    if report.violations:
        shown = "\n".join(report.violations[:30])
        logs = "\n".join(w.describe() for w in workers)
        raise AssertionError(
            f"{len(report.violations)} invariant violations ({report.summary()}):\n{shown}\n{logs}"
        )


@pytest.fixture
def worker_role(shared: Shared) -> Iterator[tuple[str, str]]:
    """A login role of its own (name, password) for the worker a partition cuts off (dropped
    afterwards)."""
    role = create_role(shared.url, shared.schema)
    try:
        yield role
    finally:
        drop_role(shared.url, role[0])


# ------------------------------------------------------------------------------- SIGKILL


async def test_failover(shared: Shared, workers: list[Worker]) -> None:
    """Three workers share 100 sessions under a steady load; one is killed with SIGKILL while
    it has runs in flight. The other two take every one of its sessions over within the
    lease plus a scan period (plus slack); nothing acknowledged is lost or applied twice, no
    tool call runs twice, every waiter answers ``completed``, retries are deduplicated."""
    began = time.monotonic()
    workers.extend(spawn(shared, name) for name in ("w1", "w2", "w3"))
    await wait_for("the workers to start", lambda: all(w.of("started") for w in workers), 30)
    w1, victim, w3 = workers
    async with client(shared) as rt:
        load = Load(rt, await create_sessions(rt, "kill", 100), rate=15)
        async with load.running() as finish:
            await asyncio.sleep(4)
            await wait_for(
                "every worker to own sessions and the victim to be running a tool",
                lambda: (
                    all(len(w.of("acquired")) >= 5 for w in workers) and in_flight(shared, victim)
                ),
                20,
            )
            tools = tools_running(shared, victim)
            killed_at = time.time()
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait()
            assert victim.reader is not None
            victim.reader.join(5)  # every line it printed before it died
            assert victim.proc.returncode == -signal.SIGKILL
            owned = victim.owned_at(killed_at)
            spread = {
                w.name: len({e["session_id"] for e in w.of("acquired") if e["at"] <= killed_at})
                for w in workers
            }
            status = victim.status_before(killed_at)
            assert status is not None and killed_at - status["at"] < 0.6, status
            assert status["running"] >= 1, f"the victim had no run in flight: {status}"
            assert owned, "the victim owned no session when it was killed"
            # every session it owned gets work now, so every one of them needs a new owner
            await load.send_extra(owned)
            # a client retrying what it sent just before the kill is answered with the same ids
            recent = [
                a for a in load.acks if killed_at - 1.5 < load.ack_times[a.input_id] <= killed_at
            ]
            for a in recent:
                again = await load.resend(a)
                assert isinstance(again, Deduplicated), (a, again)
                assert str(again.existing_id) == a.input_id, (a, again)
            survivors = (w1, w3)
            await wait_for(
                "the surviving workers to take over every session of the killed one",
                lambda: set(takeovers(owned, survivors, killed_at)) == set(owned),
                TAKEOVER_BOUND + 15,
            )
            await asyncio.sleep(1.0)
            await finish()
    codes = stop_all(workers)
    taken = takeovers(owned, survivors, killed_at)
    delays = sorted(at - killed_at for _, _, at in taken.values())
    spurious = {w.name: len(w.of("lost")) for w in survivors}
    print(
        f"\n[failover] sessions acquired per worker before the kill: {spread}; the victim "
        f"({victim.name}) had {status['running']} runs in flight ({tools} tools executing) and "
        f"owned {len(owned)} sessions when killed; "
        f"taken over by {sorted({n for n, _, _ in taken.values()})}: first {delays[0]:.2f} s, "
        f"median {delays[len(delays) // 2]:.2f} s, last {delays[-1]:.2f} s after SIGKILL (bound "
        f"{TAKEOVER_BOUND:.2f} s = lease {TTL:g} + scan {SCAN:g} + slack {SLACK:g}); "
        f"{len(recent)} retries deduplicated; leases the survivors lost meanwhile: {spurious}"
    )
    assert all(n >= 5 for n in spread.values()), f"sessions did not spread: {spread}"
    assert delays[-1] <= TAKEOVER_BOUND, (
        f"the last session of the killed worker was taken over {delays[-1]:.2f} s after the "
        f"kill; bound {TAKEOVER_BOUND:.2f} s (lease {TTL:g} + scan {SCAN:g} + slack {SLACK:g}); "
        f"leases the healthy survivors dropped meanwhile (not renewed in time): {spurious}"
    )
    leases = read_leases(shared.url)
    stale_gen = {sid: (gen, leases[sid]) for sid, gen in owned.items() if leases[sid][1] <= gen}
    assert not stale_gen, f"sessions whose database generation did not move on: {stale_gen}"
    assert codes["w1"] == 0 and codes["w3"] == 0, (codes, [w.describe() for w in survivors])
    report = check_all(shared.url, load, shared.tool_log, {w.name for w in workers})
    assert_clean(report, workers)
    cut = interrupted_by(report.db, report.log, victim.pid)
    assert cut, (
        "no tool call of the killed worker ended 'interrupted, not re-run': it had no tool in "
        "flight, so the kill proved nothing about tool side effects"
    )
    print(
        f"[failover] {report.summary()}; {len(cut)} tool calls in flight at the kill were "
        f"answered 'interrupted, not re-run', none run again; {time.monotonic() - began:.1f} s"
    )


# ------------------------------------------------------------------------------- SIGSTOP


async def test_fenced_worker_cannot_write(shared: Shared, workers: list[Worker]) -> None:
    """A worker frozen with SIGSTOP (runs in flight) for 2.5 leases: the others take its
    sessions over under newer generations. Resumed, it reports them ``lost`` and nothing it
    tries to write reaches the database: its committed-transactions counter stays flat, the
    audit shows no write of its connections, and every invariant holds."""
    began = time.monotonic()
    workers.extend(spawn(shared, name) for name in ("w1", "w2", "w3"))
    await wait_for("the workers to start", lambda: all(w.of("started") for w in workers), 30)
    w1, victim, w3 = workers
    others = (w1, w3)
    async with client(shared) as rt:
        load = Load(rt, await create_sessions(rt, "stop", 30), rate=10)
        async with load.running() as finish:
            await asyncio.sleep(3)
            await wait_for(
                "every worker to own sessions and the victim to be running a tool",
                lambda: all(w.of("acquired") for w in workers) and in_flight(shared, victim),
                20,
            )
            tools = tools_running(shared, victim)
            stopped_at = time.time()
            victim.proc.send_signal(signal.SIGSTOP)
            await asyncio.sleep(0.3)  # what it printed before it froze reaches the reader
            owned = victim.owned_at(stopped_at)
            before = victim.status_before(stopped_at)
            assert before is not None and stopped_at - before["at"] < 0.6, before
            assert before["running"] >= 1, f"the victim had no run in flight: {before}"
            await load.send_extra(owned)  # each of its sessions needs an owner now
            await wait_for(
                "the other workers to take over every session of the frozen one",
                lambda: set(takeovers(owned, others, stopped_at)) == set(owned),
                TAKEOVER_BOUND + 15,
            )
            await asyncio.sleep(max(0.0, stopped_at + 2.5 * TTL - time.time()))
            taken = takeovers(owned, others, stopped_at)
            resumed_at = time.time()
            victim.proc.send_signal(signal.SIGCONT)
            await wait_for(
                "the resumed worker to report every session it held lost",
                lambda: set(lost_reports(victim, owned, resumed_at)) == set(owned),
                10,
            )
            await asyncio.sleep(1.5)  # whatever it still had in hand, it tries to write now
            await finish()
    ended_at = time.time()
    codes = stop_all(workers)
    lost = lost_reports(victim, owned, resumed_at)
    leases = read_leases(shared.url)
    audit = read_audit(shared.url)
    reacquired = victim.of("acquired", resumed_at)
    quiet_until = min([float(e["at"]) for e in reacquired] + [ended_at])
    # a COMMIT sent just before the freeze may be counted once it reads the reply, after the
    # resume: the counter is read from 0.5 s after the resume on, and the audit covers all of it
    counters = counter_between(victim, resumed_at + 0.5, quiet_until)
    frozen_writes = [
        a for a in audit if a.app == victim.name and stopped_at + 0.5 < a.at < quiet_until
    ]
    after_resume = [a for a in audit if a.app == victim.name and a.at > resumed_at]
    mine_again = {(str(e["session_id"]), int(e["generation"])) for e in reacquired}
    refusals = victim.stderr().count("fenced, S10")
    late_tools = [e for e in tool_starts(shared.tool_log, victim.pid) if e > resumed_at]
    print(
        f"\n[fenced] {victim.name} frozen {resumed_at - stopped_at:.2f} s with "
        f"{before['running']} runs in flight ({tools} tools executing) and {len(owned)} sessions;"
        " taken over "
        f"{max(at for _, _, at in taken.values()) - stopped_at:.2f} s after SIGSTOP at the "
        f"latest (bound {TAKEOVER_BOUND:.2f} s); "
        f"resumed, it reported them lost after "
        f"{max(float(e['at']) for e in lost.values()) - resumed_at:.2f} s "
        f"({sorted({str(e['detail']) for e in lost.values()})}); transactions counter "
        f"{before['transactions']} before the stop, {counters[:1]} .. {counters[-1:]} after; "
        f"{refusals} fence refusals in its log; sessions it acquired after resuming: "
        f"{len(reacquired)}; tool executions it started after resuming: {len(late_tools)}"
    )
    last_taken = max(at for _, _, at in taken.values()) - stopped_at
    assert last_taken <= TAKEOVER_BOUND, (
        f"the last session of the frozen worker was taken over {last_taken:.2f} s after SIGSTOP;"
        f" bound {TAKEOVER_BOUND:.2f} s (lease {TTL:g} + scan {SCAN:g} + slack {SLACK:g})"
    )
    for sid, gen in owned.items():
        _, new_gen, _ = taken[sid]
        assert new_gen > gen, (sid, gen, taken[sid])
        assert leases[sid][1] > gen, (
            f"session {sid}: database generation {leases[sid][1]} is not newer than the frozen "
            f"worker's {gen}"
        )
        assert float(lost[sid]["at"]) >= resumed_at
    assert len(counters) >= 3, f"the resumed worker printed no status lines: {counters}"
    assert len(set(counters)) == 1, (
        f"the resumed worker's committed-transactions counter grew before it acquired anything "
        f"new: {counters} (a fenced write went through?)"
    )
    assert not frozen_writes, (
        f"the database committed writes of the frozen worker after it froze: {frozen_writes[:10]}"
    )
    stale = [a for a in after_resume if (a.runtime_id, a.generation) not in mine_again]
    assert not stale, f"writes of the resumed worker under generations it lost: {stale[:10]}"
    assert not stale_writes(audit, victim), stale_writes(audit, victim)[:10]
    assert codes["w1"] == 0 and codes["w3"] == 0 and codes["w2"] == 0, codes
    report = check_all(shared.url, load, shared.tool_log, {w.name for w in workers})
    assert_clean(report, workers)
    cut = interrupted_by(report.db, report.log, victim.pid)
    assert cut, "no tool call of the frozen worker was interrupted: nothing was in flight"
    print(
        f"[fenced] {report.summary()}; {len(cut)} of its tool calls answered 'interrupted, "
        f"not re-run'; {time.monotonic() - began:.1f} s"
    )


# ----------------------------------------------------------------------------- partition


async def test_partition(
    shared: Shared, worker_role: tuple[str, str], workers: list[Worker]
) -> None:
    """A worker cut off from the database (logins refused, backends terminated every 50 ms
    for more than 1.5 leases) while it has runs in flight and a second worker is alive: it
    stops its sessions itself about 0.75 x ttl after the cut, before the other one takes them
    over; it writes nothing after it reported them lost; when the database is back it carries
    on by itself (takes sessions over, runs them) without a restart."""
    began = time.monotonic()
    role, password = worker_role
    cut_off = spawn(shared, "wa", with_user(shared.url, role, password))
    other = spawn(shared, "wb")
    workers.extend([cut_off, other])
    await wait_for("the workers to start", lambda: all(w.of("started") for w in workers), 30)
    async with client(shared) as rt:
        load = Load(rt, await create_sessions(rt, "part", 24), rate=10)
        async with load.running() as finish:
            await asyncio.sleep(3)
            await wait_for(
                "both workers to own sessions and the one to cut off to be running a tool",
                lambda: (
                    all(len(w.of("acquired")) >= 3 for w in workers) and in_flight(shared, cut_off)
                ),
                20,
            )
            tools = tools_running(shared, cut_off)
            partition = Partition(shared.url, cut_off.name, role)
            started = partition.start()
            owned = cut_off.owned_at(started)
            before = cut_off.status_before(started)
            assert before is not None and started - before["at"] < 0.6, before
            assert before["running"] >= 1, f"no run in flight at the cut: {before}"
            await load.send_extra(owned)  # each of its sessions needs an owner now
            await wait_for(
                "the cut-off worker to report every session it held lost",
                lambda: set(lost_reports(cut_off, owned, started)) == set(owned),
                LOSE_BOUND + 10,
                lambda: unreported(cut_off, owned, started),
            )
            await wait_for(
                "the other worker to take them over",
                lambda: set(takeovers(owned, [other], started)) == set(owned),
                TAKEOVER_BOUND + 15,
            )
            await asyncio.sleep(max(0.0, started + 1.6 * TTL - time.time()))
            healed = partition.heal()
            # back online: the other worker drains (its leases are released), a new session is
            # created; the cut-off worker, never restarted, must take the work over
            other.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(other.proc.wait, 20)
            fresh = (await create_sessions(rt, "after", 1))[0]
            await load.send_extra([fresh])
            await wait_for(
                "the recovered worker to take the new session",
                lambda: any(e["session_id"] == fresh for e in cut_off.of("acquired", healed)),
                TAKEOVER_BOUND + 15,
            )
            await asyncio.sleep(1.0)
            await finish()
    ended_at = time.time()
    alive_at_end = cut_off.proc.poll() is None
    codes = stop_all(workers)
    lost = lost_reports(cut_off, owned, started)
    taken = takeovers(owned, [other], started)
    lose_delays = sorted(float(e["at"]) - started for e in lost.values())
    audit = read_audit(shared.url)
    during = [a for a in audit if a.app == cut_off.name and started + 0.5 < a.at < healed]
    last_lost = max(float(e["at"]) for e in lost.values())
    reacquired = cut_off.of("acquired", last_lost)
    quiet_until = min([float(e["at"]) for e in reacquired] + [ended_at])
    counters = counter_between(cut_off, last_lost, quiet_until)
    stale = stale_writes(audit, cut_off)
    back = [a for a in audit if a.app == cut_off.name and a.at > healed]
    print(
        f"\n[partition] {cut_off.name} cut off for {healed - started:.2f} s "
        f"({partition.sweeps} sweeps, {partition.terminated} backends terminated) with "
        f"{before['running']} runs in flight ({tools} tools executing) and {len(owned)} "
        f"sessions; it reported them lost "
        f"{lose_delays[0]:.2f} .. {lose_delays[-1]:.2f} s after the cut (bound "
        f"{LOSE_BOUND:.2f} s = 0.75 x ttl + 0.75 s slack); {other.name} took them over "
        f"{min(at for _, _, at in taken.values()) - started:.2f} .. "
        f"{max(at for _, _, at in taken.values()) - started:.2f} s after the cut; transactions "
        f"counter {before['transactions']} before the cut, {counters[:1]} .. {counters[-1:]} "
        f"from its last lost report until it acquired again; after the heal it acquired "
        f"{len(reacquired)} sessions and committed {len(back)} writes"
    )
    assert partition.terminated >= 1, "the partition terminated none of the worker's backends"
    assert lose_delays[-1] <= LOSE_BOUND, (
        f"the cut-off worker stopped its last session {lose_delays[-1]:.2f} s after the cut; "
        f"bound {LOSE_BOUND:.2f} s (0.75 x ttl + slack)"
    )
    last_taken = max(at for _, _, at in taken.values()) - started
    assert last_taken <= TAKEOVER_BOUND, (
        f"the last session of the cut-off worker was taken over {last_taken:.2f} s after the cut;"
        f" bound {TAKEOVER_BOUND:.2f} s (lease {TTL:g} + scan {SCAN:g} + slack {SLACK:g})"
    )
    for sid, gen in owned.items():
        assert taken[sid][1] > gen, (sid, gen, taken[sid])
        assert float(lost[sid]["at"]) < taken[sid][2], (
            f"session {sid}: {other.name} took it over at {taken[sid][2]:.3f} before the cut-off "
            f"worker stopped it at {float(lost[sid]['at']):.3f}"
        )
    assert not during, f"writes of the cut-off worker during the partition: {during[:10]}"
    assert not stale, f"writes of the cut-off worker after it reported the lease lost: {stale[:10]}"
    assert counters and len(set(counters)) == 1, (
        f"the cut-off worker's committed-transactions counter moved between its last lost report "
        f"and its next acquisition: {counters}"
    )
    assert alive_at_end, cut_off.describe()
    assert reacquired, "the recovered worker never acquired a session again"
    assert any(a.lease_owner == cut_off.name for a in back), "it never wrote again after the heal"
    assert codes == {"wa": 0, "wb": 0}, (codes, [w.describe() for w in workers])
    report = check_all(shared.url, load, shared.tool_log, {w.name for w in workers})
    assert_clean(report, workers)
    cut = interrupted_by(report.db, report.log, cut_off.pid)
    assert cut, "no tool call of the cut-off worker was interrupted: nothing was in flight"
    print(
        f"[partition] {report.summary()}; {len(cut)} of its tool calls answered 'interrupted, "
        f"not re-run'; {time.monotonic() - began:.1f} s"
    )
