//! An event reaches the broker only after its transaction is durable: its commit record is
//! flushed to this server's WAL, and with `outbox.wait_for_sync_standbys` also confirmed by
//! the synchronous standbys. A transaction committed with `synchronous_commit = off` is
//! visible before it is durable; publishing it then could announce a change that a crash
//! undoes.
//!
//! Both halves are here. Writers that wrote events note, around their commit, whether it may
//! be asynchronous ([`commit_starting`], [`commit_ended`]); the worker, after each read, learns
//! from those notes how far the WAL must be flushed ([`flush_target`]) and flushes it
//! ([`flush`]) before it hands the batch over. When every writer commits synchronously (the
//! usual case) nothing is left to flush and the worker costs no fsync at all.

use crate::shmem;
use pgrx::atomics::PgAtomic;
use pgrx::pg_shmem_init;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

/// Event-writing transactions between their pre-commit and their commit (or abort) callback:
/// while one is, a snapshot may see its commit before its note below is written.
// SAFETY: the name is unique to this extension; initialised in `_PG_init` while preloading.
static COMMITS_IN_PROGRESS: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"pg_outbox_commits_in_progress") };
/// The end of the latest event-writing commit that was not flushed when it completed.
// SAFETY: as above.
static ASYNC_COMMIT_END: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"pg_outbox_async_commit_end") };

