//! The baseline: a bare amqprs publisher, one connection, one confirm-mode channel, at most
//! `window` unconfirmed messages, the same properties pg_outbox sends. What the broker can take
//! from one client on this machine.

use amqprs::callbacks::{ChannelCallback, DefaultConnectionCallback};
use amqprs::channel::{BasicPublishArguments, Channel, ConfirmSelectArguments};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, Nack, Return};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Counts confirms (the highest delivery tag confirmed) into a watch channel.
pub struct ConfirmCounter(watch::Sender<u64>);

impl ConfirmCounter {
    pub fn new(tx: watch::Sender<u64>) -> Self {
        ConfirmCounter(tx)
    }
}

#[async_trait::async_trait]
impl ChannelCallback for ConfirmCounter {
    async fn close(&mut self, _: &Channel, _: CloseChannel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn cancel(&mut self, _: &Channel, _: Cancel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(&mut self, _: &Channel, _: bool) -> Result<bool, amqprs::error::Error> {
        Ok(true)
    }
    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        // Confirms come in order here; `multiple` covers everything up to the tag.
        self.0.send_modify(|confirmed| *confirmed = (*confirmed).max(ack.delivery_tag()));
    }
    async fn publish_nack(&mut self, _: &Channel, nack: Nack) {
        self.0.send_modify(|confirmed| *confirmed = (*confirmed).max(nack.delivery_tag()));
    }
    async fn publish_return(&mut self, _: &Channel, _: Return, _: BasicProperties, _: Vec<u8>) {}
}

/// The properties pg_outbox sends for the benchmarks' event `n` of aggregate `aggregate_id`:
/// a uuid message id, type, content type, persistent, timestamp, app id, the two aggregate
/// headers.
pub fn properties(n: u64, aggregate_id: String) -> BasicProperties {
    let mut headers = amqprs::FieldTable::new();
    headers.insert("aggregate_type".try_into().unwrap(), "account".into());
    headers.insert("aggregate_id".try_into().unwrap(), aggregate_id.into());
    let mut props = BasicProperties::default();
    props
        .with_message_id(&format!("01a21e66-c875-7173-84fb-{n:012}"))
        .with_message_type("FundsTransferEvent")
        .with_content_type("application/json")
        .with_delivery_mode(2)
        .with_timestamp(1_700_000_000)
        .with_app_id("pg_outbox")
        .with_headers(headers);
    props.finish()
}

pub fn body(n: u64) -> Vec<u8> {
    // About 100 bytes of JSON, like the events the relay benchmark writes.
    format!(r#"{{"amount": 100, "from": "account-{:06}", "to": "account-{:06}", "currency": "EUR", "ref": "{n:012}"}}"#, n % 1000, (n + 1) % 1000)
        .into_bytes()
}

/// Where the baseline publisher connects: a port of 127.0.0.1, or of `localhost` over TLS
/// (verified against the CA file, with the same rustls set-up as the worker's).
pub struct Target {
    pub port: u16,
    pub tls_ca: Option<std::path::PathBuf>,
}

impl Target {
    /// The machine's broker.
    pub fn local() -> Target {
        Target { port: 5672, tls_ca: None }
    }
}

/// Publishes `count` persistent messages with at most `window` unconfirmed; returns the rate.
/// `mandatory` as pg_outbox sets it by default (off only for an exchange with no queue).
pub fn publish_rate(exchange: &str, routing_key: &str, count: u64, window: u64, mandatory: bool) -> f64 {
    publish_rate_to(&Target::local(), exchange, routing_key, count, window, mandatory)
}

/// [`publish_rate`] to `target`.
pub fn publish_rate_to(
    target: &Target,
    exchange: &str,
    routing_key: &str,
    count: u64,
    window: u64,
    mandatory: bool,
) -> f64 {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(async {
        let args = match &target.tls_ca {
            None => OpenConnectionArguments::new("127.0.0.1", target.port, "guest", "guest"),
            Some(ca) => {
                let files = pg_outbox_core::tls::TlsFiles { ca_file: Some(ca.clone()), ..Default::default() };
                let mut args = OpenConnectionArguments::new("localhost", target.port, "guest", "guest");
                args.tls_adaptor(pg_outbox_core::tls::adaptor(&files, "localhost").unwrap());
                args
            }
        };
        let connection = Connection::open(&args).await.unwrap();
        connection.register_callback(DefaultConnectionCallback).await.unwrap();
        let channel = connection.open_channel(None).await.unwrap();
        let (tx, mut rx) = watch::channel(0u64);
        channel.register_callback(ConfirmCounter(tx)).await.unwrap();
        channel.confirm_select(ConfirmSelectArguments::new(false)).await.unwrap();
        let args = BasicPublishArguments::new(exchange, routing_key).mandatory(mandatory).finish();
        let started = Instant::now();
        for n in 1..=count {
            while n - *rx.borrow() > window {
                rx.changed().await.unwrap();
            }
            // The same message pg_outbox sends for the relay benchmark's events.
            let props = properties(n, ((n * 7919) % 100_000).to_string());
            channel.basic_publish(props, body(n), args.clone()).await.unwrap();
        }
        while *rx.borrow() < count {
            tokio::time::timeout(Duration::from_secs(60), rx.changed()).await.unwrap().unwrap();
        }
        let rate = count as f64 / started.elapsed().as_secs_f64();
        channel.close().await.ok();
        connection.close().await.ok();
        rate
    })
}
