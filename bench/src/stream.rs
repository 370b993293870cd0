//! Streams, exactly once: events for `stream:<name>` drained into a RabbitMQ stream by the
//! worker (publishing ids assigned and committed before sending), against a bare producer on
//! the worker's own stream client sending the same messages with the same window, runs before
//! and after the drain; the same events over the AMQP path (topic exchange, durable queue)
//! against the raw amqprs publisher; and commit-to-consume latency of both paths, each read by
//! the same AMQP consumer, beside the bare producer's publish-to-consume time (the broker's
//! floor).

mod consume;
mod producer;

use crate::cpu::{measure, rabbitmq_pid};
use crate::relay::{bounded_queue, raw_measured};
use crate::{progress, Row};
use consume::Percentiles;
use pg_outbox_tests::{unique, wait_until, Broker, Cluster};
use std::time::{Duration, Instant};

/// Unconfirmed messages at most: `outbox.max_in_flight` of the cluster, the bare producer's window.
const WINDOW: u64 = 1000;

pub struct Sizes {
    /// Events of each backlog, and messages of each bare producer run.
    pub count: u64,
    /// Aggregates the events belong to (accounts, in turn).
    pub aggregates: u64,
    /// Seconds of each latency measurement, and events committed per second.
    pub seconds: u64,
    pub per_second: u64,
}

impl Sizes {
    pub fn full() -> Sizes {
        Sizes { count: 20_000, aggregates: 1_000, seconds: 10, per_second: 200 }
    }
    pub fn quick() -> Sizes {
        Sizes { count: 5_000, aggregates: 1_000, seconds: 5, per_second: 200 }
    }
}

/// Writes `count` events to `exchange` in transactions of 50,000: the relay benchmark's events
/// (about 100 bytes of JSON), one aggregate per account over `aggregates` accounts, with the
/// two headers of [`producer::HEADERS`].
fn write_backlog(cluster: &Cluster, exchange: &str, count: u64, aggregates: u64) {
    let mut db = cluster.client();
    let statement = format!(
        "SELECT outbox.publish('FundsTransferEvent',
                jsonb_build_object('amount', 100, 'from', 'account-' || lpad((i % 1000)::text, 6, '0'),
                                   'to', 'account-' || lpad(((i + 1) % 1000)::text, 6, '0'),
                                   'currency', 'EUR', 'ref', lpad(i::text, 12, '0')),
                aggregate_type => 'account', aggregate_id => 'account-' || lpad((i % $4::int8)::text, 6, '0'),
                headers => '{}'::jsonb, exchange => $1)
           FROM generate_series($2::int8, $2::int8 + $3::int8 - 1) i",
        producer::HEADERS
    );
    let mut done = 0u64;
    while done < count {
        let n = (count - done).min(50_000) as i64;
        db.execute(&statement, &[&exchange, &(done as i64), &n, &(aggregates as i64)]).unwrap();
        done += n as u64;
    }
}

/// Calls `let_go` (which lets the worker reach the broker) and times until the outbox is empty:
/// every event confirmed and deleted. The rate, and the CPU per event of the worker and of
/// RabbitMQ, in µs.
fn drain(cluster: &Cluster, count: u64, let_go: impl FnOnce()) -> (f64, (f64, f64)) {
    let mut db = cluster.client();
    let worker = cluster.wait_for_worker() as u32;
    let rabbit = rabbitmq_pid().unwrap_or(0);
    let (rate, _, cpu) = measure(&[worker, rabbit], || {
        let started = Instant::now();
        let_go();
        wait_until(Duration::from_secs(600), "the outbox to drain", || {
            let empty: bool =
                db.query_one("SELECT NOT EXISTS (SELECT 1 FROM outbox.messages)", &[]).unwrap().get(0);
            empty.then_some(())
        });
        count as f64 / started.elapsed().as_secs_f64()
    });
    let dead: i64 = db.query_one("SELECT count(*) FROM outbox.dead_letters", &[]).unwrap().get(0);
    assert_eq!(dead, 0, "events were dead-lettered: see the cluster's log");
    (rate, (cpu[0] * 1e6 / count as f64, cpu[1] * 1e6 / count as f64))
}

