//! The floor: a row id at or below which every row is gone from the outbox, so that reads
//! start above it and never walk the dead index entries of everything published before.
//!
//! It moves in two steps. First a *candidate* is taken: the last row id handed out by the
//! sequence, and the next transaction id to be assigned, read after it. Once every transaction
//! below that id has ended, no row at or below that row id can still appear (`outbox.publish`
//! takes its transaction id before its row id), and the floor rises to just below the lowest
//! row still there. Rows written around `outbox.publish` could hide below it, so the floor
//! starts over from zero now and then.
//!
//! There are two floors, moved together: one below every row (where the stream path looks for
//! events without a publishing id), and one below every row *not* for a stream (where the AMQP
//! path reads). Events waiting for a stream (a stream that is missing, or `outbox.stream_url`
//! unset) keep the first one down, but not the second: the AMQP path's reads never walk them.

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
/// The lowest row at or below the candidate above the floor (`$1`), and the lowest one not
/// for a stream above the AMQP path's floor (`$2`).
const LOWEST_ROWS_UP_TO: &str = "\
SELECT (SELECT min(m.id) FROM outbox.messages m WHERE m.id > $1 AND m.id <= $3),
       (SELECT min(m.id) FROM outbox.messages m
         WHERE m.id > $2 AND m.id <= $3 AND (m.exchange IS NULL OR m.exchange NOT LIKE 'stream:%'))";

/// (last row id handed out, next transaction id), see the module documentation.
pub type Candidate = (i64, i64);

/// What a round's transaction should do for the floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    TakeCandidate,
    Advance { floors: Floors, candidate: Candidate },
}

/// The two floors: below every row, and below every row not for a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Floors {
    pub all: i64,
    pub amqp: i64,
}

/// What that work found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    Candidate(Candidate),
    /// The new floors, or `None` while transactions of the candidate still run.
    Advanced(Option<Floors>),
}

#[derive(Debug)]
pub struct Floor {
    value: Floors,
    candidate: Option<Candidate>,
    checked_at: Instant,
    reset_at: Instant,
}

impl Floor {
    pub fn new(now: Instant) -> Floor {
        Floor { value: Floors::default(), candidate: None, checked_at: now, reset_at: now }
    }

    /// Reads of events without a publishing id start above this.
    pub fn value(&self) -> i64 {
        self.value.all
    }

    /// The AMQP path's reads start above this.
    pub fn amqp(&self) -> i64 {
        self.value.amqp
    }

    /// Starts over (the rows it was about are gone, or may hide below it).
    pub fn reset(&mut self, now: Instant) {
        self.value = Floors::default();
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
            Some(candidate) => Work::Advance { floors: self.value, candidate },
        })
    }

    /// The round's transaction committed with what its work found.
    pub fn found(&mut self, found: Found, now: Instant) {
        self.checked_at = now;
        match found {
            Found::Candidate(c) => self.candidate = Some(c),
            Found::Advanced(Some(floors)) => {
                self.value.all = floors.all.max(self.value.all);
                self.value.amqp = floors.amqp.max(self.value.amqp);
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
        Work::Advance { floors, candidate } => Spi::connect_mut(|c| {
            let xmin = run(c, SNAPSHOT_XMIN, &[], |t| Ok(t.first().get::<i64>(1)?))?.unwrap_or(0);
            if xmin < candidate.1 {
                return Ok(Found::Advanced(None));
            }
            let args = [floors.all.into(), floors.amqp.into(), candidate.0.into()];
            let (all, amqp) = run(c, LOWEST_ROWS_UP_TO, &args, |t| {
                let row = t.first();
                Ok((row.get::<i64>(1)?, row.get::<i64>(2)?))
            })?;
            Ok(Found::Advanced(Some(Floors {
                all: below(all, floors.all, candidate.0),
                amqp: below(amqp, floors.amqp, candidate.0),
            })))
        }),
    }
}

/// The new floor: just below the lowest row still there, else the candidate's last row id;
/// never below the old floor.
fn below(lowest: Option<i64>, floor: i64, last_id: i64) -> i64 {
    match lowest {
        Some(id) => (id - 1).max(floor),
        None => last_id.max(floor),
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
        assert_eq!(f.work(t2), Some(Work::Advance { floors: Floors::default(), candidate: (100, 7) }));
        f.found(Found::Advanced(None), t2);
        assert_eq!(f.value(), 0, "transactions of the candidate still run");
        let t3 = t2 + INTERVAL;
        assert_eq!(f.work(t3), Some(Work::Advance { floors: Floors::default(), candidate: (100, 7) }));
        // Events waiting for a stream from row 41 on: only the AMQP path's floor passes them.
        f.found(Found::Advanced(Some(Floors { all: 40, amqp: 90 })), t3);
        assert_eq!((f.value(), f.amqp()), (40, 90));
        assert_eq!(f.work(t3 + INTERVAL), Some(Work::TakeCandidate));
    }

    #[test]
    fn never_goes_down_but_starts_over_now_and_then() {
        let t0 = Instant::now();
        let mut f = Floor::new(t0);
        f.found(Found::Advanced(Some(Floors { all: 50, amqp: 60 })), t0);
        f.found(Found::Advanced(Some(Floors { all: 40, amqp: 40 })), t0);
        assert_eq!((f.value(), f.amqp()), (50, 60));
        assert_eq!(f.work(t0 + RESET_INTERVAL), Some(Work::TakeCandidate));
        assert_eq!((f.value(), f.amqp()), (0, 0), "started over");
        f.found(Found::Advanced(Some(Floors { all: 50, amqp: 50 })), t0);
        f.reset(t0);
        assert_eq!((f.value(), f.amqp()), (0, 0));
    }

    #[test]
    fn rises_to_just_below_the_lowest_row_or_to_the_candidate() {
        assert_eq!(below(Some(41), 10, 100), 40);
        assert_eq!(below(None, 10, 100), 100, "no row up to the candidate");
        assert_eq!(below(Some(5), 10, 100), 10, "a row written around publish, below the floor");
        assert_eq!(below(None, 200, 100), 200);
    }
}
