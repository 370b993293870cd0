//! Publishing batches to RabbitMQ with publisher confirms.
//!
//! One connection and one confirm-mode channel. A batch is published as a pipeline: up to
//! `max_in_flight` messages are unconfirmed at once (one per aggregate, see [`ordering`]), and
//! every message ends in exactly one [`Outcome`]:
//! - `Confirmed`: the broker acked it and did not return it. Only then may its row go.
//! - `Failed`: the broker nacked it, returned it as unroutable (with `mandatory`), closed the
//!   channel because of it, did not confirm it in time, or it cannot be encoded at all. The
//!   worker counts an attempt and retries it later.
//! - `NotAttempted`: it was held back or the connection went away first. Not its fault: the
//!   worker leaves it as it is, and it is published again later (maybe a second time).
//!
//! amqprs delivers acks, returns and closes through callbacks on its own tasks; they only
//! forward [`Event`]s to the batch loop, which runs wherever the caller awaits it.
//!
//! [`ordering`]: crate::ordering

use crate::broker_url::BrokerUrl;
use crate::message::{Envelope, OutboxMessage};
use crate::ordering::Dispatcher;
use amqprs::callbacks::{ChannelCallback, ConnectionCallback};
use amqprs::channel::{
    BasicPublishArguments, Channel, ConfirmSelectArguments, ExchangeDeclareArguments, ExchangeType,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{Ack, BasicProperties, Cancel, Close, CloseChannel, Nack, Return};
use async_trait::async_trait;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::mem::ManuallyDrop;
use std::time::Duration;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::time::{sleep_until, timeout, Instant};

/// How often the batch loop looks at `should_stop` and at the connection's state while it
/// waits for confirms.
const TICK: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, PartialEq)]
pub struct PublisherConfig {
    pub url: BrokerUrl,
    /// Exchange for messages that name none (`outbox.exchange`).
    pub default_exchange: String,
    /// Declare `default_exchange` (durable, topic) on connect.
    pub declare_default_exchange: bool,
    /// Publish with `mandatory`, so that an unroutable message is returned and counts as failed.
    pub mandatory: bool,
    /// A message not confirmed this long after the last confirm has failed.
    pub confirm_timeout: Duration,
    /// Unconfirmed messages at most.
    pub max_in_flight: usize,
    /// Shown in the broker's connection list.
    pub connection_name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// basic.nack from the broker.
    Nacked,
    /// Returned by the broker: no queue is bound for its routing key.
    Unroutable,
    /// The broker closed the channel because of it (missing exchange, access refused, too big).
    Refused,
    /// No confirm within the confirm timeout.
    Timeout,
    /// The row cannot be turned into an AMQP message.
    Invalid,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Nacked => "nacked",
            FailureKind::Unroutable => "unroutable",
            FailureKind::Refused => "refused",
            FailureKind::Timeout => "timeout",
            FailureKind::Invalid => "invalid",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Confirmed,
    Failed { kind: FailureKind, reason: String },
    NotAttempted,
}

#[derive(Debug, Default)]
pub struct BatchReport {
    /// One per message, in batch order.
    pub outcomes: Vec<Outcome>,
    /// Set when the connection was lost or became unusable: drop the publisher and reconnect.
    pub connection_lost: Option<String>,
}

