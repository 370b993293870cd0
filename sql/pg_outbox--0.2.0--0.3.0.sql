-- pg_outbox 0.2.0 -> 0.3.0
--
-- Adds metrics (outbox.metrics, outbox.metrics_text(), outbox.exact_counts()), capture triggers
-- (outbox.capture, outbox.uncapture, outbox.captured) and the inbox (outbox.inbox,
-- outbox.inbox_claim); outbox.stats stops scanning the outbox. Creates objects only: no table
-- is rewritten. The objects below are those of sql/metrics.sql, sql/capture.sql and
-- sql/inbox.sql, as a fresh install creates them (tests/tests/upgrade.rs compares the two).

-- Functions of the library (as CREATE EXTENSION makes them).
CREATE FUNCTION outbox."metrics_text"() RETURNS TEXT /* String */
STRICT VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'metrics_text_wrapper';

CREATE FUNCTION outbox."worker_metrics"() RETURNS TABLE (
	"name" TEXT,  /* String */
	"type" TEXT,  /* String */
	"help" TEXT,  /* String */
	"exchange" TEXT,  /* Option < String > */
	"le" TEXT,  /* Option < String > */
	"value" double precision  /* f64 */
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'worker_metrics_wrapper';

CREATE FUNCTION outbox."worker_retrying"() RETURNS bigint /* i64 */
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'worker_retrying_wrapper';

-- outbox.stats reads estimates instead of counting (same columns).
CREATE OR REPLACE VIEW outbox.stats AS
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

-- pg_outbox: capture triggers (outbox.capture, outbox.uncapture, outbox.captured).
-- Written so that it can be appended to an upgrade script as it is.

-- The trigger function outbox.capture installs. It runs as the role that modifies the table
-- (converting a row to JSON can run code of the table's owner: a cast to json of a column's
-- type), and writes each event through outbox.publish as the extension's owner, so that role
-- needs no privilege on the outbox. CREATE TRIGGER checks EXECUTE on it: only roles an
-- administrator granted it to can capture a table (see README, "Privileges").
CREATE FUNCTION outbox.capture_row() RETURNS trigger
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'outbox_capture_row';

REVOKE EXECUTE ON FUNCTION outbox.capture_row() FROM PUBLIC;

-- Publishes every change of a table: <prefix>.inserted, .updated, .deleted (one event per row,
-- the key as aggregate id) and .truncated. Calling it again replaces the capture's options.
-- Runs as the caller, who must own the table.
CREATE FUNCTION outbox.capture(
    "table"           regclass,
    event_type_prefix text   DEFAULT NULL,
    aggregate_type    text   DEFAULT NULL,
    key_columns       text[] DEFAULT NULL,
    columns           text[] DEFAULT NULL,
    exchange          text   DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    rel         regclass := $1;
    relkind     "char";
    relowner    oid;
    relpart     boolean;
    relname     name;
    nspname     name;
    keys        text[];
    cols        text[];
    prefix      text;
    agg_type    text;
    missing     text;
    args        text;
    target      text;
BEGIN
    IF rel IS NULL THEN
        RAISE EXCEPTION 'outbox.capture: table must not be NULL' USING ERRCODE = '22004';
    END IF;
    SELECT c.relkind, c.relowner, c.relispartition, c.relname, n.nspname
      INTO relkind, relowner, relpart, relname, nspname
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
     WHERE c.oid OPERATOR(pg_catalog.=) rel;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'outbox.capture: relation with OID % does not exist', rel::oid USING ERRCODE = '42P01';
    END IF;
    target := pg_catalog.format('%I.%I', nspname, relname);
    IF nspname OPERATOR(pg_catalog.=) 'outbox'::name THEN
        RAISE EXCEPTION 'outbox.capture: % belongs to pg_outbox and cannot be captured', target
            USING ERRCODE = '42809';
    END IF;
    IF relkind OPERATOR(pg_catalog.<>) ALL (ARRAY['r', 'p']::"char"[]) THEN
        RAISE EXCEPTION 'outbox.capture: % is not a table', target
            USING ERRCODE = '42809',
                  HINT = CASE WHEN relkind OPERATOR(pg_catalog.=) ANY (ARRAY['v', 'm']::"char"[])
                              THEN 'Capture the tables it reads from.'
                              WHEN relkind OPERATOR(pg_catalog.=) 'f'::"char"
                              THEN 'Capture the table on the server that holds it: changes made there would not be seen here.'
                              ELSE 'Only ordinary and partitioned tables can be captured.' END;
    END IF;
    IF relpart THEN
        RAISE EXCEPTION 'outbox.capture: % is a partition', target
            USING ERRCODE = '42809',
                  HINT = pg_catalog.format('Capture its partitioned table %s: the capture covers every partition.',
                                           (SELECT i.inhparent::regclass FROM pg_catalog.pg_inherits i
                                             WHERE i.inhrelid OPERATOR(pg_catalog.=) rel LIMIT 1));
    END IF;
    -- Postgres' own ownership check: the owning role or a role that has its privileges.
    IF NOT pg_catalog.pg_has_role(current_user, relowner, 'USAGE') THEN
        RAISE EXCEPTION 'outbox.capture: must be owner of table %', target
            USING ERRCODE = '42501',
                  HINT = 'Only the table''s owner (or a member of the owning role) can capture it.';
    END IF;
    IF NOT pg_catalog.has_function_privilege('outbox.capture_row()', 'EXECUTE') THEN
        RAISE EXCEPTION 'outbox.capture: permission denied for function outbox.capture_row()'
            USING ERRCODE = '42501',
                  HINT = 'An administrator grants it with the capture functions: GRANT EXECUTE ON FUNCTION outbox.capture, outbox.uncapture, outbox.capture_row TO <role>.';
    END IF;
    -- What CREATE TRIGGER takes anyway, taken now: no column changes while we check them.
    EXECUTE pg_catalog.format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', target);

    IF key_columns IS NULL THEN
        SELECT pg_catalog.array_agg(a.attname::text ORDER BY k.n) INTO keys
          FROM pg_catalog.pg_index i
         CROSS JOIN LATERAL pg_catalog.unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
          JOIN pg_catalog.pg_attribute a
            ON a.attrelid OPERATOR(pg_catalog.=) i.indrelid AND a.attnum OPERATOR(pg_catalog.=) k.attnum
         WHERE i.indrelid OPERATOR(pg_catalog.=) rel AND i.indisprimary;
        IF keys IS NULL THEN
            RAISE EXCEPTION 'outbox.capture: table % has no primary key', target
                USING ERRCODE = '22023',
                      HINT = 'Name the columns that identify a row: outbox.capture(''...'', key_columns => ARRAY[''id'']).';
        END IF;
    ELSE
        keys := key_columns;
        IF pg_catalog.cardinality(keys) OPERATOR(pg_catalog.=) 0 THEN
            RAISE EXCEPTION 'outbox.capture: key_columns is empty' USING ERRCODE = '22023',
                HINT = 'Leave it NULL to use the primary key, or name the columns that identify a row.';
        END IF;
    END IF;
    cols := columns;
    IF cols IS NOT NULL AND pg_catalog.cardinality(cols) OPERATOR(pg_catalog.=) 0 THEN
        RAISE EXCEPTION 'outbox.capture: columns is empty' USING ERRCODE = '22023',
            HINT = 'Leave it NULL to capture every column.';
    END IF;
    IF pg_catalog.array_position(keys, NULL) IS NOT NULL OR pg_catalog.array_position(cols, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'outbox.capture: a column name is NULL' USING ERRCODE = '22004';
    END IF;
    IF (SELECT pg_catalog.count(DISTINCT k) FROM pg_catalog.unnest(keys) k)
       OPERATOR(pg_catalog.<>) pg_catalog.cardinality(keys) THEN
        RAISE EXCEPTION 'outbox.capture: key_columns names a column twice' USING ERRCODE = '22023';
    END IF;
    SELECT c INTO missing
      FROM pg_catalog.unnest(keys OPERATOR(pg_catalog.||) COALESCE(cols, '{}'::text[])) c
     WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_attribute a
                        WHERE a.attrelid OPERATOR(pg_catalog.=) rel AND a.attname OPERATOR(pg_catalog.=) c::name
                          AND a.attnum OPERATOR(pg_catalog.>) 0::int2 AND NOT a.attisdropped)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'outbox.capture: column "%" of table % does not exist', missing, target
            USING ERRCODE = '42703';
    END IF;

    prefix := COALESCE(event_type_prefix, relname::text);
    agg_type := COALESCE(aggregate_type, relname::text);
    IF prefix OPERATOR(pg_catalog.=) '' THEN
        RAISE EXCEPTION 'outbox.capture: event_type_prefix is empty' USING ERRCODE = '22023',
            HINT = 'Leave it NULL to use the table''s name.';
    END IF;
    -- Event types are at most 255 bytes of UTF-8; the longest suffix is ".truncated".
    IF pg_catalog.octet_length(pg_catalog.convert_to(prefix, 'UTF8')) OPERATOR(pg_catalog.>) 245 THEN
        RAISE EXCEPTION 'outbox.capture: event_type_prefix is longer than 245 bytes' USING ERRCODE = '22001';
    END IF;
    IF pg_catalog.octet_length(pg_catalog.convert_to(exchange, 'UTF8')) OPERATOR(pg_catalog.>) 255 THEN
        RAISE EXCEPTION 'outbox.capture: exchange is longer than 255 bytes' USING ERRCODE = '22001';
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_trigger t
                WHERE t.tgrelid OPERATOR(pg_catalog.=) rel
                  AND t.tgname OPERATOR(pg_catalog.=) ANY (ARRAY['outbox_capture', 'outbox_capture_truncate']::name[])
                  AND t.tgfoid OPERATOR(pg_catalog.<>) 'outbox.capture_row()'::regprocedure) THEN
        RAISE EXCEPTION 'outbox.capture: table % has a trigger named outbox_capture or outbox_capture_truncate of its own', target
            USING ERRCODE = '42710', HINT = 'Rename that trigger.';
    END IF;

    -- The configuration is the trigger's arguments, one name=value each (see src/capture.rs).
    SELECT pg_catalog.string_agg(pg_catalog.quote_literal(a), ', ' ORDER BY n) INTO args
      FROM pg_catalog.unnest(ARRAY['prefix=' OPERATOR(pg_catalog.||) prefix,
                                   'aggregate_type=' OPERATOR(pg_catalog.||) agg_type]
                             OPERATOR(pg_catalog.||) (SELECT pg_catalog.array_agg('key=' OPERATOR(pg_catalog.||) k ORDER BY o)
                                                        FROM pg_catalog.unnest(keys) WITH ORDINALITY AS u(k, o))
                             OPERATOR(pg_catalog.||) COALESCE(
                                 (SELECT pg_catalog.array_agg(DISTINCT 'column=' OPERATOR(pg_catalog.||) c)
                                    FROM pg_catalog.unnest(cols) c), '{}'::text[])
                             OPERATOR(pg_catalog.||) CASE WHEN exchange IS NULL THEN '{}'::text[]
                                                          ELSE ARRAY['exchange=' OPERATOR(pg_catalog.||) exchange] END)
           WITH ORDINALITY AS x(a, n);
    EXECUTE pg_catalog.format(
        'CREATE OR REPLACE TRIGGER outbox_capture AFTER INSERT OR UPDATE OR DELETE ON %s '
        'FOR EACH ROW EXECUTE FUNCTION outbox.capture_row(%s)', target, args);
    EXECUTE pg_catalog.format(
        'CREATE OR REPLACE TRIGGER outbox_capture_truncate AFTER TRUNCATE ON %s '
        'FOR EACH STATEMENT EXECUTE FUNCTION outbox.capture_row(%s)', target, args);
END
$$;

-- Stops capturing a table (drops its capture triggers). Runs as the caller, who must own it.
CREATE FUNCTION outbox.uncapture("table" regclass) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    rel    regclass := $1;
    target text;
    trigger_name name;
BEGIN
    IF rel IS NULL THEN
        RAISE EXCEPTION 'outbox.uncapture: table must not be NULL' USING ERRCODE = '22004';
    END IF;
    SELECT pg_catalog.format('%I.%I', n.nspname, c.relname) INTO target
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
     WHERE c.oid OPERATOR(pg_catalog.=) rel
       AND pg_catalog.pg_has_role(current_user, c.relowner, 'USAGE');
    IF NOT FOUND THEN
        RAISE EXCEPTION 'outbox.uncapture: must be owner of table %', rel
            USING ERRCODE = '42501',
                  HINT = 'Only the table''s owner (or a member of the owning role) can stop capturing it.';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_trigger t
                    WHERE t.tgrelid OPERATOR(pg_catalog.=) rel AND t.tgparentid OPERATOR(pg_catalog.=) 0::oid
                      AND t.tgfoid OPERATOR(pg_catalog.=) 'outbox.capture_row()'::regprocedure) THEN
        RAISE EXCEPTION 'outbox.uncapture: table % is not captured', target
            USING ERRCODE = '42704',
                  HINT = 'outbox.captured lists the captured tables (a partition is captured with its partitioned table).';
    END IF;
    FOR trigger_name IN SELECT t.tgname FROM pg_catalog.pg_trigger t
                 WHERE t.tgrelid OPERATOR(pg_catalog.=) rel AND t.tgparentid OPERATOR(pg_catalog.=) 0::oid
                   AND t.tgfoid OPERATOR(pg_catalog.=) 'outbox.capture_row()'::regprocedure
    LOOP
        EXECUTE pg_catalog.format('DROP TRIGGER %I ON %s', trigger_name, target);
    END LOOP;
