//! Which outbox the worker is looking at: whether the extension is there at this library's
//! version, the locks a round needs (taken without waiting), and the table's *generation*.

use super::store::run;
use super::txn::DbError;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use std::cell::RefCell;
use std::ffi::CStr;
use std::time::{Duration, Instant};

/// The schema version this library's SQL expects (`pg_extension.extversion`).
pub const SCHEMA_VERSION: &str = env!("CARGO_PKG_VERSION");

const EXTENSION_VERSION: &str = "SELECT e.extversion::text FROM pg_catalog.pg_extension e WHERE e.oid = $1";

/// Which outbox rows are: the table's oid and its row-id sequence's file. The oid changes when
/// the extension is dropped and created again, the sequence's file when its ids restart
/// (`TRUNCATE ... RESTART IDENTITY`, `ALTER SEQUENCE ... RESTART`): either way row ids may be
/// reused, and state about rows read from one generation means nothing for the next. (A
/// truncate that keeps the ids, the worker's own among them, or a rewrite of the table is no
/// new generation.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation {
    pub relid: u32,
    pub sequence_file: u32,
}

/// What the worker found of the extension in its database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Table {
    Missing,
    /// Installed, but at another version than this library's (an upgrade is half done).
    OtherVersion(String),
    /// The table is locked by someone else (DROP EXTENSION, say): stay out of the way.
    Busy,
    /// Installed; the table is locked for this transaction.
    Ready(Generation),
}

thread_local! {
    /// The version `pg_extension` gave for an extension oid, and when.
    static VERSION: RefCell<Option<(pg_sys::Oid, String, Instant)>> = const { RefCell::new(None) };
}

/// How long a version read for an extension oid is trusted (an `ALTER EXTENSION UPDATE` keeps
/// the oid).
const VERSION_RECHECK: Duration = Duration::from_secs(5);

/// Finds the outbox and, when it is there, takes the lock a round needs without waiting for
/// it. Cheap: catalog cache lookups, the lock, and a version read every few seconds.
pub fn table() -> Result<Table, DbError> {
    // SAFETY: catalog lookups by name inside a transaction; `missing_ok` avoids errors.
    let extension = unsafe { pg_sys::get_extension_oid(c"pg_outbox".as_ptr(), true) };
    if extension == pg_sys::InvalidOid {
        return Ok(Table::Missing);
    }
    let version = extension_version(extension)?;
    if version.as_deref() != Some(SCHEMA_VERSION) {
        return Ok(version.map_or(Table::Missing, Table::OtherVersion));
    }
    let Some(relid) = messages_relid() else { return Ok(Table::Missing) };
    if !lock_without_waiting(relid, pg_sys::RowExclusiveLock) {
        return Ok(Table::Busy);
    }
    // Under the lock, the name still means this table (locking processed invalidations).
    if messages_relid() != Some(relid) {
        return Ok(Table::Busy);
    }
    let Some(sequence) = relid_in_outbox(c"messages_id_seq") else { return Ok(Table::Missing) };
    // The round reads the sequence too (the floor): its lock is taken without waiting as well.
    // Waiting for it while holding the table's would deadlock with `DROP EXTENSION`, which
    // locks the sequence before the table.
    if !lock_without_waiting(sequence, pg_sys::AccessShareLock) {
        return Ok(Table::Busy);
    }
    Ok(relfilenode(sequence).map_or(Table::Missing, |sequence_file| {
        Table::Ready(Generation { relid: relid.to_u32(), sequence_file })
    }))
}

/// A table a round writes only now and then, besides `outbox.messages`.
#[derive(Debug, Clone, Copy)]
pub enum Written {
    /// `outbox.dead_letters`: when an event has failed for the last time.
    DeadLetters,
    /// `outbox.stream_producers`: when a stream's events are given ids, or its producer recovers.
    StreamProducers,
}

/// Takes the lock to write `table`, in a transaction that found the outbox [`Table::Ready`],
/// without waiting for it: a round that waited while holding the outbox's locks could deadlock
/// with `DROP EXTENSION`, which locks the extension's tables in an order of its own. A session
/// that holds a conflicting lock fails the round instead (55P03), which is tried again.
pub fn lock_to_write(table: Written) -> Result<(), DbError> {
    // The dead letters' row ids come from their identity sequence (`nextval` locks it).
    let relations: &[&CStr] = match table {
        Written::DeadLetters => &[c"dead_letters", c"dead_letters_id_seq"],
        Written::StreamProducers => &[c"stream_producers"],
    };
    for name in relations {
        let shown = name.to_string_lossy();
        let Some(relid) = relid_in_outbox(name) else {
            return Err(DbError::new(
                PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                format!("outbox.{shown} is missing"),
            ));
        };
        if !lock_without_waiting(relid, pg_sys::RowExclusiveLock) {
            return Err(DbError::new(
                PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,
                format!("outbox.{shown} is locked by another session"),
            ));
        }
    }
    Ok(())
}

/// Takes `mode` on `relid` for the rest of the transaction if no one holds a conflicting lock.
fn lock_without_waiting(relid: pg_sys::Oid, mode: u32) -> bool {
    // SAFETY: a conditional lock inside a transaction, released at its end.
    unsafe { pg_sys::ConditionalLockRelationOid(relid, mode as pg_sys::LOCKMODE) }
}

fn extension_version(extension: pg_sys::Oid) -> Result<Option<String>, DbError> {
    let cached = VERSION.with(|v| {
        v.borrow()
            .as_ref()
            .filter(|(oid, _, at)| *oid == extension && at.elapsed() < VERSION_RECHECK)
            .map(|(_, v, _)| v.clone())
    });
    if cached.is_some() {
        return Ok(cached);
    }
    let version = Spi::connect_mut(|c| {
        run(c, EXTENSION_VERSION, &[extension.into()], |t| {
            Ok(if t.is_empty() { None } else { t.first().get::<String>(1)? })
        })
    })?;
    VERSION.with(|v| *v.borrow_mut() = version.clone().map(|s| (extension, s, Instant::now())));
    Ok(version)
}

fn messages_relid() -> Option<pg_sys::Oid> {
    relid_in_outbox(c"messages")
}

fn relid_in_outbox(name: &CStr) -> Option<pg_sys::Oid> {
    // SAFETY: catalog cache lookups by name inside a transaction.
    unsafe {
        let schema = pg_sys::get_namespace_oid(c"outbox".as_ptr(), true);
        if schema == pg_sys::InvalidOid {
            return None;
        }
        let relid = pg_sys::get_relname_relid(name.as_ptr(), schema);
        (relid != pg_sys::InvalidOid).then_some(relid)
    }
}

fn relfilenode(relid: pg_sys::Oid) -> Option<u32> {
    // SAFETY: a catalog cache lookup by oid, released before returning; the tuple is a
    // pg_class row while held.
    unsafe {
        let tuple = pg_sys::SearchSysCache1(pg_sys::SysCacheIdentifier::RELOID as i32, relid.into());
        if tuple.is_null() {
            return None;
        }
        let form = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_class>(tuple);
        let node = (*form).relfilenode.to_u32();
        pg_sys::ReleaseSysCache(tuple);
        Some(node)
    }
}
