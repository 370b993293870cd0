//! Stream links against the real RabbitMQ stream port (127.0.0.1:5552, guest/guest, the
//! `rabbitmq_stream` plugin enabled): deduplication across links, frames, refusals, timeouts,
//! each checked against what the stream holds. Every test makes its own streams and deletes
//! them, even when it fails.

use pg_outbox_core::stream::{self, LinkConfig, Message, Report, StreamLink, StreamUrl};
use pg_outbox_core::OutboxMessage;
use rabbitmq_stream_client::types::{MessageResult, OffsetSpecification, ResponseKind};
use rabbitmq_stream_client::{Client, ClientOptions};
use std::collections::{BTreeSet, HashMap};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::time::timeout;

const URL: &str = "rabbitmq-stream://guest:guest@127.0.0.1:5552/%2F";
const WITHIN: Duration = Duration::from_secs(30);

fn unique(prefix: &str) -> String {
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{prefix}-{}-{nanos}-{}", std::process::id(), COUNT.fetch_add(1, Ordering::Relaxed))
}

async fn admin() -> Client {
    Client::connect(ClientOptions::builder().host("127.0.0.1").port(5552).build()).await.unwrap()
}

/// A stream of the test's own, deleted when dropped.
struct TestStream(String);

impl TestStream {
    async fn create() -> TestStream {
        let name = unique("pg_outbox_test_stream");
        // Right after the stream plugin is enabled or the broker restarted, its stream
        // coordinator may not take declarations yet: the broker closes the connection. Try again
        // on a new one for a while.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let client = admin().await;
            let created = client.create_stream(&name, HashMap::new()).await;
            let _ = client.close().await;
            match created {
                Ok(response) => {
                    assert!(response.is_ok(), "creating stream {name}: {:?}", response.code());
                    return TestStream(name);
                }
                Err(e) if Instant::now() > deadline => panic!("creating stream {name}: {e:?}"),
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let name = self.0.clone();
        // A runtime of its own: drop may run inside the test's runtime, or while it unwinds.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let client = admin().await;
                let _ = client.delete_stream(&name).await;
                let _ = client.close().await;
            });
        })
        .join();
    }
}

fn config(url: &str, stream: &str, producer: &str) -> LinkConfig {
    LinkConfig {
        url: StreamUrl::parse(url).unwrap(),
        stream: stream.into(),
        producer: producer.into(),
        connect_timeout: Duration::from_secs(5),
        confirm_timeout: Duration::from_secs(10),
        max_frame_bytes: 0,
    }
}