/// Whether the installed pg_outbox has the stream path (`outbox.stream_url`).
fn has_streams(cluster: &Cluster) -> bool {
    let row =
        cluster.client().query_one("SELECT current_setting('outbox.stream_url', true) IS NOT NULL", &[]);
    row.map(|r| r.get(0)).unwrap_or(false)
}

/// Publish-to-consume time of single messages from the bare producer, read by the same
/// consumer as the events: the broker's own floor for the stream path.
fn bare_latency(stream: &str, producer: &str, per_second: u64, seconds: u64) -> Percentiles {
    let consumer = consume::NumberedConsumer::start(stream, true);
    let sent = producer::paced_single(stream, producer, 3_000_000, per_second, seconds);
    let numbers: Vec<u64> = sent.iter().map(|(k, _)| *k).collect();
    let received = consumer.wait_for(&numbers, Duration::from_secs(60));
    Percentiles::of(sent.iter().map(|(k, at)| received[k].saturating_duration_since(*at)).collect())
}

fn rates(runs: &[f64]) -> String {
    runs.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ")
}

pub fn stream(sizes: &Sizes) -> Vec<Row> {
    let Sizes { count, aggregates, seconds, per_second } = *sizes;
    let broker = Broker::connect();
    let name = unique("bench.stream");
    consume::declare_stream(&name);
    let stream_exchange = format!("{}{name}", pg_outbox_core::stream::PREFIX);
    let bare_producer = format!("bench/{name}");
    let bare_run = || {
        progress(&format!(
            "bare stream producer (the worker's StreamLink): {count} messages, at most {WINDOW} unconfirmed"
        ));
        let me = std::process::id();
        let rabbit = rabbitmq_pid().unwrap_or(0);
        let (run, _, cpu) = measure(&[me, rabbit], || {
            producer::publish_rate(&name, &bare_producer, count, aggregates, WINDOW)
        });
        assert_eq!(run.confirmed, count);
        progress(&format!(
            "  {:.0} msgs/s; CPU per message: producer {:.0} µs, RabbitMQ {:.0} µs",
            run.rate,
            cpu[0] * 1e6 / count as f64,
            cpu[1] * 1e6 / count as f64
        ));
        run.rate
    };
    let mut bare = vec![bare_run()];
    progress(&format!(
        "bare stream producer, single messages: {per_second}/s for {seconds} s, publish to consume"
    ));
    let floor = bare_latency(&name, &bare_producer, per_second, seconds);
    progress(&format!("  {} messages: {} · max {:.2?}", floor.count, floor.text(), floor.max));

    let cluster =
        Cluster::start(&crate::settings(&[("outbox.max_in_flight", "1000"), ("outbox.batch_size", "1000")]));
    cluster.wait_for_worker();
    wait_until(Duration::from_secs(60), "the worker to connect", || cluster.broker_connected().then_some(()));
    let streams = has_streams(&cluster);
    let mut stream_drain = None;
    let mut stream_latency = None;
    if streams {
        // outbox.stream_url is empty: the events wait until it is set.
        progress(&format!("writing {count} events to {stream_exchange} ({aggregates} aggregates)"));
        write_backlog(&cluster, &stream_exchange, count, aggregates);
        progress("  setting outbox.stream_url; draining");
        let url = format!("'{}'", producer::STREAM_URL);
        let (rate, cpu) =
            drain(&cluster, count, || cluster.reconfigure(&[("outbox.stream_url", url.as_str())]));
        progress(&format!(
            "  drained at {rate:.0} events/s; CPU per event: worker {:.0} µs, RabbitMQ {:.0} µs",
            cpu.0, cpu.1
        ));
        stream_drain = Some((rate, cpu));
        bare.push(bare_run());
        progress(&format!("stream latency: {per_second} events/s from one client for {seconds} s"));
        let latency =
            consume::latency(&cluster, &stream_exchange, &name, true, 1_000_000, per_second, seconds);
        progress(&format!("  {} events: {} · max {:.2?}", latency.count, latency.text(), latency.max));
        stream_latency = Some(latency);
    } else {
        progress("the installed pg_outbox has no outbox.stream_url: the stream path is not measured");
    }

    // The AMQP path on the same events, with its own baseline.
    let exchange = unique("bench.stream.amqp");
    broker.exchange(&exchange);
    let mut queue = bounded_queue(&broker, &exchange);
    progress(&format!("raw amqprs publisher: {count} persistent messages, at most {WINDOW} unconfirmed"));
    let raw = raw_measured(&exchange, count, true);
    broker.delete_queue(&queue);
    queue = bounded_queue(&broker, &exchange);
    cluster.cut_off_broker();
    progress(&format!("writing the same {count} events to a topic exchange"));
    write_backlog(&cluster, &exchange, count, aggregates);
    let (amqp_rate, amqp_cpu) = drain(&cluster, count, || cluster.reconnect_broker());
    progress(&format!(
        "  drained at {amqp_rate:.0} events/s; CPU per event: worker {:.0} µs, RabbitMQ {:.0} µs",
        amqp_cpu.0, amqp_cpu.1
    ));
    broker.delete_queue(&queue);
    wait_until(Duration::from_secs(60), "the worker to connect", || cluster.broker_connected().then_some(()));
    let latency_queue = broker.queue(&exchange, "#");
    progress(&format!("AMQP latency: {per_second} events/s from one client for {seconds} s"));
    let amqp_latency =
        consume::latency(&cluster, &exchange, &latency_queue, false, 2_000_000, per_second, seconds);
    progress(&format!(
        "  {} events: {} · max {:.2?}",
        amqp_latency.count,
        amqp_latency.text(),
        amqp_latency.max
    ));
    broker.delete_queue(&latency_queue);
    broker.delete_exchange(&exchange);
    consume::delete_queue(&name);

    let bare_rate = bare.iter().sum::<f64>() / bare.len() as f64;
    let not_measured = || "not measured (no stream path installed)".to_string();
    let stream_vs_amqp = stream_drain
        .map(|(r, _)| format!("; the AMQP path {amqp_rate:.0} events/s ({:.0}%)", r / amqp_rate * 100.0));
    vec![
        Row {
            figure: format!(
                "stream: drain {count} committed events into a stream, exactly once ({aggregates} aggregates)"
            ),
            value: stream_drain.map_or_else(not_measured, |(r, cpu)| {
                format!("{r:.0} events/s (worker {:.0} µs, RabbitMQ {:.0} µs CPU/event)", cpu.0, cpu.1)
            }),
            baseline: format!(
                "{bare_rate:.0} msgs/s bare producer on the worker's stream client (runs: {}){}",
                rates(&bare),
                stream_vs_amqp.unwrap_or_default()
            ),
            ratio: stream_drain.map(|(r, _)| r / bare_rate),
            target: "reported".into(),
            met: None,
        },
        Row {
            figure: format!("AMQP path: drain the same {count} events (topic exchange, durable queue)"),
            value: format!(
                "{amqp_rate:.0} events/s (worker {:.0} µs, RabbitMQ {:.0} µs CPU/event)",
                amqp_cpu.0, amqp_cpu.1
            ),
            baseline: format!("{raw:.0} msgs/s raw amqprs publisher"),
            ratio: Some(amqp_rate / raw),
            target: "context".into(),
            met: None,
        },
        Row {
            figure: format!(
                "stream: latency, commit to consumer, {per_second} events/s from one client for {seconds} s"
            ),
            value: stream_latency.as_ref().map_or_else(not_measured, Percentiles::text),
            baseline: format!(
                "AMQP path: {}; bare stream producer, publish to consume: {}",
                amqp_latency.text(),
                floor.text()
            ),
            ratio: None,
            target: "reported".into(),
            met: None,
        },
    ]
}
