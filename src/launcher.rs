//! The launcher: a static background worker, started by the postmaster once recovery is over
//! (so never on a standby), connected to no database. It runs one worker per database of
//! `outbox.database` (a comma-separated list) as `outbox.role`, once both exist; restarts a
//! worker with back-off when it stops; on reload starts and stops only the workers of the
//! databases that were added or removed (all of them when the role changed).
//!
//! It never starts a worker into a restart loop: it waits, quietly (one log line), for a
//! database that does not exist yet, that is a template or refuses connections, or that a
//! command needs to itself (DROP, RENAME, a copy: see [`crate::database`]), and for a free
//! background worker slot (said once in the log and in the database's `outbox.stats`).

use crate::{database, gucs, shmem, signals, worker};
use pgrx::bgworkers::{BackgroundWorkerBuilder, BgWorkerStartTime, DynamicBackgroundWorker};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::time::{Duration, Instant};

const LAUNCHER_TYPE: &str = "pg_outbox launcher";
/// How often the launcher looks at its workers and for the databases, at the latest.
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

/// Why a database has no worker now.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Waiting {
    Nothing,
    Database,
    Role(String),
    /// A template, or `ALLOW_CONNECTIONS false`.
    Refused(&'static str),
    /// A command needs the database to itself.
    Busy,
    Slot,
    StatusSlot,
}

/// One database of `outbox.database`.
struct Served {
    name: String,
    /// Its oid and status slot, once found.
    found: Option<(pg_sys::Oid, usize)>,
    worker: Option<(DynamicBackgroundWorker, Instant)>,
    restart_delay: Duration,
    not_before: Instant,
    waiting: Waiting,
}

