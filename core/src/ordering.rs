//! The order in which messages are published.
//!
//! Messages are released in the order they were pushed (the order of their rows), with two
//! limits:
//! - at most `window` messages are unconfirmed at any time;
//! - of each aggregate, only one message is unconfirmed at a time. The next one is released
//!   when the broker has confirmed the previous one, so a rejected or returned message can
//!   never be overtaken by a later event of its aggregate. When one fails, the rest of its
//!   aggregate is held back ("blocked") and stays in the outbox behind it.
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

/// Where a message stands in the dispatcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Behind an unconfirmed message of its aggregate.
    Waiting,
    Ready,
    InFlight,
    /// Held back because an earlier message of its aggregate failed: settled, not published.
    Blocked,
}

#[derive(Debug, Default)]
struct Group {
    in_flight: bool,
    waiting: VecDeque<u64>,
    /// A message of the group failed; everything after it is blocked until [`Dispatcher::release`].
    poisoned: bool,
}

/// The order in which a stream of messages is published. Messages are pushed in row order
/// and get increasing sequence numbers; see the module documentation for the rules.
#[derive(Debug)]
pub struct Dispatcher<K: Hash + Eq + Clone> {
    next_seq: u64,
    slots: HashMap<u64, (Option<K>, Slot)>,
    groups: HashMap<K, Group>,
    ready: BinaryHeap<Reverse<u64>>,
    in_flight: usize,
    window: usize,
}

impl<K: Hash + Eq + Clone> Dispatcher<K> {
    pub fn new(window: usize) -> Self {
        Dispatcher {
            next_seq: 0,
            slots: HashMap::new(),
            groups: HashMap::new(),
            ready: BinaryHeap::new(),
            in_flight: 0,
            window: window.max(1),
        }
    }