impl BatchReport {
    pub fn confirmed(&self) -> usize {
        self.outcomes.iter().filter(|o| **o == Outcome::Confirmed).count()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    #[error("could not connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("connecting to {url} timed out after {after:?}")]
    ConnectTimeout { url: String, after: Duration },
    #[error("could not open a channel: {0}")]
    Channel(String),
}

#[derive(Debug)]
enum Event {
    Ack { tag: u64, multiple: bool },
    Nack { tag: u64, multiple: bool },
    Returned { message_id: Option<String>, code: u16, text: String },
    ChannelClosed { code: u16, text: String },
    ConnectionClosed(String),
}

struct Forward(UnboundedSender<Event>);

#[async_trait]
impl ChannelCallback for Forward {
    async fn close(&mut self, _: &Channel, close: CloseChannel) -> Result<(), amqprs::error::Error> {
        let _ =
            self.0.send(Event::ChannelClosed { code: close.reply_code(), text: close.reply_text().clone() });
        Ok(())
    }
    async fn cancel(&mut self, _: &Channel, _: Cancel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(&mut self, _: &Channel, _active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(true)
    }
    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        let _ = self.0.send(Event::Ack { tag: ack.delivery_tag(), multiple: ack.mutiple() });
    }
    async fn publish_nack(&mut self, _: &Channel, nack: Nack) {
        let _ = self.0.send(Event::Nack { tag: nack.delivery_tag(), multiple: nack.multiple() });
    }
    async fn publish_return(&mut self, _: &Channel, ret: Return, props: BasicProperties, _: Vec<u8>) {
        let _ = self.0.send(Event::Returned {
            message_id: props.message_id().cloned(),
            code: ret.reply_code(),
            text: ret.reply_text().clone(),
        });
    }
}

#[async_trait]
impl ConnectionCallback for Forward {
    async fn close(&mut self, _: &Connection, close: Close) -> Result<(), amqprs::error::Error> {
        let _ = self.0.send(Event::ConnectionClosed(format!(
            "closed by the broker: {} {}",
            close.reply_code(),
            close.reply_text()
        )));
        Ok(())
    }
    // amqprs does not announce the connection.blocked capability, so RabbitMQ never sends
    // these; a resource alarm shows as missing confirms (a timeout) instead.
    async fn blocked(&mut self, _: &Connection, _reason: String) {}
    async fn unblocked(&mut self, _: &Connection) {}
    async fn secret_updated(&mut self, _: &Connection) {}
}

struct ConfirmChannel {
    channel: Channel,
    events: UnboundedReceiver<Event>,
    /// Delivery tag of the last message published on this channel (tags start at 1).
    last_tag: u64,
}

pub struct Publisher {
    config: PublisherConfig,
    /// amqprs closes connections and channels from `Drop` by spawning a task, which needs a
    /// runtime context: dropped by hand, in the runtime the publisher was made in.
    connection: ManuallyDrop<Connection>,
    runtime: tokio::runtime::Handle,
    connection_events: UnboundedReceiver<Event>,
    channel: Option<ConfirmChannel>,
    /// Set by the last connect when declaring the default exchange failed (it may exist with
    /// another type); publishing goes on, the caller reports it.
    pub declare_warning: Option<String>,
}

impl Publisher {
    /// Opens the connection and a confirm-mode channel, and declares the default exchange.
    pub async fn connect(config: PublisherConfig) -> Result<Publisher, BrokerError> {
        let url = &config.url;
        let shown = url.to_string();
        let mut args = OpenConnectionArguments::new(&url.host, url.port, &url.username, url.password());
        args.virtual_host(&url.vhost).heartbeat(url.heartbeat_secs).connection_name(&config.connection_name);
        let connection = match timeout(url.connection_timeout, Connection::open(&args)).await {
            Err(_) => return Err(BrokerError::ConnectTimeout { url: shown, after: url.connection_timeout }),
            Ok(Err(e)) => return Err(BrokerError::Connect { url: shown, reason: url.scrub(&e.to_string()) }),
            Ok(Ok(c)) => c,
        };
        let (tx, connection_events) = unbounded_channel();
        let io_tx = tx.clone();
        let watcher = connection.clone();
        tokio::spawn(async move {
            if watcher.listen_network_io_failure().await {
                let _ = io_tx.send(Event::ConnectionClosed("network I/O failure".into()));
            }
        });
        let registered = connection.register_callback(Forward(tx)).await;
        let mut publisher = Publisher {
            config,
            connection: ManuallyDrop::new(connection),
            runtime: tokio::runtime::Handle::current(),
            connection_events,
            channel: None,
            declare_warning: None,
        };
        if let Err(e) = registered {
            return Err(BrokerError::Connect { url: shown, reason: e.to_string() });
        }
        if publisher.config.declare_default_exchange && !publisher.config.default_exchange.is_empty() {
            publisher.declare_warning = publisher.declare_default_exchange().await.err();
        }
        publisher.ensure_channel().await?;
        Ok(publisher)
    }

