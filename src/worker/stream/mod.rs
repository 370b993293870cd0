//! The stream path: events for `stream:<name>` go into the RabbitMQ stream `<name>` through
//! the stream protocol, exactly once. One [`lane`] per stream, each with its own connection
//! and the named producer `pg_outbox/<database>/<name>`.
//!
//! Exactly once rests on the broker's de-duplication: it drops (and confirms) a message whose
//! publishing id is at or below the last it stored for the producer. So:
//!
//! 1. an event gets its publishing id in the worker's own transaction, committed and flushed
//!    before the event is first sent ([`sql::assign`]), in row order, which within an
//!    aggregate is commit order; every later send of it uses the same id;
//! 2. a lane sends in increasing id order, and only ids above the broker's last stored one:
//!    after every (re)connect it asks the broker, deletes the events at or below that id
//!    (they are in the stream) and sends every other event with an id, in id order, before
//!    any new one ([`sql::recover`], [`sql::assigned`]);
//! 3. on one connection the broker stores a prefix of what it was sent (a refusal is about
//!    the publisher, and holds for everything after it), so the last stored id vouches for
//!    every id below it.
//!
//! RELIABILITY.md, "Exactly once into a stream", has the argument in full.

mod lane;
mod links;
mod plan;
mod send;
mod sql;

use plan::Found;

use super::ledger::Outcomes;
use super::state::Worker;
use super::txn;
use lane::Lane;
use pg_outbox_core::stream::Report;
use pgrx::pg_sys;
use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// Streams served at once, at most (each has a connection).
pub(super) const MAX_LANES: usize = 32;
/// How often a wait for the links' reports looks whether a commit set the latch.
const LATCH_LOOK: Duration = Duration::from_millis(1);

/// Whether this process' latch was set (a commit, a signal), without waiting; resets it if so
/// (the round that follows reads after this, and signals are looked at by the main loop).
fn take_latch() -> bool {
    // SAFETY: `MyLatch` is this process' own latch, valid for its life; reading its flag is what
    // `WaitLatch` itself does first, and resetting it is the waiter's part. `block_on` runs this
    // on the main thread.
    unsafe {
        let set = std::ptr::read_volatile(&raw const (*pg_sys::MyLatch).is_set) != 0;
        if set {
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        set
    }
}

pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Streams<'rt> {
    pub(super) runtime: &'rt Runtime,
    pub(super) lanes: BTreeMap<String, Lane>,
    pub(super) reports: UnboundedReceiver<Tagged>,
    pub(super) reports_tx: UnboundedSender<Tagged>,
    /// Reports taken while waiting between rounds, handled by the next round.
    pub(super) waiting: Vec<Tagged>,
    /// The last link's number: a report of an earlier link of a lane is stale.
    pub(super) links_started: u64,
    /// What the next transaction records: confirmed rows, rows that cannot be sent.
    pub(super) outcomes: Outcomes,
    /// The database's name, for the producers' names (read by the first transaction).
    pub(super) database: Option<String>,
}

/// A link's report, with its stream and the link's number.
pub(super) type Tagged = (String, u64, Report);

