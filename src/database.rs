//! Getting out of the way of the commands that need a database to themselves.
//!
//! `DROP DATABASE` (without FORCE), `ALTER DATABASE ... RENAME` or `SET TABLESPACE`, and
//! `CREATE DATABASE ... TEMPLATE` lock the database object first, then wait up to five
//! seconds for its other sessions to leave before they fail with "being accessed by other
//! users". A new connection takes a lock that conflicts with theirs (`RowExclusiveLock`), so
//! whether it would be granted now tells whether such a command is under way. The worker asks
//! between rounds and leaves; the launcher asks before starting a worker, and waits.

use pgrx::pg_sys;

/// Whether a command that needs database `database` to itself holds (or waits for) its lock.
/// Takes nothing: a lock granted to the probe is released at once.
pub fn wanted_alone(database: pg_sys::Oid) -> bool {
    let tag = pg_sys::LOCKTAG {
        // SET_LOCKTAG_OBJECT for a shared catalog's object: no database.
        locktag_field1: 0,
        locktag_field2: pg_sys::DatabaseRelationId.to_u32(),
        locktag_field3: database.to_u32(),
        locktag_field4: 0,
        locktag_type: pg_sys::LockTagType::LOCKTAG_OBJECT as u8,
        locktag_lockmethodid: pg_sys::DEFAULT_LOCKMETHOD as u8,
    };
    let mode = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
    // SAFETY: a session lock (no resource owner or transaction needed) on a well-formed tag,
    // never waited for; released below when it was granted.
    unsafe {
        match pg_sys::LockAcquire(&tag, mode, true, true) {
            pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL => true,
            _ => {
                pg_sys::LockRelease(&tag, mode, true);
                false
            }
        }
    }
}

/// Takes, for the life of this worker, the lock that makes it its database's only worker; false
/// when another worker holds it (started by an earlier launcher, say, and not yet seen by this
/// one). An advisory lock of the database with `objsubid` 5 in `pg_locks` (user advisory locks
/// use 1 and 2; pg_outbox's writers 3 and 4), so no one else's lock can collide with it.
pub fn serve_alone() -> bool {
    // SAFETY: reads this process' database.
    let database = unsafe { pg_sys::MyDatabaseId };
    let tag = pg_sys::LOCKTAG {
        locktag_field1: database.to_u32(),
        // "pgou", "tbox": fixed, so that every worker of this database asks for the same lock.
        locktag_field2: 0x7067_6f75,
        locktag_field3: 0x7462_6f78,
        locktag_field4: 5,
        locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
        locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
    };
    // SAFETY: a session lock (kept until the process exits, released by Postgres then),
    // never waited for.
    let got = unsafe { pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as pg_sys::LOCKMODE, true, true) };
    got != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
}