    /// Adds a message; returns its sequence number and where it stands. A message pushed
    /// into a poisoned aggregate is `Blocked` at once (and settled).
    pub fn push(&mut self, key: Option<K>) -> (u64, Slot) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let slot = match &key {
            None => Slot::Ready,
            Some(k) => {
                let group = self.groups.entry(k.clone()).or_default();
                if group.poisoned {
                    Slot::Blocked
                } else if group.in_flight || !group.waiting.is_empty() {
                    group.waiting.push_back(seq);
                    Slot::Waiting
                } else {
                    // Reserved for this message from now on: nothing of the group overtakes it.
                    group.in_flight = true;
                    Slot::Ready
                }
            }
        };
        match slot {
            Slot::Ready => {
                self.ready.push(Reverse(seq));
                self.slots.insert(seq, (key, slot));
            }
            Slot::Waiting => {
                self.slots.insert(seq, (key, slot));
            }
            _ => {}
        }
        (seq, slot)
    }

    /// The next message to publish, if the window allows one and one is ready.
    pub fn release(&mut self) -> Option<u64> {
        if self.in_flight >= self.window {
            return None;
        }
        let Reverse(seq) = self.ready.pop()?;
        if let Some(entry) = self.slots.get_mut(&seq) {
            entry.1 = Slot::InFlight;
        }
        self.in_flight += 1;
        Some(seq)
    }

    /// Messages not yet settled (waiting, ready or in flight).
    pub fn unsettled(&self) -> usize {
        self.slots.len()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The broker confirmed `seq`: the next message of its aggregate becomes ready.
    pub fn confirmed(&mut self, seq: u64) {
        let key = self.settle(seq);
        if let Some(k) = key {
            let group = self.groups.get_mut(&k).expect("a group for every keyed message");
            match group.waiting.pop_front() {
                Some(next) => {
                    if let Some(entry) = self.slots.get_mut(&next) {
                        entry.1 = Slot::Ready;
                    }
                    self.ready.push(Reverse(next));
                }
                None => {
                    group.in_flight = false;
                    if !group.poisoned {
                        self.groups.remove(&k);
                    }
                }
            }
        }
    }

    /// `seq` failed: the rest of its aggregate is blocked (returned, settled) and the
    /// aggregate stays poisoned until [`Dispatcher::release`].
    pub fn failed(&mut self, seq: u64) -> Vec<u64> {
        let key = self.settle(seq);
        let mut blocked = Vec::new();
        if let Some(k) = key {
            let group = self.groups.get_mut(&k).expect("a group for every keyed message");
            group.in_flight = false;
            group.poisoned = true;
            blocked.extend(group.waiting.drain(..));
            for b in &blocked {
                self.slots.remove(b);
            }
        }
        blocked
    }

    /// The failure of `key` is on record: later messages of the aggregate may be pushed again.
    pub fn release_aggregate(&mut self, key: &K) {
        if let Some(group) = self.groups.get_mut(key) {
            group.poisoned = false;
            if !group.in_flight && group.waiting.is_empty() {
                self.groups.remove(key);
            }
        }
    }

    /// Settles everything (the channel or connection is gone); returns what was unsettled.
    pub fn abandon_all(&mut self) -> Vec<u64> {
        let mut all: Vec<u64> = self.slots.drain().map(|(seq, _)| seq).collect();
        all.sort_unstable();
        self.groups.clear();
        self.ready.clear();
        self.in_flight = 0;
        all
    }

    fn settle(&mut self, seq: u64) -> Option<K> {
        let (key, slot) = self.slots.remove(&seq).expect("settling a message that is not unsettled");
        assert_eq!(slot, Slot::InFlight, "message {seq} settled while {slot:?}");
        self.in_flight -= 1;
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push_all(d: &mut Dispatcher<char>, spec: &str) -> Vec<u64> {
        spec.chars().map(|c| d.push(if c == '-' { None } else { Some(c) }).0).collect()
    }

    fn drain(d: &mut Dispatcher<char>) -> Vec<u64> {
        std::iter::from_fn(|| d.release()).collect()
    }

    #[test]
    fn one_in_flight_per_aggregate_in_push_order() {
        let mut d = Dispatcher::new(100);
        // rows:            0    1    2    3    4    5
        push_all(&mut d, "aab-a-");
        assert_eq!(drain(&mut d), vec![0, 2, 3, 5]);
        d.confirmed(0);
        assert_eq!(drain(&mut d), vec![1]);
        d.confirmed(1);
        assert_eq!(drain(&mut d), vec![4]);
        for i in [2, 3, 4, 5] {
            d.confirmed(i);
        }
        assert_eq!(d.unsettled(), 0);
    }

    #[test]
    fn later_pushes_wait_behind_messages_in_flight() {
        let mut d = Dispatcher::new(100);
        push_all(&mut d, "a");
        assert_eq!(drain(&mut d), vec![0]);
        push_all(&mut d, "ab");
        assert_eq!(drain(&mut d), vec![2], "the second a waits for the first");
        d.confirmed(0);
        assert_eq!(drain(&mut d), vec![1]);
    }

    #[test]
    fn window_bounds_unconfirmed_messages() {
        let mut d = Dispatcher::new(2);
        push_all(&mut d, "------");
        assert_eq!(drain(&mut d), vec![0, 1]);
        d.confirmed(1);
        assert_eq!(drain(&mut d), vec![2]);
        assert_eq!(d.in_flight(), 2);
    }

    #[test]
    fn a_failure_blocks_its_aggregate_until_released() {
        let mut d = Dispatcher::new(10);
        push_all(&mut d, "abaab");
        assert_eq!(drain(&mut d), vec![0, 1]);
        assert_eq!(d.failed(0), vec![2, 3]);
        d.confirmed(1);
        assert_eq!(drain(&mut d), vec![4]);
        // Pushed later, before the failure is on record: blocked at once.
        assert_eq!(d.push(Some('a')).1, Slot::Blocked);
        d.release_aggregate(&'a');
        assert_eq!(d.push(Some('a')).1, Slot::Ready);
        d.confirmed(4);
        assert_eq!(drain(&mut d), vec![6]);
        d.confirmed(6);
        assert_eq!(d.unsettled(), 0);
    }

    #[test]
    fn abandoning_returns_everything_unsettled() {
        let mut d = Dispatcher::new(1);
        push_all(&mut d, "aab");
        assert_eq!(drain(&mut d), vec![0]);
        assert_eq!(d.abandon_all(), vec![0, 1, 2]);
        assert_eq!((d.unsettled(), d.in_flight()), (0, 0));
        assert_eq!(d.push(Some('a')).1, Slot::Ready, "a fresh start");
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
    fn never_two_of_one_aggregate_in_flight_whatever_the_outcomes() {
        // Random outcomes and pushes interleaved: a property check over many seeds.
        let spec: Vec<Option<char>> = "aabab-acbba-cc".chars().map(|c| (c != '-').then_some(c)).collect();
        for seed in 0..300u64 {
            let mut d: Dispatcher<char> = Dispatcher::new(3);
            let mut key_of = HashMap::new();
            let mut in_flight: Vec<u64> = Vec::new();
            let mut confirmed_order = Vec::new();
            let mut failed_keys = std::collections::HashSet::new();
            let mut to_push = spec.iter();
            let mut x = seed.wrapping_add(1);
            loop {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                if (x >> 40) % 3 == 0 {
                    if let Some(k) = to_push.next() {
                        let (seq, _) = d.push(*k);
                        key_of.insert(seq, *k);
                    }
                }
                in_flight.extend(std::iter::from_fn(|| d.release()));
                for (i, a) in in_flight.iter().enumerate() {
                    for b in &in_flight[i + 1..] {
                        assert!(
                            key_of[a].is_none() || key_of[a] != key_of[b],
                            "{a} and {b} in flight together"
                        );
                    }
                }
                if in_flight.is_empty() {
                    if to_push.len() == 0 {
                        break;
                    }
                    continue;
                }
                let pick = in_flight.remove((x >> 33) as usize % in_flight.len());
                if (x >> 20) % 5 == 0 {
                    d.failed(pick);
                    if let Some(k) = key_of[&pick] {
                        failed_keys.insert(k);
                    }
                } else {
                    d.confirmed(pick);
                    confirmed_order.push(pick);
                }
            }
            // Confirmed messages of one aggregate were confirmed in push order, and nothing of
            // an aggregate was confirmed after one of its messages failed.
            for k in ['a', 'b', 'c'] {
                let seq: Vec<u64> =
                    confirmed_order.iter().copied().filter(|i| key_of[i] == Some(k)).collect();
                assert!(seq.windows(2).all(|w| w[0] < w[1]), "{k}: {seq:?}");
            }
        }
    }
}
