//! Relay throughput: a backlog of committed events drained to the broker, against the raw
//! publisher's rate; the same per-event rate for 100,000 and 1,000,000 events; and the size of
//! the outbox after draining.

use crate::cpu::{measure, rabbitmq_pid};
use crate::{progress, raw, Row};
use pg_outbox_tests::{unique, wait_until, Broker, Cluster};
use std::time::{Duration, Instant};

pub struct Sizes {
    pub hot: u64,
    pub raw: u64,
    pub backlog: u64,
    pub small: u64,
    pub big: u64,
}

impl Sizes {
    pub fn full() -> Sizes {
        Sizes { hot: 20_000, raw: 200_000, backlog: 200_000, small: 100_000, big: 1_000_000 }
    }
    pub fn quick() -> Sizes {
        Sizes { hot: 5_000, raw: 50_000, backlog: 50_000, small: 20_000, big: 100_000 }
    }
}

/// Writes `count` events (about 100 bytes of JSON each, one aggregate per account) in
/// transactions of 50,000.
pub fn write_backlog(cluster: &Cluster, exchange: &str, count: u64) {
    let mut db = cluster.client();
    let mut done = 0u64;
    while done < count {
        let n = (count - done).min(50_000) as i64;
        db.execute(
            "SELECT outbox.publish('FundsTransferEvent',
                    jsonb_build_object('amount', 100, 'from', 'account-' || lpad((i % 1000)::text, 6, '0'),
                                       'to', 'account-' || lpad(((i + 1) % 1000)::text, 6, '0'),
                                       'currency', 'EUR', 'ref', lpad(i::text, 12, '0')),
                    aggregate_type => 'account', aggregate_id => ((i * 7919) % 100000)::text,
                    exchange => $1)
               FROM generate_series($2::int8, $2::int8 + $3::int8 - 1) i",
            &[&exchange, &(done as i64), &n],
        )
        .unwrap();
        done += n as u64;
    }
}

pub fn published_total(cluster: &Cluster) -> i64 {
    cluster
        .client()
        .query_one("SELECT coalesce(published_total, 0) FROM outbox.worker_status()", &[])
        .unwrap()
        .get(0)
}

/// Lets the worker reach the broker and times the drain of `count` pending events.
pub fn drain(cluster: &Cluster, count: u64) -> f64 {
    let before = published_total(cluster);
    let started = Instant::now();
    cluster.reconnect_broker();
    wait_until(Duration::from_secs(600), "the backlog to drain", || {
        (published_total(cluster) - before >= count as i64).then_some(())
    });
    count as f64 / started.elapsed().as_secs_f64()
}

pub fn relation_sizes(cluster: &Cluster) -> (i64, i64) {
    let row = cluster
        .client()
        .query_one("SELECT pg_relation_size('outbox.messages'), pg_indexes_size('outbox.messages')", &[])
        .unwrap();
    (row.get(0), row.get(1))
}

/// A durable queue that keeps at most 10,000 messages (dropping the oldest): the broker's work
/// per message stays the same whatever the backlog, for the baseline and the relay alike.
pub fn bounded_queue(broker: &Broker, exchange: &str) -> String {
    let mut args = amqprs::FieldTable::new();
    args.insert("x-max-length".try_into().unwrap(), amqprs::FieldValue::l(10_000));
    args.insert("x-overflow".try_into().unwrap(), amqprs::FieldValue::S("drop-head".try_into().unwrap()));
    broker.declare_queue(exchange, "#", args)
}

