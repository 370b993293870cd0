//! An event reaches the broker only after its transaction is durable: its commit record is
//! flushed to this server's WAL, and with `outbox.wait_for_sync_standbys` also confirmed by
//! the synchronous standbys. A transaction committed with `synchronous_commit = off` is visible
//! before it is durable; publishing it then could announce a change that a crash undoes.

use pgrx::pg_sys;

/// A WAL position at or after the commit record of `xid`'s transaction when that commit was
/// asynchronous and may not be flushed yet; 0 when nothing needs flushing for it (synchronous
/// commits are flushed before they become visible). From the commit log, which keeps, per
/// group of transactions, the latest asynchronous commit's position.
pub fn commit_lsn(xid: u32) -> u64 {
    // SAFETY: reads the commit log for a transaction id taken from a row visible to us.
    unsafe { pg_sys::TransactionIdGetCommitLSN(pg_sys::TransactionId::from_inner(xid)) }
}

/// The current end of WAL: at or after the commit record of everything visible to a snapshot
/// taken before.
pub fn insert_lsn() -> u64 {
    // SAFETY: reads a shared position under its spinlock.
    unsafe { pg_sys::GetXLogInsertRecPtr() }
}

/// Makes sure the WAL up to `lsn` is flushed. Flushing is what a synchronous commit does;
/// here it is done once per batch, and only when an asynchronous commit left WAL unflushed.
pub fn flush(lsn: u64) {
    // SAFETY: `lsn` is at most the current insert position (it came from the commit log or
    // from `insert_lsn`), so the flush request can be satisfied.
    unsafe {
        if lsn != 0 && pg_sys::XLogNeedsFlush(lsn) {
            pg_sys::XLogFlush(lsn);
        }
    }
}

/// Waits until the synchronous standbys (`synchronous_standby_names`) have flushed the WAL up
/// to `lsn`, as a commit with `synchronous_commit = on` would. Returns false if the wait was
/// cut short because the worker must stop; it returns at once when no synchronous standby is
/// configured. Outside any transaction.
pub fn wait_for_sync_standbys(lsn: u64) -> bool {
    flush(lsn);
    // SAFETY: the worker's main thread, outside a transaction. The wait is the one commits
    // use; it needs interrupts held (it handles a pending SIGTERM itself, with a warning) and
    // `synchronous_commit` at `on` to know which confirmation to wait for. The worker ignores
    // SIGINT, so only a stop or postmaster death ends it early.
    unsafe {
        pg_sys::SetConfigOption(
            c"synchronous_commit".as_ptr(),
            c"on".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
        );
        pg_sys::InterruptHoldoffCount += 1;
        pg_sys::SyncRepWaitForLSN(lsn, false);
        pg_sys::InterruptHoldoffCount -= 1;
        pg_sys::SetConfigOption(
            c"synchronous_commit".as_ptr(),
            c"off".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
        );
    }
    !crate::signals::stop_requested()
}
