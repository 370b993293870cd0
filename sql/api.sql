-- pg_outbox: functions, procedures and views.

-- Writes an event in the caller's transaction and returns its message id. Validation errors
-- carry a SQLSTATE (22004, 22023, 22001, 54000) and write nothing. Runs as the extension's
-- owner, so a caller needs only EXECUTE (see README, "Privileges").
CREATE FUNCTION outbox.publish(
    event_type     text,
    payload        jsonb,
    aggregate_type text  DEFAULT NULL,
    aggregate_id   text  DEFAULT NULL,
    headers        jsonb DEFAULT NULL,
    routing_key    text  DEFAULT NULL,
    exchange       text  DEFAULT NULL
) RETURNS uuid
LANGUAGE c VOLATILE PARALLEL UNSAFE SECURITY DEFINER
AS 'MODULE_PATHNAME', 'outbox_publish';

-- The same as a procedure, for CALL. Joins the caller's transaction; never commits.
CREATE PROCEDURE outbox.process_transaction(
    event_type     text,
    payload        jsonb,
    aggregate_type text  DEFAULT NULL,
    aggregate_id   text  DEFAULT NULL,
    headers        jsonb DEFAULT NULL,
    routing_key    text  DEFAULT NULL,
    exchange       text  DEFAULT NULL
)
LANGUAGE c SECURITY DEFINER
AS 'MODULE_PATHNAME', 'outbox_publish';

REVOKE EXECUTE ON FUNCTION outbox.publish(text, jsonb, text, text, jsonb, text, text) FROM PUBLIC;
REVOKE EXECUTE ON PROCEDURE outbox.process_transaction(text, jsonb, text, text, jsonb, text, text) FROM PUBLIC;

-- Dead letters: list, replay (back into the outbox with the same message id), purge.
CREATE FUNCTION outbox.list_dead_letters(max_rows integer DEFAULT 100, event_type text DEFAULT NULL)
RETURNS SETOF outbox.dead_letters
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM outbox.dead_letters d
     WHERE list_dead_letters.event_type IS NULL OR d.event_type = list_dead_letters.event_type
     ORDER BY d.id
     LIMIT max_rows
$$;

-- The per-aggregate lock outbox.publish takes; held until the transaction ends.
CREATE FUNCTION outbox.lock_aggregate(aggregate_type text, aggregate_id text) RETURNS void
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'outbox_lock_aggregate';
REVOKE EXECUTE ON FUNCTION outbox.lock_aggregate(text, text) FROM PUBLIC;

CREATE FUNCTION outbox.replay_dead_letters(ids bigint[] DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    replayed bigint;
BEGIN
    -- Same locks as outbox.publish, so replayed events keep commit order within an aggregate.
    PERFORM outbox.lock_aggregate(d.aggregate_type, d.aggregate_id)
       FROM outbox.dead_letters d
      WHERE d.aggregate_id IS NOT NULL AND (ids IS NULL OR d.id = ANY (ids))
      ORDER BY d.aggregate_type, d.aggregate_id;
    WITH moved AS (
        DELETE FROM outbox.dead_letters d
         WHERE ids IS NULL OR d.id = ANY (ids)
        RETURNING d.*
    )
    INSERT INTO outbox.messages (message_id, event_type, payload, aggregate_type, aggregate_id,
                                 headers, routing_key, exchange, created_at)
    SELECT message_id, event_type, payload, aggregate_type, aggregate_id,
           headers, routing_key, exchange, created_at
      FROM moved
     ORDER BY id;
    GET DIAGNOSTICS replayed = ROW_COUNT;
    IF replayed > 0 THEN
        PERFORM outbox.wake_worker_at_commit();
    END IF;
    RETURN replayed;
END
$$;

CREATE FUNCTION outbox.purge_dead_letters(ids bigint[] DEFAULT NULL, older_than interval DEFAULT NULL)
RETURNS bigint
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    WITH purged AS (
        DELETE FROM outbox.dead_letters d
         WHERE (ids IS NULL OR d.id = ANY (ids))
           AND (older_than IS NULL OR d.dead_lettered_at < now() - older_than)
        RETURNING 1
    )
    SELECT count(*) FROM purged
$$;

REVOKE EXECUTE ON FUNCTION outbox.list_dead_letters(integer, text) FROM PUBLIC;
-- Internal (replay uses it): anyone calling it could wake the worker at every commit.
REVOKE EXECUTE ON FUNCTION outbox.wake_worker_at_commit() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION outbox.replay_dead_letters(bigint[]) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION outbox.purge_dead_letters(bigint[], interval) FROM PUBLIC;

-- Monitoring: one row, read without a scan of the outbox. pending and dead_letters are the
-- statistics system's estimates, retrying what the worker last counted; outbox.exact_counts()
-- counts all three.
CREATE VIEW outbox.stats AS
SELECT pg_stat_get_live_tuples('outbox.messages'::regclass)                       AS pending,
       (SELECT now() - m.created_at FROM outbox.messages m ORDER BY m.id LIMIT 1) AS oldest_pending_age,
       outbox.worker_retrying()                                                    AS retrying,
       pg_stat_get_live_tuples('outbox.dead_letters'::regclass)                   AS dead_letters,
       w.published_total,
       w.failed_attempts_total,
       w.dead_lettered_total,
       w.worker_pid,
       w.worker_state,
       w.database,
       w.broker_connected,
       w.last_error,
       w.last_error_at,
       w.last_publish_at,
       w.worker_started_at
  FROM outbox.worker_status() w;

-- Everyone may look the schema up and read the stats; everything else is granted explicitly.
GRANT USAGE ON SCHEMA outbox TO PUBLIC;
GRANT SELECT ON outbox.stats TO PUBLIC;

-- Installing without preloading works for writing, but nothing would publish: say so.
DO $$
BEGIN
    IF NOT outbox.worker_available() THEN
        RAISE WARNING 'pg_outbox is not in shared_preload_libraries: events can be written, but no worker will publish them'
            USING HINT = 'Add pg_outbox to shared_preload_libraries in postgresql.conf and restart the server.';
    ELSIF current_setting('outbox.database') <> current_database() THEN
        RAISE WARNING 'outbox.database is "%", so events written in database "%" will not be published',
            current_setting('outbox.database'), current_database()
            USING HINT = 'Set outbox.database to this database and reload the configuration.';
    END IF;
END
$$;
