//! One transaction of the worker: started and ended by hand (a background worker has no
//! statement loop to do it), with a statement timeout of its own, and every error caught and
//! kept typed, a SQLSTATE and a message, until it is logged.

use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use std::panic::UnwindSafe;
use std::time::Duration;

/// How long one transaction of the worker may take. A round does a few index scans bounded
/// by the batch size; anything slower is a fault to report and retry, not to wait for.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Postgres' `STATEMENT_TIMEOUT` (utils/timeout.h; the same in every supported version).
const STATEMENT_TIMEOUT: i32 = 3;

unsafe extern "C-unwind" {
    // utils/timeout.h; not in pgrx's bindings. Called through pgrx's FFI guard below.
    #[link_name = "enable_timeout_after"]
    fn enable_timeout_after_raw(id: i32, delay_ms: i32);
    #[link_name = "disable_timeout"]
    fn disable_timeout_raw(id: i32, keep_indicator: bool);
}

/// # Safety
/// On the main thread of a backend whose timeouts are initialised (every background worker's).
unsafe fn enable_timeout_after(id: i32, delay_ms: i32) {
    // SAFETY: the caller's promise; the guard turns a Postgres error into a Rust panic.
    unsafe { pg_sys::ffi::pg_guard_ffi_boundary(|| enable_timeout_after_raw(id, delay_ms)) }
}

/// # Safety
/// As [`enable_timeout_after`].
unsafe fn disable_timeout(id: i32, keep_indicator: bool) {
    // SAFETY: as above.
    unsafe { pg_sys::ffi::pg_guard_ffi_boundary(|| disable_timeout_raw(id, keep_indicator)) }
}

/// A database error, kept typed until it is logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbError {
    pub code: PgSqlErrorCode,
    pub message: String,
}

impl DbError {
    pub fn new(code: PgSqlErrorCode, message: impl Into<String>) -> DbError {
        DbError { code, message: message.into() }
    }

    /// The five characters of the SQLSTATE.
    pub fn sqlstate(&self) -> String {
        let code = self.code as i32;
        (0..5).map(|i| char::from(b'0' + ((code >> (6 * i)) & 0x3f) as u8)).collect()
    }

    pub fn is_timeout(&self) -> bool {
        self.code == PgSqlErrorCode::ERRCODE_QUERY_CANCELED
    }
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.sqlstate())
    }
}

impl From<pgrx::spi::SpiError> for DbError {
    fn from(e: pgrx::spi::SpiError) -> DbError {
        DbError::new(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, e.to_string())
    }
}

/// Runs `f` in a transaction of its own, under [`TIMEOUT`]. An error, a Postgres error or a
/// panic aborts the transaction and comes back as a [`DbError`]; the process goes on.
pub fn in_transaction<R>(f: impl FnOnce() -> Result<R, DbError> + UnwindSafe) -> Result<R, DbError> {
    // SAFETY: the worker's main thread, outside any transaction (every path below ends it).
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        enable_timeout_after(STATEMENT_TIMEOUT, TIMEOUT.as_millis() as i32);
    }
    PgTryBuilder::new(|| {
        let result = f();
        // SAFETY: ends the transaction started above, committing or rolling back.
        unsafe {
            disable_timeout(STATEMENT_TIMEOUT, false);
            crate::signals::drop_stale_cancel();
            pg_sys::PopActiveSnapshot();
            if result.is_ok() {
                pg_sys::CommitTransactionCommand();
            } else {
                pg_sys::AbortCurrentTransaction();
            }
            // A background worker has no idle loop that sends its table statistics: without
            // this, autovacuum would never hear of the rows the worker deletes. At most once
            // a second (Postgres rate-limits it).
            pg_sys::pgstat_report_stat(false);
        }
        result
    })
    .catch_others(|e| {
        let error = match &e {
            CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => {
                DbError::new(r.sql_error_code(), r.message())
            }
            CaughtError::RustPanic { ereport, .. } => DbError::new(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                format!("internal error: {}", ereport.message()),
            ),
        };
        // SAFETY: aborting is always allowed after an error; it also drops the snapshot.
        unsafe {
            disable_timeout(STATEMENT_TIMEOUT, false);
            crate::signals::drop_stale_cancel();
            pg_sys::AbortCurrentTransaction();
        }
        Err(error)
    })
    .execute()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_spelled_out() {
        assert_eq!(DbError::new(PgSqlErrorCode::ERRCODE_QUERY_CANCELED, "x").sqlstate(), "57014");
        assert_eq!(
            DbError::new(PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE, "x").to_string(),
            "x (SQLSTATE 42P01)"
        );
    }
}
