//! Backlogs that do not meet a fresh cluster: a burst after an idle spell (the outbox drained
//! and analyzed as empty, as autovacuum leaves it, and the worker idle), and a backlog after a
//! spell of steady flow. Each drain is printed beside a raw publisher run just before it and
//! the plain backlog drain of the same run.

use crate::cpu::measure;
use crate::latency::paced_publish;
use crate::relay::{bounded_queue, drain, published_total, raw_measured, write_backlog, Sizes};
use crate::{progress, Row};
use pg_outbox_tests::{unique, wait_until, Broker, Cluster};
use std::time::{Duration, Instant};

/// Writes `count` events in one transaction: they become visible at once, like a backlog.
/// Returns when the transaction committed.
fn write_in_one_transaction(cluster: &Cluster, exchange: &str, count: u64) -> Instant {
    let mut db = cluster.client();
    let mut tx = db.transaction().unwrap();
    tx.execute(
        "SELECT outbox.publish('FundsTransferEvent',
                jsonb_build_object('amount', 100, 'from', 'account-' || lpad((i % 1000)::text, 6, '0'),
                                   'to', 'account-' || lpad(((i + 1) % 1000)::text, 6, '0'),
                                   'currency', 'EUR', 'ref', lpad(i::text, 12, '0')),
                aggregate_type => 'account', aggregate_id => ((i * 7919) % 100000)::text, exchange => $1)
           FROM generate_series(1::int8, $2::int8) i",
        &[&exchange, &(count as i64)],
    )
    .unwrap();
    tx.commit().unwrap();
    Instant::now()
}

fn connected_cluster() -> Cluster {
    let cluster =
        Cluster::start(&crate::settings(&[("outbox.max_in_flight", "1000"), ("outbox.batch_size", "1000")]));
    cluster.wait_for_worker();
    wait_until(Duration::from_secs(60), "the worker to connect", || cluster.broker_connected().then_some(()));
    cluster
}