thread_local! {
    /// This session counted its commit in `COMMITS_IN_PROGRESS`.
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

/// Called from `_PG_init` while preloading.
pub fn init_shared_memory() {
    pg_shmem_init!(COMMITS_IN_PROGRESS = AtomicU64::new(0));
    pg_shmem_init!(ASYNC_COMMIT_END = AtomicU64::new(0));
}

// The writer's half, from the transaction callback: never fails, never allocates.

/// A transaction that wrote events is about to write its commit record.
pub fn commit_starting() {
    if shmem::available() && !COUNTED.try_with(|c| c.replace(true)).unwrap_or(true) {
        COMMITS_IN_PROGRESS.get().fetch_add(1, Ordering::SeqCst);
    }
}

/// The transaction ended; if it committed without flushing (asynchronously), note how far the
/// WAL must be flushed before its events go out.
pub fn commit_ended(committed: bool) {
    if !shmem::available() || !COUNTED.try_with(|c| c.replace(false)).unwrap_or(false) {
        return;
    }
    if committed {
        // SAFETY: reads this backend's end of its last commit record, and the shared flush
        // position; neither raises.
        let end = unsafe { pg_sys::XactLastCommitEnd };
        // SAFETY: as above.
        if end != 0 && unsafe { pg_sys::XLogNeedsFlush(end) } {
            ASYNC_COMMIT_END.get().fetch_max(end, Ordering::SeqCst);
        }
    }
    COMMITS_IN_PROGRESS.get().fetch_sub(1, Ordering::SeqCst);
}

// The worker's half.

/// A WAL position at or after the commit record of `xid`'s transaction when that commit was
/// asynchronous and may not be flushed yet; 0 when nothing needs flushing for it (synchronous
/// commits are flushed before they become visible). From the commit log, which keeps, per
/// group of transactions, the latest asynchronous commit's position (the worker's own
/// bookkeeping commits among them: a conservative bound).
fn commit_lsn(xid: u32) -> u64 {
    let xid = pg_sys::TransactionId::from_inner(xid);
    // SAFETY: reads the oldest transaction the commit log still holds (it only grows); a row
    // frozen long ago may name an older one, whose commit is long durable. Then reads the
    // commit log for a transaction it holds.
    unsafe {
        #[cfg(any(feature = "pg15", feature = "pg16"))]
        let oldest = (*pg_sys::ShmemVariableCache).oldestClogXid;
        // Renamed in Postgres 17.
        #[cfg(not(any(feature = "pg15", feature = "pg16")))]
        let oldest = (*pg_sys::TransamVariables).oldestClogXid;
        if xid.into_inner() < pg_sys::TransactionId::FIRST_NORMAL.into_inner()
            || pg_sys::TransactionIdPrecedes(xid, oldest)
        {
            return 0;
        }
        pg_sys::TransactionIdGetCommitLSN(xid)
    }
}

/// How far the WAL must be flushed for a batch read just now (after its snapshot) to be
/// durable; `xmins` are its rows' transactions. Every event-writing commit visible to the read
/// has either left its note (when it was asynchronous) or is still counted in progress: only
/// then is the commit log's coarser bound needed. The count is read first: once it reads
/// zero, every note of a visible commit is there to be read.
pub fn flush_target(xmins: &[u32]) -> u64 {
    let commit_log = || xmins.iter().map(|x| commit_lsn(*x)).max().unwrap_or(0);
    if !shmem::available() {
        return commit_log();
    }
    let in_progress = COMMITS_IN_PROGRESS.get().load(Ordering::SeqCst);
    let noted = ASYNC_COMMIT_END.get().load(Ordering::SeqCst);
    if in_progress > 0 {
        noted.max(commit_log())
    } else {
        noted
    }
}

/// The current end of WAL: at or after the commit record of everything visible to a snapshot
/// taken before.
pub fn insert_lsn() -> u64 {
    // SAFETY: reads a shared position under its spinlock.
    unsafe { pg_sys::GetXLogInsertRecPtr() }
}

/// The end of this process' last commit record. Flushed, it makes durable that transaction and
/// every one it saw committed (their commit records come before it in the WAL). Unlike
/// [`insert_lsn`], never past the WAL written so far (the insert position can point past the
/// header of a page not begun yet, which `XLogFlush` refuses).
pub fn last_commit_end() -> u64 {
    // SAFETY: a plain read of this process' own global, on its main thread.
    unsafe { pg_sys::XactLastCommitEnd }
}

/// Makes sure the WAL up to `lsn` is flushed: what a synchronous commit does, here once per
/// batch and only when an asynchronous commit left WAL unflushed.
pub fn flush(lsn: u64) {
    // SAFETY: `lsn` is at most the current insert position (it came from a commit record's
    // end or from `insert_lsn`), and `page_start` takes it back to WAL that exists, so the
    // flush request can be satisfied.
    unsafe {
        let lsn = page_start(lsn, pg_sys::wal_segment_size as u64);
        if lsn != 0 && pg_sys::XLogNeedsFlush(lsn) {
            pg_sys::XLogFlush(lsn);
        }
    }
}

/// The insert position at a page boundary points just past the header of a page no record has
/// begun on yet: WAL that is not written, which `XLogFlush` refuses ("request to flush past end
/// of generated WAL"). Nothing lies between that page's start and it: flushing to the start
/// makes the same WAL durable.
fn page_start(lsn: u64, segment_size: u64) -> u64 {
    /// `SizeOfXLogShortPHD`, and `SizeOfXLogLongPHD` on a segment's first page.
    const SHORT_HEADER: u64 = 24;
    const LONG_HEADER: u64 = 40;
    let header = if segment_size > 0 && lsn % segment_size < pg_sys::XLOG_BLCKSZ as u64 {
        LONG_HEADER
    } else {
        SHORT_HEADER
    };
    if lsn % pg_sys::XLOG_BLCKSZ as u64 == header {
        lsn - header
    } else {
        lsn
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
    // `synchronous_commit` at `on` to know which confirmation to wait for. SIGINT is ignored
    // while it waits, so only a stop or postmaster death ends it early.
    unsafe {
        pg_sys::SetConfigOption(
            c"synchronous_commit".as_ptr(),
            c"on".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
        );
        pg_sys::InterruptHoldoffCount += 1;
        crate::signals::without_cancel(|| pg_sys::SyncRepWaitForLSN(lsn, false));
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

#[cfg(test)]
mod tests {
    use super::page_start;

    #[test]
    fn a_position_just_past_a_fresh_page_header_is_the_page_start() {
        let segment = 16 * 1024 * 1024;
        assert_eq!(page_start(0x19B0018, segment), 0x19B0000, "a page's short header");
        assert_eq!(page_start(0x1000028, segment), 0x1000000, "a segment's long header");
        assert_eq!(page_start(0x1000018, segment), 0x1000018, "not a header's end on a segment's first page");
        assert_eq!(page_start(0x19B0020, segment), 0x19B0020, "inside a page");
        assert_eq!(page_start(0, segment), 0);
    }
}
