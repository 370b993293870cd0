//! Exactly once into a RabbitMQ stream: the worker publishes an event for `stream:<name>` into
//! the stream `<name>` with a publishing id it recorded before the first send, so the broker
//! drops every re-send. Each test reads its stream whole, from the first offset, over AMQP
//! 0-9-1. Tests run one at a time: some stop the shared broker or crash the server.

use pg_outbox_tests::*;
use postgres::error::SqlState;
use std::time::Duration;
use uuid::Uuid;

const WITHIN: Duration = Duration::from_secs(120);
/// How long a reader must get nothing new before its stream (or queue) counts as read whole.
const QUIET: Duration = Duration::from_secs(2);

/// A cluster whose worker publishes to streams on the machine's RabbitMQ.
fn stream_cluster(settings: &[(&str, &str)]) -> Cluster {
    let mut all = vec![("outbox.stream_url", STREAM_URL), ("outbox.reconnect_backoff_max", "'500ms'")];
    all.extend_from_slice(settings);
    Cluster::start(&all)
}

fn publish(db: &mut impl postgres::GenericClient, event_type: &str, exchange: &str) -> Uuid {
    db.query_one("SELECT outbox.publish($1, '{}', exchange => $2)", &[&event_type, &exchange]).unwrap().get(0)
}

/// `outbox.stats`: failed attempts so far and the last error.
fn failures(cluster: &Cluster) -> (i64, Option<String>) {
    let row = cluster
        .client()
        .query_one("SELECT failed_attempts_total, last_error FROM outbox.stats", &[])
        .unwrap();
    (row.get(0), row.get(1))
}

fn id_of(d: &Delivery) -> Uuid {
    d.message_id.as_deref().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("message id of {d:?}"))
}

#[test]
fn the_stream_reader_sees_everything_stored_duplicates_included() {
    let _alone = exclusive();
    let broker = Broker::connect();
    let stream = broker.own_stream();
    for id in ["a", "b", "a"] {
        broker.send_to_queue(&stream, id, b"{}");
    }
    // Two readers, one after the other: reading a stream does not take messages out of it.
    for _ in 0..2 {
        let reader = broker.consume_stream(&stream);
        let got = reader.settle(2, WITHIN, QUIET);
        let ids: Vec<_> = got.iter().map(|d| d.message_id.as_deref().unwrap()).collect();
        assert_eq!(ids, ["a", "b", "a"]);
        assert_eq!(dedup(&got).1, 1, "the repeated id is a duplicate");
    }
}

