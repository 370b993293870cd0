//! The inbox: `outbox.inbox_claim` lets a consumer that is a Postgres database too process each
//! message exactly once (claim and work in one transaction), across redeliveries, replays and
//! concurrent claimers; the worker removes claims older than `outbox.inbox_retention`, and the
//! table keeps its size over retention cycles. Real cluster, real RabbitMQ, a real consumer
//! that acknowledges by hand.

use amqprs::channel::{BasicAckArguments, BasicConsumeArguments, Channel};
use amqprs::connection::{Connection, OpenConnectionArguments};
use pg_outbox_tests::*;
use postgres::error::SqlState;
use postgres::{Client, GenericClient};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio::runtime::Runtime;
use tokio::sync::mpsc::UnboundedReceiver;
use uuid::Uuid;

const WITHIN: Duration = Duration::from_secs(60);

/// An id no other claim of the run has (time and a counter; the test crate's uuid has no v4).
fn new_id() -> Uuid {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Uuid::from_u128((t << 64) ^ u128::from(n) ^ u128::from(std::process::id()) << 32)
}

fn claim(db: &mut impl GenericClient, id: Uuid, consumer: &str) -> bool {
    db.query_one("SELECT outbox.inbox_claim($1, $2)", &[&id, &consumer]).unwrap().get(0)
}

fn claims(db: &mut Client) -> i64 {
    db.query_one("SELECT count(*) FROM outbox.inbox", &[]).unwrap().get(0)
}

/// The role of a consuming application: EXECUTE on `inbox_claim` as the README says, and its
/// own table of processed messages.
fn consumer_role(db: &mut Client) {
    db.batch_execute(
        "CREATE ROLE orders_app LOGIN;
         GRANT EXECUTE ON FUNCTION outbox.inbox_claim TO orders_app;
         CREATE TABLE processed (message_id uuid NOT NULL, body jsonb NOT NULL);
         GRANT SELECT, INSERT ON processed TO orders_app;",
    )
    .unwrap();
}

/// A consumer that acknowledges by hand: one channel on its own connection, from which it
/// receives deliveries until it closes it.
struct ManualConsumer {
    rt: Runtime,
    connection: Option<Connection>,
    channel: Option<Channel>,
    rx: UnboundedReceiver<amqprs::channel::ConsumerMessage>,
}

impl Drop for ManualConsumer {
    fn drop(&mut self) {
        // amqprs closes from Drop by spawning a task: it needs the runtime.
        let _context = self.rt.enter();
        self.channel.take();
        self.connection.take();
    }
}

/// A delivery: its tag, message id, whether the broker says it was delivered before, body.
struct Received {
    tag: u64,
    message_id: Uuid,
    redelivered: bool,
    body: String,
}

impl ManualConsumer {
    fn open(queue: &str) -> ManualConsumer {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let (connection, channel, rx) = rt.block_on(async {
            let args = OpenConnectionArguments::new("127.0.0.1", 5672, "guest", "guest");
            let connection = Connection::open(&args).await.unwrap();
            let channel = connection.open_channel(None).await.unwrap();
            let (_tag, rx) = channel
                .basic_consume_rx(BasicConsumeArguments::new(queue, "").auto_ack(false).finish())
                .await
                .unwrap();
            (connection, channel, rx)
        });
        ManualConsumer { rt, connection: Some(connection), channel: Some(channel), rx }
    }

    fn next(&mut self) -> Received {
        let rx = &mut self.rx;
        let msg = self.rt.block_on(async { tokio::time::timeout(WITHIN, rx.recv()).await });
        let msg = msg.expect("a delivery in time").expect("the channel is open");
        let deliver = msg.deliver.unwrap();
        let id = msg.basic_properties.unwrap().message_id().cloned().expect("a message id");
        Received {
            tag: deliver.delivery_tag(),
            message_id: Uuid::parse_str(&id).unwrap(),
            redelivered: deliver.redelivered(),
            body: String::from_utf8(msg.content.unwrap_or_default()).unwrap(),
        }
    }

