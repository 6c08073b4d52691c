"""The ``meerkat`` command line.

Exit codes scripts can rely on: 0 success; 1 the run did not complete (failed, abandoned,
cancelled, terminated); 2 usage error; 3 the input was rejected; 4 not found.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from . import __version__
from .errors import MeerkatRuntimeError
from .host import Runtime
from .runtime.outcomes import CompletedWait, CompletedWithoutResultWait, Rejected

app = typer.Typer(
    name="meerkat",
    help=(
        "Run durable LLM agent sessions. Every prompt is an input that the runtime accepts, "
        "queues and applies to the agent at a run boundary."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_err = Console(stderr=True)
_out = Console()

EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE, EXIT_REJECTED, EXIT_NOT_FOUND = 0, 1, 2, 3, 4


def _fail(message: str, code: int) -> typer.Exit:
    _err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def _load_script(path: Path | None) -> list[dict[str, Any]] | None:
    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise _fail(f"cannot read script {path}: {exc.strerror}", EXIT_USAGE) from None
    except json.JSONDecodeError as exc:
        raise _fail(f"script {path} is not valid JSON: {exc}", EXIT_USAGE) from None
    if not isinstance(data, list):
        raise _fail(f"script {path} must be a JSON array of steps", EXIT_USAGE)
    return data


@app.command()
def run(
    prompt: Annotated[str, typer.Argument(help="What to ask the agent.")],
    session: Annotated[
        str | None, typer.Option("--session", help="Continue this session instead of a new one.")
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            help="Model to use: 'offline' (no network), an OpenAI model (gpt-..., needs "
            "OPENAI_API_KEY; any model with OPENAI_BASE_URL) or an Anthropic one (claude-..., "
            "needs ANTHROPIC_API_KEY)."
        ),
    ] = "offline",
    provider: Annotated[
        str | None,
        typer.Option(help="Provider (offline, openai, anthropic); default: from the model name."),
    ] = None,
    system: Annotated[str | None, typer.Option(help="System prompt for a new session.")] = None,
    script: Annotated[
        Path | None,
        typer.Option(help="JSON file with an offline-model script (a list of steps)."),
    ] = None,
    store: Annotated[
        str | None,
        typer.Option(
            help="Store URL (sqlite:///path.db or memory://); default: SQLite under "
            "$MEERKAT_STATE_DIR or ~/.local/share/meerkat."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcome as JSON.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the reply.")] = 300.0,
) -> None:
    """Create a session (or continue one), send PROMPT through the runtime, print the reply."""
    offline_script = _load_script(script)
    try:
        code = asyncio.run(
            _run(prompt, session, model, provider, system, offline_script, store, as_json, timeout)
        )
    except MeerkatRuntimeError as exc:
        raise _fail(str(exc), EXIT_NOT_FOUND if "not_found" in exc.code else EXIT_USAGE) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", 130) from None
    raise typer.Exit(code)


async def _run(
    prompt: str,
    session_id: str | None,
    model: str,
    provider: str | None,
    system: str | None,
    offline_script: list[dict[str, Any]] | None,
    store: str | None,
    as_json: bool,
    timeout: float,
) -> int:
    async with Runtime.open(store) as rt:
        if session_id is not None:
            try:
                await rt.get_session(session_id)
            except MeerkatRuntimeError as exc:
                _err.print(f"[bold red]error:[/] {exc}", highlight=False)
                return EXIT_NOT_FOUND
        else:
            info = await rt.create_session(
                model=model, provider=provider, system_prompt=system, offline_script=offline_script
            )
            session_id = info.id
        after = await rt.last_event_seq(session_id)
        handle = await rt.turn(session_id, prompt)
        if isinstance(handle.outcome, Rejected):
            if as_json:
                _out.print_json(data=handle.outcome.to_json_dict())
            else:
                _err.print(
                    f"[bold red]rejected[/] ({handle.outcome.code.value}): {handle.outcome.reason}",
                    highlight=False,
                )
            return EXIT_REJECTED
        streamed: list[str] = []
        follower = None
        if not as_json:
            follower = asyncio.create_task(_stream_reply(rt, session_id, after, streamed))
        try:
            show_spinner = not as_json and sys.stderr.isatty()
            if show_spinner:
                with _err.status("[dim]thinking…[/]"):
                    outcome = await handle.wait(timeout)
            else:
                outcome = await handle.wait(timeout)
        finally:
            if follower is not None:
                follower.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await follower
        if as_json:
            doc = outcome.to_json_dict()
            doc["session_id"] = session_id
            _out.print_json(data=doc)
        elif isinstance(outcome, CompletedWait):
            if streamed and "".join(streamed).endswith(outcome.result.text):
                sys.stdout.write("\n")
                sys.stdout.flush()
            else:
                _out.print(outcome.result.text, highlight=False, markup=False)
        elif isinstance(outcome, CompletedWithoutResultWait):
            _err.print("[dim](completed without a reply)[/]")
        else:
            _err.print(
                f"[bold red]{outcome.outcome_type}[/]: {_describe(outcome.to_json_dict())}",
                highlight=False,
            )
        if not as_json:
            _err.print(f"[dim]session {session_id}[/]", highlight=False)
        ok = isinstance(outcome, (CompletedWait, CompletedWithoutResultWait))
        return EXIT_OK if ok else EXIT_RUN_FAILED


async def _stream_reply(rt: Runtime, session_id: str, after: int, streamed: list[str]) -> None:
    """Print the reply's text as the model streams it, and tool calls as they start.

    Only pieces of the final answer's turn stay on stdout; text of a turn that ended in tool
    calls is kept as it streamed (the model's words before calling)."""
    async for env in rt.events(session_id, after, follow=True):
        if env.event.get("category") != "agent":
            continue
        data = env.event.get("data") or {}
        kind = data.get("type")
        if kind == "text_delta":
            piece = str(data.get("delta", ""))
            streamed.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        elif kind == "tool_execution_started":
            if streamed:
                sys.stdout.write("\n")
                streamed.clear()
            _err.print(f"[dim]→ {data.get('name')}[/]", highlight=False)
        elif kind == "retrying":
            _err.print(
                f"[dim]retrying ({data.get('error_kind')}): attempt {data.get('attempt')}[/]",
                highlight=False,
            )


def _describe(doc: dict[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in doc.items() if k not in ("outcome_type", "input_id")]
    return ", ".join(parts) or "no details"


@app.command()
def version() -> None:
    """Print the version."""
    _out.print(f"meerkat-runtime {__version__}")


@app.command()
def crashtest(
    kills: Annotated[
        int, typer.Option(min=1, help="Trials to run; each kills a child process with SIGKILL.")
    ] = 50,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the trial plans (default: random, printed).")
    ] = None,
    workdir: Annotated[
        Path | None,
        typer.Option(
            help="Directory for the trials' databases and logs (default: a new temporary "
            "directory). Failing trials are kept there. A RAM disk (/dev/shm/...) is faster "
            "and finds the same: a SIGKILL never loses the page cache."
        ),
    ] = None,
    point: Annotated[
        list[str] | None,
        typer.Option(
            "--point",
            help="Kill point to test, repeatable (default: all): accept.committed, "
            "boundary.before, boundary.after, checkpoint.before, checkpoint.after, "
            "completion.before, completion.after, recovery.after, random.",
        ),
    ] = None,
    jobs: Annotated[
        int | None, typer.Option(min=1, help="Trials run at once (default: CPUs, at most 4).")
    ] = None,
    spawn: Annotated[
        bool,
        typer.Option(
            "--spawn",
            help="Start each child as a fresh interpreter instead of forking it from a "
            "preloaded zygote (slower, same checks).",
        ),
    ] = False,
    keep: Annotated[bool, typer.Option("--keep", help="Keep passing trials' files too.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Crash-test the runtime with real processes: kill a child with SIGKILL at each crash
    point (and at random instants), restart it, and check in the database that no
    acknowledged durable input was lost, nothing was applied twice, every waiter resolved and
    no terminal state changed. Exit code 0 when no trial found a violation, 1 otherwise."""
    import secrets

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.table import Table

    from .crashtest import KILL_POINTS, TrialResult, run_crashtest

    unknown = [p for p in point or [] if p not in KILL_POINTS]
    if unknown:
        raise _fail(
            f"unknown kill point(s) {', '.join(unknown)}; choose from {', '.join(KILL_POINTS)}",
            EXIT_USAGE,
        )
    if seed is None:
        seed = secrets.randbelow(2**31)
    progress = Progress(
        TextColumn("[bold]crashtest[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=_err,
    )
    task = progress.add_task("trials", total=kills, status="")
    failing = 0

    def on_trial(done: int, total: int, trial: TrialResult) -> None:
        nonlocal failing
        failing += bool(trial.violations)
        status = f"[red]{failing} failing[/]" if failing else f"{trial.point}"
        progress.update(task, completed=done, status=status)

    try:
        with progress:
            report = run_crashtest(
                kills,
                seed,
                workdir,
                point,
                on_trial,
                jobs=jobs,
                launcher="spawn" if spawn else "fork",
                keep=keep,
            )
    except KeyboardInterrupt:
        raise _fail("interrupted", 130) from None
    if as_json:
        _out.print_json(data=report.to_json_dict())
        raise typer.Exit(EXIT_OK if report.ok else EXIT_RUN_FAILED)
    table = Table(
        title="meerkat crashtest",
        caption=f"seed {report.seed} · {report.sigkills} SIGKILLs in all · "
        f"{report.elapsed:.0f} s · {'zygote' if report.launcher == 'fork' else 'spawn'}",
    )
    table.add_column("kill point")
    for name in ("runs", "killed", "violations"):
        table.add_column(name, justify="right")
    for stats in report.points.values():
        bad = f"[red]{stats.violations}[/]" if stats.violations else "0"
        table.add_row(stats.point, str(stats.runs), str(stats.killed), bad)
    total_bad = sum(p.violations for p in report.points.values())
    table.add_row(
        "[bold]total[/]",
        str(report.trials),
        str(report.killed),
        f"[red]{total_bad}[/]" if total_bad else "0",
        end_section=True,
    )
    _out.print(table)
    for v in report.violations[:20]:
        _out.print(
            f"[red]trial {v.trial}[/] ({v.crash_at}; files in {v.directory}): {v.message}",
            highlight=False,
            markup=False,
        )
    if len(report.violations) > 20:
        _out.print(f"... and {len(report.violations) - 20} more violations")
    if report.ok:
        _out.print("[green]no violations[/]")
    raise typer.Exit(EXIT_OK if report.ok else EXIT_RUN_FAILED)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
