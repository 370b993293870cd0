//! The real RabbitMQ, seen from tests: a consumer that records every delivery with its
//! properties, names unique to each test, and stopping/starting the broker (restarted on drop,
//! whatever happens).

use amqprs::channel::{
    BasicConsumeArguments, Channel, ConsumerMessage, ExchangeDeclareArguments, ExchangeDeleteArguments,
    ExchangeType, QueueBindArguments, QueueDeclareArguments, QueueDeleteArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{FieldTable, FieldValue};
use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::runtime::Runtime;

pub const AMQP_PORT: u16 = 5672;

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() % 100_000_000;
    format!("{prefix}.{}.{t}.{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// How long a test queue may sit unused (no consumer, not redeclared) before the broker deletes
/// it: longer than any test, including one that stops the broker.
pub const QUEUE_EXPIRY: Duration = Duration::from_secs(30 * 60);

/// A message as a consumer received it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub exchange: String,
    pub routing_key: String,
    pub redelivered: bool,
    pub message_id: Option<String>,
    pub message_type: Option<String>,
    pub content_type: Option<String>,
    pub delivery_mode: Option<u8>,
    pub timestamp: Option<u64>,
    pub app_id: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    pub received_at: Instant,
}

impl Delivery {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("body is JSON")
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// A field value rendered for comparison in tests: strings bare, the rest in Debug form.
fn render(v: &FieldValue) -> String {
    match v {
        FieldValue::S(s) => String::from(s.clone()),
        FieldValue::t(b) => b.to_string(),
        FieldValue::l(i) => i.to_string(),
        // What the broker makes of AMQP 1.0 integers (a stream's application properties).
        FieldValue::I(i) => i.to_string(),
        FieldValue::i(i) => i.to_string(),
        FieldValue::d(f) => f.to_string(),
        FieldValue::V => "null".into(),
        FieldValue::F(t) => format!("{}", t),
        other => format!("{other:?}"),
    }
}

/// A message as received, with its delivery tag (to ack it).
pub(crate) fn delivery(msg: ConsumerMessage) -> (u64, Delivery) {
    let received_at = Instant::now();
    let deliver = msg.deliver.unwrap();
    let props = msg.basic_properties.unwrap();
    let delivery = Delivery {
        exchange: deliver.exchange().clone(),
        routing_key: deliver.routing_key().clone(),
        redelivered: deliver.redelivered(),
        message_id: props.message_id().cloned(),
        message_type: props.message_type().cloned(),
        content_type: props.content_type().cloned(),
        delivery_mode: props.delivery_mode(),
        timestamp: props.timestamp(),
        app_id: props.app_id().cloned(),
        headers: headers(props.headers()),
        body: msg.content.unwrap_or_default(),
        received_at,
    };
    (deliver.delivery_tag(), delivery)
}

fn headers(t: Option<&FieldTable>) -> BTreeMap<String, String> {
    t.map(|t| t.as_ref().iter().map(|(k, v)| (String::from(k.clone()), render(v))).collect())
        .unwrap_or_default()
}

/// A queue bound to an exchange, consumed into memory from the moment it is created.
pub struct Consumer {
    pub queue: String,
    pub exchange: String,
    pub(crate) received: Arc<Mutex<Vec<Delivery>>>,
    pub(crate) channel: Option<Channel>,
    pub(crate) runtime: tokio::runtime::Handle,
    /// Dropped with the consumer: a receiving task that holds a clone of the channel (to ack)
    /// ends then, and the channel closes.
    pub(crate) _stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Consumer {
    fn drop(&mut self) {
        // amqprs closes channels from Drop by spawning a task: it needs the runtime.
        let _context = self.runtime.enter();
        self.channel.take();
    }
}

impl Consumer {
    pub fn received(&self) -> Vec<Delivery> {
        self.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// Waits until at least `n` messages arrived; returns them all.
    pub fn wait_for(&self, n: usize, within: Duration) -> Vec<Delivery> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.count();
            if got >= n {
                return self.received();
            }
            assert!(
                Instant::now() < deadline,
                "queue {}: {got} of {n} messages after {within:?}",
                self.queue
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until at least `unique` distinct message ids arrived and then nothing more for
    /// `quiet` (if fewer arrive: until `within` passed); returns every delivery, duplicates included,
    /// in arrival order, for the caller to judge.
    pub fn settle(&self, unique: usize, within: Duration, quiet: Duration) -> Vec<Delivery> {
        let deadline = Instant::now() + within;
        let (mut count, mut since) = (self.count(), Instant::now());
        loop {
            let got = self.received();
            if got.len() != count {
                (count, since) = (got.len(), Instant::now());
            }
            let done = dedup(&got).0.len() >= unique || Instant::now() >= deadline;
            if done && (since.elapsed() >= quiet || Instant::now() >= deadline + quiet) {
                return got;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits `quiet` and checks nothing (more) arrived beyond `expected`.
    pub fn expect_no_more(&self, expected: usize, quiet: Duration) {
        std::thread::sleep(quiet);
        let got = self.received();
        assert_eq!(got.len(), expected, "unexpected deliveries: {:?}", &got[expected.min(got.len())..]);
    }
}

/// Counts for a set of deliveries: unique message ids and duplicates.
pub fn dedup(deliveries: &[Delivery]) -> (HashMap<String, usize>, usize) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for d in deliveries {
        *seen.entry(d.message_id.clone().expect("every message has an id")).or_default() += 1;
    }
    let duplicates = deliveries.len() - seen.len();
    (seen, duplicates)
}

pub struct Broker {
    pub rt: Runtime,
    pub(crate) connection: Connection,
    /// The node's plain AMQP port, for connections of their own (see [`Broker::declare_stream`]).
    pub(crate) port: u16,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _context = self.rt.enter();
        let closed = self.connection.clone();
        let _ =
            self.rt.block_on(async { tokio::time::timeout(Duration::from_secs(2), closed.close()).await });
    }
}

/// A new connection to the node listening on `port`, waiting up to a minute for it to accept.
pub(crate) async fn open_connection(port: u16) -> Connection {
    let args = OpenConnectionArguments::new("127.0.0.1", port, "guest", "guest");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match Connection::open(&args).await {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(250)).await,
            Err(e) => panic!("RabbitMQ is not reachable on 127.0.0.1:{port}: {e}"),
        }
    }
}

impl Broker {
    pub fn connect() -> Broker {
        Broker::connect_to(AMQP_PORT)
    }

    /// The broker (node) whose plain AMQP listener is on `port` of 127.0.0.1.
    pub fn connect_to(port: u16) -> Broker {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let connection = rt.block_on(open_connection(port));
        Broker { rt, connection, port }
    }

    /// Runs `f` on a channel of its own, closed afterwards.
    fn on_channel<T>(&self, f: impl AsyncFnOnce(&Channel) -> T) -> T {
        self.rt.block_on(async {
            let ch = self.connection.open_channel(None).await.unwrap();
            let result = f(&ch).await;
            let _ = ch.close().await;
            result
        })
    }

    /// [`Broker::on_channel`] if a channel can be opened (the connection may be gone); else
    /// nothing.
    fn on_channel_if_open(&self, f: impl AsyncFnOnce(&Channel)) {
        self.rt.block_on(async {
            if let Ok(ch) = self.connection.open_channel(None).await {
                f(&ch).await;
                let _ = ch.close().await;
            }
        });
    }

    /// Declares a durable topic exchange (it survives broker restarts; tests delete it).
    pub fn exchange(&self, name: &str) {
        self.on_channel(async |ch| {
            ch.exchange_declare(
                ExchangeDeclareArguments::of_type(name, ExchangeType::Topic).durable(true).finish(),
            )
            .await
            .unwrap();
        });
    }

    /// A durable topic exchange with a name of the test's own, deleted when dropped.
    pub fn own_exchange(&self) -> OwnExchange<'_> {
        let name = unique("ex");
        self.exchange(&name);
        OwnExchange { name, broker: self }
    }

    /// Declares a durable queue bound to `exchange`, without consuming from it: messages wait
    /// there (across broker restarts) until [`Broker::consume_queue`].
    pub fn queue(&self, exchange: &str, binding: &str) -> String {
        self.declare_queue(exchange, binding, FieldTable::new())
    }

    /// [`Broker::queue`] with queue arguments (`x-max-length`, ...). Every queue expires after
    /// `QUEUE_EXPIRY` without use, so a test that fails or is killed leaves nothing behind on a
    /// shared broker.
    pub fn declare_queue(&self, exchange: &str, binding: &str, mut arguments: FieldTable) -> String {
        let queue = unique("q");
        let expires: amqprs::FieldName = "x-expires".try_into().unwrap();
        if arguments.get(&expires).is_none() {
            arguments.insert(expires, FieldValue::l(QUEUE_EXPIRY.as_millis() as i64));
        }
        self.on_channel(async |ch| {
            ch.queue_declare(QueueDeclareArguments::new(&queue).durable(true).arguments(arguments).finish())
                .await
                .unwrap();
            ch.queue_bind(QueueBindArguments::new(&queue, exchange, binding)).await.unwrap();
        });
        queue
    }

    /// Best effort (it runs in `Drop`, also while a failed test unwinds): never panics.
    pub fn delete_exchange(&self, name: &str) {
        self.on_channel_if_open(async |ch| {
            let _ = ch.exchange_delete(ExchangeDeleteArguments::new(name)).await;
        });
    }

    /// A queue bound to `exchange` with `binding` (topic pattern), consumed from now on.
    /// The queue is durable, so it keeps messages across a broker restart.
    pub fn consume(&self, exchange: &str, binding: &str) -> Consumer {
        self.consume_with(exchange, binding, FieldTable::new())
    }

    pub fn consume_with(&self, exchange: &str, binding: &str, arguments: FieldTable) -> Consumer {
        let queue = self.declare_queue(exchange, binding, arguments);
        self.consume_queue(&queue, exchange)
    }

    /// Consumes an existing queue from now on.
    pub fn consume_queue(&self, queue: &str, exchange: &str) -> Consumer {
        let queue = queue.to_string();
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        let channel = self.rt.block_on(async {
            let ch = self.connection.open_channel(None).await.unwrap();
            let (_tag, mut rx) = ch
                .basic_consume_rx(BasicConsumeArguments::new(&queue, "").auto_ack(true).finish())
                .await
                .unwrap();
            tokio::spawn(async move {
                while let Some(msg) = rx.recv().await {
                    sink.lock().unwrap().push(delivery(msg).1);
                }
            });
            ch
        });
        Consumer {
            queue,
            exchange: exchange.to_string(),
            received,
            channel: Some(channel),
            runtime: self.rt.handle().clone(),
            _stop: None,
        }
    }

    /// Best effort (it runs in `Drop`, also while a failed test unwinds): never panics.
    pub fn delete_queue(&self, queue: &str) {
        self.on_channel_if_open(async |ch| {
            let _ = ch.queue_delete(QueueDeleteArguments::new(queue)).await;
        });
    }
}

/// See [`Broker::own_exchange`]. Dereferences to its name.
pub struct OwnExchange<'b> {
    pub name: String,
    broker: &'b Broker,
}

impl std::ops::Deref for OwnExchange<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.name
    }
}

