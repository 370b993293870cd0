//! `#[pg_test]`s of the SQL surface, run by `cargo pgrx test` in a cluster without the worker
//! (each test is a transaction that is rolled back). Integration tests in tests/ cover the
//! worker, commits and the broker.

#[pgrx::pg_schema]
mod tests {
    use pgrx::pg_sys::panic::CaughtError;
    use pgrx::prelude::*;
    use pgrx::PgSqlErrorCode;
    use PgSqlErrorCode::*;

    /// Runs `sql` in a subtransaction, as a PL/pgSQL exception block would; returns the SQLSTATE
    /// it failed with, if it failed.
    fn sqlstate(sql: &str) -> Option<PgSqlErrorCode> {
        // SAFETY: a subtransaction begun and ended here, restoring the memory context and
        // resource owner it started in, as PL/pgSQL does for an exception block.
        unsafe {
            let cxt = pg_sys::CurrentMemoryContext;
            let owner = pg_sys::CurrentResourceOwner;
            pg_sys::BeginInternalSubTransaction(std::ptr::null());
            let failed = PgTryBuilder::new(|| {
                Spi::run(sql).expect("SPI");
                None
            })
            .catch_others(|e| match e {
                CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => Some(r.sql_error_code()),
                CaughtError::RustPanic { ereport, .. } => panic!("{}", ereport.message()),
            })
            .execute();
            if failed.is_none() {
                pg_sys::ReleaseCurrentSubTransaction();
            } else {
                pg_sys::RollbackAndReleaseCurrentSubTransaction();
            }
            pg_sys::MemoryContextSwitchTo(cxt);
            pg_sys::CurrentResourceOwner = owner;
            failed
        }
    }

    fn count(sql: &str) -> i64 {
        Spi::get_one::<i64>(sql).unwrap().unwrap()
    }

    fn pending() -> i64 {
        count("SELECT count(*) FROM outbox.messages")
    }