    fn ack(&self, tag: u64) {
        let channel = self.channel.as_ref().unwrap();
        self.rt.block_on(channel.basic_ack(BasicAckArguments::new(tag, false))).unwrap();
    }

    /// Closes channel and connection without acknowledging what is left: the broker delivers
    /// it again, to the next consumer.
    fn close(mut self) {
        let (channel, connection) = (self.channel.take().unwrap(), self.connection.take().unwrap());
        self.rt.block_on(async {
            let _ = channel.close().await;
            let _ = connection.close().await;
        });
    }
}

/// What a consumer does with one message: claim it and, if it is new, record it, in one
/// transaction. `commit: false` stands for a consumer that fails before its commit.
fn process(db: &mut Client, m: &Received, commit: bool) -> bool {
    let mut tx = db.transaction().unwrap();
    let new = claim(&mut tx, m.message_id, "orders");
    if new {
        tx.execute("INSERT INTO processed VALUES ($1, $2::text::jsonb)", &[&m.message_id, &m.body]).unwrap();
    }
    if commit {
        tx.commit().unwrap();
    } else {
        tx.rollback().unwrap();
    }
    new
}

#[test]
fn a_consumer_processes_every_event_once_across_redeliveries_and_replays() {
    const EVENTS: usize = 120;
    const REPLAYED: i64 = 15;
    let cluster = Cluster::start(&[]);
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let queue = broker.queue(&exchange, "#");
    let mut admin = cluster.client();
    consumer_role(&mut admin);

    // Published in transactions of a few events, some of them per aggregate.
    let mut published = HashSet::new();
    for chunk in 0..EVENTS / 4 {
        let mut tx = admin.transaction().unwrap();
        for i in 0..4 {
            let id: Uuid = tx
                .query_one(
                    "SELECT outbox.publish('OrderPlaced', jsonb_build_object('n', $1::int),
                                           aggregate_type => 'order', aggregate_id => $2, exchange => $3)",
                    &[&((chunk * 4 + i) as i32), &(chunk % 5).to_string(), &exchange.name],
                )
                .unwrap()
                .get(0);
            published.insert(id);
        }
        tx.commit().unwrap();
    }
    cluster.wait_drained(WITHIN);
    // The outbox's at-least-once path: events sent again with their message id (an operator
    // replays dead letters of events that had in fact arrived).
    admin
        .execute(
            "INSERT INTO outbox.dead_letters (message_id, event_type, payload, aggregate_type, aggregate_id,
                                              exchange, created_at, attempts, last_error)
             SELECT m, 'OrderPlaced', jsonb_build_object('replayed', true), 'order', 'replayed', $1,
                    now(), 1, 'test'
               FROM unnest($2::uuid[]) m LIMIT $3",
            &[&exchange.name, &published.iter().copied().collect::<Vec<Uuid>>(), &REPLAYED],
        )
        .unwrap();
    assert_eq!(
        admin.query_one("SELECT outbox.replay_dead_letters()", &[]).unwrap().get::<_, i64>(0),
        REPLAYED
    );
    cluster.wait_drained(WITHIN);
    let deliveries = EVENTS + REPLAYED as usize;

    let mut db = cluster.connect_as(DB, "orders_app");
    // First consumer: processes everything, commits two thirds (the others fail before their
    // commit), and goes away without acknowledging anything.
    let mut first = ManualConsumer::open(&queue);
    let mut committed = HashSet::new();
    for n in 0..deliveries {
        let m = first.next();
        let commit = n % 3 != 0;
        if process(&mut db, &m, commit) && commit {
            assert!(committed.insert(m.message_id), "a second claim of {} returned true", m.message_id);
        }
    }
    assert!(!committed.is_empty() && committed.len() < EVENTS);
    first.close();

    // Second consumer: gets everything again, processes and acknowledges each.
    let mut second = ManualConsumer::open(&queue);
    let mut new_now = HashSet::new();
    for _ in 0..deliveries {
        let m = second.next();
        assert!(m.redelivered, "the broker redelivers what the first consumer did not acknowledge");
        if process(&mut db, &m, true) {
            assert!(new_now.insert(m.message_id), "a second claim of {} returned true", m.message_id);
        }
        second.ack(m.tag);
    }
    second.close();

    let not_committed: HashSet<Uuid> = published.difference(&committed).copied().collect();
    assert_eq!(new_now, not_committed, "the second consumer processed exactly what the first did not commit");
    let rows = db.query("SELECT message_id, count(*) FROM processed GROUP BY message_id", &[]).unwrap();
    let processed: HashMap<Uuid, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(processed.keys().copied().collect::<HashSet<_>>(), published, "every event processed");
    assert!(processed.values().all(|n| *n == 1), "no event processed twice: {processed:?}");
    assert_eq!(claims(&mut admin), EVENTS as i64);
    broker.delete_queue(&queue);
}

