//! The worker's plans must not depend on the statistics of the moment they were made: a burst
//! after an idle spell (an outbox drained and analyzed as empty, as autovacuum leaves it) is
//! read by index, never by scanning or sorting the table.

use pg_outbox_tests::*;
use std::time::Duration;

/// Rows read from the outbox by sequential scans so far. (Not the number of scans: rebuilding
/// the indexes of a truncated, empty outbox counts as two scans that read nothing.)
fn rows_read_sequentially(cluster: &Cluster) -> i64 {
    cluster
        .client()
        .query_one(
            "SELECT coalesce(seq_tup_read, 0) FROM pg_stat_user_tables WHERE relid = 'outbox.messages'::regclass",
            &[],
        )
        .unwrap()
        .get(0)
}

/// The worker's plans (auto_explain's log entries of the `pg_outbox worker` process) that
/// read more of `outbox.messages` than they return: a sequential or bitmap scan of it (a
/// bitmap scan reads every row its condition covers, then sorts them), or any sort.
fn worker_plans_scanning_the_outbox(log: &str) -> Vec<String> {
    let mut plans: Vec<(bool, String)> = Vec::new();
    for line in log.lines() {
        if line.contains("LOG:  duration:") && line.ends_with("plan:") {
            plans.push((line.contains("pg_outbox worker"), String::new()));
        } else if let (Some((_, plan)), true) = (plans.last_mut(), line.starts_with('\t')) {
            plan.push_str(line);
            plan.push('\n');
        }
    }
    plans
        .into_iter()
        .filter(|(worker, plan)| {
            *worker
                && plan.lines().any(|l| {
                    l.contains("Seq Scan on messages ")
                        || l.contains("Bitmap Heap Scan on messages")
                        || l.contains("Sort")
                })
        })
        .map(|(_, plan)| plan)
        .collect()
}

/// The worker sends its statistics at most once a second: waits until they count `n` deletes.
fn wait_for_deletes_counted(db: &mut postgres::Client, n: i64) {
    wait_until(Duration::from_secs(30), "the worker's statistics", || {
        let deleted: i64 = db
            .query_one(
                "SELECT n_tup_del FROM pg_stat_user_tables WHERE relid = 'outbox.messages'::regclass",
                &[],
            )
            .unwrap()
            .get(0);
        (deleted >= n).then_some(())
    });
}

fn published(cluster: &Cluster) -> i64 {
    cluster.client().query_one("SELECT published_total FROM outbox.worker_status()", &[]).unwrap().get(0)
}

#[test]
fn a_burst_after_an_idle_spell_never_scans_the_outbox() {
    burst_after_an_idle_spell(false);
}

/// The same through the stream path: its reads, id assignment and recovery by index too.
#[test]
fn a_burst_to_a_stream_never_scans_the_outbox() {
    burst_after_an_idle_spell(true);
}

fn burst_after_an_idle_spell(to_stream: bool) {
    let _alone = exclusive();
    // auto_explain logs the worker's plans, to name the statement if one scans the table.
    let cluster = Cluster::start(&[
        ("outbox.stream_url", STREAM_URL),
        ("outbox.poll_interval", "'100ms'"),
        ("autovacuum", "off"),
        ("shared_preload_libraries", "'pg_outbox,auto_explain'"),
        ("auto_explain.log_min_duration", "0"),
        ("auto_explain.log_nested_statements", "on"),
        ("auto_explain.log_format", "text"),
    ]);
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let mut args = amqprs::FieldTable::new();
    args.insert("x-max-length".try_into().unwrap(), amqprs::FieldValue::l(1000));
    let queue = broker.declare_queue(&exchange, "#", args);
    let stream = to_stream.then(|| broker.own_stream());
    let exchange = stream.as_ref().map_or_else(|| exchange.name.clone(), |s| stream_exchange(s));
    let mut db = cluster.client();
    db.execute(
        "SELECT outbox.publish('Warm', '{}', exchange => $1) FROM generate_series(1, 10)",
        &[&exchange],
    )
    .unwrap();
    cluster.wait_drained(Duration::from_secs(60));
    // Drained and analyzed as empty, then idle: every plan the worker makes now sees an empty
    // table.
    db.batch_execute("ANALYZE outbox.messages").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let read_before = rows_read_sequentially(&cluster);

    let burst = 30_000;
    db.execute(
        "SELECT outbox.publish('Burst', jsonb_build_object('n', n), aggregate_id => (n % 1000)::text, exchange => $1)
           FROM generate_series(1, $2) n",
        &[&exchange, &burst],
    )
    .unwrap();
    wait_until(Duration::from_secs(300), "the burst to drain", || {
        (published(&cluster) >= 10 + burst as i64).then_some(())
    });
    wait_for_deletes_counted(&mut db, 10 + burst as i64);
    let scanning = worker_plans_scanning_the_outbox(&cluster.log());
    assert!(scanning.is_empty(), "plans that scan the outbox:\n{}", scanning.join("\n---\n"));
    assert_eq!(rows_read_sequentially(&cluster), read_before, "rows read by sequential scans");
    broker.delete_queue(&queue);
}

/// Index entries of the outbox's primary key read so far, by every process (the worker sends
/// its counts at most once a second).
fn primary_key_entries_read(cluster: &Cluster) -> i64 {
    cluster
        .client()
        .query_one("SELECT idx_tup_read FROM pg_stat_user_indexes WHERE indexrelname = 'messages_pkey'", &[])
        .unwrap()
        .get(0)
}

/// Events waiting for a stream (here `outbox.stream_url` is not set) hold the floor of the
/// stream path down, not the AMQP path's: its reads start above them instead of walking every
/// one of them each round.
#[test]
fn events_waiting_for_a_stream_are_not_walked_by_every_amqp_read() {
    let _alone = exclusive();
    let cluster = Cluster::start(&[("autovacuum", "off")]);
    let broker = Broker::connect();
    let exchange = broker.own_exchange();
    let consumer = broker.consume(&exchange, "#");
    let mut db = cluster.client();
    let waiting: i32 = 20_000;
    db.execute(
        "SELECT outbox.publish('Waiting', '{}', exchange => 'stream:nowhere') FROM generate_series(1, $1)",
        &[&waiting],
    )
    .unwrap();
    let before = primary_key_entries_read(&cluster);
    // One event at a time, each delivered before the next: a read (or more) per event.
    let events: usize = 100;
    for n in 1..=events {
        db.execute("SELECT outbox.publish('Flowing', '{}', exchange => $1)", &[&exchange.name]).unwrap();
        consumer.wait_for(n, Duration::from_secs(30));
    }
    wait_for_deletes_counted(&mut db, events as i64);
    let read = primary_key_entries_read(&cluster) - before;
    println!("{events} AMQP events past {waiting} waiting for a stream: {read} primary key entries read");
    // Walking them on every read would be at least `events` times `waiting` (2,000,000). The
    // floor steps over them a few times only: the reads before it first moved, its own first
    // move, and once or twice more if it starts over (every minute).
    assert!(read < events as i64 * waiting as i64 / 4, "{read} entries read for {events} events");
    let pending: i64 = db.query_one("SELECT count(*) FROM outbox.messages", &[]).unwrap().get(0);
    assert_eq!(pending, waiting as i64, "the stream's events wait, none lost");
}