impl<'rt> Streams<'rt> {
    pub fn new(runtime: &'rt Runtime) -> Streams<'rt> {
        let (reports_tx, reports) = unbounded_channel();
        Streams {
            runtime,
            lanes: BTreeMap::new(),
            reports,
            reports_tx,
            waiting: Vec::new(),
            links_started: 0,
            outcomes: Outcomes::default(),
            database: None,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.lanes.values().map(|l| l.in_flight.len()).sum()
    }

    /// Whether a link's report is due: a confirm, or the outcome of a connection attempt.
    pub fn expecting_reports(&self) -> bool {
        self.lanes.values().any(|l| !l.in_flight.is_empty() || matches!(l.state, lane::LaneState::Connecting))
    }

    /// When the next lane that is down may connect again.
    pub fn next_attempt(&self) -> Option<Instant> {
        self.lanes
            .values()
            .filter(|l| matches!(l.state, lane::LaneState::Down))
            .map(|l| l.reconnect.next_attempt())
            .min()
    }

    /// Waits up to `timeout` for a report of a link (between rounds, while events are in
    /// flight), or until a commit sets the latch: a stream takes new events while others await
    /// their confirm, so a commit must not wait for one.
    pub fn wait_for_reports(&mut self, timeout: Duration) {
        let reports = &mut self.reports;
        let got = self.runtime.block_on(async {
            let mut got = Vec::new();
            let deadline = tokio::time::Instant::now() + timeout;
            while got.is_empty() && tokio::time::Instant::now() < deadline && !take_latch() {
                let slice = deadline.min(tokio::time::Instant::now() + LATCH_LOOK);
                if let Ok(Some(first)) = tokio::time::timeout_at(slice, reports.recv()).await {
                    got.push(first);
                }
            }
            while let Ok(r) = reports.try_recv() {
                got.push(r);
            }
            got
        });
        self.waiting.extend(got);
    }

    /// Drops every lane at once (new settings, a new table, shutdown): whatever was in flight is
    /// settled by the next connection's recovery.
    pub fn abandon(&mut self) {
        for (_, lane) in std::mem::take(&mut self.lanes) {
            if let Some(link) = lane.link {
                link.abort();
            }
        }
        self.waiting.clear();
        while self.reports.try_recv().is_ok() {}
        self.outcomes = Outcomes::default();
    }
}

/// The stream path's part of a round, as named steps. Returns whether it did anything (the
/// round then goes on at once).
pub fn round(w: &mut Worker<'_>) -> bool {
    let Some(url) = w.settings.stream.clone() else {
        if !w.streams.lanes.is_empty() {
            w.streams.abandon();
        }
        return false;
    };
    let now = Instant::now();
    // 1. What the links said: ready (with the broker's last stored id), confirmed, ended.
    links::take_reports(w, now);
    // 2. What the transaction is to do for each lane.
    let plan = plan::Plan::of(w);
    let outcomes = std::mem::take(&mut w.streams.outcomes);
    // 3. One transaction: recoveries, outcomes, the events to send (ids given to new ones),
    //    the streams with events waiting.
    let (database, sends, streams, lost_producers) =
        match txn::in_transaction(AssertUnwindSafe(|| plan.run(&outcomes))) {
            Ok(Found::Done { database, sends, streams, lost_producers }) => {
                w.status.stream_db_ok();
                (database, sends, streams, lost_producers)
            }
            Ok(Found::OtherTable) => {
                // The rows the lanes know of are gone with their table (or not known yet).
                w.streams.abandon();
                return false;
            }
            Err(e) => {
                // Recorded with the next round's; a lane waiting for its recovery keeps waiting.
                w.streams.outcomes = outcomes;
                w.status.stream_db_failed(e);
                return false;
            }
        };
    // 4. What it found: lanes recovered (or to recover again), rows that cannot be sent.
    w.streams.database = Some(database);
    w.status.recorded(&outcomes, &w.settings.default_exchange);
    for lane in w.streams.lanes.values_mut() {
        if lost_producers.contains(&lane.stream) {
            pgrx::warning!(
                "pg_outbox: the producer row of stream \"{}\" is gone; reconnecting to recover it",
                lane.stream
            );
            lane.ended(now, &mut w.rng);
        } else {
            lane.recovered();
        }
    }
    let sends = send::settle_reads(w, sends);
    // 5. Durable first, then on the lanes, in id order.
    let mut did = !outcomes.is_empty();
    if !sends.is_empty() && send::make_durable(w) {
        did = true;
        send::send(w, sends, now);
    }
    // 6. Lanes follow the streams that have events: started, reconnected, closed when idle.
    links::follow_streams(w, &url, streams, now);
    did
}
