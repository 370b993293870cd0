//! One round of the worker, as named steps:
//!
//! 1. [`collect`]: take the outcomes that came back, notice a session that ended;
//! 2. [`connect`]: make sure a publishing session runs (or wait for the back-off);
//! 3. [`plan_read`]: decide how much to read, and arm the commit wake-up before the read;
//! 4. in one transaction ([`db_step`]): check the table is the one the worker's state is
//!    about, record the outcomes, move the floor, read the batch;
//! 5. [`settle_step`]: apply what the transaction found;
//! 6. [`make_durable`]: make the batch's transactions durable;
//! 7. [`hand_over`]: hand the batch to the session;
//! 8. [`stream::round`]: the same for events bound for streams, in a transaction of its own;
//! 9. [`decide_pause`]: how long until the next round.

use super::floor::{self, Found, Work};
use super::inbox;
use super::ledger::{Outcomes, ReadRow};
use super::link::Status as LinkStatus;
use super::state::Worker;
use super::status::DbState;
use super::store::{self, Batch, ReadLimits};
use super::stream;
use super::table::{self, Generation, Table};
use super::txn::{self, DbError};
use crate::durability;
use crate::wake;
use pg_outbox_core::outcome::Command;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

/// The exchange label of dead letters from rows that cannot be read.
const UNREADABLE: &str = "(unreadable)";
/// Wait after a round that failed (or panicked) before the next.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// An empty outbox whose files are larger than this is truncated.
const TRUNCATE_ABOVE_BYTES: i64 = 1024 * 1024;
const TRUNCATE_INTERVAL: Duration = Duration::from_secs(10);
/// A round that handled fewer rows than this is light.
const LIGHT_ROUND_ROWS: usize = 16;
/// Below this much room, a read only adds transactions while the session is busy.
const MIN_READ: usize = 64;

/// One round; a panic in it is logged and the round's state starts over.
pub fn run_caught(w: &mut Worker<'_>) -> Duration {
    match std::panic::catch_unwind(AssertUnwindSafe(|| run(w))) {
        Ok(pause) => pause,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            pgrx::warning!("pg_outbox: internal error in the worker, starting its round over: {what}");
            forget(w, Instant::now());
            RETRY_PAUSE
        }
    }
}

/// One round; returns how long to pause before the next (zero: go on at once).
fn run(w: &mut Worker<'_>) -> Duration {
    collect(w);
    let connected = connect(w);
    let read = plan_read(w, connected);
    let outcomes = w.ledger.take_outcomes();
    let floor_work = w.floor.work(Instant::now());
    let step = db_step(w, &outcomes, floor_work, read.as_ref());
    let (generation, batch, next_retry) = match settle_step(w, step, outcomes) {
        Ok(found) => found,
        Err(pause) => {
            // The stream path has its own transaction: a round of the AMQP path that failed
            // (a statement timeout, say) must not hold it up.
            stream::round(w);
            return pause;
        }
    };
    let fetched = batch.messages.len() + batch.unreadable.len();
    if !make_durable(w, &batch) {
        return Duration::ZERO;
    }
    w.last_round_light = fetched < LIGHT_ROUND_ROWS;
    hand_over(w, batch.messages);
    let streamed = stream::round(w);
    w.status.in_flight(w.ledger.in_flight() + w.streams.in_flight());
    let idle = fetched == 0 && w.ledger.in_flight() == 0 && w.streams.in_flight() == 0;
    if idle {
        housekeeping(w, generation);
    }
    // Also while busy (now and then, briefly): a worker that always publishes still cleans.
    inbox::expire_claims(w, idle);
    if streamed {
        return Duration::ZERO;
    }
    decide_pause(w, read.map(|r| r.rows), fetched, batch.full, next_retry, connected)
}

/// Step 1: Outcomes that came back; a session that ended (its connection may serve the next).
fn collect(w: &mut Worker<'_>) {
    let reports = w.link.reports();
    w.take_reports(reports);
    if let Some(ended) = w.link.ended_sessions(&mut w.rng) {
        w.take_reports(ended.reports);
        // Handed over but never read by the session: not attempted, read again.
        w.ledger.sessions_ended(&ended.publishers);
        if let Some(reason) = ended.lost {
            w.status.broker_down(&format!("lost the broker connection: {}", w.settings.scrub(&reason)));
        }
    }
}

