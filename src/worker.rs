//! The worker: one per served database, started by the launcher. It relays the outbox to the
//! broker as a pipeline of two threads:
//!
//! - the main thread (the only one that may touch Postgres) repeats one short transaction:
//!   record the outcomes that came back (delete what the broker confirmed, count failed
//!   attempts, dead-letter exhausted events), then read the next rows in row order, leaving
//!   out those already handed over;
//! - a publishing session on the I/O thread publishes what it is handed, with at most
//!   `outbox.max_in_flight` messages unconfirmed, and sends back each message's outcome as
//!   soon as the broker's confirm arrives.
//!
//! So the database work of one batch overlaps the network work of the next, and the broker
//! always has messages in flight. A session ends when its channel or connection is lost;
//! what it left unsettled stays in the outbox and is read again, in order, for the next one.
//!
//! The worker sleeps on its latch when there is nothing to do; committing writers set the
//! latch, and the poll interval and retry times bound the sleep. Nothing it meets may end the
//! process: SQL errors abort the transaction and are retried, broker failures lead to
//! reconnecting with capped back-off, and each change of state is logged once.

use crate::store::{self, Failure, Schema};
use crate::{gucs, shmem, signals};
use pg_outbox_core::message::OrderingKey;
use pg_outbox_core::publisher::{Command, Outcome, Publisher, PublisherConfig, Report, SessionEnd};
use pg_outbox_core::retry::{Backoff, RetryDecision};
use pg_outbox_core::OutboxMessage;
use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys;
use pgrx::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;

pub const WORKER_TYPE: &str = "pg_outbox worker";
const RECONNECT_BACKOFF_BASE: Duration = Duration::from_millis(250);
/// Wait after a failed database step before trying again.
const DATABASE_RETRY: Duration = Duration::from_secs(1);
/// Longest wait for outcomes before looking around again (latch, settings, stop).
const OUTCOME_WAIT: Duration = Duration::from_millis(100);
/// Shortest time between two rounds when the last one had little to do (one commit, say):
/// bounds the worker's work under a high commit rate, at the price of this much latency.
const MIN_ROUND_SPACING: Duration = Duration::from_micros(500);
/// A round that handled fewer rows than this is light.
const LIGHT_ROUND_ROWS: usize = 16;
/// Longest wait for more outcomes once one has arrived.
const COALESCE: Duration = Duration::from_millis(5);
/// How often the floor may move (a few tiny queries each time).
const FLOOR_INTERVAL: Duration = Duration::from_millis(20);
/// Rows written around `outbox.publish` could hide below the floor: start it over this often.
const FLOOR_RESET_INTERVAL: Duration = Duration::from_secs(60);
/// An empty outbox whose files are larger than this is truncated.
const TRUNCATE_ABOVE_BYTES: i64 = 1024 * 1024;
const TRUNCATE_INTERVAL: Duration = Duration::from_secs(10);
/// On SIGTERM, how long to wait for confirms of what is in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_outbox_worker_main(arg: pg_sys::Datum) {
    signals::install();
    let database = pg_sys::Oid::from(arg.value() as u32);
    let role = BackgroundWorker::get_extra().parse::<u32>().ok().filter(|r| *r != 0).map(pg_sys::Oid::from);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(database), role);
    unsafe {
        pg_sys::before_shmem_exit(Some(on_exit), pg_sys::Datum::from(0));
        shmem::update_status(|s| {
            *s = shmem::WorkerStatus::default();
            s.pid = pg_sys::MyProcPid;
            s.database_oid = database.to_u32();
            s.started_at = pg_sys::GetCurrentTimestamp();
            s.set_state("starting");
        });
        shmem::set_worker_procno(Some((*pg_sys::MyProc).pgprocno));
    }
    let runtime = match signals::io_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            warning!("pg_outbox worker could not start its I/O runtime: {e}");
            return;
        }
    };
    // amqprs spawns tasks from Drop impls: they need a runtime context at all times.
    let _context = runtime.enter();
    let mut relay = Relay::new(&runtime);
    relay.run();
    relay.shutdown();
}

#[pg_guard]
unsafe extern "C-unwind" fn on_exit(_code: i32, _arg: pg_sys::Datum) {
    shmem::set_worker_procno(None);
    shmem::update_status(|s| {
        s.pid = 0;
        s.broker_connected = false;
        s.set_state("stopped");
    });
}