/// Runs `f` on `db` in a thread of its own; joining it gives the client back with the result.
fn in_thread<T: Send + 'static>(
    mut db: Client,
    f: impl FnOnce(&mut Client) -> T + Send + 'static,
) -> std::thread::JoinHandle<(Client, T)> {
    std::thread::spawn(move || {
        let r = f(&mut db);
        (db, r)
    })
}

fn pid(db: &mut Client) -> i32 {
    db.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0)
}

/// Waits until backend `pid` waits for a lock (the first claimer's transaction).
fn wait_until_blocked(cluster: &Cluster, pid: i32) {
    wait_until(WITHIN, "the second claimer to wait for the first", || {
        cluster
            .client()
            .query_one(
                "SELECT wait_event_type IS NOT DISTINCT FROM 'Lock' FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .unwrap()
            .get::<_, bool>(0)
            .then_some(())
    });
}

#[test]
fn a_concurrent_claimer_waits_for_the_first_and_gets_its_outcome() {
    let cluster = Cluster::start(&[]);
    let mut first = cluster.client();
    let mut second = cluster.client();
    let second_pid = pid(&mut second);

    // The first claimer commits: the second gets false.
    let id = new_id();
    first.batch_execute("BEGIN").unwrap();
    assert!(claim(&mut first, id, "default"));
    let waiting = in_thread(second, move |db| claim(db, id, "default"));
    wait_until_blocked(&cluster, second_pid);
    first.batch_execute("COMMIT").unwrap();
    let (mut second, got) = waiting.join().unwrap();
    assert!(!got, "the first claimer committed: a duplicate");

    // The first claimer rolls back: the second gets true, and its claim stands.
    let id = new_id();
    first.batch_execute("BEGIN").unwrap();
    assert!(claim(&mut first, id, "default"));
    second.batch_execute("BEGIN").unwrap();
    let waiting = in_thread(second, move |db| claim(db, id, "default"));
    wait_until_blocked(&cluster, second_pid);
    first.batch_execute("ROLLBACK").unwrap();
    let (mut second, got) = waiting.join().unwrap();
    assert!(got, "the first claimer rolled back: the message is the second's");
    second.batch_execute("COMMIT").unwrap();
    assert!(!claim(&mut first, id, "default"));

    // Under REPEATABLE READ a claim the snapshot cannot see fails with a serialization error
    // (retry the transaction: it then returns false), never with true.
    let id = new_id();
    first.batch_execute("BEGIN").unwrap();
    assert!(claim(&mut first, id, "default"));
    second.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ").unwrap();
    let waiting = in_thread(second, move |db| {
        db.query_one("SELECT outbox.inbox_claim($1)", &[&id]).map(|r| r.get::<_, bool>(0))
    });
    wait_until_blocked(&cluster, second_pid);
    first.batch_execute("COMMIT").unwrap();
    let (mut second, got) = waiting.join().unwrap();
    assert_eq!(got.unwrap_err().code(), Some(&SqlState::T_R_SERIALIZATION_FAILURE));
    second.batch_execute("ROLLBACK").unwrap();
    assert!(!claim(&mut second, id, "default"));
}

#[test]
fn consumers_claim_independently_and_bad_input_writes_nothing() {
    let cluster = Cluster::start(&[]);
    let mut db = cluster.client();
    let id = new_id();
    assert!(claim(&mut db, id, "billing"));
    assert!(claim(&mut db, id, "shipping"), "another consumer claims the same id for itself");
    let default: bool = db.query_one("SELECT outbox.inbox_claim($1)", &[&id]).unwrap().get(0);
    assert!(default, "the default consumer is a consumer of its own");
    assert!(!claim(&mut db, id, "billing"));
    assert!(!claim(&mut db, id, "shipping"));
    assert!(!claim(&mut db, id, "default"));
    // A claim rolled back (to a savepoint, too) was never made.
    let other = new_id();
    let mut tx = db.transaction().unwrap();
    tx.batch_execute("SAVEPOINT s").unwrap();
    assert!(claim(&mut tx, other, "billing"));
    tx.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
    assert!(claim(&mut tx, other, "billing"), "the savepoint's claim is gone");
    tx.rollback().unwrap();
    assert!(claim(&mut db, other, "billing"));
    assert!(claim(&mut db, id, &"x".repeat(255)), "255 bytes is a name");
    // The README's one-statement form: the work happens only for a new claim.
    db.batch_execute("CREATE TABLE shipments (order_id int, address text)").unwrap();
    for _ in 0..2 {
        db.execute(
            "INSERT INTO shipments (order_id, address) SELECT $2, $3 WHERE outbox.inbox_claim($1, 'shipping')",
            &[&other, &7i32, &"Main St 1"],
        )
        .unwrap();
    }
    let shipped: i64 = db.query_one("SELECT count(*) FROM shipments", &[]).unwrap().get(0);
    assert_eq!(shipped, 1);

    let before = claims(&mut db);
    let no_id: Option<Uuid> = None;
    let no_name: Option<&str> = None;
    let long = "é".repeat(128);
    for (sql, id, consumer, code) in [
        ("SELECT outbox.inbox_claim($1, $2)", no_id, Some("billing"), SqlState::NULL_VALUE_NOT_ALLOWED),
        ("SELECT outbox.inbox_claim($1)", no_id, None, SqlState::NULL_VALUE_NOT_ALLOWED),
        ("SELECT outbox.inbox_claim($1, $2)", Some(new_id()), no_name, SqlState::INVALID_PARAMETER_VALUE),
        ("SELECT outbox.inbox_claim($1, $2)", Some(new_id()), Some(""), SqlState::INVALID_PARAMETER_VALUE),
        (
            "SELECT outbox.inbox_claim($1, $2)",
            Some(new_id()),
            Some(long.as_str()),
            SqlState::STRING_DATA_RIGHT_TRUNCATION,
        ),
    ] {
        let err = if sql.contains("$2") {
            db.query_one(sql, &[&id, &consumer]).unwrap_err()
        } else {
            db.query_one(sql, &[&id]).unwrap_err()
        };
        let e = err.as_db_error().expect("a database error");
        assert_eq!(e.code(), &code, "{sql} {id:?} {consumer:?}: {}", e.message());
        assert!(e.message().starts_with("outbox.inbox_claim: "), "{}", e.message());
        assert!(e.hint().is_some(), "a hint for {}", e.message());
    }
    assert_eq!(claims(&mut db), before, "bad input writes nothing");
}

#[test]
fn a_role_without_execute_cannot_claim_nor_touch_the_table() {
    let cluster = Cluster::start(&[]);
    let mut admin = cluster.client();
    admin.batch_execute("CREATE ROLE stranger LOGIN; CREATE ROLE orders_app LOGIN;").unwrap();
    let mut stranger = cluster.connect_as(DB, "stranger");
    let err = stranger.query_one("SELECT outbox.inbox_claim($1)", &[&new_id()]).unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));

    // The documented grant is all a consumer needs; it gives no access to the table itself.
    admin.batch_execute("GRANT EXECUTE ON FUNCTION outbox.inbox_claim TO orders_app").unwrap();
    let mut app = cluster.connect_as(DB, "orders_app");
    assert!(claim(&mut app, new_id(), "orders"));
    for sql in [
        "SELECT count(*) FROM outbox.inbox",
        "INSERT INTO outbox.inbox (consumer, message_id) VALUES ('orders', gen_random_uuid())",
        "DELETE FROM outbox.inbox",
    ] {
        let err = app.batch_execute(sql).unwrap_err();
        assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{sql}");
    }
    let err = stranger.query_one("SELECT outbox.inbox_claim($1)", &[&new_id()]).unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "still refused");
}