    /// On a channel of its own: a failed declare closes the channel it was made on.
    async fn declare_default_exchange(&self) -> Result<(), String> {
        let within = self.config.url.connection_timeout;
        let name = &self.config.default_exchange;
        let declare = async {
            let channel = self.connection.open_channel(None).await.map_err(|e| e.to_string())?;
            let args = ExchangeDeclareArguments::of_type(name, ExchangeType::Topic).durable(true).finish();
            channel.exchange_declare(args).await.map_err(|e| e.to_string())?;
            let _ = channel.close().await;
            Ok::<(), String>(())
        };
        match timeout(within, declare).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!(
                "could not declare exchange {name:?} (durable, topic); it may exist with other settings: {e}"
            )),
            Err(_) => Err(format!("declaring exchange {name:?} timed out")),
        }
    }

    async fn ensure_channel(&mut self) -> Result<(), BrokerError> {
        if self.channel.as_ref().is_some_and(|c| c.channel.is_open()) {
            return Ok(());
        }
        let open = async {
            let channel = self.connection.open_channel(None).await?;
            let (tx, events) = unbounded_channel();
            channel.register_callback(Forward(tx)).await?;
            channel.confirm_select(ConfirmSelectArguments::new(false)).await?;
            Ok::<_, amqprs::error::Error>(ConfirmChannel { channel, events, last_tag: 0 })
        };
        match timeout(self.config.url.connection_timeout, open).await {
            Ok(Ok(c)) => {
                self.channel = Some(c);
                Ok(())
            }
            Ok(Err(e)) => Err(BrokerError::Channel(self.config.url.scrub(&e.to_string()))),
            Err(_) => Err(BrokerError::Channel("timed out".into())),
        }
    }

    /// Whether the connection is still up, as far as the client knows.
    pub fn is_connected(&mut self) -> bool {
        while let Ok(ev) = self.connection_events.try_recv() {
            if let Event::ConnectionClosed(_) = ev {
                return false;
            }
        }
        self.connection.is_open()
    }

    pub fn config(&self) -> &PublisherConfig {
        &self.config
    }

    pub async fn close(mut self) {
        if let Some(c) = self.channel.take() {
            let _ = timeout(Duration::from_secs(2), c.channel.close()).await;
        }
        let _ = timeout(Duration::from_secs(2), Connection::clone(&self.connection).close()).await;
    }

    /// Publishes `batch` and waits for every outcome. `should_stop` is polled while waiting;
    /// when it returns true the loop gives up and unconfirmed messages are `NotAttempted`.
    pub async fn publish_batch(
        &mut self,
        batch: Vec<OutboxMessage>,
        should_stop: &dyn Fn() -> bool,
    ) -> BatchReport {
        let n = batch.len();
        let mut report = BatchReport { outcomes: vec![Outcome::NotAttempted; n], connection_lost: None };
        if n == 0 {
            return report;
        }
        if let Err(e) = self.ensure_channel().await {
            report.connection_lost = Some(e.to_string());
            return report;
        }
        let mut dispatcher =
            Dispatcher::new(batch.iter().map(|m| m.ordering_key()), self.config.max_in_flight);
        let mut envelopes: Vec<Option<Result<Envelope, String>>> = Vec::with_capacity(n);
        let mut bodies: Vec<Vec<u8>> = Vec::with_capacity(n);
        let mut index_of_id: HashMap<String, usize> = HashMap::with_capacity(n);
        let mut targets: Vec<Target> = Vec::with_capacity(n);
        for (i, m) in batch.into_iter().enumerate() {
            let envelope = m.envelope(&self.config.default_exchange).map_err(|e| e.to_string());
            targets.push(Target {
                exchange: envelope.as_ref().map(|e| e.exchange.clone()).unwrap_or_default(),
                body_len: m.body.len(),
            });
            envelopes.push(Some(envelope));
            index_of_id.insert(m.message_id, i);
            bodies.push(m.body);
        }
        let mut in_flight: BTreeMap<u64, usize> = BTreeMap::new();
        let mut returned: HashMap<usize, String> = HashMap::new();
        let mut deadline = Instant::now() + self.config.confirm_timeout;
        let channel = self.channel.as_mut().expect("ensured above");
        // Set when the broker closed the channel: the next batch opens a new one.
        let mut channel_closed = false;

        'batch: loop {
            while let Some(i) = dispatcher.release() {
                let envelope = match envelopes[i].take().expect("each message is released once") {
                    Ok(e) => e,
                    Err(reason) => {
                        dispatcher.failed(i);
                        report.outcomes[i] = Outcome::Failed { kind: FailureKind::Invalid, reason };
                        continue;
                    }
                };
                if !channel.channel.is_open() {
                    // Closed under us: its close event says why; this one was not sent.
                    dispatcher.failed(i);
                    break;
                }
                let args = BasicPublishArguments::new(&envelope.exchange, &envelope.routing_key)
                    .mandatory(self.config.mandatory)
                    .finish();
                let body = std::mem::take(&mut bodies[i]);
                if let Err(e) = channel.channel.basic_publish(envelope.properties, body, args).await {
                    dispatcher.failed(i);
                    report.connection_lost = Some(format!("publish failed: {e}"));
                    break 'batch;
                }
                channel.last_tag += 1;
                if in_flight.is_empty() {
                    deadline = Instant::now() + self.config.confirm_timeout;
                }
                in_flight.insert(channel.last_tag, i);
            }
            if dispatcher.is_done() {
                break;
            }
            if in_flight.is_empty() {
                // Nothing sent and nothing can be: the channel is gone.
                let reason =
                    drain_close_reason(&mut channel.events).unwrap_or_else(|| "channel closed".into());
                if !self.connection.is_open() {
                    report.connection_lost = Some(reason);
                }
                break;
            }
            let event = tokio::select! {
                ev = channel.events.recv() => match ev {
                    Some(ev) => Some(ev),
                    // The channel's dispatcher is gone, and with it the channel.
                    None if !self.connection.is_open() => Some(Event::ConnectionClosed("connection lost".into())),
                    None => Some(Event::ChannelClosed { code: 0, text: String::new() }),
                },
                ev = self.connection_events.recv() => {
                    Some(ev.unwrap_or_else(|| Event::ConnectionClosed("connection gone".into())))
                }
                _ = sleep_until(deadline) => None,
                _ = tokio::time::sleep(TICK) => {
                    if should_stop() {
                        break 'batch;
                    }
                    if !self.connection.is_open() {
                        report.connection_lost = Some("connection lost".into());
                        break 'batch;
                    }
                    continue;
                }
            };
            match event {
                Some(Event::Ack { tag, multiple }) | Some(Event::Nack { tag, multiple })
                    if !in_flight.contains_key(&tag) && !multiple =>
                {
                    // A late confirm for an earlier batch's message: nothing to do.
                }
                Some(Event::Ack { tag, multiple }) => {
                    deadline = Instant::now() + self.config.confirm_timeout;
                    for i in settle(&mut in_flight, tag, multiple) {
                        match returned.remove(&i) {
                            None => {
                                dispatcher.confirmed(i);
                                report.outcomes[i] = Outcome::Confirmed;
                            }
                            Some(reason) => {
                                dispatcher.failed(i);
                                report.outcomes[i] =
                                    Outcome::Failed { kind: FailureKind::Unroutable, reason };
                            }
                        }
                    }
                }
                Some(Event::Nack { tag, multiple }) => {
                    deadline = Instant::now() + self.config.confirm_timeout;
                    for i in settle(&mut in_flight, tag, multiple) {
                        dispatcher.failed(i);
                        report.outcomes[i] = Outcome::Failed {
                            kind: FailureKind::Nacked,
                            reason: "the broker nacked the message".into(),
                        };
                    }
                }
                Some(Event::Returned { message_id, code, text }) => {
                    if let Some(&i) = message_id.as_ref().and_then(|id| index_of_id.get(id)) {
                        returned.insert(i, format!("returned by the broker: {code} {text}"));
                    }
                }
                Some(Event::ChannelClosed { code: 0, .. }) => {
                    // Gone without a word from the broker: nothing to blame on the messages.
                    for i in in_flight.values().copied().collect::<Vec<_>>() {
                        dispatcher.failed(i);
                    }
                    in_flight.clear();
                    channel_closed = true;
                    break;
                }
                Some(Event::ChannelClosed { code, text }) => {
                    let reason = format!("channel closed by the broker: {code} {text}");
                    let unsettled: Vec<usize> = in_flight.values().copied().collect();
                    let culprits = blame(&text, unsettled.iter().map(|&i| (i, &targets[i])));
                    for i in unsettled {
                        dispatcher.failed(i);
                        if culprits.contains(&i) {
                            report.outcomes[i] =
                                Outcome::Failed { kind: FailureKind::Refused, reason: reason.clone() };
                        }
                    }
                    in_flight.clear();
                    channel_closed = true;
                    break;
                }
                Some(Event::ConnectionClosed(reason)) => {
                    report.connection_lost = Some(reason);
                    break;
                }
                None => {
                    let reason = format!("no confirm within {:?}", self.config.confirm_timeout);
                    for i in in_flight.values().copied().collect::<Vec<_>>() {
                        dispatcher.failed(i);
                        report.outcomes[i] =
                            Outcome::Failed { kind: FailureKind::Timeout, reason: reason.clone() };
                    }
                    in_flight.clear();
                    // Confirms may still come for them; a fresh channel keeps tags unambiguous.
                    self.channel = None;
                    break;
                }
            }
        }
        if channel_closed || report.connection_lost.is_some() {
            self.channel = None;
        }
        report
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let _context = self.runtime.enter();
        self.channel = None;
        // SAFETY: dropped once, here; the field is never used again.
        unsafe { ManuallyDrop::drop(&mut self.connection) };
    }
}

