"""The crash kit's store readers (``read_db``, ``SqliteReader``, ``PostgresReader``): the
parent's invariant checks are only as strong as what they read, so every reader must read
everything the store holds, the same way on every store.

The main test runs a clean child with comms (two sessions with comms names, a request and its
responses, so every table the checks use has rows), pushes an entry into an inbox through the
store, then compares the reader's ``DbView`` with what the store protocol itself returns
(``open_store(url)``: sessions, input states, conversations, runs, events, inbox, peer
requests): the same ids, states, messages, digests, times, on SQLite and on PostgreSQL. A
reader that read nothing, or converted a PostgreSQL type differently from SQLite, fails it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from meerkat_runtime.crashtest import (
    ChildSpec,
    DbView,
    InputSpec,
    PostgresReader,
    SessionSpec,
    SqliteReader,
    check_invariants,
    pg_schema_url,
    read_acks,
    read_comms_acks,
    read_db,
    read_outcomes,
    read_tool_log,
    reader_for,
    run_child,
)
from meerkat_runtime.runtime.inputs import PromptInput
from meerkat_runtime.store import open_store
from meerkat_runtime.store.base import InboxEntry, RuntimeStore
from meerkat_runtime.store.sqlite import SqliteStore
from tests.conformance.stores import skip_without_postgres
from tests.postgres import support as pg

STORES = ("sqlite", "postgres")


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest) -> Iterator[str]:
    """ "" (a SQLite file in the spec's directory) or a fresh PostgreSQL schema's URL."""
    if request.param == "sqlite":
        yield ""
        return
    skip_without_postgres()
    url, schema = pg.fresh_schema()
    try:
        yield url
    finally:
        pg.drop_schema(schema)


def _script(runs: int) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = []
    for i in range(runs):
        steps.append({"type": "tool", "name": "lookup", "args": {"q": i}, "duration": 0.001})
        steps.append({"type": "text", "text": f"answer {i}"})
    return steps


def _us(dt: datetime | None) -> int | None:
    """Microseconds since the epoch, exactly (as the SQLite store keeps its times)."""
    if dt is None:
        return None
    return (dt - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


async def _protocol_view(store: RuntimeStore) -> dict[str, Any]:
    """What the store protocol returns, in the shapes the reader's view has."""
    sessions = await store.list_sessions(include_archived=True)
    out: dict[str, Any] = {
        "comms_names": {
            s.session_id: s.config["comms_name"] for s in sessions if s.config.get("comms_name")
        },
        "inputs": {},
        "rows": [],
        "runs": {},
        "events": [],
        "inbox": [],
    }
    for s in sessions:
        sid = s.session_id
        for st in await store.load_input_states(sid):
            out["inputs"][str(st.input_id)] = (
                sid,
                st.current_state.value,
                st.is_terminal,
                None if st.last_run_id is None else str(st.last_run_id),
                st.to_json_dict(),
            )
            if st.last_run_id is not None:
                run = await store.load_run(st.last_run_id)
                assert run is not None, f"run {st.last_run_id} of {st.input_id} is not stored"
                out["runs"][str(run.run_id)] = run
        for row in await store.load_conversation(sid):
            out["rows"].append(
                (
                    sid,
                    row.index,
                    None if row.run_id is None else str(row.run_id),
                    [str(i) for i in row.input_ids],
                    row.message.to_json_dict(),
                    bytes(row.digest),
                )
            )
        for ev in await store.load_events(sid, 0, 100_000):
            out["events"].append(ev.to_json_dict())
        for e in await store.inbox_entries(sid):
            out["inbox"].append((e.seq, e.runtime_id, e.input_json))
    out["inbox"].sort()
    out["requests"] = {
        (r.requester_runtime_id, r.request_id): (
            r.responder_runtime_id,
            r.envelope_id,
            _us(r.created_at),
            r.status,
            _us(r.closed_at),
            r.closed_by,
        )
        for r in await store.list_peer_requests()
    }
    return out


def _reader_view(db: DbView) -> dict[str, Any]:
    """The reader's view in the same shapes (runs: only those an input names, as above)."""
    named = {s.last_run_id for s in db.inputs.values() if s.last_run_id is not None}
    return {
        "comms_names": dict(db.comms_names),
        "inputs": {
            iid: (
                s.runtime_id,
                s.current_state,
                s.is_terminal,
                s.last_run_id,
                json.loads(s.state_json),
            )
            for iid, s in db.inputs.items()
        },
        "rows": [
            (r.runtime_id, r.index, r.run_id, r.input_ids, r.message, bytes(r.digest))
            for r in db.rows
        ],
        "runs": {rid: run for rid, run in db.runs.items() if rid in named},
        "events": db.events,
        "inbox": sorted((e.seq, e.runtime_id, e.input_json) for e in db.inbox),
        "requests": {
            key: (r.responder, r.envelope_id, r.created_us, r.status, r.closed_us, r.closed_by)
            for key, r in db.peer_requests.items()
        },
    }


async def test_reader_reads_what_the_store_holds(tmp_path: Path, store: str) -> None:
    """After a clean child with comms and an inbox entry pushed through the store, the
    reader's view equals what the store protocol returns, table by table, none of them empty;
    and the checks pass on it."""
    coord = [InputSpec("prompt"), InputSpec("comms_request", to="worker"), InputSpec("prompt")]
    sessions = [
        SessionSpec("crash-coord", _script(8), coord, comms_name="coord"),
        SessionSpec("crash-worker", _script(8), [InputSpec("prompt")], comms_name="worker"),
    ]
    spec = ChildSpec.in_dir(tmp_path, sessions, store=store)
    run = run_child(spec, launcher="fork")
    assert run.returncode == 0, run.log_tail()
    db = read_db(spec.store_url)
    assert (
        check_invariants(
            db,
            read_acks(spec.ack_log),
            read_outcomes(spec.outcomes),
            [db.terminal_states()],
            read_tool_log(spec.tool_log_path),
            read_comms_acks(spec.comms_log_path),
        )
        == []
    )
    s = open_store(spec.store_url)
    await s.open()
    try:
        pushed = PromptInput.new("left in the inbox").to_json()
        assert (await s.inbox_push(InboxEntry("crash-worker", pushed), None, 100))[0] == "accepted"
        want = await _protocol_view(s)
    finally:
        await s.close()
    got = _reader_view(read_db(spec.store_url))
    for table in want:
        assert want[table], f"the workload left {table} empty: the comparison would be vacuous"
        assert got[table] == want[table], f"the reader's {table} differ from the store's"
    assert [e[2] for e in got["inbox"]] == [pushed]
    closed = [r for r in got["requests"].values() if r[4] is not None]
    assert closed, "the request was never closed"


def test_reader_of_a_store_without_tables_reads_nothing(tmp_path: Path, store: str) -> None:
    """A child killed before its store created the tables: an empty view, not an error (a
    missing SQLite file, an empty PostgreSQL schema)."""
    spec = ChildSpec.in_dir(tmp_path, [], store=store)
    assert read_db(spec.store_url) == DbView()


def test_reader_for_picks_the_store_kind(tmp_path: Path) -> None:
    """Paths and ``sqlite:///`` URLs read SQLite (the file ``open_store`` would open),
    ``postgresql://`` URLs PostgreSQL; a store no other process can read is refused."""
    db = tmp_path / "x.db"
    for location in (db, str(db), f"sqlite:///{db}"):
        reader = reader_for(location)
        assert isinstance(reader, SqliteReader) and reader.path == db, location
    spec = ChildSpec.in_dir(tmp_path, [])
    sqlite = open_store(spec.store_url)
    assert isinstance(sqlite, SqliteStore) and sqlite.path == Path(spec.db).absolute()
    for url in (
        "postgresql://u@h/db",
        "postgres://u@h/db",
        "postgresql+psycopg://u:secret@h/db?options=-csearch_path%3Ds",
    ):
        reader = reader_for(url)
        assert isinstance(reader, PostgresReader) and reader.url == url
        assert "secret" not in repr(reader)
    for bad in ("memory://", "ftp://h/x.db"):
        with pytest.raises(ValueError):
            reader_for(bad)


def test_pg_schema_url_selects_the_schema() -> None:
    """``pg_schema_url`` adds ``options=-csearch_path=<schema>`` to the URL, keeping the
    options it had, and the server uses that schema (and only it)."""
    assert (
        pg_schema_url("postgresql://u@h/db", "s1")
        == "postgresql://u@h/db?options=-csearch_path%3Ds1"
    )
    assert (
        pg_schema_url("postgresql://u@h/db?sslmode=require&options=-cwork_mem%3D8MB", "s1")
        == "postgresql://u@h/db?sslmode=require&options=-cwork_mem%3D8MB%20-csearch_path%3Ds1"
    )
    skip_without_postgres()
    url, schema = pg.fresh_schema()
    try:
        plain = pg_schema_url(pg.base_url(), schema)
        with_options = pg_schema_url(pg.base_url() + "?options=-cwork_mem%3D8MB", schema)
        for u in (plain, with_options):
            with psycopg.connect(u) as conn:
                row = conn.execute(
                    "SELECT current_schema(), current_setting('search_path')"
                ).fetchone()
            assert row == (schema, schema), u
        assert url  # the test helper's URL selects it too (the same convention)
    finally:
        pg.drop_schema(schema)