/// Anything about the database that keeps the worker from publishing, logged on change.
#[derive(Debug, Clone, PartialEq, Eq)]
enum DbState {
    Ready,
    NoExtension,
    OtherVersion(String),
    Busy,
    Failing(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum BrokerState {
    Unknown,
    Connected,
    Unavailable,
}

/// The broker side: no connection, a connection between sessions, or a session running.
enum Link {
    Down,
    Idle(Box<Publisher>),
    Running(Running),
}

struct Running {
    feed: UnboundedSender<Command>,
    reports: UnboundedReceiver<Report>,
    task: JoinHandle<(Publisher, SessionEnd)>,
}

/// A row handed to the publishing session whose outcome is not recorded yet.
struct InFlight {
    attempts: i32,
    key: Option<OrderingKey>,
}

/// What one database step found.
enum Step {
    Fetched { rows: Vec<OutboxMessage>, next_retry: Option<Duration> },
    Wait(DbState),
}

struct Relay<'rt> {
    runtime: &'rt Runtime,
    config: Option<PublisherConfig>,
    link: Link,
    backoff: Backoff,
    next_connect_at: Instant,
    in_flight: HashMap<i64, InFlight>,
    /// Outcomes received, recorded by the next database step.
    published: Vec<i64>,
    failures: Vec<Failure>,
    /// Aggregates whose failures are in `failures`: the session may let them go on once the
    /// failures are on record.
    failed_keys: Vec<OrderingKey>,
    /// Every row id at or below it is gone from the outbox; reads start above it.
    floor: i64,
    floor_candidate: Option<(i64, i64)>,
    floor_checked: Instant,
    floor_reset: Instant,
    truncate_checked: Instant,
    /// The last round handled few rows: pace the next one.
    last_round_light: bool,
    db_state: DbState,
    broker_state: BrokerState,
    /// Errors already logged since the last batch without failures.
    failures_logged: HashSet<String>,
    rng: StdRng,
}

impl<'rt> Relay<'rt> {
    fn new(runtime: &'rt Runtime) -> Self {
        let now = Instant::now();
        Relay {
            runtime,
            config: None,
            link: Link::Down,
            backoff: Backoff::new(RECONNECT_BACKOFF_BASE, gucs::reconnect_backoff_max()),
            next_connect_at: now,
            in_flight: HashMap::new(),
            published: Vec::new(),
            failures: Vec::new(),
            failed_keys: Vec::new(),
            floor: 0,
            floor_candidate: None,
            floor_checked: now,
            floor_reset: now,
            truncate_checked: now,
            last_round_light: false,
            db_state: DbState::Ready,
            broker_state: BrokerState::Unknown,
            failures_logged: HashSet::new(),
            rng: StdRng::from_entropy(),
        }
    }

    fn run(&mut self) {
        match in_transaction(store::configure_session) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warning!("pg_outbox worker could not configure its session: {e}"),
            Err(e) => warning!("pg_outbox worker could not configure its session: {e}"),
        }
        self.reload();
        let mut last_cycle = Instant::now();
        loop {
            if signals::stop_requested() {
                break;
            }
            if signals::take_reload() {
                unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
                self.reload();
            }
            // Commits wake the worker one by one; a busy server must not cost one round per
            // commit. After a light round, the next starts no sooner than `MIN_ROUND_SPACING`.
            if self.last_round_light {
                let since = last_cycle.elapsed();
                if since < MIN_ROUND_SPACING && !signals::wait(MIN_ROUND_SPACING - since) {
                    break;
                }
            }
            last_cycle = Instant::now();
            let pause = self.cycle();
            if pause.is_zero() {
                continue;
            }
            if !self.in_flight.is_empty() {
                self.wait_for_outcomes(pause.min(OUTCOME_WAIT));
            } else if !signals::wait(pause) {
                break;
            }
        }
    }

