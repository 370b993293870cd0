//! The inbox's retention: claims (`outbox.inbox`, written by `outbox.inbox_claim`) older than
//! `outbox.inbox_retention` are deleted by the worker, oldest first, a small batch per
//! transaction, so that no transaction holds many row locks or writes much WAL, and vacuum can
//! hand the space to new claims while the clean-up goes on.
//!
//! A clean-up runs at most every [`interval`] and stops after [`BUDGET`], so the rounds that
//! publish are never held up for long: while the worker has nothing to publish and the last
//! clean-up left expired claims behind, the next one runs at the next round; while it is busy
//! publishing, one budget per interval. Its SQL finds the table by name and takes its lock
//! without waiting: no inbox (an extension of an older version) or a table someone holds
//! (`DROP EXTENSION`) means nothing to do this time. Failures are logged once per kind.

use super::state::Worker;
use super::store::run;
use super::txn::{self, DbError};
use crate::signals;
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// Claims deleted per transaction at most.
const BATCH: i64 = 1000;
/// How long one clean-up may take, however many batches are left.
const BUDGET: Duration = Duration::from_millis(100);
/// Bounds of the time between two clean-ups (a tenth of the retention, within these).
const MIN_INTERVAL: Duration = Duration::from_secs(1);
const MAX_INTERVAL: Duration = Duration::from_secs(60);

// The oldest expired claims, at most $2, deleted by primary key. By index only: the worker's
// session plans no scans or sorts of whole tables. (No row locks beyond the delete's own, so
// a worker role needs only SELECT and DELETE on the table.)
const DELETE_EXPIRED: &str = "\
WITH expired AS (
    SELECT i.consumer, i.message_id
      FROM outbox.inbox i
     WHERE i.claimed_at < now() - make_interval(secs => $1)
     ORDER BY i.claimed_at
     LIMIT $2),
deleted AS (
    DELETE FROM outbox.inbox d USING expired e
     WHERE d.consumer = e.consumer AND d.message_id = e.message_id
    RETURNING 1)
SELECT count(*) FROM deleted";

/// For the clean-up's transaction only.
const SHORT_LOCK_TIMEOUT: &str = "SELECT pg_catalog.set_config('lock_timeout', '100ms', true)";

/// When the inbox was last cleaned, and whether that clean-up left expired claims behind.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cleanup {
    last: Option<Instant>,
    behind: bool,
}

/// How a clean-up ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// A batch came back short: nothing expired is left.
    Done,
    /// The budget ran out (or the worker must stop) with more to delete.
    OutOfBudget,
    /// No inbox, a table someone else holds, or an error: try again after the interval.
    Skipped,
}

/// After a batch that deleted `deleted` claims, `elapsed` into the clean-up: go on?
fn after_batch(deleted: i64, elapsed: Duration) -> Option<Ended> {
    if deleted < BATCH {
        Some(Ended::Done)
    } else if elapsed >= BUDGET {
        Some(Ended::OutOfBudget)
    } else {
        None
    }
}

/// Time between two clean-ups for a retention: a tenth of it, within one second and a minute.
fn interval(retention: Duration) -> Duration {
    (retention / 10).clamp(MIN_INTERVAL, MAX_INTERVAL)
}

impl Cleanup {
    /// Whether a clean-up is due now. `idle`: the round had nothing to publish.
    fn due(&self, now: Instant, retention: Duration, idle: bool) -> bool {
        match self.last {
            None => true,
            Some(_) if self.behind && idle => true,
            Some(last) => now.saturating_duration_since(last) >= interval(retention),
        }
    }

    /// A clean-up ended at `at`: the next interval counts from there.
    fn ended(&mut self, at: Instant, ended: Ended) {
        self.last = Some(at);
        self.behind = ended == Ended::OutOfBudget;
    }
}

/// Deletes expired claims if a clean-up is due. `idle`: the round had nothing to publish.
pub fn expire_claims(w: &mut Worker<'_>, idle: bool) {
    let Some(retention) = w.settings.inbox_retention else { return };
    let started = Instant::now();
    if !w.inbox.due(started, retention, idle) {
        return;
    }
    let mut total = 0;
    let ended = loop {
        match txn::in_transaction(move || delete_batch(retention)) {
            Ok(None) => break Ended::Skipped,
            Ok(Some(deleted)) => {
                total += deleted;
                if let Some(ended) = after_batch(deleted, started.elapsed()) {
                    break ended;
                }
                if signals::stop_requested() {
                    break Ended::OutOfBudget;
                }
            }
            Err(e) => {
                w.status.housekeeping_failed("remove expired claims from outbox.inbox", &e);
                break Ended::Skipped;
            }
        }
    };
    w.inbox.ended(Instant::now(), ended);
    if total > 0 {
        pgrx::debug1!("pg_outbox: removed {total} expired claims from outbox.inbox");
    }
}

