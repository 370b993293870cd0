-- pg_outbox 0.3.0 -> 0.4.0: exactly-once publishing into RabbitMQ streams. Adds objects only:
-- one nullable column (no table rewrite), two partial indexes, one table.

-- NULL until the worker assigns it; then the publishing id of this event, for good.
ALTER TABLE outbox.messages ADD COLUMN stream_seq bigint;

COMMENT ON COLUMN outbox.messages.stream_seq IS
    'pg_outbox: the publishing id of an event for a stream, assigned by the worker before its first send';

-- The stream events the worker has not given an id yet, by stream and in row order: each
-- stream's next events, and which streams have any, are read from here alone.
CREATE INDEX messages_stream_idx ON outbox.messages (exchange, id)
    WHERE exchange LIKE 'stream:%' AND stream_seq IS NULL;

-- The events that have an id, by stream and id: sent in this order, again after a reconnect.
CREATE INDEX messages_stream_seq_idx ON outbox.messages (exchange, stream_seq)
    WHERE stream_seq IS NOT NULL;

-- Per stream, the last publishing id the worker assigned. Never decreases: a new id is above
-- this and above what the broker has stored for the producer.
CREATE TABLE outbox.stream_producers (
    stream   text   PRIMARY KEY,
    last_seq bigint NOT NULL CHECK (last_seq >= 0)
);

COMMENT ON TABLE outbox.stream_producers IS
    'pg_outbox: per stream, the last publishing id the worker assigned (producer pg_outbox/<database>/<stream>)';

-- Data: a restored database must not hand out ids the broker has already seen.
SELECT pg_catalog.pg_extension_config_dump('outbox.stream_producers', '');

REVOKE ALL ON outbox.stream_producers FROM PUBLIC;
