//! The ledger: what the worker has handed to the publishing session and not yet settled, and
//! the outcomes that came back and are still to be recorded in the outbox. Pure Rust.
//!
//! Everything in it belongs to one generation of the outbox table (see
//! `table::Generation`): row ids mean nothing in another, so a new generation clears it.
//! Outcomes are taken out exactly once for recording ([`Ledger::take_outcomes`]) and put
//! back only if recording failed ([`Ledger::restore`]).

use pg_outbox_core::message::{OrderingKey, OutboxMessage};
use pg_outbox_core::outcome::{FailureKind, Handed, Outcome, Report};
use pg_outbox_core::retry::{RetryDecision, RetryPolicy};
use rand::Rng;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// A failed attempt to record: either retried later or moved to the dead letters.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub row_id: i64,
    pub kind: FailureKind,
    pub error: String,
    /// `None`: dead-letter it.
    pub retry_after: Option<Duration>,
    pub meter: Meter,
}

/// What the metrics need to know of an event: where it goes, when its transaction committed
/// and when its outcome came back (Postgres timestamps, microseconds).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Meter {
    /// The exchange the row names (`None`: `outbox.exchange`).
    pub exchange: Option<String>,
    pub committed_at: i64,
    pub settled_at: i64,
}

/// A row read from the outbox: the message, its size, when its transaction committed.
#[derive(Debug)]
pub struct ReadRow {
    pub message: OutboxMessage,
    pub bytes: usize,
    pub committed_at: i64,
}

/// Outcomes to record in the outbox.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Outcomes {
    /// Rows the broker confirmed: delete them.
    pub confirmed: Vec<i64>,
    /// The same rows' meters, in the same order.
    pub confirmed_meters: Vec<Meter>,
    pub failures: Vec<Failure>,
    /// Aggregates whose failures are among `failures`: once those are on record, the session
    /// may let their later events go on.
    pub failed_keys: Vec<OrderingKey>,
}

impl Outcomes {
    pub fn is_empty(&self) -> bool {
        self.confirmed.is_empty() && self.failures.is_empty()
    }
}

#[derive(Debug)]
struct InFlight {
    attempts: i32,
    key: Option<OrderingKey>,
    bytes: usize,
    /// The publisher it was handed to.
    publisher: usize,
    meter: Meter,
}

#[derive(Debug)]
pub struct Ledger<G> {
    generation: Option<G>,
    in_flight: HashMap<i64, InFlight>,
    bytes: usize,
    /// Rows that were unconfirmed when the broker refused something it did not name: handed
    /// over alone next time.
    suspects: HashSet<i64>,
    outcomes: Outcomes,
}

impl<G: PartialEq + Copy> Default for Ledger<G> {
    fn default() -> Self {
        Ledger {
            generation: None,
            in_flight: HashMap::new(),
            bytes: 0,
            suspects: HashSet::new(),
            outcomes: Outcomes::default(),
        }
    }
}

impl<G: PartialEq + Copy> Ledger<G> {
    /// The rows of this round come from `generation`. If the ledger held another, everything
    /// in it is forgotten and this returns true: the caller must end the session (its reports
    /// are about rows of the old table) and start the floor over.
    pub fn for_generation(&mut self, generation: G) -> bool {
        if self.generation == Some(generation) {
            return false;
        }
        let changed = self.generation.is_some();
        *self = Ledger { generation: Some(generation), ..Ledger::default() };
        changed
    }

    pub fn generation(&self) -> Option<G> {
        self.generation
    }

    /// Forgets everything (the table is gone).
    pub fn clear(&mut self) {
        *self = Ledger::default();
    }

    /// Takes rows read from the outbox for the sessions of `publishers` publishers; marks
    /// those to be published alone.
    pub fn hand_over(&mut self, rows: Vec<ReadRow>, publishers: usize) -> Vec<Handed> {
        rows.into_iter()
            .map(|ReadRow { message, bytes, committed_at }| {
                self.bytes += bytes;
                self.in_flight.insert(
                    message.row_id,
                    InFlight {
                        attempts: message.attempts,
                        key: message.ordering_key(),
                        bytes,
                        publisher: message.publisher(publishers),
                        meter: Meter { exchange: message.exchange.clone(), committed_at, settled_at: 0 },
                    },
                );
                let alone = self.suspects.contains(&message.row_id);
                Handed { message, alone }
            })
            .collect()
    }

