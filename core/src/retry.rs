//! Retry policy for failed messages and back-off for reconnecting to the broker.
//!
//! Both grow exponentially with "equal jitter": half of the delay is fixed, half random, so
//! retries spread out without ever retrying immediately.

use crate::outcome::FailureKind;
use rand::Rng;
use std::time::Duration;

/// What happens to a message after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    RetryAfter(Duration),
    DeadLetter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay before the second attempt; doubles with each further attempt.
    pub base: Duration,
    /// Longest delay between two attempts.
    pub max: Duration,
    /// Attempts in all, the first included; after the last failed one the message is
    /// dead-lettered.
    pub max_attempts: u32,
}

impl RetryPolicy {
    /// Decides after `failed_attempts` failures (counting the one that just happened).
    pub fn decide(&self, failed_attempts: u32, rng: &mut impl Rng) -> RetryDecision {
        if failed_attempts >= self.max_attempts {
            RetryDecision::DeadLetter
        } else {
            RetryDecision::RetryAfter(self.delay(failed_attempts, rng))
        }
    }

    /// Decides for a failure of this kind:
    /// - a row that cannot become a message is dead-lettered at once (retrying cannot help);
    /// - a missing confirm is retried with back-off but never dead-letters the event: a broker
    ///   that does not answer (a resource alarm, a hang) is an outage, not a bad message;
    /// - anything else the broker said about the message counts towards `max_attempts`.
    pub fn decide_for(&self, kind: FailureKind, failed_attempts: u32, rng: &mut impl Rng) -> RetryDecision {
        match kind {
            FailureKind::Invalid => RetryDecision::DeadLetter,
            FailureKind::Timeout => RetryDecision::RetryAfter(self.delay(failed_attempts, rng)),
            FailureKind::Nacked | FailureKind::Unroutable | FailureKind::Refused | FailureKind::TooLarge => {
                self.decide(failed_attempts, rng)
            }
        }
    }

    /// Delay after `failed_attempts` failures, with jitter.
    pub fn delay(&self, failed_attempts: u32, rng: &mut impl Rng) -> Duration {
        jittered(exponential(self.base, self.max, failed_attempts), rng)
    }
}

/// `base * 2^(n-1)`, capped at `max`.
fn exponential(base: Duration, max: Duration, n: u32) -> Duration {
    let factor = 1u32.checked_shl(n.saturating_sub(1).min(31)).unwrap_or(u32::MAX);
    base.checked_mul(factor).unwrap_or(max).min(max)
}

fn jittered(d: Duration, rng: &mut impl Rng) -> Duration {
    let half = d / 2;
    half + half.mul_f64(rng.gen::<f64>())
}

/// Reconnection back-off: call `next_delay` after each failure, `reset` after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff { base, max, failures: 0 }
    }

    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        self.failures = self.failures.saturating_add(1);
        jittered(exponential(self.base, self.max, self.failures), rng)
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn set_max(&mut self, max: Duration) {
        self.max = max;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn grows_exponentially_up_to_the_cap() {
        let want = [1, 2, 4, 8, 16, 32, 60, 60];
        for (i, w) in want.iter().enumerate() {
            assert_eq!(exponential(S, 60 * S, i as u32 + 1), Duration::from_secs(*w));
        }
        assert_eq!(exponential(S, 60 * S, 1000), 60 * S);
    }

    #[test]
    fn jitter_stays_between_half_and_full() {
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..1000 {
            let d = jittered(8 * S, &mut rng);
            assert!(d >= 4 * S && d <= 8 * S, "{d:?}");
        }
    }

    #[test]
    fn dead_letters_after_the_last_attempt() {
        let p = RetryPolicy { base: S, max: 10 * S, max_attempts: 3 };
        let mut rng = StdRng::seed_from_u64(2);
        assert!(matches!(p.decide(1, &mut rng), RetryDecision::RetryAfter(d) if d >= S / 2 && d <= S));
        assert!(matches!(p.decide(2, &mut rng), RetryDecision::RetryAfter(d) if d >= S && d <= 2 * S));
        assert_eq!(p.decide(3, &mut rng), RetryDecision::DeadLetter);
        let once = RetryPolicy { max_attempts: 1, ..p };
        assert_eq!(once.decide(1, &mut rng), RetryDecision::DeadLetter);
    }

    #[test]
    fn failure_kinds_decide_differently() {
        let p = RetryPolicy { base: S, max: 10 * S, max_attempts: 2 };
        let mut rng = StdRng::seed_from_u64(4);
        assert_eq!(p.decide_for(FailureKind::Invalid, 1, &mut rng), RetryDecision::DeadLetter);
        assert_eq!(p.decide_for(FailureKind::Unroutable, 2, &mut rng), RetryDecision::DeadLetter);
        assert!(matches!(p.decide_for(FailureKind::Nacked, 1, &mut rng), RetryDecision::RetryAfter(_)));
        // Timeouts back off like the rest but never dead-letter.
        assert!(
            matches!(p.decide_for(FailureKind::Timeout, 50, &mut rng), RetryDecision::RetryAfter(d) if d >= 5 * S)
        );
    }

    #[test]
    fn backoff_resets() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut b = Backoff::new(S, 30 * S);
        let first = b.next_delay(&mut rng);
        for _ in 0..10 {
            b.next_delay(&mut rng);
        }
        assert!(b.next_delay(&mut rng) >= 15 * S);
        b.reset();
        assert_eq!(b.failures(), 0);
        assert!(b.next_delay(&mut rng) <= S && first <= S);
    }
}
