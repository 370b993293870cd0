//! A publishing session: what the feed brings is published in feed order under the window and
//! per-aggregate rules (see [`Dispatcher`]), and each message's outcome is reported as soon as
//! it is known.
//!
//! A session ends when its feed is closed and everything is settled, or when the channel or
//! the connection is lost, so that nothing published after a loss can overtake what the loss
//! interrupted: the caller reads the outbox again, in order, for the next session.

use super::classify::{blame, is_refusal, settle, Blame, Target};
use super::events::Event;
use super::{ConfirmChannel, Publisher};
use crate::message::{Envelope, OrderingKey};
use crate::ordering::{Dispatcher, Slot};
use crate::outcome::{Command, FailureKind, Handed, Lost, Outcome, Report, SessionEnd};
use amqprs::channel::BasicPublishArguments;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::time::{sleep_until, Instant};

/// How often a session looks at the connection's state, in case its close event never comes.
const TICK: Duration = Duration::from_millis(50);

impl Publisher {
    /// Publishes what `feed` brings and reports each message's outcome on `reports`. Ends when
    /// the feed is closed and everything is settled, or when the channel or the connection is
    /// lost; then every message not yet reported has been reported, except those still unread
    /// in the feed, which the caller must treat as not attempted.
    pub async fn run_session(
        &mut self,
        feed: &mut UnboundedReceiver<Command>,
        reports: &UnboundedSender<Report>,
    ) -> SessionEnd {
        if let Err(e) = self.ensure_channel().await {
            return SessionEnd::ConnectionLost(Lost::network(e.to_string()));
        }
        let Publisher { config, connection, connection_events, channel, frame_max, .. } = self;
        let Some(channel) = channel.as_mut() else {
            return SessionEnd::ConnectionLost(Lost::network("no channel"));
        };
        let rules = Rules {
            default_exchange: &config.default_exchange,
            mandatory: config.mandatory,
            confirm_timeout: config.confirm_timeout,
            frame_max: *frame_max as usize,
            allowed: &config.allowed_exchanges,
        };
        let mut session = Session::new(config.max_in_flight, reports);
        let end = session.run(channel, feed, connection_events, connection, &rules).await;
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

/// What a session needs to know of its publisher's settings.
struct Rules<'p> {
    default_exchange: &'p str,
    mandatory: bool,
    confirm_timeout: Duration,
    frame_max: usize,
    allowed: &'p crate::validate::ExchangeFilter,
}

struct Pending {
    row_id: i64,
    message_id: String,
    /// Taken when the message is released; an error fails it in its turn.
    envelope: Option<Result<Envelope, (FailureKind, String)>>,
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

impl<'r> Session<'r> {
    fn new(window: usize, reports: &'r UnboundedSender<Report>) -> Self {
        Session {
            dispatcher: Dispatcher::new(window),
            pending: HashMap::new(),
            in_flight: BTreeMap::new(),
            returned: HashMap::new(),
            seq_of_id: HashMap::new(),
            reports,
        }
    }

    async fn run(
        &mut self,
        channel: &mut ConfirmChannel,
        feed: &mut UnboundedReceiver<Command>,
        connection_events: &mut UnboundedReceiver<Event>,
        connection: &amqprs::connection::Connection,
        rules: &Rules<'_>,
    ) -> SessionEnd {
        let mut feed_open = true;
        let mut deadline = Instant::now() + rules.confirm_timeout;
        loop {
            if let Err(lost) = self.publish_released(channel, rules, &mut deadline).await {
                return SessionEnd::ConnectionLost(lost);
            }
            if !feed_open && self.dispatcher.unsettled() == 0 {
                return SessionEnd::Finished;
            }
            let waiting_for_confirms = !self.in_flight.is_empty();
            let event = tokio::select! {
                biased;
                ev = channel.events.recv() => match ev {
                    Some(ev) => ev,
                    // The channel's dispatcher is gone, and with it the channel.
                    None => closed_event(connection_events, connection)
                        .unwrap_or(Event::ChannelClosed { code: 0, text: String::new() }),
                },
                ev = connection_events.recv() => ev.unwrap_or(Event::ConnectionClosed {
                    code: 0,
                    text: "connection gone".into(),
                }),
                command = feed.recv(), if feed_open => {
                    match command {
                        Some(command) => self.take(command, rules),
                        None => feed_open = false,
                    }
                    continue;
                }
                _ = sleep_until(deadline), if waiting_for_confirms => {
                    let reason = format!("no confirm within {:?}", rules.confirm_timeout);
                    for seq in self.in_flight.values().copied().collect::<Vec<_>>() {
                        self.fail(seq, FailureKind::Timeout, reason.clone());
                    }
                    self.in_flight.clear();
                    // Confirms may still come for them: a fresh channel keeps tags unambiguous.
                    return SessionEnd::ChannelLost(reason);
                }
                _ = tokio::time::sleep(TICK) => {
                    match closed_event(connection_events, connection) {
                        Some(ev) => ev,
                        None => continue,
                    }
                }
            };
            match event {
                Event::Ack { tag, multiple } => {
                    deadline = Instant::now() + rules.confirm_timeout;
                    for seq in settle(&mut self.in_flight, tag, multiple) {
                        match self.returned.remove(&seq) {
                            None => self.confirm(seq),
                            Some(reason) => self.fail(seq, FailureKind::Unroutable, reason),
                        }
                    }
                }
                Event::Nack { tag, multiple } => {
                    deadline = Instant::now() + rules.confirm_timeout;
                    for seq in settle(&mut self.in_flight, tag, multiple) {
                        self.fail(seq, FailureKind::Nacked, "the broker nacked the message".into());
                    }
                }
                Event::Returned { message_id, code, text } => {
                    if let Some(&seq) = message_id.as_ref().and_then(|id| self.seq_of_id.get(id)) {
                        self.returned.insert(seq, format!("returned by the broker: {code} {text}"));
                    }
                }
                Event::ChannelClosed { code: 0, .. } => {
                    return SessionEnd::ChannelLost("channel closed".into())
                }
                Event::ChannelClosed { code, text } => {
                    let reason = format!("channel closed by the broker: {code} {text}");
                    self.refused(&text, &reason);
                    return SessionEnd::ChannelLost(reason);
                }
                Event::ConnectionClosed { code, text } if is_refusal(code) => {
                    self.refused(&text, &text);
                    return SessionEnd::ConnectionLost(Lost { reason: text, refused: true });
                }
                Event::ConnectionClosed { text, .. } => {
                    return SessionEnd::ConnectionLost(Lost::network(text))
                }
            }
        }
    }

