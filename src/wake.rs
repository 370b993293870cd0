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
//! a thread-local flag and two atomics, and sets a latch.

use crate::shmem;
use pgrx::atomics::PgAtomic;
use pgrx::pg_shmem_init;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

thread_local! {
    /// This session's transaction wrote an event (or committed prepared ones).
    static WROTE_EVENT: Cell<bool> = const { Cell::new(false) };
}

/// `pgprocno` of the worker, or -1: the latch a commit sets.
// SAFETY: the name is unique to this extension; initialised in `_PG_init` while preloading.
static WORKER_PROCNO: PgAtomic<AtomicI32> = unsafe { PgAtomic::new(c"pg_outbox_procno") };
/// Whether the worker wants the next commit to wake it.
// SAFETY: as above.
static WAKE_WANTED: PgAtomic<AtomicBool> = unsafe { PgAtomic::new(c"pg_outbox_wake_wanted") };

/// Called from `_PG_init` while preloading.
pub fn init_shared_memory() {
    pg_shmem_init!(WORKER_PROCNO = AtomicI32::new(-1));
    pg_shmem_init!(WAKE_WANTED = AtomicBool::new(false));
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
    if !shmem::available() || !WAKE_WANTED.get().swap(false, Ordering::SeqCst) {
        return;
    }
    let procno = WORKER_PROCNO.get().load(Ordering::Acquire);
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

/// The worker announces itself (or, with `None`, leaves) so commits can wake it.
pub fn register_worker(procno: Option<i32>) {
    if shmem::available() {
        WORKER_PROCNO.get().store(procno.unwrap_or(-1), Ordering::Release);
    }
}

/// The next commit must wake the worker. Called before it takes the snapshot of its read, so
/// that a commit either is visible to that read or finds this armed.
pub fn arm() {
    if shmem::available() {
        WAKE_WANTED.get().store(true, Ordering::SeqCst);
    }
}

/// Commits need not wake the worker (it cannot publish now).
pub fn disarm() {
    if shmem::available() {
        WAKE_WANTED.get().store(false, Ordering::SeqCst);
    }
}
