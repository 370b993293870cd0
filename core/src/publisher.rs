//! Publishing to RabbitMQ with publisher confirms.
//!
//! One connection and one confirm-mode channel. A session publishes a stream of messages as a
//! pipeline: up to `max_in_flight` are unconfirmed at once (one per aggregate, see
//! [`ordering`]), and every message ends in exactly one [`Outcome`], reported as soon as known:
//! - `Confirmed`: the broker acked it and did not return it. Only then may its row go.
//! - `Failed`: the broker nacked it, returned it as unroutable (with `mandatory`), closed the
//!   channel because of it, did not confirm it in time, or it cannot be encoded at all. The
//!   worker counts an attempt and retries it later.
//! - `NotAttempted`: it was held back or the connection went away first. Not its fault: the
//!   worker leaves it as it is, and it is published again later (maybe a second time).
//!
//! amqprs delivers acks, returns and closes through callbacks on its own tasks; they only
//! forward [`Event`]s to the session loop, which runs wherever the caller awaits it. A
//! session ends when the channel or connection is lost (or when its feed closes), so that
//! nothing published after a loss can overtake what the loss interrupted: the caller reads
//! the outbox again, in order, for the next session.
//!
//! [`ordering`]: crate::ordering

use crate::broker_url::BrokerUrl;
use crate::message::{Envelope, OrderingKey, OutboxMessage};
use crate::ordering::{Dispatcher, Slot};
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

