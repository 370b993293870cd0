//! The transaction-level locks `outbox.publish` takes on an event's aggregate, so that the
//! writers of one aggregate commit one after the other (see [`TransactionLocks`] for which
//! locks a transaction takes).

use pg_outbox_core::locks::{AggregateLock, TransactionLocks};
use pgrx::pg_sys;
use std::cell::RefCell;

/// Distinguishes our advisory locks from those of `pg_advisory_xact_lock`, which use 1 and 2
/// in this field: `pg_locks.objsubid` shows 3 for an aggregate lock, 4 for a bucket lock.
const AGGREGATE_LOCK_FIELD4: u16 = 3;
const BUCKET_LOCK_FIELD4: u16 = 4;

thread_local! {
    static LOCKS: RefCell<TransactionLocks> = RefCell::new(TransactionLocks::default());
}

/// Blocks until every other transaction that wrote this aggregate has ended; held to our own
/// transaction's end, so the aggregate's events get ids in commit order.
pub fn lock(key: u64) {
    let planned = LOCKS.with(|l| l.borrow_mut().plan(key));
    for lock in planned {
        // SAFETY: an all-zero LOCKTAG is a valid value to fill in.
        let mut tag: pg_sys::LOCKTAG = unsafe { std::mem::zeroed() };
        // SAFETY: reads the id of the database this backend is connected to.
        tag.locktag_field1 = unsafe { pg_sys::MyDatabaseId }.to_u32();
        tag.locktag_type = pg_sys::LockTagType::LOCKTAG_ADVISORY as u8;
        tag.locktag_lockmethodid = pg_sys::USER_LOCKMETHOD as u8;
        let mode = match lock {
            AggregateLock::Aggregate(key) => {
                tag.locktag_field2 = (key >> 32) as u32;
                tag.locktag_field3 = key as u32;
                tag.locktag_field4 = AGGREGATE_LOCK_FIELD4;
                pg_sys::ExclusiveLock
            }
            AggregateLock::Bucket { bucket, exclusive } => {
                tag.locktag_field3 = bucket;
                tag.locktag_field4 = BUCKET_LOCK_FIELD4;
                if exclusive {
                    pg_sys::ExclusiveLock
                } else {
                    pg_sys::ShareLock
                }
            }
        };
        // SAFETY: a complete advisory lock tag, taken for the transaction (sessionLock false)
        // inside a transaction; waits as any lock does, and raises on deadlock.
        unsafe { pg_sys::LockAcquire(&tag, mode as pg_sys::LOCKMODE, false, false) };
    }
}

/// The transaction ended: its locks are gone. Called from the transaction callback, so it must
/// never fail or panic.
pub fn transaction_ended() {
    let _ = LOCKS.try_with(|l| {
        if let Ok(mut locks) = l.try_borrow_mut() {
            locks.reset();
        }
    });
}