#[test]
fn events_reach_the_stream_with_the_contract() {
    let _alone = exclusive();
    let broker = Broker::connect();
    let stream = broker.own_stream();
    let exchange = stream_exchange(&stream);
    // Events that name no exchange go to outbox.exchange: here the same stream.
    let cluster = stream_cluster(&[("outbox.exchange", &format!("'{exchange}'"))]);
    cluster.wait_for_worker();
    let mut db = cluster.client();

    let mut tx = db.transaction().unwrap();
    let placed: Uuid = tx
        .query_one(
            "SELECT outbox.publish('OrderPlaced', '{\"order\": 1, \"total\": 9.5}',
                                   aggregate_type => 'order', aggregate_id => 'o-1',
                                   headers => '{\"tenant\": \"t1\", \"attempt\": 3, \"urgent\": true,
                                                \"meta\": {\"k\": \"v\", \"n\": [1, 2]}}',
                                   exchange => $1)",
            &[&exchange],
        )
        .unwrap()
        .get(0);
    let paid: Uuid = tx
        .query_one(
            "SELECT outbox.publish('OrderPaid', '[1, 2]', aggregate_type => 'order', aggregate_id => 'o-1',
                                   exchange => $1)",
            &[&exchange],
        )
        .unwrap()
        .get(0);
    tx.commit().unwrap();
    let by_default: Uuid =
        db.query_one("SELECT outbox.publish('DefaultRouted', '{\"d\": true}')", &[]).unwrap().get(0);
    let mut tx = db.transaction().unwrap();
    let rolled_back = publish(&mut tx, "RolledBack", &exchange);
    tx.rollback().unwrap();

    cluster.wait_drained(WITHIN);
    // The worker's deduplicating producer, as the broker lists it while connected.
    let producer = producer_name(DB, &stream);
    wait_until(Duration::from_secs(30), "the broker to list the worker's producer", || {
        stream_publishers(&stream).contains(&producer).then_some(())
    });
    let reader = broker.consume_stream(&stream);
    let got = reader.settle(3, WITHIN, QUIET);
    let ids: Vec<Uuid> = got.iter().map(id_of).collect();
    assert_eq!(ids.len(), 3, "each event once, nothing else: {got:?}");
    assert!(!ids.contains(&rolled_back));
    let at = |id: Uuid| ids.iter().position(|i| *i == id).unwrap_or_else(|| panic!("{id} not in {ids:?}"));
    assert!(at(placed) < at(paid), "commit order within the aggregate");

    let first = &got[at(placed)];
    assert_eq!(first.json(), serde_json::json!({"order": 1, "total": 9.5}));
    assert_eq!(String::from_utf8_lossy(&first.body), r#"{"order": 1, "total": 9.5}"#, "jsonb's text");
    assert_eq!(first.content_type.as_deref(), Some("application/json"));
    assert_eq!(first.header("aggregate_type"), Some("order"));
    assert_eq!(first.header("aggregate_id"), Some("o-1"));
    assert_eq!(first.header("event_type"), Some("OrderPlaced"));
    assert_eq!(first.header("app_id"), Some("pg_outbox"));
    assert_eq!(first.header("tenant"), Some("t1"));
    assert_eq!(first.header("attempt"), Some("3"));
    assert_eq!(first.header("urgent"), Some("true"));
    let meta: serde_json::Value = serde_json::from_str(first.header("meta").expect("meta header")).unwrap();
    assert_eq!(meta, serde_json::json!({"k": "v", "n": [1, 2]}), "a nested header is its JSON text");

    let second = &got[at(paid)];
    assert_eq!(second.json(), serde_json::json!([1, 2]));
    assert_eq!(second.header("event_type"), Some("OrderPaid"));
    assert_eq!(second.header("aggregate_id"), Some("o-1"));
    assert_eq!(second.header("tenant"), None, "headers are the event's own");

    let default = &got[at(by_default)];
    assert_eq!(default.json(), serde_json::json!({"d": true}));
    assert_eq!(default.header("event_type"), Some("DefaultRouted"));
    assert_eq!(default.header("aggregate_id"), None);

    let dead: i64 = db.query_one("SELECT count(*) FROM outbox.dead_letters", &[]).unwrap().get(0);
    assert_eq!(dead, 0);
}

/// Where a load goes: a stream, or an exchange with a durable queue bound to all of it.
enum Destination {
    Stream(OwnStream),
    Amqp { exchange: String, queue: String },
}

impl Destination {
    fn exchange(&self) -> String {
        match self {
            Destination::Stream(stream) => stream_exchange(stream),
            Destination::Amqp { exchange, .. } => exchange.clone(),
        }
    }

    /// Everything the destination holds, from the first message on.
    fn read(&self, broker: &Broker) -> Consumer {
        match self {
            Destination::Stream(stream) => broker.consume_stream(stream),
            Destination::Amqp { exchange, queue } => broker.consume_queue(queue, exchange),
        }
    }
}

/// Waits until the load committed `rows` more events than now, and the worker published the
/// last of them (it left the outbox): both sides work again after a fault.
fn progress(cluster: &Cluster, rows: i64) {
    let mut db = cluster.client();
    let since: i64 = db.query_one("SELECT coalesce(max(seq), 0) FROM ledger", &[]).unwrap().get(0);
    let id: Uuid = wait_until(WITHIN, "the load to commit events", || {
        db.query_opt("SELECT message_id FROM ledger WHERE seq >= $1 ORDER BY seq LIMIT 1", &[&(since + rows)])
            .ok()
            .flatten()
            .map(|r| r.get(0))
    });
    wait_until(WITHIN, "the worker to publish them", || {
        let left: i64 =
            db.query_one("SELECT count(*) FROM outbox.messages WHERE message_id = $1", &[&id]).ok()?.get(0);
        (left == 0).then_some(())
    });
}