/// Claims made `age` ago (written directly, as only a superuser can).
fn old_claims(db: &mut Client, consumer: &str, n: i32, age: &str) {
    db.execute(
        "INSERT INTO outbox.inbox (consumer, message_id, claimed_at)
         SELECT $1, gen_random_uuid(), now() - $3::text::interval - g * interval '1 ms'
           FROM generate_series(1, $2) g",
        &[&consumer, &n, &age],
    )
    .unwrap();
}

fn count_of(db: &mut Client, consumer: &str) -> i64 {
    db.query_one("SELECT count(*) FROM outbox.inbox WHERE consumer = $1", &[&consumer]).unwrap().get(0)
}

#[test]
fn the_worker_removes_claims_older_than_the_retention_and_keeps_the_rest() {
    // A minute: claims made during the test stay; a clean-up every 6 s.
    let cluster = Cluster::start(&[("outbox.inbox_retention", "'60s'")]);
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    cluster.wait_for_worker();
    let mut db = cluster.client();
    // More than one batch of expired claims, and claims within the retention.
    old_claims(&mut db, "expired", 2500, "2 hours");
    old_claims(&mut db, "kept", 100, "5 seconds");
    let fresh: Vec<Uuid> = (0..50).map(|_| new_id()).collect();
    for id in &fresh {
        assert!(claim(&mut db, *id, "fresh"));
    }
    wait_until(WITHIN, "the worker to remove the expired claims", || {
        (count_of(&mut db, "expired") == 0).then_some(())
    });
    assert_eq!(count_of(&mut db, "kept"), 100, "claims within the retention stay");
    assert_eq!(count_of(&mut db, "fresh"), 50);
    assert!(fresh.iter().all(|id| !claim(&mut db, *id, "fresh")), "still duplicates");

    // The extension dropped and created again: a new table, cleaned as well.
    db.batch_execute("DROP EXTENSION pg_outbox; CREATE EXTENSION pg_outbox;").unwrap();
    old_claims(&mut db, "expired", 10, "1 day");
    old_claims(&mut db, "kept", 10, "1 second");
    wait_until(WITHIN, "the worker to clean the new inbox", || {
        (count_of(&mut db, "expired") == 0).then_some(())
    });
    assert_eq!(count_of(&mut db, "kept"), 10);

    // No inbox at all (as at an older version of the extension): the worker goes on
    // publishing and says nothing about it.
    db.batch_execute("ALTER EXTENSION pg_outbox DROP TABLE outbox.inbox; DROP TABLE outbox.inbox;").unwrap();
    cluster.reconfigure(&[("outbox.inbox_retention", "'2s'")]);
    db.query_one("SELECT outbox.publish('AfterTheInbox', '{}', exchange => $1)", &[&exchange.name]).unwrap();
    consumer.wait_for(1, WITHIN);
    // Clean-ups every second meanwhile.
    std::thread::sleep(Duration::from_secs(3));
    db.query_one("SELECT outbox.publish('AfterTheInbox', '{}', exchange => $1)", &[&exchange.name]).unwrap();
    consumer.wait_for(2, WITHIN);
    assert_eq!(cluster.log_count("expired claims"), 0, "no complaint about the missing inbox");
    let state: String = db.query_one("SELECT worker_state FROM outbox.stats", &[]).unwrap().get(0);
    assert_eq!(state, "running");
}

