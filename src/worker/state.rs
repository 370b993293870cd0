//! The worker's state between rounds: its settings, the broker link, the ledger, the floor,
//! what it has told the world; and what it does between rounds (pacing, waiting for
//! outcomes, reloading settings, shutting down).

use super::floor::Floor;
use super::inbox::Cleanup;
use super::ledger::Ledger;
use super::link::Link;
use super::settings::Settings;
use super::status::Status;
use super::store;
use super::stream::Streams;
use super::table::{self, Generation, Table};
use super::txn;
use crate::signals;
use pg_outbox_core::outcome::{Outcome, Report};
use pgrx::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

/// On SIGTERM or new broker settings, how long to wait for confirms of what is in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Shortest time between two rounds when the last one had little to do (one commit, say):
/// bounds the worker's work under a high commit rate, at the price of this much latency.
const MIN_ROUND_SPACING: Duration = Duration::from_micros(500);
/// Longest wait for outcomes before looking around again (latch, settings, stop).
const OUTCOME_WAIT: Duration = Duration::from_millis(100);
/// How often the worker looks whether a command needs its database to itself (such a command
/// waits five seconds for other sessions to leave).
const LEAVE_CHECK: Duration = Duration::from_millis(250);

pub struct Worker<'rt> {
    pub(super) settings: Settings,
    pub(super) link: Link<'rt>,
    /// The stream path's lanes.
    pub(super) streams: Streams<'rt>,
    pub(super) ledger: Ledger<Generation>,
    pub(super) floor: Floor,
    pub(super) status: Status,
    pub(super) rng: StdRng,
    /// Rows read per round at most: the batch size, halved after a round that timed out.
    pub(super) read_limit: usize,
    /// The last round handled few rows: pace the next one.
    pub(super) last_round_light: bool,
    pub(super) last_round_at: Instant,
    pub(super) truncate_checked: Instant,
    /// When the inbox's expired claims were last removed.
    pub(super) inbox: Cleanup,
    leave_checked: Instant,
}

impl<'rt> Worker<'rt> {
    pub(super) fn new(runtime: &'rt Runtime, status: Status) -> Self {
        let settings = Settings::read();
        let now = Instant::now();
        Worker {
            link: Link::new(runtime, settings.reconnect_backoff_max),
            streams: Streams::new(runtime),
            read_limit: settings.batch_size,
            settings,
            ledger: Ledger::default(),
            floor: Floor::new(now),
            status,
            rng: StdRng::from_entropy(),
            last_round_light: false,
            last_round_at: now,
            truncate_checked: now,
            inbox: Cleanup::default(),
            leave_checked: now,
        }
    }

    /// Commits wake the worker one by one; a busy server must not cost one round per commit:
    /// after a light round, the next starts no sooner than `MIN_ROUND_SPACING`. False: stop.
    pub(super) fn pace(&mut self) -> bool {
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
    pub(super) fn pause(&mut self, pause: Duration) -> bool {
        if pause.is_zero() {
            return true;
        }
        if self.ledger.in_flight() == 0 && self.streams.expecting_reports() {
            self.streams.wait_for_reports(pause.min(OUTCOME_WAIT));
            return true;
        }
        if self.ledger.in_flight() == 0 {
            // On the latch, looking now and then whether the database is wanted.
            let until = Instant::now() + pause;
            loop {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return true;
                }
                match signals::wait_woken(left.min(LEAVE_CHECK)) {
                    None => return false,
                    Some(true) => return true,
                    Some(false) if self.must_leave() => return false,
                    Some(false) => {}
                }
            }
        }
        let enough = (self.ledger.in_flight() / 4).clamp(1, self.settings.batch_size);
        let reports = self.link.wait_for_reports(pause.min(OUTCOME_WAIT), enough);
        self.take_reports(reports);
        true
    }

