//! The order in which a batch is published.
//!
//! Messages are released in batch order (the order of their rows), with two limits:
//! - at most `window` messages are unconfirmed at any time;
//! - of each aggregate, only one message is unconfirmed at a time. The next one is released
//!   when the broker has confirmed the previous one, so a rejected or returned message can
//!   never be overtaken by a later event of its aggregate. When one fails, the rest of its
//!   aggregate in this batch is held back ("blocked") and stays in the outbox behind it.
//!
//! Messages without an aggregate are limited by the window only.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::hash::Hash;

/// The key of the transaction-level lock that serializes writers of one aggregate, so that
/// its events get ids in commit order. The same in every backend (SipHash with fixed keys);
/// distinct aggregates share a key only by a 64-bit hash collision, which costs some waiting
/// and nothing else.
pub fn aggregate_lock_key(aggregate_type: Option<&str>, aggregate_id: &str) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match aggregate_type {
        Some(t) => {
            h.write_u8(1);
            h.write(t.as_bytes());
        }
        None => h.write_u8(0),
    }
    h.write_u8(0xff);
    h.write(aggregate_id.as_bytes());
    h.finish()
}

/// Distinct aggregates a transaction locks one by one; beyond this it locks buckets.
pub const FINE_LOCKS_PER_TRANSACTION: usize = 32;
/// Buckets of aggregates for transactions that write many aggregates.
pub const LOCK_BUCKETS: u64 = 256;

/// A lock `outbox.publish` takes, held until the transaction ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AggregateLock {
    /// The aggregate's own lock, exclusive.
    Aggregate(u64),
    /// A bucket of aggregates: shared beside an aggregate lock, exclusive in place of them.
    Bucket { bucket: u32, exclusive: bool },
}

/// Which locks serialize the writers of an aggregate, per transaction.
///
/// The first [`FINE_LOCKS_PER_TRANSACTION`] distinct aggregates of a transaction each get their
/// own exclusive lock, plus their bucket's lock in share mode. A transaction that writes more
/// aggregates than that (a bulk import) takes the buckets of the further ones exclusively
/// instead, so one transaction never holds more than 2 × 32 + 256 locks, however many
/// aggregates it writes (Postgres' lock table is small). Writers of one aggregate always meet
/// on a conflicting lock: two fine writers on the aggregate lock, a fine and a bulk writer on
/// the bucket (share against exclusive), two bulk writers on the bucket.
#[derive(Debug, Default)]
pub struct TransactionLocks {
    fine: std::collections::HashSet<u64>,
    bulk: bool,
}

impl TransactionLocks {
    /// The locks to acquire for an event of aggregate `key`, in this order. Acquiring a lock
    /// the transaction already holds is cheap, so they are always all returned.
    pub fn plan(&mut self, key: u64) -> Vec<AggregateLock> {
        let bucket = (key % LOCK_BUCKETS) as u32;
        if self.fine.contains(&key) || (!self.bulk && self.fine.len() < FINE_LOCKS_PER_TRANSACTION) {
            self.fine.insert(key);
            vec![AggregateLock::Bucket { bucket, exclusive: false }, AggregateLock::Aggregate(key)]
        } else {
            self.bulk = true;
            vec![AggregateLock::Bucket { bucket, exclusive: true }]
        }
    }