/// The SQL of the README's worker-role recipe (the `sql` block after `<!-- worker-role -->`).
fn readme_worker_role_recipe() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let after = readme.split("<!-- worker-role -->").nth(1).expect("README has the worker-role recipe");
    after.split("```sql").nth(1).expect("an sql block").split("```").next().unwrap().to_string()
}

#[test]
fn a_worker_with_the_documented_role_removes_expired_claims() {
    let cluster = Cluster::start(&[("outbox.inbox_retention", "'60s'")]);
    let mut db = cluster.client();
    db.batch_execute(&readme_worker_role_recipe()).unwrap();
    let old = cluster.wait_for_worker();
    cluster.reconfigure(&[("outbox.role", "'outbox_worker'")]);
    wait_until(WITHIN, "the worker as outbox_worker", || cluster.worker_pid().filter(|p| *p != old));
    old_claims(&mut db, "expired", 1500, "1 day");
    old_claims(&mut db, "kept", 10, "1 second");
    wait_until(WITHIN, "the worker to remove the expired claims", || {
        (count_of(&mut db, "expired") == 0).then_some(())
    });
    assert_eq!(count_of(&mut db, "kept"), 10);
    assert_eq!(cluster.log_count("expired claims"), 0, "no failure to clean: {}", cluster.log());
}

