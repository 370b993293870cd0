//! What reaches the broker is exactly what the database committed, durably, in order, in any
//! encoding, across re-created extensions and restored backups.

use pg_outbox_tests::*;
use postgres::Client;
use std::collections::HashSet;
use std::time::Duration;
use uuid::Uuid;

const WITHIN: Duration = Duration::from_secs(90);

fn ids(deliveries: &[Delivery]) -> HashSet<String> {
    deliveries.iter().filter_map(|d| d.message_id.clone()).collect()
}

#[test]
fn no_event_reaches_the_broker_before_its_transaction_is_durable() {
    let _alone = exclusive();
    // Asynchronous commits stay in WAL buffers for up to 10 s: a crash loses them.
    let cluster = Cluster::start(&[("wal_writer_delay", "'10s'"), ("wal_writer_flush_after", "'1GB'")]);
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    cluster.wait_for_worker();
    let mut db = cluster.client();
    db.batch_execute(load::LEDGER).unwrap();
    db.batch_execute("SET synchronous_commit = off").unwrap();
    let mut received = 0;
    for round in 0..3 {
        for n in 0..5 {
            let mut tx = db.transaction().unwrap();
            let id: Uuid = tx
                .query_one(
                    "SELECT outbox.publish('Async', jsonb_build_object('round', $1::int, 'n', $2::int), exchange => $3)",
                    &[&round, &n, &exchange.name],
                )
                .unwrap()
                .get(0);
            tx.execute("INSERT INTO ledger (message_id, aggregate) VALUES ($1, 'a')", &[&id]).unwrap();
            tx.commit().unwrap();
        }
        received += 5;
        consumer.wait_for(received, WITHIN);
        // The moment the consumer holds them: the server dies.
        cluster.crash();
        cluster.start_server();
        db = cluster.client();
        db.batch_execute("SET synchronous_commit = off").unwrap();
    }
    cluster.wait_drained(WITHIN);
    let verdict = verify(&cluster, &consumer.received(), &HashSet::new());
    println!("asynchronous commits, server crashed after each delivery: {verdict}");
    verdict.assert_clean();
    assert_eq!(verdict.committed, 15, "every delivered event's transaction survived the crash");
}

#[test]
fn with_wait_for_sync_standbys_events_wait_for_the_standby() {
    let _alone = exclusive();
    let primary = Cluster::start(&[("wal_level", "replica"), ("outbox.wait_for_sync_standbys", "on")]);
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    // The standby publishes nothing itself (it is a standby; and its broker is unreachable).
    let standby = Cluster::standby_of(&primary, &[("outbox.amqp_url", &unreachable_broker_url())]);
    primary.reconfigure(&[("synchronous_standby_names", "'*'")]);
    wait_until(WITHIN, "the standby to be synchronous", || {
        let n: i64 = primary
            .admin()
            .query_one("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'", &[])
            .ok()?
            .get(0);
        (n == 1).then_some(())
    });
    primary.wait_for_worker();
    let mut db = primary.client();
    // Writers that do not wait for the standby themselves.
    db.batch_execute("SET synchronous_commit = local").unwrap();
    let publish = |db: &mut Client, n: i32| -> String {
        db.query_one(
            "SELECT outbox.publish('Replicated', jsonb_build_object('n', $1::int), exchange => $2)::text",
            &[&n, &exchange.name],
        )
        .unwrap()
        .get(0)
    };
    let first = publish(&mut db, 1);
    assert_eq!(ids(&consumer.wait_for(1, WITHIN)), HashSet::from([first]));

    standby.stop();
    let second = publish(&mut db, 2);
    wait_until(WITHIN, "the worker to wait for the standby", || {
        let state: String =
            primary.client().query_one("SELECT worker_state FROM outbox.stats", &[]).ok()?.get(0);
        (state == "waiting for synchronous standbys").then_some(())
    });
    consumer.expect_no_more(1, Duration::from_secs(2));
    standby.start_server();
    let got = consumer.wait_for(2, WITHIN);
    assert_eq!(got[1].message_id.as_deref(), Some(second.as_str()));

    // Without the setting, the local flush is enough. (Changed while the standby is up: a
    // worker waiting for a standby applies a reload only once the wait is over.)
    primary.reconfigure(&[("outbox.wait_for_sync_standbys", "off")]);
    // No observable sign of the worker's reload: give it a few rounds.
    std::thread::sleep(Duration::from_millis(500));
    standby.stop();
    let third = publish(&mut db, 3);
    let got = consumer.wait_for(3, WITHIN);
    assert_eq!(got[2].message_id.as_deref(), Some(third.as_str()));
}