    /// On SIGTERM: let what is in flight be confirmed (briefly), record it, close.
    fn shutdown(&mut self) {
        if let Link::Running(running) = std::mem::replace(&mut self.link, Link::Down) {
            let Running { feed, mut reports, task } = running;
            drop(feed);
            let finished = self.runtime.block_on(tokio::time::timeout(SHUTDOWN_GRACE, task));
            while let Ok(r) = reports.try_recv() {
                self.take_report(r);
            }
            if let Ok(Ok((publisher, _))) = finished {
                self.runtime.block_on(publisher.close());
            }
            if !self.published.is_empty() || !self.failures.is_empty() {
                // Interrupts held: the pending SIGTERM must not cut this short.
                unsafe { pg_sys::InterruptHoldoffCount += 1 };
                let (published, failures) = (&self.published, &self.failures);
                let _ = in_transaction(AssertUnwindSafe(|| -> Result<(), pgrx::spi::SpiError> {
                    if store::schema()? == Schema::Ready {
                        store::record_outcomes(published, failures)?;
                    }
                    Ok(())
                }));
                unsafe { pg_sys::InterruptHoldoffCount -= 1 };
            }
        } else if let Link::Idle(publisher) = std::mem::replace(&mut self.link, Link::Down) {
            self.runtime.block_on(publisher.close());
        }
    }

    /// Rebuilds the broker settings; a change means a new connection.
    fn reload(&mut self) {
        self.backoff.set_max(gucs::reconnect_backoff_max());
        let config = gucs::amqp_url().map(|url| PublisherConfig {
            url,
            default_exchange: gucs::exchange(),
            declare_default_exchange: gucs::declare_exchange(),
            mandatory: gucs::unroutable_is_failure(),
            confirm_timeout: gucs::confirm_timeout(),
            max_in_flight: gucs::max_in_flight(),
            connection_name: format!("pg_outbox worker (pid {})", unsafe { pg_sys::MyProcPid }),
        });
        if config != self.config {
            if !matches!(self.link, Link::Down) {
                log!("pg_outbox: broker settings changed, reconnecting");
                self.end_link();
            }
            self.config = config;
            self.next_connect_at = Instant::now();
            self.backoff.reset();
        }
    }

    /// One round; returns how long to pause before the next (zero: go on at once).
    fn cycle(&mut self) -> Duration {
        self.collect_reports();
        self.check_session();
        let connected = self.ensure_session();
        let batch_size = gucs::batch_size();
        let room = (gucs::max_in_flight() + batch_size).saturating_sub(self.in_flight.len());
        // A small read while the session is busy only adds transactions.
        let fetch = connected && room >= batch_size.min(64);
        // Before the read's snapshot: a commit from now on either is seen by this read or wakes
        // the next wait. Without a read to do, commits have nothing to wake us for.
        if fetch {
            shmem::arm_wake_up();
        } else {
            shmem::disarm_wake_up();
        }
        let limit = room.min(batch_size);
        let published = std::mem::take(&mut self.published);
        let failures = std::mem::take(&mut self.failures);
        let failed_keys = std::mem::take(&mut self.failed_keys);
        let floor_due = self.floor_checked.elapsed() >= FLOOR_INTERVAL;
        if self.floor_reset.elapsed() >= FLOOR_RESET_INTERVAL {
            self.floor = 0;
            self.floor_candidate = None;
            self.floor_reset = Instant::now();
        }
        let (floor, candidate) = (self.floor, self.floor_candidate);
        let mut new_floor = (floor, candidate);
        let step = in_transaction(AssertUnwindSafe(|| -> Result<Step, pgrx::spi::SpiError> {
            match store::schema()? {
                Schema::Ready => {}
                Schema::Missing => return Ok(Step::Wait(DbState::NoExtension)),
                Schema::OtherVersion(v) => return Ok(Step::Wait(DbState::OtherVersion(v))),
                Schema::Busy => return Ok(Step::Wait(DbState::Busy)),
            }
            store::record_outcomes(&published, &failures)?;
            if floor_due {
                new_floor = match candidate {
                    None => (floor, Some(store::floor_candidate()?)),
                    Some(c) => match store::advance_floor(floor, c)? {
                        Some(f) => (f, None),
                        None => (floor, Some(c)),
                    },
                };
            }
            let in_flight = &self.in_flight;
            let rows = if fetch {
                store::read_batch(limit, new_floor.0, |id| in_flight.contains_key(&id), in_flight.len())?
            } else {
                Vec::new()
            };
            let next_retry = if rows.len() < limit { store::next_retry_in()? } else { None };
            Ok(Step::Fetched { rows, next_retry })
        }));
        let step = match step {
            Ok(Ok(step)) => step,
            Ok(Err(e)) => Step::Wait(DbState::Failing(e.to_string())),
            Err(e) => Step::Wait(DbState::Failing(e)),
        };
        let poll = gucs::poll_interval();
        match step {
            Step::Wait(state) => {
                let pause = match &state {
                    DbState::Failing(_) | DbState::Busy => {
                        // Keep the outcomes: they are recorded once the table is usable again.
                        self.published = published;
                        self.failures = failures;
                        self.failed_keys = failed_keys;
                        DATABASE_RETRY.min(poll)
                    }
                    // The table is gone (or not ours to write yet): so are the rows.
                    _ => {
                        self.floor = 0;
                        self.floor_candidate = None;
                        poll
                    }
                };
                self.set_db_state(state);
                pause
            }
            Step::Fetched { rows, next_retry } => {
                if floor_due {
                    self.floor_checked = Instant::now();
                }
                (self.floor, self.floor_candidate) = new_floor;
                self.set_db_state(DbState::Ready);
                self.note_recorded(&failures, published.len());
                let fetched = rows.len();
                self.last_round_light = fetched + published.len() + failures.len() < LIGHT_ROUND_ROWS;
                self.hand_over(rows, failed_keys);
                if fetched > 0 && fetched == limit {
                    return Duration::ZERO;
                }
                if fetched == 0 && self.in_flight.is_empty() {
                    self.maybe_truncate();
                }
                let mut pause = poll;
                if let Some(due) = next_retry {
                    pause = pause.min(due.max(Duration::from_millis(10)));
                }
                if !connected {
                    pause = pause.min(self.next_connect_at.saturating_duration_since(Instant::now()));
                }
                if !self.published.is_empty() || !self.failures.is_empty() {
                    // Outcomes arrived meanwhile: record them now.
                    pause = Duration::ZERO;
                }
                pause
            }
        }
    }