    #[pg_test]
    fn publish_writes_the_whole_event_and_returns_its_id() {
        let id = Spi::get_one::<pgrx::Uuid>(
            "SELECT outbox.publish('FundsTransferEvent', '{\"amount\": 100, \"from\": \"123\"}',
                                   aggregate_type => 'account', aggregate_id => '123',
                                   headers => '{\"tenant\": \"t1\"}', routing_key => 'funds.moved',
                                   exchange => 'bank')",
        )
        .unwrap()
        .unwrap();
        let row = Spi::get_two::<String, String>(&format!(
            "SELECT concat_ws('|', event_type, payload::text, aggregate_type, aggregate_id, headers::text,
                              routing_key, exchange, attempts, next_attempt_at IS NULL,
                              created_at BETWEEN now() AND clock_timestamp()),
                    message_id::text FROM outbox.messages WHERE message_id = '{id}'"
        ))
        .unwrap();
        assert_eq!(
            row.0.as_deref(),
            Some("FundsTransferEvent|{\"from\": \"123\", \"amount\": 100}|account|123|{\"tenant\": \"t1\"}|funds.moved|bank|0|t|t")
        );
        assert_eq!(row.1, Some(id.to_string()));
    }

    #[pg_test]
    fn message_ids_are_unique_and_time_ordered() {
        // Many within one millisecond: still in the order they were made.
        let ids: Vec<String> = (0..2000)
            .map(|_| {
                Spi::get_one::<pgrx::Uuid>("SELECT outbox.publish('E', '{}')").unwrap().unwrap().to_string()
            })
            .collect();
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, ids, "monotonic within a session");
        // UUIDv7: version nibble 7.
        assert!(ids.iter().all(|i| i.as_bytes()[14] == b'7'), "{ids:?}");
    }

    #[pg_test]
    fn process_transaction_takes_two_or_all_arguments() {
        Spi::run("CALL outbox.process_transaction('FundsTransferEvent', '{\"amount\": 100}')").unwrap();
        Spi::run(
            "CALL outbox.process_transaction('E', '[1,2]', aggregate_type => 'a', aggregate_id => '1',
                  headers => '{}', routing_key => 'rk', exchange => '')",
        )
        .unwrap();
        assert_eq!(pending(), 2);
        assert_eq!(
            count("SELECT count(*) FROM outbox.messages WHERE exchange = '' AND routing_key = 'rk'"),
            1
        );
    }

    #[pg_test]
    fn publish_joins_the_callers_transaction() {
        // A savepoint rolled back takes its events with it.
        // SAFETY: as in `sqlstate`.
        unsafe {
            let cxt = pg_sys::CurrentMemoryContext;
            let owner = pg_sys::CurrentResourceOwner;
            pg_sys::BeginInternalSubTransaction(std::ptr::null());
            Spi::run("SELECT outbox.publish('E', '{}')").unwrap();
            assert_eq!(pending(), 1);
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
            pg_sys::MemoryContextSwitchTo(cxt);
            pg_sys::CurrentResourceOwner = owner;
        }
        assert_eq!(pending(), 0);
    }

    #[pg_test]
    fn bad_input_fails_with_its_sqlstate_and_writes_nothing() {
        let long = "x".repeat(256);
        let cases: Vec<(String, PgSqlErrorCode)> = vec![
            ("SELECT outbox.publish(NULL, '{}')".into(), ERRCODE_NULL_VALUE_NOT_ALLOWED),
            ("SELECT outbox.publish('', '{}')".into(), ERRCODE_INVALID_PARAMETER_VALUE),
            (format!("SELECT outbox.publish('{long}', '{{}}')"), ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
            ("SELECT outbox.publish('E', NULL)".into(), ERRCODE_NULL_VALUE_NOT_ALLOWED),
            ("SELECT outbox.publish('E', '{')".into(), ERRCODE_INVALID_TEXT_REPRESENTATION),
            ("SELECT outbox.publish('E', '{}', headers => '[1]')".into(), ERRCODE_INVALID_PARAMETER_VALUE),
            ("SELECT outbox.publish('E', '{}', headers => '\"text\"')".into(), ERRCODE_INVALID_PARAMETER_VALUE),
            ("SELECT outbox.publish('E', '{}', headers => 'null')".into(), ERRCODE_INVALID_PARAMETER_VALUE),
            (format!("SELECT outbox.publish('E', '{{}}', headers => '{{\"{long}\": 1}}')"), ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
            ("SELECT outbox.publish('E', '{}', headers => '{\"n\": 1e400}')".into(), ERRCODE_INVALID_PARAMETER_VALUE),
            ("SELECT outbox.publish('E', '{}', headers => '{\"n\": 18446744073709551615}')".into(), ERRCODE_INVALID_PARAMETER_VALUE),
            (
                "SELECT outbox.publish('E', '{}', aggregate_id => '1', headers => '{\"aggregate_id\": \"2\"}')".into(),
                ERRCODE_INVALID_PARAMETER_VALUE,
            ),
            ("SELECT outbox.publish('E', '{}', aggregate_id => '')".into(), ERRCODE_INVALID_PARAMETER_VALUE),
            (format!("SELECT outbox.publish('E', '{{}}', routing_key => '{long}')"), ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
            (format!("SELECT outbox.publish('E', '{{}}', exchange => '{long}')"), ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
            (format!("CALL outbox.process_transaction('E', '{{}}', exchange => '{long}')"), ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
            ("CALL outbox.process_transaction(NULL, '{}')".into(), ERRCODE_NULL_VALUE_NOT_ALLOWED),
        ];
        for (sql, want) in cases {
            assert_eq!(sqlstate(&sql), Some(want), "{sql}");
            assert_eq!(pending(), 0, "{sql} wrote a row");
        }
        // 255 bytes is allowed, in characters of any width.
        let max = "é".repeat(127);
        assert_eq!(sqlstate(&format!("SELECT outbox.publish('E', '{{}}', routing_key => '{max}x')")), None);
    }

    #[pg_test]
    fn payload_size_limit_applies_to_the_json_text() {
        Spi::run("SET LOCAL outbox.max_payload_bytes = 100").unwrap();
        let fits = format!("{{\"k\": \"{}\"}}", "x".repeat(91));
        assert_eq!(fits.len(), 100);
        assert_eq!(sqlstate(&format!("SELECT outbox.publish('E', '{fits}')")), None);
        let over = format!("{{\"k\": \"{}\"}}", "x".repeat(92));
        assert_eq!(
            sqlstate(&format!("SELECT outbox.publish('E', '{over}')")),
            Some(ERRCODE_PROGRAM_LIMIT_EXCEEDED)
        );
        assert_eq!(pending(), 1);
        assert_eq!(sqlstate("SET LOCAL outbox.max_payload_bytes = 0"), Some(ERRCODE_INVALID_PARAMETER_VALUE));
        assert_eq!(
            sqlstate("SET LOCAL outbox.max_payload_bytes = '1GB'"),
            Some(ERRCODE_INVALID_PARAMETER_VALUE)
        );
    }

    #[pg_test]
    fn an_event_that_cannot_fit_in_one_frame_is_refused() {
        let big = "i".repeat(140_000);
        assert_eq!(
            sqlstate(&format!("SELECT outbox.publish('E', '{{}}', aggregate_id => '{big}')")),
            Some(ERRCODE_PROGRAM_LIMIT_EXCEEDED)
        );
        let headers = format!("{{\"blob\": \"{}\"}}", "h".repeat(140_000));
        assert_eq!(
            sqlstate(&format!("SELECT outbox.publish('E', '{{}}', headers => '{headers}')")),
            Some(ERRCODE_PROGRAM_LIMIT_EXCEEDED)
        );
        // The payload is not in the frame's way: it is split into as many as it needs.
        let payload = format!("{{\"blob\": \"{}\"}}", "p".repeat(500_000));
        assert_eq!(sqlstate(&format!("SELECT outbox.publish('E', '{payload}')")), None);
        assert_eq!(pending(), 1);
    }

    #[pg_test]
    fn worker_settings_cannot_be_changed_in_a_session() {
        for setting in ["outbox.batch_size = 10", "outbox.exchange = 'x'", "outbox.amqp_url = 'amqp://h'"] {
            assert_eq!(
                sqlstate(&format!("SET {setting}")),
                Some(ERRCODE_CANT_CHANGE_RUNTIME_PARAM),
                "{setting}"
            );
        }
        // The prefix is reserved: a typo is an error, not a silently ignored placeholder.
        assert_eq!(sqlstate("SET outbox.no_such_setting = 1"), Some(ERRCODE_INVALID_NAME));
    }

    #[pg_test]
    fn amqp_url_is_shown_without_its_password() {
        let shown = Spi::get_one::<String>("SHOW outbox.amqp_url").unwrap().unwrap();
        assert_eq!(shown, "amqp://guest@localhost:5672/%2F");
        assert_eq!(count("SELECT count(*) FROM pg_settings WHERE name = 'outbox.amqp_url'"), 0);
        assert!(count("SELECT count(*) FROM pg_settings WHERE name LIKE 'outbox.%'") >= 12);
    }

    #[pg_test]
    fn aggregate_events_take_an_advisory_lock_of_their_own() {
        Spi::run("SELECT outbox.publish('E', '{}', aggregate_type => 'account', aggregate_id => '1')")
            .unwrap();
        Spi::run("SELECT outbox.publish('E', '{}', aggregate_id => '2')").unwrap();
        Spi::run("SELECT outbox.publish('E', '{}')").unwrap();
        let locks = count(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 3
                AND pid = pg_backend_pid() AND mode = 'ExclusiveLock' AND granted",
        );
        assert_eq!(locks, 2);
        let buckets = count(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 4
                AND pid = pg_backend_pid() AND mode = 'ShareLock' AND granted",
        );
        assert!((1..=2).contains(&buckets), "{buckets}");
    }

    #[pg_test]
    fn a_transaction_writing_many_aggregates_takes_a_bounded_number_of_locks() {
        Spi::run(
            "SELECT outbox.publish('E', '{}', aggregate_type => 'a', aggregate_id => i::text)
               FROM generate_series(1, 20000) i",
        )
        .unwrap();
        assert_eq!(pending(), 20000);
        let locks =
            count("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()");
        assert!(locks <= 2 * 32 + 256, "{locks} locks");
        let exclusive_buckets = count(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 4
                AND pid = pg_backend_pid() AND mode = 'ExclusiveLock'",
        );
        assert!(exclusive_buckets > 200, "{exclusive_buckets}");
    }

    #[pg_test]
    fn stats_without_preloading() {
        Spi::run("SELECT outbox.publish('E', '{}')").unwrap();
        // `pending` is the statistics system's estimate, which learns of this transaction's
        // insert only after it ends; `exact_counts` counts.
        let row = Spi::get_three::<i64, String, bool>(
            "SELECT e.pending, s.worker_state, s.worker_pid IS NULL AND s.broker_connected IS NULL
               FROM outbox.stats s, outbox.exact_counts() e",
        )
        .unwrap();
        assert_eq!(row, (Some(1), Some("not preloaded".into()), Some(true)));
        assert!(!Spi::get_one::<bool>("SELECT outbox.worker_available()").unwrap().unwrap());
    }

    #[pg_test]
    fn ambient_headers_go_under_an_events_own() {
        Spi::run(r#"SET LOCAL outbox.headers = '{"traceparent": "00-ab-cd-01", "tenant": "acme"}'"#).unwrap();
        Spi::run(r#"SELECT outbox.publish('E', '{}', headers => '{"tenant": "own", "n": 1}')"#).unwrap();
        Spi::run("SELECT outbox.publish('E', '{}')").unwrap();
        Spi::run("RESET outbox.headers").unwrap();
        Spi::run("SELECT outbox.publish('E', '{}')").unwrap();
        let headers = |n: i64| {
            Spi::get_one::<String>(&format!(
                "SELECT headers::text FROM outbox.messages ORDER BY id OFFSET {n} LIMIT 1"
            ))
            .unwrap()
        };
        assert_eq!(headers(0).as_deref(), Some(r#"{"n": 1, "tenant": "own", "traceparent": "00-ab-cd-01"}"#));
        assert_eq!(headers(1).as_deref(), Some(r#"{"tenant": "acme", "traceparent": "00-ab-cd-01"}"#));
        assert_eq!(headers(2), None);
    }

    fn dead_letter(event_type: &str, aggregate_id: Option<&str>) -> i64 {
        let aggregate = aggregate_id.map(|a| format!("'{a}'")).unwrap_or("NULL".into());
        Spi::get_one::<i64>(&format!(
            "INSERT INTO outbox.dead_letters (message_id, event_type, payload, aggregate_id, created_at, attempts, last_error)
             VALUES (gen_random_uuid(), '{event_type}', '{{\"x\": 1}}', {aggregate}, now() - interval '1 hour', 10, 'unroutable')
             RETURNING id"
        ))
        .unwrap()
        .unwrap()
    }

    #[pg_test]
    fn dead_letters_can_be_listed_replayed_and_purged() {
        let a = dead_letter("A", Some("agg"));
        let b = dead_letter("B", None);
        let c = dead_letter("C", None);
        assert_eq!(count("SELECT count(*) FROM outbox.list_dead_letters()"), 3);
        assert_eq!(count("SELECT count(*) FROM outbox.list_dead_letters(event_type => 'B')"), 1);
        assert_eq!(count("SELECT count(*) FROM outbox.list_dead_letters(max_rows => 1)"), 1);

        let id_a = Spi::get_one::<String>(&format!(
            "SELECT message_id::text FROM outbox.dead_letters WHERE id = {a}"
        ))
        .unwrap();
        assert_eq!(count(&format!("SELECT outbox.replay_dead_letters(ARRAY[{a}])")), 1);
        let replayed =
            Spi::get_two::<String, i32>("SELECT message_id::text, attempts FROM outbox.messages").unwrap();
        assert_eq!(replayed, (id_a, Some(0)), "same message id, fresh attempts");
        assert_eq!(count("SELECT count(*) FROM outbox.dead_letters"), 2);

        assert_eq!(count(&format!("SELECT outbox.purge_dead_letters(ARRAY[{b}])")), 1);
        assert_eq!(count("SELECT outbox.purge_dead_letters(older_than => interval '1 day')"), 0);
        assert_eq!(count("SELECT outbox.replay_dead_letters()"), 1);
        assert_eq!(count(&format!("SELECT count(*) FROM outbox.messages m JOIN outbox.dead_letters d USING (message_id) WHERE d.id = {c}")), 0);
        assert_eq!(count("SELECT count(*) FROM outbox.dead_letters"), 0);
        assert_eq!(pending(), 2);
    }

    #[pg_test]
    fn callers_need_a_grant() {
        Spi::run("CREATE ROLE outbox_test_app").unwrap();
        Spi::run("CREATE ROLE outbox_test_other").unwrap();
        Spi::run("GRANT USAGE ON SCHEMA outbox TO outbox_test_app, outbox_test_other").unwrap();
        Spi::run("GRANT EXECUTE ON FUNCTION outbox.publish TO outbox_test_app").unwrap();
        Spi::run("GRANT EXECUTE ON PROCEDURE outbox.process_transaction TO outbox_test_app").unwrap();

        Spi::run("SET LOCAL ROLE outbox_test_app").unwrap();
        // EXECUTE is enough: no privilege on the table itself.
        assert_eq!(sqlstate("SELECT outbox.publish('E', '{}')"), None);
        assert_eq!(sqlstate("CALL outbox.process_transaction('E', '{}')"), None);
        assert_eq!(sqlstate("SELECT * FROM outbox.messages"), Some(ERRCODE_INSUFFICIENT_PRIVILEGE));
        assert_eq!(sqlstate("SELECT outbox.replay_dead_letters()"), Some(ERRCODE_INSUFFICIENT_PRIVILEGE));
        assert_eq!(sqlstate("SELECT outbox.purge_dead_letters()"), Some(ERRCODE_INSUFFICIENT_PRIVILEGE));
        assert_eq!(
            sqlstate("SELECT * FROM outbox.list_dead_letters()"),
            Some(ERRCODE_INSUFFICIENT_PRIVILEGE)
        );
        Spi::run("RESET ROLE").unwrap();

        Spi::run("SET LOCAL ROLE outbox_test_other").unwrap();
        assert_eq!(sqlstate("SELECT outbox.publish('E', '{}')"), Some(ERRCODE_INSUFFICIENT_PRIVILEGE));
        assert_eq!(
            sqlstate("CALL outbox.process_transaction('E', '{}')"),
            Some(ERRCODE_INSUFFICIENT_PRIVILEGE)
        );
        assert_eq!(sqlstate("SELECT pending FROM outbox.stats"), None);
        assert_eq!(sqlstate("SELECT outbox.wake_worker_at_commit()"), Some(ERRCODE_INSUFFICIENT_PRIVILEGE));
        Spi::run("RESET ROLE").unwrap();
        assert_eq!(pending(), 2);
    }
}
