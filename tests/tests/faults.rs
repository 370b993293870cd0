//! Fault injection: each test breaks one thing for real (the broker, the connection, the
//! worker, the server, the extension, the database, a message, the primary) while events are
//! being written, then checks that nothing committed was lost, nothing rolled back arrived, and
//! per-aggregate order held. Tests run one at a time: several stop the shared broker.

use pg_outbox_tests::*;
use std::collections::HashSet;
use std::time::{Duration, Instant};
use uuid::Uuid;

const WITHIN: Duration = Duration::from_secs(90);

/// A durable exchange and a durable queue bound to all of it, not consumed yet.
fn exchange_and_queue(broker: &Broker) -> (String, String) {
    let exchange = unique("ex");
    broker.exchange(&exchange);
    let queue = broker.queue(&exchange, "#");
    (exchange, queue)
}

/// Waits for the outbox to drain, then consumes `queue` until every committed event arrived
/// (or `WITHIN` passes), and judges the result.
fn settle_and_verify(cluster: &Cluster, queue: &str, exchange: &str, rolled_back: &HashSet<Uuid>) -> Verdict {
    cluster.wait_drained(WITHIN);
    let committed: i64 = cluster.client().query_one("SELECT count(*) FROM ledger", &[]).unwrap().get(0);
    let broker = Broker::connect();
    let consumer = broker.consume_queue(queue, exchange);
    let deadline = Instant::now() + WITHIN;
    loop {
        let (unique_ids, _) = dedup(&consumer.received());
        if unique_ids.len() as i64 >= committed || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let verdict = verify(cluster, &consumer.received(), rolled_back);
    broker.delete_queue(queue);
    broker.delete_exchange(exchange);
    verdict
}

fn stats(cluster: &Cluster) -> (Option<bool>, Option<String>) {
    let row =
        cluster.client().query_one("SELECT broker_connected, last_error FROM outbox.stats", &[]).unwrap();
    (row.get(0), row.get(1))
}

fn publish_many(cluster: &Cluster, exchange: &str, n: i32) -> HashSet<String> {
    cluster
        .client()
        .query(
            "SELECT outbox.publish('Batch', jsonb_build_object('n', n), exchange => $1)::text FROM generate_series(1, $2) n",
            &[&exchange, &n],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[test]
fn broker_down_when_the_worker_starts() {
    let _alone = exclusive();
    let broker = Broker::connect();
    let (exchange, queue) = exchange_and_queue(&broker);
    drop(broker);
    let outage = BrokerOutage::begin();
    let cluster = Cluster::start(&[("outbox.reconnect_backoff_max", "'500ms'")]);
    cluster.wait_for_worker();
    let ids = publish_many(&cluster, &exchange, 300);
    std::thread::sleep(Duration::from_secs(4)); // several reconnect attempts
    let (connected, last_error) = stats(&cluster);
    assert_eq!(connected, Some(false));
    assert!(last_error.is_some_and(|e| e.contains("could not connect") && !e.contains("guest:guest")));
    assert_eq!(cluster.log_count("broker unavailable"), 1, "one line per state change:\n{}", cluster.log());
    outage.end();

    cluster.wait_drained(WITHIN);
    let broker = Broker::connect();
    let consumer = broker.consume_queue(&queue, &exchange);
    let got = consumer.wait_for(300, WITHIN);
    let received: HashSet<String> = got.iter().filter_map(|d| d.message_id.clone()).collect();
    assert_eq!(received, ids);
    assert_eq!(cluster.log_count("broker unavailable"), 1);
    assert_eq!(cluster.log_count("connected to amqp://"), 1);
    broker.delete_queue(&queue);
    broker.delete_exchange(&exchange);
}

#[test]
fn broker_stopped_mid_stream() {
    let _alone = exclusive();
    let broker = Broker::connect();
    let (exchange, queue) = exchange_and_queue(&broker);
    drop(broker);
    let cluster = Cluster::start(&[("outbox.reconnect_backoff_max", "'1s'")]);
    cluster.wait_for_worker();
    let load = Load::start(&cluster, LoadSpec::new(&exchange));
    std::thread::sleep(Duration::from_secs(3));
    let outage = BrokerOutage::begin();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(stats(&cluster).0, Some(false));
    outage.end();
    std::thread::sleep(Duration::from_secs(3));
    let rolled_back = load.stop();
    let verdict = settle_and_verify(&cluster, &queue, &exchange, &rolled_back);
    println!("broker stopped mid-stream: {verdict}");
    verdict.assert_clean();
    assert_eq!(cluster.log_count("broker unavailable"), 1, "{}", cluster.log());
}

#[test]
fn connection_cut_repeatedly_and_partitioned() {
    let _alone = exclusive();
    let broker = Broker::connect();
    let (exchange, queue) = exchange_and_queue(&broker);
    let proxy = Proxy::start(5672);
    let url = proxy.url();
    let cluster = Cluster::start(&[("outbox.amqp_url", &url), ("outbox.reconnect_backoff_max", "'500ms'")]);
    cluster.wait_for_worker();
    let load = Load::start(&cluster, LoadSpec::new(&exchange));
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(1500));
        proxy.cut();
    }
    // A partition: every attempt to reconnect fails for a while.
    std::thread::sleep(Duration::from_millis(1500));
    proxy.refuse(true);
    proxy.cut();
    std::thread::sleep(Duration::from_secs(4));
    let refused = proxy.refused.load(std::sync::atomic::Ordering::SeqCst);
    proxy.refuse(false);
    std::thread::sleep(Duration::from_secs(2));
    let rolled_back = load.stop();
    let verdict = settle_and_verify(&cluster, &queue, &exchange, &rolled_back);
    println!("connection cut 6 times, partitioned 4 s ({refused} refused reconnects): {verdict}");
    verdict.assert_clean();
    assert!(refused >= 3, "the worker kept trying to reconnect: {refused}");
    let lines = cluster.log_count("broker unavailable");
    assert!((1..=6).contains(&lines), "one line per outage, not per attempt: {lines}\n{}", cluster.log());
}

#[test]
fn worker_terminated_and_killed_and_server_crashed() {
    let _alone = exclusive();
    let broker = Broker::connect();
    let (exchange, queue) = exchange_and_queue(&broker);
    let cluster = Cluster::start(&[]);
    let first = cluster.wait_for_worker();
    let load = Load::start(&cluster, LoadSpec::new(&exchange));
    std::thread::sleep(Duration::from_secs(2));

    // pg_terminate_backend: the worker stops cleanly, the launcher starts a new one, the
    // server does not restart.
    cluster.admin().query_one("SELECT pg_terminate_backend($1)", &[&first]).unwrap();
    let second = wait_until(WITHIN, "a new worker", || cluster.worker_pid().filter(|p| *p != first));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(cluster.log_count("terminated by signal"), 0, "{}", cluster.log());

    // SIGKILL: the postmaster restarts every process; the worker comes back after recovery.
    unsafe { libc::kill(second, libc::SIGKILL) };
    let third =
        wait_until(WITHIN, "a worker after crash recovery", || cluster.worker_pid().filter(|p| *p != second));
    assert!(cluster.log_count("terminated by signal 9") >= 1);
    std::thread::sleep(Duration::from_secs(2));

    // The whole server stopped without a checkpoint, then started again.
    cluster.crash();
    std::thread::sleep(Duration::from_millis(500));
    cluster.start_server();
    wait_until(WITHIN, "a worker after restart", || cluster.worker_pid().filter(|p| *p != third));
    std::thread::sleep(Duration::from_secs(3));

    let rolled_back = load.stop();
    let verdict = settle_and_verify(&cluster, &queue, &exchange, &rolled_back);
    println!("worker terminated, worker killed, server crashed: {verdict}");
    verdict.assert_clean();
}

#[test]
fn two_phase_commit() {
    let _alone = exclusive();
    // A poll interval of an hour: only the COMMIT PREPARED wake-up can publish in time.
    let cluster = Cluster::start(&[("outbox.poll_interval", "'1h'")]);
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    cluster.wait_for_worker();

    let mut a = cluster.client();
    a.batch_execute("BEGIN").unwrap();
    let committed: uuid::Uuid = a
        .query_one(
            "SELECT outbox.publish('Prepared', '{}', aggregate_id => 'x', exchange => $1)",
            &[&exchange.name],
        )
        .unwrap()
        .get(0);
    a.batch_execute("PREPARE TRANSACTION 'outbox_p1'").unwrap();
    let mut b = cluster.client();
    b.batch_execute("BEGIN").unwrap();
    b.query_one("SELECT outbox.publish('RolledBackPrepared', '{}', exchange => $1)", &[&exchange.name])
        .unwrap();
    b.batch_execute("PREPARE TRANSACTION 'outbox_p2'").unwrap();

    // A writer of the same aggregate waits for the prepared transaction.
    let port = cluster.port;
    let exchange2 = exchange.name.clone();
    let follower = std::thread::spawn(move || {
        let mut c = postgres::Client::connect(
            &format!("host=127.0.0.1 port={port} user=postgres dbname=app"),
            postgres::NoTls,
        )
        .unwrap();
        let id: uuid::Uuid = c
            .query_one(
                "SELECT outbox.publish('After', '{}', aggregate_id => 'x', exchange => $1)",
                &[&exchange2],
            )
            .unwrap()
            .get(0);
        id
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(!follower.is_finished(), "the aggregate's lock survives PREPARE");
    assert_eq!(consumer.count(), 0, "prepared is not committed");

    cluster.client().batch_execute("COMMIT PREPARED 'outbox_p1'").unwrap();
    let after = follower.join().unwrap();
    cluster.client().batch_execute("ROLLBACK PREPARED 'outbox_p2'").unwrap();
    let got = consumer.wait_for(2, Duration::from_secs(30));
    let ids: Vec<String> = got.iter().map(|d| d.message_id.clone().unwrap()).collect();
    assert_eq!(ids, vec![committed.to_string(), after.to_string()], "commit order within the aggregate");
    cluster.wait_drained(WITHIN);
    consumer.expect_no_more(2, Duration::from_secs(2));
}

#[test]
fn extension_dropped_and_created_while_the_worker_runs() {
    let _alone = exclusive();
    let cluster = Cluster::start(&[]);
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    cluster.wait_for_worker();
    publish_many(&cluster, &exchange, 10);
    consumer.wait_for(10, WITHIN);

    // Dropped in the middle of draining a backlog.
    publish_many(&cluster, &exchange, 20_000);
    cluster.client().batch_execute("DROP EXTENSION pg_outbox").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let worker = cluster.worker_pid().expect("the worker survives DROP EXTENSION");
    cluster.client().batch_execute("CREATE EXTENSION pg_outbox").unwrap();
    let before = consumer.count();
    let ids = publish_many(&cluster, &exchange, 10);
    let got = consumer.wait_for(before + 10, WITHIN);
    let received: HashSet<String> = got.iter().filter_map(|d| d.message_id.clone()).collect();
    assert!(ids.is_subset(&received));
    assert_eq!(cluster.worker_pid(), Some(worker), "same worker throughout");
    assert_eq!(cluster.log_count("waiting for CREATE EXTENSION"), 1, "{}", cluster.log());
    assert!(cluster.log_count("database step failed") <= 1, "{}", cluster.log());
    assert_eq!(cluster.log_count("terminated by signal"), 0);
}

#[test]
fn database_created_after_the_server_started() {
    let _alone = exclusive();
    let cluster = Cluster::init(&[]);
    cluster.start_server();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(cluster.log_count("waiting for database \"app\""), 1, "{}", cluster.log());
    assert_eq!(cluster.log_count("FATAL"), 0, "{}", cluster.log());
    assert_eq!(cluster.worker_pid_in("postgres"), None);

    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    cluster.admin().batch_execute("CREATE DATABASE app").unwrap();
    cluster.client().batch_execute("CREATE EXTENSION pg_outbox").unwrap();
    let ids = publish_many(&cluster, &exchange, 5);
    let got = consumer.wait_for(5, WITHIN);
    assert_eq!(got.iter().filter_map(|d| d.message_id.clone()).collect::<HashSet<_>>(), ids);
}

#[test]
fn unroutable_poison_is_retried_dead_lettered_and_replayed_without_stalling_others() {
    let _alone = exclusive();
    let cluster = Cluster::start(&[
        ("outbox.max_attempts", "3"),
        ("outbox.retry_backoff_base", "'300ms'"),
        ("outbox.retry_backoff_max", "'1s'"),
    ]);
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let good = broker.consume(&exchange, "good.#");
    cluster.wait_for_worker();
    let mut db = cluster.client();
    fn publish(
        db: &mut impl postgres::GenericClient,
        rk: &str,
        aggregate: Option<&str>,
        exchange: &str,
    ) -> String {
        db.query_one(
            "SELECT outbox.publish('Poison', jsonb_build_object('rk', $1::text), aggregate_id => $2, routing_key => $1, exchange => $3)::text",
            &[&rk, &aggregate, &exchange],
        )
        .unwrap()
        .get(0)
    }
    let mut tx = db.transaction().unwrap();
    let poison = publish(&mut tx, "bad.1", Some("A"), &exchange);
    let behind = publish(&mut tx, "good.behind", Some("A"), &exchange);
    let other_aggregate = publish(&mut tx, "good.other", Some("B"), &exchange);
    let no_aggregate = publish(&mut tx, "good.free", None, &exchange);
    tx.commit().unwrap();

    // Other aggregates flow while the poison message waits for its retries.
    let got = good.wait_for(2, WITHIN);
    let first: HashSet<String> = got.iter().filter_map(|d| d.message_id.clone()).collect();
    assert_eq!(first, HashSet::from([other_aggregate, no_aggregate]));
    assert!(!first.contains(&behind), "a later event of the poisoned aggregate must wait");

    // After its last attempt it is dead-lettered, and its aggregate moves on.
    let got = good.wait_for(3, WITHIN);
    assert_eq!(got[2].message_id.as_deref(), Some(behind.as_str()));
    let dead =
        db.query_one("SELECT message_id::text, attempts, last_error FROM outbox.dead_letters", &[]).unwrap();
    assert_eq!(dead.get::<_, String>(0), poison);
    assert_eq!(dead.get::<_, i32>(1), 3);
    assert!(dead.get::<_, String>(2).starts_with("unroutable"), "{}", dead.get::<_, String>(2));
    assert_eq!(cluster.log_count("moved to outbox.dead_letters"), 1);
    let row = db
        .query_one(
            "SELECT e.dead_letters, s.dead_lettered_total, s.failed_attempts_total
               FROM outbox.stats s, outbox.exact_counts() e",
            &[],
        )
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1), row.get::<_, i64>(2)), (1, 1, 3));
    // outbox.stats' own count is the statistics system's estimate: it follows within moments.
    wait_until(WITHIN, "outbox.stats to count the dead letter", || {
        let n: i64 = db.query_one("SELECT dead_letters FROM outbox.stats", &[]).unwrap().get(0);
        (n == 1).then_some(())
    });

    // Fix the cause, replay: it arrives with its original message id.
    let bad = broker.consume(&exchange, "bad.#");
    assert_eq!(db.query_one("SELECT outbox.replay_dead_letters()", &[]).unwrap().get::<_, i64>(0), 1);
    let replayed = bad.wait_for(1, WITHIN);
    assert_eq!(replayed[0].message_id.as_deref(), Some(poison.as_str()));
    cluster.wait_drained(WITHIN);
}