/// Step 2: Whether a session runs now. Not while the last round found no outbox to publish.
fn connect(w: &mut Worker<'_>) -> bool {
    if w.status.outbox_missing() {
        return false;
    }
    match w.link.ensure_session(&w.settings, &mut w.rng) {
        LinkStatus::Running(None) => true,
        LinkStatus::Running(Some(connected)) => {
            let warning = connected.declare_warning.map(|e| w.settings.scrub(&e));
            w.status.broker_connected(&connected.node, connected.frame_max, warning.as_deref());
            true
        }
        LinkStatus::Down(reason) => {
            if let Some(reason) = reason {
                w.status.connect_failed(&w.settings.scrub(&reason));
            }
            false
        }
    }
}

/// How much to read this round.
pub struct Read {
    rows: usize,
    bytes: usize,
}

/// Step 3: How much to read, if anything. Before the read's snapshot, the wake-up is armed: a
/// commit from now on either is seen by this read or wakes the next wait. Without a read to
/// do, commits have nothing to wake the worker for.
fn plan_read(w: &mut Worker<'_>, connected: bool) -> Option<Read> {
    let s = &w.settings;
    // Each publisher may have `max_in_flight` unconfirmed; a batch more waits behind them.
    let (rows, bytes) = w.ledger.room(s.max_in_flight * s.publishers + s.batch_size, s.max_in_flight_bytes);
    let read = connected && rows >= s.batch_size.min(MIN_READ) && bytes > 0;
    // The stream path reads in the same round, after this: armed for it too.
    if read || s.stream.is_some() {
        wake::arm();
    } else {
        wake::disarm();
    }
    read.then(|| Read { rows: rows.min(w.read_limit).max(1), bytes })
}

/// What the round's transaction found.
enum Step {
    /// The outbox is not there to use.
    NotReady(Table),
    /// The outbox is another table than the one the worker's state is about.
    NewGeneration(Generation),
    Done {
        generation: Generation,
        floor: Option<Found>,
        batch: Batch,
        next_retry: Option<Duration>,
        /// Rows waiting for a retry, when counted.
        retrying: Option<i64>,
    },
}

/// Step 4: The round's transaction.
fn db_step(
    w: &Worker<'_>,
    outcomes: &Outcomes,
    floor_work: Option<Work>,
    read: Option<&Read>,
) -> Result<Step, DbError> {
    let ledger = &w.ledger;
    let expected = ledger.generation();
    let floor_value = w.floor.amqp();
    let wait_for_standbys = w.settings.wait_for_sync_standbys;
    txn::in_transaction(AssertUnwindSafe(|| {
        let generation = match table::table()? {
            Table::Ready(g) => g,
            other => return Ok(Step::NotReady(other)),
        };
        if expected.is_some_and(|e| e != generation) {
            return Ok(Step::NewGeneration(generation));
        }
        store::record_outcomes(outcomes)?;
        let floor = floor_work.map(floor::run_work).transpose()?;
        let mut batch = match read {
            Some(r) => store::read_batch(&ReadLimits {
                rows: r.rows,
                bytes: r.bytes,
                floor: floor_value,
                skip: ledger.in_flight(),
                handed_over: &|id| ledger.is_handed_over(id),
            })?,
            None => Batch::default(),
        };
        // After the read's snapshot: how far the WAL must be flushed for what it saw.
        batch.commit_lsn = if wait_for_standbys && !batch.messages.is_empty() {
            durability::insert_lsn()
        } else {
            durability::flush_target(&batch.xmins)
        };
        let (next_retry, retrying) = if batch.full {
            (None, None)
        } else {
            let (next, retrying) = store::next_retry_in()?;
            (next, Some(retrying))
        };
        Ok(Step::Done { generation, floor, batch, next_retry, retrying })
    }))
}

