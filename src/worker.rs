//! The worker: one per served database, started by the launcher. It drains the outbox to the
//! broker in cycles:
//!
//! 1. one transaction: record what happened to the previous batch (delete what the broker
//!    confirmed, count failed attempts, dead-letter exhausted events), read the next batch;
//! 2. outside any transaction: publish the batch and wait for every confirm.
//!
//! It sleeps on its latch when there is nothing to do; committing writers set the latch, and
//! the poll interval and retry times bound the sleep. Nothing it meets may end the process:
//! SQL errors abort the transaction and are retried, broker failures lead to reconnecting with
//! capped back-off, and each change of state is logged once.

use crate::store::{self, Failure, Schema};
use crate::{gucs, shmem, signals};
use pg_outbox_core::publisher::{BatchReport, Outcome, Publisher, PublisherConfig};
use pg_outbox_core::retry::{Backoff, RetryDecision};
use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys;
use pgrx::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

pub const WORKER_TYPE: &str = "pg_outbox worker";
const RECONNECT_BACKOFF_BASE: Duration = Duration::from_millis(250);
/// Wait after a failed database step before trying again.
const DATABASE_RETRY: Duration = Duration::from_secs(1);

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

/// What the database step found to do.
enum Step {
    Publish(Vec<pg_outbox_core::OutboxMessage>),
    /// Nothing to publish; the earliest retry is due in this long, if any waits.
    Idle(Option<Duration>),
    Wait(DbState),
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

struct Relay<'rt> {
    runtime: &'rt Runtime,
    config: Option<PublisherConfig>,
    publisher: Option<Publisher>,
    backoff: Backoff,
    next_connect_at: Instant,
    /// Outcomes of the last batch, recorded by the next database step.
    published: Vec<i64>,
    failures: Vec<Failure>,
    db_state: DbState,
    broker_state: BrokerState,
    /// Errors already logged since the last batch without failures.
    failures_logged: std::collections::HashSet<String>,
    rng: StdRng,
}

impl<'rt> Relay<'rt> {
    fn new(runtime: &'rt Runtime) -> Self {
        Relay {
            runtime,
            config: None,
            publisher: None,
            backoff: Backoff::new(RECONNECT_BACKOFF_BASE, gucs::reconnect_backoff_max()),
            next_connect_at: Instant::now(),
            published: Vec::new(),
            failures: Vec::new(),
            db_state: DbState::Ready,
            broker_state: BrokerState::Unknown,
            failures_logged: Default::default(),
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
        loop {
            if signals::stop_requested() {
                break;
            }
            if signals::take_reload() {
                unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
                self.reload();
            }
            let pause = self.cycle();
            if !pause.is_zero() && !signals::wait(pause) {
                break;
            }
        }
    }

    fn shutdown(&mut self) {
        if let Some(p) = self.publisher.take() {
            self.runtime.block_on(p.close());
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
            if self.publisher.is_some() {
                log!("pg_outbox: broker settings changed, reconnecting");
                self.shutdown();
            }
            self.config = config;
            self.next_connect_at = Instant::now();
            self.backoff.reset();
        }
    }

    /// One round; returns how long to sleep before the next (zero: go on at once).
    fn cycle(&mut self) -> Duration {
        let connected = self.ensure_connected();
        let batch_size = gucs::batch_size();
        let published = std::mem::take(&mut self.published);
        let failures = std::mem::take(&mut self.failures);
        let step = in_transaction(AssertUnwindSafe(|| -> Result<Step, pgrx::spi::SpiError> {
            match store::schema()? {
                Schema::Ready => {}
                Schema::Missing => return Ok(Step::Wait(DbState::NoExtension)),
                Schema::OtherVersion(v) => return Ok(Step::Wait(DbState::OtherVersion(v))),
                Schema::Busy => return Ok(Step::Wait(DbState::Busy)),
            }
            store::delete_published(published.clone())?;
            store::record_failures(&failures)?;
            if !connected {
                return Ok(Step::Idle(None));
            }
            let batch = store::read_batch(batch_size)?;
            if batch.is_empty() {
                Ok(Step::Idle(store::next_retry_in()?))
            } else {
                Ok(Step::Publish(batch))
            }
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
                        DATABASE_RETRY.min(poll)
                    }
                    // The table is gone (or not ours to write yet): so are the rows.
                    _ => poll,
                };
                self.set_db_state(state);
                pause
            }
            Step::Idle(next_retry) => {
                self.set_db_state(DbState::Ready);
                self.note_failures_recorded(&failures, !published.is_empty());
                let mut pause = poll;
                if let Some(due) = next_retry {
                    pause = pause.min(due.max(Duration::from_millis(10)));
                }
                if !connected {
                    pause = pause.min(self.next_connect_at.saturating_duration_since(Instant::now()));
                }
                pause
            }
            Step::Publish(batch) => {
                self.set_db_state(DbState::Ready);
                self.note_failures_recorded(&failures, !published.is_empty());
                self.publish(batch);
                Duration::ZERO
            }
        }
    }

