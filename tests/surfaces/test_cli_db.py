"""``meerkat db status`` / ``meerkat db migrate``, run as subprocesses: on a fresh PostgreSQL
schema (status before and after, the pending exit code, an older schema upgraded, a newer one
and another application's tables refused, nothing written by ``status``), on SQLite files
(which also migrate themselves at open), ``--json`` output, and the usage errors: a URL that
is not understood, ``memory://``, an unreachable server, and a password that is never
printed.

PostgreSQL tests skip, with the reason, when ``MEERKAT_TEST_PG_URL`` is unreachable.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from meerkat_runtime._ids import InputId
from meerkat_runtime.store import scrub
from meerkat_runtime.store.base import IdempotencyRecord, InboxEntry
from meerkat_runtime.store.postgres import PostgresStore, load_pg_migrations
from meerkat_runtime.store.sqlite import load_migrations
from tests.postgres import support as pg

Result = subprocess.CompletedProcess[str]
Cli = Callable[..., Result]

PG_KNOWN = load_pg_migrations()
PG_LATEST = len(PG_KNOWN)
SQLITE_KNOWN = load_migrations()
SQLITE_LATEST = len(SQLITE_KNOWN)
SECRET = "hunter2-Zq9"


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEERKAT_")}
    env["MEERKAT_STATE_DIR"] = str(tmp_path / "state")

    def run(*args: str) -> Result:
        return subprocess.run(
            [sys.executable, "-m", "meerkat_runtime", "db", *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )

    return run


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The URL of a fresh, empty PostgreSQL schema (dropped afterwards)."""
    reason = pg.unavailable()
    if reason is not None:
        pytest.skip(reason)
    url, name = pg.fresh_schema()
    try:
        yield url
    finally:
        pg.drop_schema(name)


def ok(r: Result, code: int = 0) -> Result:
    assert r.returncode == code, f"exit {r.returncode}, expected {code}: {r.stderr}{r.stdout}"
    return r


def js(r: Result) -> Any:
    return json.loads(r.stdout)


def one_error_line(r: Result) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (r.args, r.stderr)
    return lines[0]


def pg_versions(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = current_schema() AND table_name = 'schema_version'"
        ).fetchall()
        if not rows:
            return []
        return [int(r[0]) for r in conn.execute("SELECT version FROM schema_version ORDER BY 1")]


def pending_of(versions: list[int], known: list[Any]) -> list[dict[str, Any]]:
    return [{"version": m.version, "name": m.name} for m in known if m.version in versions]


# ------------------------------------------------------------------ PostgreSQL


def test_pg_status_then_migrate_a_fresh_schema(cli: Cli, pg_url: str) -> None:
    before = ok(cli("status", "--store", pg_url), 1)  # pending: exit 1
    assert "version  0" in before.stdout and f"latest   {PG_LATEST}" in before.stdout
    assert "1 initial" in before.stdout and "meerkat db migrate" in before.stderr
    assert pg_versions(pg_url) == []  # status wrote nothing

    as_json = js(ok(cli("status", "--store", pg_url, "--json"), 1))
    assert as_json == {
        "store": pg_url,
        "backend": "postgresql",
        "version": 0,
        "latest": PG_LATEST,
        "up_to_date": False,
        "pending": pending_of(list(range(1, PG_LATEST + 1)), PG_KNOWN),
    }

    every = ", ".join(str(m.version) for m in PG_KNOWN)
    migrated = ok(cli("migrate", "--store", pg_url))
    assert migrated.stdout.strip() == (
        f"applied migrations {every}; schema is at version {PG_LATEST}"
    )
    assert pg_versions(pg_url) == list(range(1, PG_LATEST + 1))

    after = ok(cli("status", "--store", pg_url))
    assert f"version  {PG_LATEST}\n" in after.stdout and "pending  none" in after.stdout
    assert js(ok(cli("status", "--store", pg_url, "--json")))["up_to_date"] is True

    again = ok(cli("migrate", "--store", pg_url))
    assert again.stdout.strip() == f"schema is up to date (version {PG_LATEST})"
    assert js(ok(cli("migrate", "--store", pg_url, "--json"))) == {
        "store": pg_url,
        "backend": "postgresql",
        "applied": [],
        "version": PG_LATEST,
    }


