"""The ``meerkat`` command line, run as a subprocess (``python -m meerkat_runtime``) on a
temporary state directory: every command's human and ``--json`` output, and the exit codes
scripts rely on (0 ok, 1 run did not complete, 2 usage, 3 rejected, 4 not found, 5 timed
out, 130 Ctrl-C).

The tests of one module share one state directory (sessions are told apart by labels or
ids); independent commands run concurrently to keep the file fast.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from meerkat_runtime._cli_runtime import EventPrinter
from meerkat_runtime.runtime.events import RuntimeEventEnvelope

Result = subprocess.CompletedProcess[str]
Cli = Callable[..., Result]

SLOW = [{"type": "text", "text": "slow answer", "delay": 2.0}]
FAILING = [{"type": "fail", "permanent": True, "error": "scripted boom"}]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("meerkat-cli")


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEERKAT_")}
    env["MEERKAT_STATE_DIR"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def cli(home: Path) -> Cli:
    env = _env(home)

    def run(*args: str, timeout: float = 60.0, stdin: str | None = None) -> Result:
        return subprocess.run(
            [sys.executable, "-m", "meerkat_runtime", *args],
            env=env,
            cwd=home,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=stdin if stdin is not None else "",
        )

    ok(run("sessions", "list"))  # the database exists before commands run side by side
    return run


def parallel(cli: Cli, *commands: Sequence[str]) -> list[Result]:
    """Run independent commands at once (each is a process; startup dominates)."""
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        return list(pool.map(lambda c: cli(*c), commands))


def ok(r: Result, code: int = 0) -> Result:
    assert r.returncode == code, f"exit {r.returncode}, expected {code}: {r.stderr}{r.stdout}"
    return r


def js(r: Result) -> Any:
    return json.loads(r.stdout)


def one_error_line(r: Result) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (r.args, r.stderr)
    return lines[0]


def script(home: Path, name: str, steps: list[dict[str, Any]]) -> str:
    path = home / f"{name}.json"
    path.write_text(json.dumps(steps), encoding="utf-8")
    return str(path)


def new_session(cli: Cli, *args: str) -> str:
    sid = ok(cli("sessions", "create", *args)).stdout.strip()
    assert sid and "\n" not in sid
    return sid


# ------------------------------------------------------------------ basics


def test_version_help_and_usage_errors_exit_2_with_one_error_line(cli: Cli) -> None:
    version, version_json, help_, serve_help, rpc_help, bad_opt, bad_id, bad_label, no_args = (
        parallel(
            cli,
            ["version"],
            ["version", "--json"],
            ["--help"],
            ["serve", "--help"],
            ["rpc", "--help"],
            ["sessions", "list", "--bogus"],
            ["wait", "not-a-uuid"],
            ["sessions", "create", "--label", "novalue"],
            ["sessions"],
        )
    )
    assert ok(version).stdout.startswith("meerkat-runtime ")
    assert js(ok(version_json))["name"] == "meerkat-runtime"
    for cmd in ("run", "send", "wait", "sessions", "inputs", "runtime", "events", "serve", "rpc"):
        assert cmd in ok(help_).stdout
    assert "--port" in ok(serve_help).stdout and "--token" in serve_help.stdout
    assert "--store" in ok(rpc_help).stdout
    assert "--bogus" in one_error_line(ok(bad_opt, 2))
    assert "not a UUID" in one_error_line(ok(bad_id, 2))
    assert "KEY=VALUE" in one_error_line(ok(bad_label, 2))
    assert "list" in ok(no_args, 2).stdout  # a group without a command shows its help


def test_unknown_session_or_input_exits_4(cli: Cli) -> None:
    ghost = "01959d7e-3c4a-7b2e-9f00-1a2b3c4d5e6f"
    results = parallel(
        cli,
        ["sessions", "show", "nope"],
        ["sessions", "show", "nope", "--json"],
        ["send", "nope", "hello"],
        ["inputs", "list", "nope"],
        ["events", "nope"],
        ["runtime", "state", "nope"],
        ["wait", ghost],
        ["run", "hi", "--session", "nope"],
    )
    for r in results:
        line = one_error_line(ok(r, 4))
        assert "nope" in line or ghost in line, (r.args, line)
    assert js(results[1]) == {"error": "no session 'nope' in this store", "code": "not_found"}


def test_bad_store_url_is_a_usage_error(cli: Cli) -> None:
    r = ok(cli("sessions", "list", "--store", "ftp://nowhere"), 2)
    assert "--store" in one_error_line(r)


# ------------------------------------------------------------------ run, send, wait


def test_run_prints_the_reply_and_the_session_and_json_the_outcome(cli: Cli) -> None:
    human, as_json = parallel(cli, ["run", "hello there"], ["run", "again", "--json"])
    assert 'you said "hello there"' in ok(human).stdout
    assert "session " in human.stderr
    doc = js(ok(as_json))
    assert doc["outcome_type"] == "completed" and doc["session_id"]
    assert 'you said "again"' in doc["result"]["text"]


def test_sessions_create_list_show_history_archive(cli: Cli, home: Path) -> None:
    sid = js(ok(cli("sessions", "create", "--label", "suite=sessions", "--json")))["session_id"]
    other = new_session(cli, "--label", "suite=sessions", "--label", "extra=1")
    assert 'you said "hi"' in ok(cli("send", sid, "hi")).stdout
    listing, table, show, show_json, hist, hist_human = parallel(
        cli,
        ["sessions", "list", "--label", "suite=sessions", "--json"],
        ["sessions", "list", "--label", "suite=sessions"],
        ["sessions", "show", sid],
        ["sessions", "show", sid, "--json"],
        ["sessions", "history", sid, "--json", "--limit", "1"],
        ["sessions", "history", sid],
    )
    summaries = js(ok(listing))["sessions"]
    assert [s["session_id"] for s in summaries] == [sid, other]
    first = summaries[0]
    assert first["message_count"] == 2 and first["labels"] == {"suite": "sessions"}
    assert set(first) >= {"created_at", "updated_at", "total_tokens", "is_active"}
    assert sid in ok(table).stdout and other in table.stdout and "suite=sessions" in table.stdout
    assert sid in ok(show).stdout and "messages" in show.stdout
    info = js(ok(show_json))
    assert info["session_id"] == sid and info["model"] == "offline"
    assert info["archived"] is False and "usage" in info
    page = js(ok(hist))
    assert page["message_count"] == 2 and page["has_more"] is True
    assert [m["role"] for m in page["messages"]] == ["user"]
    assert "user" in ok(hist_human).stdout and "assistant" in hist_human.stdout
    offset = js(ok(cli("sessions", "list", "--label", "suite=sessions", "--offset", "1", "--json")))
    assert [s["session_id"] for s in offset["sessions"]] == [other]

    archived = js(ok(cli("sessions", "archive", sid, "--json")))
    assert archived["archived"] is True and archived["session_id"] == sid
    after, with_all, refused = parallel(
        cli,
        ["sessions", "list", "--label", "suite=sessions", "--json"],
        ["sessions", "list", "--label", "suite=sessions", "--all", "--json"],
        ["send", sid, "more"],
    )
    assert [s["session_id"] for s in js(ok(after))["sessions"]] == [other]
    assert sid in [s["session_id"] for s in js(ok(with_all))["sessions"]]
    assert "archived" in one_error_line(ok(refused, 2))


def test_send_waits_and_prints_the_reply_then_the_input_id(cli: Cli) -> None:
    sid = new_session(cli)
    human = ok(cli("send", sid, "how are you"))
    assert 'you said "how are you"' in human.stdout
    assert "input " in human.stderr
    doc = js(ok(cli("send", sid, "and now", "--json")))
    assert doc["outcome_type"] == "completed" and doc["session_id"] == sid
    assert doc["input_id"] in ok(cli("inputs", "list", sid, "--all")).stdout


def test_send_no_wait_then_wait_and_a_timed_out_wait_exits_5(cli: Cli, home: Path) -> None:
    sid = new_session(cli, "--script", script(home, "slow", SLOW))
    iid = ok(cli("send", sid, "take your time", "--no-wait")).stdout.strip()
    pending = js(ok(cli("inputs", "list", sid, "--json")))
    assert pending["input_ids"] == [iid]
    assert pending["inputs"][0]["current_state"] == "accepted"  # in the inbox, not run yet
    timed_out = ok(cli("wait", iid, "--timeout", "0.2", "--json"), 5)
    err = js(timed_out)
    assert err["code"] == "timeout" and err["input_id"] == iid and err["session_id"] == sid
    assert "lives on" in one_error_line(timed_out)
    done = ok(cli("wait", iid))  # found through the store, run here to the end
    assert done.stdout.strip() == "slow answer"
    again = js(ok(cli("wait", iid, "--session", sid, "--json")))
    assert again["outcome_type"] == "completed" and again["result"]["text"] == "slow answer"


def test_idempotency_key_dedups_and_conflicting_text_is_rejected_exit_3(cli: Cli) -> None:
    sid = new_session(cli)
    first = ok(cli("send", sid, "once", "--no-wait", "--idempotency-key", "k-1")).stdout.strip()
    dup, conflict = parallel(
        cli,
        ["send", sid, "once", "--no-wait", "--idempotency-key", "k-1"],
        ["send", sid, "twice", "--no-wait", "--idempotency-key", "k-1", "--json"],
    )
    assert ok(dup).stdout.strip() == first and "duplicate" in dup.stderr
    rejected = js(ok(conflict, 3))
    assert rejected["outcome_type"] == "rejected" and rejected["code"] == "idempotency_conflict"
    followed = js(ok(cli("send", sid, "once", "--idempotency-key", "k-1", "--json")))
    assert followed["input_id"] == first and followed["existing_id"] == first
    assert followed["outcome_type"] == "completed"


def test_a_failed_run_exits_1(cli: Cli, home: Path) -> None:
    sid = new_session(cli, "--script", script(home, "failing", FAILING))
    human, as_json = parallel(
        cli, ["send", sid, "x"], ["run", "y", "--script", str(home / "failing.json"), "--json"]
    )
    assert "abandoned" in ok(human, 1).stderr and "scripted boom" in human.stderr
    doc = js(ok(as_json, 1))
    assert doc["outcome_type"] == "abandoned" and doc["reason"] == "failed"


# ------------------------------------------------------------------ inputs


def test_inputs_show_and_cancel(cli: Cli, home: Path) -> None:
    sid = new_session(cli, "--script", script(home, "slow-cancel", SLOW))
    head = ok(cli("send", sid, "first", "--no-wait")).stdout.strip()
    queued = ok(cli("send", sid, "second", "--no-wait")).stdout.strip()
    cancelled = js(ok(cli("inputs", "cancel", sid, queued, "--json")))
    assert cancelled["input_id"] == queued and cancelled["current_state"] == "abandoned"
    assert cancelled["terminal_outcome"]["reason"] == "cancelled"
    # `wait` loads the session (it runs `head`); the others only read the store
    again, show, show_json, listing, waited = parallel(
        cli,
        ["inputs", "cancel", sid, queued],
        ["inputs", "show", sid, queued],
        ["inputs", "show", sid, queued, "--json"],
        ["inputs", "list", sid, "--all", "--json"],
        ["wait", queued, "--json"],
    )
    assert "already ended" in one_error_line(ok(again, 2))
    assert "abandoned" in ok(show).stdout and "history" in show.stdout
    assert js(ok(show_json))["terminal_outcome"]["outcome_type"] == "abandoned"
    assert set(js(ok(listing))["input_ids"]) == {head, queued}
    assert js(ok(waited, 1))["outcome_type"] == "cancelled"


# ------------------------------------------------------------------ events


def test_events_lists_and_resumes_after_a_seq(cli: Cli) -> None:
    sid = new_session(cli)
    ok(cli("send", sid, "hello events"))
    full, human = parallel(cli, ["events", sid, "--json"], ["events", sid])
    lines = [json.loads(ln) for ln in ok(full).stdout.splitlines()]
    seqs = [e["seq"] for e in lines]
    assert seqs == sorted(seqs) and len(seqs) > 5
    assert {e["runtime_id"] for e in lines} == {sid}
    middle = seqs[len(seqs) // 2]
    tail = [
        json.loads(ln)
        for ln in ok(cli("events", sid, "--after", str(middle), "--json")).stdout.splitlines()
    ]
    assert [e["seq"] for e in tail] == [s for s in seqs if s > middle]
    assert "input.accepted" in ok(human).stdout and "run.completed" in human.stdout


def test_events_follow_prints_new_events_until_ctrl_c(home: Path, cli: Cli) -> None:
    sid = new_session(cli)
    follower = subprocess.Popen(
        [sys.executable, "-m", "meerkat_runtime", "events", sid, "--follow", "--json"],
        env=_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ok(cli("send", sid, "while following"))
        assert follower.stdout is not None
        deadline = time.monotonic() + 30
        seen: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            line = follower.stdout.readline()
            if not line:
                break
            seen.append(json.loads(line))
            if any(e["event"].get("data", {}).get("code") == "consumed" for e in seen):
                break
        assert any(e["event"].get("data", {}).get("code") == "consumed" for e in seen), seen
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=30) == 130
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()


def test_event_printer_joins_text_deltas_on_one_line() -> None:
    now = datetime.now(UTC)

    def env(seq: int, category: str, data: dict[str, Any]) -> RuntimeEventEnvelope:
        return RuntimeEventEnvelope.make(seq, now, "s1", category, data)

    buf = io.StringIO()
    printer = EventPrinter(as_json=False, write=buf.write)
    printer.emit(env(1, "run_lifecycle", {"code": "started", "run_id": "r1"}))
    for i, piece in enumerate(["Hello", " wor", "ld\n!"], start=2):
        printer.emit(env(i, "agent", {"type": "text_delta", "delta": piece}))
    printer.emit(env(5, "run_lifecycle", {"code": "completed", "run_id": "r1"}))
    printer.end_line()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3
    assert "run.started" in lines[0] and "run_id=r1" in lines[0]
    assert "agent.text_delta" in lines[1] and lines[1].endswith("Hello world\\n!")
    assert lines[2].split()[0] == "5" and "run.completed" in lines[2]


# ------------------------------------------------------------------ runtime


def test_runtime_state_retire_respawn_reset_recover_cancel_destroy(cli: Cli) -> None:
    sid = new_session(cli)
    ok(cli("send", sid, "remember me"))
    state, state_json = parallel(
        cli, ["runtime", "state", sid], ["runtime", "state", sid, "--json"]
    )
    assert ok(state).stdout.strip() == "idle"
    assert js(ok(state_json)) | {"generation": 0} == {
        "session_id": sid,
        "state": "idle",
        "owner": None,
        "generation": 0,
        "pending_inputs": 0,
    }
    retired = js(ok(cli("runtime", "retire", sid, "--json")))
    assert retired == {"session_id": sid, "inputs_abandoned": 0, "inputs_pending_drain": 0}
    refused = ok(cli("send", sid, "after retire"), 3)
    assert "not_ready" in one_error_line(refused)
    assert "respawned" in ok(cli("runtime", "respawn", sid)).stdout
    unconfirmed = ok(cli("runtime", "reset", sid), 2)  # stdin is not a terminal
    assert "--yes" in one_error_line(unconfirmed)
    assert js(ok(cli("runtime", "reset", sid, "--yes", "--json")))["inputs_abandoned"] == 0
    # (commands that act on the runtime load the session, so they run one at a time)
    history, recovered = parallel(
        cli, ["sessions", "history", sid, "--json"], ["runtime", "recover", sid, "--json"]
    )
    assert js(ok(history))["message_count"] == 0  # the reset cleared the conversation
    report = js(ok(recovered))
    assert report["session_id"] == sid and set(report["recovery"]) >= {"inputs_recovered"}
    cancelled = js(ok(cli("runtime", "cancel", sid, "--json")))
    assert cancelled == {"session_id": sid, "cancelled": False}
    ok(cli("runtime", "destroy", sid, "--yes"))
    assert ok(cli("runtime", "state", sid)).stdout.strip() == "destroyed"


# ------------------------------------------------------------------ serve (rpc: --help above)


def test_serve_on_a_public_address_without_a_token_exits_2(cli: Cli) -> None:
    r = ok(cli("serve", "--host", "0.0.0.0", "--port", "0"), 2)
    assert "token" in one_error_line(r)
