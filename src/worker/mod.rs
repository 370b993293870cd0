//! The worker: one per served database, started by the launcher. It relays the outbox to the
//! broker as a pipeline of two threads:
//!
//! - the main thread (the only one that may touch Postgres) repeats a *round* ([`round`]):
//!   record the outcomes that came back, move the floor, read the next rows, make them
//!   durable, hand them over;
//! - a publishing session on the I/O thread ([`link`]) publishes what it is handed, with at
//!   most `outbox.max_in_flight` messages unconfirmed, and sends back each message's outcome as
//!   soon as the broker's confirm arrives.
//!
//! The pieces, each its own state machine: [`link`] (the broker connection and its back-off),
//! [`ledger`] (what is in flight and what came back), [`floor`] (where reads start), [`store`]
//! (the SQL), [`durability`] (no event before its transaction is durable), [`session`] (the
//! database session's role and pinned settings), [`settings`], [`status`] and [`txn`].
//!
//! Nothing it meets may end the process: SQL errors abort the round's transaction and are
//! retried, broker failures lead to reconnecting with back-off, a panic in a round is caught
//! and the round starts over, and each change of state is logged once.

mod durability;
mod floor;
mod ledger;
mod link;
mod round;
mod session;
mod settings;
mod status;
mod store;
mod txn;

use crate::{signals, wake};
use floor::Floor;
use ledger::Ledger;
use link::Link;
use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use settings::Settings;
use status::Status;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};
use store::Generation;
use tokio::runtime::Runtime;

pub const WORKER_TYPE: &str = "pg_outbox worker";
/// On SIGTERM or new broker settings, how long to wait for confirms of what is in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Shortest time between two rounds when the last one had little to do (one commit, say):
/// bounds the worker's work under a high commit rate, at the price of this much latency.
const MIN_ROUND_SPACING: Duration = Duration::from_micros(500);
/// Longest wait for outcomes before looking around again (latch, settings, stop).
const OUTCOME_WAIT: Duration = Duration::from_millis(100);
/// Wait after a round that failed (or panicked) before the next.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// The launcher's `bgw_extra`: the role's oid and whether it may log in, or "0".
pub fn role_argument(role: Option<(pg_sys::Oid, bool)>) -> String {
    match role {
        Some((oid, login)) => format!("{}:{}", oid.to_u32(), u8::from(login)),
        None => "0".into(),
    }
}

fn parse_role_argument(extra: &str) -> Option<(pg_sys::Oid, bool)> {
    let (oid, login) = extra.split_once(':')?;
    let oid = oid.parse::<u32>().ok().filter(|o| *o != 0)?;
    Some((pg_sys::Oid::from(oid), login == "1"))
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_outbox_worker_main(arg: pg_sys::Datum) {
    signals::install();
    let database = pg_sys::Oid::from(arg.value() as u32);
    session::connect(database, parse_role_argument(BackgroundWorker::get_extra()));
    session::pin();
    // SAFETY: registered once; `on_exit` only touches shared memory we own.
    unsafe { pg_sys::before_shmem_exit(Some(on_exit), pg_sys::Datum::from(0)) };
    let status = Status::starting(database);
    // SAFETY: MyProc is this process' PGPROC, set up by the connection above.
    wake::register_worker(Some(unsafe { (*pg_sys::MyProc).pgprocno }));
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
    worker.run();
    worker.shutdown();
}

#[pg_guard]
unsafe extern "C-unwind" fn on_exit(_code: i32, _arg: pg_sys::Datum) {
    wake::register_worker(None);
    Status::stopped();
}

pub struct Worker<'rt> {
    settings: Settings,
    link: Link<'rt>,
    ledger: Ledger<Generation>,
    floor: Floor,
    status: Status,
    rng: StdRng,
    /// Rows read per round at most: the batch size, halved after a round that timed out.
    read_limit: usize,
    /// The last round handled few rows: pace the next one.
    last_round_light: bool,
    last_round_at: Instant,
    truncate_checked: Instant,
}

impl<'rt> Worker<'rt> {
    fn new(runtime: &'rt Runtime, status: Status) -> Self {
        let settings = Settings::read();
        let now = Instant::now();
        Worker {
            link: Link::new(runtime, settings.reconnect_backoff_max),
            read_limit: settings.batch_size,
            settings,
            ledger: Ledger::default(),
            floor: Floor::new(now),
            status,
            rng: StdRng::from_entropy(),
            last_round_light: false,
            last_round_at: now,
            truncate_checked: now,
        }
    }

