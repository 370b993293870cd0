//! One stream's publishing connection, run as a task on a tokio runtime.
//!
//! The worker's main thread drives a link without ever waiting on it: it queues messages with
//! [`StreamLink::publish`] and reads [`Report`]s from a channel. A link connects, checks that
//! the stream exists, declares its publisher (id 1, named after the producer) and reports the
//! broker's last stored publishing id ([`Report::Ready`]). It then sends queued messages in
//! order, in frames that stay under the frame size, and reports every confirm. It ends, with
//! exactly one [`Report::Ended`] as its last report, when the connection is lost, the broker
//! refuses a message, no confirm comes for `confirm_timeout` while messages are unconfirmed,
//! or it is closed, aborted or dropped. A link is not restarted: the caller starts another.
//!
//! Every network call is bounded by a timeout. Texts in reports never hold the password.

use super::handler::{forward, Connection, End, Event, Reporter, STOPPED};
use super::message::{encoded_len, with_publishing_id, PUBLISH_FRAME_OVERHEAD};
use super::url::StreamUrl;
use super::{check_stream_name, PRODUCER_NAME_MAX};
use rabbitmq_stream_client::types::ResponseCode;
use rabbitmq_stream_client::{Client, ClientOptions};
use rabbitmq_stream_protocol::message::Message;
use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::time::Duration;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout, Instant};

/// The frame size a link asks for when its config says 0: 1 MiB, what the client proposes
/// and RabbitMQ's default `stream.frame_max`.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 1_048_576;

/// The link's one publisher on its connection.
const PUBLISHER_ID: u8 = 1;

#[derive(Debug, Clone, PartialEq)]
pub struct LinkConfig {
    pub url: StreamUrl,
    pub stream: String,
    /// The publisher's name, under which the broker keeps its last publishing id
    /// ([`super::producer_name`]).
    pub producer: String,
    /// Upper bound for each step of connecting: TCP connect plus handshake, the stream's
    /// metadata, the publisher's declaration, the query of its sequence.
    pub connect_timeout: Duration,
    /// Messages unconfirmed this long after the last confirm (or their sending) end the link;
    /// also bounds each send.
    pub confirm_timeout: Duration,
    /// The largest frame the link asks for and sends; 0: [`DEFAULT_MAX_FRAME_BYTES`]. The
    /// broker agrees to the smaller of this and its own `stream.frame_max`, but the client
    /// keeps the agreed value to itself, so frames are cut to this: a broker configured lower
    /// may refuse them (RabbitMQ 3.10 takes bigger frames than agreed).
    pub max_frame_bytes: u32,
}

