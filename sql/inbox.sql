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
