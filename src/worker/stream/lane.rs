//! One stream's lane: its link (a connection with the named producer declared), what is in
//! flight on it, and its back-off. A lane's life:
//!
//! - `Connecting`: the link connects, declares `pg_outbox/<database>/<stream>` and asks the
//!   broker for the producer's last stored publishing id;
//! - `Recovering(stored)`: the broker said; the next transaction deletes the events at or
//!   below it (they are in the stream) and raises the stream's last id to it;
//! - `Sending`: events go out in publishing-id order, every id above the last one sent;
//! - `Down`: the link ended (connection lost, stream missing, a refusal, a timeout); nothing in
//!   flight is trusted, and the next connection after the back-off starts over with the
//!   broker's word.

use super::super::ledger::Meter;
use super::super::reconnect::Reconnect;
use pg_outbox_core::stream::StreamLink;
use rand::Rng;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A lane with nothing to do for this long closes its connection.
pub const IDLE_CLOSE: Duration = Duration::from_secs(60);

pub enum LaneState {
    Connecting,
    Recovering(u64),
    Sending,
    Down,
}

/// An event sent and not confirmed yet.
pub struct Sent {
    pub row_id: i64,
    pub meter: Meter,
}

pub struct Lane {
    /// The stream's name (without `stream:`).
    pub stream: String,
    /// `stream:<name>`, as the rows name it.
    pub exchange: String,
    pub link: Option<StreamLink>,
    /// The number of the current (or last) link: reports of earlier ones are stale.
    pub link_number: u64,
    pub state: LaneState,
    /// The highest publishing id sent on the current link (or the broker's last stored one).
    pub sent_upto: u64,
    pub in_flight: BTreeMap<u64, Sent>,
    pub reconnect: Reconnect,
    /// The last time the lane had something to do.
    pub busy_at: Instant,
    /// The last error, logged once until the lane works again.
    pub last_error: Option<String>,
}

impl Lane {
    pub fn new(exchange: &str, stream: &str, backoff_max: Duration, now: Instant) -> Lane {
        Lane {
            stream: stream.to_string(),
            exchange: exchange.to_string(),
            link: None,
            link_number: 0,
            state: LaneState::Down,
            sent_upto: 0,
            in_flight: BTreeMap::new(),
            reconnect: Reconnect::new(backoff_max, now),
            busy_at: now,
            last_error: None,
        }
    }

    /// The recovery's transaction committed (new ids are above the broker's last one): every
    /// event that has an id is sent again on this link, from the lowest, and the broker confirms
    /// those it has (once they are safe) without storing them twice.
    pub fn recovered(&mut self) {
        if let LaneState::Recovering(_) = self.state {
            self.sent_upto = 0;
            self.state = LaneState::Sending;
        }
    }

    /// The link ended: what was in flight is settled by the next connection's recovery.
    pub fn ended(&mut self, now: Instant, rng: &mut impl Rng) {
        if let Some(link) = self.link.take() {
            link.abort();
        }
        if matches!(self.state, LaneState::Connecting) {
            self.reconnect.failed(now, rng);
        } else {
            self.reconnect.lost(now, rng);
        }
        self.state = LaneState::Down;
        self.in_flight.clear();
    }

    /// Closes an idle connection (nothing in flight, nothing found for `IDLE_CLOSE`).
    pub fn close_if_idle(&mut self, now: Instant, runtime: &tokio::runtime::Runtime) {
        let idle = self.in_flight.is_empty() && now.duration_since(self.busy_at) >= IDLE_CLOSE;
        // Only a lane that sends: one that connects (or recovers) is busy by definition.
        if !idle || self.link.is_none() || !matches!(self.state, LaneState::Sending) {
            return;
        }
        if let Some(link) = self.link.take() {
            runtime.spawn(link.close(Duration::from_secs(1)));
        }
        self.state = LaneState::Down;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn lane(now: Instant) -> Lane {
        Lane::new("stream:orders", "orders", Duration::from_secs(30), now)
    }

    #[test]
    fn after_a_recovery_everything_with_an_id_is_sent_again_from_the_lowest() {
        let now = Instant::now();
        let mut l = lane(now);
        l.sent_upto = 500;
        l.state = LaneState::Recovering(420);
        l.recovered();
        assert!(matches!(l.state, LaneState::Sending));
        assert_eq!(l.sent_upto, 0, "ids at or below the broker's are sent again, not skipped");
        // Only a recovering lane recovers: a lane that sends keeps its place.
        l.sent_upto = 7;
        l.recovered();
        assert_eq!(l.sent_upto, 7);
    }

    #[test]
    fn a_link_that_ends_forgets_what_was_in_flight_and_waits_for_the_back_off() {
        let now = Instant::now();
        let mut rng = StdRng::seed_from_u64(1);
        let mut l = lane(now);
        l.state = LaneState::Connecting;
        l.in_flight.insert(3, Sent { row_id: 30, meter: Meter::default() });
        l.ended(now, &mut rng);
        assert!(matches!(l.state, LaneState::Down));
        assert!(l.in_flight.is_empty());
        assert!(!l.reconnect.may_connect(now), "a failed connection waits for its back-off");
        assert!(l.reconnect.may_connect(now + Duration::from_secs(31)));
    }
}
