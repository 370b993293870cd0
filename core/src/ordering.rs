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
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::hash::Hash;

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
    /// A message of the group failed; everything after it is blocked until
    /// [`Dispatcher::release_aggregate`].
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
    /// Messages to publish alone: released only when nothing else is unconfirmed, and nothing
    /// else is released while one of them is.
    alone: HashSet<u64>,
    alone_in_flight: bool,
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
            alone: HashSet::new(),
            alone_in_flight: false,
        }
    }

    /// Adds a message; returns its sequence number and where it stands. A message pushed
    /// into a poisoned aggregate is `Blocked` at once (and settled). With `alone`, the message
    /// is published with nothing else unconfirmed.
    pub fn push(&mut self, key: Option<K>, alone: bool) -> (u64, Slot) {
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
        if alone && slot != Slot::Blocked {
            self.alone.insert(seq);
        }
        (seq, slot)
    }

    /// The next message to publish, if the window allows one and one is ready.
    pub fn release(&mut self) -> Option<u64> {
        if self.in_flight >= self.window || self.alone_in_flight {
            return None;
        }
        let &Reverse(seq) = self.ready.peek()?;
        let alone = self.alone.contains(&seq);
        if alone && self.in_flight > 0 {
            // Row order holds: what comes after it waits too.
            return None;
        }
        self.ready.pop();
        if let Some(entry) = self.slots.get_mut(&seq) {
            entry.1 = Slot::InFlight;
        }
        self.alone_in_flight = alone;
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

    /// The broker confirmed `seq`: the next message of its aggregate becomes ready. Returns
    /// false (and changes nothing) when `seq` was not in flight.
    pub fn confirmed(&mut self, seq: u64) -> bool {
        let Some(key) = self.settle(seq) else { return false };
        if let Some(k) = key {
            if let Some(group) = self.groups.get_mut(&k) {
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
        true
    }

    /// `seq` failed: the rest of its aggregate is blocked (returned, settled) and the
    /// aggregate stays poisoned until [`Dispatcher::release_aggregate`]. Returns `None` when
    /// `seq` was not in flight.
    pub fn failed(&mut self, seq: u64) -> Option<Vec<u64>> {
        let key = self.settle(seq)?;
        let mut blocked = Vec::new();
        if let Some(group) = key.and_then(|k| self.groups.get_mut(&k)) {
            group.in_flight = false;
            group.poisoned = true;
            blocked.extend(group.waiting.drain(..));
        }
        for b in &blocked {
            self.slots.remove(b);
            self.alone.remove(b);
        }
        Some(blocked)
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
        self.alone.clear();
        self.alone_in_flight = false;
        self.in_flight = 0;
        all
    }

    /// Takes an in-flight message out; its key. `None` if it was not in flight.
    fn settle(&mut self, seq: u64) -> Option<Option<K>> {
        match self.slots.get(&seq) {
            Some((_, Slot::InFlight)) => {}
            _ => return None,
        }
        let (key, _) = self.slots.remove(&seq)?;
        if self.alone.remove(&seq) {
            self.alone_in_flight = false;
        }
        self.in_flight -= 1;
        Some(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push_all(d: &mut Dispatcher<char>, spec: &str) -> Vec<u64> {
        spec.chars().map(|c| d.push(if c == '-' { None } else { Some(c) }, false).0).collect()
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
        assert_eq!(d.failed(0), Some(vec![2, 3]));
        d.confirmed(1);
        assert_eq!(drain(&mut d), vec![4]);
        // Pushed later, before the failure is on record: blocked at once.
        assert_eq!(d.push(Some('a'), false).1, Slot::Blocked);
        d.release_aggregate(&'a');
        assert_eq!(d.push(Some('a'), false).1, Slot::Ready);
        d.confirmed(4);
        assert_eq!(drain(&mut d), vec![6]);
        d.confirmed(6);
        assert_eq!(d.unsettled(), 0);
    }

    #[test]
    fn a_message_marked_alone_goes_with_nothing_else_unconfirmed() {
        let mut d = Dispatcher::new(10);
        d.push(None, false);
        d.push(Some('a'), true);
        d.push(None, false);
        d.push(Some('b'), true);
        assert_eq!(drain(&mut d), vec![0], "1 waits for 0, and 2 behind it");
        d.confirmed(0);
        assert_eq!(drain(&mut d), vec![1], "alone");
        d.confirmed(1);
        assert_eq!(drain(&mut d), vec![2]);
        d.confirmed(2);
        assert_eq!(drain(&mut d), vec![3]);
        assert_eq!(d.failed(3), Some(vec![]));
        d.push(None, false);
        assert_eq!(drain(&mut d), vec![4], "a failure ends its turn alone");
    }

    #[test]
    fn settling_what_is_not_in_flight_changes_nothing() {
        let mut d = Dispatcher::new(10);
        push_all(&mut d, "aa");
        assert!(!d.confirmed(1), "waiting, not in flight");
        assert!(!d.confirmed(7), "unknown");
        assert_eq!(d.failed(1), None);
        assert_eq!(drain(&mut d), vec![0]);
        assert!(d.confirmed(0));
        assert!(!d.confirmed(0), "twice");
        assert_eq!(drain(&mut d), vec![1]);
    }

    #[test]
    fn abandoning_returns_everything_unsettled() {
        let mut d = Dispatcher::new(1);
        push_all(&mut d, "aab");
        assert_eq!(drain(&mut d), vec![0]);
        assert_eq!(d.abandon_all(), vec![0, 1, 2]);
        assert_eq!((d.unsettled(), d.in_flight()), (0, 0));
        assert_eq!(d.push(Some('a'), false).1, Slot::Ready, "a fresh start");
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
                        let (seq, _) = d.push(*k, false);
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