#[test]
fn a_latin1_database_publishes_utf8() {
    let cluster =
        Cluster::start_with_database(&[], "ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0");
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    let mut db = cluster.client();
    let by_publish: String = db
        .query_one(
            "SELECT outbox.publish('Café', '{\"name\": \"José Ñandú\"}', aggregate_type => 'Kunde',
                                   aggregate_id => 'Müller', headers => '{\"city\": \"Zürich\"}',
                                   routing_key => 'café.créé', exchange => $1)::text",
            &[&exchange.name],
        )
        .unwrap()
        .get(0);
    // Written around outbox.publish: the worker converts it too.
    db.execute(
        "INSERT INTO outbox.messages (message_id, event_type, payload, exchange) VALUES (gen_random_uuid(), 'Façade', '{\"ß\": \"ÿ\"}', $1)",
        &[&exchange.name],
    )
    .unwrap();
    let got = consumer.wait_for(2, WITHIN);
    let first = got.iter().find(|d| d.message_id.as_deref() == Some(by_publish.as_str())).unwrap();
    assert_eq!(first.message_type.as_deref(), Some("Café"));
    assert_eq!(first.routing_key, "café.créé");
    assert_eq!(first.body, "{\"name\": \"José Ñandú\"}".as_bytes(), "UTF-8 on the wire");
    assert_eq!(first.header("city"), Some("Zürich"));
    assert_eq!(first.header("aggregate_id"), Some("Müller"));
    let second = got.iter().find(|d| d.message_type.as_deref() == Some("Façade")).unwrap();
    assert_eq!(second.json(), serde_json::json!({"ß": "ÿ"}));
    cluster.wait_drained(WITHIN);
    // The length limits count UTF-8 bytes: 128 "é" are 128 bytes in LATIN1, 256 in UTF-8.
    let err = db.query_one("SELECT outbox.publish($1, '{}')", &[&"é".repeat(128)]).unwrap_err();
    assert_eq!(err.code(), Some(&postgres::error::SqlState::STRING_DATA_RIGHT_TRUNCATION), "{err}");
}