/// Writes a backlog of `count` events with the worker cut off, then lets it drain them;
/// returns the rate and the CPU per event of the worker and of RabbitMQ, in µs.
fn backlog_drain(
    cluster: &Cluster,
    broker: &Broker,
    exchange: &str,
    queue: &mut String,
    count: u64,
) -> (f64, (f64, f64)) {
    progress(&format!("writing a backlog of {count} events"));
    let t = Instant::now();
    write_backlog(cluster, exchange, count);
    progress(&format!("  written in {:.1?}; draining", t.elapsed()));
    let worker = cluster.wait_for_worker() as u32;
    let rabbit = rabbitmq_pid().unwrap_or(0);
    let (rate, _, cpu) = measure(&[worker, rabbit], || drain(cluster, count));
    let per_event = (cpu[0] * 1e6 / count as f64, cpu[1] * 1e6 / count as f64);
    progress(&format!(
        "  drained at {rate:.0} events/s; CPU per event: worker {:.0} µs, RabbitMQ {:.0} µs",
        per_event.0, per_event.1
    ));
    broker.delete_queue(queue);
    *queue = bounded_queue(broker, exchange);
    cluster.cut_off_broker();
    (rate, per_event)
}

/// The raw publisher's rate, with the CPU it and the broker used per message.
pub fn raw_measured(exchange: &str, count: u64, mandatory: bool) -> f64 {
    let me = std::process::id();
    let rabbit = rabbitmq_pid().unwrap_or(0);
    let (rate, _, cpu) =
        measure(&[me, rabbit], || raw::publish_rate(exchange, "FundsTransferEvent", count, 1000, mandatory));
    progress(&format!(
        "  {rate:.0} msgs/s; CPU per message: publisher {:.0} µs, RabbitMQ {:.0} µs",
        cpu[0] * 1e6 / count as f64,
        cpu[1] * 1e6 / count as f64
    ));
    rate
}