    /// The main loop.
    fn run(&mut self) {
        loop {
            if signals::stop_requested() {
                break;
            }
            if signals::take_reload() {
                self.reload();
            }
            if !self.pace() {
                break;
            }
            let pause = self.round_caught();
            if !self.pause(pause) {
                break;
            }
        }
    }

    /// One round; a panic in it is logged and the round's state starts over.
    fn round_caught(&mut self) -> Duration {
        match std::panic::catch_unwind(AssertUnwindSafe(|| round::run(self))) {
            Ok(pause) => pause,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                warning!("pg_outbox: internal error in the worker, starting its round over: {what}");
                self.ledger.clear();
                self.link.abandon_session(self.settings.reconnect_backoff_max);
                self.floor.reset(Instant::now());
                RETRY_PAUSE
            }
        }
    }

    /// Commits wake the worker one by one; a busy server must not cost one round per commit:
    /// after a light round, the next starts no sooner than `MIN_ROUND_SPACING`. False: stop.
    fn pace(&mut self) -> bool {
        if self.last_round_light {
            let since = self.last_round_at.elapsed();
            if since < MIN_ROUND_SPACING && !signals::wait(MIN_ROUND_SPACING - since) {
                return false;
            }
        }
        self.last_round_at = Instant::now();
        true
    }

    /// Waits before the next round: for outcomes while messages are in flight, else on the
    /// latch (commits, signals). False: stop.
    fn pause(&mut self, pause: Duration) -> bool {
        if pause.is_zero() {
            return true;
        }
        if self.ledger.in_flight() == 0 {
            return signals::wait(pause);
        }
        let enough = (self.ledger.in_flight() / 4).clamp(1, self.settings.batch_size);
        let reports = self.link.wait_for_reports(pause.min(OUTCOME_WAIT), enough);
        self.take_reports(reports);
        true
    }

    fn take_reports(&mut self, reports: Vec<pg_outbox_core::outcome::Report>) {
        for report in reports {
            let kind = match &report.outcome {
                pg_outbox_core::outcome::Outcome::Failed { kind, .. } => Some(kind.as_str()),
                _ => None,
            };
            let settings = &self.settings;
            if let Some(error) =
                self.ledger.take_report(report, &settings.retry, &mut self.rng, |t| settings.scrub(t))
            {
                self.status.failed_attempt(kind.unwrap_or("failed"), &error);
            }
        }
    }

    /// Reads the settings again; new broker settings mean a new connection (what is in flight
    /// gets a moment to be confirmed; its outcomes are recorded by the next round).
    fn reload(&mut self) {
        // SAFETY: the worker's main thread, between rounds.
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        let settings = Settings::read();
        self.link.reconnect.set_max(settings.reconnect_backoff_max);
        if settings.publisher != self.settings.publisher {
            if self.link.is_running() {
                log!("pg_outbox: broker settings changed, reconnecting");
            }
            let last = self.link.close(SHUTDOWN_GRACE);
            self.take_reports(last);
            self.ledger.session_ended();
            self.link.reconnect.restart(settings.reconnect_backoff_max, Instant::now());
        }
        self.read_limit = settings.batch_size;
        self.settings = settings;
    }

    /// On SIGTERM: let what is in flight be confirmed (briefly), record it, close.
    fn shutdown(&mut self) {
        let last = self.link.close(SHUTDOWN_GRACE);
        self.take_reports(last);
        if self.ledger.has_outcomes() {
            // Interrupts held: the pending SIGTERM must not cut the recording short.
            // SAFETY: paired with the decrement below; nothing in between returns early.
            unsafe { pg_sys::InterruptHoldoffCount += 1 };
            round::record_on_exit(self);
            // SAFETY: see above.
            unsafe { pg_sys::InterruptHoldoffCount -= 1 };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_role_travels_with_its_login_flag() {
        let role = Some((pg_sys::Oid::from(16384), false));
        assert_eq!(parse_role_argument(&role_argument(role)), role);
        let role = Some((pg_sys::Oid::from(10), true));
        assert_eq!(parse_role_argument(&role_argument(role)), role);
        assert_eq!(parse_role_argument(&role_argument(None)), None);
        assert_eq!(parse_role_argument("garbage"), None);
    }
}
