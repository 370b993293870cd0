//! The locks `outbox.publish` takes so that the writers of one aggregate commit one after the
//! other, and the events of an aggregate get row ids in commit order.

/// The key of the transaction-level lock that serializes writers of one aggregate, so that
/// its events get ids in commit order. The same in every backend and in every build: SipHash-1-3
/// with zero keys over a fixed encoding, written out here rather than taken from the standard
/// library (whose `DefaultHasher` may change between Rust releases, while a prepared
/// transaction holds its locks across an upgrade of the library). It gives the values the
/// standard library gave when 0.1.0 was built, so locks of 0.1.0 and later versions meet.
/// Distinct aggregates share a key only by a 64-bit hash collision, which costs some waiting
/// and nothing else.
pub fn aggregate_lock_key(aggregate_type: Option<&str>, aggregate_id: &str) -> u64 {
    let mut h = SipHasher13::default();
    match aggregate_type {
        Some(t) => {
            h.write(&[1]);
            h.write(t.as_bytes());
        }
        None => h.write(&[0]),
    }
    h.write(&[0xff]);
    h.write(aggregate_id.as_bytes());
    h.finish()
}

/// SipHash-1-3 with the keys (0, 0), streaming.
#[derive(Default)]
struct SipHasher13 {
    v: [u64; 4],
    started: bool,
    tail: u64,
    ntail: usize,
    length: usize,
}

impl SipHasher13 {
    fn round(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    }

    fn state(&mut self) -> &mut [u64; 4] {
        if !self.started {
            // "somepseudorandomlygeneratedbytes" xor the keys (both zero).
            self.v = [0x736f6d6570736575, 0x646f72616e646f6d, 0x6c7967656e657261, 0x7465646279746573];
            self.started = true;
        }
        &mut self.v
    }

    fn compress(&mut self, m: u64) {
        let v = self.state();
        v[3] ^= m;
        Self::round(v);
        v[0] ^= m;
    }

    fn write(&mut self, bytes: &[u8]) {
        self.length += bytes.len();
        for &b in bytes {
            self.tail |= (b as u64) << (8 * self.ntail);
            self.ntail += 1;
            if self.ntail == 8 {
                let m = self.tail;
                self.compress(m);
                self.tail = 0;
                self.ntail = 0;
            }
        }
    }

    fn finish(mut self) -> u64 {
        let b = ((self.length as u64 & 0xff) << 56) | self.tail;
        self.compress(b);
        let v = self.state();
        v[2] ^= 0xff;
        for _ in 0..3 {
            Self::round(v);
        }
        v[0] ^ v[1] ^ v[2] ^ v[3]
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_are_those_of_0_1_0() {
        // The values the standard library's DefaultHasher gave for the same input when 0.1.0
        // was built (Rust 1.95): a prepared transaction's locks survive a library upgrade.
        let golden = [
            (Some("account"), "123", 0xe38d097cbd72dce5),
            (None, "x", 0x9b53aa20bf39d8a4),
            (Some(""), "x", 0x73f0053273febea4),
            (Some("order"), "a-much-longer-aggregate-identifier-0001", 0x8e5aee0cf5d55280),
            (Some("é"), "ü", 0x7fe290e841b5b4a1),
        ];
        for (t, id, key) in golden {
            assert_eq!(aggregate_lock_key(t, id), key, "{t:?} {id:?}");
        }
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
}