/// Waits until the load committed `rows` more events (the worker may not publish them).
fn progress_of_the_load_alone(cluster: &Cluster, rows: i64) {
    let mut db = cluster.client();
    let since: i64 = db.query_one("SELECT coalesce(max(seq), 0) FROM ledger", &[]).unwrap().get(0);
    wait_until(WITHIN, "the load to commit events", || {
        let now: i64 = db.query_one("SELECT coalesce(max(seq), 0) FROM ledger", &[]).ok()?.get(0);
        (now >= since + rows).then_some(())
    });
}

/// Stops the server without a checkpoint, starts it again, waits for a worker.
fn crash_and_restart(cluster: &Cluster) {
    cluster.crash();
    cluster.start_server();
    cluster.wait_for_worker();
}

/// Commits `n` events for `exchange` in one transaction, recorded in the ledger like the load's.
fn backlog(cluster: &Cluster, exchange: &str, n: i32) {
    cluster
        .client()
        .execute(
            "INSERT INTO ledger (message_id, aggregate)
             SELECT outbox.publish('Backlog', jsonb_build_object('n', n), aggregate_type => 'load',
                                   aggregate_id => a, exchange => $1), a
               FROM (SELECT n, 'backlog-' || n % 20 AS a FROM generate_series(1, $2) n) s",
            &[&exchange, &n],
        )
        .unwrap();
}

/// The fault schedule both paths go through, under a load of concurrent writers (several
/// aggregates, every tenth transaction rolled back): twice the broker restarted, the worker
/// terminated, the worker killed (SIGKILL) and the server crashed, with the load going on in
/// between; then the server crashed while a backlog of 20,000 events is half drained. Then
/// everything the destination holds is judged against the ledger. Prints and returns the
/// verdict and the number of deliveries.
fn load_under_faults(destination: &Destination, label: &str) -> (Verdict, usize) {
    let cluster = stream_cluster(&[]);
    cluster.wait_for_worker();
    let exchange = destination.exchange();
    // Four writers, about 100 transactions a second in all: the worker keeps up between faults.
    let load =
        Load::start(&cluster, LoadSpec { pause: Duration::from_millis(30), ..LoadSpec::new(&exchange) });
    progress(&cluster, 300);
    if let Destination::Stream(stream) = destination {
        let producer = producer_name(DB, stream);
        wait_until(WITHIN, "the broker to list the worker's producer", || {
            stream_publishers(stream).contains(&producer).then_some(())
        });
    }
    for _ in 0..2 {
        let outage = BrokerOutage::begin();
        progress_of_the_load_alone(&cluster, 300);
        outage.end();
        wait_for_stream_port(WITHIN);
        progress(&cluster, 300);

        let pid = cluster.wait_for_worker();
        cluster.admin().query_one("SELECT pg_terminate_backend($1)", &[&pid]).unwrap();
        wait_until(WITHIN, "a new worker", || cluster.worker_pid().filter(|p| *p != pid));
        progress(&cluster, 300);

        let pid = cluster.wait_for_worker();
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait_until(WITHIN, "a worker after crash recovery", || cluster.worker_pid().filter(|p| *p != pid));
        progress(&cluster, 300);

        crash_and_restart(&cluster);
        progress(&cluster, 300);
    }
    let events = 20_000;
    backlog(&cluster, &exchange, events);
    wait_until(WITHIN, "half the backlog to drain", || {
        (cluster.pending() <= i64::from(events / 2)).then_some(())
    });
    crash_and_restart(&cluster);
    progress(&cluster, 300);
    let rolled_back = load.stop();

    cluster.wait_drained(WITHIN);
    let committed: i64 = cluster.client().query_one("SELECT count(*) FROM ledger", &[]).unwrap().get(0);
    let broker = Broker::connect();
    let reader = destination.read(&broker);
    let got = reader.settle(committed as usize, WITHIN * 2, QUIET);
    let verdict = verify(&cluster, &got, &rolled_back);
    eprintln!(
        "{label}: committed {}, delivered {}, duplicates {}, lost {}",
        verdict.committed,
        got.len(),
        verdict.duplicates,
        verdict.lost
    );
    eprintln!("{label}: {verdict}; {} rolled back", rolled_back.len());
    verdict.assert_clean();
    assert_eq!(got.len(), verdict.received_unique + verdict.duplicates, "{verdict}");
    (verdict, got.len())
}

