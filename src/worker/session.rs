//! The worker's database session: whom it connects as, and the settings it pins.
//!
//! `ALTER DATABASE ... SET` and `ALTER ROLE ... SET` apply to a background worker like to any
//! session, and a database owner may set most of them. None of them may change what the
//! worker's SQL means or stop it: after connecting, the worker sets these for its session,
//! which outranks database and role settings.

use pgrx::pg_sys;
use std::ffi::CString;

/// The settings the worker's session always has.
pub const PINNED: &[(&str, &str)] = &[
    // Only the extension's own objects and Postgres' catalog resolve (with schema-qualified
    // names everywhere): nothing another role creates can capture an operator, a function
    // or a type.
    ("search_path", "pg_catalog, pg_temp"),
    // Not the privileges of another role a database setting names.
    ("role", "none"),
    ("default_transaction_read_only", "off"),
    ("default_transaction_isolation", "read committed"),
    ("default_transaction_deferrable", "off"),
    // Its own bookkeeping commits need not wait for a flush: a lost delete only means a
    // duplicate. (Events are made durable before they are published; see `durability`.)
    ("synchronous_commit", "off"),
    ("lock_timeout", "5s"),
    ("idle_in_transaction_session_timeout", "0"),
    // Plans must not depend on what the statistics said when they were made (an outbox analyzed
    // as empty, or while most rows were retrying): every execution is planned afresh, and
    // only from index scans and nested loops, so that each statement reads about what it
    // returns (at most a batch) whatever the outbox holds. Every statement of the worker has
    // such a plan.
    ("plan_cache_mode", "force_custom_plan"),
    ("enable_seqscan", "off"),
    ("enable_bitmapscan", "off"),
    ("enable_sort", "off"),
    ("enable_incremental_sort", "off"),
    ("enable_hashjoin", "off"),
    ("enable_mergejoin", "off"),
    ("enable_hashagg", "off"),
    ("enable_material", "off"),
    ("enable_memoize", "off"),
    ("enable_indexscan", "on"),
    ("enable_indexonlyscan", "on"),
    ("enable_nestloop", "on"),
    ("enable_tidscan", "on"),
    // The cost constants at Postgres' defaults: a database's extreme values could otherwise
    // make a sequential scan look cheaper than the index scans the worker relies on.
    ("seq_page_cost", "1"),
    ("random_page_cost", "4"),
    ("cpu_tuple_cost", "0.01"),
    ("cpu_index_tuple_cost", "0.005"),
    ("cpu_operator_cost", "0.0025"),
    ("effective_cache_size", "4GB"),
    ("jit", "off"),
    ("max_parallel_workers_per_gather", "0"),
    ("row_security", "on"),
    // An error the worker catches stays an error (not a FATAL that would end it on one row).
    ("exit_on_error", "off"),
    // No plan dumps in the log every round.
    ("debug_print_parse", "off"),
    ("debug_print_rewritten", "off"),
    ("debug_print_plan", "off"),
    ("application_name", "pg_outbox worker"),
];

/// Connects to `database`. As `role` directly when it may log in; a role without LOGIN is
/// taken on right after connecting as the bootstrap superuser (a background worker
/// authenticates nobody). Postgres 17 could connect to such a role directly
/// (`BGWORKER_BYPASS_ROLELOGINCHECK`), but then the role would also need CONNECT on the
/// database and count against its connection limit: a database owner could lock the worker
/// out. One path on every version.
pub fn connect(database: pg_sys::Oid, role: Option<(pg_sys::Oid, bool)>) {
    match role {
        Some((role, true)) => {
            // SAFETY: the background worker's one connection, before anything else.
            unsafe { pg_sys::BackgroundWorkerInitializeConnectionByOid(database, role, 0) }
        }
        Some((role, false)) => {
            // SAFETY: as above; then, outside any transaction, the session becomes the role
            // (a committed lookup first tells whether it is a superuser).
            unsafe {
                pg_sys::BackgroundWorkerInitializeConnectionByOid(database, pg_sys::InvalidOid, 0);
                set("role", "none");
                pg_sys::StartTransactionCommand();
                let is_superuser = pg_sys::superuser_arg(role);
                pg_sys::CommitTransactionCommand();
                pg_sys::SetSessionAuthorization(role, is_superuser);
            }
        }
        None => {
            // SAFETY: as above, as the bootstrap superuser.
            unsafe { pg_sys::BackgroundWorkerInitializeConnectionByOid(database, pg_sys::InvalidOid, 0) }
        }
    }
}

/// Settings of newer versions only: from 17, a transaction timeout ends the session (FATAL),
/// and a database owner may set one on the database.
#[cfg(not(any(feature = "pg15", feature = "pg16")))]
const PINNED_SINCE_17: &[(&str, &str)] = &[("transaction_timeout", "0")];
#[cfg(any(feature = "pg15", feature = "pg16"))]
const PINNED_SINCE_17: &[(&str, &str)] = &[];

/// Sets the [`PINNED`] settings for the session. Outside any transaction.
pub fn pin() {
    for (name, value) in PINNED.iter().chain(PINNED_SINCE_17) {
        set(name, value);
    }
}

fn set(name: &str, value: &str) {
    let (Ok(name), Ok(value)) = (CString::new(name), CString::new(value)) else { return };
    // SAFETY: a fixed list of settings and values; as a session setting it outranks database
    // and role settings, and outside a transaction it stays for the session. A setting this
    // Postgres does not know is reported as a warning, not raised.
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SET,
            true,
            pg_sys::WARNING as i32,
            false,
        );
    }
}
