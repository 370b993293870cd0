//! Shared memory: one status slot per served database (read by `outbox.stats` in that
//! database), and what writers need to know of the broker. The wake-up flags live in
//! [`crate::wake`].
//!
//! The launcher claims a slot for each database of `outbox.database` and passes its number to
//! the database's worker, which writes only its own slot ([`update_status`]).

use pg_outbox_core::metrics::Metrics;
use pgrx::atomics::PgAtomic;
use pgrx::lwlock::PgLwLock;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

/// Databases one server may serve (entries of `outbox.database`).
pub const MAX_DATABASES: usize = 64;

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
    /// Counters (since the server started: a worker that starts again goes on counting) and
    /// the worker's gauges, for `outbox.metrics`.
    pub metrics: Metrics,
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
            metrics: Metrics::default(),
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
    /// The slot for a worker that starts: what was counted goes on from where the last worker
    /// of the database left it; everything else starts over.
    pub fn restarted(&self) -> WorkerStatus {
        WorkerStatus {
            database_oid: self.database_oid,
            published_total: self.published_total,
            failed_attempts_total: self.failed_attempts_total,
            dead_lettered_total: self.dead_lettered_total,
            last_publish_at: self.last_publish_at,
            metrics: self.metrics.restarted(),
            ..WorkerStatus::default()
        }
    }
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

/// Every database's slot; a free slot has `database_oid` 0.
#[derive(Copy, Clone)]
pub struct Slots([WorkerStatus; MAX_DATABASES]);

// SAFETY: plain data, as `WorkerStatus`.
unsafe impl PGRXSharedMemory for Slots {}

impl Default for Slots {
    fn default() -> Self {
        Slots([WorkerStatus::default(); MAX_DATABASES])
    }
}

// SAFETY: the name is unique to this extension; initialised in `_PG_init` while preloading.
static STATUS: PgLwLock<Slots> = unsafe { PgLwLock::new(c"pg_outbox_status") };
/// This process' slot, in a worker (`usize::MAX` elsewhere).
static MY_SLOT: AtomicUsize = AtomicUsize::new(usize::MAX);
/// The `frame_max` the broker negotiated with the worker, 0 until it connected once.
// SAFETY: as above.
static FRAME_MAX: PgAtomic<AtomicU32> = unsafe { PgAtomic::new(c"pg_outbox_frame_max") };
/// Set in the postmaster when the library is preloaded; inherited by every backend it forks.
static AVAILABLE: AtomicBool = AtomicBool::new(false);

/// Called from `_PG_init` while preloading.
pub fn init() {
    pg_shmem_init!(STATUS = Slots::default());
    pg_shmem_init!(FRAME_MAX = AtomicU32::new(0));
    AVAILABLE.store(true, Ordering::Relaxed);
}

/// Whether shared memory exists, i.e. the library was preloaded and a worker can run.
pub fn available() -> bool {
    AVAILABLE.load(Ordering::Relaxed)
}

/// The status of the worker of the caller's database (a default one, "not running", when
/// `outbox.database` does not name it); `None` when not preloaded.
pub fn status() -> Option<WorkerStatus> {
    // SAFETY: reads this backend's database.
    let database = unsafe { pg_sys::MyDatabaseId }.to_u32();
    available().then(|| {
        let slots = STATUS.share();
        slots.0.iter().find(|s| database != 0 && s.database_oid == database).copied().unwrap_or_default()
    })
}

/// The status in slot `slot`.
pub fn slot_status(slot: usize) -> Option<WorkerStatus> {
    available().then(|| STATUS.share().0.get(slot).copied()).flatten()
}

/// A worker writes its own slot, the one the launcher gave it ([`set_my_slot`]).
pub fn update_status(f: impl FnOnce(&mut WorkerStatus)) {
    update_slot(MY_SLOT.load(Ordering::Relaxed), f);
}

/// The launcher writes the slot of a database whose worker does not run.
pub fn update_slot(slot: usize, f: impl FnOnce(&mut WorkerStatus)) {
    if available() {
        if let Some(s) = STATUS.exclusive().0.get_mut(slot) {
            f(s);
        }
    }
}

pub fn set_my_slot(slot: usize) {
    MY_SLOT.store(slot, Ordering::Relaxed);
}

pub fn my_slot() -> Option<usize> {
    Some(MY_SLOT.load(Ordering::Relaxed)).filter(|s| *s < MAX_DATABASES)
}

/// The slot of database `oid`, claimed for it if it had none; `None` when all are taken.
pub fn claim_slot(oid: u32) -> Option<usize> {
    if !available() || oid == 0 {
        return None;
    }
    let mut slots = STATUS.exclusive();
    if let Some(i) = slots.0.iter().position(|s| s.database_oid == oid) {
        return Some(i);
    }
    let free = slots.0.iter().position(|s| s.database_oid == 0 && s.pid == 0)?;
    slots.0[free] = WorkerStatus { database_oid: oid, ..WorkerStatus::default() };
    Some(free)
}

/// Every claimed slot: (slot, database oid).
pub fn claimed_slots() -> Vec<(usize, u32)> {
    if !available() {
        return Vec::new();
    }
    let slots = STATUS.share();
    slots
        .0
        .iter()
        .enumerate()
        .filter(|(_, s)| s.database_oid != 0)
        .map(|(i, s)| (i, s.database_oid))
        .collect()
}

/// The database of slot `slot` is no longer served: the slot is free again.
pub fn release_slot(slot: usize) {
    update_slot(slot, |s| *s = WorkerStatus::default());
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