impl Drop for OwnExchange<'_> {
    fn drop(&mut self) {
        self.broker.delete_exchange(&self.name);
    }
}

fn rabbitmqctl(args: &[&str]) -> bool {
    Command::new("rabbitmqctl").args(args).output().map(|o| o.status.success()).unwrap_or(false)
}

/// Stops the RabbitMQ application (the node stays up, the AMQP port closes) until dropped.
pub struct BrokerOutage {
    restarted: bool,
}

impl BrokerOutage {
    pub fn begin() -> BrokerOutage {
        assert!(rabbitmqctl(&["stop_app"]), "rabbitmqctl stop_app failed");
        BrokerOutage { restarted: false }
    }

    /// Starts the broker again and waits until it accepts connections.
    pub fn end(mut self) {
        self.restart();
    }

    fn restart(&mut self) {
        if self.restarted {
            return;
        }
        self.restarted = true;
        if !rabbitmqctl(&["start_app"]) {
            // The node itself may have gone: start it again.
            let _ = Command::new("rabbitmq-server").arg("-detached").status();
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while std::net::TcpStream::connect(("127.0.0.1", AMQP_PORT)).is_err() {
            assert!(Instant::now() < deadline, "RabbitMQ did not come back");
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = rabbitmqctl(&["await_startup"]);
    }
}

impl Drop for BrokerOutage {
    fn drop(&mut self) {
        self.restart();
    }
}