impl Served {
    fn new(name: String) -> Served {
        Served {
            name,
            found: None,
            worker: None,
            restart_delay: RESTART_DELAY_MIN,
            not_before: Instant::now(),
            waiting: Waiting::Nothing,
        }
    }
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_outbox_launcher_main(_arg: pg_sys::Datum) {
    signals::install();
    pgrx::bgworkers::BackgroundWorker::connect_worker_to_spi(None, None);
    let mut role = gucs::role();
    let mut served: Vec<Served> = gucs::databases().into_iter().map(Served::new).collect();
    loop {
        if signals::take_reload() {
            // SAFETY: the launcher's main thread, between checks.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            let databases = gucs::databases();
            let new_role = gucs::role();
            if new_role != role {
                log!("pg_outbox: outbox.role changed, restarting the workers");
                served.iter_mut().for_each(Served::stop);
                role = new_role;
            }
            for gone in served.iter_mut().filter(|s| !databases.contains(&s.name)) {
                log!("pg_outbox: no longer serving database \"{}\" (outbox.database)", gone.name);
                gone.stop();
                // Released once its worker has exited (`stop` waits for that).
                if let Some((_, slot)) = gone.found {
                    shmem::release_slot(slot);
                }
            }
            served.retain(|s| databases.contains(&s.name));
            for name in databases {
                if !served.iter().any(|s| s.name == name) {
                    served.push(Served::new(name));
                }
            }
        }
        // Looked up once per check, and only when a worker is to start.
        let mut role_found = None;
        for s in &mut served {
            s.step(&role, &mut role_found);
        }
        sweep(&served);
        if !signals::wait(CHECK_INTERVAL) {
            break;
        }
    }
    // The postmaster stops the workers itself at shutdown; after a lone SIGTERM they keep
    // running and the restarted launcher adopts them.
}

/// Slots of databases no longer listed (removed while an earlier launcher ran, say): their
/// workers are stopped, then the slots freed.
fn sweep(served: &[Served]) {
    for (slot, oid) in shmem::claimed_slots() {
        if served.iter().any(|s| s.found.is_some_and(|(o, i)| i == slot || o.to_u32() == oid)) {
            continue;
        }
        match running_pid(slot) {
            Some(pid) => {
                log!("pg_outbox: stopping the worker of a database that outbox.database no longer lists");
                // SAFETY: asks a worker of ours (its pid from shared memory) to stop.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                wait_for_exit(slot);
                shmem::release_slot(slot);
            }
            None => shmem::release_slot(slot),
        }
    }
}

/// Waits (10 s at most) for the worker in `slot` to exit.
fn wait_for_exit(slot: usize) {
    let until = Instant::now() + Duration::from_secs(10);
    while running_pid(slot).is_some() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The pid of a running worker in `slot` (one this launcher may not have started).
fn running_pid(slot: usize) -> Option<i32> {
    let pid = shmem::slot_status(slot)?.pid;
    // SAFETY: signal 0 only checks that the process exists.
    (pid > 0 && unsafe { libc::kill(pid, 0) } == 0).then_some(pid)
}

impl Served {
    fn step(&mut self, role: &Option<String>, role_found: &mut Option<RoleFound>) {
        if let Some((handle, started)) = &self.worker {
            match handle.pid() {
                Ok(_) | Err(pgrx::bgworkers::BackgroundWorkerStatus::NotYetStarted) => return,
                Err(_) => {
                    let ran = started.elapsed();
                    self.restart_delay = if ran >= HEALTHY_RUN {
                        RESTART_DELAY_MIN
                    } else {
                        (self.restart_delay * 2).min(RESTART_DELAY_MAX)
                    };
                    log!(
                        "pg_outbox: worker for database \"{}\" stopped after {:.0?}; restarting in {:?}",
                        self.name,
                        ran,
                        self.restart_delay
                    );
                    self.not_before = Instant::now() + self.restart_delay;
                    self.worker = None;
                }
            }
        } else if self.found.is_some_and(|(_, slot)| running_pid(slot).is_some()) {
            // Left by an earlier launcher (this one was restarted), or still stopping.
            return;
        }
        if Instant::now() < self.not_before {
            return;
        }
        match self.ready(role, role_found) {
            Ok((oid, slot, role)) => self.start(oid, slot, role),
            Err(waiting) => self.wait(waiting),
        }
    }

    /// The database's oid, its status slot and the role, or why the worker cannot start now.
    fn ready(
        &mut self,
        role: &Option<String>,
        role_found: &mut Option<RoleFound>,
    ) -> Result<(pg_sys::Oid, usize, RoleId), Waiting> {
        let Some(found) = lookup_database(&self.name) else { return Err(Waiting::Database) };
        if let Some((old, slot)) = self.found {
            if old != found.oid {
                // Dropped and created again: a new database, a new slot.
                shmem::release_slot(slot);
                self.found = None;
            }
        }
        let slot = match self.found {
            Some((_, slot)) => slot,
            None => {
                let slot = shmem::claim_slot(found.oid.to_u32()).ok_or(Waiting::StatusSlot)?;
                self.found = Some((found.oid, slot));
                slot
            }
        };
        if running_pid(slot).is_some() {
            // Started by an earlier launcher: adopted.
            return Err(Waiting::Nothing);
        }
        if found.is_template {
            return Err(Waiting::Refused("it is a template database"));
        }
        if !found.allows_connections {
            return Err(Waiting::Refused("it does not allow connections (ALLOW_CONNECTIONS false)"));
        }
        let role = role_found
            .get_or_insert_with(|| lookup_role(role.as_deref()))
            .map_err(|()| Waiting::Role(role.clone().unwrap_or_default()))?;
        if database::wanted_alone(found.oid) {
            return Err(Waiting::Busy);
        }
        Ok((found.oid, slot, role))
    }

    /// Says once why the worker does not start, in the log and in the database's status.
    fn wait(&mut self, waiting: Waiting) {
        if waiting == self.waiting {
            return;
        }
        let name = &self.name;
        let state = match &waiting {
            Waiting::Nothing => None,
            Waiting::Database => {
                log!("pg_outbox: waiting for database \"{name}\" (outbox.database) to exist");
                None
            }
            Waiting::Role(r) => {
                warning!("pg_outbox: role \"{r}\" (outbox.role) does not exist; waiting for it");
                Some(format!("waiting for role \"{r}\" (outbox.role)"))
            }
            Waiting::Refused(why) => {
                log!("pg_outbox: not serving database \"{name}\": {why}");
                Some(format!("not served: {why}"))
            }
            Waiting::Busy => {
                log!("pg_outbox: database \"{name}\" is being dropped, renamed or copied; waiting");
                Some("waiting: the database is being dropped, renamed or copied".into())
            }
            Waiting::Slot => {
                warning!(
                    "pg_outbox: no background worker slot is free for the worker of database \"{name}\"; raise max_worker_processes"
                );
                Some("waiting for a background worker slot (max_worker_processes)".into())
            }
            Waiting::StatusSlot => {
                warning!("pg_outbox: no status slot is free for database \"{name}\"");
                None
            }
        };
        if let (Some(state), Some((_, slot))) = (state, self.found) {
            // Only about a database whose worker does not run.
            if running_pid(slot).is_none() {
                shmem::update_slot(slot, |s| {
                    s.pid = 0;
                    s.set_state(&state);
                });
            }
        }
        self.waiting = waiting;
    }

    fn start(&mut self, database: pg_sys::Oid, slot: usize, role: RoleId) {
        let started =
            BackgroundWorkerBuilder::new(&format!("{} for database {}", worker::WORKER_TYPE, self.name))
                .set_type(worker::WORKER_TYPE)
                .set_library("pg_outbox")
                .set_function("pg_outbox_worker_main")
                .set_argument(Some(pg_sys::Datum::from(database.to_u32())))
                .set_extra(&worker::worker_argument(slot, role))
                .enable_spi_access()
                // SAFETY: reads this process' pid.
                .set_notify_pid(unsafe { pg_sys::MyProcPid })
                .load_dynamic();
        match started {
            Ok(handle) => {
                if !matches!(self.waiting, Waiting::Nothing) {
                    log!("pg_outbox: starting the worker for database \"{}\"", self.name);
                }
                self.waiting = Waiting::Nothing;
                self.worker = Some((handle, Instant::now()));
            }
            Err(_) => {
                self.wait(Waiting::Slot);
                self.not_before = Instant::now() + RESTART_DELAY_MIN;
            }
        }
    }

    fn stop(&mut self) {
        if let Some((handle, _)) = self.worker.take() {
            let _ = handle.terminate().wait_for_shutdown();
        }
        if let Some((_, slot)) = self.found {
            if let Some(pid) = running_pid(slot) {
                // SAFETY: asks a worker of ours (its pid from shared memory) to stop.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                wait_for_exit(slot);
            }
        }
        self.not_before = Instant::now();
        self.waiting = Waiting::Nothing;
    }
}

/// The role's oid and whether it may log in; `None` for the bootstrap superuser.
type RoleId = Option<(pg_sys::Oid, bool)>;
/// [`RoleId`], or `Err` when the role does not exist.
type RoleFound = Result<RoleId, ()>;

struct FoundDatabase {
    oid: pg_sys::Oid,
    is_template: bool,
    allows_connections: bool,
}

fn lookup_database(name: &str) -> Option<FoundDatabase> {
    // SAFETY: a heap scan of a shared catalog inside a transaction (see `find_by_name`).
    pgrx::bgworkers::BackgroundWorker::transaction(|| unsafe {
        find_by_name(pg_sys::DatabaseRelationId, name, |t: &pg_sys::FormData_pg_database| {
            ((t.oid, t.datistemplate, t.datallowconn), &t.datname)
        })
    })
    .map(|(oid, is_template, allows_connections)| FoundDatabase {
        oid,
        is_template,
        allows_connections,
    })
}

fn lookup_role(role: Option<&str>) -> RoleFound {
    let Some(role) = role else { return Ok(None) };
    // SAFETY: a heap scan of a shared catalog inside a transaction (see `find_by_name`).
    pgrx::bgworkers::BackgroundWorker::transaction(|| unsafe {
        find_by_name(pg_sys::AuthIdRelationId, role, |t: &pg_sys::FormData_pg_authid| {
            ((t.oid, t.rolcanlogin), &t.rolname)
        })
    })
    .map(Some)
    .ok_or(())
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
