-- meerkat-runtime SQLite store, schema version 3: peer comms.
--
-- Outstanding peer requests (spec S20). The requester records a request here, durably,
-- before it is delivered; the transaction that accepts the terminal response at the
-- requester closes it (status completed / failed / cancelled, closed_at, closed_by = the
-- closing response's envelope id or input id). envelope_id is unique per requester, so a
-- retried send finds its request (and its request id) again. Timestamps: microseconds.
CREATE TABLE peer_requests (
    requester_runtime_id  TEXT    NOT NULL,
    request_id            TEXT    NOT NULL,
    responder_runtime_id  TEXT    NOT NULL,
    envelope_id           TEXT    NOT NULL,
    requester_name        TEXT    NOT NULL DEFAULT '',
    responder_name        TEXT    NOT NULL DEFAULT '',
    intent                TEXT    NOT NULL DEFAULT '',
    created_at            INTEGER NOT NULL,
    status                TEXT,
    closed_at             INTEGER,
    closed_by             TEXT,
    PRIMARY KEY (requester_runtime_id, request_id)
);
CREATE UNIQUE INDEX peer_requests_envelope ON peer_requests (requester_runtime_id, envelope_id);
-- routing a response from the request id alone
CREATE INDEX peer_requests_by_id ON peer_requests (request_id);
-- a responder's unanswered requests
CREATE INDEX peer_requests_open_by_responder ON peer_requests (responder_runtime_id)
    WHERE closed_at IS NULL;
-- retention of closed requests (S18)
CREATE INDEX peer_requests_closed_age ON peer_requests (closed_at) WHERE closed_at IS NOT NULL;

-- Comms names (config.comms_name) are unique among non-archived sessions; archiving a
-- session frees its name.
CREATE UNIQUE INDEX sessions_comms_name ON sessions (json_extract(config, '$.comms_name'))
    WHERE archived = 0 AND json_extract(config, '$.comms_name') IS NOT NULL;
