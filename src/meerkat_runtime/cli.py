"""The ``meerkat`` command line.

Commands::

    meerkat run PROMPT [--session S] [--model M] [--provider P] [--system TEXT] [--script FILE]
                       [--timeout SECONDS]
    meerkat send SESSION TEXT [--no-wait] [--idempotency-key KEY] [--timeout SECONDS]
    meerkat send SESSION TEXT --to PEER [--request INTENT] [--envelope-id UUID]
    meerkat send SESSION TEXT --reply-to REQUEST_ID [--status STATUS] [--to PEER]
    meerkat peers SESSION
    meerkat wait INPUT_ID [--session S] [--timeout SECONDS]
    meerkat sessions create [--model M] [--provider P] [--system TEXT] [--label K=V ...]
                            [--script FILE] [--comms-name NAME]
    meerkat sessions list [--label K=V ...] [--limit N] [--offset N] [--all]
    meerkat sessions show SESSION
    meerkat sessions history SESSION [--offset N] [--limit N]
    meerkat sessions archive SESSION
    meerkat inputs list SESSION [--all]
    meerkat inputs show SESSION INPUT_ID
    meerkat inputs cancel SESSION INPUT_ID
    meerkat runtime state SESSION
    meerkat runtime retire SESSION [--replacement-planned]
    meerkat runtime respawn SESSION
    meerkat runtime reset SESSION [--yes]
    meerkat runtime destroy SESSION [--yes]
    meerkat runtime recover SESSION
    meerkat runtime cancel SESSION
    meerkat events SESSION [--follow] [--after SEQ]
    meerkat db status [--store URL]
    meerkat db migrate [--store URL]
    meerkat serve [--host H] [--port N] [--token T] [--no-own-sessions]
    meerkat rpc [--no-own-sessions]
    meerkat worker [--max-sessions N] [--lease-ttl S] [--grace S] [--tools MODULE:ATTR] ...
    meerkat crashtest [--kills N] [--seed N] [--point P ...] [--jobs N] [--workdir DIR] ...
    meerkat version

Every command but ``crashtest`` takes ``--store URL`` (default: SQLite under
``$MEERKAT_STATE_DIR`` or ``~/.local/share/meerkat``; ``postgresql://user@host/db`` for a
store shared by many machines, docs/deployment.md); every command but ``serve`` and
``rpc`` takes ``--json`` (the shapes the REST and RPC servers answer). Results go to stdout;
progress, notes and errors to stderr, an error as one line ``error: ...``.

Exit codes scripts can rely on:

==== ==========================================================================================
0    success
1    the run did not complete (failed, abandoned, cancelled, superseded, terminated), the
     schema has migrations pending (``db status``), or the command failed otherwise (store
     error, a schema newer than this build, a question answered no)
2    usage error or bad input (unknown option, malformed id or label, an operation the
     session's state or owner does not allow)
3    the input was rejected (invalid, too large, queue full, idempotency key conflict, ...)
4    not found (session or input)
5    timed out waiting; the input lives on (``meerkat wait INPUT_ID`` waits again)
130  interrupted (Ctrl-C)
==== ==========================================================================================
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from . import __version__
from ._cli_common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUN_FAILED,
    EXIT_USAGE,
    JsonOpt,
    OwnSessionsOpt,
    StoreOpt,
    check_own_sessions,
    err,
    execute,
    fail,
    open_runtime,
    out,
    print_json,
    write_line,
)
from ._cli_comms import peers
from ._cli_db import db_app
from ._cli_inputs import inputs_app, send, turn_and_wait, wait
from ._cli_runtime import events, runtime_app
from ._cli_sessions import load_script, sessions_app
from ._cli_worker import worker
from .store.base import StoreError

__all__ = ["app", "main"]

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


@app.command()
def run(
    prompt: Annotated[str, typer.Argument(metavar="PROMPT", help="What to ask the agent.")],
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
    store: StoreOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcome as JSON.")] = False,
    timeout: Annotated[
        float, typer.Option(min=0.0, help="Seconds to wait for the reply (then exit 5).")
    ] = 300.0,
) -> None:
    """Ask the agent PROMPT in a new session (or --session) and print the reply.

    The reply streams to stdout; the session id is printed on stderr."""
    execute(
        _run(prompt, session, model, provider, system, script, store, as_json, timeout),
        as_json=as_json,
    )


async def _run(
    prompt: str,
    session_id: str | None,
    model: str,
    provider: str | None,
    system: str | None,
    script: Path | None,
    store: str | None,
    as_json: bool,
    timeout: float,
) -> int:
    offline_script = load_script(script)
    async with open_runtime(store) as rt:
        if session_id is not None:
            await rt.get_session(session_id)
        else:
            info = await rt.create_session(
                model=model, provider=provider, system_prompt=system, offline_script=offline_script
            )
            session_id = info.id
        code, _ = await turn_and_wait(
            rt, session_id, prompt, idempotency_key=None, timeout=timeout, as_json=as_json
        )
    if not as_json:
        err.print(f"[dim]session {session_id}[/]", highlight=False)
    return code


# listed in this order by `meerkat --help` (then the groups: sessions, inputs, runtime, db)
app.command()(send)
app.command()(peers)
app.command()(wait)
app.command()(events)
app.add_typer(sessions_app)
app.add_typer(inputs_app)
app.add_typer(runtime_app)
app.add_typer(db_app)
app.command()(worker)


@app.command()
def serve(
    host: Annotated[
        str,
        typer.Option(help="Address to listen on; anything but loopback needs a token."),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8080,
    token: Annotated[
        str | None,
        typer.Option(
            help="Bearer token clients must send (Authorization: Bearer TOKEN); default: "
            "$MEERKAT_API_TOKEN.",
            show_default=False,
        ),
    ] = None,
    webhook_secret: Annotated[
        str | None,
        typer.Option(
            help="Secret that signs webhook deliveries (HMAC-SHA256, docs/webhooks.md); "
            "default: $MEERKAT_WEBHOOK_SECRET; without one webhooks are refused.",
            show_default=False,
        ),
    ] = None,
    store: StoreOpt = None,
    own_sessions: OwnSessionsOpt = True,
) -> None:
    """Serve the REST API over HTTP until Ctrl-C.

    Sessions, turns, inputs, runtime control and SSE events, on the same store as the
    other commands. With --no-own-sessions the server runs no session: workers sharing the
    store do."""
    from .surfaces.rest import ServeConfigError
    from .surfaces.rest import serve as rest_serve

    check_own_sessions(store, own_sessions)
    try:
        rest_serve(
            host=host,
            port=port,
            store=store,
            token=token,
            webhook_secret=webhook_secret,
            owns_sessions=own_sessions,
        )
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except ServeConfigError as exc:  # e.g. a public address without a token
        hint = " (or pass --token)" if token is None and "token" in str(exc) else ""
        raise fail(f"{exc}{hint}", EXIT_USAGE) from None
    except RuntimeError as exc:  # the server did not start (address in use, ...)
        raise fail(str(exc), EXIT_RUN_FAILED) from None


@app.command()
def rpc(store: StoreOpt = None, own_sessions: OwnSessionsOpt = True) -> None:
    """Serve JSON-RPC 2.0 on stdin/stdout, as rkat-rpc does.

    Newline-delimited requests and answers, until stdin closes. With --no-own-sessions the
    server runs no session: workers sharing the store do."""
    from .surfaces.rpc import serve_stdio

    check_own_sessions(store, own_sessions)
    try:
        asyncio.run(serve_stdio(store=store, owns_sessions=own_sessions))
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except (ValueError, StoreError) as exc:
        # a bad MEERKAT_OFFLINE_SCRIPT, line limit, config file or store: nothing was served
        raise fail(str(exc), EXIT_USAGE) from None


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
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep passing trials' files (and schemas) too.")
    ] = False,
    pg_url: Annotated[
        str | None,
        typer.Option(
            "--pg-url",
            metavar="URL",
            help="Run the trials on PostgreSQL instead of SQLite (postgresql://user@host/db): "
            "each trial in a fresh schema of that database, dropped when it passed; a failing "
            "trial's schema is kept and named.",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Crash-test the runtime: SIGKILL real processes at each crash point.

    Kills a child with SIGKILL at each crash point (and at random instants), restarts it,
    and checks in the database that no acknowledged durable input was lost, nothing was
    applied twice, every waiter resolved and no terminal state changed. SQLite by default;
    --pg-url runs the same trials on PostgreSQL. Exit code 0 when no trial found a
    violation, 1 otherwise."""
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
        raise fail(
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
        console=err,
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
                pg_url=pg_url,
            )
    except KeyboardInterrupt:
        raise fail("interrupted", EXIT_INTERRUPTED) from None
    except StoreError as exc:  # --pg-url: the database does not answer; no trial ran
        raise fail(str(exc), EXIT_RUN_FAILED) from None
    if as_json:
        print_json(report.to_json_dict())
        raise typer.Exit(EXIT_OK if report.ok else EXIT_RUN_FAILED)
    table = Table(
        title="meerkat crashtest",
        caption=f"seed {report.seed} · {report.sigkills} SIGKILLs in all · "
        f"{report.elapsed:.0f} s · {'zygote' if report.launcher == 'fork' else 'spawn'} · "
        f"{report.store}",
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
    out.print(table)
    for v in report.violations[:20]:
        schema = f"; schema {v.schema} kept" if v.schema else ""
        out.print(
            f"trial {v.trial} ({v.crash_at}; files in {v.directory}{schema}): {v.message}",
            highlight=False,
            markup=False,
        )
    if len(report.violations) > 20:
        out.print(f"... and {len(report.violations) - 20} more violations")
    if report.schemas_kept:
        out.print(
            f"schemas kept in {report.store}: {', '.join(report.schemas_kept)}",
            highlight=False,
            markup=False,
        )
    if report.ok:
        out.print("[green]no violations[/]")
    raise typer.Exit(EXIT_OK if report.ok else EXIT_RUN_FAILED)


@app.command()
def version(as_json: JsonOpt = False) -> None:
    """Print the version."""
    if as_json:
        print_json({"name": "meerkat-runtime", "version": __version__})
    else:
        write_line(f"meerkat-runtime {__version__}")


def _reflow(doc: str) -> str:
    """A docstring as help text: paragraphs kept, the lines within each joined (Rich help
    would otherwise keep the source's line breaks)."""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


def _reflow_help(group: typer.Typer) -> None:
    for cmd in group.registered_commands:
        if cmd.help is None and cmd.callback is not None and cmd.callback.__doc__:
            cmd.help = _reflow(cmd.callback.__doc__)
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            _reflow_help(sub.typer_instance)


_reflow_help(app)


def _exception_class(name: str) -> type[Exception]:
    """Click's exception class ``name`` as Typer uses it (its own copy of Click in newer
    Typer versions, Click itself in older ones), found from ``typer.BadParameter``."""
    for cls in typer.BadParameter.__mro__:
        if cls.__name__ == name and issubclass(cls, Exception):
            return cls
    raise LookupError(name)  # pragma: no cover


_UsageError = _exception_class("UsageError")
_ClickException = _exception_class("ClickException")


def main(argv: list[str] | None = None) -> None:
    """The ``meerkat`` entry point: usage errors become one ``error:`` line and exit 2."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="meerkat", standalone_mode=False)
    except _UsageError as exc:
        ctx: Any = getattr(exc, "ctx", None)
        message = getattr(exc, "format_message", exc.__str__)()
        if type(exc).__name__ == "NoArgsIsHelpError":
            if message:  # the help page (Rich help printed itself already)
                sys.stdout.write(message + "\n")
        else:
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            fail(f"{message}{hint}", EXIT_USAGE)
        code = EXIT_USAGE
    except _ClickException as exc:
        code = int(getattr(exc, "exit_code", EXIT_RUN_FAILED))
        fail(getattr(exc, "format_message", exc.__str__)(), code)
    except typer.Abort:
        fail("aborted", EXIT_INTERRUPTED)
        code = EXIT_INTERRUPTED
    sys.exit(code if isinstance(code, int) else EXIT_OK)


if __name__ == "__main__":  # pragma: no cover
    main()