END
$$;

REVOKE EXECUTE ON FUNCTION outbox.capture(regclass, text, text, text[], text[], text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION outbox.uncapture(regclass) FROM PUBLIC;

-- The captured tables, read from their triggers' arguments. Shows only what pg_trigger shows
-- everyone, so everyone may read it.
CREATE VIEW outbox.captured AS
SELECT t.tgrelid::regclass AS table_name,
       (SELECT pg_catalog.substr(a, 8) FROM pg_catalog.unnest(d.args) a
         WHERE pg_catalog.starts_with(a, 'prefix=') LIMIT 1)                              AS event_type_prefix,
       (SELECT pg_catalog.substr(a, 16) FROM pg_catalog.unnest(d.args) a
         WHERE pg_catalog.starts_with(a, 'aggregate_type=') LIMIT 1)                      AS aggregate_type,
       ARRAY(SELECT pg_catalog.substr(a, 5) FROM pg_catalog.unnest(d.args) WITH ORDINALITY AS u(a, n)
              WHERE pg_catalog.starts_with(a, 'key=') ORDER BY n)                         AS key_columns,
       (SELECT pg_catalog.array_agg(pg_catalog.substr(a, 8) ORDER BY n)
          FROM pg_catalog.unnest(d.args) WITH ORDINALITY AS u(a, n)
         WHERE pg_catalog.starts_with(a, 'column='))                                      AS columns,
       (SELECT pg_catalog.substr(a, 10) FROM pg_catalog.unnest(d.args) a
         WHERE pg_catalog.starts_with(a, 'exchange=') LIMIT 1)                            AS exchange,
       t.tgenabled OPERATOR(pg_catalog.<>) 'D'::"char"                                    AS enabled
  FROM pg_catalog.pg_trigger t
 CROSS JOIN LATERAL (
        -- tgargs holds each argument followed by a zero byte. In its 'escape' text a zero
        -- byte is \000; backslashes are made \134 first, so no argument can contain \000.
        SELECT pg_catalog.array_agg(pg_catalog.convert_from(pg_catalog.decode(p, 'escape'),
                                                            pg_catalog.getdatabaseencoding()) ORDER BY n) AS args
          FROM pg_catalog.unnest(pg_catalog.string_to_array(
                   pg_catalog.replace(pg_catalog.encode(t.tgargs, 'escape'), E'\\\\', E'\\134'), E'\\000'))
               WITH ORDINALITY AS s(p, n)
         WHERE n OPERATOR(pg_catalog.<=) t.tgnargs
       ) d
 WHERE t.tgfoid OPERATOR(pg_catalog.=) 'outbox.capture_row()'::regprocedure
   AND t.tgparentid OPERATOR(pg_catalog.=) 0::oid
   AND t.tgname OPERATOR(pg_catalog.=) 'outbox_capture'::name;

GRANT SELECT ON outbox.captured TO PUBLIC;

-- pg_outbox: the inbox (outbox.inbox_claim), for consumers that are PostgreSQL databases too.
-- A consumer claims each message's id in the transaction that processes the message: the first
-- claim returns true, every later one false, so a redelivered message is recognised and skipped,
-- and what the transaction did is committed exactly once. The worker of the database removes
-- claims older than outbox.inbox_retention (src/worker/inbox.rs). Written with qualified names
-- only, so that it also serves, as it is, in an upgrade script.

-- One row per message a consumer has processed. claimed_at is when the claim was made (the
-- statement's clock, not the transaction's start: a claim is never older than it looks).
CREATE TABLE outbox.inbox (
    consumer   text        NOT NULL,
    message_id uuid        NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    CONSTRAINT inbox_pkey PRIMARY KEY (consumer, message_id)
);

COMMENT ON TABLE outbox.inbox IS
    'pg_outbox: messages consumers have claimed with outbox.inbox_claim; kept for outbox.inbox_retention';

-- The worker finds expired claims by this index, oldest first, a batch at a time.
CREATE INDEX inbox_claimed_at_idx ON outbox.inbox (claimed_at);

-- Claims are deleted oldest first, in small batches, all the time: vacuum sooner than the
-- default (a fifth of the table dead) so that new claims reuse the space of expired ones and
-- the table stays at about the size of what the retention keeps.
ALTER TABLE outbox.inbox SET (autovacuum_vacuum_scale_factor = 0.05);

-- Claims are data: a restored database must still recognise the messages it processed.
SELECT pg_catalog.pg_extension_config_dump('outbox.inbox', '');

REVOKE ALL ON outbox.inbox FROM PUBLIC;

-- True the first time `message_id` is claimed for `consumer` (the claim is part of the caller's
-- transaction), false if it was claimed before. A concurrent claim of the same id waits for the
-- first one's transaction: false if it commits, true if it rolls back. Bad input writes nothing:
-- NULL message_id 22004, NULL or empty consumer 22023, consumer over 255 bytes 22001. Runs as
-- the extension's owner: a caller needs only EXECUTE (see README, "Privileges").
CREATE FUNCTION outbox.inbox_claim(message_id uuid, consumer text DEFAULT 'default')
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF inbox_claim.message_id IS NULL THEN
        RAISE EXCEPTION 'outbox.inbox_claim: message_id must not be NULL'
            USING ERRCODE = '22004',
                  HINT = 'Pass the message_id property of the delivered message: pg_outbox sets it on every message.';
    END IF;
    IF inbox_claim.consumer IS NULL OR inbox_claim.consumer OPERATOR(pg_catalog.=) '' THEN
        RAISE EXCEPTION 'outbox.inbox_claim: consumer must not be NULL or empty'
            USING ERRCODE = '22023',
                  HINT = 'Name the consumer (1 to 255 bytes), or leave the argument out for ''default''.';
    END IF;
    IF pg_catalog.octet_length(inbox_claim.consumer) OPERATOR(pg_catalog.>) 255 THEN
        RAISE EXCEPTION 'outbox.inbox_claim: consumer is % bytes long, at most 255 are allowed',
                        pg_catalog.octet_length(inbox_claim.consumer)
            USING ERRCODE = '22001',
                  HINT = 'Use a shorter consumer name.';
    END IF;
    INSERT INTO outbox.inbox (consumer, message_id, claimed_at)
    VALUES (inbox_claim.consumer, inbox_claim.message_id, pg_catalog.clock_timestamp())
    ON CONFLICT ON CONSTRAINT inbox_pkey DO NOTHING;
    RETURN FOUND;
END
$$;

REVOKE EXECUTE ON FUNCTION outbox.inbox_claim(uuid, text) FROM PUBLIC;