    pub(super) fn take_reports(&mut self, reports: Vec<Report>) {
        for report in reports {
            let kind = match &report.outcome {
                Outcome::Failed { kind, .. } => Some(kind.as_str()),
                _ => None,
            };
            let settings = &self.settings;
            // SAFETY: reads the clock.
            let now = unsafe { pg_sys::GetCurrentTimestamp() };
            if let Some((error, exchange)) =
                self.ledger.take_report(report, now, &settings.retry, &mut self.rng, |t| settings.scrub(t))
            {
                let exchange = exchange.as_deref().unwrap_or(&settings.default_exchange);
                self.status.failed_attempt(kind.unwrap_or("failed"), &error, exchange);
            }
        }
        self.status.in_flight(self.ledger.in_flight());
    }

    /// Whether a command needs the worker's database to itself (DROP DATABASE, say): then
    /// the worker leaves, and the launcher waits for the command to finish.
    pub(super) fn must_leave(&mut self) -> bool {
        if self.leave_checked.elapsed() < LEAVE_CHECK {
            return false;
        }
        self.leave_checked = Instant::now();
        // SAFETY: reads this process' database.
        let database = unsafe { pg_sys::MyDatabaseId };
        if !crate::database::wanted_alone(database) {
            return false;
        }
        log!("pg_outbox: a command needs this database to itself (DROP, RENAME, a copy); the worker leaves");
        true
    }

    /// Reads the settings again; new broker settings mean a new connection (what is in flight
    /// gets a moment to be confirmed; its outcomes are recorded by the next round).
    pub(super) fn reload(&mut self) {
        // SAFETY: the worker's main thread, between rounds.
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        let settings = Settings::read();
        self.link.reconnect.set_max(settings.reconnect_backoff_max);
        let broker_changed = settings.publisher != self.settings.publisher
            || settings.nodes != self.settings.nodes
            || settings.publishers != self.settings.publishers;
        if broker_changed {
            if self.link.is_running() {
                log!("pg_outbox: broker settings changed, reconnecting");
            }
            let last = self.link.close(SHUTDOWN_GRACE);
            self.take_reports(last);
            self.ledger.all_sessions_ended();
            self.link.restart(settings.reconnect_backoff_max);
            self.status.broker_settings_changed();
        }
        if settings.stream != self.settings.stream {
            self.streams.abandon();
        }
        self.read_limit = settings.batch_size;
        self.settings = settings;
    }

    /// On SIGTERM: let what is in flight be confirmed (briefly), record it, close.
    pub(super) fn shutdown(&mut self) {
        // What is in flight on a stream is settled by the next worker's recovery.
        self.streams.abandon();
        let last = self.link.close(SHUTDOWN_GRACE);
        self.take_reports(last);
        if self.ledger.has_outcomes() {
            // The SIGTERM that brought us here is set aside while the outcomes are recorded,
            // so that it does not cut the recording short; the statement and lock timeouts
            // still bound it, and another SIGTERM ends it.
            // SAFETY: flags of the main thread's interrupt handling, restored below.
            let pending = unsafe { std::ptr::replace(&raw mut pg_sys::ProcDiePending, 0) };
            self.record_on_exit();
            // SAFETY: as above.
            unsafe {
                if pending != 0 {
                    pg_sys::ProcDiePending = pending;
                    pg_sys::InterruptPending = 1;
                }
            }
        }
    }

    /// On exit: records what came back, if the table is still the one it is about.
    fn record_on_exit(&mut self) {
        let outcomes = self.ledger.take_outcomes();
        let expected = self.ledger.generation();
        let recorded = txn::in_transaction(AssertUnwindSafe(|| match table::table()? {
            Table::Ready(g) if Some(g) == expected => store::record_outcomes(&outcomes).map(|_| true),
            _ => Ok(false),
        }));
        if let Ok(true) = recorded {
            self.status.recorded(&outcomes, &self.settings.default_exchange);
        }
    }
}