/// Bytes of the inbox's heap and indexes.
fn inbox_bytes(db: &mut Client) -> (i64, i64) {
    let row = db
        .query_one("SELECT pg_relation_size('outbox.inbox'), pg_indexes_size('outbox.inbox')", &[])
        .unwrap();
    (row.get(0), row.get(1))
}

/// Whether autovacuum has vacuumed the inbox since `since` and left no dead rows.
fn autovacuumed_since(db: &mut Client, since: std::time::SystemTime) -> bool {
    db.query_one(
        "SELECT coalesce(last_autovacuum > $1 AND n_dead_tup = 0, false)
           FROM pg_stat_user_tables WHERE relid = 'outbox.inbox'::regclass",
        &[&since],
    )
    .unwrap()
    .get(0)
}

#[test]
fn the_inbox_keeps_its_size_over_retention_cycles() {
    const PER_CYCLE: i32 = 20_000;
    const CYCLES: usize = 5;
    let _alone = exclusive();
    let cluster = Cluster::start(&[("outbox.inbox_retention", "'60s'"), ("autovacuum_naptime", "'1s'")]);
    cluster.wait_for_worker();
    let mut db = cluster.client();
    let mut peaks = Vec::new();
    for cycle in 0..CYCLES {
        // A retention's worth of claims, then the worker expires them all and autovacuum
        // (the table's own settings) makes their space free for the next cycle's.
        old_claims(&mut db, "cycle", PER_CYCLE, "1 hour");
        let peak = inbox_bytes(&mut db);
        eprintln!(
            "cycle {cycle}: {PER_CYCLE} claims in {} kB of heap, {} kB of indexes",
            peak.0 / 1024,
            peak.1 / 1024
        );
        peaks.push(peak);
        wait_until(WITHIN, "the worker to expire the cycle's claims", || {
            (claims(&mut db) == 0).then_some(())
        });
        let expired: std::time::SystemTime = db.query_one("SELECT clock_timestamp()", &[]).unwrap().get(0);
        wait_until(WITHIN, "autovacuum to vacuum the inbox", || {
            autovacuumed_since(&mut db, expired).then_some(())
        });
    }
    // The heap is the same size every cycle. An index page emptied by one vacuum is reused
    // only after the next (Postgres recycles a deleted B-tree page once no transaction can
    // still be on it), so the indexes reach their size in the second cycle and keep it.
    let first_heap = peaks[0].0;
    let second_indexes = peaks[1].1;
    for (cycle, (heap, indexes)) in peaks.iter().enumerate() {
        assert!(*heap <= first_heap * 11 / 10, "cycle {cycle}: heap grew to {heap} from {first_heap} bytes");
        assert!(
            cycle < 2 || *indexes <= second_indexes * 11 / 10,
            "cycle {cycle}: indexes grew to {indexes} from {second_indexes} bytes"
        );
    }
}