/// How often a session looks at the connection's state, in case its close event never comes.
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

    /// Publishes `batch` and waits for every outcome: a session fed with one batch.
    pub async fn publish_batch(&mut self, batch: Vec<OutboxMessage>) -> BatchReport {
        let rows: Vec<i64> = batch.iter().map(|m| m.row_id).collect();
        let (feed_tx, mut feed) = unbounded_channel();
        let (reports_tx, mut reports) = unbounded_channel();
        let _ = feed_tx.send(Command::Publish(batch));
        drop(feed_tx);
        let end = self.run_session(&mut feed, &reports_tx).await;
        let mut outcome_of: HashMap<i64, Outcome> = HashMap::new();
        while let Ok(r) = reports.try_recv() {
            outcome_of.insert(r.row_id, r.outcome);
        }
        BatchReport {
            outcomes: rows.iter().map(|id| outcome_of.remove(id).unwrap_or(Outcome::NotAttempted)).collect(),
            connection_lost: match end {
                SessionEnd::ConnectionLost(reason) => Some(reason),
                _ => None,
            },
        }
    }

    /// Publishes what `feed` brings, in feed order, under the window and per-aggregate rules
    /// (see [`Dispatcher`]), and reports each message's outcome on `reports` as soon as it is
    /// known. Ends when the feed is closed and everything is settled, or when the channel or
    /// the connection is lost; then every message not yet reported has been reported (failed
    /// or `NotAttempted`), except those still unread in the feed, which the caller must treat
    /// as not attempted.
    pub async fn run_session(
        &mut self,
        feed: &mut UnboundedReceiver<Command>,
        reports: &UnboundedSender<Report>,
    ) -> SessionEnd {
        if let Err(e) = self.ensure_channel().await {
            return SessionEnd::ConnectionLost(e.to_string());
        }
        let mut session = Session {
            dispatcher: Dispatcher::new(self.config.max_in_flight),
            pending: HashMap::new(),
            in_flight: BTreeMap::new(),
            returned: HashMap::new(),
            seq_of_id: HashMap::new(),
            reports,
        };
        let mut feed_open = true;
        let mut deadline = Instant::now() + self.config.confirm_timeout;
        let channel = self.channel.as_mut().expect("ensured above");

        let end = 'session: loop {
            while let Some(seq) = session.dispatcher.release() {
                let Some(message) = session.pending.get_mut(&seq) else { continue };
                let envelope = match message.envelope.take().expect("each message is released once") {
                    Ok(e) => e,
                    Err(reason) => {
                        session.fail(seq, FailureKind::Invalid, reason);
                        continue;
                    }
                };
                if !channel.channel.is_open() {
                    // Closed under us: its close event says why.
                    break;
                }
                let args = BasicPublishArguments::new(&envelope.exchange, &envelope.routing_key)
                    .mandatory(self.config.mandatory)
                    .finish();
                let body = std::mem::take(&mut message.body);
                if let Err(e) = channel.channel.basic_publish(envelope.properties, body, args).await {
                    break 'session SessionEnd::ConnectionLost(format!("publish failed: {e}"));
                }
                channel.last_tag += 1;
                if session.in_flight.is_empty() {
                    deadline = Instant::now() + self.config.confirm_timeout;
                }
                session.in_flight.insert(channel.last_tag, seq);
            }
            if !feed_open && session.dispatcher.unsettled() == 0 {
                break SessionEnd::Finished;
            }
            let waiting_for_confirms = !session.in_flight.is_empty();
            let event = tokio::select! {
                command = feed.recv(), if feed_open => {
                    match command {
                        Some(Command::Publish(messages)) => {
                            for m in messages {
                                session.push(m, &self.config.default_exchange);
                            }
                        }
                        Some(Command::Release(keys)) => {
                            for k in &keys {
                                session.dispatcher.release_aggregate(k);
                            }
                        }
                        None => feed_open = false,
                    }
                    continue;
                }
                ev = channel.events.recv() => match ev {
                    Some(ev) => ev,
                    // The channel's dispatcher is gone, and with it the channel.
                    None if !self.connection.is_open() => Event::ConnectionClosed("connection lost".into()),
                    None => Event::ChannelClosed { code: 0, text: String::new() },
                },
                ev = self.connection_events.recv() => {
                    ev.unwrap_or_else(|| Event::ConnectionClosed("connection gone".into()))
                }
                _ = sleep_until(deadline), if waiting_for_confirms => {
                    let reason = format!("no confirm within {:?}", self.config.confirm_timeout);
                    for seq in session.in_flight.values().copied().collect::<Vec<_>>() {
                        session.fail(seq, FailureKind::Timeout, reason.clone());
                    }
                    session.in_flight.clear();
                    // Confirms may still come for them: a fresh channel keeps tags unambiguous.
                    break SessionEnd::ChannelLost(reason);
                }
                _ = tokio::time::sleep(TICK) => {
                    if !self.connection.is_open() {
                        break SessionEnd::ConnectionLost("connection lost".into());
                    }
                    continue;
                }
            };
            match event {
                Event::Ack { tag, multiple } => {
                    deadline = Instant::now() + self.config.confirm_timeout;
                    for seq in settle(&mut session.in_flight, tag, multiple) {
                        match session.returned.remove(&seq) {
                            None => session.confirm(seq),
                            Some(reason) => session.fail(seq, FailureKind::Unroutable, reason),
                        }
                    }
                }
                Event::Nack { tag, multiple } => {
                    deadline = Instant::now() + self.config.confirm_timeout;
                    for seq in settle(&mut session.in_flight, tag, multiple) {
                        session.fail(seq, FailureKind::Nacked, "the broker nacked the message".into());
                    }
                }
                Event::Returned { message_id, code, text } => {
                    if let Some(&seq) = message_id.as_ref().and_then(|id| session.seq_of_id.get(id)) {
                        session.returned.insert(seq, format!("returned by the broker: {code} {text}"));
                    }
                }
                Event::ChannelClosed { code: 0, .. } => {
                    break SessionEnd::ChannelLost("channel closed".into())
                }
                Event::ChannelClosed { code, text } => {
                    let reason = format!("channel closed by the broker: {code} {text}");
                    let unsettled: Vec<(u64, Target)> = session
                        .in_flight
                        .values()
                        .filter_map(|seq| session.pending.get(seq).map(|p| (*seq, p.target.clone())))
                        .collect();
                    let culprits = blame(&text, unsettled.iter().map(|(seq, t)| (*seq, t)));
                    for seq in culprits {
                        session.fail(seq, FailureKind::Refused, reason.clone());
                    }
                    break SessionEnd::ChannelLost(reason);
                }
                Event::ConnectionClosed(reason) => break SessionEnd::ConnectionLost(reason),
            }
        };
        // Whatever is still unsettled was not (knowingly) published.
        for seq in session.dispatcher.abandon_all() {
            session.report(seq, Outcome::NotAttempted);
        }
        if end != SessionEnd::Finished {
            self.channel = None;
        }
        end
    }
}

