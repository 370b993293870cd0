//! The worker: one per served database, started by the launcher. It relays the outbox to the
//! broker as a pipeline of two threads:
//!
//! - the main thread (the only one that may touch Postgres) repeats a *round* ([`round`]):
//!   record the outcomes that came back, move the floor, read the next rows, make them
//!   durable, hand them over;
//! - publishing sessions on the I/O thread ([`link`], `outbox.publishers` of them, an aggregate
//!   always through the same one) publish what they are handed, with at most
//!   `outbox.max_in_flight` messages unconfirmed each, and send back each message's outcome
//!   as soon as the broker's confirm arrives.
//!
//! The pieces, each its own state machine: [`link`] (the broker connections, the node in
//! use) and [`reconnect`] (its back-off),
//! [`ledger`] (what is in flight and what came back), [`floor`] (where reads start), [`table`]
//! (which outbox, which generation), [`store`] (the SQL), `crate::durability` (no event before its transaction is durable), [`session`] (the
//! database session's role and pinned settings), [`settings`], [`status`] and [`txn`]; the
//! [`state`] they make up between rounds.
//!
//! Nothing it meets may end the process: SQL errors abort the round's transaction and are
//! retried, broker failures lead to reconnecting with back-off, a panic in a round is caught
//! and the round starts over, and each change of state is logged once.

mod floor;
mod inbox;
mod ledger;
mod link;
mod reconnect;
mod round;
mod session;
mod settings;
mod state;
mod status;
mod store;
mod stream;
mod table;
mod txn;

use crate::{signals, wake};
use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;
use state::Worker;
use status::Status;

pub const WORKER_TYPE: &str = "pg_outbox worker";

/// The launcher's `bgw_extra`: the worker's status slot, then the role's oid and whether it
/// may log in, or "0".
pub fn worker_argument(slot: usize, role: Option<(pg_sys::Oid, bool)>) -> String {
    match role {
        Some((oid, login)) => format!("{slot}/{}:{}", oid.to_u32(), u8::from(login)),
        None => format!("{slot}/0"),
    }
}

fn parse_worker_argument(extra: &str) -> (Option<usize>, Option<(pg_sys::Oid, bool)>) {
    let (slot, role) = extra.split_once('/').unwrap_or(("", extra));
    let slot = slot.parse::<usize>().ok().filter(|s| *s < crate::shmem::MAX_DATABASES);
    let role = role.split_once(':').and_then(|(oid, login)| {
        let oid = oid.parse::<u32>().ok().filter(|o| *o != 0)?;
        Some((pg_sys::Oid::from(oid), login == "1"))
    });
    (slot, role)
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_outbox_worker_main(arg: pg_sys::Datum) {
    signals::install();
    let database = pg_sys::Oid::from(arg.value() as u32);
    let (slot, role) = parse_worker_argument(BackgroundWorker::get_extra());
    let Some(slot) = slot else {
        warning!("pg_outbox worker started without a status slot; stopping");
        return;
    };
    crate::shmem::set_my_slot(slot);
    session::connect(database, role);
    if !crate::database::serve_alone() {
        log!("pg_outbox: another worker serves this database; this one stops");
        return;
    }
    session::pin();
    // SAFETY: registered once; `on_exit` only touches shared memory we own.
    unsafe { pg_sys::before_shmem_exit(Some(on_exit), pg_sys::Datum::from(0)) };
    let status = Status::starting(database);
    wake::register_worker(Some(wake::my_procno()));
    let runtime = match signals::io_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            warning!("pg_outbox worker could not start its I/O runtime: {e}");
            return;
        }
    };
    // amqprs spawns tasks from Drop impls: they need a runtime context at all times.
    let _context = runtime.enter();
    let mut worker = Worker::new(&runtime, status);
    run(&mut worker);
    worker.shutdown();
}

/// The main loop: settings, pace, a round, a pause; until SIGTERM, or until a command needs
/// the database to itself.
fn run(worker: &mut Worker<'_>) {
    loop {
        if signals::stop_requested() || worker.must_leave() {
            break;
        }
        if signals::take_reload() {
            worker.reload();
        }
        if !worker.pace() {
            break;
        }
        let pause = round::run_caught(worker);
        if !worker.pause(pause) {
            break;
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_exit(_code: i32, _arg: pg_sys::Datum) {
    wake::register_worker(None);
    Status::stopped();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slot_and_role_travel_with_the_login_flag() {
        let role = Some((pg_sys::Oid::from(16384), false));
        assert_eq!(parse_worker_argument(&worker_argument(3, role)), (Some(3), role));
        let role = Some((pg_sys::Oid::from(10), true));
        assert_eq!(parse_worker_argument(&worker_argument(0, role)), (Some(0), role));
        assert_eq!(parse_worker_argument(&worker_argument(63, None)), (Some(63), None));
        assert_eq!(parse_worker_argument("garbage"), (None, None));
        assert_eq!(parse_worker_argument("64/0"), (None, None), "no such slot");
    }
}
