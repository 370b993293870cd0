//! Shared memory: the worker's status (read by `outbox.stats`) and what writers need to know
//! of the broker. The wake-up flags live in [`crate::wake`].

use pgrx::atomics::PgAtomic;
use pgrx::lwlock::PgLwLock;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

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
    /// The latest error, in full (broker host, user and vhost; never a password): shown to
    /// roles that may read other sessions' activity.
    last_error: [u8; ERROR_BYTES],
    /// The same error without any detail of the broker's address, for everyone else.
    public_error: [u8; STATE_BYTES],
    state: [u8; STATE_BYTES],
}

// SAFETY: plain data (integers and byte arrays), no pointers: valid in any process.
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
            public_error: [0; STATE_BYTES],
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
    pub fn public_error(&self) -> Option<String> {
        get(&self.public_error)
    }
    /// Records an error: `full` for privileged readers, `public` (naming no host, user or
    /// vhost) for everyone.
    pub fn set_error(&mut self, full: &str, public: &str, at: pg_sys::TimestampTz) {
        put(&mut self.last_error, full);
        put(&mut self.public_error, public);
        self.last_error_at = at;
    }
    pub fn state(&self) -> Option<String> {
        get(&self.state)
    }
    pub fn set_state(&mut self, text: &str) {
        put(&mut self.state, text);
    }
}

// SAFETY: the name is unique to this extension; initialised in `_PG_init` while preloading.
static STATUS: PgLwLock<WorkerStatus> = unsafe { PgLwLock::new(c"pg_outbox_status") };
/// The `frame_max` the broker negotiated with the worker, 0 until it connected once.
// SAFETY: as above.
static FRAME_MAX: PgAtomic<AtomicU32> = unsafe { PgAtomic::new(c"pg_outbox_frame_max") };
/// Set in the postmaster when the library is preloaded; inherited by every backend it forks.
static AVAILABLE: AtomicBool = AtomicBool::new(false);

/// Called from `_PG_init` while preloading.
pub fn init() {
    pg_shmem_init!(STATUS = WorkerStatus::default());
    pg_shmem_init!(FRAME_MAX = AtomicU32::new(0));
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

/// The largest frame the broker takes, as last negotiated; RabbitMQ's default until the worker
/// has connected.
pub fn frame_max() -> u32 {
    let known = if available() { FRAME_MAX.get().load(Ordering::Relaxed) } else { 0 };
    if known == 0 {
        pg_outbox_core::publisher::DEFAULT_FRAME_MAX
    } else {
        known
    }
}

pub fn set_frame_max(frame_max: u32) {
    if available() {
        FRAME_MAX.get().store(frame_max, Ordering::Relaxed);
    }
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