    /// Gives fetched rows to the session, after telling it which failures are on record.
    fn hand_over(&mut self, rows: Vec<OutboxMessage>, recorded_failures: Vec<OrderingKey>) {
        let Link::Running(running) = &self.link else {
            return;
        };
        if !recorded_failures.is_empty() {
            let _ = running.feed.send(Command::Release(recorded_failures));
        }
        if rows.is_empty() {
            return;
        }
        for m in &rows {
            self.in_flight.insert(m.row_id, InFlight { attempts: m.attempts, key: m.ordering_key() });
        }
        // If the session has just ended, these are never read: `check_session` then forgets
        // them, and they are read again from the outbox.
        let _ = running.feed.send(Command::Publish(rows));
    }

    /// Blocks until outcomes arrive (or `timeout`), without stopping the I/O thread. Under load
    /// it gathers a good share of what is in flight (for at most `COALESCE`), so that each
    /// transaction records many outcomes rather than one.
    fn wait_for_outcomes(&mut self, timeout: Duration) {
        let enough = (self.in_flight.len() / 4).clamp(1, gucs::batch_size());
        let received = match &mut self.link {
            Link::Running(running) => {
                let reports = &mut running.reports;
                self.runtime.block_on(async {
                    let mut got = Vec::new();
                    match tokio::time::timeout(timeout, reports.recv()).await {
                        Ok(Some(first)) => got.push(first),
                        _ => return got,
                    }
                    let until = tokio::time::Instant::now() + COALESCE;
                    while got.len() < enough {
                        match tokio::time::timeout_at(until, reports.recv()).await {
                            Ok(Some(r)) => got.push(r),
                            _ => break,
                        }
                    }
                    got
                })
            }
            _ => return,
        };
        for report in received {
            self.take_report(report);
        }
    }

    fn collect_reports(&mut self) {
        let mut got = Vec::new();
        if let Link::Running(running) = &mut self.link {
            while let Ok(r) = running.reports.try_recv() {
                got.push(r);
            }
        }
        for r in got {
            self.take_report(r);
        }
    }

    fn take_report(&mut self, report: Report) {
        let Some(row) = self.in_flight.remove(&report.row_id) else { return };
        match report.outcome {
            Outcome::Confirmed => self.published.push(report.row_id),
            Outcome::NotAttempted => {}
            Outcome::Failed { kind, reason } => {
                let failed_attempts = row.attempts.max(0) as u32 + 1;
                let retry_after = match gucs::retry_policy().decide_for(kind, failed_attempts, &mut self.rng)
                {
                    RetryDecision::DeadLetter => None,
                    RetryDecision::RetryAfter(d) => Some(d),
                };
                let error = format!("{}: {}", kind.as_str(), self.scrub(&reason));
                unsafe {
                    shmem::update_status(|s| {
                        s.failed_attempts_total += 1;
                        s.set_last_error(Some(&error));
                        s.last_error_at = pg_sys::GetCurrentTimestamp();
                    });
                }
                if let Some(k) = row.key {
                    self.failed_keys.push(k);
                }
                self.failures.push(Failure { row_id: report.row_id, error, retry_after });
            }
        }
    }