    /// Publishes every message the dispatcher releases. Fails only when the connection is gone.
    async fn publish_released(
        &mut self,
        channel: &mut ConfirmChannel,
        rules: &Rules<'_>,
        deadline: &mut Instant,
    ) -> Result<(), Lost> {
        while let Some(seq) = self.dispatcher.release() {
            let Some(message) = self.pending.get_mut(&seq) else { continue };
            let envelope = match message.envelope.take() {
                Some(Ok(e)) => e,
                Some(Err((kind, reason))) => {
                    self.fail(seq, kind, reason);
                    continue;
                }
                None => continue,
            };
            if !channel.channel.is_open() {
                // Closed under us: its close event says why.
                return Ok(());
            }
            let args = BasicPublishArguments::new(&envelope.exchange, &envelope.routing_key)
                .mandatory(rules.mandatory)
                .finish();
            let body = std::mem::take(&mut message.body);
            if let Err(e) = channel.channel.basic_publish(envelope.properties, body, args).await {
                return Err(Lost::network(format!("publish failed: {e}")));
            }
            channel.last_tag += 1;
            if self.in_flight.is_empty() {
                *deadline = Instant::now() + rules.confirm_timeout;
            }
            self.in_flight.insert(channel.last_tag, seq);
        }
        Ok(())
    }

    fn take(&mut self, command: Command, rules: &Rules<'_>) {
        match command {
            Command::Publish(messages) => {
                for m in messages {
                    self.push(m, rules);
                }
            }
            Command::Release(keys) => {
                for k in &keys {
                    self.dispatcher.release_aggregate(k);
                }
            }
        }
    }

    fn push(&mut self, handed: Handed, rules: &Rules<'_>) {
        let m = handed.message;
        let envelope = match m.envelope(rules.default_exchange) {
            Err(e) => Err((FailureKind::Invalid, e.to_string())),
            Ok(e) if m.exchange.is_some() && !rules.allowed.allows(&e.exchange) => Err((
                FailureKind::Invalid,
                format!("exchange {:?} is not in outbox.allowed_exchanges", e.exchange),
            )),
            Ok(e) if e.header_frame_len > rules.frame_max => Err((
                FailureKind::TooLarge,
                format!(
                    "its properties and headers take {} bytes, more than the broker's frame_max ({})",
                    e.header_frame_len, rules.frame_max
                ),
            )),
            Ok(e) => Ok(e),
        };
        let target = Target {
            exchange: envelope.as_ref().map(|e| e.exchange.clone()).unwrap_or_default(),
            body_len: m.body.len(),
        };
        let (seq, slot) = self.dispatcher.push(m.ordering_key(), handed.alone);
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

    /// The broker closed the channel or the connection over something it was sent: the
    /// messages it names fail; when it names none among several unconfirmed, they are all
    /// suspects, to be published alone next time.
    fn refused(&mut self, text: &str, reason: &str) {
        let unsettled: Vec<(u64, Target)> = self
            .in_flight
            .values()
            .filter_map(|seq| self.pending.get(seq).map(|p| (*seq, p.target.clone())))
            .collect();
        match blame(text, unsettled.iter().map(|(seq, t)| (*seq, t))) {
            Blame::Named(culprits) => {
                for seq in culprits {
                    self.fail(seq, FailureKind::Refused, reason.to_string());
                }
            }
            Blame::Unknown => {
                for (seq, _) in unsettled {
                    self.report(seq, Outcome::Suspected { reason: reason.to_string() });
                }
            }
        }
    }

    fn report(&mut self, seq: u64, outcome: Outcome) {
        if let Some(p) = self.pending.remove(&seq) {
            self.seq_of_id.remove(&p.message_id);
            let _ = self.reports.send(Report { row_id: p.row_id, outcome });
        }
    }

    fn confirm(&mut self, seq: u64) {
        if self.dispatcher.confirmed(seq) {
            self.report(seq, Outcome::Confirmed);
        }
    }

    /// Reports the failure before what it blocks: whoever reads the reports learns that the
    /// aggregate failed no later than that its followers were held back.
    fn fail(&mut self, seq: u64, kind: FailureKind, reason: String) {
        let Some(blocked) = self.dispatcher.failed(seq) else { return };
        self.report(seq, Outcome::Failed { kind, reason });
        for b in blocked {
            self.report(b, Outcome::NotAttempted);
        }
    }
}

/// A connection-closed event, if the connection is gone: the broker's own close when it sent
/// one (its callback runs before the connection is marked closed), else a network loss.
fn closed_event(
    events: &mut UnboundedReceiver<Event>,
    connection: &amqprs::connection::Connection,
) -> Option<Event> {
    while let Ok(ev) = events.try_recv() {
        if let Event::ConnectionClosed { .. } = ev {
            return Some(ev);
        }
    }
    (!connection.is_open()).then(|| Event::ConnectionClosed { code: 0, text: "connection lost".into() })
}
