//! Signals, latch waits and the I/O threads of the background processes.
//!
//! SIGTERM uses Postgres' own `die` handler: a worker stuck in a query is interrupted there,
//! and between queries the loop sees `ProcDiePending` and leaves cleanly. SIGHUP only marks a
//! reload as pending; the loop applies it between rounds. SIGINT (`pg_cancel_backend`, and the
//! worker's own statement and lock timeouts, which Postgres delivers as SIGINT) cancels the
//! running statement, except during a wait for synchronous standbys, which a cancel must not
//! cut short; a cancel between statements means nothing and is dropped.
//!
//! Postgres code must only ever run on the process' main thread. The tokio runtime's threads
//! are therefore created with every signal blocked, so no Postgres signal handler can run on
//! them.

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::pg_sys;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::runtime::{Builder, Runtime};

unsafe extern "C-unwind" {
    /// Postgres' SIGTERM handler for backends (pgrx only exposes a wrapper, not the symbol).
    #[link_name = "die"]
    fn postgres_die(signal: std::ffi::c_int);
    /// Postgres' SIGINT handler: cancels the running statement. Statement and lock timeouts
    /// fire by sending SIGINT to the process itself.
    #[link_name = "StatementCancelHandler"]
    fn postgres_statement_cancel(signal: std::ffi::c_int);
}

/// Set while a cancel must not cut a wait short (the wait for synchronous standbys).
static IGNORE_CANCEL: AtomicBool = AtomicBool::new(false);

pub fn install() {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP);
    // SAFETY: installing handlers at process start, before any other work.
    unsafe {
        pqsignal(pg_sys::SIGTERM as i32, Some(postgres_die));
        pqsignal(pg_sys::SIGINT as i32, Some(cancel));
    }
}

/// Postgres' `pqsignal`: a function up to 17, a macro for the backend's `pqsignal_be` since 18.
#[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17"))]
use pg_sys::pqsignal;
#[cfg(not(any(feature = "pg15", feature = "pg16", feature = "pg17")))]
use pg_sys::pqsignal_be as pqsignal;

/// SIGINT: Postgres' statement cancel, unless a wait must not be cancelled.
unsafe extern "C-unwind" fn cancel(signal: std::ffi::c_int) {
    if !IGNORE_CANCEL.load(Ordering::SeqCst) {
        // SAFETY: Postgres' own handler for this signal, called as a signal handler.
        unsafe { postgres_statement_cancel(signal) }
    }
}

/// Runs `f` with cancels (SIGINT) ignored.
pub fn without_cancel<R>(f: impl FnOnce() -> R) -> R {
    IGNORE_CANCEL.store(true, Ordering::SeqCst);
    let result = f();
    IGNORE_CANCEL.store(false, Ordering::SeqCst);
    result
}

/// Drops a cancel that arrived when no statement ran: it was about nothing.
pub fn drop_stale_cancel() {
    // SAFETY: a flag of the main thread's interrupt handling; cleared as ProcessInterrupts
    // would after a cancel outside a statement.
    unsafe { std::ptr::write_volatile(&raw mut pg_sys::QueryCancelPending, 0) };
}

/// Whether SIGTERM (shutdown, `pg_terminate_backend`) has arrived.
pub fn stop_requested() -> bool {
    // SAFETY: a flag set by the signal handler; read volatile, as Postgres does.
    unsafe { std::ptr::read_volatile(&raw const pg_sys::ProcDiePending) != 0 }
}

/// Whether a reload is pending; clears the flag.
pub fn take_reload() -> bool {
    // SAFETY: a flag set by the signal handler, read and cleared on the main thread.
    unsafe {
        let pending = std::ptr::read_volatile(&raw const pg_sys::ConfigReloadPending) != 0;
        if pending {
            std::ptr::write_volatile(&raw mut pg_sys::ConfigReloadPending, 0);
        }
        pending
    }
}

/// Sleeps on the latch for at most `timeout`. Returns false when the process must stop. The
/// process exits by itself if the postmaster dies.
pub fn wait(timeout: Duration) -> bool {
    wait_woken(timeout).is_some()
}

/// As [`wait`]; `Some(true)` when the latch was set (a commit, a signal), `Some(false)` when
/// the time ran out, `None` when the process must stop.
pub fn wait_woken(timeout: Duration) -> Option<bool> {
    // SAFETY: waits on this process' latch, on the main thread.
    let events = unsafe {
        let events = pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            timeout.as_millis().clamp(1, i32::MAX as u128) as std::ffi::c_long,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
        events
    };
    if stop_requested() {
        return None;
    }
    drop_stale_cancel();
    // Serves other interrupts (e.g. ProcSignal barriers); never raises here: no die is pending
    // and a cancel between statements was dropped.
    pg_sys::check_for_interrupts!();
    Some(events & pg_sys::WL_LATCH_SET as i32 != 0)
}

fn block_all_signals() {
    // SAFETY: changes the calling (runtime) thread's own signal mask.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
    }
}

/// A runtime for broker I/O: one worker thread, so the connection (heartbeats, confirms) keeps
/// running while the main thread sleeps or works in the database.
pub fn io_runtime() -> std::io::Result<Runtime> {
    // SAFETY: changes this thread's signal mask around the creation of the runtime's threads
    // (which inherit it) and restores it.
    unsafe {
        // Threads inherit the creating thread's mask: block all signals while they are made.
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        let runtime = Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(2)
            .thread_name("pg_outbox-io")
            .on_thread_start(block_all_signals)
            .enable_all()
            .build();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        runtime
    }
}
