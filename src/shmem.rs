//! Shared memory: the worker's status (read by `outbox.stats`) and its latch, which committing
//! transactions set to wake it.

use pgrx::atomics::PgAtomic;
use pgrx::lwlock::PgLwLock;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

const ERROR_BYTES: usize = 512;
const STATE_BYTES: usize = 64;

/// What `outbox.stats` shows about the worker.
#[derive(Copy, Clone)]
pub struct WorkerStatus {
    pub pid: i32,
    pub database_oid: u32,
    pub started_at: pg_sys::TimestampTz,
    pub published_total: i64,
    pub failed_attempts_total: i64,
    pub dead_lettered_total: i64,
    pub last_publish_at: pg_sys::TimestampTz,
    pub broker_connected: bool,
    pub last_error_at: pg_sys::TimestampTz,
    last_error: [u8; ERROR_BYTES],
    state: [u8; STATE_BYTES],
}

unsafe impl PGRXSharedMemory for WorkerStatus {}

impl Default for WorkerStatus {
    fn default() -> Self {
        WorkerStatus {
            pid: 0,
            database_oid: 0,
            started_at: 0,
            published_total: 0,
            failed_attempts_total: 0,
            dead_lettered_total: 0,
            last_publish_at: 0,
            broker_connected: false,
            last_error_at: 0,
            last_error: [0; ERROR_BYTES],
            state: [0; STATE_BYTES],
        }
    }
}

fn put(buf: &mut [u8], text: &str) {
    // Cut at a character boundary so the stored text stays valid UTF-8.
    let mut end = text.len().min(buf.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    buf.fill(0);
    buf[..end].copy_from_slice(&text.as_bytes()[..end]);
}

fn get(buf: &[u8]) -> Option<String> {
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    (end > 0).then(|| String::from_utf8_lossy(&buf[..end]).into_owned())
}

impl WorkerStatus {
    pub fn last_error(&self) -> Option<String> {
        get(&self.last_error)
    }
    pub fn set_last_error(&mut self, text: Option<&str>) {
        put(&mut self.last_error, text.unwrap_or(""));
    }
    pub fn state(&self) -> Option<String> {
        get(&self.state)
    }
    pub fn set_state(&mut self, text: &str) {
        put(&mut self.state, text);
    }
}

static STATUS: PgLwLock<WorkerStatus> = unsafe { PgLwLock::new(c"pg_outbox_status") };
/// `pgprocno` of the worker, or -1: the latch a commit sets.
static WORKER_PROCNO: PgAtomic<AtomicI32> = unsafe { PgAtomic::new(c"pg_outbox_procno") };
/// Whether the worker wants the next commit to wake it. It arms this before each read of the
/// outbox, and the first commit after that takes it: one wake-up per round however many
/// transactions commit, and none while the worker could not publish anyway (no broker).
static WAKE_WANTED: PgAtomic<AtomicBool> = unsafe { PgAtomic::new(c"pg_outbox_wake_wanted") };
/// Set in the postmaster when the library is preloaded; inherited by every backend it forks.
static AVAILABLE: AtomicBool = AtomicBool::new(false);

/// Called from `_PG_init` while preloading.
pub fn init() {
    pg_shmem_init!(STATUS = WorkerStatus::default());
    pg_shmem_init!(WORKER_PROCNO = AtomicI32::new(-1));
    pg_shmem_init!(WAKE_WANTED = AtomicBool::new(false));
    AVAILABLE.store(true, Ordering::Relaxed);
}

/// Whether shared memory exists, i.e. the library was preloaded and a worker can run.
pub fn available() -> bool {
    AVAILABLE.load(Ordering::Relaxed)
}

pub fn status() -> Option<WorkerStatus> {
    available().then(|| *STATUS.share())
}

pub fn update_status(f: impl FnOnce(&mut WorkerStatus)) {
    if available() {
        f(&mut STATUS.exclusive());
    }
}

/// The worker announces itself (or, with `None`, leaves) so commits can wake it.
pub fn set_worker_procno(procno: Option<i32>) {
    if available() {
        WORKER_PROCNO.get().store(procno.unwrap_or(-1), Ordering::Release);
    }
}

/// The worker: the next commit must wake me. Called before it takes the snapshot of its read,
/// so a commit either is visible to that read or finds this armed.
pub fn arm_wake_up() {
    if available() {
        WAKE_WANTED.get().store(true, Ordering::SeqCst);
    }
}

/// The worker: commits need not wake me (I cannot publish now).
pub fn disarm_wake_up() {
    if available() {
        WAKE_WANTED.get().store(false, Ordering::SeqCst);
    }
}

/// A committing writer: the worker's procno if it wants a wake-up (which this call takes).
pub fn take_wake_up() -> Option<i32> {
    if !available() || !WAKE_WANTED.get().swap(false, Ordering::SeqCst) {
        return None;
    }
    worker_procno()
}

pub fn worker_procno() -> Option<i32> {
    if !available() {
        return None;
    }
    let procno = WORKER_PROCNO.get().load(Ordering::Acquire);
    (procno >= 0).then_some(procno)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_are_cut_at_character_boundaries() {
        let mut buf = [0u8; 5];
        put(&mut buf, "abcdé");
        assert_eq!(get(&buf).as_deref(), Some("abcd"));
        put(&mut buf, "");
        assert_eq!(get(&buf), None);
    }
}
