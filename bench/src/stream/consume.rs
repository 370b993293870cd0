//! Commit-to-consume latency of the stream path and of the AMQP path, measured the same way:
//! one writer commits single events at a steady pace, each with its number in the payload,
//! and takes the clock as soon as its COMMIT returns; one AMQP consumer (prefetch 1000, manual
//! acks) reads a stream (from `x-stream-offset = "next"`) or a classic queue and takes the
//! clock as each delivery arrives.

use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicQosArguments, Channel, QueueDeclareArguments,
    QueueDeleteArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{FieldTable, FieldValue};
use pg_outbox_tests::Cluster;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

/// Unacknowledged deliveries the consumer allows (a stream consumer must set one).
pub const PREFETCH: u16 = 1000;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
}

async fn connect() -> Connection {
    Connection::open(&OpenConnectionArguments::new("127.0.0.1", 5672, "guest", "guest")).await.unwrap()
}

/// Declares the stream `name` over AMQP: a durable queue of type `stream`.
pub fn declare_stream(name: &str) {
    let mut args = FieldTable::new();
    args.insert("x-queue-type".try_into().unwrap(), FieldValue::S("stream".try_into().unwrap()));
    runtime().block_on(async {
        // Right after the stream plugin is enabled the stream coordinator may not take
        // declarations yet: the broker answers with `internal_error`, which closes the whole
        // connection. Try again, on a new connection each time, for a while.
        for attempt in 1..=60 {
            let connection = connect().await;
            let declared: Result<(), amqprs::error::Error> = async {
                let channel = connection.open_channel(None).await?;
                let declare = QueueDeclareArguments::new(name).durable(true).arguments(args.clone()).finish();
                channel.queue_declare(declare).await?;
                channel.close().await
            }
            .await;
            connection.close().await.ok();
            match declared {
                Ok(()) => break,
                Err(e) if attempt == 60 => panic!("declaring stream {name}: {e}"),
                Err(_) => tokio::time::sleep(std::time::Duration::from_secs(1)).await,
            }
        }
    });
}

/// Deletes a queue or stream.
pub fn delete_queue(name: &str) {
    runtime().block_on(async {
        let connection = connect().await;
        let channel = connection.open_channel(None).await.unwrap();
        let _ = channel.queue_delete(QueueDeleteArguments::new(name)).await;
        channel.close().await.ok();
        connection.close().await.ok();
    });
}

/// A consumer of one queue or stream: each delivery's number (the payload's `k`) and when it
/// arrived.
pub struct NumberedConsumer {
    received: Arc<Mutex<HashMap<u64, Instant>>>,
    channel: Option<Channel>,
    connection: Option<Connection>,
    rt: Runtime,
}

impl NumberedConsumer {
    /// Consumes `queue` from now on; `stream`: it is a stream, read from the next message on.
    pub fn start(queue: &str, stream: bool) -> NumberedConsumer {
        let rt = runtime();
        let received = Arc::new(Mutex::new(HashMap::new()));
        let sink = received.clone();
        let (connection, channel) = rt.block_on(async {
            let connection = connect().await;
            let channel = connection.open_channel(None).await.unwrap();
            channel.basic_qos(BasicQosArguments::new(0, PREFETCH, false)).await.unwrap();
            let mut args = FieldTable::new();
            if stream {
                args.insert("x-stream-offset".try_into().unwrap(), FieldValue::S("next".try_into().unwrap()));
            }
            let consume = BasicConsumeArguments::new(queue, "").manual_ack(true).arguments(args).finish();
            let (_tag, mut rx) = channel.basic_consume_rx(consume).await.unwrap();
            let acks = channel.clone();
            tokio::spawn(async move {
                while let Some(msg) = rx.recv().await {
                    let at = Instant::now();
                    let tag = msg.deliver.as_ref().unwrap().delivery_tag();
                    let body = msg.content.unwrap_or_default();
                    if let Some(k) = number(&body) {
                        sink.lock().unwrap().insert(k, at);
                    }
                    if acks.basic_ack(BasicAckArguments::new(tag, false)).await.is_err() {
                        break;
                    }
                }
            });
            (connection, channel)
        });
        NumberedConsumer { received, channel: Some(channel), connection: Some(connection), rt }
    }

    /// Waits until every number in `numbers` arrived; their arrival times.
    pub fn wait_for(&self, numbers: &[u64], within: Duration) -> HashMap<u64, Instant> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.received.lock().unwrap().clone();
            let missing = numbers.iter().filter(|k| !got.contains_key(k)).count();
            if missing == 0 {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{missing} of {} events not consumed after {within:?}",
                numbers.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NumberedConsumer {
    fn drop(&mut self) {
        let (channel, connection) = (self.channel.take(), self.connection.take());
        self.rt.block_on(async {
            if let Some(c) = channel {
                let _ = tokio::time::timeout(Duration::from_secs(2), c.close()).await;
            }
            if let Some(c) = connection {
                let _ = tokio::time::timeout(Duration::from_secs(2), c.close()).await;
            }
        });
    }
}

/// The payload's number `k`.
fn number(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(body).ok()?.get("k")?.as_u64()
}

/// One client committing one event per transaction to `exchange`, `per_second` for `seconds`,
/// numbered from `first` in the payload; each number and the moment its COMMIT returned.
pub fn paced_numbered(
    cluster: &Cluster,
    exchange: &str,
    first: u64,
    per_second: u64,
    seconds: u64,
) -> Vec<(u64, Instant)> {
    let mut db = cluster.client();
    let statement = db
        .prepare(
            "SELECT outbox.publish('FundsTransferEvent',
                    jsonb_build_object('amount', 100, 'from', '123', 'to', '456', 'k', $1::int8),
                    aggregate_type => 'account', aggregate_id => ($1::int8 % 50)::text, exchange => $2)",
        )
        .unwrap();
    let interval = Duration::from_secs_f64(1.0 / per_second as f64);
    let started = Instant::now();
    let end = started + Duration::from_secs(seconds);
    let mut next = started;
    let mut committed = Vec::new();
    let mut k = first;
    while next < end {
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        // Autocommit: the statement's return is its COMMIT's.
        db.query_one(&statement, &[&(k as i64), &exchange]).unwrap();
        committed.push((k, Instant::now()));
        k += 1;
        next += interval;
    }
    committed
}

pub struct Percentiles {
    pub p50: Duration,
    pub p95: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub count: usize,
}

impl Percentiles {
    pub fn of(mut v: Vec<Duration>) -> Percentiles {
        v.sort();
        let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
        Percentiles { p50: at(0.5), p95: at(0.95), p99: at(0.99), max: at(1.0), count: v.len() }
    }

    pub fn text(&self) -> String {
        let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1000.0);
        format!("p50 {} · p95 {} · p99 {}", ms(self.p50), ms(self.p95), ms(self.p99))
    }
}

/// Latency of events committed to `exchange` at `per_second` for `seconds`, consumed from
/// `queue` (a stream when `stream`). Numbers start at `first`.
pub fn latency(
    cluster: &Cluster,
    exchange: &str,
    queue: &str,
    stream: bool,
    first: u64,
    per_second: u64,
    seconds: u64,
) -> Percentiles {
    let consumer = NumberedConsumer::start(queue, stream);
    let committed = paced_numbered(cluster, exchange, first, per_second, seconds);
    let numbers: Vec<u64> = committed.iter().map(|(k, _)| *k).collect();
    let received = consumer.wait_for(&numbers, Duration::from_secs(60));
    Percentiles::of(committed.iter().map(|(k, at)| received[k].saturating_duration_since(*at)).collect())
}