#[test]
fn exactly_once_under_faults() {
    let _alone = exclusive();
    let destination = Destination::Stream(Broker::connect().own_stream());
    let (verdict, delivered) = load_under_faults(&destination, "stream path");
    assert_eq!(verdict.duplicates, 0, "{verdict}");
    assert_eq!(delivered, verdict.committed, "{verdict}");
}

#[test]
fn amqp_path_duplicates_for_contrast() {
    let _alone = exclusive();
    let broker = Broker::connect();
    let exchange = unique("ex");
    broker.exchange(&exchange);
    let queue = broker.queue(&exchange, "#");
    drop(broker);
    let destination = Destination::Amqp { exchange: exchange.clone(), queue: queue.clone() };
    // At least once: duplicates are allowed here, and reported (how many depends on timing).
    load_under_faults(&destination, "amqp path");
    let broker = Broker::connect();
    broker.delete_queue(&queue);
    broker.delete_exchange(&exchange);
}

/// A stream cluster, the broker and a stream of the test's own.
fn cluster_and_stream() -> (Cluster, Broker, OwnStream) {
    let cluster = stream_cluster(&[]);
    let broker = Broker::connect();
    let stream = broker.own_stream();
    (cluster, broker, stream)
}

/// After a crash, the events that already had ids are sent again though no new event comes,
/// and those the broker has are confirmed without being stored twice.
#[test]
fn events_that_had_ids_before_a_crash_are_sent_again_and_stored_once() {
    let _alone = exclusive();
    let (cluster, broker, stream) = cluster_and_stream();
    let exchange = stream_exchange(&stream);
    let mut db = cluster.client();
    let mut ids: Vec<Uuid> = (0..3).map(|_| publish(&mut db, "First", &exchange)).collect();
    cluster.wait_drained(WITHIN);
    // As if the worker had died after those three were confirmed but before their rows were
    // deleted, having given a fourth event its id without sending it.
    let last: i64 = db
        .query_one("SELECT last_seq FROM outbox.stream_producers WHERE stream = $1", &[&&*stream])
        .unwrap()
        .get(0);
    let fourth: Uuid = db.query_one("SELECT gen_random_uuid()", &[]).unwrap().get(0);
    for (i, id) in ids.iter().chain([&fourth]).enumerate() {
        db.execute(
            "INSERT INTO outbox.messages (message_id, event_type, payload, exchange, stream_seq)
             VALUES ($1, 'First', '{}', $2, $3)",
            &[id, &exchange, &(last - 2 + i as i64)],
        )
        .unwrap();
    }
    db.execute(
        "UPDATE outbox.stream_producers SET last_seq = $2 WHERE stream = $1",
        &[&&*stream, &(last + 1)],
    )
    .unwrap();
    cluster.crash();
    cluster.start_server();
    ids.push(fourth);
    cluster.wait_drained(WITHIN);
    let got = broker.consume_stream(&stream).settle(4, WITHIN, QUIET);
    assert_eq!(got.iter().map(id_of).collect::<Vec<_>>(), ids, "each once, in order");
}

/// One event per transaction, each waking the worker: many rounds, each giving ids and
/// flushing the WAL (once, that flush asked for a position past the WAL written, at a page
/// boundary, and the round failed). Every event arrives once, and the worker never fails.
#[test]
fn one_event_per_transaction_arrives_once_and_the_worker_never_fails() {
    let _alone = exclusive();
    let (cluster, broker, stream) = cluster_and_stream();
    let exchange = stream_exchange(&stream);
    let mut db = cluster.client();
    let ids: Vec<Uuid> = (0..1500).map(|_| publish(&mut db, "Single", &exchange)).collect();
    cluster.wait_drained(WITHIN);
    let got = broker.consume_stream(&stream).settle(ids.len(), WITHIN, QUIET);
    assert_eq!(got.iter().map(id_of).collect::<Vec<_>>(), ids, "each once, in order");
    let log = cluster.log();
    assert!(!log.contains("internal error in the worker"), "{log}");
}

