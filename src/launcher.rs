//! The launcher: a static background worker, started by the postmaster once recovery is over
//! (so never on a standby), connected to no database. It starts the worker for
//! `outbox.database` as `outbox.role` once both exist, restarts it with back-off when it
//! stops, and replaces it when either setting changes. Waiting for a database that does not
//! exist yet is quiet: one log line, then a look every few seconds.

use crate::{gucs, shmem, signals, worker};
use pgrx::bgworkers::{BackgroundWorkerBuilder, BgWorkerStartTime, DynamicBackgroundWorker};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::time::{Duration, Instant};

const LAUNCHER_TYPE: &str = "pg_outbox launcher";
/// How often the launcher looks at its worker and for the database, at the latest.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
const RESTART_DELAY_MIN: Duration = Duration::from_secs(1);
const RESTART_DELAY_MAX: Duration = Duration::from_secs(60);
/// A worker that ran this long is healthy: the next restart is quick again.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Called from `_PG_init` while preloading.
pub fn register() {
    BackgroundWorkerBuilder::new(LAUNCHER_TYPE)
        .set_type(LAUNCHER_TYPE)
        .set_library("pg_outbox")
        .set_function("pg_outbox_launcher_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    database: String,
    role: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Waiting {
    Nothing,
    Database(String),
    Role(String),
    Slot,
}

struct Launcher {
    target: Target,
    worker: Option<(DynamicBackgroundWorker, Instant)>,
    restart_delay: Duration,
    not_before: Instant,
    waiting: Waiting,
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_outbox_launcher_main(_arg: pg_sys::Datum) {
    signals::install();
    pgrx::bgworkers::BackgroundWorker::connect_worker_to_spi(None, None);
    let mut launcher = Launcher {
        target: current_target(),
        worker: None,
        restart_delay: RESTART_DELAY_MIN,
        not_before: Instant::now(),
        waiting: Waiting::Nothing,
    };
    loop {
        if signals::take_reload() {
            // SAFETY: the launcher's main thread, between checks.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            let target = current_target();
            if target != launcher.target {
                log!("pg_outbox: outbox.database or outbox.role changed, restarting the worker");
                launcher.stop_worker();
                launcher.target = target;
                launcher.not_before = Instant::now();
            }
        }
        launcher.step();
        if !signals::wait(CHECK_INTERVAL) {
            break;
        }
    }
    // The postmaster stops the worker itself at shutdown; after a lone SIGTERM the worker
    // keeps running and the restarted launcher adopts it.
}

fn current_target() -> Target {
    Target { database: gucs::database(), role: gucs::role() }
}

/// The pid of a running worker this launcher did not start, from shared memory.
fn other_worker_pid() -> Option<i32> {
    let pid = shmem::status()?.pid;
    // SAFETY: signal 0 only checks that the process exists.
    (pid > 0 && unsafe { libc::kill(pid, 0) } == 0).then_some(pid)
}

impl Launcher {
    fn step(&mut self) {
        if self.worker.is_none() && other_worker_pid().is_some() {
            // Left by an earlier launcher (this one was restarted), or still stopping.
            return;
        }
        if let Some((handle, started)) = &self.worker {
            match handle.pid() {
                Ok(_) => return,
                Err(pgrx::bgworkers::BackgroundWorkerStatus::NotYetStarted) => return,
                Err(_) => {
                    let ran = started.elapsed();
                    self.restart_delay = if ran >= HEALTHY_RUN {
                        RESTART_DELAY_MIN
                    } else {
                        (self.restart_delay * 2).min(RESTART_DELAY_MAX)
                    };
                    log!(
                        "pg_outbox: worker stopped after {:.0?}; restarting in {:?}",
                        ran,
                        self.restart_delay
                    );
                    self.not_before = Instant::now() + self.restart_delay;
                    self.worker = None;
                }
            }
        }
        if Instant::now() < self.not_before {
            return;
        }
        let looked_up = lookup(&self.target);
        let (database, role) = match looked_up {
            Ok(ids) => ids,
            Err(waiting) => {
                if waiting != self.waiting {
                    match &waiting {
                        Waiting::Database(d) => {
                            log!("pg_outbox: waiting for database \"{d}\" (outbox.database) to exist")
                        }
                        Waiting::Role(r) => {
                            warning!("pg_outbox: role \"{r}\" (outbox.role) does not exist; waiting for it")
                        }
                        _ => {}
                    }
                    self.waiting = waiting;
                }
                return;
            }
        };
        let started = BackgroundWorkerBuilder::new(&format!(
            "{} for database {}",
            worker::WORKER_TYPE,
            self.target.database
        ))
        .set_type(worker::WORKER_TYPE)
        .set_library("pg_outbox")
        .set_function("pg_outbox_worker_main")
        .set_argument(Some(pg_sys::Datum::from(database.to_u32())))
        .set_extra(&worker::role_argument(role))
        .enable_spi_access()
        // SAFETY: reads this process' pid.
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic();
        match started {
            Ok(handle) => {
                if self.waiting != Waiting::Nothing {
                    log!("pg_outbox: starting the worker for database \"{}\"", self.target.database);
                }
                self.waiting = Waiting::Nothing;
                self.worker = Some((handle, Instant::now()));
            }
            Err(_) => {
                if self.waiting != Waiting::Slot {
                    warning!("pg_outbox: no background worker slot is free; raise max_worker_processes");
                    self.waiting = Waiting::Slot;
                }
                self.not_before = Instant::now() + RESTART_DELAY_MIN;
            }
        }
    }

    fn stop_worker(&mut self) {
        if let Some((handle, _)) = self.worker.take() {
            let _ = handle.terminate().wait_for_shutdown();
        }
        if let Some(pid) = other_worker_pid() {
            // SAFETY: asks a worker of ours (its pid from shared memory) to stop.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
}

/// The oid of the target database, and of the target role with whether it may log in; or
/// what is missing.
fn lookup(target: &Target) -> Result<(pg_sys::Oid, Option<(pg_sys::Oid, bool)>), Waiting> {
    // SAFETY: heap scans of shared catalogs inside a transaction (see `find_by_name`).
    let (database, role) = pgrx::bgworkers::BackgroundWorker::transaction(|| unsafe {
        let database =
            find_by_name(pg_sys::DatabaseRelationId, &target.database, |t: &pg_sys::FormData_pg_database| {
                ((t.oid, ()), &t.datname)
            });
        let role = target.role.as_ref().map(|r| {
            find_by_name(pg_sys::AuthIdRelationId, r, |t: &pg_sys::FormData_pg_authid| {
                ((t.oid, t.rolcanlogin), &t.rolname)
            })
        });
        (database.map(|(oid, ())| oid), role)
    });
    let database = database.ok_or_else(|| Waiting::Database(target.database.clone()))?;
    match role {
        Some(None) => Err(Waiting::Role(target.role.clone().unwrap_or_default())),
        Some(Some(r)) => Ok((database, Some(r))),
        None => Ok((database, None)),
    }
}

/// Scans a shared catalog (pg_database, pg_authid) for a name; what `fields` takes from the
/// row. A process connected to no database can read shared catalogs only by heap scans, as
/// the autovacuum launcher does.
///
/// # Safety
/// Inside a transaction; `T` must be the catalog's row struct.
unsafe fn find_by_name<T, R: Copy>(
    catalog: pg_sys::Oid,
    name: &str,
    fields: impl Fn(&T) -> (R, &pg_sys::NameData),
) -> Option<R> {
    // SAFETY: the caller holds a transaction; catalog rows are read while the scan holds
    // their buffer, as `T` (the catalog's fixed-size row struct, after the tuple header).
    unsafe {
        let rel = pg_sys::table_open(catalog, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        let mut found = None;
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let row = &*pg_sys::heap_tuple_get_struct::<T>(tuple);
            let (value, row_name) = fields(row);
            if std::ffi::CStr::from_ptr(row_name.data.as_ptr()).to_bytes() == name.as_bytes() {
                found = Some(value);
                break;
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        found
    }
}