    /// At the end of the transaction.
    pub fn reset(&mut self) {
        self.fine.clear();
        self.bulk = false;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Behind an unconfirmed message of its aggregate.
    Waiting,
    Ready,
    InFlight,
    Confirmed,
    Failed,
    /// Held back because an earlier message of its aggregate failed in this batch.
    Blocked,
}

#[derive(Debug)]
pub struct Dispatcher {
    group: Vec<Option<usize>>,
    slots: Vec<Slot>,
    ready: BinaryHeap<Reverse<usize>>,
    followers: Vec<VecDeque<usize>>,
    in_flight: usize,
    window: usize,
}

impl Dispatcher {
    /// `keys[i]` is the ordering key of the i-th message of the batch, in batch order.
    pub fn new<K: Hash + Eq>(keys: impl IntoIterator<Item = Option<K>>, window: usize) -> Self {
        let mut group_of_key: HashMap<K, usize> = HashMap::new();
        let mut followers: Vec<VecDeque<usize>> = Vec::new();
        let mut group = Vec::new();
        let mut slots = Vec::new();
        let mut ready = BinaryHeap::new();
        for (i, key) in keys.into_iter().enumerate() {
            let mut is_head = true;
            let g = key.map(|k| match group_of_key.get(&k) {
                Some(&g) => {
                    followers[g].push_back(i);
                    is_head = false;
                    g
                }
                None => {
                    followers.push(VecDeque::new());
                    group_of_key.insert(k, followers.len() - 1);
                    followers.len() - 1
                }
            });
            group.push(g);
            if is_head {
                slots.push(Slot::Ready);
                ready.push(Reverse(i));
            } else {
                slots.push(Slot::Waiting);
            }
        }
        Dispatcher { group, slots, ready, followers, in_flight: 0, window: window.max(1) }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn slot(&self, i: usize) -> Slot {
        self.slots[i]
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The next message to publish, if the window allows one and one is ready.
    pub fn release(&mut self) -> Option<usize> {
        if self.in_flight >= self.window {
            return None;
        }
        let Reverse(i) = self.ready.pop()?;
        self.slots[i] = Slot::InFlight;
        self.in_flight += 1;
        Some(i)
    }

    /// Nothing in flight and nothing left to release.
    pub fn is_done(&self) -> bool {
        self.in_flight == 0 && self.ready.is_empty()
    }

    pub fn confirmed(&mut self, i: usize) {
        self.settle(i, Slot::Confirmed);
        if let Some(g) = self.group[i] {
            if let Some(next) = self.followers[g].pop_front() {
                self.slots[next] = Slot::Ready;
                self.ready.push(Reverse(next));
            }
        }
    }

    pub fn failed(&mut self, i: usize) {
        self.settle(i, Slot::Failed);
        if let Some(g) = self.group[i] {
            for next in self.followers[g].drain(..) {
                self.slots[next] = Slot::Blocked;
            }
        }
    }

    fn settle(&mut self, i: usize, to: Slot) {
        assert_eq!(self.slots[i], Slot::InFlight, "message {i} settled twice");
        self.slots[i] = to;
        self.in_flight -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(spec: &str) -> Vec<Option<char>> {
        spec.chars().map(|c| if c == '-' { None } else { Some(c) }).collect()
    }

    fn drain(d: &mut Dispatcher) -> Vec<usize> {
        std::iter::from_fn(|| d.release()).collect()
    }

    #[test]
    fn one_in_flight_per_aggregate_in_batch_order() {
        // rows:         0    1    2    3    4    5
        let mut d = Dispatcher::new(keys("aab-a-"), 100);
        assert_eq!(drain(&mut d), vec![0, 2, 3, 5]);
        d.confirmed(0);
        assert_eq!(drain(&mut d), vec![1]);
        d.confirmed(1);
        assert_eq!(drain(&mut d), vec![4]);
        for i in [2, 3, 4, 5] {
            d.confirmed(i);
        }
        assert!(d.is_done());
    }

    #[test]
    fn lock_keys_are_stable_and_unambiguous() {
        let k = aggregate_lock_key(Some("account"), "123");
        assert_eq!(k, aggregate_lock_key(Some("account"), "123"));
        assert_ne!(k, aggregate_lock_key(Some("account1"), "23"));
        assert_ne!(k, aggregate_lock_key(None, "123"));
        assert_ne!(aggregate_lock_key(Some(""), "x"), aggregate_lock_key(None, "x"));
    }

    #[test]
    fn many_aggregates_in_one_transaction_lock_buckets() {
        let mut t = TransactionLocks::default();
        for k in 0..FINE_LOCKS_PER_TRANSACTION as u64 {
            assert!(
                matches!(t.plan(k)[..], [AggregateLock::Bucket { exclusive: false, .. }, AggregateLock::Aggregate(x)] if x == k)
            );
        }
        assert_eq!(
            t.plan(1000),
            vec![AggregateLock::Bucket { bucket: (1000 % LOCK_BUCKETS) as u32, exclusive: true }]
        );
        // An aggregate locked one by one before keeps its own lock.
        assert!(matches!(t.plan(3)[..], [_, AggregateLock::Aggregate(3)]));
        let buckets: std::collections::HashSet<_> = (0..100_000u64).flat_map(|k| t.plan(k + 5000)).collect();
        assert!(buckets.len() <= LOCK_BUCKETS as usize);
        t.reset();
        assert!(matches!(t.plan(1000)[..], [_, AggregateLock::Aggregate(1000)]));
    }

    #[test]
    fn window_bounds_unconfirmed_messages() {
        let mut d = Dispatcher::new(keys("------"), 2);
        assert_eq!(drain(&mut d), vec![0, 1]);
        d.confirmed(1);
        assert_eq!(drain(&mut d), vec![2]);
        assert_eq!(d.in_flight(), 2);
    }

    #[test]
    fn a_failure_blocks_the_rest_of_its_aggregate_only() {
        let mut d = Dispatcher::new(keys("abaab"), 10);
        assert_eq!(drain(&mut d), vec![0, 1]);
        d.failed(0);
        d.confirmed(1);
        assert_eq!(drain(&mut d), vec![4]);
        assert_eq!([d.slot(2), d.slot(3)], [Slot::Blocked, Slot::Blocked]);
        d.confirmed(4);
        assert!(d.is_done());
    }

    #[test]
    fn never_two_of_one_aggregate_in_flight_whatever_the_outcomes() {
        // Exhaustive over outcome orders for a small batch: a property check.
        let spec = keys("aabab-a");
        for seed in 0..200u64 {
            let mut d = Dispatcher::new(spec.clone(), 3);
            let mut in_flight: Vec<usize> = Vec::new();
            let mut order = Vec::new();
            let mut x = seed;
            loop {
                in_flight.extend(drain(&mut d));
                for (i, a) in in_flight.iter().enumerate() {
                    for b in &in_flight[i + 1..] {
                        assert!(spec[*a].is_none() || spec[*a] != spec[*b], "{a} and {b} in flight together");
                    }
                }
                if in_flight.is_empty() {
                    break;
                }
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let pick = in_flight.remove((x >> 33) as usize % in_flight.len());
                if (x >> 20) % 5 == 0 {
                    d.failed(pick);
                } else {
                    d.confirmed(pick);
                    order.push(pick);
                }
            }
            assert!(d.is_done());
            // Confirmed messages of one aggregate were confirmed in batch order.
            for k in ['a', 'b'] {
                let seq: Vec<usize> = order.iter().copied().filter(|i| spec[*i] == Some(k)).collect();
                assert!(seq.windows(2).all(|w| w[0] < w[1]), "{k}: {seq:?}");
            }
        }
    }
}
