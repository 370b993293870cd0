//! RabbitMQ streams seen from tests: declaring one (the worker publishes into existing streams
//! only), reading one whole from its first offset over AMQP 0-9-1, the stream protocol's port,
//! and the publishers the broker sees.

use crate::broker::{delivery, open_connection, unique, Broker, Consumer, AMQP_PORT};
use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, BasicQosArguments, QueueDeclareArguments,
};
use amqprs::{BasicProperties, FieldTable, FieldValue};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The stream protocol's port of the machine's RabbitMQ (plugin `rabbitmq_stream`).
pub const STREAM_PORT: u16 = 5552;

/// `outbox.stream_url` (as written in postgresql.conf) of the running RabbitMQ.
pub const STREAM_URL: &str = "'rabbitmq-stream://guest:guest@127.0.0.1:5552/%2F'";

/// Messages a stream consumer may have unacknowledged (the broker requires a limit).
const PREFETCH: u16 = 500;

/// The exchange an event names to be published into `stream`.
pub fn stream_exchange(stream: &str) -> String {
    format!("stream:{stream}")
}

/// The deduplicating producer the worker of database `db` publishes into `stream` with.
pub fn producer_name(db: &str, stream: &str) -> String {
    format!("pg_outbox/{db}/{stream}")
}

/// A stream of the test's own, deleted when dropped (over a connection of its own, so it
/// outlives outages of the broker). Dereferences to its name.
pub struct OwnStream {
    pub name: String,
}

impl std::ops::Deref for OwnStream {
    type Target = str;
    fn deref(&self) -> &str {
        &self.name
    }
}

impl Drop for OwnStream {
    fn drop(&mut self) {
        // Not while the broker is down (a failed test may leave it so): connecting would panic.
        if std::net::TcpStream::connect(("127.0.0.1", AMQP_PORT)).is_ok() {
            Broker::connect().delete_queue(&self.name);
        }
    }
}

impl Broker {
    /// Declares the stream `name`: a durable queue of type `stream` (not exclusive, not
    /// auto-deleted). Streams do not expire: see [`OwnStream`].
    pub fn declare_stream(&self, name: &str) {
        let mut arguments = FieldTable::new();
        arguments.insert("x-queue-type".try_into().unwrap(), FieldValue::S("stream".try_into().unwrap()));
        // Right after a broker restart (a fault test before this one), or on a busy machine,
        // the stream coordinator may not take declarations yet. The broker answers with
        // `internal_error`, a hard error that closes the whole connection: so each try opens a
        // connection of its own, and this broker's own stays usable.
        self.rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let connection = open_connection(self.port).await;
                let declared: Result<(), amqprs::error::Error> = async {
                    let ch = connection.open_channel(None).await?;
                    let args =
                        QueueDeclareArguments::new(name).durable(true).arguments(arguments.clone()).finish();
                    ch.queue_declare(args).await?;
                    ch.close().await
                }
                .await;
                let _ = connection.close().await;
                match declared {
                    Ok(()) => return,
                    Err(e) if Instant::now() > deadline => panic!("declaring stream {name}: {e}"),
                    Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                }
            }
        });
    }

    /// A stream with a name no other test uses, deleted when dropped.
    pub fn own_stream(&self) -> OwnStream {
        let name = unique("stream");
        self.declare_stream(&name);
        OwnStream { name }
    }

    /// Publishes `body` with `message_id` straight into the queue or stream `queue` (through the
    /// default exchange). Closing the channel afterwards waits until the broker took it.
    pub fn send_to_queue(&self, queue: &str, message_id: &str, body: &[u8]) {
        self.rt.block_on(async {
            let ch = self.connection.open_channel(None).await.unwrap();
            let props = BasicProperties::default().with_message_id(message_id).finish();
            ch.basic_publish(props, body.to_vec(), BasicPublishArguments::new("", queue)).await.unwrap();
            ch.close().await.unwrap();
        });
    }

    /// Reads `stream` from its first offset on, in stream order, into a [`Consumer`] (whose
    /// `exchange` is the one events name to go there). Acknowledges every message: the broker
    /// sends at most [`PREFETCH`] unacknowledged ones.
    pub fn consume_stream(&self, stream: &str) -> Consumer {
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let channel = self.rt.block_on(async {
            let ch = self.connection.open_channel(None).await.unwrap();
            ch.basic_qos(BasicQosArguments::new(0, PREFETCH, false)).await.unwrap();
            let mut arguments = FieldTable::new();
            arguments
                .insert("x-stream-offset".try_into().unwrap(), FieldValue::S("first".try_into().unwrap()));
            let args = BasicConsumeArguments::new(stream, "").manual_ack(true).arguments(arguments).finish();
            let (_tag, mut rx) = ch.basic_consume_rx(args).await.unwrap();
            let acks = ch.clone();
            tokio::spawn(async move {
                loop {
                    let msg = tokio::select! {
                        msg = rx.recv() => msg,
                        _ = &mut stopped => None,
                    };
                    let Some(msg) = msg else { break };
                    let (tag, delivery) = delivery(msg);
                    sink.lock().unwrap().push(delivery);
                    if acks.basic_ack(BasicAckArguments::new(tag, false)).await.is_err() {
                        break;
                    }
                }
            });
            ch
        });
        Consumer {
            queue: stream.to_string(),
            exchange: stream_exchange(stream),
            received,
            channel: Some(channel),
            runtime: self.rt.handle().clone(),
            _stop: Some(stop),
        }
    }
}

/// Waits until the stream protocol's port answers (after the broker's application started).
pub fn wait_for_stream_port(within: Duration) {
    let deadline = Instant::now() + within;
    while std::net::TcpStream::connect(("127.0.0.1", STREAM_PORT)).is_err() {
        assert!(Instant::now() < deadline, "RabbitMQ's stream port {STREAM_PORT} did not answer");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The names (references) of the stream protocol publishers connected to `stream` now.
pub fn stream_publishers(stream: &str) -> Vec<String> {
    let out = Command::new("rabbitmqctl")
        .args(["list_stream_publishers", "reference", "stream", "--formatter", "json", "--quiet"])
        .output()
        .expect("run rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl list_stream_publishers: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    rows.as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["stream"] == stream)
        .filter_map(|r| r["reference"].as_str().map(str::to_string))
        .collect()
}
