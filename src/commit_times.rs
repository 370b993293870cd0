//! When event-writing transactions committed, for the commit-to-confirm and wait histograms
//! of `outbox.metrics` (measured from an event's commit, not from its insert).
//!
//! A transaction that wrote events notes its commit timestamp in shared memory from its
//! commit callback, in a slot chosen by its transaction id (direct-mapped: a later transaction
//! with the same id modulo [`SLOTS`] takes the slot over). The worker looks the ids of the rows
//! it reads (their `xmin`) up. An id not found (written in a subtransaction, committed by
//! `COMMIT PREPARED`, or overwritten because the event waited behind more than [`SLOTS`]
//! transactions) falls back to the row's insert time: an upper bound of the wait.
//!
//! The writer's half runs in every backend's commit callback: a few atomic stores, nothing
//! that can fail.

use crate::{shmem, wake};
use pgrx::atomics::PgAtomic;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory};
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};

/// Slots of the table: transaction ids this far apart share one.
pub const SLOTS: usize = 32 * 1024;

struct Slot {
    /// The transaction id, 0 while the slot is being written.
    xid: AtomicU32,
    /// Its commit timestamp.
    at: AtomicI64,
}

pub struct CommitTimes([Slot; SLOTS]);

// SAFETY: atomics of plain integers, no pointers: valid in any process.
unsafe impl PGRXSharedMemory for CommitTimes {}

impl Default for CommitTimes {
    fn default() -> Self {
        CommitTimes(std::array::from_fn(|_| Slot { xid: AtomicU32::new(0), at: AtomicI64::new(0) }))
    }
}

// SAFETY: the name is unique to this extension; initialised in `_PG_init` while preloading.
static TIMES: PgAtomic<CommitTimes> = unsafe { PgAtomic::new(c"pg_outbox_commit_times") };

/// Called from `_PG_init` while preloading.
pub fn init_shared_memory() {
    pg_shmem_init!(TIMES = CommitTimes::default());
}

fn slot(xid: u32) -> &'static Slot {
    &TIMES.get().0[xid as usize % SLOTS]
}

/// From the pre-commit callback: if this transaction wrote events, note the time now. Its
/// rows may become visible to the worker before [`committed`] runs (after the commit is in the
/// proc array), so an approximation is there first: a little early, by the commit record's
/// write and flush.
pub fn committing() {
    if shmem::available() && wake::wrote_event() {
        // SAFETY: reads the clock; never raises.
        note(unsafe { pg_sys::GetCurrentTimestamp() });
    }
}

/// From the commit callback: if this transaction wrote events, note when it committed (the
/// timestamp of its commit record).
pub fn committed() {
    if shmem::available() && wake::wrote_event() {
        // SAFETY: the committing transaction's stop timestamp, set when its commit record was
        // written; never raises in the commit callback.
        note(unsafe { pg_sys::GetCurrentTransactionStopTimestamp() });
    }
}

fn note(at: i64) {
    // SAFETY: reads the committing transaction's id (still set in its commit callbacks);
    // never raises.
    let xid = unsafe { pg_sys::GetTopTransactionIdIfAny() }.into_inner();
    if xid == 0 {
        return;
    }
    let s = slot(xid);
    s.xid.store(0, Ordering::SeqCst);
    s.at.store(at, Ordering::SeqCst);
    s.xid.store(xid, Ordering::SeqCst);
}

/// When transaction `xid` committed, if it wrote events and its note is still there.
pub fn lookup(xid: u32) -> Option<i64> {
    if !shmem::available() || xid == 0 {
        return None;
    }
    let s = slot(xid);
    let before = s.xid.load(Ordering::SeqCst);
    let at = s.at.load(Ordering::SeqCst);
    (before == xid && s.xid.load(Ordering::SeqCst) == xid).then_some(at)
}
