-- pg_outbox: tables. Everything lives in the schema "outbox", which CREATE EXTENSION creates
-- (see pg_outbox.control).

-- CREATE EXTENSION uses a schema "outbox" that already exists, whoever owns it. A schema owned
-- by another role would let that role drop or replace what the worker, running as a superuser,
-- relies on: refuse it. (Written with qualified names and operators: this runs before we know
-- the schema holds nothing of anyone else's.)
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_namespace n
                 JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) n.nspowner
                WHERE n.nspname OPERATOR(pg_catalog.=) 'outbox'::pg_catalog.name
                  AND NOT r.rolsuper) THEN
        RAISE EXCEPTION 'schema "outbox" exists and is owned by a role that is not a superuser'
            USING ERRCODE = '42501',
                  HINT = 'pg_outbox installs into its own schema "outbox". Drop or rename that schema (or have a superuser own it) and run CREATE EXTENSION again.';
    END IF;
END
$$;

-- Events awaiting publication. A row is written by outbox.publish in the caller's transaction
-- and deleted by the worker once the broker has confirmed the message.
CREATE TABLE outbox.messages (
    -- Row order. Writers of one aggregate are serialized, so within an aggregate this is
    -- commit order. Keep the sequence's CACHE at 1.
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The AMQP message_id: stable across retries and replays, for consumer de-duplication.
    message_id      uuid        NOT NULL,
    event_type      text        NOT NULL,
    payload         jsonb       NOT NULL,
    aggregate_type  text,
    aggregate_id    text,
    headers         jsonb,
    -- NULL: the event type.
    routing_key     text,
    -- NULL: outbox.exchange at the time of publishing.
    exchange        text,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Failed attempts so far, when the next one is due, and why the last one failed.
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    last_error      text
);

COMMENT ON TABLE outbox.messages IS
    'pg_outbox: events awaiting publication (write with outbox.publish or CALL outbox.process_transaction)';

-- Only rows waiting for a retry are indexed here: empty in normal operation, so inserts of
-- new events (next_attempt_at NULL) never add to it. It answers "is an earlier event of this
-- aggregate waiting?" and, read whole, "when is the next retry due?".
CREATE INDEX messages_retrying_idx ON outbox.messages (aggregate_id, aggregate_type, id)
    WHERE next_attempt_at IS NOT NULL;

-- Events that failed outbox.max_attempts times (or can never be published), with their full
-- message. Replay them with outbox.replay_dead_letters once the cause is fixed.
CREATE TABLE outbox.dead_letters (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id       uuid        NOT NULL,
    event_type       text        NOT NULL,
    payload          jsonb       NOT NULL,
    aggregate_type   text,
    aggregate_id     text,
    headers          jsonb,
    routing_key      text,
    exchange         text,
    created_at       timestamptz NOT NULL,
    attempts         integer     NOT NULL,
    last_error       text,
    dead_lettered_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

COMMENT ON TABLE outbox.dead_letters IS
    'pg_outbox: events that could not be published; see outbox.replay_dead_letters and outbox.purge_dead_letters';

CREATE INDEX dead_letters_message_id_idx ON outbox.dead_letters (message_id);

-- pg_dump leaves an extension's table data out unless told otherwise: pending events and
-- dead letters are data, not configuration, and must survive a dump and restore.
SELECT pg_catalog.pg_extension_config_dump('outbox.messages', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.dead_letters', '');
-- Their row ids too: a restored outbox must give new events ids above the restored ones, or
-- a new event would be published before older events of its aggregate.
SELECT pg_catalog.pg_extension_config_dump('outbox.messages_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.dead_letters_id_seq', '');

REVOKE ALL ON outbox.messages, outbox.dead_letters FROM PUBLIC;