/// Returns the rows and the relay's drain rate for the first backlog.
pub fn throughput(sizes: &Sizes) -> (Vec<Row>, f64) {
    let broker = Broker::connect();
    let exchange = unique("bench");
    broker.exchange(&exchange);
    let mut queue = bounded_queue(&broker, &exchange);

    let cluster =
        Cluster::start(&crate::settings(&[("outbox.max_in_flight", "1000"), ("outbox.batch_size", "1000")]));
    cluster.wait_for_worker();
    let idle = relation_sizes(&cluster);
    cluster.cut_off_broker();

    // The broker's speed drifts during a run (its CPU per message varies by 20% from one
    // minute to the next here), so raw and relay measurements alternate, and each relay
    // drain is compared with the raw runs just before and after it.
    let raw_run = |queue: &mut String| {
        progress(&format!(
            "raw amqprs publisher: {} persistent messages, at most 1000 unconfirmed",
            sizes.raw
        ));
        let rate = raw_measured(&exchange, sizes.raw, true);
        broker.delete_queue(queue);
        *queue = bounded_queue(&broker, &exchange);
        rate
    };
    let mut raw_rates = vec![raw_run(&mut queue)];
    let mut relay_rates = Vec::new();
    for _ in 0..2 {
        relay_rates.push(backlog_drain(&cluster, &broker, &exchange, &mut queue, sizes.backlog).0);
        raw_rates.push(raw_run(&mut queue));
    }
    let ratios: Vec<f64> =
        relay_rates.iter().enumerate().map(|(i, r)| r / ((raw_rates[i] + raw_rates[i + 1]) / 2.0)).collect();
    let ratio = ratios.iter().sum::<f64>() / ratios.len() as f64;
    let relay_rate = relay_rates.iter().sum::<f64>() / relay_rates.len() as f64;
    let raw_rate = raw_rates.iter().sum::<f64>() / raw_rates.len() as f64;

    // What the broker does without a queue to store into: the kind of figure often quoted for
    // "confirmed publishing", and why the baseline above is lower.
    let unqueued_exchange = unique("bench.noqueue");
    broker.exchange(&unqueued_exchange);
    progress(&format!("raw amqprs publisher into an exchange with no queue: {} messages", sizes.raw));
    let unqueued_rate = raw_measured(&unqueued_exchange, sizes.raw, false);
    broker.delete_exchange(&unqueued_exchange);

    let (small_rate, small_cpu) = backlog_drain(&cluster, &broker, &exchange, &mut queue, sizes.small);
    let (big_rate, big_cpu) = backlog_drain(&cluster, &broker, &exchange, &mut queue, sizes.big);
    let rates = [relay_rate, small_rate, big_rate];
    let worker_cpu = [(0.0, 0.0), small_cpu, big_cpu];

    // One hot aggregate: every event of the backlog belongs to it, so each waits for the
    // previous one's confirm (the price of per-aggregate order).
    let hot = sizes.hot;
    progress(&format!("writing {hot} events of one aggregate"));
    cluster
        .client()
        .execute(
            "SELECT count(outbox.publish('FundsTransferEvent', jsonb_build_object('amount', 100, 'ref', i),
                                         aggregate_type => 'account', aggregate_id => 'hot', exchange => $1))
               FROM generate_series(1, $2::int8) i",
            &[&exchange.to_string(), &(hot as i64)],
        )
        .unwrap();
    let hot_rate = drain(&cluster, hot);
    progress(&format!("  drained at {hot_rate:.0} events/s"));

    let after_drain = relation_sizes(&cluster);
    progress("waiting up to 60 s for the outbox to shrink (worker truncation / autovacuum)");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut settled = relation_sizes(&cluster);
    while settled.0 + settled.1 > idle.0 + idle.1 + 256 * 1024 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        settled = relation_sizes(&cluster);
    }
    broker.delete_queue(&queue);
    broker.delete_exchange(&exchange);

    let kb = |b: i64| format!("{} kB", b / 1024);
    let rows = vec![
        Row {
            figure: "raw: the same publisher into an exchange with no queue (nothing stored)".into(),
            value: format!("{unqueued_rate:.0} msgs/s"),
            baseline: format!("{raw_rate:.0} msgs/s into a durable queue"),
            ratio: Some(unqueued_rate / raw_rate),
            target: "context for the baseline".into(),
            met: None,
        },
        Row {
            figure: format!("relay: drain {hot} events of a single aggregate (one unconfirmed at a time)"),
            value: format!("{hot_rate:.0} events/s"),
            baseline: format!("{:.0} events/s over many aggregates", rates[0]),
            ratio: Some(hot_rate / rates[0]),
            target: "reported".into(),
            met: None,
        },
        Row {
            figure: format!("relay: drain {} committed events (twice)", sizes.backlog),
            value: format!(
                "{:.0} events/s ({})",
                rates[0],
                relay_rates.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ")
            ),
            baseline: format!(
                "{raw_rate:.0} msgs/s raw amqprs publisher (runs: {})",
                raw_rates.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ")
            ),
            ratio: Some(ratio),
            target: "≥ 80% of raw (each drain against the raw runs around it)".into(),
            met: Some(ratio >= 0.8),
        },
        Row {
            figure: format!("relay: worker CPU per event, draining {} vs {}", sizes.big, sizes.small),
            value: format!("{:.1} µs", worker_cpu[2].0),
            baseline: format!("{:.1} µs", worker_cpu[1].0),
            ratio: Some(worker_cpu[2].0 / worker_cpu[1].0),
            target: "no more work per event".into(),
            met: Some(worker_cpu[2].0 <= 1.1 * worker_cpu[1].0),
        },
        Row {
            figure: format!("relay: drain rate, {} vs {} events", sizes.big, sizes.small),
            value: format!("{:.0} events/s (RabbitMQ {:.0} µs CPU/msg)", rates[2], worker_cpu[2].1),
            baseline: format!("{:.0} events/s (RabbitMQ {:.0} µs CPU/msg)", rates[1], worker_cpu[1].1),
            ratio: Some(rates[2] / rates[1]),
            target: "no slower per event".into(),
            met: Some(rates[2] >= 0.9 * rates[1]),
        },
        Row {
            figure: format!("bloat: outbox table + indexes after draining {}", sizes.big),
            value: format!("{} (at once: {})", kb(settled.0 + settled.1), kb(after_drain.0 + after_drain.1)),
            baseline: format!("{} idle", kb(idle.0 + idle.1)),
            ratio: None,
            target: "near idle size".into(),
            met: Some(settled.0 + settled.1 <= idle.0 + idle.1 + 256 * 1024),
        },
    ];
    (rows, rates[0])
}
