-- meerkat-runtime SQLite store, schema version 1.
--
-- One database holds the runtime's state and the sessions' conversations, so one
-- transaction spans both (spec S6). Every row is partitioned by runtime id.
-- Timestamps are INTEGER microseconds since the Unix epoch (UTC) unless noted; JSON columns
-- hold the wire documents of reference-inputs.md / reference-runtime.md as compact text.
-- Migrations are applied in order by the store, each inside the opening transaction, and
-- recorded in schema_version; a database newer than the code is refused.

CREATE TABLE schema_version (
    version     INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL,
    applied_at  INTEGER NOT NULL
);

CREATE TABLE sessions (
    session_id  TEXT    PRIMARY KEY,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    config      TEXT    NOT NULL DEFAULT '{}',   -- opaque JSON owned by the host
    labels      TEXT    NOT NULL DEFAULT '{}',
    archived    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX sessions_by_created ON sessions (created_at, session_id);

-- One row per logical runtime: its stored state (never 'stopped', S8), ownership (S10) and
-- counters. generation 0 means "never leased": such a runtime is not fenced until a lease is
-- first acquired. lease_expiry is a Unix time in seconds (REAL).
CREATE TABLE runtimes (
    runtime_id      TEXT    PRIMARY KEY,
    state           TEXT,
    generation      INTEGER NOT NULL DEFAULT 0,
    lease_owner     TEXT,
    lease_expiry    REAL,
    last_event_seq  INTEGER NOT NULL DEFAULT 0,
    recovery_count  INTEGER NOT NULL DEFAULT 0,
    updated_at      INTEGER NOT NULL
);

-- The input ledger. current_state, is_terminal and last_run_id are copies of fields of
-- state_json, kept as columns for the indexes below. queue_order: position of a queued input
-- (ascending = earlier), NULL when not queued.
CREATE TABLE input_states (
    runtime_id     TEXT    NOT NULL,
    input_id       TEXT    NOT NULL,
    current_state  TEXT    NOT NULL,
    is_terminal    INTEGER NOT NULL,
    queue_order    INTEGER,
    last_run_id    TEXT,
    state_json     TEXT    NOT NULL,
    updated_at     INTEGER NOT NULL,
    PRIMARY KEY (runtime_id, input_id)
);
-- recovery finds runtimes with pending inputs with one indexed query (S7)
CREATE INDEX input_states_pending ON input_states (runtime_id) WHERE is_terminal = 0;
CREATE INDEX input_states_terminal_age ON input_states (updated_at) WHERE is_terminal = 1;
CREATE INDEX input_states_last_run ON input_states (last_run_id) WHERE last_run_id IS NOT NULL;

-- Claimed idempotency keys (S11): unique per (runtime, key).
CREATE TABLE idempotency (
    runtime_id    TEXT    NOT NULL,
    key           TEXT    NOT NULL,
    input_id      TEXT    NOT NULL,
    content_hash  TEXT    NOT NULL,
    accepted_at   INTEGER NOT NULL
);
CREATE UNIQUE INDEX idempotency_key ON idempotency (runtime_id, key);
CREATE INDEX idempotency_age ON idempotency (accepted_at);

-- Conversations: append-only rows with a chained digest (spec section 3). Only a runtime
-- reset deletes them (S9); an UPDATE is refused by the trigger below.
CREATE TABLE conversation_rows (
    runtime_id  TEXT    NOT NULL,
    idx         INTEGER NOT NULL,
    run_id      TEXT,
    input_ids   TEXT    NOT NULL,   -- JSON array of input ids
    message     TEXT    NOT NULL,   -- JSON of the message
    digest      BLOB    NOT NULL,   -- 32 bytes, SHA-256 chain
    PRIMARY KEY (runtime_id, idx)
);
CREATE TRIGGER conversation_rows_append_only BEFORE UPDATE ON conversation_rows
BEGIN
    SELECT RAISE(ABORT, 'conversation rows are append-only');
END;

-- Run boundary receipts; identity (runtime, run, sequence). created_at: commit time.
CREATE TABLE receipts (
    runtime_id              TEXT    NOT NULL,
    run_id                  TEXT    NOT NULL,
    sequence                INTEGER NOT NULL,
    contributing_input_ids  TEXT    NOT NULL,   -- JSON array
    receipt_json            TEXT    NOT NULL,
    created_at              INTEGER NOT NULL,
    PRIMARY KEY (runtime_id, run_id, sequence)
);
CREATE INDEX receipts_age ON receipts (created_at);

-- How runs ended ('running' until they do). updated_at: time of the last write.
CREATE TABLE runs (
    run_id           TEXT    PRIMARY KEY,
    runtime_id       TEXT    NOT NULL,
    status           TEXT    NOT NULL,
    result_json      TEXT,
    error            TEXT,
    is_continuation  INTEGER NOT NULL DEFAULT 0,
    updated_at       INTEGER NOT NULL
);
CREATE INDEX runs_running ON runs (runtime_id) WHERE status = 'running';
CREATE INDEX runs_age ON runs (updated_at) WHERE status <> 'running';

-- Stored runtime events (S15), per-runtime seq; pruned to a bounded window (S18).
CREATE TABLE events (
    runtime_id  TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    event_json  TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (runtime_id, seq)
);

-- Inputs accepted by a process that does not own the runtime (S10), ingested by the owner in
-- seq order and deleted by the transaction that ingests them. input_id: the input named by
-- the entry's idempotency record, if any (keeps its key from being pruned).
CREATE TABLE inbox (
    seq                  INTEGER PRIMARY KEY AUTOINCREMENT,
    runtime_id           TEXT    NOT NULL,
    input_id             TEXT,
    input_json           TEXT    NOT NULL,
    reconstruction_json  TEXT,
    created_at           INTEGER NOT NULL
);
CREATE INDEX inbox_by_runtime ON inbox (runtime_id, seq);