/// A command for a publishing session.
#[derive(Debug)]
pub enum Command {
    /// Publish these, after everything fed before.
    Publish(Vec<OutboxMessage>),
    /// The failures of these aggregates are on record in the outbox: their later messages may
    /// be published again.
    Release(Vec<OrderingKey>),
}

/// The outcome of one message, by its outbox row.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub row_id: i64,
    pub outcome: Outcome,
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The feed was closed and every message settled.
    Finished,
    /// The channel is gone (closed by the broker, or dropped after a confirm timeout); the
    /// connection may still serve a new session.
    ChannelLost(String),
    ConnectionLost(String),
}

struct Pending {
    row_id: i64,
    message_id: String,
    envelope: Option<Result<Envelope, String>>,
    body: Vec<u8>,
    target: Target,
}

/// The state of one publishing session.
struct Session<'r> {
    dispatcher: Dispatcher<OrderingKey>,
    pending: HashMap<u64, Pending>,
    /// Delivery tag → sequence number, for unconfirmed messages.
    in_flight: BTreeMap<u64, u64>,
    /// Messages the broker returned (their ack follows).
    returned: HashMap<u64, String>,
    seq_of_id: HashMap<String, u64>,
    reports: &'r UnboundedSender<Report>,
}

impl Session<'_> {
    fn push(&mut self, m: OutboxMessage, default_exchange: &str) {
        let envelope = m.envelope(default_exchange).map_err(|e| e.to_string());
        let target = Target {
            exchange: envelope.as_ref().map(|e| e.exchange.clone()).unwrap_or_default(),
            body_len: m.body.len(),
        };
        let (seq, slot) = self.dispatcher.push(m.ordering_key());
        if slot == Slot::Blocked {
            let _ = self.reports.send(Report { row_id: m.row_id, outcome: Outcome::NotAttempted });
            return;
        }
        self.seq_of_id.insert(m.message_id.clone(), seq);
        self.pending.insert(
            seq,
            Pending {
                row_id: m.row_id,
                message_id: m.message_id,
                envelope: Some(envelope),
                body: m.body,
                target,
            },
        );
    }

    fn report(&mut self, seq: u64, outcome: Outcome) {
        if let Some(p) = self.pending.remove(&seq) {
            self.seq_of_id.remove(&p.message_id);
            let _ = self.reports.send(Report { row_id: p.row_id, outcome });
        }
    }

    fn confirm(&mut self, seq: u64) {
        self.dispatcher.confirmed(seq);
        self.report(seq, Outcome::Confirmed);
    }

    /// Reports the failure before what it blocks: whoever reads the reports learns that the
    /// aggregate failed no later than that its followers were held back.
    fn fail(&mut self, seq: u64, kind: FailureKind, reason: String) {
        let blocked = self.dispatcher.failed(seq);
        self.report(seq, Outcome::Failed { kind, reason });
        for b in blocked {
            self.report(b, Outcome::NotAttempted);
        }
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

/// Removes and returns the sequence numbers a confirm covers, in publish order.
fn settle(in_flight: &mut BTreeMap<u64, u64>, tag: u64, multiple: bool) -> Vec<u64> {
    if multiple {
        let rest = in_flight.split_off(&(tag + 1));
        let covered = std::mem::replace(in_flight, rest);
        covered.into_values().collect()
    } else {
        in_flight.remove(&tag).into_iter().collect()
    }
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
fn blame<'a>(text: &str, unsettled: impl Iterator<Item = (u64, &'a Target)> + Clone) -> HashSet<u64> {
    let exchange = quoted_after(text, "exchange '");
    let size = text
        .split("message size ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|digits| digits.parse::<usize>().ok());
    let named: HashSet<u64> = unsettled
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

    fn blamed(text: &str) -> Vec<u64> {
        let t = targets();
        let mut v: Vec<u64> =
            blame(text, t.iter().enumerate().map(|(i, t)| (i as u64, t))).into_iter().collect();
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
        let mut m: BTreeMap<u64, u64> = (1..=5).map(|t| (t, t * 10)).collect();
        assert_eq!(settle(&mut m, 2, false), vec![20]);
        assert_eq!(settle(&mut m, 4, true), vec![10, 30, 40]);
        assert_eq!(settle(&mut m, 9, false), Vec::<u64>::new());
        assert_eq!(m.len(), 1);
    }
}