/// A session that locks the producers' positions and then the outbox, as `DROP EXTENSION` may:
/// the stream path gives way at once (55P03) instead of waiting for the first lock while it
/// holds the outbox's, so the session's second lock is granted; once it is gone, the event is
/// stored once.
#[test]
fn a_session_locking_the_producers_then_the_outbox_never_deadlocks_with_the_worker() {
    let _alone = exclusive();
    let (cluster, broker, stream) = cluster_and_stream();
    let exchange = stream_exchange(&stream);
    let worker = cluster.wait_for_worker();
    let mut holder = cluster.client();
    let mut tx = holder.transaction().unwrap();
    tx.batch_execute("LOCK TABLE outbox.stream_producers IN ACCESS EXCLUSIVE MODE").unwrap();
    let id = publish(&mut cluster.client(), "Waiting", &exchange);
    let error = wait_until(WITHIN, "the stream path giving way to the lock", || {
        failures(&cluster).1.filter(|e| e.contains("outbox.stream_producers is locked"))
    });
    assert!(error.contains("55P03"), "{error}");
    tx.batch_execute("SET LOCAL lock_timeout = '60s'; LOCK TABLE outbox.messages IN ACCESS EXCLUSIVE MODE")
        .unwrap_or_else(|e| panic!("the outbox's lock, after the producers': {e}"));
    tx.rollback().unwrap();
    cluster.wait_drained(WITHIN);
    let got = broker.consume_stream(&stream).settle(1, WITHIN, QUIET);
    assert_eq!(got.iter().map(id_of).collect::<Vec<_>>(), [id], "exactly once");
    assert_eq!(cluster.worker_pid(), Some(worker), "the same worker throughout");
    let log = cluster.log();
    assert!(!log.contains("deadlock detected"), "{log}");
    // One line while it lasted, however many rounds gave way (the AMQP path's rounds went on).
    assert_eq!(log.matches("the stream path's database step failed").count(), 1, "{log}");
    assert_eq!(log.matches("the stream path's database step succeeds again").count(), 1, "{log}");
}

#[test]
fn a_missing_stream_waits_and_recovers() {
    let _alone = exclusive();
    let absent = unique("stream");
    let cluster = stream_cluster(&quick_retries("2"));
    cluster.wait_for_worker();
    let id = publish(&mut cluster.client(), "Waiting", &stream_exchange(&absent));

    // More failed attempts than outbox.max_attempts: a missing stream is an outage, not a
    // fault of the event.
    let (_, error) = wait_until(WITHIN, "failed attempts naming the stream", || {
        Some(failures(&cluster)).filter(|(n, e)| *n >= 4 && e.as_deref().is_some_and(|e| e.contains(&absent)))
    });
    let exact =
        cluster.client().query_one("SELECT pending, dead_letters FROM outbox.exact_counts()", &[]).unwrap();
    assert_eq!((exact.get::<_, i64>(0), exact.get::<_, i64>(1)), (1, 0), "still waiting: {error:?}");

    let broker = Broker::connect();
    broker.declare_stream(&absent);
    let stream = OwnStream { name: absent };
    cluster.wait_drained(WITHIN);
    let got = broker.consume_stream(&stream).settle(1, WITHIN, QUIET);
    assert_eq!(got.iter().map(id_of).collect::<Vec<_>>(), [id], "exactly once");
    let dead: i64 =
        cluster.client().query_one("SELECT count(*) FROM outbox.dead_letters", &[]).unwrap().get(0);
    assert_eq!(dead, 0);
}

