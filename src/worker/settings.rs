//! The worker's settings, read once per reload into one snapshot.

use crate::gucs;
use pg_outbox_core::broker_url::scrub_nodes;
use pg_outbox_core::publisher::PublisherConfig;
use pg_outbox_core::retry::RetryPolicy;
use pg_outbox_core::stream::StreamUrl;
use pg_outbox_core::BrokerUrl;
use pgrx::pg_sys;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// What every publisher connects with (`url` is the first node; the link picks the node).
    /// `None` while `outbox.amqp_url` is not set.
    pub publisher: Option<PublisherConfig>,
    /// The broker's nodes, in the order they are tried.
    pub nodes: Vec<BrokerUrl>,
    /// Publishers (connections) of the worker, each with up to `max_in_flight` unconfirmed.
    pub publishers: usize,
    /// `outbox.exchange`: where rows that name no exchange go.
    pub default_exchange: String,
    pub batch_size: usize,
    pub max_in_flight: usize,
    pub max_in_flight_bytes: usize,
    pub poll_interval: Duration,
    pub retry: RetryPolicy,
    pub reconnect_backoff_max: Duration,
    pub wait_for_sync_standbys: bool,
    /// Claims in `outbox.inbox` older than this are removed; `None`: kept forever.
    pub inbox_retention: Option<Duration>,
    /// `outbox.stream_url`; `None`: events for streams wait.
    pub stream: Option<StreamUrl>,
    pub confirm_timeout: Duration,
}

impl Settings {
    pub fn read() -> Settings {
        // SAFETY: reads this process' pid.
        let pid = unsafe { pg_sys::MyProcPid };
        let nodes = gucs::amqp_nodes();
        let publishers = gucs::publishers();
        Settings {
            publisher: nodes.first().cloned().map(|url| PublisherConfig {
                url,
                tls: gucs::tls_files(),
                default_exchange: gucs::exchange(),
                // A stream is not an exchange: nothing to declare.
                declare_default_exchange: gucs::declare_exchange()
                    && !gucs::exchange().starts_with(pg_outbox_core::stream::PREFIX),
                mandatory: gucs::unroutable_is_failure(),
                confirm_timeout: gucs::confirm_timeout(),
                max_in_flight: gucs::max_in_flight(),
                allowed_exchanges: gucs::allowed_exchanges(),
                connection_name: format!("pg_outbox worker (pid {pid})"),
            }),
            nodes,
            publishers,
            default_exchange: gucs::exchange(),
            batch_size: gucs::batch_size(),
            max_in_flight: gucs::max_in_flight(),
            max_in_flight_bytes: gucs::max_in_flight_bytes(),
            poll_interval: gucs::poll_interval(),
            retry: gucs::retry_policy(),
            reconnect_backoff_max: gucs::reconnect_backoff_max(),
            wait_for_sync_standbys: gucs::wait_for_sync_standbys(),
            inbox_retention: gucs::inbox_retention(),
            stream: gucs::stream_url(),
            confirm_timeout: gucs::confirm_timeout(),
        }
    }

    /// Removes the broker's password from a text that may have picked it up.
    pub fn scrub(&self, text: &str) -> String {
        let text = scrub_nodes(&self.nodes, text);
        match &self.stream {
            Some(url) => url.scrub(&text),
            None => text,
        }
    }
}
