-- meerkat-runtime PostgreSQL store, schema version 3: the inbox push in one call.
--
-- A push to a runtime's inbox (S10: an input accepted by a process that does not own the
-- runtime) as one function, so that it costs the client one round trip instead of one per
-- statement. Called by PostgresStore.inbox_push in its own transaction; returns one row:
--   ('accepted', NULL, seq)             the key (if any) and the entry were inserted
--   ('deduplicated', input_id, 0)       the key is claimed with the same content hash
--   ('conflict', input_id, 0)           the key is claimed with another content hash
--   ('queue_full', NULL, 0)             non-terminal inputs + inbox entries >= p_max_pending
-- The runtime row is locked FOR UPDATE (a runtime never written has none: the pushes then
-- serialize on the advisory lock (0x6D6B6962 "mkib", hashtext(runtime)), as _INBOX_LOCK in
-- postgres.py), so the idempotency check and the admission count of one runtime serialize.
-- A concurrent claim of the same key still fails on the primary key (SQLSTATE 23505): the
-- caller runs the push again, which then finds the key.
CREATE FUNCTION meerkat_inbox_push(p_runtime text, p_input_id text, p_input_json text,
                                   p_reconstruction_json text, p_created_at timestamptz,
                                   p_idem_key text, p_idem_content_hash text,
                                   p_idem_accepted_at timestamptz, p_max_pending bigint,
                                   p_channel text)
RETURNS TABLE (verdict text, existing_input_id text, inbox_seq bigint)
LANGUAGE plpgsql AS $$
DECLARE
    prior_id text;
    prior_hash text;
    pending bigint;
    new_seq bigint;
BEGIN
    PERFORM 1 FROM runtimes r WHERE r.runtime_id = p_runtime FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM pg_advisory_xact_lock(1835755874, hashtext(p_runtime));
    END IF;
    IF p_idem_key IS NOT NULL THEN
        SELECT i.input_id, i.content_hash INTO prior_id, prior_hash FROM idempotency i
            WHERE i.runtime_id = p_runtime AND i.key = p_idem_key;
        IF FOUND THEN
            RETURN QUERY SELECT
                CASE WHEN prior_hash = p_idem_content_hash THEN 'deduplicated' ELSE 'conflict' END,
                prior_id, 0::bigint;
            RETURN;
        END IF;
    END IF;
    SELECT (SELECT count(*) FROM input_states s
                WHERE s.runtime_id = p_runtime AND NOT s.is_terminal)
         + (SELECT count(*) FROM inbox b WHERE b.runtime_id = p_runtime)
        INTO pending;
    IF pending >= p_max_pending THEN
        RETURN QUERY SELECT 'queue_full'::text, NULL::text, 0::bigint;
        RETURN;
    END IF;
    IF p_idem_key IS NOT NULL THEN
        INSERT INTO idempotency (runtime_id, key, input_id, content_hash, accepted_at)
            VALUES (p_runtime, p_idem_key, p_input_id, p_idem_content_hash, p_idem_accepted_at);
    END IF;
    INSERT INTO inbox (runtime_id, input_id, input_json, reconstruction_json, created_at)
        VALUES (p_runtime, p_input_id, p_input_json, p_reconstruction_json, p_created_at)
        RETURNING inbox.seq INTO new_seq;
    -- the owner (or, with none, any worker) ingests it at once (LISTEN, _pg_listen.py)
    PERFORM pg_notify(p_channel, p_runtime);
    RETURN QUERY SELECT 'accepted'::text, NULL::text, new_seq;
END
$$;