    pub fn is_handed_over(&self, row_id: i64) -> bool {
        self.in_flight.contains_key(&row_id)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Rows and bytes that may still be handed over under these limits (at least one row when
    /// nothing is in flight, however large).
    pub fn room(&self, max_rows: usize, max_bytes: usize) -> (usize, usize) {
        let bytes =
            if self.in_flight.is_empty() { max_bytes.max(1) } else { max_bytes.saturating_sub(self.bytes) };
        (max_rows.saturating_sub(self.in_flight.len()), bytes)
    }

    /// Takes one outcome that came back at `now` (a Postgres timestamp); for a failure,
    /// returns its error text and the row's exchange.
    pub fn take_report(
        &mut self,
        report: Report,
        now: i64,
        policy: &RetryPolicy,
        rng: &mut impl Rng,
        scrub: impl Fn(&str) -> String,
    ) -> Option<(String, Option<String>)> {
        let mut row = self.in_flight.remove(&report.row_id)?;
        self.bytes = self.bytes.saturating_sub(row.bytes);
        row.meter.settled_at = now;
        match report.outcome {
            Outcome::Confirmed => {
                self.suspects.remove(&report.row_id);
                self.outcomes.confirmed.push(report.row_id);
                self.outcomes.confirmed_meters.push(row.meter);
                None
            }
            Outcome::NotAttempted => None,
            Outcome::Suspected { .. } => {
                self.suspects.insert(report.row_id);
                None
            }
            Outcome::Failed { kind, reason } => {
                self.suspects.remove(&report.row_id);
                let failed_attempts = row.attempts.max(0) as u32 + 1;
                let retry_after = match policy.decide_for(kind, failed_attempts, rng) {
                    RetryDecision::DeadLetter => None,
                    RetryDecision::RetryAfter(d) => Some(d),
                };
                let error = format!("{}: {}", kind.as_str(), scrub(&reason));
                if let Some(k) = row.key {
                    self.outcomes.failed_keys.push(k);
                }
                let exchange = row.meter.exchange.clone();
                self.outcomes.failures.push(Failure {
                    row_id: report.row_id,
                    kind,
                    error: error.clone(),
                    retry_after,
                    meter: row.meter,
                });
                Some((error, exchange))
            }
        }
    }

    /// A row read from the outbox that cannot become a message: dead-lettered with `reason`.
    pub fn unreadable(&mut self, row_id: i64, reason: String, exchange: Option<String>) {
        self.outcomes.failures.push(Failure {
            row_id,
            kind: FailureKind::Invalid,
            error: format!("{}: {reason}", FailureKind::Invalid.as_str()),
            retry_after: None,
            meter: Meter { exchange, ..Meter::default() },
        });
    }

    /// The sessions of these publishers ended: what they did not report was not attempted
    /// and will be read again.
    pub fn sessions_ended(&mut self, publishers: &[usize]) {
        self.in_flight.retain(|_, row| !publishers.contains(&row.publisher));
        self.bytes = self.in_flight.values().map(|row| row.bytes).sum();
    }

    /// Every session ended (the connection was closed).
    pub fn all_sessions_ended(&mut self) {
        self.in_flight.clear();
        self.bytes = 0;
    }

    pub fn has_outcomes(&self) -> bool {
        !self.outcomes.is_empty()
    }

    /// The outcomes to record now; the ledger forgets them.
    pub fn take_outcomes(&mut self) -> Outcomes {
        std::mem::take(&mut self.outcomes)
    }

    /// Recording `outcomes` failed: they are recorded with the next ones.
    pub fn restore(&mut self, mut outcomes: Outcomes) {
        let newer = std::mem::take(&mut self.outcomes);
        outcomes.confirmed.extend(newer.confirmed);
        outcomes.confirmed_meters.extend(newer.confirmed_meters);
        outcomes.failures.extend(newer.failures);
        outcomes.failed_keys.extend(newer.failed_keys);
        self.outcomes = outcomes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn message(row_id: i64, aggregate: Option<&str>) -> OutboxMessage {
        OutboxMessage {
            row_id,
            message_id: format!("m{row_id}"),
            event_type: "E".into(),
            body: b"{}".to_vec(),
            aggregate_type: None,
            aggregate_id: aggregate.map(str::to_string),
            headers: None,
            routing_key: None,
            exchange: None,
            created_at_unix: 0,
            attempts: 0,
        }
    }

    fn row(message: OutboxMessage, bytes: usize) -> ReadRow {
        let committed_at = message.row_id * 1000;
        ReadRow { message, bytes, committed_at }
    }

    fn report(row_id: i64, outcome: Outcome) -> Report {
        Report { row_id, outcome }
    }

    fn take(l: &mut Ledger<u32>, r: Report) -> Option<String> {
        let policy =
            RetryPolicy { base: Duration::from_secs(1), max: Duration::from_secs(10), max_attempts: 3 };
        l.take_report(r, 99_000, &policy, &mut StdRng::seed_from_u64(1), |s| s.replace("secret", "***"))
            .map(|(error, _exchange)| error)
    }

    #[test]
    fn outcomes_are_taken_once_and_restored_only_when_recording_failed() {
        let mut l = Ledger::default();
        l.for_generation(1);
        l.hand_over(vec![row(message(1, None), 10), row(message(2, Some("a")), 20)], 1);
        assert_eq!(take(&mut l, report(1, Outcome::Confirmed)), None);
        let error =
            take(&mut l, report(2, Outcome::Failed { kind: FailureKind::Nacked, reason: "secret".into() }));
        assert_eq!(error.as_deref(), Some("nacked: ***"));
        let first = l.take_outcomes();
        assert_eq!(first.confirmed, vec![1]);
        assert_eq!(first.failures[0].retry_after.map(|d| d > Duration::ZERO), Some(true));
        assert_eq!(first.failed_keys, vec![(None, "a".to_string())]);
        assert!(l.take_outcomes().is_empty(), "taken once: a reload cannot record them again");
        l.restore(first.clone());
        assert_eq!(l.take_outcomes(), first);
        assert_eq!(take(&mut l, report(1, Outcome::Confirmed)), None, "a second report of a row is ignored");
        assert!(!l.has_outcomes());
    }

    #[test]
    fn outcomes_carry_the_exchange_and_times_of_their_rows() {
        let mut l = Ledger::default();
        l.for_generation(1);
        let mut m = message(3, None);
        m.exchange = Some("orders".into());
        l.hand_over(vec![row(m, 1), row(message(4, None), 1)], 1);
        take(&mut l, report(3, Outcome::Confirmed));
        take(&mut l, report(4, Outcome::Failed { kind: FailureKind::Nacked, reason: "x".into() }));
        let o = l.take_outcomes();
        let confirmed = Meter { exchange: Some("orders".into()), committed_at: 3000, settled_at: 99_000 };
        assert_eq!(o.confirmed_meters, vec![confirmed]);
        assert_eq!(o.failures[0].meter, Meter { exchange: None, committed_at: 4000, settled_at: 99_000 });
        l.restore(o.clone());
        assert_eq!(l.take_outcomes(), o, "restored with their meters");
    }

    #[test]
    fn the_last_attempt_dead_letters() {
        let mut l = Ledger::default();
        l.for_generation(1);
        let mut m = message(5, None);
        m.attempts = 2;
        l.hand_over(vec![row(m, 1)], 1);
        take(&mut l, report(5, Outcome::Failed { kind: FailureKind::Unroutable, reason: "no route".into() }));
        assert_eq!(l.take_outcomes().failures[0].retry_after, None);
        l.unreadable(6, "payload: not UTF-8".into(), None);
        let failures = l.take_outcomes().failures;
        assert_eq!((failures[0].kind, failures[0].retry_after), (FailureKind::Invalid, None));
    }

    #[test]
    fn a_new_generation_forgets_everything() {
        let mut l = Ledger::default();
        assert!(!l.for_generation(1), "the first is no change");
        l.hand_over(vec![row(message(1, None), 10)], 1);
        take(&mut l, report(1, Outcome::Confirmed));
        l.hand_over(vec![row(message(2, None), 10)], 1);
        assert!(!l.for_generation(1));
        assert!(l.for_generation(2), "dropped and created again");
        assert!(!l.has_outcomes(), "a confirm of the old table's row 1 must not delete the new one's");
        assert!(!l.is_handed_over(2));
        assert_eq!(take(&mut l, report(2, Outcome::Confirmed)), None);
        assert!(!l.has_outcomes());
    }

    #[test]
    fn suspects_go_alone_until_settled() {
        let mut l = Ledger::default();
        l.for_generation(1);
        l.hand_over(vec![row(message(1, None), 1), row(message(2, None), 1)], 1);
        take(&mut l, report(1, Outcome::Suspected { reason: "501".into() }));
        take(&mut l, report(2, Outcome::NotAttempted));
        let handed = l.hand_over(vec![row(message(1, None), 1), row(message(2, None), 1)], 1);
        assert_eq!(handed.iter().map(|h| h.alone).collect::<Vec<_>>(), vec![true, false]);
        take(&mut l, report(1, Outcome::Confirmed));
        let handed = l.hand_over(vec![row(message(1, None), 1)], 1);
        assert!(!handed[0].alone, "cleared by its confirm");
    }

    #[test]
    fn room_is_bounded_by_rows_and_bytes() {
        let mut l: Ledger<u32> = Ledger::default();
        assert_eq!(l.room(10, 100), (10, 100));
        l.hand_over(vec![row(message(1, None), 60)], 1);
        assert_eq!(l.room(10, 100), (9, 40));
        l.hand_over(vec![row(message(2, None), 60)], 1);
        assert_eq!(l.room(10, 100), (8, 0));
        l.all_sessions_ended();
        assert_eq!(l.room(10, 100), (10, 100));
        assert_eq!(l.in_flight(), 0);
    }

    #[test]
    fn a_session_that_ends_alone_gives_back_only_its_rows() {
        let mut l: Ledger<u32> = Ledger::default();
        l.for_generation(1);
        let rows: Vec<_> = (0..40).map(|i| row(message(i, Some(&format!("agg-{i}"))), 10)).collect();
        let handed = l.hand_over(rows, 4);
        let of_two: Vec<i64> =
            handed.iter().filter(|h| h.message.publisher(4) == 2).map(|h| h.message.row_id).collect();
        assert!(!of_two.is_empty());
        l.sessions_ended(&[2]);
        assert_eq!(l.in_flight(), 40 - of_two.len());
        assert!(of_two.iter().all(|id| !l.is_handed_over(*id)), "read again");
        assert!(handed
            .iter()
            .filter(|h| h.message.publisher(4) != 2)
            .all(|h| l.is_handed_over(h.message.row_id)));
        assert_eq!(l.room(100, 1000), (100 - l.in_flight(), 1000 - 10 * l.in_flight()));
    }
}
