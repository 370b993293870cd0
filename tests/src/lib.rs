//! Test harness for pg_outbox: real Postgres clusters with the extension preloaded, the real
//! RabbitMQ, a consumer that records what arrived, and ways to break each of them.

pub mod broker;
pub mod cluster;
pub mod install;
pub mod load;
pub mod proxy;
pub mod tls_node;

pub use broker::{dedup, unique, Broker, BrokerOutage, Consumer, Delivery};
pub use cluster::{quick_retries, unreachable_broker_url, wait_until, Cluster, BROKER_URL, DB};
pub use load::{verify, Load, LoadSpec, Verdict};
pub use proxy::Proxy;
pub use tls_node::{Certificates, TlsNode};

/// Serializes tests that stop the shared broker or load the machine, so they do not disturb
/// each other. Poisoning is ignored: one failed test must not fail the rest.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
