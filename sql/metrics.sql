-- pg_outbox: metrics for monitoring systems. One row per metric and label set, in the shape
-- sql_exporter and postgres_exporter's custom queries take (name, labels, value, type), and the
-- same in Prometheus' text format. Reading them scans no table: the worker's counters and
-- histograms live in shared memory (kept from the server's start, across worker restarts),
-- the pending and dead-letter counts are the statistics system's estimates, the oldest
-- pending event is the first entry of the outbox's primary key.
CREATE VIEW outbox.metrics AS
SELECT m.name,
       pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object(
           'database', pg_catalog.current_database(), 'exchange', m.exchange, 'le', m.le)) AS labels,
       m.value,
       m.type,
       m.help,
       pg_catalog.current_database()::text AS database,
       m.exchange,
       m.le
  FROM outbox.worker_metrics() m
UNION ALL
SELECT g.name,
       pg_catalog.jsonb_build_object('database', pg_catalog.current_database()),
       g.value,
       'gauge',
       g.help,
       pg_catalog.current_database()::text,
       NULL,
       NULL
  FROM (VALUES
        ('outbox_pending',
         pg_catalog.pg_stat_get_live_tuples('outbox.messages'::pg_catalog.regclass)::float8,
         'Events awaiting publication: the statistics system''s estimate (outbox.exact_counts() counts them).'),
        ('outbox_oldest_pending_age_seconds',
         coalesce(extract(epoch FROM pg_catalog.now() OPERATOR(pg_catalog.-)
                  (SELECT o.created_at FROM outbox.messages o ORDER BY o.id LIMIT 1))::float8, 0),
         'Age of the oldest event awaiting publication (0: none).'),
        ('outbox_dead_letters',
         pg_catalog.pg_stat_get_live_tuples('outbox.dead_letters'::pg_catalog.regclass)::float8,
         'Events in outbox.dead_letters: the statistics system''s estimate.')
       ) AS g(name, value, help);

COMMENT ON VIEW outbox.metrics IS
    'pg_outbox: counters, gauges and latency histograms of this database''s outbox (see outbox.metrics_text() for the Prometheus format)';

-- Exact counts, for whoever wants them and can afford a scan of the outbox.
CREATE FUNCTION outbox.exact_counts(OUT pending bigint, OUT retrying bigint, OUT dead_letters bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (SELECT count(*) FROM outbox.messages),
           (SELECT count(*) FROM outbox.messages WHERE next_attempt_at IS NOT NULL),
           (SELECT count(*) FROM outbox.dead_letters)
$$;

-- Monitoring roles and the extension's owner read the metrics; the view reads the outbox with
-- its owner's rights, so it is not for everyone.
REVOKE ALL ON outbox.metrics FROM PUBLIC;
GRANT SELECT ON outbox.metrics TO pg_monitor;
REVOKE EXECUTE ON FUNCTION outbox.worker_metrics() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.worker_metrics() TO pg_monitor;
REVOKE EXECUTE ON FUNCTION outbox.metrics_text() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.metrics_text() TO pg_monitor;
REVOKE EXECUTE ON FUNCTION outbox.exact_counts() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.exact_counts() TO pg_monitor;