impl LinkConfig {
    /// The largest frame the link sends.
    pub fn frame_limit(&self) -> u32 {
        if self.max_frame_bytes == 0 {
            DEFAULT_MAX_FRAME_BYTES
        } else {
            self.max_frame_bytes
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// Connected and the publisher declared: the broker's last stored publishing id for
    /// `producer` (0 if none).
    Ready { sequence: u64 },
    /// The broker confirmed these publishing ids (stored, or dropped as duplicates of stored
    /// ones). In any order, and possibly ids this link never sent.
    Confirmed(Vec<u64>),
    /// The link ended; nothing more will come from it. `refused` is true when the broker
    /// refused the stream itself (stream does not exist, access refused / publisher declare
    /// refused) or the config cannot name it (a bad stream name, a producer name of more than
    /// 255 bytes), false for a lost connection, a timeout, a publish error.
    Ended { reason: String, refused: bool },
}

enum Command {
    Publish(Vec<(u64, Message)>),
    Close { grace: Duration, done: oneshot::Sender<()> },
}

/// A running link. Dropping it ends the link like [`StreamLink::abort`], once the task next
/// looks at its queue.
pub struct StreamLink {
    commands: UnboundedSender<Command>,
    task: JoinHandle<()>,
}

impl StreamLink {
    /// Starts the link's task on `runtime`. Its reports go to `reports`, with its stream's name.
    pub fn start(
        runtime: &tokio::runtime::Handle,
        config: LinkConfig,
        reports: UnboundedSender<(String, Report)>,
    ) -> StreamLink {
        let (commands, queue) = unbounded_channel();
        let task = runtime.spawn(run(config, reports, queue));
        StreamLink { commands, task }
    }

    /// Queues messages to publish, in the order given (the caller gives strictly increasing
    /// ids). Messages queued before [`Report::Ready`] are sent after it; messages queued to a
    /// link that has ended are dropped.
    pub fn publish(&self, messages: Vec<(u64, Message)>) {
        if !messages.is_empty() {
            let _ = self.commands.send(Command::Publish(messages));
        }
    }

    /// Whether the task has ended. Its [`Report::Ended`] comes a moment before.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops the task (drops the connection) without waiting. Its last report is
    /// `Ended { reason: "the link was stopped", refused: false }` unless it had ended already.
    pub fn abort(self) {
        self.task.abort();
    }

    /// Best effort: delete the publisher and close, bounded by `grace`. Queued messages not yet
    /// sent are dropped; confirms still due are not waited for. The last report is
    /// `Ended { reason: "the link was closed", refused: false }` (or "the link was stopped" when
    /// `grace` ran out first) unless the link had ended already.
    pub async fn close(self, grace: Duration) {
        let (done, closed) = oneshot::channel();
        if self.commands.send(Command::Close { grace, done }).is_ok() {
            let _ = timeout(grace, closed).await;
        }
        self.task.abort();
    }
}

async fn run(
    config: LinkConfig,
    reports: UnboundedSender<(String, Report)>,
    queue: UnboundedReceiver<Command>,
) {
    let mut reporter = Reporter::new(config.stream.clone(), config.url.clone(), reports);
    let (events_tx, events) = unbounded_channel();
    let (connection, sequence) = match open(&config, events_tx).await {
        Ok(opened) => opened,
        Err(end) => return reporter.end(end),
    };
    reporter.send(Report::Ready { sequence });
    let mut link = Link {
        config: &config,
        connection,
        events,
        queue,
        waiting: VecDeque::new(),
        unconfirmed: HashSet::new(),
        progress: Instant::now(),
        closed: None,
    };
    let end = link.serve(&reporter).await;
    link.drain(&reporter);
    reporter.end(end);
    if let Some(done) = link.closed.take() {
        let _ = done.send(());
    }
}

/// Runs one step of connecting within the connect timeout.
async fn step<T, E: std::fmt::Display>(
    config: &LinkConfig,
    what: &str,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, End> {
    match timeout(config.connect_timeout, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(End::lost(format!("{what} on stream {} failed: {e}", config.stream))),
        Err(_) => Err(End::lost(format!("{what} on stream {} timed out", config.stream))),
    }
}

/// Connects, checks the stream, declares the publisher: the connection and the broker's last
/// stored publishing id.
async fn open(config: &LinkConfig, events: UnboundedSender<Event>) -> Result<(Connection, u64), End> {
    check_stream_name(&config.stream).map_err(End::refused)?;
    let len = config.producer.len();
    if !(1..=PRODUCER_NAME_MAX).contains(&len) {
        return Err(End::refused(format!("the producer name is {len} bytes long; it must have 1 to 255")));
    }
    let url = &config.url;
    // Never printed: its Debug shows the password.
    let options = ClientOptions::builder()
        .host(&url.host)
        .port(url.port)
        .user(&url.user)
        .password(&url.password)
        .v_host(&url.vhost)
        .max_frame_size(config.frame_limit())
        .build();
    let connection = match timeout(config.connect_timeout, Client::connect(options)).await {
        Ok(Ok(client)) => Connection::new(client),
        Ok(Err(e)) => return Err(End::lost(format!("could not connect to {}: {e}", url.shown()))),
        Err(_) => {
            let after = config.connect_timeout;
            return Err(End::lost(format!("connecting to {} timed out after {after:?}", url.shown())));
        }
    };
    let client = &connection.client;
    let stream = &config.stream;
    let metadata = step(config, "reading the metadata", client.metadata(vec![stream.clone()])).await?;
    // A stream that does not exist has no leader, and the client leaves out streams without one.
    match metadata.get(stream).map(|m| &m.response_code) {
        Some(ResponseCode::Ok) => {}
        None | Some(ResponseCode::StreamDoesNotExist) => {
            return Err(End::refused(format!("stream {stream} does not exist")))
        }
        Some(ResponseCode::AccessRefused) => {
            return Err(End::refused(format!("access to stream {stream} refused")))
        }
        Some(code) => return Err(End::lost(format!("stream {stream} is not available ({code:?})"))),
    }
    client.set_handler(forward(events)).await;
    let producer = &config.producer;
    let declare = client.declare_publisher(PUBLISHER_ID, Some(producer.clone()), stream);
    let declared = step(config, "declaring the publisher", declare).await?;
    if !declared.is_ok() {
        let code = declared.code();
        return Err(End::refused(format!(
            "the broker refused publisher {producer:?} on stream {stream}: {code:?}"
        )));
    }
    let query = client.query_publisher_sequence(producer, stream);
    let sequence = step(config, "querying the publisher's sequence", query).await?;
    Ok((connection, sequence))
}

/// A link once its publisher is declared.
struct Link<'a> {
    config: &'a LinkConfig,
    connection: Connection,
    events: UnboundedReceiver<Event>,
    queue: UnboundedReceiver<Command>,
    /// Queued, not yet sent, in order.
    waiting: VecDeque<(u64, Message)>,
    /// Sent, not yet confirmed.
    unconfirmed: HashSet<u64>,
    /// When the last confirm came, or the first of the unconfirmed messages was sent.
    progress: Instant,
    /// Told once the link, closed by [`StreamLink::close`], has sent its end.
    closed: Option<oneshot::Sender<()>>,
}

impl Link<'_> {
    async fn serve(&mut self, reporter: &Reporter) -> End {
        loop {
            if let Err(end) = self.send_waiting().await {
                return end;
            }
            let deadline = self.progress + self.config.confirm_timeout;
            tokio::select! {
                biased;
                event = self.events.recv() => match event {
                    Some(Event::Confirmed(ids)) => self.confirmed(ids, reporter),
                    Some(Event::Refused { publishing_id, code }) => {
                        return End::lost(format!("broker refused publishing id {publishing_id}: {code}"))
                    }
                    Some(Event::Lost(reason)) => return End::lost(reason),
                    None => return End::lost("the client stopped"),
                },
                command = self.queue.recv() => match command {
                    Some(Command::Publish(messages)) => self.waiting.extend(messages),
                    Some(Command::Close { grace, done }) => {
                        self.connection.close(Some(PUBLISHER_ID), grace).await;
                        self.closed = Some(done);
                        return End::lost("the link was closed");
                    }
                    // The `StreamLink` is gone: as if aborted.
                    None => return End::lost(STOPPED),
                },
                _ = sleep_until(deadline), if !self.unconfirmed.is_empty() => {
                    let (after, n) = (self.config.confirm_timeout, self.unconfirmed.len());
                    return End::lost(format!("no confirm for {after:?} with {n} messages unconfirmed"));
                }
            }
        }
    }

    fn confirmed(&mut self, ids: Vec<u64>, reporter: &Reporter) {
        for id in &ids {
            self.unconfirmed.remove(id);
        }
        self.progress = Instant::now();
        reporter.send(Report::Confirmed(ids));
    }

    /// Reports the confirms already received, before the link's end.
    fn drain(&mut self, reporter: &Reporter) {
        while let Ok(event) = self.events.try_recv() {
            if let Event::Confirmed(ids) = event {
                self.confirmed(ids, reporter);
            }
        }
    }

    /// Sends every waiting message, in order, as few frames as fit.
    async fn send_waiting(&mut self) -> Result<(), End> {
        let limit = self.config.frame_limit();
        let room = (limit as usize).saturating_sub(PUBLISH_FRAME_OVERHEAD);
        while let Some((first, message)) = self.waiting.front() {
            let len = encoded_len(message);
            if len > room {
                return Err(End::lost(format!(
                    "message {first} takes {len} bytes; a frame of {limit} bytes holds {room}"
                )));
            }
            let mut frame = Vec::new();
            let mut size = 0;
            while let Some((id, message)) = self.waiting.front() {
                let len = encoded_len(message);
                if size + len > room {
                    break;
                }
                size += len;
                frame.push(with_publishing_id(message, *id));
                self.waiting.pop_front();
            }
            let ids = frame.iter().filter_map(|m| m.publishing_id().copied()).collect::<Vec<_>>();
            match timeout(self.config.confirm_timeout, self.connection.client.publish(PUBLISHER_ID, frame))
                .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(End::lost(format!("publishing failed: {e}"))),
                Err(_) => return Err(End::lost("publishing timed out")),
            }
            if self.unconfirmed.is_empty() {
                self.progress = Instant::now();
            }
            self.unconfirmed.extend(ids);
        }
        Ok(())
    }
}
