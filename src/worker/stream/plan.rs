//! What a round's transaction does for the streams, planned from the lanes' state before it
//! starts, and what it found.

use super::super::ledger::Outcomes;
use super::super::state::Worker;
use super::super::store;
use super::super::txn::DbError;
use super::lane::LaneState;
use super::sql::{self, Assigned};
use pg_outbox_core::stream;
use std::time::Instant;

/// A lane that takes events: after which id, how many more.
struct Room {
    stream: String,
    exchange: String,
    after: u64,
    room: usize,
}

pub struct Plan {
    known_database: Option<String>,
    /// Lanes that connected: their stream and the broker's last stored id.
    recover: Vec<(String, u64)>,
    rooms: Vec<Room>,
    /// Streams that cannot take events now (waiting for a connection, or full): skipped, so
    /// that they do not fill the read, which also finds the streams that have no lane yet.
    skip: Vec<String>,
    default_exchange: String,
    floor: i64,
    batch: usize,
}

pub struct Found {
    pub database: String,
    /// Per recovered stream, the creation times of the events found in it.
    pub recovered: Vec<(String, Vec<i64>)>,
    /// Per exchange, the events to send, in id order.
    pub sends: Vec<(String, Vec<Assigned>)>,
    /// The exchanges of the streams that have events without an id.
    pub streams: Vec<String>,
}

impl Plan {
    pub fn of(w: &Worker<'_>, now: Instant) -> Plan {
        let max_in_flight = w.settings.max_in_flight;
        let batch = w.settings.batch_size;
        let mut plan = Plan {
            known_database: w.streams.database.clone(),
            recover: Vec::new(),
            rooms: Vec::new(),
            skip: Vec::new(),
            default_exchange: w.settings.default_exchange.clone(),
            floor: w.floor.value(),
            batch,
        };
        for l in w.streams.lanes.values() {
            let room = max_in_flight.saturating_sub(l.in_flight.len()).min(batch);
            let after = match l.state {
                LaneState::Recovering(stored) => {
                    plan.recover.push((l.stream.clone(), stored));
                    Some(stored)
                }
                LaneState::Sending => Some(l.sent_upto),
                LaneState::Down | LaneState::Connecting => None,
            };
            if let (Some(after), true) = (after, room > 0) {
                plan.rooms.push(Room { stream: l.stream.clone(), exchange: l.exchange.clone(), after, room });
            }
            let skip = match l.state {
                LaneState::Sending | LaneState::Recovering(_) => room == 0,
                LaneState::Down => !l.reconnect.may_connect(now),
                LaneState::Connecting => true,
            };
            if skip {
                plan.skip.push(l.exchange.clone());
            }
        }
        plan
    }

    /// In the round's transaction: recoveries first (what is in the stream is deleted), then
    /// the outcomes; then, per lane, the events that have an id above what it sent, and if that
    /// leaves room, new ids for the next events (row order), read back in id order.
    pub fn run(&self, outcomes: &Outcomes) -> Result<Found, DbError> {
        let database = match &self.known_database {
            Some(d) => d.clone(),
            None => sql::database()?,
        };
        let mut recovered = Vec::new();
        for (name, stored) in &self.recover {
            let exchange = format!("{}{name}", stream::PREFIX);
            recovered.push((name.clone(), sql::recover(name, &exchange, *stored)?));
        }
        store::record_outcomes(outcomes)?;
        let mut sends = Vec::new();
        let candidates = sql::unassigned(&self.default_exchange, self.floor, &self.skip, self.batch)?;
        for r in &self.rooms {
            let mut rows = sql::assigned(&r.exchange, r.after, r.room)?;
            let left = r.room - rows.len();
            let ids: Vec<i64> =
                candidates.iter().filter(|(_, e)| *e == r.exchange).map(|(id, _)| *id).take(left).collect();
            if left > 0 && !ids.is_empty() {
                // Every event with an id above `after` was read: the new ones come after them.
                let after = rows.last().map_or(r.after, |a| a.seq);
                sql::assign(&r.stream, &r.exchange, &ids)?;
                rows.extend(sql::assigned(&r.exchange, after, ids.len())?);
            }
            sends.push((r.exchange.clone(), rows));
        }
        let mut streams: Vec<String> = candidates.into_iter().map(|(_, e)| e).collect();
        streams.sort();
        streams.dedup();
        Ok(Found { database, recovered, sends, streams })
    }
}