/// A cluster whose served database is SQL_ASCII: it takes bytes that are not UTF-8.
fn sql_ascii_cluster() -> Cluster {
    Cluster::start_with_database(&[], "ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
}

/// A row for `exchange` whose event type cannot be read as UTF-8, written around
/// `outbox.publish`: the worker dead-letters it at once.
fn insert_unreadable_row(db: &mut Client, exchange: &str) {
    db.execute(
        "INSERT INTO outbox.messages (message_id, event_type, payload, exchange)
         VALUES (gen_random_uuid(), convert_from('\\xff'::bytea, 'SQL_ASCII'), '{}', $1)",
        &[&exchange],
    )
    .unwrap();
}

/// Waits until `n` events are dead letters, each for an unreadable event type.
fn wait_for_unreadable_rows_dead_lettered(db: &mut Client, n: i64) {
    let unreadable: bool = wait_until(WITHIN, "the unreadable rows dead-lettered", || {
        let row = db
            .query_one(
                "SELECT count(*), bool_and(last_error LIKE 'invalid: event_type%') FROM outbox.dead_letters",
                &[],
            )
            .unwrap();
        (row.get::<_, i64>(0) == n).then(|| row.get(1))
    });
    assert!(unreadable, "every dead letter for its unreadable event type");
}

#[test]
fn an_sql_ascii_database_refuses_text_that_is_not_utf8_and_its_worker_goes_on() {
    let cluster = sql_ascii_cluster();
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    let mut db = cluster.client();
    let err = db
        .query_one(
            "SELECT outbox.publish(convert_from('\\xe9'::bytea, 'SQL_ASCII'), '{}', exchange => $1)",
            &[&exchange.name],
        )
        .unwrap_err();
    assert_eq!(err.code(), Some(&postgres::error::SqlState::CHARACTER_NOT_IN_REPERTOIRE), "{err}");
    // A row that cannot be read as UTF-8, written around outbox.publish, between good ones.
    db.execute("SELECT outbox.publish('Before', '{}', exchange => $1)", &[&exchange.name]).unwrap();
    insert_unreadable_row(&mut db, &exchange);
    db.execute("SELECT outbox.publish('After', '{}', exchange => $1)", &[&exchange.name]).unwrap();
    let got = consumer.wait_for(2, WITHIN);
    let types: Vec<_> = got.iter().filter_map(|d| d.message_type.clone()).collect();
    assert_eq!(types, vec!["Before", "After"]);
    wait_for_unreadable_rows_dead_lettered(&mut db, 1);
    cluster.wait_drained(WITHIN);
}

/// `DROP EXTENSION` locks the extension's relations one by one, in an order of its own. A round
/// that waited for one of them (the dead letters or their sequence, to record an event's last
/// failure) while holding the outbox's lock could close a deadlock with it. Here a session does
/// what such a `DROP` might, one of those first and the outbox next: the worker gives way at
/// once (55P03) and holds nothing, so the session's second lock is granted; once it is gone,
/// the event is dead-lettered.
#[test]
fn a_session_locking_the_dead_letters_then_the_outbox_never_deadlocks_with_the_worker() {
    let cluster = sql_ascii_cluster();
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    let worker = cluster.wait_for_worker();
    let mut db = cluster.client();
    let first_locks = [
        ("dead_letters", "LOCK TABLE outbox.dead_letters IN ACCESS EXCLUSIVE MODE"),
        // (LOCK TABLE takes no sequence; ALTER SEQUENCE locks it against nextval.)
        ("dead_letters_id_seq", "ALTER SEQUENCE outbox.dead_letters_id_seq CACHE 1"),
    ];
    for (n, (relation, lock)) in (1..).zip(first_locks) {
        let mut holder = cluster.client();
        let mut tx = holder.transaction().unwrap();
        tx.batch_execute(lock).unwrap();
        // A row that cannot be read as UTF-8 (its event is dead-lettered at once), and one that can.
        insert_unreadable_row(&mut db, &exchange);
        db.execute("SELECT outbox.publish('After', '{}', exchange => $1)", &[&exchange.name]).unwrap();
        let locked = format!("outbox.{relation} is locked");
        let error: String = wait_until(WITHIN, "the worker giving way to the lock", || {
            let row = cluster.client().query_one("SELECT last_error FROM outbox.stats", &[]).ok()?;
            row.get::<_, Option<String>>(0).filter(|e| e.contains(&locked))
        });
        assert!(error.contains("55P03"), "{error}");
        tx.batch_execute(
            "SET LOCAL lock_timeout = '60s'; LOCK TABLE outbox.messages IN ACCESS EXCLUSIVE MODE",
        )
        .unwrap_or_else(|e| panic!("the outbox's lock, after {relation}'s: {e}"));
        tx.rollback().unwrap();
        wait_for_unreadable_rows_dead_lettered(&mut db, n);
        cluster.wait_drained(WITHIN);
        let got = consumer.wait_for(n as usize, WITHIN);
        assert!(got.iter().all(|d| d.message_type.as_deref() == Some("After")), "{got:?}");
    }
    consumer.expect_no_more(2, Duration::from_secs(1));
    assert_eq!(cluster.worker_pid(), Some(worker), "the same worker throughout");
    let log = cluster.log();
    assert!(!log.contains("deadlock detected"), "{log}");
}

#[test]
fn recreating_the_extension_with_events_in_flight_loses_nothing() {
    let _alone = exclusive();
    let proxy = Proxy::start(5672);
    let cluster = Cluster::start(&[("outbox.amqp_url", &proxy.url()), ("outbox.confirm_timeout", "'5min'")]);
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    cluster.wait_for_worker();
    let mut db = cluster.client();
    let mut expected = HashSet::new();
    for round in 0..3 {
        // A backlog, partly handed over and unconfirmed: the broker's answers are held.
        proxy.stall(true);
        db.execute(
            "SELECT outbox.publish('Old', jsonb_build_object('n', n), exchange => $1) FROM generate_series(1, 3000) n",
            &[&exchange.name],
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let mut tx = db.transaction().unwrap();
        tx.batch_execute("DROP EXTENSION pg_outbox; CREATE EXTENSION pg_outbox").unwrap();
        let new: Vec<String> = tx
            .query(
                "SELECT outbox.publish('New', jsonb_build_object('round', $2::int, 'n', n), exchange => $1)::text
                   FROM generate_series(1, 300) n",
                &[&exchange.name, &round],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        tx.commit().unwrap();
        expected.extend(new);
        // The old table's confirms arrive now: they must not touch the new table's rows.
        proxy.stall(false);
        wait_until(Duration::from_secs(30), "the new events (well before the 60 s rescan)", || {
            ids(&consumer.received()).is_superset(&expected).then_some(())
        });
        cluster.wait_drained(WITHIN);
    }
    let dead: i64 = db.query_one("SELECT count(*) FROM outbox.dead_letters", &[]).unwrap().get(0);
    assert_eq!(dead, 0);
}

#[test]
fn a_dump_and_restore_keeps_the_outbox_whole_and_ordered() {
    let _alone = exclusive();
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    // Events pending (the broker is out of reach), and a dead letter.
    let source = Cluster::start(&[("outbox.amqp_url", &unreachable_broker_url())]);
    let mut db = source.client();
    db.execute(
        "SELECT outbox.publish('Restored', jsonb_build_object('n', n), aggregate_id => 'acc-' || (n % 3), exchange => $1)
           FROM generate_series(1, 30) n",
        &[&exchange.name],
    )
    .unwrap();
    db.batch_execute(
        "INSERT INTO outbox.dead_letters (message_id, event_type, payload, created_at, attempts, last_error)
         VALUES (gen_random_uuid(), 'Dead', '{}', now(), 10, 'unroutable')",
    )
    .unwrap();
    let dump = source.dir.join("app.dump");
    let out = cluster::pg_command("pg_dump")
        .args(["-h", "127.0.0.1", "-p", &source.port.to_string(), "-U", "postgres", "-Fc", "-f"])
        .arg(&dump)
        .arg(DB)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let max_id: i64 = db.query_one("SELECT max(id) FROM outbox.messages", &[]).unwrap().get(0);
    drop(db);

    let target = Cluster::init(&[]);
    target.start_server();
    target.admin().batch_execute(&format!("CREATE DATABASE {DB}")).unwrap();
    let consumer = broker.consume(&exchange, "#");
    let out = cluster::pg_command("pg_restore")
        .args(["-h", "127.0.0.1", "-p", &target.port.to_string(), "-U", "postgres", "-d", DB])
        .arg(&dump)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut db = target.client();
    let (id, message_id): (i64, Uuid) = {
        let mid: Uuid = db
            .query_one(
                "SELECT outbox.publish('After', '{}', aggregate_id => 'acc-1', exchange => $1)",
                &[&exchange.name],
            )
            .unwrap()
            .get(0);
        let row = db.query_opt("SELECT id FROM outbox.messages WHERE message_id = $1", &[&mid]).unwrap();
        (row.map(|r| r.get(0)).unwrap_or(i64::MAX), mid)
    };
    assert!(id > max_id, "a new event after a restore gets an id above the restored ones: {id} <= {max_id}");
    let dead_id: i64 = db
        .query_one(
            "INSERT INTO outbox.dead_letters (message_id, event_type, payload, created_at, attempts)
             VALUES (gen_random_uuid(), 'Dead2', '{}', now(), 1) RETURNING id",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(dead_id > 1, "the dead letters' ids continue too");
    let got = consumer.wait_for(31, WITHIN);
    let acc1: Vec<String> = got
        .iter()
        .filter(|d| d.header("aggregate_id") == Some("acc-1"))
        .map(|d| d.message_type.clone().unwrap_or_default())
        .collect();
    assert_eq!(acc1.last().map(String::as_str), Some("After"), "{acc1:?}");
    assert_eq!(acc1.len(), 11);
    assert!(ids(&got).contains(&message_id.to_string()));
}

#[test]
fn a_locked_or_parked_row_delays_the_worker_only_while_it_is_so() {
    let _alone = exclusive();
    let cluster = Cluster::start(&[]);
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    let worker = cluster.wait_for_worker();
    let mut db = cluster.client();
    let publish = |db: &mut Client, event_type: &str| -> String {
        db.query_one("SELECT outbox.publish($1, '{}', exchange => $2)::text", &[&event_type, &exchange.name])
            .unwrap()
            .get(0)
    };
    // An operator parks a row (its next attempt at infinity): it waits, nothing else does.
    cluster.cut_off_broker();
    let parked = publish(&mut db, "Parked");
    db.batch_execute("UPDATE outbox.messages SET next_attempt_at = 'infinity'").unwrap();
    publish(&mut db, "Flowing");
    cluster.reconnect_broker();
    consumer.wait_for(1, WITHIN);
    consumer.expect_no_more(1, Duration::from_secs(1));
    assert_ne!(consumer.received()[0].message_id.as_deref(), Some(parked.as_str()));
    db.batch_execute("DELETE FROM outbox.messages").unwrap();

    // A session holds a row lock on an event the broker then confirms: the worker's delete
    // waits for its lock_timeout, the round fails and is retried, until the lock goes.
    cluster.cut_off_broker();
    let locked = publish(&mut db, "Locked");
    let mut holder = cluster.client();
    let mut tx = holder.transaction().unwrap();
    tx.execute("SELECT 1 FROM outbox.messages WHERE message_id = $1::text::uuid FOR UPDATE", &[&locked])
        .unwrap();
    cluster.reconnect_broker();
    let error: String = wait_until(WITHIN, "the worker's lock timeout", || {
        let row =
            cluster.client().query_one("SELECT worker_state, last_error FROM outbox.stats", &[]).ok()?;
        let (state, error): (String, Option<String>) = (row.get(0), row.get(1));
        (state == "database error").then_some(error.unwrap_or_default())
    });
    assert!(error.contains("55P03"), "{error}");
    assert!(ids(&consumer.received()).contains(&locked));
    tx.rollback().unwrap();
    cluster.wait_drained(WITHIN);
    assert_eq!(cluster.worker_pid(), Some(worker), "the same worker throughout");
}
