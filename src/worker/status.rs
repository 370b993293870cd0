//! What the worker tells the world: one log line per change of state (never one per attempt),
//! and its status in shared memory for `outbox.stats`. Errors are recorded twice: in full
//! (the broker's host, user and vhost, never a password) for privileged readers, and as a
//! summary that names no address for everyone else.

use super::ledger::Outcomes;
use super::table::SCHEMA_VERSION;
use super::txn::DbError;
use crate::shmem;
use pg_outbox_core::metrics::Counted;
use pgrx::prelude::*;
use std::collections::HashSet;

/// Anything about the database that keeps the worker from publishing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbState {
    Ready,
    NoExtension,
    OtherVersion(String),
    /// Someone holds the table (DROP EXTENSION, say): not worth a log line.
    Busy,
    Failing(DbError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BrokerState {
    Unknown,
    Connected,
    Unavailable,
}

/// At most this many distinct failure texts are logged between two clean rounds.
const DISTINCT_FAILURES_LOGGED: usize = 100;

pub struct Status {
    db: DbState,
    /// The stream path's last transaction error, while it fails (its state is its own: the
    /// AMQP path's rounds do not make it worth a new log line).
    stream_db: Option<DbError>,
    broker: BrokerState,
    failures_logged: HashSet<String>,
    housekeeping_logged: HashSet<String>,
}

fn now() -> pg_sys::TimestampTz {
    // SAFETY: reads the clock.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

impl Status {
    /// The worker started in `database`.
    pub fn starting(database: pg_sys::Oid) -> Status {
        // SAFETY: reads this process' pid.
        let pid = unsafe { pg_sys::MyProcPid };
        shmem::update_status(|s| {
            // What was counted goes on from where the last worker of this database left it.
            *s = s.restarted();
            s.pid = pid;
            s.database_oid = database.to_u32();
            s.started_at = now();
            s.set_state("starting");
        });
        Status {
            db: DbState::Ready,
            stream_db: None,
            broker: BrokerState::Unknown,
            failures_logged: HashSet::new(),
            housekeeping_logged: HashSet::new(),
        }
    }

    /// The worker exits: its slot says so, unless the slot is no longer its own.
    pub fn stopped() {
        // SAFETY: reads this process' pid.
        let pid = unsafe { pg_sys::MyProcPid };
        shmem::update_status(|s| {
            if s.pid == pid {
                s.pid = 0;
                s.broker_connected = false;
                s.metrics.in_flight = 0;
                s.set_state("stopped");
            }
        });
    }

    /// The last round found no outbox it may use (no extension, or another version): the
    /// worker does not connect to the broker for nothing.
    pub fn outbox_missing(&self) -> bool {
        matches!(self.db, DbState::NoExtension | DbState::OtherVersion(_))
    }

    pub fn broker_connected(&mut self, shown_url: &str, frame_max: u32, declare_warning: Option<&str>) {
        if let Some(w) = declare_warning {
            warning!("pg_outbox: {w}");
        }
        if self.broker != BrokerState::Connected {
            log!("pg_outbox: connected to {shown_url}");
        }
        self.broker = BrokerState::Connected;
        shmem::set_frame_max(frame_max);
        shmem::update_status(|s| {
            s.metrics.connections += 1;
            s.broker_connected = true;
            s.set_state("running");
        });
    }

    /// New broker settings: the next failure (or success) is worth a log line again.
    pub fn broker_settings_changed(&mut self) {
        self.broker = BrokerState::Unknown;
    }

    /// An attempt to connect failed: `reason` in full (see [`Status::broker_down`]).
    pub fn connect_failed(&mut self, reason: &str) {
        shmem::update_status(|s| s.metrics.connect_failures += 1);
        self.broker_down(reason);
    }

    /// `reason` in full (it may name the broker's address; never its password).
    pub fn broker_down(&mut self, reason: &str) {
        if self.broker != BrokerState::Unavailable {
            warning!("pg_outbox: broker unavailable, retrying with back-off: {reason}");
        }
        self.broker = BrokerState::Unavailable;
        let at = now();
        shmem::update_status(|s| {
            s.broker_connected = false;
            s.set_state("waiting for broker");
            s.set_error(reason, "the broker is unavailable", at);
        });
    }

    pub fn db(&mut self, state: DbState) {
        if state == self.db {
            return;
        }
        match &state {
            DbState::Ready => log!("pg_outbox: outbox ready, publishing"),
            DbState::NoExtension => log!("pg_outbox: waiting for CREATE EXTENSION pg_outbox in this database"),
            DbState::OtherVersion(v) => warning!(
                "pg_outbox: the extension is at version {v} but the library is {SCHEMA_VERSION}; run ALTER EXTENSION pg_outbox UPDATE"
            ),
            DbState::Busy => {}
            DbState::Failing(e) => warning!("pg_outbox: database step failed, retrying: {e}"),
        }
        let label = match &state {
            DbState::Ready | DbState::Busy => None,
            DbState::NoExtension => Some("waiting for extension"),
            DbState::OtherVersion(_) => Some("waiting for extension update"),
            DbState::Failing(_) => Some("database error"),
        };
        let connected = self.broker == BrokerState::Connected;
        let at = now();
        shmem::update_status(|s| {
            match label {
                Some(l) => s.set_state(l),
                None if connected => s.set_state("running"),
                None => {}
            }
            if let DbState::Failing(e) = &state {
                s.set_error(&e.to_string(), &format!("database step failed (SQLSTATE {})", e.sqlstate()), at);
            }
        });
        if state != DbState::Busy {
            self.db = state;
        }
    }

    /// The stream path's transaction failed: logged when its error changes (not every round),
    /// and shown in `outbox.stats`' `last_error` (its `worker_state` is the AMQP path's).
    pub fn stream_db_failed(&mut self, e: DbError) {
        if self.stream_db.as_ref() != Some(&e) {
            warning!("pg_outbox: the stream path's database step failed, retrying: {e}");
        }
        let at = now();
        shmem::update_status(|s| {
            s.set_error(&e.to_string(), &format!("database step failed (SQLSTATE {})", e.sqlstate()), at)
        });
        self.stream_db = Some(e);
    }

    /// The stream path's transaction succeeded.
    pub fn stream_db_ok(&mut self) {
        if self.stream_db.take().is_some() {
            log!("pg_outbox: the stream path's database step succeeds again");
        }
    }

    /// Shown while the worker waits for synchronous standbys to confirm a batch.
    pub fn waiting_for_standbys(&mut self, waiting: bool) {
        let connected = self.broker == BrokerState::Connected;
        shmem::update_status(|s| match (waiting, connected) {
            (true, _) => s.set_state("waiting for synchronous standbys"),
            (false, true) => s.set_state("running"),
            (false, false) => {}
        });
    }

    /// A message to `exchange` failed (`kind` names how, `error` says all).
    pub fn failed_attempt(&mut self, kind: &str, error: &str, exchange: &str) {
        let at = now();
        shmem::update_status(|s| {
            s.failed_attempts_total += 1;
            s.metrics.count(exchange, Counted::FailedAttempt, 1);
            s.set_error(error, &format!("publishing failed: {kind}"), at);
        });
    }

    /// Events handed over and not yet settled.
    pub fn in_flight(&mut self, n: usize) {
        shmem::update_status(|s| s.metrics.in_flight = n as i64);
    }

    /// Rows waiting for a retry, as last counted.
    pub fn retrying(&mut self, n: i64) {
        shmem::update_status(|s| s.metrics.retrying = n);
    }

    /// Events handed over for the first time now, by their commit time.
    pub fn waited(&mut self, committed: impl Iterator<Item = i64>) {
        let at = now();
        shmem::update_status(|s| committed.for_each(|c| s.metrics.wait.observe(at.saturating_sub(c))));
    }

    /// Counts what the database recorded (per exchange, `default_exchange` for rows that name
    /// none); logs failed attempts once per distinct error, and each dead letter.
    pub fn recorded(&mut self, outcomes: &Outcomes, default_exchange: &str) {
        let published = outcomes.confirmed.len();
        if published > 0 {
            let at = now();
            shmem::update_status(|s| {
                s.published_total += published as i64;
                s.last_publish_at = at;
                for m in &outcomes.confirmed_meters {
                    s.metrics.count(m.exchange.as_deref().unwrap_or(default_exchange), Counted::Published, 1);
                    s.metrics.commit_to_confirm.observe(m.settled_at.saturating_sub(m.committed_at));
                }
            });
        }
        if outcomes.failures.is_empty() && published > 0 {
            self.failures_logged.clear();
        }
        let mut dead = 0;
        for f in &outcomes.failures {
            if f.retry_after.is_none() {
                dead += 1;
                warning!(
                    "pg_outbox: event (row {}) moved to outbox.dead_letters after its last attempt: {}",
                    f.row_id,
                    f.error
                );
            } else if self.failures_logged.len() < DISTINCT_FAILURES_LOGGED
                && self.failures_logged.insert(f.error.clone())
            {
                log!("pg_outbox: publishing failed, will retry: {}", f.error);
            }
        }
        if dead > 0 {
            shmem::update_status(|s| {
                s.dead_lettered_total += dead;
                for f in outcomes.failures.iter().filter(|f| f.retry_after.is_none()) {
                    s.metrics.count(
                        f.meter.exchange.as_deref().unwrap_or(default_exchange),
                        Counted::DeadLettered,
                        1,
                    );
                }
            });
        }
    }

    /// Housekeeping that failed: worth a line, once per kind of failure.
    pub fn housekeeping_failed(&mut self, what: &str, e: &DbError) {
        let key = format!("{what}: {}", e.sqlstate());
        if self.housekeeping_logged.insert(key) {
            warning!("pg_outbox: could not {what}: {e}");
        }
    }
}
