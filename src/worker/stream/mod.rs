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
mod send;
mod sql;

use super::ledger::Outcomes;
use super::state::Worker;
use super::store;
use super::txn;
use lane::{Lane, LaneState};
use pg_outbox_core::stream::{self, Report};
use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// Streams served at once, at most (each has a connection).
pub(super) const MAX_LANES: usize = 32;
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

    /// Waits up to `timeout` for a report of a link (between rounds, while events are in flight).
    pub fn wait_for_reports(&mut self, timeout: Duration) {
        let reports = &mut self.reports;
        let got = self.runtime.block_on(async {
            let mut got = Vec::new();
            if let Ok(Some(first)) = tokio::time::timeout(timeout, reports.recv()).await {
                got.push(first);
                while let Ok(r) = reports.try_recv() {
                    got.push(r);
                }
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

/// The stream path's part of a round: take what the links said, record it, read and assign,
/// make it durable, send it. Returns whether it did anything (the round then goes on at once).
pub fn round(w: &mut Worker<'_>) -> bool {
    let Some(url) = w.settings.stream.clone() else {
        if !w.streams.lanes.is_empty() {
            w.streams.abandon();
        }
        return false;
    };
    let now = Instant::now();
    links::take_reports(w, now);
    let to_recover: Vec<(String, u64)> = w
        .streams
        .lanes
        .values()
        .filter_map(|l| match l.state {
            LaneState::Recovering(stored) => Some((l.stream.clone(), stored)),
            _ => None,
        })
        .collect();
    let outcomes = std::mem::take(&mut w.streams.outcomes);
    let rooms: Vec<(String, String, u64, usize)> = w
        .streams
        .lanes
        .values()
        .filter(|l| l.sending() || matches!(l.state, LaneState::Recovering(_)))
        .map(|l| {
            let after = match l.state {
                LaneState::Recovering(stored) => stored,
                _ => l.sent_upto,
            };
            (
                l.stream.clone(),
                l.exchange.clone(),
                after,
                w.settings.max_in_flight.saturating_sub(l.in_flight.len()),
            )
        })
        .collect();
    // Streams whose events wait for a connection are skipped: they must not fill the read.
    let not_ready: Vec<String> = w
        .streams
        .lanes
        .values()
        .filter(|l| match l.state {
            LaneState::Sending | LaneState::Recovering(_) => false,
            LaneState::Down => !l.reconnect.may_connect(now),
            LaneState::Connecting => true,
        })
        .map(|l| l.exchange.clone())
        .collect();
    let default_exchange = w.settings.default_exchange.clone();
    let floor = w.floor.value();
    let batch = w.settings.batch_size;
    let known_database = w.streams.database.clone();
    let result = txn::in_transaction(AssertUnwindSafe(|| {
        let database = match known_database {
            Some(d) => d,
            None => sql::database()?,
        };
        let mut recovered = Vec::new();
        for (stream, stored) in &to_recover {
            recovered.push((
                stream.clone(),
                sql::recover(stream, &format!("{}{stream}", stream::PREFIX), *stored)?,
            ));
        }
        store::record_outcomes(&outcomes)?;
        let mut sends = Vec::new();
        let mut found_new = Vec::new();
        let mut with_room = Vec::new();
        for (stream, exchange, after, room) in &rooms {
            if *room == 0 {
                continue;
            }
            let rows = sql::assigned(exchange, *after, (*room).min(batch))?;
            if rows.len() < (*room).min(batch) {
                with_room.push((stream.clone(), exchange.clone(), (*room).min(batch) - rows.len()));
            }
            sends.push((exchange.clone(), rows));
        }
        if !with_room.is_empty() || rooms.is_empty() {
            let candidates = sql::unassigned(&default_exchange, floor, &not_ready, batch)?;
            for (stream, exchange, room) in &with_room {
                let ids: Vec<i64> =
                    candidates.iter().filter(|(_, e)| e == exchange).map(|(id, _)| *id).take(*room).collect();
                if ids.is_empty() {
                    continue;
                }
                sql::assign(stream, exchange, &ids)?;
                let after = sends
                    .iter()
                    .filter(|(e, _)| e == exchange)
                    .flat_map(|(_, r)| r.last())
                    .map(|a| a.seq)
                    .max();
                let after =
                    after.unwrap_or_else(|| rooms.iter().find(|r| &r.1 == exchange).map_or(0, |r| r.2));
                let rows = sql::assigned(exchange, after, ids.len())?;
                sends.push((exchange.clone(), rows));
            }
            found_new = candidates.into_iter().map(|(_, e)| e).collect();
            found_new.sort();
            found_new.dedup();
        }
        Ok((database, recovered, sends, found_new))
    }));
    let (database, recovered, sends, found) = match result {
        Ok(found) => found,
        Err(e) => {
            // Recorded with the next round's; a lane waiting for its recovery keeps waiting.
            w.streams.outcomes = outcomes;
            w.status.db(super::status::DbState::Failing(e));
            return false;
        }
    };
    w.streams.database = Some(database);
    w.status.recorded(&outcomes, &w.settings.default_exchange);
    send::count_recovered(w, &recovered);
    for (stream, _) in &recovered {
        if let Some(lane) = w.streams.lanes.get_mut(stream) {
            if let LaneState::Recovering(stored) = lane.state {
                lane.sent_upto = stored;
                lane.state = LaneState::Sending;
            }
        }
    }
    let sends = send::settle_reads(w, sends);
    let mut did = !outcomes.is_empty() || !recovered.is_empty();
    if !sends.is_empty() && send::make_durable(w) {
        did = true;
        send::send(w, sends, now);
    }
    for exchange in &found {
        if let Some(lane) = stream::stream_of(exchange).and_then(|s| w.streams.lanes.get_mut(s)) {
            lane.busy_at = now;
        }
    }
    links::start_lanes(w, &url, found, now);
    links::close_idle(w, now);
    did
}
