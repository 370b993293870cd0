//! For tests: a session fed with one batch, and every outcome in batch order.

use super::Publisher;
use crate::message::OutboxMessage;
use crate::outcome::{Command, Handed, Lost, Outcome, SessionEnd};
use std::collections::HashMap;
use tokio::sync::mpsc::unbounded_channel;

#[derive(Debug, Default)]
pub struct BatchReport {
    /// One per message, in batch order.
    pub outcomes: Vec<Outcome>,
    /// Set when the connection was lost or became unusable.
    pub connection_lost: Option<Lost>,
}

impl BatchReport {
    pub fn confirmed(&self) -> usize {
        self.outcomes.iter().filter(|o| **o == Outcome::Confirmed).count()
    }
}

impl Publisher {
    /// Makes the publisher believe the broker takes frames of `frame_max` bytes, so that it
    /// sends what the broker refuses.
    pub fn pretend_frame_max(&mut self, frame_max: u32) {
        self.frame_max = frame_max;
    }

    /// Publishes `batch` and waits for every outcome.
    pub async fn publish_batch(&mut self, batch: Vec<OutboxMessage>) -> BatchReport {
        self.publish_handed(batch.into_iter().map(Handed::from).collect()).await
    }

    /// [`Publisher::publish_batch`], for messages that may be marked to go alone.
    pub async fn publish_handed(&mut self, batch: Vec<Handed>) -> BatchReport {
        let rows: Vec<i64> = batch.iter().map(|h| h.message.row_id).collect();
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
                SessionEnd::ConnectionLost(lost) => Some(lost),
                _ => None,
            },
        }
    }
}