/// The rows; `plain` is the plain backlog drain rate of this run, if measured.
pub fn after_idle_and_flow(sizes: &Sizes, idle: Duration, plain: Option<f64>) -> Vec<Row> {
    let broker = Broker::connect();
    let exchange = unique("bench.burst");
    broker.exchange(&exchange);
    let mut queue = bounded_queue(&broker, &exchange);
    let count = sizes.backlog;
    let mut rows = Vec::new();
    let plain_text = plain.map(|p| format!("; plain backlog drain {p:.0} events/s")).unwrap_or_default();

    progress("raw amqprs publisher, before the burst");
    let raw = raw_measured(&exchange, sizes.raw, true);
    broker.delete_queue(&queue);
    queue = bounded_queue(&broker, &exchange);

    let cluster = connected_cluster();
    write_in_one_transaction(&cluster, &exchange, 1000);
    wait_until(Duration::from_secs(60), "the first events", || {
        (published_total(&cluster) >= 1000).then_some(())
    });
    cluster.client().batch_execute("ANALYZE outbox.messages").unwrap();
    progress(&format!("drained and analyzed as empty; idle for {idle:?}, then a burst of {count} events"));
    std::thread::sleep(idle);
    let worker = cluster.wait_for_worker() as u32;
    let before = published_total(&cluster);
    let (drained_in, _, cpu) = measure(&[worker], || {
        let committed = write_in_one_transaction(&cluster, &exchange, count);
        wait_until(Duration::from_secs(1800), "the burst to drain", || {
            (published_total(&cluster) - before >= count as i64).then_some(())
        });
        committed.elapsed()
    });
    let rate = count as f64 / drained_in.as_secs_f64();
    progress(&format!("  drained {drained_in:.1?} after its commit"));
    progress(&format!("  {rate:.0} events/s; worker CPU {:.0} µs per event", cpu[0] * 1e6 / count as f64));
    rows.push(Row {
        figure: format!(
            "relay: burst of {count} events after an idle spell (drained, analyzed as empty, idle {}s)",
            idle.as_secs()
        ),
        value: format!("{rate:.0} events/s"),
        baseline: format!("{raw:.0} msgs/s raw amqprs publisher{plain_text}"),
        ratio: Some(rate / raw),
        target: "like a backlog on a fresh cluster".into(),
        met: plain.map(|p| rate >= 0.9 * p),
    });
    drop(cluster);
    broker.delete_queue(&queue);
    queue = bounded_queue(&broker, &exchange);

    let cluster = connected_cluster();
    progress("10 s of steady flow at 1,000 events/s, then a backlog");
    let flowed = paced_publish(&cluster, &exchange, r#"{"amount": 100}"#, 1000, 4, 10).len();
    cluster.cut_off_broker();
    write_backlog(&cluster, &exchange, count);
    let rate = drain(&cluster, count);
    progress(&format!("  after {flowed} events of steady flow: drained at {rate:.0} events/s"));
    rows.push(Row {
        figure: format!("relay: backlog of {count} events after 10 s of steady flow at 1,000 events/s"),
        value: format!("{rate:.0} events/s"),
        baseline: format!("{raw:.0} msgs/s raw amqprs publisher{plain_text}"),
        ratio: Some(rate / raw),
        target: "like a backlog on a fresh cluster".into(),
        met: plain.map(|p| rate >= 0.9 * p),
    });
    broker.delete_queue(&queue);
    broker.delete_exchange(&exchange);
    rows
}

/// Primary-key index entries read from the outbox so far (every process; the worker reports
/// its counts at most once a second).
fn primary_key_entries_read(cluster: &Cluster) -> i64 {
    let sql = "SELECT idx_tup_read FROM pg_stat_user_indexes WHERE indexrelname = 'messages_pkey'";
    cluster.client().query_one(sql, &[]).unwrap().get(0)
}

/// A burst for an exchange, drained on a cluster where `waiting` events for a stream wait below
/// it (`outbox.stream_url` is not set): the rate, and primary-key entries read per event.
fn burst_past(broker: &Broker, exchange: &str, count: u64, waiting: u64) -> (f64, f64) {
    let queue = bounded_queue(broker, exchange);
    let cluster = connected_cluster();
    if waiting > 0 {
        write_backlog(&cluster, "stream:nowhere", waiting);
    }
    let before = published_total(&cluster);
    let read_before = primary_key_entries_read(&cluster);
    let committed = write_in_one_transaction(&cluster, exchange, count);
    wait_until(Duration::from_secs(1800), "the burst to drain", || {
        (published_total(&cluster) - before >= count as i64).then_some(())
    });
    let rate = count as f64 / committed.elapsed().as_secs_f64();
    // The worker's counts arrive within a second or so; its deletes tell when they did.
    wait_until(Duration::from_secs(30), "the worker's statistics", || {
        let sql = "SELECT n_tup_del FROM pg_stat_user_tables WHERE relid = 'outbox.messages'::regclass";
        let deleted: i64 = cluster.client().query_one(sql, &[]).unwrap().get(0);
        (deleted >= count as i64).then_some(())
    });
    let read = (primary_key_entries_read(&cluster) - read_before) as f64 / count as f64;
    broker.delete_queue(&queue);
    (rate, read)
}

/// The AMQP path past events that wait for a stream, beside the same burst with none waiting.
pub fn past_waiting_stream_events(sizes: &Sizes) -> Vec<Row> {
    let broker = Broker::connect();
    let exchange = unique("bench.floor");
    broker.exchange(&exchange);
    let (count, waiting) = (sizes.hot, sizes.backlog);
    progress(&format!("a burst of {count} events, none waiting for a stream"));
    let (alone, alone_read) = burst_past(&broker, &exchange, count, 0);
    progress(&format!("  {alone:.0} events/s; {alone_read:.1} primary-key entries read per event"));
    progress(&format!("the same burst with {waiting} events waiting for a stream below it"));
    let (past, past_read) = burst_past(&broker, &exchange, count, waiting);
    progress(&format!("  {past:.0} events/s; {past_read:.1} primary-key entries read per event"));
    broker.delete_exchange(&exchange);
    vec![Row {
        figure: format!(
            "relay: burst of {count} events with {waiting} events waiting for a stream below them \
             ({past_read:.1} primary-key entries read per event, {alone_read:.1} with none waiting)"
        ),
        value: format!("{past:.0} events/s"),
        baseline: format!("{alone:.0} events/s, the same burst with none waiting"),
        ratio: Some(past / alone),
        target: "like none waiting".into(),
        met: Some(past >= 0.9 * alone),
    }]
}
