-- meerkat-runtime PostgreSQL store, schema version 1.
--
-- The same tables as the SQLite store (schema/sqlite/0001-0002), in PostgreSQL's types. One
-- database (or one schema of it: the tables are created unqualified, in the connection's
-- current schema) holds the runtime's state and the sessions' conversations, so one
-- transaction spans both (spec S6). Every row is partitioned by runtime id.
--
-- Conventions:
-- - Ids and keys are text COLLATE "C": ordering is bytewise, as in SQLite and Python (input
--   ids are UUIDv7 strings, ordered by creation), whatever the database's collation is.
-- - Timestamps are timestamptz (microseconds, like Python's datetime). Written from the
--   client's clock, except lease expiries, which use the database server's clock so that every
--   process compares them against the same clock.
-- - JSON documents of the wire formats (input states, messages, receipts, events, inbox
--   entries) are text, stored and returned byte for byte; session config and labels are jsonb.
-- - Migrations are applied in order, all missing ones in one transaction, and recorded in
--   schema_version. ``PostgresStore.open`` migrates an empty schema by itself; an older one
--   needs ``meerkat db migrate`` (``migrate_postgres``); a newer one is refused.

CREATE TABLE schema_version (
    version     integer     PRIMARY KEY,
    name        text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- The change token (``PostgresStore.change_token``): every write transaction of a store adds 1
-- to one of these slots (each store instance picks one at random, so instances rarely wait on
-- one another), in the same transaction as its writes; the token is the sum. It changes
-- exactly when something committed, and a poller that sees the new token sees the writes.
CREATE TABLE change_counter (
    slot  smallint PRIMARY KEY,
    n     bigint   NOT NULL DEFAULT 0
);
INSERT INTO change_counter (slot) SELECT generate_series(0, 15);

CREATE TABLE sessions (
    session_id  text COLLATE "C" PRIMARY KEY,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    config      jsonb       NOT NULL DEFAULT '{}',   -- opaque JSON owned by the host
    labels      jsonb       NOT NULL DEFAULT '{}',
    archived    boolean     NOT NULL DEFAULT false
);
CREATE INDEX sessions_by_created ON sessions (created_at, session_id);

-- One row per logical runtime: its stored state (never 'stopped', S8), ownership (S10) and
-- counters. generation 0 means "never leased": such a runtime is not fenced until a lease is
-- first acquired. Every write of a runtime's rows locks this row first (FOR UPDATE), so
-- the fencing check, admission counting and idempotency claims of one runtime serialize.
CREATE TABLE runtimes (
    runtime_id      text COLLATE "C" PRIMARY KEY,
    state           text,
    generation      bigint      NOT NULL DEFAULT 0,
    lease_owner     text,
    lease_expiry    timestamptz,
    last_event_seq  bigint      NOT NULL DEFAULT 0,
    recovery_count  bigint      NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL
);

-- The fence (S10) of a transaction's writes, called first in the transaction's savepoint:
-- locks the runtime row (creating it, never leased, if missing) and refuses a writer whose
-- generation is not the stored one (SQLSTATE MKF01), and events that do not come after the
-- last stored seq (MKF02). The row stays locked until COMMIT, so the generation cannot move
-- under the writes that follow.
CREATE FUNCTION meerkat_fence(p_runtime text, p_generation bigint, p_first_seq bigint,
                              p_now timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    g bigint;
    s bigint;
BEGIN
    SELECT generation, last_event_seq INTO g, s FROM runtimes
        WHERE runtime_id = p_runtime FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO runtimes (runtime_id, generation, updated_at) VALUES (p_runtime, 0, p_now)
            ON CONFLICT (runtime_id) DO NOTHING;
        SELECT generation, last_event_seq INTO g, s FROM runtimes
            WHERE runtime_id = p_runtime FOR UPDATE;
    END IF;
    IF g <> 0 AND g <> p_generation THEN
        RAISE EXCEPTION USING ERRCODE = 'MKF01', MESSAGE = format(
            'runtime %s is owned by generation %s; this writer holds generation %s (fenced, S10)',
            p_runtime, g, p_generation);
    END IF;
    IF p_first_seq IS NOT NULL AND p_first_seq <= s THEN
        RAISE EXCEPTION USING ERRCODE = 'MKF02', MESSAGE = format(
            'event seq %s of runtime %s is not after the last stored seq %s (S15: seq only grows)',
            p_first_seq, p_runtime, s);
    END IF;
END
$$;

-- The input ledger. current_state, is_terminal and last_run_id are copies of fields of
-- state_json, kept as columns for the indexes below. queue_order: position of a queued input
-- (ascending = earlier), NULL when not queued.
CREATE TABLE input_states (
    runtime_id     text COLLATE "C" NOT NULL,
    input_id       text COLLATE "C" NOT NULL,
    current_state  text        NOT NULL,
    is_terminal    boolean     NOT NULL,
    queue_order    bigint,
    last_run_id    text COLLATE "C",
    state_json     text        NOT NULL,
    updated_at     timestamptz NOT NULL,
    PRIMARY KEY (runtime_id, input_id)
);
-- recovery finds runtimes with pending inputs with one indexed query (S7)
CREATE INDEX input_states_pending ON input_states (runtime_id) WHERE NOT is_terminal;
CREATE INDEX input_states_terminal_age ON input_states (updated_at) WHERE is_terminal;
CREATE INDEX input_states_last_run ON input_states (last_run_id) WHERE last_run_id IS NOT NULL;
-- find an input's runtime from its id alone (``find_input_runtime``)
CREATE INDEX input_states_by_input ON input_states (input_id);

-- Claimed idempotency keys (S11): unique per (runtime, key).
CREATE TABLE idempotency (
    runtime_id    text COLLATE "C" NOT NULL,
    key           text COLLATE "C" NOT NULL,
    input_id      text COLLATE "C" NOT NULL,
    content_hash  text        NOT NULL,
    accepted_at   timestamptz NOT NULL,
    PRIMARY KEY (runtime_id, key)
);
CREATE INDEX idempotency_age ON idempotency (accepted_at);

-- Conversations: append-only rows with a chained digest. Only a runtime reset deletes them
-- (S9); an UPDATE is refused by the trigger below.
CREATE TABLE conversation_rows (
    runtime_id  text COLLATE "C" NOT NULL,
    idx         bigint  NOT NULL,
    run_id      text COLLATE "C",
    input_ids   text[]  NOT NULL,
    message     text    NOT NULL,   -- JSON of the message
    digest      bytea   NOT NULL,   -- 32 bytes, SHA-256 chain
    PRIMARY KEY (runtime_id, idx)
);
CREATE FUNCTION meerkat_conversation_rows_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'conversation rows are append-only';
END
$$;
CREATE TRIGGER conversation_rows_append_only BEFORE UPDATE ON conversation_rows
    FOR EACH ROW EXECUTE FUNCTION meerkat_conversation_rows_append_only();

-- Run boundary receipts; identity (runtime, run, sequence). created_at: commit time.
CREATE TABLE receipts (
    runtime_id              text COLLATE "C" NOT NULL,
    run_id                  text COLLATE "C" NOT NULL,
    sequence                bigint      NOT NULL,
    contributing_input_ids  text[]      NOT NULL,
    receipt_json            text        NOT NULL,
    created_at              timestamptz NOT NULL,
    PRIMARY KEY (runtime_id, run_id, sequence)
);
CREATE INDEX receipts_age ON receipts (created_at);

-- How runs ended ('running' until they do). updated_at: time of the last write.
CREATE TABLE runs (
    run_id           text COLLATE "C" PRIMARY KEY,
    runtime_id       text COLLATE "C" NOT NULL,
    status           text        NOT NULL,
    result_json      text,
    error            text,
    is_continuation  boolean     NOT NULL DEFAULT false,
    updated_at       timestamptz NOT NULL
);
CREATE INDEX runs_running ON runs (runtime_id) WHERE status = 'running';
CREATE INDEX runs_age ON runs (updated_at) WHERE status <> 'running';

-- Stored runtime events (S15), per-runtime seq; pruned to a bounded window (S18).
CREATE TABLE events (
    runtime_id  text COLLATE "C" NOT NULL,
    seq         bigint      NOT NULL,
    event_json  text        NOT NULL,
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (runtime_id, seq)
);

-- Inputs accepted by a process that does not own the runtime (S10), ingested by the owner in
-- seq order and deleted by the transaction that ingests them. input_id: the input named by
-- the entry's idempotency record, if any (keeps its key from being pruned).
CREATE TABLE inbox (
    seq                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    runtime_id           text COLLATE "C" NOT NULL,
    input_id             text COLLATE "C",
    input_json           text        NOT NULL,
    reconstruction_json  text,
    created_at           timestamptz NOT NULL
);
CREATE INDEX inbox_by_runtime ON inbox (runtime_id, seq);
