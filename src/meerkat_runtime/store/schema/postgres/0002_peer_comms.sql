-- meerkat-runtime PostgreSQL store, schema version 2: peer comms (as SQLite's 0003).
--
-- Outstanding peer requests (spec S20). The requester records a request here, durably,
-- before it is delivered; the transaction that accepts the terminal response at the
-- requester closes it (status completed / failed / cancelled, closed_at, closed_by = the
-- closing response's envelope id or input id). envelope_id is unique per requester, so a
-- retried send finds its request (and its request id) again.
CREATE TABLE peer_requests (
    requester_runtime_id  text COLLATE "C" NOT NULL,
    request_id            text COLLATE "C" NOT NULL,
    responder_runtime_id  text COLLATE "C" NOT NULL,
    envelope_id           text COLLATE "C" NOT NULL,
    requester_name        text        NOT NULL DEFAULT '',
    responder_name        text        NOT NULL DEFAULT '',
    intent                text        NOT NULL DEFAULT '',
    created_at            timestamptz NOT NULL,
    status                text,
    closed_at             timestamptz,
    closed_by             text,
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
CREATE UNIQUE INDEX sessions_comms_name ON sessions ((config ->> 'comms_name'))
    WHERE NOT archived AND (config ->> 'comms_name') IS NOT NULL;
