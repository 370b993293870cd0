//! What pg_outbox installs in every backend of the cluster: a transaction callback and a
//! utility hook. Both must leave every session that never calls pg_outbox exactly as it would
//! be without the library: they raise nothing, log nothing, and let every error of the
//! statements they wrap pass through untouched.
//!
//! That is why neither is a `#[pg_guard]` function. pgrx's guard catches a Postgres error
//! that crosses it and raises a new one with only some of its fields (no context, position,
//! or schema/table/column/constraint names), and with a Rust backtrace in the detail when
//! `RUST_BACKTRACE` is set. The utility hook therefore calls the next hook, or Postgres'
//! own `standard_ProcessUtility`, through a plain `extern "C-unwind"` declaration, not pgrx's
//! guarded binding, and holds no value with a destructor across that call: a Postgres error
//! raised below it jumps straight over its frame to Postgres' own handler.

use crate::{aggregate_lock, commit_times, durability, wake};
use pgrx::pg_sys;
use std::ffi::{c_char, c_void};

static mut PREV_PROCESS_UTILITY: pg_sys::ProcessUtility_hook_type = None;

unsafe extern "C-unwind" {
    /// Postgres' own utility processing, called without pgrx's error guard.
    #[link_name = "standard_ProcessUtility"]
    fn standard_process_utility(
        pstmt: *mut pg_sys::PlannedStmt,
        query_string: *const c_char,
        read_only_tree: bool,
        context: pg_sys::ProcessUtilityContext::Type,
        params: pg_sys::ParamListInfo,
        query_env: *mut pg_sys::QueryEnvironment,
        dest: *mut pg_sys::DestReceiver,
        qc: *mut pg_sys::QueryCompletion,
    );
}

/// Called from `_PG_init`, in every process that loads the library.
pub fn init() {
    // SAFETY: `_PG_init` runs once per process, before any query: registering a callback and
    // chaining the hook (keeping the previous one) is the documented way to install them.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut());
        PREV_PROCESS_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

/// Transaction ends: the aggregate locks are gone, a commit of events notes whether it was
/// flushed and when it happened, and may wake the worker.
unsafe extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_COMMIT if wake::wrote_event() => {
            durability::commit_starting();
            commit_times::committing();
        }
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            durability::commit_ended(true);
            aggregate_lock::transaction_ended();
            commit_times::committed();
            wake::committed();
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            durability::commit_ended(false);
            aggregate_lock::transaction_ended();
            wake::forgotten();
        }
        _ => {}
    }
}

/// Marks a session that runs `COMMIT PREPARED` as having written events (the prepared
/// transaction may hold some), so that its commit wakes the worker; changes nothing else.
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: Postgres passes a valid planned statement; a utility statement's node is read
    // only to learn its type.
    unsafe {
        let stmt = if pstmt.is_null() { std::ptr::null_mut() } else { (*pstmt).utilityStmt };
        if !stmt.is_null()
            && (*stmt).type_ == pg_sys::NodeTag::T_TransactionStmt
            && (*stmt.cast::<pg_sys::TransactionStmt>()).kind
                == pg_sys::TransactionStmtKind::TRANS_STMT_COMMIT_PREPARED
        {
            wake::event_written();
        }
    }
    // SAFETY: the hook chain's contract: pass the same arguments on. Nothing here has a
    // destructor, so an error raised below may jump over this frame.
    unsafe {
        match PREV_PROCESS_UTILITY {
            Some(prev) => prev(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc),
            None => standard_process_utility(
                pstmt,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
        }
    }
}
