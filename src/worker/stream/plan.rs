//! What a round's transaction does for the streams, planned from the lanes' state before it
//! starts, and what it found.

use super::super::ledger::Outcomes;
use super::super::state::Worker;
use super::super::store;
use super::super::table::{self, Generation, Table};
use super::super::txn::DbError;
use super::lane::LaneState;
use super::sql::{self, Assigned};
use super::MAX_LANES;

/// A lane that takes events: after which id, how many more.
struct Room {
    stream: String,
    exchange: String,
    after: u64,
    room: usize,
}

pub struct Plan {
    /// The outbox the worker's state is about (`None`: not known yet).
    generation: Option<Generation>,
    known_database: Option<String>,
    /// Lanes that connected: their stream and the broker's last stored id.
    recover: Vec<(String, u64)>,
    rooms: Vec<Room>,
    floor: i64,
}

pub enum Found {
    /// The outbox is not the one the worker's state is about (or not there): nothing done.
    OtherTable,
    Done {
        database: String,
        /// Per exchange, the events to send, in id order.
        sends: Vec<(String, Vec<Assigned>)>,
        /// The exchanges of the streams that have events waiting.
        streams: Vec<String>,
        /// Streams whose producer row is gone: their lanes must recover again.
        lost_producers: Vec<String>,
    },
}

impl Plan {
    pub fn of(w: &Worker<'_>) -> Plan {
        let max_in_flight = w.settings.max_in_flight;
        let batch = w.settings.batch_size;
        let mut plan = Plan {
            generation: w.ledger.generation(),
            known_database: w.streams.database.clone(),
            recover: Vec::new(),
            rooms: Vec::new(),
            floor: w.floor.value(),
        };
        for l in w.streams.lanes.values() {
            let room = max_in_flight.saturating_sub(l.in_flight.len()).min(batch);
            let after = match l.state {
                LaneState::Recovering(stored) => {
                    plan.recover.push((l.stream.clone(), stored));
                    Some(0)
                }
                LaneState::Sending => Some(l.sent_upto),
                LaneState::Down | LaneState::Connecting => None,
            };
            if let (Some(after), true) = (after, room > 0) {
                plan.rooms.push(Room { stream: l.stream.clone(), exchange: l.exchange.clone(), after, room });
            }
        }
        plan
    }

    /// In the round's transaction, once the outbox is known to be the worker's: recoveries
    /// first, then the outcomes; then, per lane, the events that have an id above what it
    /// sent, and if that leaves room, new ids for the stream's next events (row order), read
    /// back in id order; last, which streams have events waiting.
    pub fn run(&self, outcomes: &Outcomes) -> Result<Found, DbError> {
        match table::table()? {
            Table::Ready(g) if Some(g) == self.generation => {}
            _ => return Ok(Found::OtherTable),
        }
        let database = match &self.known_database {
            Some(d) => d.clone(),
            None => sql::database()?,
        };
        for (stream, stored) in &self.recover {
            sql::recover(stream, *stored)?;
        }
        store::record_outcomes(outcomes)?;
        let mut sends = Vec::new();
        let mut lost_producers = Vec::new();
        for r in &self.rooms {
            let mut rows = sql::assigned(&r.exchange, r.after, r.room)?;
            let left = r.room - rows.len();
            if left > 0 {
                let ids = sql::unassigned(&r.exchange, self.floor, left)?;
                // Every event with an id above `after` was read: the new ones come after them.
                let after = rows.last().map_or(r.after, |a| a.seq);
                if !sql::assign(&r.stream, &ids)? {
                    lost_producers.push(r.stream.clone());
                } else if !ids.is_empty() {
                    rows.extend(sql::assigned(&r.exchange, after, ids.len())?);
                }
            }
            sends.push((r.exchange.clone(), rows));
        }
        let streams = sql::streams(MAX_LANES)?;
        Ok(Found::Done { database, sends, streams, lost_producers })
    }
}