/// Removes and returns the batch indexes a confirm covers, in publish order.
fn settle(in_flight: &mut BTreeMap<u64, usize>, tag: u64, multiple: bool) -> Vec<usize> {
    if multiple {
        let rest = in_flight.split_off(&(tag + 1));
        let covered = std::mem::replace(in_flight, rest);
        covered.into_values().collect()
    } else {
        in_flight.remove(&tag).into_iter().collect()
    }
}

fn drain_close_reason(events: &mut UnboundedReceiver<Event>) -> Option<String> {
    while let Ok(ev) = events.try_recv() {
        if let Event::ChannelClosed { code, text } = ev {
            return Some(format!("channel closed by the broker: {code} {text}"));
        }
    }
    None
}

/// Where a message goes and how big it is: what a channel close may name.
#[derive(Debug, Clone, Default)]
struct Target {
    exchange: String,
    body_len: usize,
}

/// Which unconfirmed messages a channel close is about. RabbitMQ names the exchange when it
/// is missing or forbidden ("NOT_FOUND - no exchange 'x' in vhost '/'", "ACCESS_REFUSED -
/// access to exchange 'x' in vhost '/' refused for user 'u'") and the size when a message is
/// too large ("PRECONDITION_FAILED - message size 200 is larger than configured max size
/// 100"). When the text names nothing that matches, every unconfirmed message is blamed:
/// each then backs off on its own, so the innocent ones soon go through.
fn blame<'a>(text: &str, unsettled: impl Iterator<Item = (usize, &'a Target)> + Clone) -> HashSet<usize> {
    let exchange = quoted_after(text, "exchange '");
    let size = text
        .split("message size ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|digits| digits.parse::<usize>().ok());
    let named: HashSet<usize> = unsettled
        .clone()
        .filter(|(_, t)| exchange.is_some_and(|x| x == t.exchange) || size.is_some_and(|s| s == t.body_len))
        .map(|(i, _)| i)
        .collect();
    if named.is_empty() {
        unsettled.map(|(i, _)| i).collect()
    } else {
        named
    }
}

fn quoted_after<'t>(text: &'t str, marker: &str) -> Option<&'t str> {
    let start = text.find(marker)? + marker.len();
    let len = text[start..].find('\'')?;
    Some(&text[start..start + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets() -> Vec<Target> {
        vec![
            Target { exchange: "good".into(), body_len: 10 },
            Target { exchange: "missing".into(), body_len: 10 },
            Target { exchange: "good".into(), body_len: 5000 },
        ]
    }

    fn blamed(text: &str) -> Vec<usize> {
        let t = targets();
        let mut v: Vec<usize> = blame(text, t.iter().enumerate()).into_iter().collect();
        v.sort();
        v
    }

    #[test]
    fn blames_the_message_the_broker_names() {
        assert_eq!(blamed("NOT_FOUND - no exchange 'missing' in vhost '/'"), vec![1]);
        assert_eq!(
            blamed("ACCESS_REFUSED - access to exchange 'missing' in vhost '/' refused for user 'u'"),
            vec![1]
        );
        assert_eq!(
            blamed("PRECONDITION_FAILED - message size 5000 is larger than configured max size 100"),
            vec![2]
        );
        assert_eq!(blamed("INTERNAL_ERROR"), vec![0, 1, 2]);
        assert_eq!(blamed("NOT_FOUND - no exchange 'other' in vhost '/'"), vec![0, 1, 2]);
    }

    #[test]
    fn settle_covers_multiple_acks() {
        let mut m: BTreeMap<u64, usize> = (1..=5).map(|t| (t, t as usize * 10)).collect();
        assert_eq!(settle(&mut m, 2, false), vec![20]);
        assert_eq!(settle(&mut m, 4, true), vec![10, 30, 40]);
        assert_eq!(settle(&mut m, 9, false), Vec::<usize>::new());
        assert_eq!(m.len(), 1);
    }
}
