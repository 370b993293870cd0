//! What happens to a message once it is handed to a publishing session, and the words the
//! worker and a session speak to each other. No transport here: the retry policy and the
//! worker's ledger depend on these types, not on the AMQP client.

use crate::message::{OrderingKey, OutboxMessage};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// basic.nack from the broker.
    Nacked,
    /// Returned by the broker: no queue is bound for its routing key.
    Unroutable,
    /// The broker closed the channel or the connection because of it (missing exchange,
    /// access refused, too big, a frame it would not take).
    Refused,
    /// Its properties and headers do not fit in one frame of the negotiated `frame_max`:
    /// sent anyway, the broker would close the connection.
    TooLarge,
    /// No confirm within the confirm timeout.
    Timeout,
    /// The row cannot be turned into an AMQP message, or may not be sent where it asks to go.
    Invalid,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Nacked => "nacked",
            FailureKind::Unroutable => "unroutable",
            FailureKind::Refused => "refused",
            FailureKind::TooLarge => "too large",
            FailureKind::Timeout => "timeout",
            FailureKind::Invalid => "invalid",
        }
    }
}

/// The outcome of one message. Exactly one is reported for every message handed over, except
/// for those still unread in the feed when a session ends (see [`SessionEnd`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The broker acked it and did not return it. Only then may its row go.
    Confirmed,
    /// It failed; the worker counts an attempt and retries it later (or dead-letters it).
    Failed { kind: FailureKind, reason: String },
    /// Held back, or the connection went away first. Not its fault: it stays as it is and is
    /// published again later (maybe a second time).
    NotAttempted,
    /// It was unconfirmed when the broker refused something without saying what (a channel or
    /// connection closed with an error that names no message). Not counted as an attempt;
    /// the next session publishes it alone, so that a repeat of the refusal names it.
    Suspected { reason: String },
}

/// The outcome of one message, by its outbox row.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub row_id: i64,
    pub outcome: Outcome,
}

/// A command for a publishing session.
#[derive(Debug)]
pub enum Command {
    /// Publish these, after everything fed before.
    Publish(Vec<Handed>),
    /// The failures of these aggregates are on record in the outbox: their later messages may
    /// be published again.
    Release(Vec<OrderingKey>),
}

/// A message handed to a session.
#[derive(Debug, Clone, PartialEq)]
pub struct Handed {
    pub message: OutboxMessage,
    /// Publish it alone (nothing else unconfirmed meanwhile): see [`Outcome::Suspected`].
    pub alone: bool,
}

impl From<OutboxMessage> for Handed {
    fn from(message: OutboxMessage) -> Self {
        Handed { message, alone: false }
    }
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    pub reason: String,
    /// The broker closed it with an error about what it was sent (a frame too large, a
    /// syntax error: AMQP's 5xx "hard errors" other than a shutdown), as opposed to a network
    /// failure or the broker going away.
    pub refused: bool,
}

impl Lost {
    pub fn network(reason: impl Into<String>) -> Lost {
        Lost { reason: reason.into(), refused: false }
    }
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The feed was closed and every message settled.
    Finished,
    /// The channel is gone (closed by the broker, or dropped after a confirm timeout); the
    /// connection may still serve a new session.
    ChannelLost(String),
    ConnectionLost(Lost),
}
