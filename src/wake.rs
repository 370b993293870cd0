//! Commit-time wake-up, both halves of the protocol.
//!
//! The worker *arms* a shared flag before each read of the outbox ([`arm`]). A transaction that
//! wrote an event takes the flag when it commits ([`committed`]) and, if it was armed, sets the
//! worker's latch. So a commit either is visible to the worker's read (it committed before
//! the read's snapshot) or finds the flag armed and wakes the worker: no event waits for the
//! poll interval, and the worker is woken at most once per round however many transactions
//! commit. While it cannot publish (no broker), the worker disarms ([`disarm`]): commits do not
//! wake it for nothing.
//!
//! `COMMIT PREPARED` runs in another session than the one that wrote the events; the utility
//! hook in [`crate::xact`] marks the session that runs it as having written events. The poll
//! interval remains the safety net for anything else.
//!
//! The writer's half runs in transaction callbacks of every backend: it only reads and writes
//! a thread-local flag and a few atomics (it finds its database's worker among at most
//! `shmem::MAX_DATABASES` slots), and sets a latch.

use crate::shmem;
use pgrx::atomics::PgAtomic;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};

thread_local! {
    /// This session's transaction wrote an event (or committed prepared ones).
    static WROTE_EVENT: Cell<bool> = const { Cell::new(false) };
}

/// What one worker publishes for the commits of its database.
struct WakeSlot {
    /// The database it serves (0: none).
    database: AtomicU32,
    /// `pgprocno` of the worker, or -1: the latch a commit sets.
    procno: AtomicI32,
    /// Whether the worker wants the next commit to wake it.
    wanted: AtomicBool,
}

/// One slot per served database, numbered as the status slots (`shmem::MAX_DATABASES`).
pub struct WakeSlots([WakeSlot; shmem::MAX_DATABASES]);

// SAFETY: atomics of plain integers, no pointers: valid in any process.
unsafe impl PGRXSharedMemory for WakeSlots {}

impl Default for WakeSlots {
    fn default() -> Self {
        WakeSlots(std::array::from_fn(|_| WakeSlot {
            database: AtomicU32::new(0),
            procno: AtomicI32::new(-1),
            wanted: AtomicBool::new(false),
        }))
    }
}

// SAFETY: the name is unique to this extension; initialised in `_PG_init` while preloading.
static WAKE: PgAtomic<WakeSlots> = unsafe { PgAtomic::new(c"pg_outbox_wake") };

/// Called from `_PG_init` while preloading.
pub fn init_shared_memory() {
    pg_shmem_init!(WAKE = WakeSlots::default());
}

/// The worker's own slot.
fn my_slot() -> Option<&'static WakeSlot> {
    shmem::available().then(|| shmem::my_slot().map(|i| &WAKE.get().0[i])).flatten()
}

// The writer's half.

/// `outbox.publish` (or a replay) wrote an event: wake the worker when this transaction commits.
pub fn event_written() {
    let _ = WROTE_EVENT.try_with(|w| w.set(true));
}

/// Whether this session's transaction wrote events (so far).
pub fn wrote_event() -> bool {
    WROTE_EVENT.try_with(Cell::get).unwrap_or(false)
}

/// The transaction committed: wake the worker if it wrote events and the worker asked for it.
pub fn committed() {
    if WROTE_EVENT.try_with(|w| w.replace(false)).unwrap_or(false) {
        wake_worker();
    }
}

/// The transaction aborted or was prepared: its events are not (yet) visible.
pub fn forgotten() {
    let _ = WROTE_EVENT.try_with(|w| w.set(false));
}

fn wake_worker() {
    if !shmem::available() {
        return;
    }
    // SAFETY: reads this backend's database.
    let database = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let Some(slot) = WAKE.get().0.iter().find(|s| s.database.load(Ordering::Acquire) == database) else {
        return;
    };
    if !slot.wanted.swap(false, Ordering::SeqCst) {
        return;
    }
    let procno = slot.procno.load(Ordering::Acquire);
    if procno < 0 {
        return;
    }
    // SAFETY: `procno` was published by the worker from its own PGPROC and is withdrawn
    // (-1) before the worker exits; PGPROCs live in shared memory for the server's life, so
    // the latch is valid even if the worker has just gone. SetLatch never raises.
    unsafe {
        let proc = (*pg_sys::ProcGlobal).allProcs.add(procno as usize);
        pg_sys::SetLatch(&raw mut (*proc).procLatch);
    }
}

// The worker's half.

/// This process' number among the PGPROCs: its index in `ProcGlobal->allProcs`. Postgres 17
/// dropped the `pgprocno` field (its `GetNumberFromPGProc` is this subtraction); computing it
/// the same way on every version keeps one code path.
pub fn my_procno() -> i32 {
    // SAFETY: `MyProc` points into the `allProcs` array (set up when the process connected),
    // which lives in shared memory for the server's life.
    let index = unsafe { pg_sys::MyProc.offset_from((*pg_sys::ProcGlobal).allProcs) };
    i32::try_from(index).unwrap_or(-1)
}

/// The worker announces itself in its slot (or, with `None`, leaves) so that commits in its
/// database can wake it.
pub fn register_worker(procno: Option<i32>) {
    let Some(slot) = my_slot() else { return };
    match procno {
        Some(procno) => {
            slot.procno.store(procno, Ordering::Release);
            // SAFETY: reads this backend's database.
            slot.database.store(unsafe { pg_sys::MyDatabaseId }.to_u32(), Ordering::Release);
        }
        None => {
            // Leaving: only if the slot is still ours (the launcher may have given it to the
            // worker of another database meanwhile).
            if slot.procno.compare_exchange(my_procno(), -1, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                slot.database.store(0, Ordering::Release);
            }
        }
    }
}

/// The next commit must wake the worker. Called before it takes the snapshot of its read, so
/// that a commit either is visible to that read or finds this armed.
pub fn arm() {
    if let Some(slot) = my_slot() {
        slot.wanted.store(true, Ordering::SeqCst);
    }
}

/// Commits need not wake the worker (it cannot publish now).
pub fn disarm() {
    if let Some(slot) = my_slot() {
        slot.wanted.store(false, Ordering::SeqCst);
    }
}