/// Sets RabbitMQ's `max_message_size` for the test; restores the default on drop.
struct MaxMessageSize;

impl MaxMessageSize {
    fn set(bytes: u64) -> MaxMessageSize {
        let ok = std::process::Command::new("rabbitmqctl")
            .args(["eval", &format!("application:set_env(rabbit, max_message_size, {bytes}).")])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        MaxMessageSize
    }
}

impl Drop for MaxMessageSize {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["eval", "application:set_env(rabbit, max_message_size, 134217728)."])
            .status();
    }
}

#[test]
fn oversized_and_nacked_poison_is_dead_lettered_and_replayed() {
    let _alone = exclusive();
    let limit = MaxMessageSize::set(4096);
    let cluster = Cluster::start(&quick_retries("2"));
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let ok = broker.consume(&exchange, "ok.#");
    // A queue that holds one message and rejects more: the broker nacks them.
    let mut args = amqprs::FieldTable::new();
    args.insert("x-max-length".try_into().unwrap(), amqprs::FieldValue::l(1));
    args.insert(
        "x-overflow".try_into().unwrap(),
        amqprs::FieldValue::S("reject-publish".try_into().unwrap()),
    );
    let full_queue = {
        let c = broker.consume_with(&exchange, "full.#", args);
        c.queue.clone()
    };
    cluster.wait_for_worker();
    let mut db = cluster.client();
    let big = format!("{{\"blob\": \"{}\"}}", "x".repeat(10_000));
    let publish = |db: &mut postgres::Client, rk: &str, payload: &str| -> String {
        db.query_one(
            "SELECT outbox.publish('Poison', $1::text::jsonb, routing_key => $2, exchange => $3)::text",
            &[&payload, &rk, &exchange.name],
        )
        .unwrap()
        .get(0)
    };
    let oversized = publish(&mut db, "ok.big", &big);
    let fills = publish(&mut db, "full.1", "{}");
    let nacked = publish(&mut db, "full.2", "{}");
    let fine = publish(&mut db, "ok.small", "{}");

    let got = ok.wait_for(1, WITHIN);
    assert_eq!(got[0].message_id.as_deref(), Some(fine.as_str()));
    wait_until(WITHIN, "both poison messages dead-lettered", || {
        let n: i64 = db.query_one("SELECT count(*) FROM outbox.dead_letters", &[]).unwrap().get(0);
        (n == 2).then_some(())
    });
    let dead: Vec<(String, String)> = db
        .query("SELECT message_id::text, last_error FROM outbox.dead_letters ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let by_id: std::collections::HashMap<_, _> = dead.into_iter().collect();
    assert!(
        by_id[&oversized].starts_with("refused") && by_id[&oversized].contains("message size"),
        "{by_id:?}"
    );
    assert!(by_id[&nacked].starts_with("nacked"), "{by_id:?}");
    assert!(!by_id.contains_key(&fills));

    // Fix both causes: a larger limit, and a consumer that empties the full queue.
    drop(limit);
    let full = broker.consume_queue(&full_queue, &exchange);
    full.wait_for(1, WITHIN);
    assert_eq!(db.query_one("SELECT outbox.replay_dead_letters()", &[]).unwrap().get::<_, i64>(0), 2);
    let got = ok.wait_for(2, WITHIN);
    assert_eq!(got[1].message_id.as_deref(), Some(oversized.as_str()));
    assert_eq!(got[1].body.len(), big.len());
    let got = full.wait_for(2, WITHIN);
    assert_eq!(got[1].message_id.as_deref(), Some(nacked.as_str()));
    cluster.wait_drained(WITHIN);
    broker.delete_queue(&full_queue);
}

#[test]
fn a_hot_standby_publishes_nothing_until_promoted() {
    let _alone = exclusive();
    // The primary cannot reach the broker, so whatever arrives comes from the standby.
    let primary = Cluster::start(&[("outbox.amqp_url", &unreachable_broker_url()), ("wal_level", "replica")]);
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    let standby = Cluster::standby_of(&primary, &[("outbox.amqp_url", BROKER_URL)]);
    let ids = publish_many(&primary, &exchange, 100);
    wait_until(WITHIN, "the standby to replay the events", || (standby.pending() == 100).then_some(()));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(consumer.count(), 0, "a standby must not publish");
    let processes: i64 = standby
        .client()
        .query_one("SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'pg_outbox%'", &[])
        .unwrap()
        .get(0);
    assert_eq!(processes, 0, "no launcher or worker during recovery");

    primary.stop();
    standby.promote();
    let got = consumer.wait_for(100, WITHIN);
    let received: HashSet<String> = got.iter().filter_map(|d| d.message_id.clone()).collect();
    assert_eq!(received, ids);
    standby.wait_drained(WITHIN);
}

/// Raises RabbitMQ's memory alarm (publishers are blocked) until dropped.
struct MemoryAlarm;

impl MemoryAlarm {
    fn raise() -> MemoryAlarm {
        let ok = std::process::Command::new("rabbitmqctl")
            .args(["set_vm_memory_high_watermark", "0.000001"])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        MemoryAlarm
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        let _ =
            std::process::Command::new("rabbitmqctl").args(["set_vm_memory_high_watermark", "0.4"]).status();
    }
}

#[test]
fn a_broker_resource_alarm_delays_but_never_dead_letters() {
    let _alone = exclusive();
    let broker = Broker::connect();
    let (exchange, queue) = exchange_and_queue(&broker);
    let cluster = Cluster::start(&[
        ("outbox.confirm_timeout", "'1s'"),
        ("outbox.max_attempts", "2"),
        ("outbox.retry_backoff_base", "'200ms'"),
        ("outbox.retry_backoff_max", "'1s'"),
    ]);
    cluster.wait_for_worker();
    wait_until(WITHIN, "the worker to connect", || stats(&cluster).0.filter(|c| *c));
    let alarm = MemoryAlarm::raise();
    let ids = publish_many(&cluster, &exchange, 50);
    std::thread::sleep(Duration::from_secs(6));
    let row = cluster
        .client()
        .query_one(
            "SELECT e.dead_letters, s.failed_attempts_total, e.pending FROM outbox.stats s, outbox.exact_counts() e",
            &[],
        )
        .unwrap();
    let (dead, failed, pending) = (row.get::<_, i64>(0), row.get::<_, i64>(1), row.get::<_, i64>(2));
    println!("during a 6 s memory alarm: {failed} failed attempts (timeouts), {pending} pending, {dead} dead letters");
    assert_eq!(dead, 0, "an outage must not dead-letter events");
    assert!(failed > 0 && pending > 0, "the alarm blocked publishing");
    drop(alarm);

    cluster.wait_drained(WITHIN);
    let consumer = broker.consume_queue(&queue, &exchange);
    let got = consumer.wait_for(50, WITHIN);
    let received: HashSet<String> = got.iter().filter_map(|d| d.message_id.clone()).collect();
    assert_eq!(received, ids);
    broker.delete_queue(&queue);
    broker.delete_exchange(&exchange);
}
