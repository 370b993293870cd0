//! The parts of pg_outbox that need no Postgres: what an event may contain, how it becomes an
//! AMQP message, how a batch is published with publisher confirms while keeping per-aggregate
//! order, how failures are retried, and how the broker address is parsed and kept secret.
//!
//! The extension crate calls into this crate from its background worker and its SQL functions;
//! everything here is tested with plain `cargo test` (the publisher against a real RabbitMQ).

pub mod broker_url;
pub mod headers;
pub mod locks;
pub mod message;
pub mod metrics;
pub mod ordering;
pub mod outcome;
pub mod publisher;
pub mod retry;
pub mod stream;
pub mod tls;
pub mod validate;

pub use broker_url::BrokerUrl;
pub use message::OutboxMessage;
pub use outcome::{FailureKind, Outcome};
pub use publisher::{Publisher, PublisherConfig};
pub use retry::{Backoff, RetryPolicy};
