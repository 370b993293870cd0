//! The stream baseline: a bare producer on the worker's own client ([`StreamLink`]), with a
//! producer name of its own, sending the messages the worker sends for the benchmark's events
//! (rows built as the worker reads them, encoded by the worker's `encode`), with at most
//! `window` unconfirmed, like `outbox.max_in_flight`.

use pg_outbox_core::stream::{encode, LinkConfig, Message, Report, StreamLink, StreamUrl};
use pg_outbox_core::OutboxMessage;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// `outbox.stream_url` of the benchmark, and the address the bare producer uses.
pub const STREAM_URL: &str = "rabbitmq-stream://guest:guest@127.0.0.1:5552/%2F";

/// The headers object of every benchmark event, as the worker reads it back from jsonb.
pub const HEADERS: &str = r#"{"tenant": "acme", "schema_version": 2}"#;

/// The aggregate of event `n` when the events use `aggregates` of them: its account.
pub fn aggregate_id(n: u64, aggregates: u64) -> String {
    format!("account-{:06}", n % aggregates)
}

/// Event `n` as the worker reads it from the outbox: the payload as jsonb prints it (keys by
/// length), a uuid message id, the type, the aggregate, the two headers.
pub fn event(n: u64, aggregates: u64, exchange: &str, created_at_unix: u64) -> OutboxMessage {
    let body = format!(
        r#"{{"to": "account-{:06}", "ref": "{n:012}", "from": "account-{:06}", "amount": 100, "currency": "EUR"}}"#,
        (n + 1) % 1000,
        n % 1000
    );
    OutboxMessage {
        row_id: n as i64 + 1,
        message_id: format!("01a21e66-c875-7173-84fb-{n:012}"),
        event_type: "FundsTransferEvent".into(),
        body: body.into_bytes(),
        aggregate_type: Some("account".into()),
        aggregate_id: Some(aggregate_id(n, aggregates)),
        headers: Some(HEADERS.into()),
        routing_key: None,
        exchange: Some(exchange.into()),
        created_at_unix,
        attempts: 0,
    }
}

/// What the bare producer measured: the rate, and the confirmed count.
pub struct Run {
    pub rate: f64,
    pub confirmed: u64,
}

/// A link to `stream` as `producer`, with the worker's frame size.
fn config(stream: &str, producer: &str) -> LinkConfig {
    LinkConfig {
        url: StreamUrl::parse(STREAM_URL).unwrap(),
        stream: stream.to_string(),
        producer: producer.to_string(),
        connect_timeout: Duration::from_secs(10),
        confirm_timeout: Duration::from_secs(30),
        max_frame_bytes: 0,
    }
}

async fn next(reports: &mut UnboundedReceiver<(String, Report)>) -> Report {
    match tokio::time::timeout(Duration::from_secs(60), reports.recv()).await {
        Ok(Some((_, report))) => report,
        Ok(None) => panic!("the stream link's reports stopped"),
        Err(_) => panic!("no report from the stream link for 60 s"),
    }
}

/// Publishes `count` messages (events `0..count` over `aggregates` aggregates) into `stream` as
/// `producer`, at most `window` unconfirmed, and waits for every confirm. The clock starts once
/// the link is ready (connected, publisher declared), as the raw AMQP publisher's does once
/// its channel is open.
pub fn publish_rate(stream: &str, producer: &str, count: u64, aggregates: u64, window: u64) -> Run {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let exchange = format!("{}{stream}", pg_outbox_core::stream::PREFIX);
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    // Encoded beforehand, as the worker's rows are read before they are sent: the clock
    // measures the sending.
    let messages: Vec<Message> =
        (0..count).map(|n| encode(&event(n, aggregates, &exchange, created)).unwrap()).collect();
    let (tx, mut reports) = unbounded_channel();
    let link = StreamLink::start(rt.handle(), config(stream, producer), tx);
    rt.block_on(async move {
        let sequence = match next(&mut reports).await {
            Report::Ready { sequence } => sequence,
            other => panic!("the stream link did not start: {other:?}"),
        };
        let last = sequence + count;
        let started = Instant::now();
        let mut messages = messages.into_iter();
        let (mut sent, mut confirmed) = (sequence, 0u64);
        while confirmed < count {
            let room = window.saturating_sub(sent - sequence - confirmed).min(last - sent);
            if room > 0 {
                let batch: Vec<(u64, Message)> = (sent + 1..=sent + room).zip(messages.by_ref()).collect();
                sent += room;
                link.publish(batch);
            }
            match next(&mut reports).await {
                Report::Confirmed(ids) => {
                    confirmed += ids.iter().filter(|id| **id > sequence && **id <= last).count() as u64
                }
                Report::Ended { reason, .. } => panic!("the stream link ended: {reason}"),
                Report::Ready { .. } => {}
            }
        }
        let rate = count as f64 / started.elapsed().as_secs_f64();
        link.close(Duration::from_secs(2)).await;
        Run { rate, confirmed }
    })
}

/// The broker's floor for the latency: single messages from a bare producer on the worker's
/// client, `per_second` for `seconds`, each numbered from `first` in its body (`{"k": n}`), its
/// other properties those of the benchmark's events. Each number and when it was handed to the
/// link (the link sends at once: it has nothing else queued).
pub fn paced_single(
    stream: &str,
    producer: &str,
    first: u64,
    per_second: u64,
    seconds: u64,
) -> Vec<(u64, Instant)> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let (tx, mut reports) = unbounded_channel();
    let link = StreamLink::start(rt.handle(), config(stream, producer), tx);
    let exchange = format!("{}{stream}", pg_outbox_core::stream::PREFIX);
    rt.block_on(async move {
        let mut id = match next(&mut reports).await {
            Report::Ready { sequence } => sequence,
            other => panic!("the stream link did not start: {other:?}"),
        };
        let interval = Duration::from_secs_f64(1.0 / per_second as f64);
        let started = Instant::now();
        let end = started + Duration::from_secs(seconds);
        let (mut at, mut k) = (started, first);
        let mut sent = Vec::new();
        while at < end {
            tokio::time::sleep_until(at.into()).await;
            let mut event = event(k, 50, &exchange, 1_700_000_000);
            event.body = format!(r#"{{"k": {k}}}"#).into_bytes();
            id += 1;
            link.publish(vec![(id, encode(&event).unwrap())]);
            sent.push((k, Instant::now()));
            // Confirms are only drained, so that the channel does not grow.
            while let Ok((_, report)) = reports.try_recv() {
                if let Report::Ended { reason, .. } = report {
                    panic!("the stream link ended: {reason}");
                }
            }
            k += 1;
            at += interval;
        }
        link.close(Duration::from_secs(2)).await;
        sent
    })
}
