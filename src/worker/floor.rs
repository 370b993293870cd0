//! The floor: a row id at or below which every row is gone from the outbox, so that reads
//! start above it and never walk the dead index entries of everything published before.
//!
//! It moves in two steps. First a *candidate* is taken: the last row id handed out by the
//! sequence, and the next transaction id to be assigned, read after it. Once every transaction
//! below that id has ended, no row at or below that row id can still appear (`outbox.publish`
//! takes its transaction id before its row id), and the floor rises to just below the lowest
//! row still there. Rows written around `outbox.publish` could hide below it, so the floor
//! starts over from zero now and then.

use super::store::run;
use super::txn::DbError;
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// How often the floor may move (a few tiny queries each time).
const INTERVAL: Duration = Duration::from_millis(20);
/// How often it starts over from zero.
const RESET_INTERVAL: Duration = Duration::from_secs(60);

/// The last row id handed out (a transaction may still hold it uncommitted).
const LAST_ID: &str =
    "SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM outbox.messages_id_seq";
/// Every transaction below a snapshot's xmin has ended.
const SNAPSHOT_XMIN: &str = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::int8";
const LOWEST_ROW_UP_TO: &str = "SELECT min(id) FROM outbox.messages WHERE id > $1 AND id <= $2";

/// (last row id handed out, next transaction id), see the module documentation.
pub type Candidate = (i64, i64);

/// What a round's transaction should do for the floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    TakeCandidate,
    Advance { floor: i64, candidate: Candidate },
}

/// What that work found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    Candidate(Candidate),
    /// The new floor, or `None` while transactions of the candidate still run.
    Advanced(Option<i64>),
}

#[derive(Debug)]
pub struct Floor {
    value: i64,
    candidate: Option<Candidate>,
    checked_at: Instant,
    reset_at: Instant,
}

impl Floor {
    pub fn new(now: Instant) -> Floor {
        Floor { value: 0, candidate: None, checked_at: now, reset_at: now }
    }

    /// Reads start above this.
    pub fn value(&self) -> i64 {
        self.value
    }

    /// Starts over (the rows it was about are gone, or may hide below it).
    pub fn reset(&mut self, now: Instant) {
        self.value = 0;
        self.candidate = None;
        self.reset_at = now;
    }

    /// The work for this round, if it is time for some.
    pub fn work(&mut self, now: Instant) -> Option<Work> {
        if now.duration_since(self.reset_at) >= RESET_INTERVAL {
            self.reset(now);
        }
        if now.duration_since(self.checked_at) < INTERVAL {
            return None;
        }
        Some(match self.candidate {
            None => Work::TakeCandidate,
            Some(candidate) => Work::Advance { floor: self.value, candidate },
        })
    }

    /// The round's transaction committed with what its work found.
    pub fn found(&mut self, found: Found, now: Instant) {
        self.checked_at = now;
        match found {
            Found::Candidate(c) => self.candidate = Some(c),
            Found::Advanced(Some(floor)) => {
                self.value = floor.max(self.value);
                self.candidate = None;
            }
            Found::Advanced(None) => {}
        }
    }
}

/// Does the work, inside the round's transaction.
pub fn run_work(work: Work) -> Result<Found, DbError> {
    match work {
        Work::TakeCandidate => Spi::connect_mut(|c| {
            let last_id = run(c, LAST_ID, &[], |t| Ok(t.first().get::<i64>(1)?))?.unwrap_or(0);
            // Read after the sequence, so above every writer that holds one of its ids.
            // SAFETY: reads a shared counter under its lock.
            let next_xid = unsafe { pg_sys::ReadNextFullTransactionId() }.value as i64;
            Ok(Found::Candidate((last_id, next_xid)))
        }),
        Work::Advance { floor, candidate } => Spi::connect_mut(|c| {
            let xmin = run(c, SNAPSHOT_XMIN, &[], |t| Ok(t.first().get::<i64>(1)?))?.unwrap_or(0);
            if xmin < candidate.1 {
                return Ok(Found::Advanced(None));
            }
            let lowest = run(c, LOWEST_ROW_UP_TO, &[floor.into(), candidate.0.into()], |t| {
                Ok(t.first().get::<i64>(1)?)
            })?;
            Ok(Found::Advanced(Some(match lowest {
                Some(id) => (id - 1).max(floor),
                None => candidate.0.max(floor),
            })))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_a_candidate_then_advances_once_its_transactions_ended() {
        let t0 = Instant::now();
        let mut f = Floor::new(t0);
        assert_eq!(f.work(t0), None, "not due yet");
        let t1 = t0 + INTERVAL;
        assert_eq!(f.work(t1), Some(Work::TakeCandidate));
        f.found(Found::Candidate((100, 7)), t1);
        assert_eq!(f.work(t1), None);
        let t2 = t1 + INTERVAL;
        assert_eq!(f.work(t2), Some(Work::Advance { floor: 0, candidate: (100, 7) }));
        f.found(Found::Advanced(None), t2);
        assert_eq!(f.value(), 0, "transactions of the candidate still run");
        let t3 = t2 + INTERVAL;
        assert_eq!(f.work(t3), Some(Work::Advance { floor: 0, candidate: (100, 7) }));
        f.found(Found::Advanced(Some(90)), t3);
        assert_eq!(f.value(), 90);
        assert_eq!(f.work(t3 + INTERVAL), Some(Work::TakeCandidate));
    }

    #[test]
    fn never_goes_down_but_starts_over_now_and_then() {
        let t0 = Instant::now();
        let mut f = Floor::new(t0);
        f.found(Found::Advanced(Some(50)), t0);
        f.found(Found::Advanced(Some(40)), t0);
        assert_eq!(f.value(), 50);
        assert_eq!(f.work(t0 + RESET_INTERVAL), Some(Work::TakeCandidate));
        assert_eq!(f.value(), 0, "started over");
        f.found(Found::Advanced(Some(50)), t0);
        f.reset(t0);
        assert_eq!(f.value(), 0);
    }
}