    fn publish(&mut self, batch: Vec<pg_outbox_core::OutboxMessage>) {
        let Some(publisher) = self.publisher.as_mut() else { return };
        let rows: Vec<(i64, i32)> = batch.iter().map(|m| (m.row_id, m.attempts)).collect();
        let stop = || signals::stop_requested();
        let report: BatchReport = self.runtime.block_on(publisher.publish_batch(batch, &stop));
        let policy = gucs::retry_policy();
        let mut newest_error = None;
        for ((row_id, attempts), outcome) in rows.into_iter().zip(report.outcomes.iter()) {
            match outcome {
                Outcome::Confirmed => self.published.push(row_id),
                Outcome::NotAttempted => {}
                Outcome::Failed { kind, reason } => {
                    let failed_attempts = attempts.max(0) as u32 + 1;
                    let retry_after = match policy.decide_for(*kind, failed_attempts, &mut self.rng) {
                        RetryDecision::DeadLetter => None,
                        RetryDecision::RetryAfter(d) => Some(d),
                    };
                    let error = format!("{}: {}", kind.as_str(), self.scrub(reason));
                    newest_error = Some(error.clone());
                    self.failures.push(Failure { row_id, error, retry_after });
                }
            }
        }
        let confirmed = self.published.len() as i64;
        unsafe {
            shmem::update_status(|s| {
                s.published_total += confirmed;
                s.failed_attempts_total += self.failures.len() as i64;
                if confirmed > 0 {
                    s.last_publish_at = pg_sys::GetCurrentTimestamp();
                }
                if let Some(e) = &newest_error {
                    s.set_last_error(Some(e));
                    s.last_error_at = pg_sys::GetCurrentTimestamp();
                }
            });
        }
        if let Some(reason) = report.connection_lost {
            let reason = self.scrub(&reason);
            self.publisher = None;
            self.broker_down(format!("lost the broker connection: {reason}"));
            // Reconnect at once: a broker restart is usually over by then; back-off follows.
            self.next_connect_at = Instant::now();
        }
    }

    /// Logs failed attempts once per distinct error, and each dead letter, after the database
    /// has recorded them.
    fn note_failures_recorded(&mut self, failures: &[Failure], some_published: bool) {
        let mut dead = 0;
        if failures.is_empty() && some_published {
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

    /// Connects when not connected and the back-off allows; returns whether connected.
    fn ensure_connected(&mut self) -> bool {
        if let Some(p) = self.publisher.as_mut() {
            if p.is_connected() {
                return true;
            }
            self.publisher = None;
            self.broker_down("lost the broker connection".into());
            self.next_connect_at = Instant::now();
        }
        let Some(config) = self.config.clone() else {
            self.broker_down("outbox.amqp_url is not set".into());
            return false;
        };
        if Instant::now() < self.next_connect_at {
            return false;
        }
        let shown = config.url.to_string();
        let connected = self.runtime.block_on(async {
            tokio::select! {
                result = Publisher::connect(config) => Some(result),
                _ = signals::stop_requested_async() => None,
            }
        });
        let Some(connected) = connected else { return false };
        match connected {
            Ok(publisher) => {
                if let Some(w) = &publisher.declare_warning {
                    warning!("pg_outbox: {}", self.scrub(w));
                }
                self.publisher = Some(publisher);
                self.backoff.reset();
                if self.broker_state != BrokerState::Connected {
                    log!("pg_outbox: connected to {shown}");
                }
                self.broker_state = BrokerState::Connected;
                shmem::update_status(|s| {
                    s.broker_connected = true;
                    s.set_state("running");
                });
                true
            }
            Err(e) => {
                let delay = self.backoff.next_delay(&mut self.rng);
                self.next_connect_at = Instant::now() + delay;
                self.broker_down(self.scrub(&e.to_string()));
                false
            }
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
    let outcome = PgTryBuilder::new(|| {
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
    .execute();
    outcome
}