/// Step 5: Applies what the transaction found; `Err(pause)` when there is nothing to hand over.
fn settle_step(
    w: &mut Worker<'_>,
    step: Result<Step, DbError>,
    outcomes: Outcomes,
) -> Result<(Generation, Batch, Option<Duration>), Duration> {
    let now = Instant::now();
    let retry = RETRY_PAUSE.min(w.settings.poll_interval);
    match step {
        Err(e) => {
            // Recorded with the next round's.
            w.ledger.restore(outcomes);
            if e.is_timeout() {
                w.read_limit = (w.read_limit / 2).max(1);
            }
            w.status.db(DbState::Failing(e));
            Err(retry)
        }
        Ok(Step::NotReady(table)) => {
            match table {
                Table::Busy | Table::OtherVersion(_) => w.ledger.restore(outcomes),
                // The table is gone: so are the rows, and what came back about them.
                _ => forget(w, now),
            }
            let (state, pause) = match table {
                Table::Busy => (DbState::Busy, retry),
                Table::OtherVersion(v) => (DbState::OtherVersion(v), w.settings.poll_interval),
                _ => (DbState::NoExtension, w.settings.poll_interval),
            };
            w.status.db(state);
            Err(pause)
        }
        Ok(Step::NewGeneration(generation)) => {
            forget(w, now);
            w.ledger.for_generation(generation);
            Err(Duration::ZERO)
        }
        Ok(Step::Done { generation, floor, batch, next_retry, retrying }) => {
            w.ledger.for_generation(generation);
            if let Some(found) = floor {
                w.floor.found(found, now);
            }
            w.read_limit = (w.read_limit * 2).clamp(1, w.settings.batch_size);
            w.status.db(DbState::Ready);
            w.status.recorded(&outcomes, &w.settings.default_exchange);
            if let Some(retrying) = retrying {
                w.status.retrying(retrying);
            }
            if !outcomes.failed_keys.is_empty() {
                w.link.send(Command::Release(outcomes.failed_keys));
            }
            let mut batch = batch;
            for (row_id, _attempts, reason) in std::mem::take(&mut batch.unreadable) {
                // Its exchange may be what cannot be read: counted under a label of its own.
                w.ledger.unreadable(row_id, reason, Some(UNREADABLE.into()));
            }
            Ok((generation, batch, next_retry))
        }
    }
}

/// Everything the worker knew of the outbox's rows is about a table that is gone.
fn forget(w: &mut Worker<'_>, now: Instant) {
    w.ledger.clear();
    w.link.abandon_session(&mut w.rng);
    w.streams.abandon();
    w.floor.reset(now);
}

/// Step 6: No event reaches the broker before its transaction is durable. False: the worker must
/// stop (the batch is not handed over; it stays in the outbox).
fn make_durable(w: &mut Worker<'_>, batch: &Batch) -> bool {
    if batch.messages.is_empty() {
        return true;
    }
    if !w.settings.wait_for_sync_standbys {
        durability::flush(batch.commit_lsn);
        return true;
    }
    w.status.waiting_for_standbys(true);
    let durable = durability::wait_for_sync_standbys(batch.commit_lsn);
    w.status.waiting_for_standbys(false);
    durable
}

/// Step 7: Gives the batch to the session; first attempts count in the wait histogram.
fn hand_over(w: &mut Worker<'_>, rows: Vec<ReadRow>) {
    if rows.is_empty() || !w.link.is_running() {
        return;
    }
    w.status.waited(rows.iter().filter(|r| r.message.attempts == 0).map(|r| r.committed_at));
    let handed = w.ledger.hand_over(rows, w.link.publishers());
    w.link.send(Command::Publish(handed));
}

/// An empty outbox whose files grew is truncated now and then.
fn housekeeping(w: &mut Worker<'_>, generation: Generation) {
    if w.truncate_checked.elapsed() < TRUNCATE_INTERVAL {
        return;
    }
    w.truncate_checked = Instant::now();
    match txn::in_transaction(|| store::truncate_if_empty(generation, TRUNCATE_ABOVE_BYTES)) {
        Ok(true) => pgrx::debug1!("pg_outbox: truncated the empty outbox to give its space back"),
        Ok(false) => {}
        Err(e) => w.status.housekeeping_failed("truncate the empty outbox", &e),
    }
}

/// Step 9: How long to pause before the next round.
fn decide_pause(
    w: &Worker<'_>,
    limit: Option<usize>,
    fetched: usize,
    full: bool,
    next_retry: Option<Duration>,
    connected: bool,
) -> Duration {
    if fetched > 0 && (full || limit == Some(fetched)) {
        return Duration::ZERO;
    }
    if w.ledger.has_outcomes() {
        // Outcomes arrived meanwhile (or unreadable rows wait to be dead-lettered).
        return Duration::ZERO;
    }
    let mut pause = w.settings.poll_interval;
    if let Some(due) = next_retry {
        pause = pause.min(due.max(Duration::from_millis(10)));
    }
    if !connected {
        pause = pause.min(w.link.reconnect.next_attempt().saturating_duration_since(Instant::now()));
    }
    if let Some(next) = w.streams.next_attempt() {
        pause = pause.min(next.saturating_duration_since(Instant::now()).max(Duration::from_millis(10)));
    }
    pause
}