@pytest.mark.parametrize("older", range(1, PG_LATEST))
def test_pg_an_older_schema_is_pending_until_migrated(cli: Cli, pg_url: str, older: int) -> None:
    """Every older version (v1, ..., the previous release's) is upgraded by ``db migrate``,
    keeping its rows; the store then works on it (an inbox push: ``meerkat_inbox_push``)."""
    asyncio.run(PostgresStore(pg_url, migrations=PG_KNOWN[:older]).migrate())
    with psycopg.connect(pg_url, autocommit=True) as conn:  # an entry pushed before
        conn.execute(
            "INSERT INTO inbox (runtime_id, input_json, created_at) VALUES ('rt-old', '{}', now())"
        )
    status = js(ok(cli("status", "--store", pg_url, "--json"), 1))
    assert status["version"] == older and status["up_to_date"] is False
    assert status["pending"] == pending_of(list(range(older + 1, PG_LATEST + 1)), PG_KNOWN)
    assert pg_versions(pg_url) == list(range(1, older + 1))

    report = js(ok(cli("migrate", "--store", pg_url, "--json")))
    assert report["applied"] == status["pending"] and report["version"] == PG_LATEST
    assert pg_versions(pg_url) == list(range(1, PG_LATEST + 1))
    ok(cli("status", "--store", pg_url))

    async def push() -> None:
        store = PostgresStore(pg_url)
        await store.open()
        try:
            iid = InputId.new()
            key = IdempotencyRecord("k", iid, "h", datetime.now(UTC))
            entry = InboxEntry("rt-old", '{"x": 1}')
            assert await store.inbox_push(entry, key, 10) == ("accepted", None)
            again = InboxEntry("rt-old", '{"x": 1}')
            assert await store.inbox_push(again, key, 10) == ("deduplicated", iid)
            entries = await store.inbox_entries("rt-old")
            assert [e.input_json for e in entries] == ["{}", '{"x": 1}']
            assert entries[1].seq == entry.seq > entries[0].seq
        finally:
            await store.close()

    asyncio.run(push())


def test_pg_a_newer_schema_is_refused_and_left_alone(cli: Cli, pg_url: str) -> None:
    ok(cli("migrate", "--store", pg_url))
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_version (version, name) VALUES (99, 'future')")
    for command in ("status", "migrate"):
        r = ok(cli(command, "--store", pg_url), 1)
        line = one_error_line(r)
        assert "schema version 99 is newer" in line and f"v{PG_LATEST}" in line, line
        assert "upgrade meerkat-runtime" in line and r.stdout == ""
    r = ok(cli("status", "--store", pg_url, "--json"), 1)
    assert js(r)["code"] == "internal" and "99" in js(r)["error"]
    assert pg_versions(pg_url)[-1] == 99