fn message(id: u64, body_bytes: usize) -> Message {
    let mut body = format!("{{\"row\": {id}, \"pad\": \"");
    body.extend(std::iter::repeat_n('x', body_bytes.saturating_sub(body.len() + 2)));
    body.push_str("\"}");
    stream::encode(&OutboxMessage {
        row_id: id as i64,
        message_id: format!("m-{id}"),
        event_type: "Tested".into(),
        body: body.into_bytes(),
        aggregate_type: Some("thing".into()),
        aggregate_id: Some(format!("a{}", id % 7)),
        headers: Some(r#"{"tenant":"t1","n":1000}"#.into()),
        routing_key: None,
        exchange: None,
        created_at_unix: 1_700_000_000,
        attempts: 0,
    })
    .unwrap()
}

fn messages(ids: RangeInclusive<u64>) -> Vec<(u64, Message)> {
    ids.map(|id| (id, message(id, 40))).collect()
}

/// The reports of one link.
struct Reports {
    stream: String,
    rx: UnboundedReceiver<(String, Report)>,
}

impl Reports {
    fn start(config: LinkConfig) -> (StreamLink, Reports) {
        let (tx, rx) = unbounded_channel();
        let stream = config.stream.clone();
        (StreamLink::start(&tokio::runtime::Handle::current(), config, tx), Reports { stream, rx })
    }

    async fn next(&mut self) -> Report {
        let (stream, report) =
            timeout(WITHIN, self.rx.recv()).await.expect("a report").expect("an open channel");
        assert_eq!(stream, self.stream);
        report
    }

    async fn ready(&mut self) -> u64 {
        match self.next().await {
            Report::Ready { sequence } => sequence,
            other => panic!("expected Ready, got {other:?}"),
        }
    }

    /// Waits until every id of `ids` is confirmed; other confirmed ids are returned.
    async fn confirmed(&mut self, ids: RangeInclusive<u64>) -> BTreeSet<u64> {
        let mut missing: BTreeSet<u64> = ids.collect();
        let mut others = BTreeSet::new();
        while !missing.is_empty() {
            match self.next().await {
                Report::Confirmed(confirmed) => {
                    for id in confirmed {
                        if !missing.remove(&id) {
                            others.insert(id);
                        }
                    }
                }
                other => panic!("expected confirms of {missing:?}, got {other:?}"),
            }
        }
        others
    }

    /// The link's end, after any confirms; then nothing more.
    async fn ended(&mut self) -> (String, bool) {
        loop {
            match self.next().await {
                Report::Confirmed(_) => {}
                Report::Ended { reason, refused } => {
                    let after = timeout(Duration::from_millis(300), self.rx.recv()).await;
                    assert!(!matches!(after, Ok(Some(_))), "nothing after the end: {after:?}");
                    return (reason, refused);
                }
                other => panic!("expected the end, got {other:?}"),
            }
        }
    }
}

/// The message ids the stream holds, in order, once `expected` have come and nothing more
/// for a second.
async fn read_back(stream: &str, expected: usize) -> Vec<String> {
    let client = admin().await;
    let (tx, mut rx) = unbounded_channel();
    let handler = move |item: MessageResult| {
        let tx = tx.clone();
        async move {
            if let Some(Ok(response)) = item {
                if let ResponseKind::Deliver(chunk) = response.kind() {
                    for (i, m) in chunk.messages.iter().enumerate() {
                        let id = m.properties().and_then(|p| p.message_id.as_ref()).map(<&String>::try_from);
                        let id = id.expect("a message id").expect("a string message id").clone();
                        let _ = tx.send((chunk.chunk_first_offset + i as u64, id));
                    }
                }
            }
            Ok(())
        }
    };
    client.set_handler(handler).await;
    let subscribed = client.subscribe(1, stream, OffsetSpecification::First, 10_000, HashMap::new()).await;
    assert!(subscribed.unwrap().is_ok());
    let mut got = Vec::new();
    let deadline = Instant::now() + WITHIN;
    while got.len() < expected && Instant::now() < deadline {
        if let Ok(Some(item)) = timeout(Duration::from_millis(200), rx.recv()).await {
            got.push(item);
        }
    }
    while let Ok(Some(item)) = timeout(Duration::from_secs(1), rx.recv()).await {
        got.push(item);
    }
    let _ = client.close().await;
    // Chunks reach the handler on tasks of their own: put them back in offset order.
    got.sort();
    got.into_iter().map(|(_, id)| id).collect()
}

fn ids(range: RangeInclusive<u64>) -> Vec<String> {
    range.map(|id| format!("m-{id}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_broker_drops_what_a_producer_already_stored() {
    let stream = TestStream::create().await;
    let producer = unique("test");
    let (link, mut reports) = Reports::start(config(URL, &stream.0, &producer));
    assert_eq!(reports.ready().await, 0);
    link.publish(messages(1..=50));
    link.publish(messages(51..=100));
    assert_eq!(reports.confirmed(1..=100).await, BTreeSet::new());
    link.close(Duration::from_secs(5)).await;
    assert_eq!(reports.ended().await, ("the link was closed".into(), false));

    let (link, mut reports) = Reports::start(config(URL, &stream.0, &producer));
    assert_eq!(reports.ready().await, 100);
    link.publish(messages(95..=105));
    assert_eq!(reports.confirmed(95..=105).await, BTreeSet::new());
    link.close(Duration::from_secs(5)).await;
    reports.ended().await;

    assert_eq!(read_back(&stream.0, 105).await, ids(1..=105));
    // Another producer has its own sequence.
    let (link, mut reports) = Reports::start(config(URL, &stream.0, &unique("test")));
    assert_eq!(reports.ready().await, 0);
    link.abort();
    assert_eq!(reports.ended().await, ("the link was stopped".into(), false));
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_go_in_frames_under_the_limit_in_order() {
    let stream = TestStream::create().await;
    let mut c = config(URL, &stream.0, &unique("test"));
    c.max_frame_bytes = 8192;
    let (link, mut reports) = Reports::start(c);
    assert_eq!(reports.ready().await, 0);
    // About 1 KiB each: seven to a frame.
    link.publish((1..=60).map(|id| (id, message(id, 1000))).collect());
    reports.confirmed(1..=60).await;
    assert_eq!(read_back(&stream.0, 60).await, ids(1..=60));
    let big = message(61, 9000);
    assert!(!stream::fits_in_frame(&big, 8192));
    link.publish(vec![(61, big)]);
    let (reason, refused) = reports.ended().await;
    assert!(!refused && reason.contains("message 61 takes"), "{reason}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_stream_is_refused_and_an_unreachable_broker_is_not() {
    let (_link, mut reports) = Reports::start(config(URL, &unique("pg_outbox_test_missing"), "test/missing"));
    let (reason, refused) = reports.ended().await;
    assert!(refused && reason.contains("does not exist"), "{reason}");

    // Nothing listens on port 1: refused at once, and not the stream's fault.
    let started = Instant::now();
    let (_link, mut reports) =
        Reports::start(config("rabbitmq-stream://guest:hunter2x@127.0.0.1:1", "s", "test/port"));
    let (reason, refused) = reports.ended().await;
    assert!(!refused && reason.contains("could not connect"), "{reason}");
    assert!(started.elapsed() < Duration::from_secs(5), "within the connect timeout");
    assert!(!reason.contains("hunter2x"));

    // A server that never answers: the connect timeout.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("rabbitmq-stream://127.0.0.1:{}", silent.local_addr().unwrap().port());
    let mut c = config(&url, "s", "test/silent");
    c.connect_timeout = Duration::from_secs(1);
    let started = Instant::now();
    let (_link, mut reports) = Reports::start(c);
    let (reason, refused) = reports.ended().await;
    assert!(!refused && reason.contains("timed out"), "{reason}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());

    // A wrong password: not the stream's fault either, and never in the reason.
    let (_link, mut reports) = Reports::start(config(
        "rabbitmq-stream://guest:hunter2wrong@127.0.0.1:5552/%2F",
        "s",
        "test/password",
    ));
    let (reason, refused) = reports.ended().await;
    assert!(!refused && !reason.contains("hunter2wrong"), "{reason}");
}

/// Forwards one connection to the stream port; `frozen` stops what the broker sends.
async fn proxy(frozen: Arc<AtomicBool>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let broker = TcpStream::connect("127.0.0.1:5552").await.unwrap();
        let (mut client_read, mut client_write) = client.into_split();
        let (mut broker_read, mut broker_write) = broker.into_split();
        tokio::spawn(async move { tokio::io::copy(&mut client_read, &mut broker_write).await });
        let mut buf = vec![0; 65536];
        while let Ok(n @ 1..) = broker_read.read(&mut buf).await {
            if !frozen.load(Ordering::SeqCst) && client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread")]
async fn unconfirmed_messages_end_the_link_after_the_confirm_timeout() {
    let stream = TestStream::create().await;
    let frozen = Arc::new(AtomicBool::new(false));
    let port = proxy(frozen.clone()).await;
    let mut c = config(&format!("rabbitmq-stream://guest:guest@127.0.0.1:{port}/%2F"), &stream.0, "test/t");
    c.confirm_timeout = Duration::from_secs(1);
    let (link, mut reports) = Reports::start(c);
    assert_eq!(reports.ready().await, 0);
    link.publish(messages(1..=3));
    reports.confirmed(1..=3).await;
    frozen.store(true, Ordering::SeqCst);
    let started = Instant::now();
    link.publish(messages(4..=6));
    let (reason, refused) = reports.ended().await;
    assert!(!refused && reason.contains("no confirm for 1s with 3 messages unconfirmed"), "{reason}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    let started = Instant::now();
    while !link.is_finished() && started.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(link.is_finished());
    // The broker stored them all the same.
    assert_eq!(read_back(&stream.0, 6).await, ids(1..=6));
}
