-- pg_outbox 0.1.0 -> 0.2.0
--
-- pg_dump now keeps the row-id sequences of the outbox and the dead letters: a restored
-- outbox gives new events ids above the restored ones, so per-aggregate order survives a
-- dump and restore.
--
-- outbox.wake_worker_at_commit() is no longer executable by everyone: any role calling it could
-- wake the worker at each of its commits.
--
-- (0.2.0 changes nothing else in the schema; the rest is in the library.)

SELECT pg_catalog.pg_extension_config_dump('outbox.messages_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('outbox.dead_letters_id_seq', '');
REVOKE EXECUTE ON FUNCTION outbox.wake_worker_at_commit() FROM PUBLIC;