    /// Notices a session that ended; keeps the connection for the next one if it still works.
    fn check_session(&mut self) {
        let finished = matches!(&self.link, Link::Running(r) if r.task.is_finished());
        if !finished {
            return;
        }
        let Link::Running(Running { reports, task, .. }) = std::mem::replace(&mut self.link, Link::Down)
        else {
            unreachable!()
        };
        let mut reports = reports;
        let ended = self.runtime.block_on(task);
        while let Ok(r) = reports.try_recv() {
            self.take_report(r);
        }
        // Handed over but never read by the session: not attempted.
        self.in_flight.clear();
        let (publisher, end) = match ended {
            Ok((mut publisher, end)) => {
                let usable = publisher.is_connected();
                (usable.then_some(publisher), end)
            }
            Err(e) => (None, SessionEnd::ConnectionLost(format!("the publishing session failed: {e}"))),
        };
        match (publisher, end) {
            (Some(publisher), SessionEnd::ChannelLost(_) | SessionEnd::Finished) => {
                self.link = Link::Idle(Box::new(publisher));
            }
            (_, end) => {
                let reason = match end {
                    SessionEnd::ConnectionLost(r) | SessionEnd::ChannelLost(r) => r,
                    _ => "connection lost".into(),
                };
                self.broker_down(format!("lost the broker connection: {}", self.scrub(&reason)));
                // Reconnect at once: a broker restart is usually over by then; back-off follows.
                self.next_connect_at = Instant::now();
            }
        }
    }

    /// Connects when needed and the back-off allows, and starts a session; returns whether a
    /// session runs.
    fn ensure_session(&mut self) -> bool {
        if let Link::Running(_) = self.link {
            return true;
        }
        if let Link::Idle(p) = &mut self.link {
            if !p.is_connected() {
                self.link = Link::Down;
                self.broker_down("lost the broker connection".into());
                self.next_connect_at = Instant::now();
            }
        }
        if let Link::Down = self.link {
            match self.connect() {
                Some(publisher) => self.link = Link::Idle(Box::new(publisher)),
                None => return false,
            }
        }
        let Link::Idle(publisher) = std::mem::replace(&mut self.link, Link::Down) else { unreachable!() };
        let mut publisher = *publisher;
        let (feed, mut feed_rx) = unbounded_channel();
        let (reports_tx, reports) = unbounded_channel();
        let task = self.runtime.spawn(async move {
            let end = publisher.run_session(&mut feed_rx, &reports_tx).await;
            (publisher, end)
        });
        self.link = Link::Running(Running { feed, reports, task });
        true
    }

    fn connect(&mut self) -> Option<Publisher> {
        let Some(config) = self.config.clone() else {
            self.broker_down("outbox.amqp_url is not set".into());
            return None;
        };
        if Instant::now() < self.next_connect_at {
            return None;
        }
        let shown = config.url.to_string();
        let connected = self.runtime.block_on(async {
            tokio::select! {
                result = Publisher::connect(config) => Some(result),
                _ = signals::stop_requested_async() => None,
            }
        })?;
        match connected {
            Ok(publisher) => {
                if let Some(w) = &publisher.declare_warning {
                    warning!("pg_outbox: {}", self.scrub(w));
                }
                self.backoff.reset();
                if self.broker_state != BrokerState::Connected {
                    log!("pg_outbox: connected to {shown}");
                }
                self.broker_state = BrokerState::Connected;
                shmem::update_status(|s| {
                    s.broker_connected = true;
                    s.set_state("running");
                });
                Some(publisher)
            }
            Err(e) => {
                let delay = self.backoff.next_delay(&mut self.rng);
                self.next_connect_at = Instant::now() + delay;
                self.broker_down(self.scrub(&e.to_string()));
                None
            }
        }
    }

    /// Ends the session and the connection (settings changed).
    fn end_link(&mut self) {
        self.shutdown();
        self.in_flight.clear();
        self.link = Link::Down;
    }

