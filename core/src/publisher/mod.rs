//! Publishing to RabbitMQ with publisher confirms.
//!
//! One connection and one confirm-mode channel. A session ([`session`]) publishes a stream of
//! messages as a pipeline: up to `max_in_flight` are unconfirmed at once (one per aggregate,
//! see [`crate::ordering`]), and every message ends in exactly one [`Outcome`], reported as
//! soon as it is known.
//!
//! - [`events`]: amqprs' callbacks, forwarded to the session loop;
//! - [`session`]: the session loop and its bookkeeping;
//! - [`classify`]: what a confirm covers and whom a refusal is about.
//!
//! [`Outcome`]: crate::outcome::Outcome

mod classify;
mod events;
mod session;
#[cfg(feature = "test-helpers")]
pub mod testing;

use crate::broker_url::BrokerUrl;
use crate::tls::{self, TlsFiles};
use crate::validate::ExchangeFilter;
use amqprs::channel::{Channel, ConfirmSelectArguments, ExchangeDeclareArguments, ExchangeType};
use amqprs::connection::{Connection, OpenConnectionArguments};
use events::{Event, Forward};
use std::mem::ManuallyDrop;
use std::time::Duration;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::time::timeout;

#[derive(Debug, Clone, PartialEq)]
pub struct PublisherConfig {
    pub url: BrokerUrl,
    /// CA, client certificate and key for an `amqps://` URL (unused for `amqp://`).
    pub tls: TlsFiles,
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
    /// The exchanges a message may name (`outbox.allowed_exchanges`); the default exchange is
    /// always allowed.
    pub allowed_exchanges: ExchangeFilter,
    /// Shown in the broker's connection list.
    pub connection_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    #[error("could not connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("connecting to {url} timed out after {after:?}")]
    ConnectTimeout { url: String, after: Duration },
    #[error("TLS set-up for {url} failed: {reason}")]
    Tls { url: String, reason: String },
    #[error("could not open a channel: {0}")]
    Channel(String),
}

/// The `frame_max` a broker that says nothing else uses (RabbitMQ's default).
pub const DEFAULT_FRAME_MAX: u32 = 131_072;

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
    /// The largest frame the broker takes, as negotiated.
    frame_max: u32,
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
        if url.tls {
            // The name the broker's certificate must carry is the host of the URL.
            let adaptor = tls::adaptor(&config.tls, &url.host)
                .map_err(|reason| BrokerError::Tls { url: shown.clone(), reason })?;
            args.tls_adaptor(adaptor);
        }
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
                let _ = io_tx.send(Event::ConnectionClosed { code: 0, text: "network I/O failure".into() });
            }
        });
        let registered = connection.register_callback(Forward(tx)).await;
        // A broker offering less than AMQP's minimum frame is taken at the minimum's word.
        let frame_max = match connection.frame_max() {
            0 => DEFAULT_FRAME_MAX,
            n => n.max(4096),
        };
        let mut publisher = Publisher {
            config,
            connection: ManuallyDrop::new(connection),
            runtime: tokio::runtime::Handle::current(),
            connection_events,
            channel: None,
            frame_max,
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
            if let Event::ConnectionClosed { .. } = ev {
                return false;
            }
        }
        self.connection.is_open()
    }

    /// The largest frame the broker takes on this connection.
    pub fn frame_max(&self) -> u32 {
        self.frame_max
    }

    pub fn config(&self) -> &PublisherConfig {
        &self.config
    }

    /// Closes the channel and the connection (each given two seconds at most).
    pub async fn close(mut self) {
        if let Some(c) = self.channel.take() {
            let _ = timeout(Duration::from_secs(2), c.channel.close()).await;
        }
        let _ = timeout(Duration::from_secs(2), Connection::clone(&self.connection).close()).await;
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let _context = self.runtime.enter();
        self.channel = None;
        // SAFETY: dropped once, here, and the field is never used again: `drop` is the last
        // use of `self`.
        unsafe { ManuallyDrop::drop(&mut self.connection) };
    }
}