#[test]
fn no_credential_in_errors() {
    let _alone = exclusive();
    let url = format!("'rabbitmq-stream://guest:s3cretpw@127.0.0.1:{}/%2F'", cluster::free_port());
    let cluster = Cluster::start(&[("outbox.stream_url", &url), ("outbox.reconnect_backoff_max", "'500ms'")]);
    cluster.wait_for_worker();
    publish(&mut cluster.client(), "Unsent", &stream_exchange(&unique("stream")));
    let (_, error) = wait_until(WITHIN, "failed connection attempts", || {
        Some(failures(&cluster)).filter(|(n, e)| *n >= 3 && e.is_some())
    });
    let status: String = cluster
        .client()
        .query_one("SELECT coalesce(last_error, '') || ' ' || worker_state FROM outbox.stats", &[])
        .unwrap()
        .get(0);
    assert!(!status.contains("s3cretpw"), "the password is in outbox.stats: {status}");
    let log = cluster.log();
    assert!(!log.contains("s3cretpw"), "the password is in the server log:\n{log}");
    let error = error.unwrap();
    assert!(log.contains(&error), "the failure is logged: {error}\n{log}");
    assert_eq!(cluster.pending(), 1, "the event waits: {error}");
}

#[test]
fn bad_stream_url_is_refused_when_set() {
    let cluster = Cluster::start(&[]);
    let mut admin = cluster.admin();
    for bad in ["http://x", "rabbitmq-stream+tls://h"] {
        let err = admin.batch_execute(&format!("ALTER SYSTEM SET outbox.stream_url = '{bad}'")).unwrap_err();
        assert_eq!(err.code(), Some(&SqlState::INVALID_PARAMETER_VALUE), "{bad}: {err}");
    }
    // A good one is taken (so the refusals above are about the values).
    admin.batch_execute(&format!("ALTER SYSTEM SET outbox.stream_url = {STREAM_URL}")).unwrap();
    admin.batch_execute("ALTER SYSTEM RESET outbox.stream_url").unwrap();
}

/// In a LATIN1 database a stream's name is stored in LATIN1 but the broker knows it in UTF-8:
/// the worker converts it both ways (finding its events, giving ids, recovering its producer
/// after a restart), so a name outside ASCII works like any other.
#[test]
fn a_latin1_database_publishes_to_a_stream_named_outside_ascii() {
    let _alone = exclusive();
    let cluster = Cluster::start_with_database(
        &[("outbox.stream_url", STREAM_URL), ("outbox.reconnect_backoff_max", "'500ms'")],
        "ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
    );
    let broker = Broker::connect();
    let stream = OwnStream { name: unique("café-stream") };
    broker.declare_stream(&stream);
    let exchange = stream_exchange(&stream);
    let mut db = cluster.client();
    let mut ids = vec![publish(&mut db, "Première", &exchange)];
    // Written around outbox.publish: found and converted by the worker too.
    ids.push(
        db.query_one(
            "INSERT INTO outbox.messages (message_id, event_type, payload, exchange)
             VALUES (gen_random_uuid(), 'Façade', '{\"ß\": \"ÿ\"}', $1) RETURNING message_id",
            &[&exchange],
        )
        .unwrap()
        .get(0),
    );
    cluster.wait_drained(WITHIN);
    let producer = producer_name(DB, &stream);
    wait_until(Duration::from_secs(30), "the broker to list the worker's producer", || {
        stream_publishers(&stream).contains(&producer).then_some(())
    });
    // After a restart the producer is recovered under the same name, and its ids go on.
    cluster.restart();
    ids.push(publish(&mut cluster.client(), "Après", &exchange));
    cluster.wait_drained(WITHIN);
    let got = broker.consume_stream(&stream).settle(3, WITHIN, QUIET);
    assert_eq!(got.iter().map(id_of).collect::<Vec<_>>(), ids, "each once, in order");
    assert_eq!(got[1].header("event_type"), Some("Façade"));
    assert_eq!(got[1].json(), serde_json::json!({"ß": "ÿ"}));
    let producers: Vec<String> = cluster
        .client()
        .query("SELECT stream FROM outbox.stream_producers", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(producers, vec![stream.to_string()], "one producer row, its name converted back");
    let log = cluster.log();
    assert!(!log.contains("internal error in the worker"), "{log}");
}
