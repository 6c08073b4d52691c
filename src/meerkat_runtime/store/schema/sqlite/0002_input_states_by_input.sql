-- meerkat-runtime SQLite store, schema version 2.
--
-- Find an input's runtime from its id alone (``find_input_runtime``; ``meerkat wait INPUT_ID``
-- without a session). Input ids are UUIDv7, so new entries append at the end of the index;
-- state updates never touch it (they upsert rows whose input_id does not change).

CREATE INDEX input_states_by_input ON input_states (input_id);