    fn maybe_truncate(&mut self) {
        if self.truncate_checked.elapsed() < TRUNCATE_INTERVAL {
            return;
        }
        self.truncate_checked = Instant::now();
        match in_transaction(|| store::truncate_if_empty(TRUNCATE_ABOVE_BYTES)) {
            Ok(Ok(true)) => debug1!("pg_outbox: truncated the empty outbox to give its space back"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => debug1!("pg_outbox: could not truncate the empty outbox: {e}"),
            Err(e) => debug1!("pg_outbox: could not truncate the empty outbox: {e}"),
        }
    }

    /// Counts what the database recorded; logs failed attempts once per distinct error, and
    /// each dead letter.
    fn note_recorded(&mut self, failures: &[Failure], published: usize) {
        if published > 0 {
            unsafe {
                shmem::update_status(|s| {
                    s.published_total += published as i64;
                    s.last_publish_at = pg_sys::GetCurrentTimestamp();
                });
            }
        }
        let mut dead = 0;
        if failures.is_empty() && published > 0 {
            self.failures_logged.clear();
        }
        for f in failures {
            if f.retry_after.is_none() {
                dead += 1;
                warning!(
                    "pg_outbox: event (row {}) moved to outbox.dead_letters after its last attempt: {}",
                    f.row_id,
                    f.error
                );
            } else if self.failures_logged.len() < 100 && self.failures_logged.insert(f.error.clone()) {
                log!("pg_outbox: publishing failed, will retry: {}", f.error);
            }
        }
        if dead > 0 {
            shmem::update_status(|s| s.dead_lettered_total += dead);
        }
    }

    fn broker_down(&mut self, reason: String) {
        if self.broker_state != BrokerState::Unavailable {
            warning!("pg_outbox: broker unavailable, retrying with back-off: {reason}");
        }
        self.broker_state = BrokerState::Unavailable;
        unsafe {
            shmem::update_status(|s| {
                s.broker_connected = false;
                s.set_state("waiting for broker");
                s.set_last_error(Some(&reason));
                s.last_error_at = pg_sys::GetCurrentTimestamp();
            });
        }
    }

    fn set_db_state(&mut self, state: DbState) {
        if state == self.db_state {
            return;
        }
        match &state {
            DbState::Ready => log!("pg_outbox: outbox ready, publishing"),
            DbState::NoExtension => log!("pg_outbox: waiting for CREATE EXTENSION pg_outbox in this database"),
            DbState::OtherVersion(v) => warning!(
                "pg_outbox: the extension is at version {v} but the library is {}; run ALTER EXTENSION pg_outbox UPDATE",
                store::SCHEMA_VERSION
            ),
            DbState::Busy => {}
            DbState::Failing(e) => warning!("pg_outbox: database step failed, retrying: {e}"),
        }
        let (label, error) = match &state {
            DbState::Ready => (None, None),
            DbState::NoExtension => (Some("waiting for extension"), None),
            DbState::OtherVersion(_) => (Some("waiting for extension update"), None),
            DbState::Busy => (None, None),
            DbState::Failing(e) => (Some("database error"), Some(e.clone())),
        };
        let connected = self.broker_state == BrokerState::Connected;
        unsafe {
            shmem::update_status(|s| {
                match label {
                    Some(l) => s.set_state(l),
                    None if connected => s.set_state("running"),
                    None => {}
                }
                if let Some(e) = &error {
                    s.set_last_error(Some(e));
                    s.last_error_at = pg_sys::GetCurrentTimestamp();
                }
            });
        }
        if state != DbState::Busy {
            self.db_state = state;
        }
    }

    fn scrub(&self, text: &str) -> String {
        match &self.config {
            Some(c) => c.url.scrub(text),
            None => text.to_string(),
        }
    }
}

/// Runs `f` in a transaction of its own. An error (or a panic) aborts the transaction and
/// comes back as its message; the process goes on.
fn in_transaction<R>(f: impl FnOnce() -> R + std::panic::UnwindSafe) -> Result<R, String> {
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    PgTryBuilder::new(|| {
        let r = f();
        unsafe {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        }
        Ok(r)
    })
    .catch_others(|e| {
        let message = match &e {
            pg_sys::panic::CaughtError::PostgresError(r) | pg_sys::panic::CaughtError::ErrorReport(r) => {
                format!("{} (SQLSTATE {:?})", r.message(), r.sql_error_code())
            }
            pg_sys::panic::CaughtError::RustPanic { ereport, .. } => {
                format!("internal error: {}", ereport.message())
            }
        };
        unsafe { pg_sys::AbortCurrentTransaction() };
        Err(message)
    })
    .execute()
}
