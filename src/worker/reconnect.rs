//! When the next connection attempt may be made. Pure.
//!
//! However a connection ends (refused, cut, closed by the broker after a message it would not
//! take), the next attempt waits for the back-off: it starts short (250 ms, with jitter) and
//! doubles up to `outbox.reconnect_backoff_max`, and only a connection that proved itself (a
//! confirm came back, or it stayed up a while) starts it over. So nothing can make the worker
//! reconnect in a loop.

use pg_outbox_core::retry::Backoff;
use rand::Rng;
use std::time::{Duration, Instant};

pub const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// A connection up this long without trouble has proved itself.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);

/// When the next connection attempt may be made. Pure.
#[derive(Debug)]
pub struct Reconnect {
    backoff: Backoff,
    next_attempt: Instant,
    up_since: Option<Instant>,
    proven: bool,
}

impl Reconnect {
    pub fn new(max: Duration, now: Instant) -> Reconnect {
        Reconnect {
            backoff: Backoff::new(BACKOFF_BASE, max),
            next_attempt: now,
            up_since: None,
            proven: false,
        }
    }

    pub fn may_connect(&self, now: Instant) -> bool {
        now >= self.next_attempt
    }

    pub fn next_attempt(&self) -> Instant {
        self.next_attempt
    }

    /// An attempt to connect failed.
    pub fn failed(&mut self, now: Instant, rng: &mut impl Rng) {
        self.up_since = None;
        self.next_attempt = now + self.backoff.next_delay(rng);
    }

    pub fn connected(&mut self, now: Instant) {
        self.up_since = Some(now);
        self.proven = false;
    }

    /// The broker confirmed a message: the connection works.
    pub fn confirmed(&mut self) {
        self.proven = true;
    }

    /// The connection ended.
    pub fn lost(&mut self, now: Instant, rng: &mut impl Rng) {
        let healthy = self.proven || self.up_since.is_some_and(|t| now.duration_since(t) >= HEALTHY_AFTER);
        if healthy {
            self.backoff.reset();
        }
        self.failed(now, rng);
    }

    pub fn set_max(&mut self, max: Duration) {
        self.backoff.set_max(max);
    }

    /// Our own decision (new settings, a new table): connect again at once.
    pub fn restart(&mut self, max: Duration, now: Instant) {
        *self = Reconnect::new(max, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn a_connection_that_keeps_failing_backs_off_however_it_ends() {
        let mut rng = StdRng::seed_from_u64(7);
        let t0 = Instant::now();
        let mut r = Reconnect::new(Duration::from_secs(30), t0);
        assert!(r.may_connect(t0));
        // Connected, then closed by the broker at once, again and again (a message it refuses):
        // the waits grow, never shorter than the back-off's first step.
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..8 {
            r.connected(now);
            r.lost(now + Duration::from_millis(5), &mut rng);
            let wait = r.next_attempt().duration_since(now + Duration::from_millis(5));
            assert!(wait >= BACKOFF_BASE / 2, "{wait:?}");
            waits.push(wait);
            now = r.next_attempt();
        }
        assert!(waits[7] >= Duration::from_secs(15), "{waits:?}");
        // Connection attempts that fail grow the same back-off.
        r.failed(now, &mut rng);
        assert!(r.next_attempt().duration_since(now) >= Duration::from_secs(15));
    }

    #[test]
    fn a_proven_connection_starts_the_back_off_over() {
        let mut rng = StdRng::seed_from_u64(8);
        let t0 = Instant::now();
        let mut r = Reconnect::new(Duration::from_secs(30), t0);
        for _ in 0..6 {
            r.failed(t0, &mut rng);
        }
        r.connected(t0);
        r.confirmed();
        r.lost(t0, &mut rng);
        assert!(r.next_attempt().duration_since(t0) <= BACKOFF_BASE, "short again after a confirm");
        assert!(!r.may_connect(t0), "but never at once");
        r.connected(t0);
        r.lost(t0 + HEALTHY_AFTER, &mut rng);
        assert!(
            r.next_attempt().duration_since(t0 + HEALTHY_AFTER) <= BACKOFF_BASE,
            "or after a long healthy spell"
        );
        r.restart(Duration::from_secs(30), t0);
        assert!(r.may_connect(t0));
    }
}