def test_pg_another_applications_schema_is_refused(cli: Cli, pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE accounts (id int PRIMARY KEY)")
    for command in ("status", "migrate"):
        line = one_error_line(ok(cli(command, "--store", pg_url), 1))
        assert "not a meerkat-runtime database" in line and "accounts" in line
    assert pg_versions(pg_url) == []


# ------------------------------------------------------------------ SQLite


def test_sqlite_status_reads_only_and_migrate_applies(cli: Cli, tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    url = f"sqlite:///{db.name}"  # relative to the working directory (tmp_path)
    before = ok(cli("status", "--store", url), 1)
    assert "version  0" in before.stdout and f"latest   {SQLITE_LATEST}" in before.stdout
    assert "next command or server" in before.stderr  # SQLite also migrates at open
    assert not db.exists()  # status created nothing

    migrated = ok(cli("migrate", "--store", url))
    every = ", ".join(str(m.version) for m in SQLITE_KNOWN)
    assert migrated.stdout.strip() == (
        f"applied migrations {every}; schema is at version {SQLITE_LATEST}"
    )
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == (
            SQLITE_LATEST
        )
    assert js(ok(cli("status", "--store", str(db), "--json"))) == {
        "store": f"sqlite:///{db}",
        "backend": "sqlite",
        "version": SQLITE_LATEST,
        "latest": SQLITE_LATEST,
        "up_to_date": True,
        "pending": [],
    }
    again = js(ok(cli("migrate", "--store", url, "--json")))
    assert again["applied"] == [] and again["version"] == SQLITE_LATEST


def test_sqlite_default_store_an_old_file_and_a_newer_one(cli: Cli, tmp_path: Path) -> None:
    default = tmp_path / "state" / "meerkat.db"
    ok(cli("status"), 1)
    ok(cli("migrate"))
    assert default.exists()
    assert js(ok(cli("status", "--json")))["store"] == f"sqlite:///{default}"

    with sqlite3.connect(default) as conn:
        conn.execute("DELETE FROM schema_version WHERE version > 1")
    status = js(ok(cli("status", "--json"), 1))
    assert status["version"] == 1
    assert status["pending"] == pending_of(list(range(2, SQLITE_LATEST + 1)), SQLITE_KNOWN)

    with sqlite3.connect(default) as conn:
        conn.execute("INSERT INTO schema_version (version, name, applied_at) VALUES (99, 'x', 0)")
    for command in ("status", "migrate"):
        line = one_error_line(ok(cli(command), 1))
        assert "schema version 99 is newer" in line and "upgrade meerkat-runtime" in line


def test_sqlite_file_that_is_not_a_database(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "notes.db").write_text("not a database " * 100, encoding="utf-8")
    for command in ("status", "migrate"):
        line = one_error_line(ok(cli(command, "--store", "notes.db"), 1))
        assert "notes.db" in line and "not a database" in line


# ------------------------------------------------------------------ usage errors


def test_memory_and_unknown_urls_are_usage_errors(cli: Cli) -> None:
    mem = ok(cli("status", "--store", "memory://"), 2)
    line = one_error_line(mem)
    assert "memory://" in line and "postgresql://" in line and "SQLite" in line
    assert js(ok(cli("migrate", "--store", "memory://", "--json"), 2))["code"] == "bad_request"
    for url in ("ftp://somewhere/x", "nonsense"):
        line = one_error_line(ok(cli("migrate", "--store", url), 2))
        assert "--store" in line and "postgresql://user@host/dbname" in line


def test_an_unreachable_server_exits_1_without_printing_the_password(cli: Cli) -> None:
    url = f"postgresql://meerkat:{SECRET}@127.0.0.1:1/nowhere"
    for args in (("status", "--store", url), ("migrate", "--store", url, "--json")):
        r = ok(cli(*args), 1)
        line = one_error_line(r)
        assert "127.0.0.1:1" in line and "PostgreSQL server running" in line, line
        assert SECRET not in r.stdout + r.stderr and "meerkat:***@" in line


def test_a_malformed_url_is_named_without_its_password(cli: Cli) -> None:
    # libpq quotes the part of the URL it cannot parse: here, the password
    url = f"postgresql://meerkat:{SECRET}%ZZ@127.0.0.1/db"
    r = ok(cli("status", "--store", url, "--json"), 1)
    assert SECRET not in r.stdout + r.stderr
    assert "percent-encoded" in one_error_line(r) and "***" in js(r)["error"]


def test_scrub_removes_the_password_as_written_and_decoded() -> None:
    url = "postgresql://u:p%40ss-word@h/db?password=other-secret"
    message = 'bad token "p%40ss-word", also p@ss-word and other-secret in postgres://a:b@c/d'
    scrubbed = scrub(message, url)
    assert "ss-word" not in scrubbed and "other-secret" not in scrubbed
    assert "postgres://a:***@c/d" in scrubbed
    assert scrub("nothing secret", None) == "nothing secret"
    assert scrub("no password here", "postgresql://u@h/db") == "no password here"
