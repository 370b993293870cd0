//! SQL functions behind `outbox.stats` and the install-time checks.

use crate::{shmem, wake};
use pgrx::prelude::*;

fn timestamp(ts: pg_sys::TimestampTz) -> Option<TimestampWithTimeZone> {
    // SAFETY: a timestamptz datum is the integer itself, never null here.
    (ts != 0).then(|| unsafe { TimestampWithTimeZone::from_datum(ts.into(), false) }).flatten()
}

/// Whether the caller may see the full text of errors: the broker's host, user and vhost, as
/// Postgres shows other sessions' queries only to roles with `pg_read_all_stats`.
fn may_read_details() -> bool {
    // SAFETY: plain catalog checks on the current user, inside the caller's transaction.
    unsafe {
        let user = pg_sys::GetUserId();
        pg_sys::superuser_arg(user)
            || pg_sys::has_privs_of_role(user, pg_sys::Oid::from(pg_sys::ROLE_PG_READ_ALL_STATS))
    }
}

/// The worker's state from shared memory: one row, all NULL when the library is not preloaded.
/// `last_error` names the broker's address only for superusers and members of
/// `pg_read_all_stats` (or `pg_monitor`); others see what went wrong without it.
#[pg_extern(volatile, parallel_safe)]
#[allow(clippy::type_complexity)]
fn worker_status() -> TableIterator<
    'static,
    (
        name!(worker_pid, Option<i32>),
        name!(worker_state, Option<String>),
        name!(database, Option<String>),
        name!(worker_started_at, Option<TimestampWithTimeZone>),
        name!(broker_connected, Option<bool>),
        name!(published_total, Option<i64>),
        name!(failed_attempts_total, Option<i64>),
        name!(dead_lettered_total, Option<i64>),
        name!(last_publish_at, Option<TimestampWithTimeZone>),
        name!(last_error, Option<String>),
        name!(last_error_at, Option<TimestampWithTimeZone>),
    ),
> {
    let row = match shmem::status() {
        None => {
            (None, Some("not preloaded".to_string()), None, None, None, None, None, None, None, None, None)
        }
        Some(s) => {
            let database = (s.database_oid != 0)
                // SAFETY: a catalog lookup by oid in the caller's transaction; NULL if gone.
                .then(|| unsafe {
                    let name = pg_sys::get_database_name(pg_sys::Oid::from(s.database_oid));
                    (!name.is_null()).then(|| std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned())
                })
                .flatten();
            (
                (s.pid > 0).then_some(s.pid),
                match (s.pid, s.state()) {
                    // Why it does not run, when the launcher said (or "stopped").
                    (0, state) => state.or_else(|| Some("not running".into())),
                    (_, state) => state.or_else(|| Some("starting".into())),
                },
                database,
                timestamp(s.started_at),
                Some(s.pid > 0 && s.broker_connected),
                Some(s.published_total),
                Some(s.failed_attempts_total),
                Some(s.dead_lettered_total),
                timestamp(s.last_publish_at),
                if may_read_details() { s.last_error() } else { s.public_error() },
                timestamp(s.last_error_at),
            )
        }
    };
    TableIterator::once(row)
}

/// Whether the library was preloaded, i.e. whether a worker can publish at all.
#[pg_extern(stable, parallel_safe)]
fn worker_available() -> bool {
    shmem::available()
}

/// Wakes the worker when the calling transaction commits (used after a replay).
#[pg_extern(volatile)]
fn wake_worker_at_commit() {
    wake::event_written();
}
