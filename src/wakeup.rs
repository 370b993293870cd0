//! Commit-time wake-up: a transaction that wrote an event sets the worker's latch when it
//! commits, so the worker publishes within milliseconds instead of waiting for its poll.
//!
//! The commit callback runs after the commit is visible and must not fail (an error there
//! would crash the backend): it only reads an atomic and sets a latch. `COMMIT PREPARED`
//! fires no callback in the session that prepared, so a utility hook marks the session that
//! runs it; the poll interval remains the safety net for anything else.

use crate::shmem;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::Cell;
use std::ffi::{c_char, c_void};

thread_local! {
    static WROTE_EVENT: Cell<bool> = const { Cell::new(false) };
}

static mut PREV_PROCESS_UTILITY: pg_sys::ProcessUtility_hook_type = None;

pub fn init() {
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut());
        PREV_PROCESS_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

/// Called by `outbox.publish`: wake the worker when this transaction commits.
pub fn event_written() {
    WROTE_EVENT.with(|w| w.set(true));
}

unsafe extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut c_void) {
    use pg_sys::XactEvent::*;
    if matches!(
        event,
        XACT_EVENT_COMMIT
            | XACT_EVENT_PARALLEL_COMMIT
            | XACT_EVENT_ABORT
            | XACT_EVENT_PARALLEL_ABORT
            | XACT_EVENT_PREPARE
    ) {
        crate::api::transaction_ended();
    }
    match event {
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT if WROTE_EVENT.with(|w| w.replace(false)) => {
            wake_worker();
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            WROTE_EVENT.with(|w| w.set(false));
        }
        _ => {}
    }
}

/// Sets the worker's latch, if a worker runs.
pub fn wake_worker() {
    if let Some(procno) = shmem::take_wake_up() {
        unsafe {
            let proc = (*pg_sys::ProcGlobal).allProcs.add(procno as usize);
            pg_sys::SetLatch(&mut (*proc).procLatch);
        }
    }
}

#[pg_guard]
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
    let stmt = (*pstmt).utilityStmt;
    if !stmt.is_null() && (*stmt).type_ == pg_sys::NodeTag::T_TransactionStmt {
        let kind = (*stmt.cast::<pg_sys::TransactionStmt>()).kind;
        if kind == pg_sys::TransactionStmtKind::TRANS_STMT_COMMIT_PREPARED {
            // The prepared transaction may hold events; its commit runs in this statement's
            // transaction, whose commit callback then wakes the worker.
            event_written();
        }
    }
    match PREV_PROCESS_UTILITY {
        Some(prev) => prev(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc),
        None => pg_sys::standard_ProcessUtility(
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