/// One batch, in the caller's transaction: how many claims it deleted; `None` when there is
/// no inbox to clean now.
fn delete_batch(retention: Duration) -> Result<Option<i64>, DbError> {
    let Some(relid) = inbox_relid() else { return Ok(None) };
    // SAFETY: a conditional lock inside a transaction, released at its end.
    if !unsafe { pg_sys::ConditionalLockRelationOid(relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE) } {
        return Ok(None);
    }
    // Under the lock, the name still means this table (locking processed invalidations).
    if inbox_relid() != Some(relid) {
        return Ok(None);
    }
    let seconds = retention.as_secs_f64();
    let deleted = Spi::connect_mut(|c| {
        // A claim someone holds (an operator deleting it to reprocess a message, in an open
        // transaction) must not hold up the round for the session's lock_timeout: this batch
        // gives up soon, and the next clean-up comes an interval later.
        run(c, SHORT_LOCK_TIMEOUT, &[], |_| Ok(()))?;
        run(c, DELETE_EXPIRED, &[seconds.into(), BATCH.into()], |t| Ok(t.first().get::<i64>(1)?))
    })?;
    Ok(Some(deleted.unwrap_or(0)))
}

/// `outbox.inbox`, if it exists.
fn inbox_relid() -> Option<pg_sys::Oid> {
    // SAFETY: catalog cache lookups by name inside a transaction; `missing_ok` avoids errors.
    unsafe {
        let schema = pg_sys::get_namespace_oid(c"outbox".as_ptr(), true);
        if schema == pg_sys::InvalidOid {
            return None;
        }
        let relid = pg_sys::get_relname_relid(c"inbox".as_ptr(), schema);
        (relid != pg_sys::InvalidOid).then_some(relid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_is_a_tenth_of_the_retention_within_bounds() {
        assert_eq!(interval(Duration::from_secs(2)), MIN_INTERVAL);
        assert_eq!(interval(Duration::from_secs(300)), Duration::from_secs(30));
        assert_eq!(interval(Duration::from_secs(7 * 24 * 3600)), MAX_INTERVAL);
    }

    #[test]
    fn a_clean_up_goes_on_until_a_short_batch_or_the_budget() {
        assert_eq!(after_batch(0, Duration::ZERO), Some(Ended::Done));
        assert_eq!(after_batch(BATCH - 1, BUDGET * 2), Some(Ended::Done), "nothing left: done");
        assert_eq!(after_batch(BATCH, BUDGET / 2), None, "more, and time left");
        assert_eq!(after_batch(BATCH, BUDGET), Some(Ended::OutOfBudget));
    }

    #[test]
    fn the_first_clean_up_is_due_at_once_then_every_interval() {
        let retention = Duration::from_secs(600);
        let t0 = Instant::now();
        let mut c = Cleanup::default();
        assert!(c.due(t0, retention, false));
        c.ended(t0, Ended::Done);
        assert!(!c.due(t0 + Duration::from_secs(59), retention, true));
        assert!(c.due(t0 + Duration::from_secs(60), retention, false));
        c.ended(t0, Ended::Skipped);
        assert!(!c.due(t0 + Duration::from_secs(1), retention, true), "a failure waits the interval");
    }

    #[test]
    fn a_clean_up_that_fell_behind_goes_on_only_while_idle() {
        let retention = Duration::from_secs(600);
        let t0 = Instant::now();
        let mut c = Cleanup::default();
        c.ended(t0, Ended::OutOfBudget);
        assert!(c.due(t0, retention, true), "idle: at the next round");
        assert!(!c.due(t0 + Duration::from_secs(1), retention, false), "busy: after the interval");
        assert!(c.due(t0 + Duration::from_secs(60), retention, false));
        c.ended(t0, Ended::Done);
        assert!(!c.due(t0 + Duration::from_secs(1), retention, true));
    }
}
