//! Commit-to-consumer latency: events committed by several clients at a steady 1,000 per
//! second, and single events at idle, each with two poll intervals (the latency must not
//! depend on it: commits wake the worker). Baseline: a raw publisher's publish-to-consume
//! time for one message with a confirm, the broker's own floor.

use crate::{progress, Row};
use amqprs::channel::{BasicPublishArguments, ConfirmSelectArguments};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::BasicProperties;
use pg_outbox_tests::{unique, wait_until, Broker, Cluster};
use postgres::Client;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use uuid::Uuid;

pub struct Percentiles {
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub count: usize,
}

fn percentiles(mut v: Vec<Duration>) -> Percentiles {
    v.sort();
    let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    Percentiles { p50: at(0.5), p99: at(0.99), max: at(1.0), count: v.len() }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Publish-to-consume time of single messages published by a bare client (with a confirm).
fn raw_single(broker: &Broker, exchange: &str, samples: usize) -> Percentiles {
    let consumer = broker.consume(exchange, "Raw");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let sent: Vec<Instant> = rt.block_on(async {
        let connection = Connection::open(&OpenConnectionArguments::new("127.0.0.1", 5672, "guest", "guest"))
            .await
            .unwrap();
        let channel = connection.open_channel(None).await.unwrap();
        channel.confirm_select(ConfirmSelectArguments::new(false)).await.unwrap();
        let mut sent = Vec::new();
        for n in 0..samples {
            let mut props = BasicProperties::default();
            props.with_message_id(&n.to_string()).with_delivery_mode(2);
            sent.push(Instant::now());
            channel
                .basic_publish(props.finish(), b"{}".to_vec(), BasicPublishArguments::new(exchange, "Raw"))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        channel.close().await.ok();
        connection.close().await.ok();
        sent
    });
    let got = consumer.wait_for(samples, Duration::from_secs(30));
    let by_id: HashMap<String, Instant> =
        got.iter().map(|d| (d.message_id.clone().unwrap(), d.received_at)).collect();
    percentiles(
        sent.iter().enumerate().map(|(n, t)| by_id[&n.to_string()].saturating_duration_since(*t)).collect(),
    )
}

/// The payload of the latency benchmarks' events.
const TRANSFER: &str = r#"{"amount": 100, "from": "123", "to": "456"}"#;

fn publish(db: &mut Client, exchange: &str, aggregate: &str, payload: &str) -> Uuid {
    db.query_one(
        &format!(
            "SELECT outbox.publish('FundsTransferEvent', '{payload}',
                                   aggregate_type => 'account', aggregate_id => $1, exchange => $2)"
        ),
        &[&aggregate, &exchange],
    )
    .unwrap()
    .get(0)
}

/// `clients` clients each committing `per_second / clients` events per second for `seconds`,
/// one event per transaction, evenly staggered; each event's message id and the moment its
/// COMMIT returned.
pub fn paced_publish(
    cluster: &Cluster,
    exchange: &str,
    payload: &str,
    per_second: u64,
    clients: u64,
    seconds: u64,
) -> Vec<(String, Instant)> {
    let interval = Duration::from_secs_f64(clients as f64 / per_second as f64);
    let mut dbs: Vec<Client> = (0..clients).map(|_| cluster.client()).collect();
    let started = Instant::now();
    let writers: Vec<_> = dbs
        .drain(..)
        .enumerate()
        .map(|(c, mut db)| {
            let (exchange, payload) = (exchange.to_string(), payload.to_string());
            std::thread::spawn(move || {
                let mut committed = Vec::new();
                let mut next = started + interval.mul_f64(c as f64 / clients as f64);
                let end = started + Duration::from_secs(seconds);
                let mut n = 0u64;
                while next < end {
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let id = publish(&mut db, &exchange, &format!("{c}-{}", n % 50), &payload);
                    committed.push((id.to_string(), Instant::now()));
                    n += 1;
                    next += interval;
                }
                committed
            })
        })
        .collect();
    writers.into_iter().flat_map(|w| w.join().unwrap()).collect()
}

/// Latency from COMMIT returning to the consumer receiving the event, under a paced flow.
fn steady(cluster: &Cluster, broker: &Broker, per_second: u64, clients: u64, seconds: u64) -> Percentiles {
    let exchange = unique("bench.latency");
    broker.exchange(&exchange);
    let consumer = broker.consume(&exchange, "#");
    let committed = paced_publish(cluster, &exchange, TRANSFER, per_second, clients, seconds);
    let got = consumer.wait_for(committed.len(), Duration::from_secs(60));
    let received: HashMap<String, Instant> =
        got.iter().map(|d| (d.message_id.clone().unwrap(), d.received_at)).collect();
    let latencies = committed.iter().map(|(id, at)| received[id].saturating_duration_since(*at)).collect();
    broker.delete_queue(&consumer.queue);
    broker.delete_exchange(&exchange);
    percentiles(latencies)
}

/// Single events at idle, one at a time.
fn idle(cluster: &Cluster, broker: &Broker, samples: usize) -> Percentiles {
    let exchange = unique("bench.idle");
    broker.exchange(&exchange);
    let consumer = broker.consume(&exchange, "#");
    let mut db = cluster.client();
    let mut latencies = Vec::new();
    for n in 0..samples {
        std::thread::sleep(Duration::from_millis(100));
        publish(&mut db, &exchange, "idle", TRANSFER);
        let committed = Instant::now();
        let got = consumer.wait_for(n + 1, Duration::from_secs(30));
        latencies.push(got[n].received_at.saturating_duration_since(committed));
    }
    broker.delete_queue(&consumer.queue);
    broker.delete_exchange(&exchange);
    percentiles(latencies)
}

/// What waking from idle costs on this machine, outside pg_outbox: the round trip of a small
/// catalog query sent at the idle benchmark's pace, and the same sent back to back.
fn cold_query(cluster: &Cluster, samples: usize) -> (Percentiles, Percentiles) {
    const QUERY: &str = "SELECT count(*) FROM pg_class";
    let mut db = cluster.client();
    let mut timed = |pause: Duration| {
        let mut times = Vec::with_capacity(samples);
        for _ in 0..samples {
            std::thread::sleep(pause);
            let started = Instant::now();
            db.query_one(QUERY, &[]).unwrap();
            times.push(started.elapsed());
        }
        percentiles(times)
    };
    (timed(Duration::from_millis(100)), timed(Duration::ZERO))
}

pub fn latency(seconds: u64) -> Vec<Row> {
    let broker = Broker::connect();
    let exchange = unique("bench.raw");
    broker.exchange(&exchange);
    progress("raw publish-to-consume time of single messages");
    let raw = raw_single(&broker, &exchange, 200);
    broker.delete_exchange(&exchange);
    progress(&format!("  p50 {} p99 {}", ms(raw.p50), ms(raw.p99)));

    let mut rows = Vec::new();
    for poll in ["1s", "60s"] {
        let poll_setting = format!("'{poll}'");
        let cluster = Cluster::start(&crate::settings(&[("outbox.poll_interval", poll_setting.as_str())]));
        cluster.wait_for_worker();
        std::thread::sleep(Duration::from_secs(1));
        // A worker that has just started (its plans, caches and connection are new): load
        // begins as soon as it runs.
        let fresh = (poll == "1s").then(|| {
            let old = cluster.wait_for_worker();
            cluster.admin().query_one("SELECT pg_terminate_backend($1)", &[&old]).unwrap();
            wait_until(Duration::from_secs(60), "a new worker", || {
                cluster.worker_pid().filter(|p| *p != old)
            });
            progress("latency at 1000 events/s in a fresh worker's first 5 s");
            let fresh = steady(&cluster, &broker, 1000, 4, 5);
            progress(&format!("  p50 {} p99 {} max {}", ms(fresh.p50), ms(fresh.p99), ms(fresh.max)));
            fresh
        });
        progress(&format!("latency at 1000 events/s from 4 clients for {seconds} s, poll interval {poll}"));
        let load = steady(&cluster, &broker, 1000, 4, seconds);
        progress(&format!(
            "  {} events: p50 {} p99 {} max {}",
            load.count,
            ms(load.p50),
            ms(load.p99),
            ms(load.max)
        ));
        progress(&format!("single events at idle, poll interval {poll}"));
        let single = idle(&cluster, &broker, 50);
        progress(&format!("  p50 {} p99 {}", ms(single.p50), ms(single.p99)));
        let (cold, warm) = cold_query(&cluster, 50);
        progress(&format!(
            "  a catalog query's round trip at the same pace: p50 {} (back to back: p50 {})",
            ms(cold.p50),
            ms(warm.p50)
        ));
        rows.push(Row {
            figure: format!(
                "latency, commit to consumer, 1,000 events/s from 4 clients (poll interval {poll})"
            ),
            value: format!("p50 {} · p99 {} · max {}", ms(load.p50), ms(load.p99), ms(load.max)),
            baseline: format!("raw publish→consume p50 {} · p99 {}", ms(raw.p50), ms(raw.p99)),
            ratio: None,
            target: "p50 ≤ 2 ms, p99 ≤ 10 ms".into(),
            met: Some(load.p50 <= Duration::from_millis(2) && load.p99 <= Duration::from_millis(10)),
        });
        if let Some(fresh) = fresh {
            rows.push(Row {
                figure: "latency, commit to consumer, 1,000 events/s in a fresh worker's first 5 s".into(),
                value: format!("p50 {} · p99 {} · max {}", ms(fresh.p50), ms(fresh.p99), ms(fresh.max)),
                baseline: format!("the same worker warm: p50 {} · p99 {}", ms(load.p50), ms(load.p99)),
                ratio: None,
                target: "p99 ≤ 10 ms".into(),
                met: Some(fresh.p99 <= Duration::from_millis(10)),
            });
        }
        rows.push(Row {
            figure: format!("latency, single event at idle (poll interval {poll})"),
            value: format!("p50 {} · p99 {}", ms(single.p50), ms(single.p99)),
            baseline: format!(
                "raw p50 {}; waking from idle: a catalog query at the same pace p50 {} (back to back {})",
                ms(raw.p50),
                ms(cold.p50),
                ms(warm.p50)
            ),
            ratio: None,
            target: "reported".into(),
            met: None,
        });
    }
    rows
}
